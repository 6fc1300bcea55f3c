"""The pieces behind the fault-injection suite, without processes: how the status is derived
when a Job was deleted or made from an older spec, how pods are matched to Jobs, and how the
trainer classifies an output it cannot write."""

from __future__ import annotations

import datetime
import errno
import json
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import SafetensorError
from transformers import AutoModelForCausalLM

from relora_api import contract
from relora_api.spec import AdapterMigrationSpec
from relora_operator import job_builder, naming, planner
from relora_operator.reconciler import pods_by_job
from relora_operator.settings import Settings
from relora_trainer import errors, inputs, job, loading, models, storage
from relora_trainer.errors import OutputNotWritable
from relora_trainer.storage import Storage

NOW = datetime.datetime(2026, 1, 1, tzinfo=datetime.UTC)
Obj = dict[str, Any]


def _spec(**fields: Any) -> AdapterMigrationSpec:
    return AdapterMigrationSpec.model_validate(
        {
            "sourceModel": {"uri": "pvc://models/v1"},
            "targetModel": {"uri": "pvc://models/v2"},
            "adapters": [
                {
                    "name": "one",
                    "uri": "pvc://adapters/one",
                    "data": {"train": "pvc://d/train.jsonl", "validation": "pvc://d/val.jsonl"},
                }
            ],
            "output": {"uri": "pvc://out/m"},
            **fields,
        }
    )


def _job(spec: AdapterMigrationSpec) -> Obj:
    return job_builder.build_job(
        name="m",
        namespace="ns",
        uid="uid-1",
        spec=spec,
        adapter=spec.adapters[0],
        settings=Settings(),
    )


def _pod(name: str, phase: str, owner_uid: str | None = None) -> Obj:
    references = (
        [{"kind": "Job", "name": "m-one", "uid": owner_uid, "controller": True}]
        if owner_uid
        else []
    )
    return {
        "metadata": {
            "name": name,
            "labels": {naming.ADAPTER: "one"},
            "ownerReferences": references,
            "creationTimestamp": "2026-01-01T00:00:00Z",
        },
        "status": {"phase": phase},
    }


def _migration(spec: AdapterMigrationSpec, adapters: list[Obj]) -> planner.Migration:
    status = planner.read_status({"adapters": adapters} if adapters else {})
    return planner.Migration("m", "ns", "uid-1", 1, spec, status, b"k" * 32)


def _plan(*args: Any, **kwargs: Any) -> tuple[Obj, planner.Actions]:
    """planner.plan, its status in the wire form that the reconciler sends."""
    status, actions = planner.plan(*args, **kwargs)
    return status.to_wire(), actions


# ---------------------------------------------------------------- a Job deleted by hand
def test_a_deleted_jobs_old_pod_is_waited_for_then_the_job_is_made_again() -> None:
    spec = _spec()
    running = {
        "name": "one",
        "phase": "Running",
        "reason": "Running",
        "jobName": "x",
        "attempts": 1,
    }
    migration = _migration(spec, [running])
    status, actions = _plan(migration, [], {}, {}, NOW, strays=[_pod("old", "Running")])
    (entry,) = status["adapters"]
    assert entry["reason"] == "WaitingForOldPod" and "pod old still runs" in entry["message"]
    assert actions.create == [], "no second trainer on the same output"
    ready = next(c for c in status["conditions"] if c["type"] == "Ready")
    assert ready["reason"] == "WaitingForOldPod" and "pod old still runs" in ready["message"]

    status, actions = _plan(migration, [], {}, {}, NOW, strays=[_pod("old", "Failed")])
    (entry,) = status["adapters"]
    assert (
        entry["reason"] == "JobRecreated" and "was deleted before it finished" in entry["message"]
    )
    assert [a.name for a in actions.create] == ["one"]
    assert ("Normal", "AdapterPending") in [(kind, reason) for kind, reason, _ in actions.events]


def test_a_first_job_is_just_created() -> None:
    status, actions = _plan(_migration(_spec(), []), [], {}, {}, NOW)
    assert status["adapters"][0]["reason"] == "JobCreated"
    assert "message" not in status["adapters"][0] and len(actions.create) == 1


def test_pods_are_matched_to_their_job_by_uid() -> None:
    jobs = [{"metadata": {"name": "m-one", "uid": "new"}}]
    mine, older, loose = (
        _pod("a", "Running", "new"),
        _pod("b", "Running", "old"),
        _pod("c", "Running"),
    )
    by_job, strays = pods_by_job(jobs, [mine, older, loose])
    assert by_job == {"m-one": [mine]}
    assert strays == [older, loose], "a deleted namesake's pods are not this Job's attempts"


# ---------------------------------------------------------------- a spec edited mid-run
def test_fields_the_operator_applies_leave_the_trainer_pod_alone() -> None:
    base = _job(_spec())["spec"]["template"]
    same = _spec(suspend=True, preRunningDeadlineSeconds=30, ttlSecondsAfterFinished=5)
    assert job_builder.template_hash(_job(same)["spec"]["template"]) == job_builder.template_hash(
        base
    )
    method = _spec(method={"finetune": {"maxSteps": 42}})
    assert job_builder.template_hash(_job(method)["spec"]["template"]) != job_builder.template_hash(
        base
    )
    sent = json.loads(contract.single_adapter_spec(same, "one"))
    assert sent.get("suspend") is False and sent["preRunningDeadlineSeconds"] == 600
    made = _job(_spec())
    assert made["metadata"]["annotations"][naming.TEMPLATE_HASH] == job_builder.template_hash(base)


def test_a_job_made_from_an_older_spec_is_reported() -> None:
    spec = _spec()
    made = _job(spec)
    made["status"] = {"active": 1}
    pods = {made["metadata"]["name"]: [_pod("p", "Running", made["metadata"].get("uid"))]}
    migration = _migration(spec, [])
    wanted = made["metadata"]["annotations"][naming.TEMPLATE_HASH]
    status, _ = _plan(migration, [made], pods, {}, NOW, templates={"one": wanted})
    assert "message" not in status["adapters"][0]
    status, _ = _plan(migration, [made], pods, {}, NOW, templates={"one": "other"})
    entry = status["adapters"][0]
    assert entry["reason"] == "Running" and "spec changed after Job" in entry["message"]
    assert "delete the Job to run the new spec" in entry["message"]


# ---------------------------------------------------------------- output storage
def test_check_writable_names_the_output_and_why(tmp_path: Path) -> None:
    where = Storage(base_dir=tmp_path)
    assert where.check_writable("out/ok", what="spec.output") == tmp_path / "out" / "ok"
    assert list((tmp_path / "out" / "ok").iterdir()) == [], "the write check leaves nothing"

    (tmp_path / "file").write_text("x")
    with pytest.raises(OutputNotWritable) as blocked:
        where.check_writable("file/one", what="spec.output")
    assert str(blocked.value).startswith("spec.output: cannot write file/one (local folder ")
    assert "a file is where a folder must be" in str(blocked.value)

    full = tmp_path / "full"
    full.mkdir()
    (full / storage.WRITE_CHECK).symlink_to("/dev/full")
    with pytest.raises(OutputNotWritable, match="no space left on the device"):
        where.check_writable("full", what="spec.output")


def test_only_write_failures_in_the_output_are_output_failures(tmp_path: Path) -> None:
    folder = tmp_path / "out"
    inside = OSError(errno.EROFS, "Read-only file system", str(folder / "state" / "x"))
    found = storage.unwritable(inside, what="spec.output", uri="pvc://o/a", folder=folder)
    assert found is not None and "read-only file system" in str(found)
    elsewhere = OSError(errno.ENOSPC, "No space left on device", "/tmp/hf/cache")
    assert storage.unwritable(elsewhere, what="spec.output", uri="o", folder=folder) is None
    other = OSError(errno.EIO, "Input/output error", str(folder / "x"))
    assert storage.unwritable(other, what="spec.output", uri="o", folder=folder) is None


def _run_job(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, failure: Exception
) -> tuple[int, Obj]:
    """Run the Job entrypoint with loading the bases failing with ``failure``."""
    spec = _spec(output={"uri": str(tmp_path / "out")})
    termination = tmp_path / "termination-log"
    monkeypatch.setenv(contract.ENV_MIGRATION, contract.single_adapter_spec(spec, "one"))
    monkeypatch.setenv(contract.ENV_ADAPTER, "one")
    monkeypatch.setenv(contract.ENV_OWNER, contract.owner("ns", "m", "uid-1"))
    monkeypatch.setenv(contract.ENV_TERMINATION_LOG, str(termination))
    monkeypatch.chdir(tmp_path)

    def fail(*args: Any, **kwargs: Any) -> None:
        raise failure

    monkeypatch.setattr(inputs, "check_inputs", lambda *args, **kwargs: None)  # no inputs here
    monkeypatch.setattr(loading, "load_bases", fail)
    code = job.run()
    outcome: Obj = json.loads(termination.read_text())
    return code, outcome


def test_the_output_filling_up_midway_ends_the_pod_as_bad_input(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    checkpoint = tmp_path / "out" / "one" / "state" / "checkpoint.pt"
    code, outcome = _run_job(
        monkeypatch, tmp_path, OSError(errno.ENOSPC, "No space left on device", str(checkpoint))
    )
    assert code == errors.EXIT_BAD_INPUT == 3
    assert outcome["reason"] == "OutputNotWritable" and "no space left" in outcome["message"]


def test_a_torn_weights_file_ends_the_pod_as_bad_input(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    # Loading a model maps a torn safetensors file to InvalidWeights naming the model ...
    folder = tmp_path / "model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    def torn(*args: Any, **kwargs: Any) -> None:
        raise SafetensorError("Error while deserializing header: incomplete metadata")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", torn)
    with pytest.raises(
        errors.InvalidWeights, match=r"spec\.targetModel: a weights file in "
    ) as info:
        models.load_model(folder, what="spec.targetModel", device=torch.device("cpu"))
    # ... which the Job entrypoint ends as bad input: exit 3, no retry.
    code, outcome = _run_job(monkeypatch, tmp_path, info.value)
    assert code == 3 and outcome["reason"] == "InvalidWeights"
    assert "not a readable safetensors file" in outcome["message"]


def test_other_failures_are_retried(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    code, outcome = _run_job(
        monkeypatch, tmp_path, OSError(errno.ENOSPC, "No space left on device", "/tmp/hf/x")
    )
    assert code == errors.EXIT_INTERNAL and outcome["reason"] == "InternalError"
