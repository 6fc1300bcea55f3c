"""Worker groups end to end: the operator (its own process) against the sandbox, with the
trainer stand-in (tests/fake_trainer.py) as each worker. A 2-worker migration gets an Indexed
Job of two pods and a headless Service; the workers see their RANK and WORLD_SIZE and meet at
worker 0's address; one killed worker fails the group, which is restarted as a whole (a new
Job, the restart counted in the status) and then succeeds."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path
from typing import Any

import pytest

from relora_operator import naming
from tests.conftest import wait_for
from tests.fault_kit import (
    Cluster,
    OperatorProcess,
    Trainers,
    ensure_crd,
    fake_manifest,
    process_alive,
)


@pytest.fixture
def operator(fake_operator: OperatorProcess) -> OperatorProcess:
    """The operator with the trainer stand-in (conftest's runs the real trainer)."""
    return fake_operator


def _worlds(trainers: Trainers, pods: list[str]) -> dict[str, dict[str, Any]]:
    """RANK -> what that worker saw (its world.json)."""
    found = {}
    for pod in pods:
        seen = json.loads((trainers.control / "one" / f"{pod}.world.json").read_text())
        found[seen["RANK"]] = {**seen, "pod": pod}
    return found


def test_two_workers_restart_as_a_group_and_succeed(
    cluster: Cluster, trainers: Trainers, operator: OperatorProcess
) -> None:
    manifest = fake_manifest(
        "group", cluster.namespace, ["one"], trainers, distributed={"workers": 2}, backoffLimit=1
    )
    cluster.create(manifest)
    first = trainers.wait_started("one", 2)
    worlds = _worlds(trainers, first)
    assert sorted(worlds) == ["0", "1"]
    for rank, seen in worlds.items():
        assert seen["WORLD_SIZE"] == "2" and seen["JOB_COMPLETION_INDEX"] == rank
        assert seen["MASTER_ADDR"] == "127.0.0.1", "the sandbox rewrote <job>-0.<service>"
    leader = worlds["0"]["pod"]
    met = json.loads((trainers.control / "one" / f"{leader}.group.json").read_text())
    assert met == [0, 1], "worker 1 reached worker 0"

    (job,) = cluster.jobs("group")
    name = job["metadata"]["name"]
    assert job["spec"]["completionMode"] == "Indexed" and job["spec"]["parallelism"] == 2
    service = cluster.core.read_namespaced_service(name, cluster.namespace)
    assert service.spec.cluster_ip == "None"
    assert service.metadata.owner_references[0].kind == "AdapterMigration"
    entry = cluster.wait_adapter("group", "one", "Running")
    assert entry["jobName"] == name

    # Worker 1 dies (SIGKILL: exit 137): the group fails and starts again, both workers anew.
    victim = worlds["1"]["pod"]
    os.kill(trainers.pid("one", victim), signal.SIGKILL)
    wait_for(
        lambda: not process_alive(trainers.pid("one", leader)), what="worker 0 stopped with it"
    )
    second = wait_for(
        lambda: len(pods := trainers.attempts("one")) >= 4 and pods[2:],
        timeout=60,
        what="the group restarted",
    )
    assert sorted(_worlds(trainers, second)) == ["0", "1"]
    restarted = wait_for(
        lambda: (entry := cluster.adapter("group", "one")).get("restarts") == 1 and entry,
        what="the restart counted",
    )
    assert restarted["phase"] in ("Running", "Pending"), restarted
    (job,) = cluster.jobs("group")
    assert (
        job["metadata"]["name"] == name and job["metadata"]["annotations"][naming.RESTARTS] == "1"
    ), "the same Job name, made again"

    trainers.release("one", "ready")
    cluster.wait_phase("group", "Succeeded", timeout=60)
    entry = cluster.adapter("group", "one")
    assert entry["phase"] == "Succeeded" and entry["restarts"] == 1, entry
    assert entry["result"]["qualityAfter"] == 0.93
    events = [(e["reason"], e["message"]) for e in cluster.events("group")]
    told = f"one: Restarting: worker 1 (pod {victim}) failed: exit code 137; restarting all 2"
    assert any(
        reason == "AdapterRunning" and message.startswith(told) for reason, message in events
    ), events


def test_two_real_trainer_workers_equal_one_through_kubectl(
    api: Any, sandbox: Any, namespace: str, toy_claim: str
) -> None:
    """The real trainer Job entrypoint as two workers (an Indexed Job, gloo over the sandbox's
    127.0.0.1), replicas and then sharing the bases (shardBase: FSDP2, every forward pass in
    step): each migration goes Ready through `kubectl apply` and its adapter equals the one a
    single worker writes for the same spec (float summation order: atol 1e-5)."""
    import subprocess

    import torch
    from safetensors.torch import load_file

    from tests.conftest import kubectl_apply, kubectl_binary
    from tests.test_operator_e2e import _adapter, _get, _manifest

    ensure_crd(api)
    process = OperatorProcess(
        Path(sandbox.kubeconfig_path), namespace, Path(sandbox.jobs.pvc_root) / f"{namespace}.log"
    )
    process.start()
    try:
        method = {
            "initialization": {"trials": 3},
            "finetune": {"maxSteps": 12, "learningRate": 0.01, "evalEvery": 4},
        }
        kubectl = [kubectl_binary(), f"--kubeconfig={sandbox.kubeconfig_path}", "-n", namespace]
        groups = {
            "one": {"workers": 1},
            "two": {"workers": 2},
            "shard": {"workers": 2, "shardBase": True},
        }
        for name, distributed in groups.items():
            manifest = _manifest(
                name,
                namespace,
                [_adapter("a", target=0.5)],
                method=method,
                distributed=distributed,
            )
            kubectl_apply(kubectl, manifest)
        for name in groups:
            waited = subprocess.run(
                [*kubectl, "wait", "--for=condition=Ready", f"am/{name}", "--timeout=400s"],
                capture_output=True,
                text=True,
            )
            assert waited.returncode == 0, waited.stderr + process.logs.read_text()[-3000:]
        results = {n: _get(api, namespace, n)["status"]["adapters"][0] for n in groups}
        folders = {
            n: Path(sandbox.jobs.pvc_root) / "toy" / "output" / namespace / n / "a" for n in groups
        }
        weights = {n: load_file(str(f / "adapter_model.safetensors")) for n, f in folders.items()}
        for name in ("two", "shard"):
            assert results[name]["result"]["steps"] == results["one"]["result"]["steps"], name
            assert set(weights["one"]) == set(weights[name])
            for key, tensor in weights["one"].items():
                assert torch.allclose(weights[name][key], tensor, atol=1e-5), (name, key)
            report = json.loads((folders[name] / "report.json").read_text())
            assert report["workers"] == 2
            assert report["sharded_base"] is (name == "shard"), name
    finally:
        process.stop()
