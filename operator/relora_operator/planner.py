"""Plan an AdapterMigration's status from the Jobs and Pods that exist: the reconcile brain.

A pure function of what the operator sees (the resource, its Jobs, their Pods, live progress
read from pod logs, the time) that returns the status to write and the actions to take. Level
based: a restarted operator computes the same thing from the same objects, so it creates no
duplicate Job and loses nothing. Finished results are kept from the previous status, so a Job
deleted by hand or by its TTL does not erase an outcome. An unfinished adapter whose Job was
deleted gets it again (JobRecreated), once no pod of the old Job still runs a trainer on the
same output (WaitingForOldPod). A Job made from an older spec (its pod template cannot change)
goes on, and the adapter's message says so.

A worker group (spec.distributed.workers > 1) is one Indexed Job of several pods: its outcome is
worker 0's, its live progress worker 0's log, a pending worker holds the whole group (Pending,
with that worker's reason), and a failed worker fails the Job (its backoffLimit is 0). The
planner then restarts the group (Restarting: the status counts the restart first, then the Job
is deleted and made again, so the count survives an operator restart) until spec.backoffLimit
restarts are spent; the entry names the failed worker by its index.

Typed: the status is made of the models of relora_api.status, with the operator's reasons from
``Reason``; the reconciler turns it into its wire form (``to_wire``) only to compare it with the
stored one and to send it. One adapter's entry is decided by the first of the situations below
(``_derive``) that its Job and pods are in, one function each.
"""

from __future__ import annotations

import dataclasses
import datetime
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from pydantic import ValidationError

from relora_api import contract, times
from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_api.status import (
    MAX_MESSAGE,
    AdapterMigrationStatus,
    AdapterPhase,
    AdapterProgress,
    AdapterStatus,
    Condition,
    ConditionStatus,
    ConditionType,
    MigrationPhase,
    Reason,
)
from relora_operator import naming, seals

LOG = logging.getLogger("relora.operator")
Obj = dict[str, Any]
FINAL: tuple[AdapterPhase, ...] = ("Succeeded", "Failed")
# A pending pod's waiting reasons (the kubelet's) that keep it from ever starting by itself.
BLOCKING_WAITS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)
# The reason of a Job failed by its podFailurePolicy: the trainer's exit code for bad input.
POD_FAILURE_POLICY = "PodFailurePolicy"

# Reasons for something of the operator's deleted behind its back: the message says what.
AFTER_DELETION = (Reason.JOB_RECREATED, Reason.WAITING_FOR_OLD_POD, Reason.REVERIFYING)
# Reasons whose message the Ready condition and the events repeat (which worker failed).
TOLD = (*AFTER_DELETION, Reason.RESTARTING)
# How long a finished Job waits for its pod's last state before its outcome is taken as lost.
POD_GRACE_SECONDS = 10.0
# Reasons kept while a Job has no pod yet, or its pod succeeded and the Job is not yet Complete.
UNCHANGED = (
    Reason.RESTARTING,
    Reason.JOB_CREATED,
    Reason.JOB_RECREATED,
    Reason.REVERIFYING,
    Reason.POD_PENDING,
    Reason.RUNNING,
)

Event = tuple[str, str, str]  # (type, reason, message)


@dataclass(frozen=True)
class Migration:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: AdapterMigrationSpec
    status: AdapterMigrationStatus  # the status as last written (read_status), empty at first
    seal_key: bytes  # signs finished entries (relora_operator.seals)


@dataclass
class Actions:
    create: list[Adapter] = field(default_factory=list)
    suspend: list[tuple[str, bool]] = field(default_factory=list)  # (job, suspend)
    fail: list[tuple[str, str, str]] = field(default_factory=list)  # (job, reason, message)
    ttl: list[tuple[str, int]] = field(default_factory=list)  # (job, seconds)
    # Jobs of worker groups to delete once the status (counting the restart) is written.
    restart: list[str] = field(default_factory=list)
    events: list[Event] = field(default_factory=list)
    # When to look again with nothing else happening (a pending pod's deadline, the next
    # progress read of a running pod); None: only a change of the objects matters.
    requeue_after: float | None = None

    def wake(self, seconds: float) -> None:
        """Ask to be reconciled again within ``seconds`` (the earliest ask wins)."""
        seconds = max(seconds, 0.0)
        if self.requeue_after is None or seconds < self.requeue_after:
            self.requeue_after = seconds

    def merge(self, other: Actions) -> None:
        """Take ``other``'s actions after these."""
        self.create += other.create
        self.suspend += other.suspend
        self.fail += other.fail
        self.ttl += other.ttl
        self.restart += other.restart
        self.events += other.events
        if other.requeue_after is not None:
            self.wake(other.requeue_after)


def read_status(wire: Mapping[str, Any] | None) -> AdapterMigrationStatus:
    """The status as stored (wire form) as models. One that the models refuse (its schema let it
    through; not the operator's) counts as none: all of it is derived again from the cluster."""
    try:
        return AdapterMigrationStatus.model_validate(wire or {})
    except ValidationError as error:
        LOG.warning("the stored status does not read (%s): derived again", error)
        return AdapterMigrationStatus()


@dataclass(frozen=True)
class Seen:
    """What the operator sees of one adapter."""

    migration: Migration
    adapter: Adapter
    job: Obj | None
    pods: list[Obj]  # the Job's
    strays: list[Obj]  # the adapter's pods of no current Job
    previous: AdapterStatus | None  # its entry as last written
    progress: AdapterProgress | None
    now: datetime.datetime
    progress_every: float | None

    @property
    def spec(self) -> AdapterMigrationSpec:
        return self.migration.spec

    @property
    def job_name(self) -> str:
        """The name of the adapter's Job, which exists."""
        assert self.job is not None
        return str(self.job["metadata"]["name"])


Decision = tuple[AdapterStatus, Actions]


def _condition(obj: Obj, kind: str) -> Obj | None:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("type") == kind and condition.get("status") == "True":
            return dict(condition)
    return None


def _terminated(pod: Obj) -> Obj | None:
    for status in (pod.get("status") or {}).get("containerStatuses") or []:
        terminated = (status.get("state") or {}).get("terminated")
        if terminated:
            return dict(terminated)
    return None


def _outcome(pod: Obj | None) -> contract.Outcome | None:
    terminated = _terminated(pod) if pod else None
    return contract.Outcome.decode(terminated.get("message")) if terminated else None


def _cut(text: str) -> str:
    return text if len(text) <= MAX_MESSAGE else text[: MAX_MESSAGE - 3] + "..."


def _newest(pods: list[Obj], phase: str | None = None) -> Obj | None:
    chosen = [p for p in pods if phase is None or (p.get("status") or {}).get("phase") == phase]
    return max(chosen, key=lambda p: p["metadata"].get("creationTimestamp", ""), default=None)


def _active(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Pending", "Running")


def _index(pod: Obj) -> str | None:
    """A worker's completion index in its Indexed Job (None: not of an Indexed Job)."""
    return (pod["metadata"].get("annotations") or {}).get(naming.INDEX)


def _leader(pods: list[Obj], phase: str | None = None) -> Obj | None:
    """The newest pod of worker 0 (of any pod outside an Indexed Job) in ``phase``: the one
    whose log and termination message speak for the adapter."""
    return _newest([p for p in pods if _index(p) in (None, "0")], phase)


def _restarts(job: Obj | None) -> int:
    """How many times the group was restarted before ``job`` was made."""
    value = ((job or {}).get("metadata", {}).get("annotations") or {}).get(naming.RESTARTS, "")
    return int(value) if str(value).isdigit() else 0


def _worker(pod: Obj, workers: int) -> str:
    """``pod NAME``, or ``worker I (pod NAME)`` in a group."""
    name = f"pod {pod['metadata']['name']}"
    index = _index(pod)
    return f"worker {index} ({name})" if workers > 1 and index is not None else name


def running_pods(jobs: list[Obj], pods: dict[str, list[Obj]]) -> dict[str, str]:
    """Adapter name -> its running pod (worker 0 in a group), whose log tail carries live
    progress."""
    result = {}
    for job in jobs:
        adapter = job["metadata"].get("labels", {}).get(naming.ADAPTER)
        pod = _leader(pods.get(job["metadata"]["name"], []), "Running")
        if adapter and pod is not None:
            result[adapter] = pod["metadata"]["name"]
    return result


# ---------------------------------------------------------------- one adapter's entry
def _adapter_entry(seen: Seen, wanted: str | None) -> Decision:
    """The adapter's entry and what to do for it. ``wanted``: the hash of the pod template its
    Job would get now (None: not computed, no Job can be stale)."""
    previous, actions = seen.previous, Actions()
    key, uid = seen.migration.seal_key, seen.migration.uid
    if previous is not None and previous.phase in FINAL:
        if not seals.genuine(key, uid, previous.to_wire()):
            previous, event = _forged(seen, previous)
            seen = dataclasses.replace(seen, previous=previous)
            actions.events.append(event)
        elif _outcome_stands(seen.job):
            actions.merge(_ttl(seen))
            return previous, actions  # a finished outcome is never lost nor recomputed
    entry, derived = _derive(seen)
    actions.merge(derived)
    if seen.job is not None and _stale(seen.job, wanted):
        entry = _note_stale(entry, seen.job)
    if entry.phase in FINAL:
        entry = entry.model_copy(update={"seal": seals.sign(key, uid, entry.to_wire())})
    return entry, actions


def _outcome_stands(job: Obj | None) -> bool:
    """Whether a finished entry outlives what the Job says now: the Job is gone or finished
    (not one made again for it, still running)."""
    return (
        job is None
        or _condition(job, "Complete") is not None
        or _condition(job, "Failed") is not None
        or naming.FAILURE in (job["metadata"].get("annotations") or {})
    )


def _derive(seen: Seen) -> Decision:
    """The entry from the Job and its pods: the first situation that applies."""
    job = seen.job
    if job is None:
        return _without_job(seen)
    failure = (job["metadata"].get("annotations") or {}).get(naming.FAILURE)
    if failure:
        return _failed_by_operator(seen, failure)
    finished = _condition(job, "Complete") or _condition(job, "Failed")
    if finished and _pod_lags(seen.pods, finished["type"] == "Complete"):
        waiting = _waiting_for_last_state(seen, finished)
        if waiting is not None:
            return waiting
    if _condition(job, "Complete"):
        return _completed(seen)
    failed = _condition(job, "Failed")
    if failed:
        return _job_failed(seen, failed)
    if job["spec"].get("suspend"):
        return _job_suspended(seen)
    if seen.spec.suspend and not seen.spec.queue_name:
        return _suspending(seen)
    active = [p for p in seen.pods if _active(p)]
    # A pending worker holds its whole group (one pod alone: the same rule).
    pod = _newest(active, "Pending") or _newest(active)
    if pod is None:
        return _no_pod_active(seen)
    if pod["status"].get("phase") == "Running":
        return _running(seen)
    return _pod_pending(seen, pod)


def _of_job(
    seen: Seen,
    phase: AdapterPhase,
    reason: str,
    message: str | None = None,
) -> AdapterStatus:
    """An entry of an adapter whose Job exists: its name, the pods it started so far, and the
    restarts of its worker group before it (if any)."""
    restarts = _restarts(seen.job)
    return AdapterStatus(
        name=seen.adapter.name,
        job_name=seen.job_name,
        attempts=len(seen.pods),
        phase=phase,
        reason=reason,
        message=message,
        **({"restarts": restarts} if restarts else {}),
    )


def _without_job(seen: Seen) -> Decision:
    """No Job (yet, or any more): make it, unless suspended or an orphaned pod of the last one
    still runs a trainer on the same output."""
    adapter, migration = seen.adapter, seen.migration
    if seen.spec.suspend:
        entry = AdapterStatus(name=adapter.name, phase="Suspended", reason=Reason.SUSPENDED)
        return entry, Actions()
    job_name = naming.job_name(migration.name, adapter.name, migration.uid, seen.spec.workers)
    old_pod = _newest([p for p in seen.strays if _active(p)])
    if old_pod is not None:  # a Job deleted without its pod (propagation Orphan)
        return _waiting_for_old_pod(seen, job_name, old_pod), Actions()
    return _job_to_make(seen, job_name), Actions(create=[adapter])


def _waiting_for_old_pod(seen: Seen, job_name: str, old_pod: Obj) -> AdapterStatus:
    message = (
        f"Job {job_name} was deleted but its pod {old_pod['metadata']['name']} still "
        "runs a trainer on the same output; the Job is created again once that pod ends "
        "(delete the pod to go on now)"
    )
    return AdapterStatus(
        name=seen.adapter.name,
        phase="Pending",
        reason=Reason.WAITING_FOR_OLD_POD,
        message=message,
        job_name=job_name,
    )


def _job_to_make(seen: Seen, job_name: str) -> AdapterStatus:
    """The entry of an adapter whose Job is made now: for the first time, again after it was
    deleted unfinished, or to read a result again (Reverifying, kept until it finishes)."""
    previous = seen.previous
    if previous is not None and previous.reason in (Reason.REVERIFYING, Reason.RESTARTING):
        return previous.model_copy(update={"job_name": job_name})
    # An unfinished entry that counts pods (attempts) had its Job seen: someone deleted it.
    if (
        previous is not None
        and previous.phase not in FINAL
        and "attempts" in previous.model_fields_set
    ):
        message = (
            f"Job {job_name} was deleted before it finished; created again "
            "(the trainer resumes from the state saved in the output)"
        )
        return AdapterStatus(
            name=seen.adapter.name,
            phase="Pending",
            reason=Reason.JOB_RECREATED,
            message=message,
            job_name=job_name,
            # A worker group's restarts so far: its budget is not renewed by a deletion.
            **({"restarts": previous.restarts} if previous.restarts else {}),
        )
    return AdapterStatus(
        name=seen.adapter.name, phase="Pending", reason=Reason.JOB_CREATED, job_name=job_name
    )


def _failed_by_operator(seen: Seen, failure: str) -> Decision:
    """The Job carries the operator's verdict (its pod did not start in time): Failed."""
    reason, _, message = failure.partition(": ")
    return _of_job(seen, "Failed", reason, _cut(message)), Actions()


def _waiting_for_last_state(seen: Seen, finished: Obj) -> Decision | None:
    """The Job says its pod ended, but the pod's last state has not come yet (the watch events
    of Jobs and pods come apart): its outcome is in that state, so wait for it, a while (None:
    waited long enough)."""
    ended = times.parse(finished.get("lastTransitionTime")) or seen.now
    left = POD_GRACE_SECONDS - (seen.now - ended).total_seconds()
    if left <= 0:
        return None
    actions = Actions()
    actions.wake(left)
    return _as_before_or(seen, "Running", Reason.RUNNING), actions


def _completed(seen: Seen) -> Decision:
    """The Job is Complete: the outcome its pod reported."""
    outcome = _outcome(_leader(seen.pods, "Succeeded") or _newest(seen.pods, "Succeeded"))
    if outcome is None or outcome.kind != "result" or outcome.result is None:
        message = "the trainer finished without reporting an outcome"
        return _of_job(seen, "Failed", Reason.NO_RESULT, message), _ttl(seen)
    found = outcome.result
    if found.ready:
        entry = _of_job(seen, "Succeeded", Reason.READY)
    else:
        message = (
            f"{found.metric} {found.quality_after} did not reach the target "
            f"{found.target} within {found.steps} steps"
        )
        entry = _of_job(seen, "Failed", Reason.NOT_READY, message)
    return entry.model_copy(update={"result": found}), _ttl(seen)


def _job_failed(seen: Seen, failed: Obj) -> Decision:
    """The Job failed: its reason, or the trainer's for bad input (not retried); a worker
    group's Job failed by a worker is restarted while restarts are left."""
    workers = seen.spec.workers
    culprit = _first_failed(seen.pods) if workers > 1 else _newest(seen.pods, "Failed")
    outcome = _outcome(culprit)
    reason = failed.get("reason") or Reason.JOB_FAILED
    message = failed.get("message") or ""
    if workers > 1 and culprit is not None and reason not in (POD_FAILURE_POLICY, DEADLINE):
        restarted = _restart_group(seen, culprit, outcome)
        if restarted is not None:
            return restarted
        limit = seen.spec.backoff_limit
        message = (
            f"{_worker_failure(culprit, workers, outcome)}; the group of {workers} workers was "
            f"restarted {_restarts(seen.job)} times (backoffLimit {limit})"
        )
        reason = BACKOFF_LIMIT
    elif outcome is not None and outcome.kind == "error":
        if reason == POD_FAILURE_POLICY:
            reason = outcome.reason or Reason.INVALID_INPUT
            message = f"{outcome.message} (bad input: not retried)"
        else:
            message = f"{message}; last attempt: {outcome.message}"
        if workers > 1 and culprit is not None:
            message = f"{_worker(culprit, workers)}: {message}"
    return _of_job(seen, "Failed", reason, _cut(message)), _ttl(seen)


DEADLINE = "DeadlineExceeded"  # a Job's reason when its activeDeadlineSeconds ran out
BACKOFF_LIMIT = "BackoffLimitExceeded"  # a Job's reason when its retries are spent


def _first_failed(pods: list[Obj]) -> Obj | None:
    """The failed pod that ended first: the worker whose failure failed the group (the Job
    controller stops the others after it)."""

    def ended(pod: Obj) -> tuple[str, str]:
        terminated = _terminated(pod) or {}
        return (terminated.get("finishedAt") or "~", pod["metadata"].get("creationTimestamp", ""))

    failed = [p for p in pods if (p.get("status") or {}).get("phase") == "Failed"]
    return min(failed, key=ended, default=None)


def _worker_failure(pod: Obj, workers: int, outcome: contract.Outcome | None) -> str:
    """``worker I (pod NAME) failed: exit code N[: the trainer's message]``."""
    terminated = _terminated(pod) or {}
    text = f"{_worker(pod, workers)} failed"
    if "exitCode" in terminated:
        text += f": exit code {terminated['exitCode']}"
    if outcome is not None and outcome.kind == "error" and outcome.message:
        text += f": {outcome.message}"
    return text


def _restart_group(seen: Seen, culprit: Obj, outcome: contract.Outcome | None) -> Decision | None:
    """Restart a failed worker group while restarts are left (None: all spent). The status
    counts the restart (Restarting, restarts n + 1) before the Job is deleted; a Job still
    there with fewer restarts than the status counts is one whose deletion was decided."""
    made, previous = _restarts(seen.job), seen.previous
    decided = previous.restarts or 0 if previous is not None else 0
    if previous is not None and previous.reason == Reason.RESTARTING and decided > made:
        restarts = decided
    elif made < seen.spec.backoff_limit:
        restarts = made + 1
    else:
        return None
    workers = seen.spec.workers
    message = (
        f"{_worker_failure(culprit, workers, outcome)}; restarting all {workers} workers from "
        f"the last checkpoint (restart {restarts} of at most {seen.spec.backoff_limit})"
    )
    entry = _of_job(seen, "Running", Reason.RESTARTING, _cut(message))
    return entry.model_copy(update={"restarts": restarts}), Actions(restart=[seen.job_name])


def _job_suspended(seen: Seen) -> Decision:
    """The Job is suspended: by the spec, by Kueue until admitted, or to be resumed."""
    spec = seen.spec
    if spec.suspend:
        return _of_job(seen, "Suspended", Reason.SUSPENDED), Actions()
    if spec.queue_name:
        message = f"waiting for admission by Kueue queue {spec.queue_name}"
        return _of_job(seen, "Queued", Reason.QUEUED, message), Actions()
    return _of_job(seen, "Pending", Reason.RESUMING), Actions(suspend=[(seen.job_name, False)])


def _suspending(seen: Seen) -> Decision:
    """The spec says suspend (no Kueue queue): the Job is suspended."""
    return _of_job(seen, "Suspended", Reason.SUSPENDED), Actions(suspend=[(seen.job_name, True)])


def _no_pod_active(seen: Seen) -> Decision:
    """No pod pending or running: retrying after a failed one; else no pod yet, or its trainer
    finished and the Job has yet to say so: nothing new."""
    last = _newest(seen.pods)
    if last is not None and (last.get("status") or {}).get("phase") != "Succeeded":
        return _of_job(seen, "Running", Reason.RETRYING), Actions()
    if last is None:
        return _as_before_or(seen, "Pending", Reason.JOB_CREATED), Actions()
    return _as_before_or(seen, "Running", Reason.RUNNING), Actions()


def _running(seen: Seen) -> Decision:
    """The trainer runs: its live progress; look again at the next progress read."""
    entry = _of_job(seen, "Running", Reason.RUNNING)
    if seen.progress is not None:
        entry = entry.model_copy(update={"progress": seen.progress})
    actions = Actions()
    if seen.progress_every is not None:
        actions.wake(seen.progress_every)
    return entry, actions


def _pod_pending(seen: Seen, pod: Obj) -> Decision:
    """The pod does not run yet: starting, or blocked (failed at the pre-running deadline)."""
    deadline = seen.spec.pre_running_deadline_seconds
    reason, message = _blocked(pod)
    created = times.parse(pod["metadata"].get("creationTimestamp")) or seen.now
    waited = (seen.now - created).total_seconds()
    if reason == Reason.POD_PENDING:
        return _of_job(seen, "Pending", reason, _cut(message)), Actions()
    if waited >= deadline:
        text = (
            f"{_worker(pod, seen.spec.workers)} did not start within "
            f"preRunningDeadlineSeconds={deadline}: {message}"
        )
        return _of_job(seen, "Failed", reason, _cut(text)), Actions(
            fail=[(seen.job_name, reason, text)]
        )
    actions = Actions()  # blocked: fails at its deadline unless its pod changes first
    actions.wake(deadline - waited)
    if seen.spec.workers > 1:
        message = f"{_worker(pod, seen.spec.workers)}: {message}"
    return _of_job(seen, "Pending", reason, _cut(message)), actions


def _as_before_or(seen: Seen, phase: AdapterPhase, reason: Reason) -> AdapterStatus:
    """Nothing new to tell: the entry as last written when it says its Job is on its way
    (phase, reason, message, attempts and progress kept), else ``phase``/``reason``."""
    kept = seen.previous
    if kept is None or kept.phase not in ("Pending", "Running") or kept.reason not in UNCHANGED:
        return _of_job(seen, phase, reason)
    carried = {"message", "attempts", "progress"} & kept.model_fields_set
    entry = _of_job(seen, kept.phase, kept.reason or reason)
    return entry.model_copy(update={name: getattr(kept, name) for name in carried})


def _pod_lags(pods: list[Obj], complete: bool) -> bool:
    """Whether a finished Job's pods are not seen finished yet: the newest one still pending
    or running, or none seen of a Complete Job (whose outcome only its pod has; a failed Job's
    pods may be gone, deleted at its deadline)."""
    newest = _newest(pods)
    return _active(newest) if newest is not None else complete


def _forged(seen: Seen, entry: AdapterStatus) -> tuple[AdapterStatus | None, Event]:
    """A finished entry without the operator's seal: say so, and what to derive it from instead
    (the Job when it exists: None; else a new Job re-reads the output: Reverifying)."""
    claimed = f"{entry.phase}/{entry.reason}"
    replacement = None
    if seen.job is not None:
        source = f"restored from Job {seen.job['metadata']['name']}"
    else:
        source = "its Job is gone, so a new Job reads the result again from the output"
        replacement = AdapterStatus(
            name=seen.adapter.name,
            phase="Pending",
            reason=Reason.REVERIFYING,
            message=f"the finished outcome in the status ({claimed}) was not the operator's; "
            "a new Job reads the result again from the output",
        )
    text = (
        f"status.adapters[{seen.adapter.name}] ({claimed}) was not written by the operator "
        f"and does not count: {source}"
    )
    return replacement, ("Warning", Reason.STATUS_REVERTED, _cut(text))


def _stale(job: Obj, wanted: str | None) -> bool:
    made = (job["metadata"].get("annotations") or {}).get(naming.TEMPLATE_HASH)
    return bool(made and wanted and made != wanted)


def _note_stale(entry: AdapterStatus, job: Obj) -> AdapterStatus:
    """Say that the spec changed after the Job was made (a Job's pod template is immutable)."""
    name = job["metadata"]["name"]
    if entry.phase in FINAL:
        note = (
            f"the spec changed while Job {name} ran: this outcome is of the spec it was made from"
        )
    else:
        note = (
            f"the spec changed after Job {name} was made; a Job's pod cannot change, so it "
            "goes on as made: delete the Job to run the new spec"
        )
    message = f"{entry.message}; {note}" if entry.message else note
    return entry.model_copy(update={"message": _cut(message)})


def _blocked(pod: Obj) -> tuple[str, str]:
    """Why a pending pod does not run (Unschedulable, ImagePullBackOff, ...)."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            reason = condition.get("reason") or Reason.UNSCHEDULABLE
            return reason, condition.get("message") or ""
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BLOCKING_WAITS:
            return waiting["reason"], waiting.get("message") or ""
    return Reason.POD_PENDING, "the trainer pod is starting"


def _ttl(seen: Seen) -> Actions:
    """Let the Job's TTL run only now that its outcome is in the status."""
    ttl, job = seen.spec.ttl_seconds_after_finished, seen.job
    if job is not None and ttl is not None and job["spec"].get("ttlSecondsAfterFinished") != ttl:
        return Actions(ttl=[(job["metadata"]["name"], ttl)])
    return Actions()


# ---------------------------------------------------------------- the migration's status
def _fraction(adapter: AdapterStatus) -> float:
    if adapter.phase in FINAL:
        return 1.0
    progress = adapter.progress or AdapterProgress()
    if progress.stage == "search" and progress.trials:
        return 0.3 * float(progress.trial or 0) / float(progress.trials)
    if progress.stage == "finetune" and progress.max_steps:
        return 0.3 + 0.7 * float(progress.step or 0) / float(progress.max_steps)
    return 0.0


def _describe(adapter: AdapterStatus) -> str:
    reason = adapter.reason if adapter.reason is not None else adapter.phase
    text = f"{adapter.name}: {reason}"
    progress = adapter.progress or AdapterProgress()
    trial = progress.trial if progress.trial is not None else 0
    step = progress.step if progress.step is not None else 0
    if progress.stage == "search":
        text += f" (search trial {trial}/{_or_unknown(progress.trials)})"
    elif progress.stage == "finetune":
        text += f" (step {step}/{_or_unknown(progress.max_steps)})"
    if adapter.message and (adapter.phase == "Failed" or adapter.reason in TOLD):
        text += f": {adapter.message}"
    return text


def _or_unknown(value: int | None) -> str:
    return "?" if value is None else str(value)


def _why(adapter: AdapterStatus) -> str:
    return adapter.reason or adapter.phase


def _conditions(
    migration: Migration,
    adapters: list[AdapterStatus],
    phase: MigrationPhase,
    now: datetime.datetime,
) -> list[Condition]:
    spec = migration.spec
    failed = [a for a in adapters if a.phase == "Failed"]
    waiting = [a for a in adapters if a.phase not in FINAL]
    ready_count = sum(a.phase == "Succeeded" for a in adapters)
    summary = f"{ready_count}/{len(adapters)} adapters ready"
    ready: tuple[ConditionStatus, str, str]
    if phase == "Succeeded":
        ready = ("True", Reason.SUCCEEDED, summary)
    elif failed:
        ready = ("False", _why(failed[0]), f"{summary}; {_describe(failed[0])}")
    elif spec.suspend:
        ready = ("False", Reason.SUSPENDED, f"{summary}; suspended")
    else:
        first = waiting[0] if waiting else adapters[0]
        ready = ("False", _why(first), f"{summary}; {_describe(first)}")
    values: dict[ConditionType, tuple[ConditionStatus, str, str]] = {
        "Ready": ready,
        "Succeeded": ("True", Reason.SUCCEEDED, summary)
        if phase == "Succeeded"
        else ("False", Reason.FAILED if phase == "Failed" else Reason.IN_PROGRESS, summary),
        "Failed": ("True", _why(failed[0]), "; ".join(_describe(a) for a in failed))
        if failed
        else ("False", Reason.NO_FAILURE, "no adapter failed"),
        "Stalled": ("True", _why(failed[0]), "a failed adapter needs a new spec or inputs")
        if failed
        else ("False", Reason.PROGRESSING if waiting else Reason.FINISHED, summary),
        "Suspended": ("True", Reason.SUSPENDED, "spec.suspend is true")
        if spec.suspend
        else ("False", Reason.NOT_SUSPENDED, "spec.suspend is false"),
    }
    previous = {c.type: c for c in migration.status.conditions or []}
    conditions = []
    for kind, (status, reason, message) in values.items():
        old = previous.get(kind)
        since = (
            old.last_transition_time
            if old is not None and old.status == status
            else times.whole_seconds(now)
        )
        conditions.append(
            Condition(
                type=kind,
                status=status,
                reason=reason,
                message=_cut(message),
                observed_generation=migration.generation,
                last_transition_time=since,
            )
        )
    return conditions


def _phase(migration: Migration, adapters: list[AdapterStatus]) -> MigrationPhase:
    if all(a.phase in FINAL for a in adapters):
        return "Succeeded" if all(a.phase == "Succeeded" for a in adapters) else "Failed"
    if migration.spec.suspend:
        return "Suspended"
    if any(a.phase in ("Running", "Failed", "Succeeded") for a in adapters):
        return "Running"
    return "Pending"


def plan(
    migration: Migration,
    jobs: list[Obj],
    pods: dict[str, list[Obj]],
    progress: dict[str, AdapterProgress],
    now: datetime.datetime,
    strays: list[Obj] | None = None,
    templates: dict[str, str] | None = None,
    progress_every: float | None = None,
) -> tuple[AdapterMigrationStatus, Actions]:
    """The status to write and the actions to take, from what exists now.

    ``pods`` maps each Job's name to its pods; ``strays`` are the migration's pods that belong
    to none of ``jobs`` (their Job was deleted without them, or is being deleted);
    ``templates`` maps an adapter to the hash of the pod template its Job would get now
    (job_builder.template_hash): a Job made from another one did not get the latest spec.
    ``progress_every``: how often a running trainer's progress is read (None: not at all).

    ``actions.requeue_after`` says when to look again if nothing changes meanwhile: the
    pre-running deadline of a blocked pod, ``progress_every`` while a trainer runs; None for
    Pending (a starting pod), Queued, Suspended and finished adapters, which only a change of
    their Job or pod moves on.
    """
    actions = Actions()
    stray_by_adapter: dict[str, list[Obj]] = {}
    for pod in strays or []:
        label = (pod["metadata"].get("labels") or {}).get(naming.ADAPTER, "")
        stray_by_adapter.setdefault(label, []).append(pod)
    by_adapter = {j["metadata"].get("labels", {}).get(naming.ADAPTER): j for j in jobs}
    old = migration.status
    previous = {a.name: a for a in old.adapters or []}
    adapters = []
    for adapter in migration.spec.adapters:
        job = by_adapter.get(adapter.name)
        seen = Seen(
            migration=migration,
            adapter=adapter,
            job=job,
            pods=pods.get(job["metadata"]["name"], []) if job is not None else [],
            strays=stray_by_adapter.get(adapter.name, []),
            previous=previous.get(adapter.name),
            progress=progress.get(adapter.name),
            now=now,
            progress_every=progress_every,
        )
        entry, more = _adapter_entry(seen, (templates or {}).get(adapter.name))
        actions.merge(more)
        adapters.append(entry)
    phase = _phase(migration, adapters)
    finished = sum(a.phase in FINAL for a in adapters)
    starts = [
        j.get("status", {}).get("startTime") for j in jobs if j.get("status", {}).get("startTime")
    ]
    status = AdapterMigrationStatus(
        observed_generation=migration.generation,
        phase=phase,
        conditions=_conditions(migration, adapters, phase, now),
        progress=f"{finished}/{len(adapters)}",
        progress_percent=int(100 * sum(_fraction(a) for a in adapters) / len(adapters)),
        start_time=old.start_time or (times.parse(min(starts)) if starts else None),
        completion_time=(old.completion_time or times.whole_seconds(now))
        if phase in FINAL
        else None,
        adapters=adapters,
    )
    actions.events += _events(old, status)
    return status, actions


def _events(old: AdapterMigrationStatus, new: AdapterMigrationStatus) -> list[Event]:
    """One Kubernetes event per adapter or migration transition."""
    events: list[Event] = []
    before = {a.name: (a.phase, a.reason) for a in old.adapters or []}
    for adapter in new.adapters or []:
        if before.get(adapter.name) == (adapter.phase, adapter.reason):
            continue
        kind = (
            "Warning"
            if adapter.phase == "Failed"
            or adapter.reason in (Reason.UNSCHEDULABLE, *BLOCKING_WAITS)
            else "Normal"
        )
        events.append((kind, f"Adapter{adapter.phase}", _cut(_describe(adapter))))
    if old.phase != new.phase and new.phase in FINAL:
        kind = "Normal" if new.phase == "Succeeded" else "Warning"
        ready = next(c for c in new.conditions or [] if c.type == "Ready")
        events.append((kind, f"Migration{new.phase}", ready.message))
    return events
