"""The status planner: what the operator writes and does for each state of Jobs and Pods (the
status as the reconciler sends it: its wire form)."""

from __future__ import annotations

import copy
import datetime
import json
from typing import Any, get_args

from relora_api import contract
from relora_api.resource import AdapterMigration
from relora_api.status import (
    AdapterMigrationStatus,
    AdapterPhase,
    AdapterProgress,
    AdapterResult,
)
from relora_operator import metrics, naming, planner, seals

NOW = datetime.datetime(2026, 11, 29, 12, 0, 0, tzinfo=datetime.UTC)
UID = "uid-1"
KEY = b"k" * 32


def _migration(
    manifest: dict[str, Any], status: dict[str, Any] | None = None, **spec: Any
) -> planner.Migration:
    manifest["spec"].pop("queueName", None)
    manifest["spec"].update(spec)
    parsed = AdapterMigration.from_manifest(manifest)
    stored = planner.read_status(status)
    return planner.Migration(parsed.metadata.name, "ml", UID, 1, parsed.spec, stored, KEY)


def _plan(*args: Any, **kwargs: Any) -> tuple[dict[str, Any], planner.Actions]:
    """planner.plan, its status in the wire form that the reconciler sends."""
    status, actions = planner.plan(*args, **kwargs)
    return status.to_wire(), actions


def _job(
    adapter: str,
    *,
    conditions: list[dict[str, Any]] | None = None,
    suspend: bool = False,
    annotations: dict[str, str] | None = None,
) -> dict[str, Any]:
    return {
        "metadata": {
            "name": f"job-{adapter}",
            "uid": f"job-uid-{adapter}",
            "labels": {naming.ADAPTER: adapter, naming.MIGRATION_UID: UID},
            "annotations": annotations or {},
            "creationTimestamp": "2026-11-29T11:00:00Z",
        },
        "spec": {"suspend": suspend},
        "status": {"conditions": conditions or [], "startTime": "2026-11-29T11:00:05Z"},
    }


def _pod(name: str, phase: str, *, created: str = "2026-11-29T11:59:00Z", **status: Any) -> Any:
    return {
        "metadata": {"name": name, "creationTimestamp": created},
        "status": {"phase": phase, **status},
    }


def _terminated(message: str, code: int) -> dict[str, Any]:
    return {
        "containerStatuses": [
            {"name": "trainer", "state": {"terminated": {"exitCode": code, "message": message}}}
        ]
    }


def _true(kind: str, reason: str = "", message: str = "") -> dict[str, Any]:
    return {"type": kind, "status": "True", "reason": reason, "message": message}


def _ready(status: dict[str, Any]) -> dict[str, Any]:
    return next(c for c in status["conditions"] if c["type"] == "Ready")


def _result(ready: bool = True) -> str:
    return contract.Outcome(
        kind="result",
        result=AdapterResult(
            ready=ready,
            strategy="relora",
            output_uri="s3://ml-adapters/llama-3-2/sentiment",
            metric="accuracy",
            target=0.9,
            quality_source=0.92,
            quality_before=0.5,
            quality_after=0.93 if ready else 0.7,
            steps=40,
            time_to_readiness_seconds=12.5,
            coefficients={"alpha": 1.1, "beta": -0.3},
        ),
    ).encode()


def _both_completed() -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """Both adapters' Jobs Complete, each with a ready outcome."""
    jobs = [_job(a, conditions=[_true("Complete")]) for a in ("sentiment", "news-topic")]
    pods = {
        f"job-{a}": [_pod("p", "Succeeded", **_terminated(_result(True), 0))]
        for a in ("sentiment", "news-topic")
    }
    return jobs, pods


def test_first_sight_creates_one_job_per_adapter(manifest: dict[str, Any]) -> None:
    status, actions = _plan(_migration(manifest), [], {}, {}, NOW)
    assert [a.name for a in actions.create] == ["sentiment", "news-topic"]
    assert [a["phase"] for a in status["adapters"]] == ["Pending", "Pending"]
    assert status["phase"] == "Pending" and status["progress"] == "0/2"
    AdapterMigrationStatus.model_validate(status)  # the status fits its own schema


def test_a_restarted_operator_creates_nothing_twice(manifest: dict[str, Any]) -> None:
    jobs = [_job("sentiment"), _job("news-topic")]
    pods = {"job-sentiment": [_pod("p1", "Running")], "job-news-topic": [_pod("p2", "Running")]}
    status, actions = _plan(_migration(manifest), jobs, pods, {}, NOW)
    assert actions.create == [] and actions.suspend == [] and actions.fail == []
    again, second = _plan(_migration(manifest, status), jobs, pods, {}, NOW)
    assert again == status and second.events == [], "same world, same status, no new events"


def test_running_with_live_progress(manifest: dict[str, Any]) -> None:
    jobs = [_job("sentiment"), _job("news-topic")]
    pods = {"job-sentiment": [_pod("p1", "Running")], "job-news-topic": [_pod("p2", "Pending")]}
    progress = {
        "sentiment": AdapterProgress(
            stage="finetune", step=50, max_steps=100, quality=0.8, target=0.9
        )
    }
    status, _ = _plan(_migration(manifest), jobs, pods, progress, NOW)
    sentiment = status["adapters"][0]
    assert sentiment["phase"] == "Running" and sentiment["progress"]["step"] == 50
    assert status["phase"] == "Running"
    assert status["progressPercent"] == int(100 * (0.3 + 0.7 * 0.5) / 2)
    assert "sentiment: Running (step 50/100)" in _ready(status)["message"]


def test_an_unschedulable_pod_fails_the_adapter_after_the_deadline(
    manifest: dict[str, Any],
) -> None:
    scheduled = {
        "conditions": [
            {
                "type": "PodScheduled",
                "status": "False",
                "reason": "Unschedulable",
                "message": "0/3 nodes: insufficient nvidia.com/gpu",
            }
        ]
    }
    jobs = [_job("sentiment")]
    young = {"job-sentiment": [_pod("p1", "Pending", created="2026-11-29T11:59:30Z", **scheduled)]}
    migration = _migration(manifest, preRunningDeadlineSeconds=60)
    status, actions = _plan(migration, jobs, young, {}, NOW)
    assert status["adapters"][0]["reason"] == "Unschedulable" and actions.fail == []
    old = {"job-sentiment": [_pod("p1", "Pending", created="2026-11-29T11:58:00Z", **scheduled)]}
    status, actions = _plan(migration, jobs, old, {}, NOW)
    ((job, reason, message),) = actions.fail
    assert job == "job-sentiment" and reason == "Unschedulable"
    assert "preRunningDeadlineSeconds=60" in message and "insufficient nvidia.com/gpu" in message
    assert status["adapters"][0]["phase"] == "Failed"
    # Next round the Job carries the operator's verdict: the status stays, nothing is redone.
    failed_job = _job(
        "sentiment", suspend=True, annotations={naming.FAILURE: f"{reason}: {message}"}
    )
    again, actions = _plan(_migration(manifest, status), [failed_job], old, {}, NOW)
    assert again["adapters"][0]["reason"] == "Unschedulable" and actions.fail == []


def test_image_pull_back_off_is_named(manifest: dict[str, Any]) -> None:
    waiting: dict[str, Any] = {
        "containerStatuses": [
            {
                "name": "trainer",
                "state": {
                    "waiting": {"reason": "ImagePullBackOff", "message": "Back-off pulling image"}
                },
            }
        ]
    }
    pods = {"job-sentiment": [_pod("p1", "Pending", **waiting)]}
    status, _ = _plan(_migration(manifest), [_job("sentiment")], pods, {}, NOW)
    assert status["adapters"][0]["reason"] == "ImagePullBackOff"


def test_results_come_from_the_termination_message(manifest: dict[str, Any]) -> None:
    jobs = [
        _job("sentiment", conditions=[_true("Complete")]),
        _job("news-topic", conditions=[_true("Complete")]),
    ]
    pods = {
        "job-sentiment": [_pod("p1", "Succeeded", **_terminated(_result(True), 0))],
        "job-news-topic": [_pod("p2", "Succeeded", **_terminated(_result(False), 0))],
    }
    status, actions = _plan(_migration(manifest, ttlSecondsAfterFinished=60), jobs, pods, {}, NOW)
    ready, not_ready = status["adapters"]
    assert ready["phase"] == "Succeeded" and ready["result"]["qualityAfter"] == 0.93
    assert ready["result"]["outputUri"] == "s3://ml-adapters/llama-3-2/sentiment"
    assert ready["result"]["coefficients"] == {"alpha": 1.1, "beta": -0.3}
    assert not_ready["phase"] == "Failed" and not_ready["reason"] == "NotReady"
    assert status["phase"] == "Failed" and status["completionTime"]
    conditions = {c["type"]: c for c in status["conditions"]}
    assert conditions["Ready"]["status"] == "False" and conditions["Failed"]["status"] == "True"
    assert conditions["Stalled"]["status"] == "True"
    assert sorted(actions.ttl) == [("job-news-topic", 60), ("job-sentiment", 60)]
    assert ("Warning", "MigrationFailed") in [(k, r) for k, r, _ in actions.events]


def test_bad_input_is_reported_with_the_trainers_reason(manifest: dict[str, Any]) -> None:
    error = contract.Outcome(
        kind="error", reason="IncompatibleModels", message="weight q is (4, 4) vs (8, 4)"
    ).encode()
    failed = _true("Failed", "PodFailurePolicy", "Container trainer failed with exit code 3")
    pods = {"job-sentiment": [_pod("p1", "Failed", **_terminated(error, 3))]}
    status, _ = _plan(_migration(manifest), [_job("sentiment", conditions=[failed])], pods, {}, NOW)
    adapter = status["adapters"][0]
    assert adapter["reason"] == "IncompatibleModels"
    assert adapter["message"] == "weight q is (4, 4) vs (8, 4) (bad input: not retried)"


def test_backoff_limit_and_deadline_reasons(manifest: dict[str, Any]) -> None:
    for reason in ("BackoffLimitExceeded", "DeadlineExceeded"):
        job = _job("sentiment", conditions=[_true("Failed", reason, "Job failed")])
        status, _ = _plan(_migration(manifest), [job], {}, {}, NOW)
        assert status["adapters"][0]["reason"] == reason


def test_a_finished_result_survives_the_job_being_deleted(manifest: dict[str, Any]) -> None:
    jobs, pods = _both_completed()
    status, _ = _plan(_migration(manifest), jobs, pods, {}, NOW)
    assert status["phase"] == "Succeeded" and _ready(status)["status"] == "True"
    later = NOW + datetime.timedelta(hours=1)
    kept, actions = _plan(_migration(manifest, status), [], {}, {}, later)
    assert actions.create == [], "a finished adapter is not migrated again"
    assert kept["adapters"] == status["adapters"]
    assert _ready(kept)["lastTransitionTime"] == _ready(status)["lastTransitionTime"]
    assert kept["completionTime"] == status["completionTime"]


def test_suspend_and_resume(manifest: dict[str, Any]) -> None:
    status, actions = _plan(_migration(manifest, suspend=True), [], {}, {}, NOW)
    assert actions.create == [] and status["phase"] == "Suspended"
    assert {c["type"]: c["status"] for c in status["conditions"]}["Suspended"] == "True"
    running = [_job("sentiment"), _job("news-topic")]
    _, actions = _plan(_migration(manifest, suspend=True), running, {}, {}, NOW)
    assert sorted(actions.suspend) == [("job-news-topic", True), ("job-sentiment", True)]
    suspended = [_job("sentiment", suspend=True), _job("news-topic", suspend=True)]
    _, actions = _plan(_migration(manifest, suspend=False), suspended, {}, {}, NOW)
    assert sorted(actions.suspend) == [("job-news-topic", False), ("job-sentiment", False)]


def test_kueue_suspension_is_queued_not_a_failure(manifest: dict[str, Any]) -> None:
    migration = _migration(manifest, queueName="gpu-queue")
    status, actions = _plan(migration, [_job("sentiment", suspend=True)], {}, {}, NOW)
    assert status["adapters"][0]["phase"] == "Queued" and actions.suspend == []


def test_transitions_are_counted_once(manifest: dict[str, Any]) -> None:
    jobs, pods = _both_completed()
    old, _ = _plan(_migration(manifest), [], {}, {}, NOW)
    new, _ = _plan(_migration(manifest, old), jobs, pods, {}, NOW)
    finished = metrics.JOBS_FINISHED.labels(result="ready", reason="Ready")
    before = finished._value.get()
    histogram_before = metrics.TIME_TO_READINESS._sum.get()
    metrics.record_transitions(planner.read_status(old), planner.read_status(new))
    # A re-derived status counts nothing.
    metrics.record_transitions(planner.read_status(new), planner.read_status(new))
    assert finished._value.get() == before + 2
    assert metrics.TIME_TO_READINESS._sum.get() == histogram_before + 25.0


def _counted() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The labelled counters' samples in the registry: (name, sorted labels) -> value."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for counter in (metrics.MIGRATIONS, metrics.JOBS_FINISHED)
        for family in counter.collect()
        for sample in family.samples
        if sample.name.endswith("_total")
    }


def test_a_ready_migration_counts_on_series_known_in_advance(manifest: dict[str, Any]) -> None:
    """What a ready migration increments is in metrics.KNOWN_SERIES (created at 0 on start), and
    so is the failed result of a migration; a failed adapter's reason is open-ended."""
    known = {
        (family.name + "_total", tuple(sorted(labels.items())))
        for counter, labels in metrics.KNOWN_SERIES
        for family in counter.describe()
    }
    old, _ = _plan(_migration(manifest), [], {}, {}, NOW)
    worlds = {"ready": _both_completed(), "failed": _failed_world()}
    changed = {}
    for name, (jobs, pods) in worlds.items():
        new, _ = _plan(_migration(manifest, old), jobs, pods, {}, NOW)
        before = _counted()
        metrics.record_transitions(planner.read_status(old), planner.read_status(new))
        after = _counted()
        changed[name] = {key for key, value in after.items() if value != before.get(key)}
    assert changed["ready"] <= known and len(changed["ready"]) == 2, changed
    assert changed["failed"] - known == {
        ("relora_adapter_jobs_finished_total", (("reason", "InvalidData"), ("result", "failed")))
    }, changed


# ---------------------------------------------------------------- forged status
def _forge(status: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """``status`` with its first adapter changed by someone other than the operator."""
    forged = copy.deepcopy(status)
    forged["adapters"][0].update(changes)
    return forged


def _failed_world() -> tuple[list[dict[str, Any]], dict[str, list[Any]]]:
    """sentiment's Job failed on bad input; news-topic's Job completed, ready."""
    bad = contract.Outcome(kind="error", reason="InvalidData", message="no examples").encode()
    jobs = [
        _job("sentiment", conditions=[_true("Failed", "PodFailurePolicy", "exit code 3")]),
        _job("news-topic", conditions=[_true("Complete")]),
    ]
    pods = {
        "job-sentiment": [_pod("p1", "Failed", **_terminated(bad, 3))],
        "job-news-topic": [_pod("p2", "Succeeded", **_terminated(_result(True), 0))],
    }
    return jobs, pods


def test_finished_entries_are_sealed_and_kept(manifest: dict[str, Any]) -> None:
    jobs, pods = _failed_world()
    status, _ = _plan(_migration(manifest), jobs, pods, {}, NOW)
    assert all(seals.genuine(KEY, UID, a) for a in status["adapters"])
    assert not seals.genuine(b"another key" * 4, UID, status["adapters"][0])
    assert not seals.genuine(KEY, "another-uid", status["adapters"][0]), "no replay elsewhere"
    # Kept as is once the Jobs are gone (deleted by their TTL).
    again, actions = _plan(_migration(manifest, status), [], {}, {}, NOW)
    assert again["adapters"] == status["adapters"] and actions.create == []


def test_a_forged_success_is_derived_again_from_the_job(manifest: dict[str, Any]) -> None:
    jobs, pods = _failed_world()
    status, _ = _plan(_migration(manifest), jobs, pods, {}, NOW)
    assert status["phase"] == "Failed"
    forged = _forge(status, phase="Succeeded", reason="Ready", message="all good")
    forged["phase"] = "Succeeded"
    for condition in forged["conditions"]:
        if condition["type"] == "Ready":
            condition.update(status="True", reason="Succeeded")
    again, actions = _plan(_migration(manifest, forged), jobs, pods, {}, NOW)
    assert again == status, "what the operator measured, exactly"
    reverted = [e for e in actions.events if e[1] == "StatusReverted"]
    assert reverted == [
        (
            "Warning",
            "StatusReverted",
            "status.adapters[sentiment] (Succeeded/Ready) was not written by the operator and "
            "does not count: restored from Job job-sentiment",
        )
    ]
    # A copied seal does not help either: it signs another entry.
    copied = _forge(status, phase="Succeeded", reason="Ready", seal=status["adapters"][1]["seal"])
    again, actions = _plan(_migration(manifest, copied), jobs, pods, {}, NOW)
    assert again == status and [e[1] for e in actions.events].count("StatusReverted") == 1


def test_a_forged_result_whose_job_is_gone_is_read_again_by_a_new_job(
    manifest: dict[str, Any],
) -> None:
    jobs, pods = _failed_world()
    status, _ = _plan(_migration(manifest), jobs, pods, {}, NOW)
    forged = _forge(status, phase="Succeeded", reason="Ready")
    again, actions = _plan(_migration(manifest, forged), [], {}, {}, NOW)
    assert [a.name for a in actions.create] == ["sentiment"], "only the forged one"
    entry = again["adapters"][0]
    assert entry["phase"] == "Pending" and entry["reason"] == "Reverifying"
    assert "seal" not in entry and again["phase"] != "Succeeded"
    assert _ready(again)["status"] == "False"
    assert again["adapters"][1] == status["adapters"][1], "the genuine one is kept"
    assert [e[1] for e in actions.events].count("StatusReverted") == 1
    # The new Job runs: still Reverifying until it finishes, then its outcome counts.
    running = [_job("sentiment")]
    later, more = _plan(
        _migration(manifest, again), running, {"job-sentiment": [_pod("p3", "Running")]}, {}, NOW
    )
    assert later["adapters"][0]["phase"] == "Running" and more.create == []


# ------------------------------------------------------------------ when to look again
def test_requeue_after_is_set_only_where_time_matters(manifest: dict[str, Any]) -> None:
    """The planner's timer: a running trainer's next progress read, a blocked pod's deadline;
    nothing for a starting pod, a queued, suspended or finished adapter."""
    jobs = [_job("sentiment"), _job("news-topic")]
    running = {
        "job-sentiment": [_pod("p1", "Running")],
        "job-news-topic": [_pod("p2", "Pending")],
    }
    _, actions = _plan(_migration(manifest), jobs, running, {}, NOW, progress_every=7.0)
    assert actions.requeue_after == 7.0
    _, actions = _plan(_migration(manifest), jobs, running, {}, NOW)
    assert actions.requeue_after is None, "no progress reads asked: nothing time-dependent"

    starting = {"job-sentiment": [_pod("p1", "Pending")], "job-news-topic": []}
    _, actions = _plan(_migration(manifest), jobs, starting, {}, NOW, progress_every=7.0)
    assert actions.requeue_after is None, "a starting pod moves on by its own events"

    blocked = {
        "conditions": [{"type": "PodScheduled", "status": "False", "reason": "Unschedulable"}]
    }
    pods = {
        "job-sentiment": [_pod("p1", "Pending", created="2026-11-29T11:59:30Z", **blocked)],
        "job-news-topic": [_pod("p2", "Running")],
    }
    migration = _migration(manifest, preRunningDeadlineSeconds=60)
    _, actions = _plan(migration, jobs, pods, {}, NOW, progress_every=45.0)
    assert actions.requeue_after == 30.0, "the deadline (60 s after 11:59:30) comes first"
    _, actions = _plan(migration, jobs, pods, {}, NOW, progress_every=10.0)
    assert actions.requeue_after == 10.0

    _, actions = _plan(_migration(manifest, suspend=True), [], {}, {}, NOW, None, None, 5)
    assert actions.requeue_after is None, "suspended"
    queued = [_job(a, suspend=True) for a in ("sentiment", "news-topic")]
    _, actions = _plan(
        _migration(manifest, queueName="gpu"), queued, {}, {}, NOW, progress_every=5.0
    )
    assert actions.requeue_after is None, "queued"
    finished_jobs, finished_pods = _both_completed()
    status, actions = _plan(
        _migration(manifest), finished_jobs, finished_pods, {}, NOW, progress_every=5.0
    )
    assert status["phase"] == "Succeeded" and actions.requeue_after is None


def test_a_job_without_a_pod_yet_is_pending_not_retrying(manifest: dict[str, Any]) -> None:
    """Between a Job's creation and its first pod nothing changed for the user: no transition
    (no event), whatever the reason the adapter had (JobCreated, JobRecreated)."""
    first, _ = _plan(_migration(manifest), [], {}, {}, NOW)
    jobs = [_job("sentiment"), _job("news-topic")]
    status, actions = _plan(_migration(manifest, first), jobs, {}, {}, NOW)
    assert [(a["phase"], a["reason"]) for a in status["adapters"]] == [
        ("Pending", "JobCreated"),
        ("Pending", "JobCreated"),
    ]
    assert actions.events == [] and all(a["attempts"] == 0 for a in status["adapters"])
    recreated = {"name": "sentiment", "phase": "Pending", "reason": "JobRecreated", "message": "m"}
    previous = {**first, "adapters": [recreated, first["adapters"][1]]}
    status, _ = _plan(_migration(manifest, previous), jobs, {}, {}, NOW)
    assert status["adapters"][0]["reason"] == "JobRecreated"
    assert status["adapters"][0]["message"] == "m"
    # A trainer that finished before its Job says so: no transition either.
    done = {
        "job-sentiment": [_pod("p1", "Succeeded")],
        "job-news-topic": [_pod("p2", "Succeeded")],
    }
    again, actions = _plan(_migration(manifest, status), jobs, done, {}, NOW)
    assert [a["reason"] for a in again["adapters"]] == ["JobRecreated", "JobCreated"]
    assert actions.events == []
    # A Job whose pods all failed and has none running is retrying.
    failed = {"job-sentiment": [_pod("p1", "Failed")], "job-news-topic": [_pod("p2", "Running")]}
    status, _ = _plan(_migration(manifest), jobs, failed, {}, NOW)
    assert (status["adapters"][0]["phase"], status["adapters"][0]["reason"]) == (
        "Running",
        "Retrying",
    )


def test_a_finished_job_waits_for_its_pods_last_state(manifest: dict[str, Any]) -> None:
    """The Jobs' and the pods' watch events come apart: a Job Complete whose pod is still seen
    running (or not seen) waits for the pod's outcome, a while, instead of failing NoResult."""
    ended = {**_true("Complete"), "lastTransitionTime": "2026-11-29T11:59:58Z"}
    jobs = [_job(a, conditions=[ended]) for a in ("sentiment", "news-topic")]
    lagging = {"job-sentiment": [_pod("p1", "Running")], "job-news-topic": []}
    status, actions = _plan(_migration(manifest), jobs, lagging, {}, NOW)
    assert [a["phase"] for a in status["adapters"]] == ["Running", "Running"]
    assert actions.events[0][1] == "AdapterRunning" and actions.ttl == []
    assert actions.requeue_after == planner.POD_GRACE_SECONDS - 2
    _, done = _both_completed()
    status, actions = _plan(_migration(manifest, status), jobs, done, {}, NOW)
    assert status["phase"] == "Succeeded" and actions.requeue_after is None
    later = NOW + datetime.timedelta(seconds=planner.POD_GRACE_SECONDS)
    status, _ = _plan(_migration(manifest), jobs, lagging, {}, later)
    assert [a["reason"] for a in status["adapters"]] == ["NoResult", "NoResult"], "lost"


# ------------------------------------------------------------------ the wire form
def test_a_status_read_back_is_written_the_same(manifest: dict[str, Any]) -> None:
    """What the API server hands back reads into the models and is written again unchanged
    (the seals sign the wire form, and an unchanged status is not written again)."""
    jobs = [_job("sentiment"), _job("news-topic")]
    pods = {"job-sentiment": [_pod("p1", "Running")], "job-news-topic": []}
    progress = {"sentiment": AdapterProgress(stage="search", trial=2, trials=6)}
    worlds = [
        ([], {}, {}),
        (jobs, pods, progress),
        (*_failed_world(), {}),
        (*_both_completed(), {}),
    ]
    status: dict[str, Any] = {}
    for jobs, pods, progress in worlds:
        status, _ = _plan(_migration(manifest, status), jobs, pods, progress, NOW)
        stored = json.loads(json.dumps(status))
        assert planner.read_status(stored).to_wire() == stored
    assert all(seals.genuine(KEY, UID, a) for a in status["adapters"])


def test_a_status_the_models_refuse_is_derived_again(manifest: dict[str, Any]) -> None:
    jobs, pods = _both_completed()
    status, _ = _plan(_migration(manifest), jobs, pods, {}, NOW)
    broken = copy.deepcopy(status)
    broken["conditions"][0]["lastTransitionTime"] = "yesterday"
    assert planner.read_status(broken) == AdapterMigrationStatus()
    again, actions = _plan(_migration(manifest, broken), jobs, pods, {}, NOW)
    assert again["adapters"] == status["adapters"] and again["phase"] == "Succeeded"
    assert actions.create == []


def test_metrics_know_every_adapter_phase() -> None:
    assert set(metrics.PHASES) == set(get_args(AdapterPhase))
