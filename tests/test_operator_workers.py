"""Worker groups (spec.distributed): the Indexed Job and headless Service the operator builds,
the validation that refuses impossible groups, and the planner's view of several pods per Job
(worker 0 speaks for the adapter; a failed worker restarts the group, then fails it)."""

from __future__ import annotations

import copy
import datetime
import itertools
import json
from typing import Any

import pytest
from pydantic import ValidationError

from relora_api import contract, validation
from relora_api.resource import AdapterMigration
from relora_api.spec import AdapterMigrationSpec
from relora_api.status import AdapterMigrationStatus
from relora_operator import job_builder, naming, planner
from relora_operator.settings import Settings

UID = "1234-uid"
NOW = datetime.datetime(2025, 1, 1, 12, 0, tzinfo=datetime.UTC)


def _migration(manifest: dict[str, Any]) -> AdapterMigration:
    return AdapterMigration.from_manifest(manifest)


def _built(manifest: dict[str, Any], **settings: Any) -> tuple[dict[str, Any], Any]:
    migration = _migration(manifest)
    arguments: dict[str, Any] = {
        "name": migration.metadata.name,
        "namespace": "ml",
        "uid": UID,
        "spec": migration.spec,
        "adapter": migration.spec.adapters[0],
    }
    job = job_builder.build_job(**arguments, settings=Settings(**settings))
    return job, job_builder.build_service(**arguments)


def _grouped(manifest: dict[str, Any], workers: int = 2, gpus: int = 1) -> dict[str, Any]:
    manifest["spec"]["distributed"] = {"workers": workers}
    manifest["spec"]["resources"]["limits"]["nvidia.com/gpu"] = gpus
    return manifest


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {v["name"]: v.get("value", v.get("valueFrom")) for v in container["env"]}


INDEX_REF = {"fieldRef": {"fieldPath": f"metadata.annotations['{naming.INDEX}']"}}


# ---------------------------------------------------------------- the Job and its Service
def test_two_workers_make_an_indexed_job_and_a_headless_service(manifest: dict[str, Any]) -> None:
    job, service = _built(_grouped(manifest))
    name = job["metadata"]["name"]
    spec = job["spec"]
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 2
    assert spec["backoffLimit"] == 0, "one failed worker fails the group; the operator restarts"
    assert job["metadata"]["annotations"][naming.RESTARTS] == "0"
    pod = spec["template"]["spec"]
    assert pod["subdomain"] == service["metadata"]["name"] == name
    (container,) = pod["containers"]
    env = _env(container)
    assert env["MASTER_ADDR"] == f"{name}-0.{name}"
    assert env["MASTER_PORT"] == "29500"
    assert env["RANK"] == env["NODE_RANK"] == INDEX_REF
    assert env["WORLD_SIZE"] == "2" and env["LOCAL_RANK"] == "0"
    assert container["command"] == ["python", "-m", "relora_trainer.job"], "1 GPU: no torchrun"
    assert json.loads(env[contract.ENV_MIGRATION]).get("distributed") is None

    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    assert service["spec"]["selector"] == {naming.MIGRATION_UID: UID, naming.ADAPTER: "sentiment"}
    template_labels = pod and spec["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= template_labels.items()
    (owner,) = service["metadata"]["ownerReferences"]
    assert owner["kind"] == "AdapterMigration" and owner["uid"] == UID and owner["controller"]
    assert naming.QUEUE not in service["metadata"]["labels"]


def test_kueue_admits_the_whole_indexed_job(manifest: dict[str, Any]) -> None:
    """The queue label and the initial suspend are on the Indexed Job itself: Kueue admits
    one workload of `parallelism` pods, all at once."""
    job, _ = _built(_grouped(manifest, workers=4))
    assert manifest["spec"]["queueName"]
    assert job["metadata"]["labels"][naming.QUEUE] == manifest["spec"]["queueName"]
    assert (
        job["spec"]["template"]["metadata"]["labels"][naming.QUEUE]
        == (manifest["spec"]["queueName"])
    )
    assert job["spec"]["suspend"] is True
    assert job["spec"]["parallelism"] == job["spec"]["completions"] == 4


def test_several_gpus_per_worker_run_torchrun(manifest: dict[str, Any]) -> None:
    job, _ = _built(_grouped(manifest, workers=2, gpus=4))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert container["command"] == [
        "python",
        "-m",
        "torch.distributed.run",
        "--nnodes=2",
        "--node-rank=$(NODE_RANK)",
        "--nproc-per-node=4",
        "--master-addr=$(MASTER_ADDR)",
        "--master-port=$(MASTER_PORT)",
        "-m",
        "relora_trainer.job",
    ]
    env = _env(container)
    assert env["NODE_RANK"] == INDEX_REF
    assert "RANK" not in env and "WORLD_SIZE" not in env, "torchrun sets them per process"


def test_one_worker_with_several_gpus_runs_torchrun_in_one_pod(manifest: dict[str, Any]) -> None:
    job, service = _built(_grouped(manifest, workers=1, gpus=2))
    assert service is None and "completionMode" not in job["spec"]
    assert job["spec"]["backoffLimit"] == manifest["spec"]["backoffLimit"]
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert "--nproc-per-node=2" in container["command"]
    assert _env(container)["MASTER_ADDR"] == "127.0.0.1"
    assert "subdomain" not in job["spec"]["template"]["spec"]


@pytest.mark.parametrize("distributed", [None, {}, {"workers": 1}])
def test_a_world_of_one_is_todays_job_bit_for_bit(
    manifest: dict[str, Any], distributed: dict[str, Any] | None
) -> None:
    """Without distributed (or with one worker of one GPU), the Job and its template hash are
    exactly those of a spec that never heard of it: no existing Job becomes stale."""
    before, service = _built(copy.deepcopy(manifest))
    assert service is None
    if distributed is not None:
        manifest["spec"]["distributed"] = distributed
    after, service = _built(manifest)
    assert service is None
    assert after == before
    for key in ("completionMode", "completions", "parallelism"):
        assert key not in after["spec"]
    assert naming.RESTARTS not in after["metadata"]["annotations"]


def test_the_template_hash_of_an_existing_spec_is_unchanged(manifest: dict[str, Any]) -> None:
    """Pinned: the hash a Job made before worker groups existed carries (the example spec)."""
    job, _ = _built(manifest)
    template = job["spec"]["template"]
    assert job["metadata"]["annotations"][naming.TEMPLATE_HASH] == (
        job_builder.template_hash(template)
    )
    assert "subdomain" not in template["spec"]
    names = [v["name"] for v in template["spec"]["containers"][0]["env"]]
    assert not {"RANK", "WORLD_SIZE", "MASTER_ADDR", "NODE_RANK"} & set(names)


def test_changing_the_workers_changes_the_template(manifest: dict[str, Any]) -> None:
    two, _ = _built(_grouped(copy.deepcopy(manifest), workers=2))
    three, _ = _built(_grouped(manifest, workers=3))
    assert (
        two["metadata"]["annotations"][naming.TEMPLATE_HASH]
        != (three["metadata"]["annotations"][naming.TEMPLATE_HASH])
    )


def test_long_names_leave_room_for_the_worker_index(manifest: dict[str, Any]) -> None:
    """The API server refuses an Indexed Job whose last pod hostname <job>-<index> is not a
    DNS label; a name that fits is not cut; the Service's name starts with a letter."""
    migration, adapter = "m" * 63, "a" * 40
    single = naming.job_name(migration, adapter, UID)
    assert len(single) == 62
    assert naming.job_name(migration, adapter, UID, workers=1) == single
    for workers in (2, 10, 11, 64):
        name = naming.job_name(migration, adapter, UID, workers=workers)
        assert len(f"{name}-{workers - 1}") <= 63, workers
        assert name.endswith(single[-8:]), "the digest stays"
    assert naming.job_name("short", "x", UID, workers=64) == naming.job_name("short", "x", UID)
    assert naming.service_name("1-job-abc") == "w1-job-abc"
    assert naming.service_name("job-abc") == "job-abc"


# ---------------------------------------------------------------- validation
def _problems(manifest: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as raised:
        AdapterMigrationSpec.model_validate(manifest["spec"])
    found = validation.explain(raised.value, AdapterMigrationSpec, document=manifest["spec"])
    return [str(p) for p in found]


def test_workers_need_an_output_every_worker_sees(manifest: dict[str, Any]) -> None:
    manifest["spec"]["output"]["uri"] = "/data/out"
    manifest["spec"]["distributed"] = {"workers": 2}
    (problem,) = _problems(manifest)
    assert problem.startswith("distributed: ")
    assert "pvc://" in problem and "s3://" in problem and "/data/out" in problem
    manifest["spec"]["distributed"] = {"workers": 1}  # one worker: any output
    AdapterMigrationSpec.model_validate(manifest["spec"])
    for shared in ("pvc://out/migrations", "s3://bucket/prefix"):
        manifest["spec"]["output"]["uri"] = shared
        manifest["spec"]["distributed"] = {"workers": 2}
        AdapterMigrationSpec.model_validate(manifest["spec"])


@pytest.mark.parametrize("workers", [0, -1, 65, 1000])
def test_workers_are_bounded(manifest: dict[str, Any], workers: int) -> None:
    manifest["spec"]["distributed"] = {"workers": workers}
    (problem,) = _problems(manifest)
    assert problem.startswith("distributed.workers: "), problem


def test_gpus_of_a_worker_are_whole(manifest: dict[str, Any]) -> None:
    manifest["spec"]["distributed"] = {"workers": 2}
    manifest["spec"]["resources"]["limits"]["nvidia.com/gpu"] = "500m"
    (problem,) = _problems(manifest)
    assert problem.startswith("distributed: ") and "nvidia.com/gpu" in problem
    del manifest["spec"]["distributed"]  # not distributed: passed through as before
    AdapterMigrationSpec.model_validate(manifest["spec"])


def test_unknown_fields_of_distributed_are_named(manifest: dict[str, Any]) -> None:
    manifest["spec"]["distributed"] = {"wrokers": 2}
    (problem,) = _problems(manifest)
    assert problem.startswith("distributed.wrokers: "), problem


def test_a_sharded_base_needs_processes_that_divide_the_batch(manifest: dict[str, Any]) -> None:
    """shardBase: refused for a world of one process and for a batch the processes do not
    divide (each takes an equal share in step), with the field and the fix named."""
    manifest["spec"]["distributed"] = {"shardBase": True}
    manifest["spec"]["resources"]["limits"].pop("nvidia.com/gpu", None)
    (problem,) = _problems(manifest)
    assert problem.startswith("distributed: ") and "2 or more processes" in problem, problem
    manifest["spec"]["resources"]["limits"]["nvidia.com/gpu"] = 3
    manifest["spec"]["method"]["finetune"] = {"batchSize": 16}
    (problem,) = _problems(manifest)
    assert problem.startswith("distributed: ") and "method.finetune.batchSize" in problem
    assert "not 16: use 15" in problem, problem
    manifest["spec"]["method"]["finetune"] = {"batchSize": 15}
    AdapterMigrationSpec.model_validate(manifest["spec"])


def test_a_sharded_base_is_said_to_every_worker(manifest: dict[str, Any]) -> None:
    """The operator tells the trainer of a sharded base in the environment (the trainer's spec
    leaves out spec.distributed); a group that does not shard is not told."""
    job, _ = _built(_grouped(manifest, workers=2, gpus=1))
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert contract.ENV_SHARD_BASE not in _env(container)
    manifest["spec"]["distributed"]["shardBase"] = True
    job, _ = _built(manifest)
    (container,) = job["spec"]["template"]["spec"]["containers"]
    assert _env(container)[contract.ENV_SHARD_BASE] == "1"


# ---------------------------------------------------------------- the planner
def _pod(job: dict[str, Any], index: int, phase: str, **terminated: Any) -> dict[str, Any]:
    name = f"{job['metadata']['name']}-{index}-abcde"
    status: dict[str, Any] = {"phase": phase}
    if terminated:
        status["containerStatuses"] = [{"name": "trainer", "state": {"terminated": terminated}}]
    return {
        "metadata": {
            "name": name,
            "creationTimestamp": "2025-01-01T11:00:00Z",
            "annotations": {naming.INDEX: str(index)},
            "labels": dict(job["spec"]["template"]["metadata"]["labels"]),
        },
        "status": status,
    }


def _failed_job(job: dict[str, Any]) -> dict[str, Any]:
    job = copy.deepcopy(job)
    job["status"] = {
        "conditions": [
            {
                "type": "Failed",
                "status": "True",
                "reason": "BackoffLimitExceeded",
                "message": "Job has reached the specified backoff limit",
                "lastTransitionTime": "2025-01-01T11:00:00Z",
            }
        ]
    }
    return job


def _plan(
    manifest: dict[str, Any],
    job: dict[str, Any],
    pods: list[dict[str, Any]],
    status: AdapterMigrationStatus | None = None,
) -> tuple[AdapterMigrationStatus, planner.Actions]:
    migration = _migration(manifest)
    spec = migration.spec.model_copy(update={"adapters": migration.spec.adapters[:1]})
    seen = planner.Migration(
        migration.metadata.name, "ml", UID, 1, spec, status or AdapterMigrationStatus(), b"k"
    )
    return planner.plan(seen, [job], {job["metadata"]["name"]: pods}, {}, NOW)


def test_worker_zero_speaks_for_the_group(manifest: dict[str, Any]) -> None:
    job, _ = _built(_grouped(manifest))
    result = {
        "ready": True,
        "strategy": "relora",
        "outputUri": "s3://ml-adapters/llama-3-2/sentiment",
        "metric": "accuracy",
        "target": 0.9,
        "qualitySource": 0.95,
        "qualityBefore": 0.6,
        "qualityAfter": 0.93,
        "steps": 3,
    }
    pods = [
        _pod(job, 1, "Succeeded", exitCode=0, finishedAt="2025-01-01T11:59:00Z"),
        _pod(
            job,
            0,
            "Succeeded",
            exitCode=0,
            finishedAt="2025-01-01T11:58:00Z",
            message=json.dumps({"kind": "result", "result": result}),
        ),
    ]
    done = copy.deepcopy(job)
    done["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    status, _ = _plan(manifest, done, pods)
    (entry,) = status.adapters or []
    assert entry.phase == "Succeeded" and entry.reason == "Ready", entry
    running = [_pod(job, 0, "Running"), _pod(job, 1, "Running")]
    assert planner.running_pods([job], {job["metadata"]["name"]: running}) == {
        "sentiment": running[0]["metadata"]["name"]
    }


def test_a_pending_worker_holds_the_group(manifest: dict[str, Any]) -> None:
    job, _ = _built(_grouped(manifest))
    job["spec"]["suspend"] = False
    blocked = _pod(job, 1, "Pending")
    blocked["metadata"]["creationTimestamp"] = "2025-01-01T11:59:50Z"  # within its deadline
    blocked["status"]["conditions"] = [
        {"type": "PodScheduled", "status": "False", "reason": "Unschedulable", "message": "no GPU"}
    ]
    status, actions = _plan(manifest, job, [_pod(job, 0, "Running"), blocked])
    (entry,) = status.adapters or []
    assert entry.phase == "Pending" and entry.reason == "Unschedulable"
    assert entry.message == f"worker 1 (pod {blocked['metadata']['name']}): no GPU"
    assert actions.requeue_after is not None


def test_a_failed_worker_restarts_the_group_then_fails_it(manifest: dict[str, Any]) -> None:
    manifest["spec"]["backoffLimit"] = 1
    job, _ = _built(_grouped(manifest))
    failed = _failed_job(job)
    culprit = _pod(failed, 1, "Failed", exitCode=137, finishedAt="2025-01-01T11:00:00Z")
    stopped = _pod(failed, 0, "Failed", exitCode=143, finishedAt="2025-01-01T11:00:02Z")
    status, actions = _plan(manifest, failed, [stopped, culprit])
    (entry,) = status.adapters or []
    assert (entry.phase, entry.reason, entry.restarts) == ("Running", "Restarting", 1)
    assert entry.message is not None
    assert entry.message.startswith(
        f"worker 1 (pod {culprit['metadata']['name']}) failed: exit code 137; restarting all 2"
    )
    assert actions.restart == [job["metadata"]["name"]]

    # The deletion failed: the Job is still there, the status already counts the restart.
    again, actions = _plan(manifest, failed, [stopped, culprit], status)
    assert again.adapters == status.adapters and actions.restart == [job["metadata"]["name"]]

    # Gone: made again, carrying the count.
    migration = _migration(manifest)
    seen = planner.Migration(migration.metadata.name, "ml", UID, 1, migration.spec, status, b"k")
    gone, actions = planner.plan(seen, [], {}, {}, NOW)
    entry = (gone.adapters or [])[0]
    assert (entry.reason, entry.restarts) == ("Restarting", 1) and actions.create

    # The restarted group fails too: no restart left.
    second, _ = _built(manifest)
    second = _failed_job(second)
    second["metadata"]["annotations"][naming.RESTARTS] = "1"
    culprit = _pod(second, 0, "Failed", exitCode=1, finishedAt="2025-01-01T11:00:00Z")
    final, actions = _plan(manifest, second, [culprit], gone)
    entry = (final.adapters or [])[0]
    assert (entry.phase, entry.reason, entry.restarts) == ("Failed", "BackoffLimitExceeded", 1)
    assert entry.message is not None and entry.message.startswith("worker 0 (pod ")
    assert "restarted 1 times (backoffLimit 1)" in entry.message
    assert not actions.restart


def test_a_group_job_deleted_by_hand_keeps_its_restarts(manifest: dict[str, Any]) -> None:
    """A group restarted once, running again, whose Job someone deletes: the Job made again
    (JobRecreated) carries the restart already spent, so backoffLimit still bounds the whole
    adapter's restarts (a deletion does not renew them)."""
    manifest["spec"]["backoffLimit"] = 1
    job, _ = _built(_grouped(manifest))
    job["spec"]["suspend"] = False
    job["metadata"]["annotations"][naming.RESTARTS] = "1"
    running, _ = _plan(manifest, job, [_pod(job, 0, "Running"), _pod(job, 1, "Running")])
    (entry,) = running.adapters or []
    assert (entry.phase, entry.restarts) == ("Running", 1)
    migration = _migration(manifest)
    spec = migration.spec.model_copy(update={"adapters": migration.spec.adapters[:1]})
    seen = planner.Migration(migration.metadata.name, "ml", UID, 1, spec, running, b"k")
    gone, actions = planner.plan(seen, [], {}, {}, NOW)
    (entry,) = gone.adapters or []
    assert (entry.reason, entry.restarts) == ("JobRecreated", 1) and actions.create
    made = job_builder.build_job(
        name=migration.metadata.name,
        namespace="ml",
        uid=UID,
        spec=spec,
        adapter=actions.create[0],
        settings=Settings(),
        generation=1,
        restarts=entry.restarts or 0,
    )
    assert made["metadata"]["annotations"][naming.RESTARTS] == "1"


def test_bad_input_in_a_group_is_not_restarted(manifest: dict[str, Any]) -> None:
    job, _ = _built(_grouped(manifest))
    failed = _failed_job(job)
    condition = failed["status"]["conditions"][0]
    condition.update(reason="PodFailurePolicy", message="exit code 3 matching FailJob rule")
    error = {"kind": "error", "reason": "InvalidAdapter", "message": "truncated"}
    pod = _pod(failed, 1, "Failed", exitCode=3, message=json.dumps(error))
    status, actions = _plan(manifest, failed, [pod])
    (entry,) = status.adapters or []
    assert (entry.phase, entry.reason) == ("Failed", "InvalidAdapter") and not actions.restart
    assert entry.message == f"worker 1 (pod {pod['metadata']['name']}): truncated (bad input: " + (
        "not retried)"
    )


def test_a_group_restart_is_one_retry_not_one_per_pod(manifest: dict[str, Any]) -> None:
    """relora_adapter_jobs_retried_total: a group of two workers that starts, fails, is restarted
    (its Job made again, two new pods) counts one retry; its pods are not counted one by one.
    A single-pod Job still counts each pod after its first."""
    from relora_operator import metrics

    manifest["spec"]["backoffLimit"] = 2
    job, _ = _built(_grouped(manifest))
    job["spec"]["suspend"] = False
    running = [_pod(job, 0, "Running"), _pod(job, 1, "Running")]
    failed = _failed_job(job)
    dead = [
        _pod(failed, 1, "Failed", exitCode=137, finishedAt="2025-01-01T11:00:00Z"),
        _pod(failed, 0, "Failed", exitCode=143, finishedAt="2025-01-01T11:00:02Z"),
    ]
    again = copy.deepcopy(job)
    again["metadata"]["annotations"][naming.RESTARTS] = "1"
    steps: list[tuple[dict[str, Any] | None, list[dict[str, Any]]]] = [
        (job, []),  # made, no pod yet
        (job, running),  # both workers started
        (failed, dead),  # worker 1 failed: restart 1 decided
        (None, []),  # deleted: made again
        (again, []),
        (again, [_pod(again, 0, "Running"), _pod(again, 1, "Running")]),
        (again, [_pod(again, 0, "Running"), _pod(again, 1, "Running")]),  # nothing new
    ]
    migration = _migration(manifest)
    spec = migration.spec.model_copy(update={"adapters": migration.spec.adapters[:1]})
    statuses = [AdapterMigrationStatus()]
    for made, pods in steps:
        seen = planner.Migration(migration.metadata.name, "ml", UID, 1, spec, statuses[-1], b"k")
        jobs = [] if made is None else [made]
        pods_of = {} if made is None else {made["metadata"]["name"]: pods}
        status, _ = planner.plan(seen, jobs, pods_of, {}, NOW)
        statuses.append(status)
    entries = [entry for s in statuses[1:] for entry in (s.adapters or [])]
    assert [(e.attempts, e.restarts, e.reason) for e in entries] == [
        (0, None, "JobCreated"),
        (2, None, "Running"),
        (2, 1, "Restarting"),
        (2, 1, "Restarting"),
        (2, 1, "Restarting"),
        (2, 1, "Running"),
        (2, 1, "Running"),
    ]
    before = metrics.JOBS_RETRIED._value.get()
    counted = []
    for old, new in itertools.pairwise(statuses):
        start = metrics.JOBS_RETRIED._value.get()
        metrics.record_transitions(old, new, workers=2)
        counted.append(metrics.JOBS_RETRIED._value.get() - start)
    assert counted == [0, 0, 1, 0, 0, 0, 0], "the start is no retry, the restart one"

    # One pod a Job: each pod after the first is a retry (the Job's own backoffLimit).
    one = AdapterMigrationStatus.model_validate(
        {"adapters": [{"name": "sentiment", "phase": "Running", "attempts": 1}]}
    )
    two = AdapterMigrationStatus.model_validate(
        {"adapters": [{"name": "sentiment", "phase": "Running", "attempts": 2}]}
    )
    metrics.record_transitions(AdapterMigrationStatus(), one)
    metrics.record_transitions(one, two)
    assert metrics.JOBS_RETRIED._value.get() == before + 2
    # Four workers whose pods appear one by one: still no retry before a restart.
    grown = [
        AdapterMigrationStatus.model_validate(
            {"adapters": [{"name": "sentiment", "phase": "Pending", "attempts": n}]}
        )
        for n in range(5)
    ]
    for old, new in itertools.pairwise(grown):
        metrics.record_transitions(old, new, workers=4)
    assert metrics.JOBS_RETRIED._value.get() == before + 2
