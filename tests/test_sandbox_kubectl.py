"""Conformance of the API emulator through the real kubectl binary."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import EXAMPLES, ROOT, kubectl_binary, python_job

CRD_FILE = ROOT / "crds" / "adaptermigrations.relora.dev.yaml"


class Kubectl:
    def __init__(self, kubeconfig: Path, namespace: str) -> None:
        self.kubeconfig, self.namespace = kubeconfig, namespace

    def argv(self, *args: str) -> list[str]:
        return [kubectl_binary(), f"--kubeconfig={self.kubeconfig}", "-n", self.namespace, *args]

    def __call__(self, *args: str, stdin: str | None = None, check: bool = True) -> str:
        result = subprocess.run(
            self.argv(*args), input=stdin, capture_output=True, text=True, timeout=60
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {result.stderr}")
        return result.stdout + (result.stderr if not check else "")


@pytest.fixture
def kubectl(kubeconfig: Path, namespace: str) -> Kubectl:
    tool = Kubectl(kubeconfig, namespace)
    tool("apply", "-f", str(CRD_FILE))
    tool("wait", "--for=condition=Established", "crd/adaptermigrations.relora.dev")
    return tool


def _manifest() -> str:
    document = yaml.safe_load((EXAMPLES / "cluster-migration.yaml").read_text())
    del document["metadata"]["namespace"]
    return yaml.safe_dump(document)


def _status(ready: str, reason: str, progress: str) -> str:
    condition = {
        "type": "Ready",
        "status": ready,
        "reason": reason,
        "message": "test",
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }
    return json.dumps({"status": {"progress": progress, "conditions": [condition]}})


def _patch_status(kubectl: Kubectl, ready: str, reason: str, progress: str) -> None:
    kubectl(
        "patch",
        "am",
        "llama-3-1-to-3-2",
        "--subresource=status",
        "--type=merge",
        "-p",
        _status(ready, reason, progress),
    )


def test_apply_get_patch_status_wait_and_delete(kubectl: Kubectl) -> None:
    assert "created" in kubectl("apply", "-f", "-", stdin=_manifest())
    assert "unchanged" in kubectl("apply", "-f", "-", stdin=_manifest())
    stored = yaml.safe_load(kubectl("get", "am", "llama-3-1-to-3-2", "-o", "yaml"))
    assert stored["spec"]["adapters"][1]["readiness"]["target"] == 0.9
    assert stored["metadata"]["generation"] == 1

    waiter = subprocess.Popen(
        kubectl.argv("wait", "--for=condition=Ready", "am/llama-3-1-to-3-2", "--timeout=30s"),
        stdout=subprocess.PIPE,
        text=True,
    )
    _patch_status(kubectl, "False", "Running", "1/2")
    table = kubectl("get", "am")
    header, row = table.splitlines()[:2]
    assert header.split() == ["NAME", "READY", "REASON", "PROGRESS", "AGE"]
    assert row.split()[:4] == ["llama-3-1-to-3-2", "False", "Running", "1/2"]
    _patch_status(kubectl, "True", "Succeeded", "2/2")
    out, _ = waiter.communicate(timeout=30)
    assert waiter.returncode == 0 and "condition met" in out
    wide = kubectl("get", "am", "-o", "wide").splitlines()[0].split()
    assert wide[-3:] == ["SOURCE", "TARGET", "STRATEGY"]
    assert "deleted" in kubectl("delete", "am", "llama-3-1-to-3-2")
    assert "No resources found" in kubectl("get", "am", check=False)


def test_get_watch_streams_changes(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", "-", stdin=_manifest())
    watcher = subprocess.Popen(
        kubectl.argv("get", "am", "-w", "--request-timeout=4s"), stdout=subprocess.PIPE, text=True
    )
    time.sleep(1.0)
    _patch_status(kubectl, "True", "Succeeded", "2/2")
    time.sleep(1.0)
    watcher.terminate()
    out, _ = watcher.communicate(timeout=10)
    lines = [line.split() for line in out.splitlines() if line.strip()]
    assert lines[0][0] == "NAME"
    assert ["llama-3-1-to-3-2", "True", "Succeeded", "2/2"] in [row[:4] for row in lines[1:]]


def test_schema_violations_are_refused_with_the_field(kubectl: Kubectl) -> None:
    document = yaml.safe_load(_manifest())
    document["spec"]["backoffLimit"] = 1000
    document["spec"]["adapters"][0]["uri"] = "gs://bucket/adapter"
    out = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(document), check=False)
    assert "spec.backoffLimit" in out and "spec.adapters[0].uri" in out
    assert "unsupported URI scheme" in out
    document = yaml.safe_load(_manifest())
    document["spec"]["surprise"] = True
    out = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(document), check=False)
    assert 'unknown field "spec.surprise"' in out


def test_immutable_fields_are_refused_on_update(kubectl: Kubectl) -> None:
    kubectl("apply", "-f", "-", stdin=_manifest())
    document = yaml.safe_load(_manifest())
    document["spec"]["targetModel"]["revision"] = "v2"
    out = kubectl("apply", "-f", "-", stdin=yaml.safe_dump(document), check=False)
    assert "targetModel is immutable" in out
    document = yaml.safe_load(_manifest())
    document["spec"]["suspend"] = True
    assert "configured" in kubectl("apply", "-f", "-", stdin=yaml.safe_dump(document))


def test_explain_reads_the_crd_descriptions(kubectl: Kubectl) -> None:
    out = kubectl("explain", "adaptermigration.spec.method.finetune")
    assert "maxSteps" in out and "Optimizer step budget" in out


def test_a_job_runs_and_kubectl_reads_its_logs(sandbox: Any, namespace: str) -> None:
    kubectl = Kubectl(Path(sandbox.kubeconfig_path), namespace)
    job = python_job("hello", "print('hi from a pod')")
    kubectl("apply", "-f", "-", stdin=yaml.safe_dump(job))
    kubectl("wait", "--for=condition=Complete", "job/hello", "--timeout=30s")
    assert kubectl("logs", "job/hello").strip() == "hi from a pod"
    header, row = kubectl("get", "jobs").splitlines()[:2]
    assert header.split()[:2] == ["NAME", "STATUS"]
    assert row.split()[:2] == ["hello", "Complete"]
