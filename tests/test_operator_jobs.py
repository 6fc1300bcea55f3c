"""The Job builder and the operator/trainer contract."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from relora_api import contract
from relora_api.resource import AdapterMigration
from relora_api.status import AdapterProgress, AdapterResult
from relora_operator import naming
from relora_operator.job_builder import build_job
from relora_operator.settings import Settings


def _job(manifest: dict[str, Any], adapter: int = 0, **settings: Any) -> dict[str, Any]:
    migration = AdapterMigration.from_manifest(manifest)
    return build_job(
        name=migration.metadata.name,
        namespace="ml",
        uid="1234-uid",
        spec=migration.spec,
        adapter=migration.spec.adapters[adapter],
        settings=Settings(**settings),
    )


def test_the_job_is_deterministic_and_owned(manifest: dict[str, Any]) -> None:
    manifest["metadata"]["labels"] = {"argocd.argoproj.io/instance": "apps"}
    job = _job(manifest)
    assert job == _job(manifest), "same inputs, same Job (a restart creates no twin)"
    meta = job["metadata"]
    assert meta["name"] == naming.job_name("llama-3-1-to-3-2", "sentiment", "1234-uid")
    assert len(meta["name"]) <= 63
    assert "argocd.argoproj.io/instance" not in meta["labels"], "never copy the parent's labels"
    assert meta["labels"][naming.MIGRATION_UID] == "1234-uid"
    assert meta["labels"][naming.ADAPTER] == "sentiment"
    (owner,) = meta["ownerReferences"]
    assert owner["kind"] == "AdapterMigration" and owner["controller"] is True
    assert owner["uid"] == "1234-uid"


def test_scheduling_and_failure_policy(manifest: dict[str, Any]) -> None:
    job = _job(manifest)
    spec = job["spec"]
    pod = spec["template"]["spec"]
    (container,) = pod["containers"]
    assert pod["restartPolicy"] == "Never"
    assert spec["backoffLimit"] == 2 and spec["activeDeadlineSeconds"] == 21600
    assert "ttlSecondsAfterFinished" not in spec, "set only once the outcome is recorded"
    assert spec["podFailurePolicy"]["rules"] == [
        {
            "action": "FailJob",
            "onExitCodes": {"containerName": "trainer", "operator": "In", "values": [3]},
        },
        {
            "action": "Ignore",
            "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}],
        },
    ]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert pod["priorityClassName"] == "batch-medium"
    assert pod["serviceAccountName"] == "adapter-migrator"
    env = {e["name"]: e for e in container["env"]}
    assert env["HF_TOKEN"]["valueFrom"]["secretKeyRef"] == {
        "name": "hf-credentials",
        "key": "token",
    }
    assert container["envFrom"] == [{"secretRef": {"name": "s3-credentials"}}]
    assert job["metadata"]["labels"][naming.QUEUE] == "gpu-queue"
    assert spec["suspend"] is True, "a Kueue-queued Job starts suspended; Kueue admits it"
    security = container["securityContext"]
    assert security["runAsNonRoot"] and security["readOnlyRootFilesystem"]
    assert security["capabilities"] == {"drop": ["ALL"]}


def test_the_trainer_gets_its_adapter_and_mounts(manifest: dict[str, Any]) -> None:
    job = _job(manifest, adapter=1)
    pod = job["spec"]["template"]["spec"]
    container = pod["containers"][0]
    env = {e["name"]: e.get("value") for e in container["env"]}
    spec = json.loads(env[contract.ENV_MIGRATION])
    assert [a["name"] for a in spec["adapters"]] == ["news-topic"]
    assert env[contract.ENV_ADAPTER] == "news-topic"
    assert json.loads(env[contract.ENV_PVC_MOUNTS]) == {
        "adapters": "/mnt/pvc/adapters",
        "datasets": "/mnt/pvc/datasets",
    }
    claims = {
        v["name"]: v["persistentVolumeClaim"]["claimName"]
        for v in pod["volumes"]
        if "persistentVolumeClaim" in v
    }
    assert claims == {"pvc-adapters": "adapters", "pvc-datasets": "datasets"}
    assert all(m["readOnly"] for m in container["volumeMounts"] if m["name"].startswith("pvc-"))


def test_no_token_unless_a_service_account_is_asked(manifest: dict[str, Any]) -> None:
    del manifest["spec"]["serviceAccountName"]
    del manifest["spec"]["queueName"]
    job = _job(manifest)
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False
    assert job["spec"]["suspend"] is False
    manifest["spec"]["suspend"] = True
    assert _job(manifest)["spec"]["suspend"] is True


def test_the_job_is_a_valid_batch_v1_job(manifest: dict[str, Any], tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(_job(manifest)))
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.32.0", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_long_names_stay_valid_labels() -> None:
    name = naming.job_name("m" * 200, "adapter-with-a-long-name-" * 2, "uid")
    assert len(name) <= 63 and name[-1].isalnum()
    assert len(naming.label_value("x" * 200)) <= 63


def test_outcome_round_trip_and_size_limit() -> None:
    outcome = contract.Outcome(kind="error", reason="IncompatibleModels", message="x" * 10_000)
    text = outcome.encode()
    assert len(text.encode()) <= contract.MAX_TERMINATION_MESSAGE
    decoded = contract.Outcome.decode(text)
    assert decoded is not None and decoded.reason == "IncompatibleModels"
    assert contract.Outcome.decode("Traceback (most recent call last): ...") is None
    many = AdapterResult(
        ready=True,
        strategy="relora",
        output_uri="out/a",
        metric="loss",
        coefficients={f"g{i}.alpha": 1.0 for i in range(32)},
    )
    text = contract.Outcome(kind="result", result=many).encode()
    assert len(text.encode()) <= contract.MAX_TERMINATION_MESSAGE
    again = contract.Outcome.decode(text)
    assert again is not None and again.result == many


def test_last_progress_reads_the_newest_progress_line() -> None:
    log = "\n".join(
        [
            json.dumps({"adapter": "a", "event": "progress", "stage": "search", "trial": 1}),
            "some library warning",
            json.dumps({"adapter": "a", "event": "progress", "stage": "finetune", "step": 7}),
            json.dumps({"adapter": "a", "event": "note", "message": "hi"}),
            "{not json",
        ]
    )
    assert contract.last_progress(log) == AdapterProgress(stage="finetune", step=7)
    assert contract.last_progress("nothing here") is None


def test_settings_name_the_bad_variable() -> None:
    assert Settings.from_env({}).trainer_image.endswith("relora-trainer:0.1.0")
    with pytest.raises(ValueError, match="RELORA_RESYNC_SECONDS"):
        Settings.from_env({"RELORA_RESYNC_SECONDS": "-1"})
    with pytest.raises(ValueError, match="RELORA_TRAINER_COMMAND: not a JSON list"):
        Settings.from_env({"RELORA_TRAINER_COMMAND": "python -m x"})
    custom = Settings.from_env({"RELORA_TRAINER_COMMAND": '["/venv/bin/python", "-m", "x"]'})
    assert custom.trainer_command == ["/venv/bin/python", "-m", "x"]
