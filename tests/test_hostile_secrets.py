"""Secrets never reach logs, events, status, reports or outputs.

A canary value stands in for each credential the trainer may read (HF_TOKEN and the AWS_*
variables that huggingface_hub and s3fs honour): `relora run` runs with them in its environment,
the operator's trainer Jobs get them from Secrets the spec references (env valueFrom and
envFrom). Everything the runs wrote is then searched for the canary.
"""

from __future__ import annotations

import base64
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from kubernetes import client

from relora_trainer import local_run
from relora_trainer.errors import EXIT_BAD_INPUT
from tests.conftest import toy_manifest, untyped
from tests.fault_kit import OperatorProcess
from tests.test_operator_e2e import (
    _adapter,
    _get,
    _jobs,
    _manifest,
    _phase,
    _wait,
)

CREDENTIAL_VARIABLES = (
    "HF_TOKEN",
    "HUGGING_FACE_HUB_TOKEN",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
)


def _canary() -> str:
    return f"canary-{uuid.uuid4().hex}"


def leaks(canary: str, texts: dict[str, str], folders: list[Path]) -> list[str]:
    """Where ``canary`` appears (also base64-encoded): named texts and files under folders."""
    needles = [canary.encode(), base64.b64encode(canary.encode())]
    found = [name for name, text in texts.items() if any(n in text.encode() for n in needles)]
    for folder in folders:
        for path in sorted(folder.rglob("*")):
            if path.is_file() and any(n in path.read_bytes() for n in needles):
                found.append(str(path))
    return found


def test_the_leak_search_finds_a_canary(tmp_path: Path) -> None:
    canary = _canary()
    (tmp_path / "deep" / "er").mkdir(parents=True)
    (tmp_path / "deep" / "er" / "state.bin").write_bytes(b"\x00" + canary.encode() + b"\x01")
    encoded = base64.b64encode(canary.encode()).decode()
    assert leaks(canary, {"log": "x", "secret": encoded}, [tmp_path]) == [
        "secret",
        str(tmp_path / "deep" / "er" / "state.bin"),
    ]


def test_relora_run_writes_no_credential_anywhere(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    canary, literal = _canary(), _canary()
    for variable in CREDENTIAL_VARIABLES:
        monkeypatch.setenv(variable, canary)
    manifest = toy_manifest(
        toy,
        initialization={"trials": 2},
        finetune={"maxSteps": 10, "evalEvery": 5, "checkpointEvery": 5, "learningRate": 0.01},
    )
    # Cluster-only fields (ignored by the local runner); a literal value is discouraged there,
    # but must not be copied into the outputs either.
    manifest["spec"]["env"] = [{"name": "HF_TOKEN", "value": literal}]
    manifest["spec"]["envFrom"] = [{"secretRef": {"name": "s3-credentials"}}]
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(manifest))
    # Progress bars and the results table on, as a user sees them.
    assert local_run.run(str(path), device="cpu", debug=True) in (0, 4)
    output = tmp_path / "output"
    assert (output / "toy-category" / "report.json").is_file()
    assert (output / "toy-category" / "summary.md").is_file()
    assert (output / "toy-category" / "state").is_dir()  # checkpoints and the search journal
    captured = capsys.readouterr()
    texts = {"stdout": captured.out, "stderr": captured.err}
    assert "toy-category" in captured.out
    assert leaks(canary, texts, [output]) == []
    assert leaks(literal, texts, [output]) == []

    # The error path too: a failing run prints its one line, and no credential.
    (tmp_path / "broken").mkdir()
    manifest["spec"]["adapters"][0]["data"]["train"] = str(tmp_path / "broken" / "none.jsonl")
    manifest["spec"]["output"]["uri"] = str(tmp_path / "broken" / "output")
    path.write_text(yaml.safe_dump(manifest))
    assert local_run.run(str(path), device="cpu", debug=True) == EXIT_BAD_INPUT
    captured = capsys.readouterr()
    assert "error: MissingInput: spec.adapters[toy-category].data.train" in captured.err
    texts = {"stdout": captured.out, "stderr": captured.err}
    assert leaks(canary, texts, [tmp_path / "broken"]) == []
    assert leaks(literal, texts, [tmp_path / "broken"]) == []


# ------------------------------------------------------------------ the operator
def _secret(name: str, data: dict[str, str]) -> dict[str, Any]:
    encoded = {k: base64.b64encode(v.encode()).decode() for k, v in data.items()}
    return {"metadata": {"name": name}, "type": "Opaque", "data": encoded}


def test_secrets_referenced_by_the_spec_stay_out_of_everything_the_operator_shows(
    api: Any, sandbox: Any, namespace: str, toy_claim: str, operator: OperatorProcess, toy: Any
) -> None:
    canary = _canary()
    core = untyped(client.CoreV1Api(api))
    core.create_namespaced_secret(namespace, _secret("hf-credentials", {"token": canary}))
    s3 = {"AWS_ACCESS_KEY_ID": canary, "AWS_SECRET_ACCESS_KEY": canary}
    core.create_namespaced_secret(namespace, _secret("s3-credentials", s3))
    env = [
        {"name": "OMP_NUM_THREADS", "value": "1"},
        {
            "name": "HF_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": "hf-credentials", "key": "token"}},
        },
    ]
    manifest = _manifest(
        "secretive",
        namespace,
        [_adapter("one", target=0.3)],
        env=env,
        envFrom=[{"secretRef": {"name": "s3-credentials"}}],
        method={"strategy": "reuse"},
    )
    untyped(client.CustomObjectsApi(api)).create_namespaced_custom_object(
        "relora.dev", "v1alpha1", namespace, "adaptermigrations", manifest
    )
    done = _wait(
        lambda: _phase(api, namespace, "secretive", "Succeeded", "Failed"),
        timeout=240,
        what="finished",
    )
    assert done["status"]["phase"] == "Succeeded", done["status"]

    serialize = client.ApiClient().sanitize_for_serialization
    pods = core.list_namespaced_pod(namespace).items
    assert pods, "the trainer ran as a pod"
    for pod in pods:  # the pod got references, resolved by the kubelet (the sandbox) only
        (container,) = pod.spec.containers
        hf = next(e for e in container.env if e.name == "HF_TOKEN")
        assert hf.value is None and hf.value_from.secret_key_ref.name == "hf-credentials"
    texts = {
        "migration": json.dumps(_get(api, namespace, "secretive")),
        "jobs": json.dumps(serialize(_jobs(api, namespace))),
        "pods": json.dumps(serialize(pods)),
        "events": json.dumps(serialize(core.list_namespaced_event(namespace).items)),
        "operator log": operator.logs.read_text(errors="replace"),
        "metrics": operator.metrics(),
    }
    for pod in pods:
        texts[f"log of {pod.metadata.name}"] = core.read_namespaced_pod_log(
            pod.metadata.name, namespace
        )
    folders = [Path(sandbox.jobs.workdir) / "pods" / namespace, toy.root / "output" / namespace]
    assert all(folder.is_dir() for folder in folders)
    assert leaks(canary, texts, folders) == []
    # The search is not blind: the Secret itself holds the canary.
    secret = core.read_namespaced_secret("hf-credentials", namespace)
    assert leaks(canary, {"secret": json.dumps(serialize(secret))}, []) == ["secret"]
