"""Fault injection with the real trainer Job entrypoint on the toy world: a pod killed during
the initialization search, an output that cannot be written, corrupted inputs and a corrupted
checkpoint. The operator runs as its own process against the sandbox (see tests/test_faults.py
for the faults that need no trainer)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from kubernetes.client.exceptions import ApiException

from relora_api.spec import AdapterMigrationSpec
from relora_trainer import inputs, ownership, storage
from tests.conftest import wait_for
from tests.fault_kit import Cluster, Obj, OperatorProcess, ensure_crd

TRAINER = [sys.executable, "-m", "relora_trainer.job"]


@pytest.fixture(scope="module")
def world(sandbox: Any, request: pytest.FixtureRequest) -> Path:
    """The toy world (one torch thread while it is built: two threads on two busy cores spin
    for minutes), copied as the PVC claim `faults` so that tests can corrupt their own copies."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        toy = request.getfixturevalue("toy")
    finally:
        torch.set_num_threads(threads)
    claim = Path(sandbox.jobs.pvc_root) / "faults"
    if not claim.exists():
        shutil.copytree(toy.root, claim, symlinks=True)
    return claim


@pytest.fixture
def cluster(api: Any, namespace: str) -> Cluster:
    ensure_crd(api)
    return Cluster(api, namespace)


@pytest.fixture
def operator(
    sandbox: Any, cluster: Cluster, world: Path, tmp_path: Path
) -> Iterator[OperatorProcess]:
    process = OperatorProcess(
        Path(sandbox.kubeconfig_path), cluster.namespace, tmp_path / "operator.log", trainer=TRAINER
    )
    process.start()
    yield process
    process.stop()


def _adapter(name: str, uri: str = "pvc://faults/adapters/toy-category") -> Obj:
    return {
        "name": name,
        "uri": uri,
        "data": {
            "train": "pvc://faults/data/toy-category/train.jsonl",
            "validation": "pvc://faults/data/toy-category/validation.jsonl",
        },
        "readiness": {"target": 0.8},
    }


def _manifest(name: str, namespace: str, adapters: list[Obj], **spec: Any) -> Obj:
    method = spec.pop("method", {"strategy": "warm-start"})
    return {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "sourceModel": {"uri": "pvc://faults/models/v1"},
            "targetModel": {"uri": spec.pop("target", "pvc://faults/models/v2-mild")},
            "adapters": adapters,
            "output": {"uri": spec.pop("output", f"pvc://faults/output/{namespace}/{name}")},
            # Trainers share two busy cores: one thread each keeps them from spinning.
            "env": [{"name": "OMP_NUM_THREADS", "value": "1"}],
            "method": method,
            **spec,
        },
    }


def _records(log: str, stage: str) -> list[dict[str, Any]]:
    found = []
    for line in log.splitlines():
        if line.startswith("{") and f'"{stage}"' in line:
            record = json.loads(line)
            if record.get("event") == "progress" and record.get("stage") == stage:
                found.append(record)
    return found


def _failed_once_without_retry(cluster: Cluster, name: str, adapter: str, reason: str) -> Obj:
    """The adapter failed with ``reason`` on its first pod, the Job failed by its podFailurePolicy
    (exit code 3), and the message is one line."""
    entry = cluster.adapter(name, adapter)
    assert entry["phase"] == "Failed" and entry["reason"] == reason, entry
    assert entry["attempts"] == 1, entry
    assert "\n" not in entry["message"] and entry["message"].endswith("(bad input: not retried)")
    (job,) = [j for j in cluster.jobs(name) if j["metadata"]["name"] == entry["jobName"]]
    assert job["status"]["failed"] == 1 and not job["status"].get("active")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "PodFailurePolicy" and "exit code 3" in failed["message"], failed
    (pod,) = [
        p
        for p in cluster.pods(name)
        if p["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    ]
    terminated = pod["status"]["containerStatuses"][0]["state"]["terminated"]
    assert terminated["exitCode"] == 3
    return entry


# ---------------------------------------------------------------- 4. pod killed during search
def test_a_pod_killed_during_the_search_resumes_from_its_journal(
    sandbox: Any, cluster: Cluster, operator: OperatorProcess, world: Path
) -> None:
    trials = 12
    method = {
        "strategy": "relora",
        # every trial runs (no early stop): the test is about resuming the journal
        "initialization": {
            "trials": trials,
            "sampler": "tpe",
            "validationSamples": 48,
            "patience": 500,
        },
        "finetune": {"maxSteps": 30, "evalEvery": 10, "learningRate": 0.01},
    }
    cluster.create(_manifest("searching", cluster.namespace, [_adapter("one")], method=method))

    def running_pod() -> str | None:
        live = [p for p in cluster.pods("searching") if p["status"].get("phase") == "Running"]
        return live[0]["metadata"]["name"] if live else None

    first = wait_for(running_pod, timeout=60, what="a running trainer")

    def trials_done() -> int:
        return max((r["trial"] for r in _records(cluster.log(first), "search")), default=0)

    wait_for(lambda: trials_done() >= 3, timeout=60, what="three search trials")
    assert sandbox.thread.call(sandbox.jobs.kill, cluster.namespace, first)
    killed_after = trials_done()
    assert killed_after < trials, "the search was still going when the pod was killed"

    done = cluster.wait_phase("searching", "Succeeded", "Failed", timeout=120)
    entry = done["status"]["adapters"][0]
    assert entry["phase"] == "Succeeded" and entry["attempts"] == 2, entry
    (job,) = cluster.jobs("searching")
    assert job["status"].get("failed", 0) == 0, "a disruption burns no retry"
    (second,) = [
        p["metadata"]["name"] for p in cluster.pods("searching") if p["metadata"]["name"] != first
    ]
    resumed = [r["trial"] for r in _records(cluster.log(second), "search")]
    assert resumed, "the second pod searched"
    # Completed trials are not run again: the retry continues after them (the one cut short
    # by the kill, if any, is recorded as failed).
    assert killed_after < min(resumed) <= killed_after + 2, (killed_after, resumed)
    assert max(resumed) == trials
    out = world / "output" / cluster.namespace / "searching" / "one"
    report = json.loads((out / "report.json").read_text())
    numbers = [t["number"] for t in report["trials"]]
    assert numbers == list(range(trials)), numbers
    states = [t["state"] for t in report["trials"]]
    assert states.count("COMPLETE") >= trials - 1 and set(states) <= {"COMPLETE", "FAIL"}


# ---------------------------------------------------------------- 5. output storage
def test_an_unwritable_output_fails_at_once_naming_it(
    cluster: Cluster, operator: OperatorProcess, world: Path
) -> None:
    """Two ways a root-run sandbox can refuse writes honestly: a file where the adapter's
    output folder must be (EEXIST/ENOTDIR), and a full device (the write check in the folder
    is a link to /dev/full, whose writes fail with ENOSPC). Read-only and permission errors
    cannot be made here: root writes through both."""
    root = world / "output" / cluster.namespace / "stuck"
    root.mkdir(parents=True)
    (root / "blocked").write_text("a file, not a folder")
    (root / "full").mkdir()
    (root / "full" / storage.WRITE_CHECK).symlink_to("/dev/full")
    adapters = [_adapter("blocked"), _adapter("full")]
    cluster.create(_manifest("stuck", cluster.namespace, adapters))
    cluster.wait_phase("stuck", "Failed", timeout=60)
    uri = f"pvc://faults/output/{cluster.namespace}/stuck"
    blocked = _failed_once_without_retry(cluster, "stuck", "blocked", "OutputNotWritable")
    assert blocked["message"].startswith(f"spec.output: cannot write {uri}/blocked ")
    assert "a file is where a folder must be" in blocked["message"]
    full = _failed_once_without_retry(cluster, "stuck", "full", "OutputNotWritable")
    assert full["message"].startswith(f"spec.output: cannot write {uri}/full ")
    assert "no space left on the device" in full["message"]
    ready = cluster.condition("stuck", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "OutputNotWritable"
    stalled = cluster.condition("stuck", "Stalled")
    assert stalled["status"] == "True" and stalled["reason"] == "OutputNotWritable"


# ---------------------------------------------------------------- 6. corrupted inputs
def test_corrupted_inputs_fail_as_bad_input_without_retry(
    cluster: Cluster, operator: OperatorProcess, world: Path
) -> None:
    namespace = cluster.namespace
    broken = world / "broken" / namespace
    good_adapter = world / "adapters" / "toy-category"
    truncated = broken / "truncated-adapter"
    shutil.copytree(good_adapter, truncated)
    weights = truncated / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    garbage = broken / "garbage-adapter"
    shutil.copytree(good_adapter, garbage)
    (garbage / "adapter_config.json").write_text('{"peft_type": "LORA", "r": ')
    model = broken / "garbage-model"
    shutil.copytree(world / "models" / "v2-mild", model)
    (model / "config.json").write_bytes(b"\x00\x01 not json")
    truncated_model = broken / "truncated-model"
    shutil.copytree(world / "models" / "v2-mild", truncated_model)
    shards = truncated_model / "model.safetensors"
    shards.write_bytes(shards.read_bytes()[:1000])

    where = f"pvc://faults/broken/{namespace}"
    adapters = [
        _adapter("truncated", f"{where}/truncated-adapter"),
        _adapter("garbage", f"{where}/garbage-adapter"),
    ]
    cluster.create(_manifest("bad-adapters", namespace, adapters))
    cluster.create(
        _manifest("bad-model", namespace, [_adapter("one")], target=f"{where}/garbage-model")
    )
    cluster.create(
        _manifest("cut-model", namespace, [_adapter("one")], target=f"{where}/truncated-model")
    )
    for name in ("bad-adapters", "bad-model", "cut-model"):
        cluster.wait_phase(name, "Failed", timeout=90)

    entry = _failed_once_without_retry(cluster, "bad-adapters", "truncated", "InvalidAdapter")
    assert "adapter_model.safetensors is not a readable safetensors file" in entry["message"]
    entry = _failed_once_without_retry(cluster, "bad-adapters", "garbage", "InvalidAdapter")
    assert "adapter_config.json is not valid JSON" in entry["message"]
    entry = _failed_once_without_retry(cluster, "bad-model", "one", "MissingInput")
    assert (
        entry["message"].startswith("spec.targetModel: ")
        and "config.json is not valid JSON" in entry["message"]
    )
    entry = _failed_once_without_retry(cluster, "cut-model", "one", "InvalidWeights")
    assert "not a readable safetensors file" in entry["message"], entry
    for name in ("bad-adapters", "bad-model", "cut-model"):
        assert cluster.condition(name, "Stalled")["status"] == "True"


def test_a_corrupted_checkpoint_makes_the_trainer_start_over(
    cluster: Cluster, operator: OperatorProcess, world: Path
) -> None:
    """A torn checkpoint of this very work (its fingerprint matches) is not fatal: the trainer
    starts the fine-tuning over, within the same pod."""
    method = {
        "strategy": "warm-start",
        "finetune": {"maxSteps": 20, "evalEvery": 10, "checkpointEvery": 1000},
    }
    readiness = {"metric": "loss", "target": 0.0001}  # never met: all 20 steps run
    adapter = {**_adapter("one"), "readiness": readiness}
    # Suspended at first: the state is planted for the spec as the API server stored it.
    cluster.create(_manifest("torn", cluster.namespace, [adapter], method=method, suspend=True))
    cluster.wait_phase("torn", "Suspended")
    stored = AdapterMigrationSpec.model_validate(cluster.get("torn")["spec"])
    folder = world / "output" / cluster.namespace / "torn" / "one"
    state = folder / inputs.STATE_DIR
    state.mkdir(parents=True)
    work = inputs.fingerprint(stored, stored.adapters[0])
    (state / inputs.FINGERPRINT_FILE).write_text(work)
    # As a pod of this migration that crashed left it: owned by the migration.
    owner = ownership.Owner(cluster.namespace, "torn", cluster.get("torn")["metadata"]["uid"])
    (folder / ownership.OWNER_FILE).write_bytes(ownership.Record(owner, work).encode())
    torn = os.urandom(4096)
    (state / "checkpoint.pt").write_bytes(torn)
    cluster.patch("torn", {"spec": {"suspend": False}})

    done = cluster.wait_phase("torn", "Succeeded", "Failed", timeout=90)
    entry = done["status"]["adapters"][0]
    assert entry["reason"] == "NotReady" and entry["attempts"] == 1, entry
    assert entry["result"]["steps"] == 20
    (pod,) = cluster.pods("torn")
    steps = [r["step"] for r in _records(cluster.log(pod["metadata"]["name"]), "finetune")]
    assert min(steps) == 0 and max(steps) == 20, steps
    assert pod["status"]["containerStatuses"][0]["state"]["terminated"]["exitCode"] == 0
    # The state was not thrown away as another spec's (the torn file is still there: no
    # checkpoint was due), so the trainer read it and started over.
    assert (state / "checkpoint.pt").read_bytes() == torn


# ---------------------------------------------------------------- 8. outputs are owned
def _hashes(folder: Path) -> dict[str, str]:
    return {
        str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    }


def test_a_second_migration_on_the_same_output_fails_and_changes_nothing(
    cluster: Cluster, operator: OperatorProcess, world: Path
) -> None:
    """Two migrations of one namespace pointed at one output folder, one after the other (the
    issue's "silently share it"): the second fails with OutputInUse naming the first, as bad
    input, and not a byte of the first's result changes; an output that is the old adapter is
    refused by the API server before anything runs."""
    namespace = cluster.namespace
    shared = f"pvc://faults/output/{namespace}/shared"
    method = {"strategy": "reuse"}
    cluster.create(_manifest("owner", namespace, [_adapter("one")], output=shared, method=method))
    cluster.wait_phase("owner", "Succeeded", "Failed", timeout=120)
    result = world / "output" / namespace / "shared" / "one"
    before = _hashes(result)
    assert "report.json" in before and ".relora-owner.json" in before
    inputs = _hashes(world / "adapters")
    measured = cluster.adapter("owner", "one")

    cluster.create(
        _manifest("intruder", namespace, [_adapter("one")], output=shared, method=method)
    )
    cluster.wait_phase("intruder", "Failed", timeout=120)
    entry = _failed_once_without_retry(cluster, "intruder", "one", "OutputInUse")
    assert f"{shared}/one belongs to migration {namespace}/owner" in entry["message"]
    assert "spec.output.overwrite: true" in entry["message"]
    assert _hashes(result) == before, "the first migration's result is untouched"
    assert cluster.adapter("owner", "one") == measured

    with pytest.raises(ApiException) as refused:
        cluster.create(
            _manifest(
                "onto-input",
                namespace,
                [_adapter("toy-category")],
                output="pvc://faults/adapters",
                method=method,
            )
        )
    assert refused.value.status == 422
    assert "must not be, contain or lie inside an input" in str(refused.value.body)
    assert _hashes(world / "adapters") == inputs
