"""End to end in the sandbox: kubectl -> operator -> Jobs -> trainer processes -> status.

The operator runs as its own process (`python -m relora_operator`), one per test, watching the
test's namespace; the sandbox's Job runner starts the trainer Job entrypoint as subprocesses;
the toy world is the PVC claim `toy`.
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from kubernetes import client
from peft import PeftModel

from relora_sandbox.faults import Fault
from relora_trainer import models
from relora_trainer.data import Encoder, read_jsonl
from relora_trainer.method.quality import measure
from tests.conftest import kubectl_apply, kubectl_binary, untyped, wait_for
from tests.fault_kit import OperatorProcess

GROUP, VERSION, PLURAL = "relora.dev", "v1alpha1", "adaptermigrations"


def _adapter(name: str, **readiness: Any) -> dict[str, Any]:
    return {
        "name": name,
        "uri": "pvc://toy/adapters/toy-category",
        "data": {
            "train": "pvc://toy/data/toy-category/train.jsonl",
            "validation": "pvc://toy/data/toy-category/validation.jsonl",
            "test": "pvc://toy/data/toy-category/test.jsonl",
        },
        "readiness": readiness or {"relativeToSource": 0.97},
    }


def _manifest(
    name: str, namespace: str, adapters: list[dict[str, Any]], **spec: Any
) -> dict[str, Any]:
    method = spec.pop("method", {})
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterMigration",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "sourceModel": {"uri": "pvc://toy/models/v1"},
            "targetModel": {"uri": spec.pop("target", "pvc://toy/models/v2-mild")},
            "adapters": adapters,
            "output": {"uri": f"pvc://toy/output/{namespace}/{name}"},
            # Several trainers share 2 cores here: one thread each keeps them from thrashing.
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "method": {
                "initialization": {"trials": 4},
                "finetune": {"maxSteps": 120, "learningRate": 0.01, "evalEvery": 10},
                **method,
            },
            **spec,
        },
    }


def _get(api: Any, namespace: str, name: str) -> dict[str, Any]:
    found: dict[str, Any] = untyped(client.CustomObjectsApi(api)).get_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, name
    )
    return found


def _wait(check: Any, timeout: float = 300.0, what: str = "condition") -> Any:
    return wait_for(check, timeout=timeout, what=what)


def _phase(api: Any, namespace: str, name: str, *phases: str) -> dict[str, Any] | None:
    found = _get(api, namespace, name)
    return found if found.get("status", {}).get("phase") in phases else None


def _jobs(api: Any, namespace: str) -> list[Any]:
    return list(untyped(client.BatchV1Api(api)).list_namespaced_job(namespace).items)


def _create(api: Any, manifest: dict[str, Any]) -> None:
    untyped(client.CustomObjectsApi(api)).create_namespaced_custom_object(
        GROUP, VERSION, manifest["metadata"]["namespace"], PLURAL, manifest
    )


def test_two_adapters_go_ready_and_load_with_peft(
    api: Any, sandbox: Any, namespace: str, operator: OperatorProcess, toy: Any
) -> None:
    manifest = _manifest("pair", namespace, [_adapter("strict"), _adapter("lenient", target=0.85)])
    kubectl = [kubectl_binary(), f"--kubeconfig={sandbox.kubeconfig_path}", "-n", namespace]
    kubectl_apply(kubectl, manifest)
    waited = subprocess.run(
        [*kubectl, "wait", "--for=condition=Ready", "am/pair", "--timeout=300s"],
        capture_output=True,
        text=True,
    )
    assert waited.returncode == 0, waited.stderr + operator.logs.read_text()[-3000:]
    status = _get(api, namespace, "pair")["status"]
    assert status["phase"] == "Succeeded" and status["progress"] == "2/2"
    assert status["progressPercent"] == 100 and status["observedGeneration"] == 1
    conditions = {c["type"]: c["status"] for c in status["conditions"]}
    assert conditions == {
        "Ready": "True",
        "Succeeded": "True",
        "Failed": "False",
        "Stalled": "False",
        "Suspended": "False",
    }
    assert len(_jobs(api, namespace)) == 2
    table = subprocess.run([*kubectl, "get", "am"], capture_output=True, text=True).stdout
    assert table.splitlines()[1].split()[:4] == ["pair", "True", "Succeeded", "2/2"]

    base = models.load_model(toy.v2, what="v2", device=torch.device("cpu"))
    validation = read_jsonl(toy.split("validation"), what="validation")
    choices = list(dict.fromkeys(e.completion for e in read_jsonl(toy.split("train"), what="t")))
    for adapter in status["adapters"]:
        result = adapter["result"]
        assert (
            adapter["phase"] == "Succeeded"
            and result["ready"]
            and result["qualityAfter"] >= result["target"]
        )
        assert result["outputUri"] == f"pvc://toy/output/{namespace}/pair/{adapter['name']}"
        folder = (
            Path(sandbox.jobs.pvc_root) / "toy" / "output" / namespace / "pair" / adapter["name"]
        )
        model = PeftModel.from_pretrained(base, str(folder))
        quality = measure(
            model,
            Encoder(models.load_tokenizer(toy.v2)),
            validation,
            choices,
            device=torch.device("cpu"),
        )
        assert quality.accuracy == pytest.approx(result["qualityAfter"], abs=1e-6)
        base = model.unload()

    metrics = operator.metrics()
    assert "relora_adapter_jobs_created_total 2.0" in metrics
    assert 'relora_adapter_jobs_finished_total{reason="Ready",result="ready"} 2.0' in metrics
    assert "relora_adapter_time_to_readiness_seconds_count 2.0" in metrics
    assert 'relora_migrations_total{result="succeeded"} 1.0' in metrics
    events = untyped(client.CoreV1Api(api)).list_namespaced_event(namespace).items
    assert {"AdapterRunning", "AdapterSucceeded", "MigrationSucceeded"} <= {
        e.reason for e in events
    }


def test_suspend_holds_the_jobs_and_resume_runs_them(
    api: Any, namespace: str, operator: OperatorProcess
) -> None:
    _create(
        api,
        _manifest(
            "later",
            namespace,
            [_adapter("one", target=0.8)],
            suspend=True,
            method={"strategy": "warm-start"},
        ),
    )
    _wait(lambda: _phase(api, namespace, "later", "Suspended"), what="Suspended")
    time.sleep(2)
    assert _jobs(api, namespace) == [], "no Job while suspended"
    untyped(client.CustomObjectsApi(api)).patch_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "later", {"spec": {"suspend": False}}
    )
    done = _wait(lambda: _phase(api, namespace, "later", "Succeeded", "Failed"), what="finished")
    assert done["status"]["phase"] == "Succeeded"
    assert done["status"]["observedGeneration"] == 2


def test_deleting_the_migration_deletes_its_jobs(
    api: Any, namespace: str, operator: OperatorProcess
) -> None:
    _create(
        api,
        _manifest(
            "gone",
            namespace,
            [_adapter("one")],
            method={"finetune": {"maxSteps": 2000, "evalEvery": 1000}},
            preRunningDeadlineSeconds=600,
        ),
    )
    _wait(lambda: _jobs(api, namespace), what="a Job")
    untyped(client.CustomObjectsApi(api)).delete_namespaced_custom_object(
        GROUP, VERSION, namespace, PLURAL, "gone"
    )
    _wait(lambda: not _jobs(api, namespace), what="the Jobs to be garbage-collected")


def test_a_spec_the_models_refuse_fails_with_the_field(
    api: Any, namespace: str, operator: OperatorProcess
) -> None:
    manifest = _manifest(
        "bad",
        namespace,
        [_adapter("one")],
        method={"initialization": {"alpha": {"min": 2, "max": 1}}},
    )
    _create(api, manifest)
    failed = _wait(lambda: _phase(api, namespace, "bad", "Failed"), what="Failed")
    ready = next(c for c in failed["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "InvalidSpec"
    assert "method.initialization.alpha" in ready["message"] and "min (2.0)" in ready["message"]
    assert _jobs(api, namespace) == []


def test_incompatible_models_fail_without_retry(
    api: Any, sandbox: Any, namespace: str, operator: OperatorProcess, toy: Any
) -> None:
    from transformers import LlamaConfig, LlamaForCausalLM

    other = Path(sandbox.jobs.pvc_root) / "other" / "v2-wide"
    if not other.exists():
        config = LlamaConfig.from_pretrained(toy.v2)
        config.hidden_size, config.intermediate_size = 48, 96
        LlamaForCausalLM(config).save_pretrained(other)
    manifest = _manifest("mismatch", namespace, [_adapter("one")], target="pvc://other/v2-wide")
    _create(api, manifest)
    failed = _wait(lambda: _phase(api, namespace, "mismatch", "Failed"), what="Failed")
    adapter = failed["status"]["adapters"][0]
    assert adapter["reason"] == "IncompatibleModels" and "not retried" in adapter["message"]
    assert adapter["attempts"] == 1
    (job,) = _jobs(api, namespace)
    assert job.status.failed == 1


def test_a_killed_pod_resumes_from_its_checkpoint(
    api: Any, sandbox: Any, namespace: str, operator: OperatorProcess
) -> None:
    core = untyped(client.CoreV1Api(api))
    never = {"metric": "loss", "target": 0.0001}  # runs the whole budget
    method = {
        "strategy": "warm-start",
        "finetune": {
            "maxSteps": 200,
            "evalEvery": 100,
            "checkpointEvery": 25,
            "learningRate": 0.01,
        },
    }
    _create(api, _manifest("resume", namespace, [_adapter("one", **never)], method=method))

    def step_of(pod: str) -> int:
        steps = [
            json.loads(line).get("step")
            for line in core.read_namespaced_pod_log(pod, namespace).splitlines()
            if line.startswith("{") and '"finetune"' in line
        ]
        return max([s for s in steps if s is not None], default=-1)

    def running_pod() -> str | None:
        pods = core.list_namespaced_pod(namespace).items
        live = [p.metadata.name for p in pods if p.status.phase == "Running"]
        return live[0] if live else None

    first = _wait(running_pod, what="a running trainer")
    _wait(lambda: step_of(first) >= 60, what="step 60")
    assert sandbox.thread.call(sandbox.jobs.kill, namespace, first)
    done = _wait(
        lambda: _phase(api, namespace, "resume", "Succeeded", "Failed"),
        timeout=180,
        what="finished",
    )
    adapter = done["status"]["adapters"][0]
    assert adapter["attempts"] == 2 and adapter["reason"] == "NotReady", adapter
    assert adapter["result"]["steps"] == 200
    second = next(
        p.metadata.name
        for p in core.list_namespaced_pod(namespace).items
        if p.metadata.name != first
    )
    log = core.read_namespaced_pod_log(second, namespace)
    resumed = [
        json.loads(line)["step"]
        for line in log.splitlines()
        if line.startswith("{") and '"finetune"' in line and '"step"' in line
    ]
    assert min(resumed) > 50, "the retry resumed from a checkpoint, not from step 0"


def test_a_restarted_operator_creates_no_duplicate_jobs(
    api: Any, namespace: str, operator: OperatorProcess
) -> None:
    _create(
        api,
        _manifest(
            "restart",
            namespace,
            [_adapter("one", target=0.8), _adapter("two", target=0.8)],
            method={"strategy": "warm-start"},
        ),
    )
    _wait(lambda: len(_jobs(api, namespace)) == 2, what="two Jobs")
    operator.kill()
    operator.start()
    done = _wait(
        lambda: _phase(api, namespace, "restart", "Succeeded", "Failed"),
        timeout=180,
        what="finished",
    )
    assert done["status"]["phase"] == "Succeeded"
    assert len(_jobs(api, namespace)) == 2
    assert [a["attempts"] for a in done["status"]["adapters"]] == [1, 1]


def test_an_unschedulable_pod_fails_after_the_pre_running_deadline(
    api: Any, sandbox: Any, namespace: str, operator: OperatorProcess
) -> None:
    fault = Fault("Unschedulable", "relora.dev/migration=stuck")
    sandbox.thread.call(sandbox.jobs.add_fault, fault)
    try:
        _create(api, _manifest("stuck", namespace, [_adapter("one")], preRunningDeadlineSeconds=3))
        failed = _wait(lambda: _phase(api, namespace, "stuck", "Failed"), what="Failed")
    finally:
        sandbox.thread.call(sandbox.jobs.faults.remove, fault)
    adapter = failed["status"]["adapters"][0]
    assert adapter["reason"] == "Unschedulable"
    assert (
        "preRunningDeadlineSeconds=3" in adapter["message"]
        and "nvidia.com/gpu" in adapter["message"]
    )
    ready = next(c for c in failed["status"]["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "Unschedulable"
    (job,) = _jobs(api, namespace)
    assert job.spec.suspend is True, "the stuck Job is stopped, its pod removed"
