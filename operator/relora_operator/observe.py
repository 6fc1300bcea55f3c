"""Derive an AdapterMigration's status from the Jobs and Pods that exist: the reconcile brain.

A pure function of what the operator sees (the resource, its Jobs, their Pods, live progress
read from pod logs, the time) that returns the status to write and the actions to take. Level
based: a restarted operator computes the same thing from the same objects, so it creates no
duplicate Job and loses nothing. Finished results are kept from the previous status, so a Job
deleted by hand or by its TTL does not erase an outcome. An unfinished adapter whose Job was
deleted gets it again (JobRecreated), once no pod of the old Job still runs a trainer on the
same output (WaitingForOldPod). A Job made from an older spec (its pod template cannot change)
goes on, and the adapter's message says so.
"""

from __future__ import annotations

import datetime
from dataclasses import dataclass, field
from typing import Any

from relora_api import contract, times
from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_api.status import MAX_MESSAGE, AdapterProgress
from relora_operator import naming, seals

Obj = dict[str, Any]
FINAL = ("Succeeded", "Failed")
READY = "Ready"  # the reason of every Succeeded adapter (a Failed one's reasons are open-ended)
BLOCKING_WAITS = (
    "ImagePullBackOff",
    "ErrImagePull",
    "InvalidImageName",
    "CreateContainerConfigError",
    "CreateContainerError",
)

# Reasons for something of the operator's deleted behind its back: the message says what.
AFTER_DELETION = ("JobRecreated", "WaitingForOldPod", "Reverifying")
# How long a finished Job waits for its pod's last state before its outcome is taken as lost.
POD_GRACE_SECONDS = 10.0
# Reasons kept while a Job has no pod yet, or its pod succeeded and the Job is not yet Complete.
UNCHANGED = ("JobCreated", "JobRecreated", "Reverifying", "PodPending", "Running")


@dataclass(frozen=True)
class Migration:
    name: str
    namespace: str
    uid: str
    generation: int
    spec: AdapterMigrationSpec
    status: Obj  # the status as last written (wire form), {} at first
    seal_key: bytes  # signs finished entries (relora_operator.seals)


@dataclass
class Actions:
    create: list[Adapter] = field(default_factory=list)
    suspend: list[tuple[str, bool]] = field(default_factory=list)  # (job, suspend)
    fail: list[tuple[str, str, str]] = field(default_factory=list)  # (job, reason, message)
    ttl: list[tuple[str, int]] = field(default_factory=list)  # (job, seconds)
    events: list[tuple[str, str, str]] = field(default_factory=list)  # (type, reason, message)
    # When to look again with nothing else happening (a pending pod's deadline, the next
    # progress read of a running pod); None: only a change of the objects matters.
    requeue_after: float | None = None

    def wake(self, seconds: float) -> None:
        """Ask to be reconciled again within ``seconds`` (the earliest ask wins)."""
        seconds = max(seconds, 0.0)
        if self.requeue_after is None or seconds < self.requeue_after:
            self.requeue_after = seconds


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


def running_pods(jobs: list[Obj], pods: dict[str, list[Obj]]) -> dict[str, str]:
    """Adapter name -> its running pod, whose log tail carries live progress."""
    result = {}
    for job in jobs:
        adapter = job["metadata"].get("labels", {}).get(naming.ADAPTER)
        pod = _newest(pods.get(job["metadata"]["name"], []), "Running")
        if adapter and pod is not None:
            result[adapter] = pod["metadata"]["name"]
    return result


def _adapter_status(
    migration: Migration,
    adapter: Adapter,
    job: Obj | None,
    pods: list[Obj],
    previous: Obj | None,
    progress: AdapterProgress | None,
    now: datetime.datetime,
    actions: Actions,
    strays: list[Obj] | None = None,
    progress_every: float | None = None,
) -> Obj:
    spec = migration.spec
    key, uid = migration.seal_key, migration.uid
    if previous and previous.get("phase") in FINAL and not seals.genuine(key, uid, previous):
        previous = _forged(adapter, previous, job, actions)
    if (
        previous
        and previous.get("phase") in FINAL
        and (
            job is None
            or _condition(job, "Complete")
            or _condition(job, "Failed")
            or naming.FAILURE in (job["metadata"].get("annotations") or {})
        )
    ):
        _ttl(job, spec, actions)
        return previous  # a finished outcome is never lost nor recomputed
    if job is None:
        if spec.suspend:
            return {"name": adapter.name, "phase": "Suspended", "reason": "Suspended"}
        job_name = naming.job_name(migration.name, adapter.name, migration.uid)
        old_pod = _newest([p for p in strays or [] if _active(p)])
        if old_pod is not None:  # a Job deleted without its pod (propagation Orphan)
            message = (
                f"Job {job_name} was deleted but its pod {old_pod['metadata']['name']} still "
                "runs a trainer on the same output; the Job is created again once that pod ends "
                "(delete the pod to go on now)"
            )
            return {
                "name": adapter.name,
                "phase": "Pending",
                "reason": "WaitingForOldPod",
                "message": message,
                "jobName": job_name,
            }
        actions.create.append(adapter)
        if previous and previous.get("reason") == "Reverifying":
            return {**previous, "jobName": job_name}
        if previous and previous.get("phase") not in FINAL and "attempts" in previous:
            # Its Job had been seen, unfinished: someone deleted it.
            return {
                "name": adapter.name,
                "phase": "Pending",
                "reason": "JobRecreated",
                "message": f"Job {job_name} was deleted before it finished; created again "
                "(the trainer resumes from the state saved in the output)",
                "jobName": job_name,
            }
        return {
            "name": adapter.name,
            "phase": "Pending",
            "reason": "JobCreated",
            "jobName": job_name,
        }
    name = job["metadata"]["name"]
    base: Obj = {"name": adapter.name, "jobName": name, "attempts": len(pods)}
    failure = (job["metadata"].get("annotations") or {}).get(naming.FAILURE)
    if failure:
        reason, _, message = failure.partition(": ")
        return {**base, "phase": "Failed", "reason": reason, "message": _cut(message)}
    finished = _condition(job, "Complete") or _condition(job, "Failed")
    if finished and _pod_lags(pods, finished["type"] == "Complete"):
        # The Job says its pod ended, but the pod's last state has not come yet (the watch
        # events of Jobs and pods come apart): its outcome is in that state, so wait for it.
        ended = times.parse(finished.get("lastTransitionTime")) or now
        left = POD_GRACE_SECONDS - (now - ended).total_seconds()
        if left > 0:
            actions.wake(left)
            kept = previous or {}
            if kept.get("phase") in ("Pending", "Running") and kept.get("reason") in UNCHANGED:
                return _unchanged(base, kept)
            return {**base, "phase": "Running", "reason": "Running"}
    if _condition(job, "Complete"):
        _ttl(job, spec, actions)
        return {**base, **_result(_outcome(_newest(pods, "Succeeded")))}
    failed = _condition(job, "Failed")
    if failed:
        _ttl(job, spec, actions)
        outcome = _outcome(_newest(pods, "Failed"))
        reason = failed.get("reason") or "JobFailed"
        message = failed.get("message") or ""
        if outcome is not None and outcome.kind == "error":
            if reason == "PodFailurePolicy":  # the trainer's exit code for bad input
                reason = outcome.reason or "InvalidInput"
                message = f"{outcome.message} (bad input: not retried)"
            else:
                message = f"{message}; last attempt: {outcome.message}"
        return {**base, "phase": "Failed", "reason": reason, "message": _cut(message)}
    if job["spec"].get("suspend"):
        if spec.suspend:
            return {**base, "phase": "Suspended", "reason": "Suspended"}
        if spec.queue_name:
            return {
                **base,
                "phase": "Queued",
                "reason": "Queued",
                "message": f"waiting for admission by Kueue queue {spec.queue_name}",
            }
        actions.suspend.append((name, False))
        return {**base, "phase": "Pending", "reason": "Resuming"}
    if spec.suspend and not spec.queue_name:
        actions.suspend.append((name, True))
        return {**base, "phase": "Suspended", "reason": "Suspended"}
    pod = _newest(
        [p for p in pods if (p.get("status") or {}).get("phase") in ("Pending", "Running")]
    )
    if pod is None:
        last = _newest(pods)
        if last is not None and (last.get("status") or {}).get("phase") != "Succeeded":
            return {**base, "phase": "Running", "reason": "Retrying"}
        # No pod yet, or its trainer finished and the Job has yet to say so: nothing new.
        kept = previous or {}
        if kept.get("phase") in ("Pending", "Running") and kept.get("reason") in UNCHANGED:
            return _unchanged(base, kept)
        if last is None:
            return {**base, "phase": "Pending", "reason": "JobCreated"}
        return {**base, "phase": "Running", "reason": "Running"}
    if pod["status"].get("phase") == "Running":
        running: Obj = {**base, "phase": "Running", "reason": "Running"}
        if progress is not None:
            running["progress"] = progress.to_wire()
        if progress_every is not None:
            actions.wake(progress_every)
        return running
    reason, message = _blocked(pod)
    created = times.parse(pod["metadata"].get("creationTimestamp")) or now
    waited = (now - created).total_seconds()
    if reason != "PodPending" and waited >= spec.pre_running_deadline_seconds:
        text = (
            f"pod {pod['metadata']['name']} did not start within "
            f"preRunningDeadlineSeconds={spec.pre_running_deadline_seconds}: {message}"
        )
        actions.fail.append((name, reason, text))
        return {**base, "phase": "Failed", "reason": reason, "message": _cut(text)}
    if reason != "PodPending":  # blocked: fails at its deadline unless its pod changes first
        actions.wake(spec.pre_running_deadline_seconds - waited)
    return {**base, "phase": "Pending", "reason": reason, "message": _cut(message)}


def _unchanged(base: Obj, kept: Obj) -> Obj:
    """``kept`` (the adapter's entry as last written) on ``base``: nothing new to tell."""
    fields = ("phase", "reason", "message", "attempts", "progress")
    return {**base, **{k: kept[k] for k in fields if k in kept}}


def _pod_lags(pods: list[Obj], complete: bool) -> bool:
    """Whether a finished Job's pods are not seen finished yet: the newest one still pending
    or running, or none seen of a Complete Job (whose outcome only its pod has; a failed Job's
    pods may be gone, deleted at its deadline)."""
    newest = _newest(pods)
    return _active(newest) if newest is not None else complete


def _forged(adapter: Adapter, entry: Obj, job: Obj | None, actions: Actions) -> Obj | None:
    """A finished entry without the operator's seal: say so, and tell the caller what to derive
    it from instead (the Job when it exists; else a new Job re-reads the output)."""
    claimed = f"{entry.get('phase')}/{entry.get('reason')}"
    if job is not None:
        source = f"restored from Job {job['metadata']['name']}"
        replacement = None
    else:
        source = "its Job is gone, so a new Job reads the result again from the output"
        replacement = {
            "name": adapter.name,
            "phase": "Pending",
            "reason": "Reverifying",
            "message": f"the finished outcome in the status ({claimed}) was not the operator's; "
            "a new Job reads the result again from the output",
        }
    actions.events.append(
        (
            "Warning",
            "StatusReverted",
            _cut(
                f"status.adapters[{adapter.name}] ({claimed}) was not written by the operator "
                f"and does not count: {source}"
            ),
        )
    )
    return replacement


def _stale(job: Obj, wanted: str | None) -> bool:
    made = (job["metadata"].get("annotations") or {}).get(naming.TEMPLATE_HASH)
    return bool(made and wanted and made != wanted)


def _note_stale(entry: Obj, job: Obj) -> Obj:
    """Say that the spec changed after the Job was made (a Job's pod template is immutable)."""
    name = job["metadata"]["name"]
    if entry["phase"] in FINAL:
        note = (
            f"the spec changed while Job {name} ran: this outcome is of the spec it was made from"
        )
    else:
        note = (
            f"the spec changed after Job {name} was made; a Job's pod cannot change, so it "
            "goes on as made: delete the Job to run the new spec"
        )
    message = f"{entry['message']}; {note}" if entry.get("message") else note
    return {**entry, "message": _cut(message)}


def _active(pod: Obj) -> bool:
    return (pod.get("status") or {}).get("phase") in ("Pending", "Running")


def _blocked(pod: Obj) -> tuple[str, str]:
    """Why a pending pod does not run (Unschedulable, ImagePullBackOff, ...)."""
    status = pod.get("status") or {}
    for condition in status.get("conditions") or []:
        if condition.get("type") == "PodScheduled" and condition.get("status") == "False":
            return condition.get("reason") or "Unschedulable", condition.get("message") or ""
    for container in status.get("containerStatuses") or []:
        waiting = (container.get("state") or {}).get("waiting") or {}
        if waiting.get("reason") in BLOCKING_WAITS:
            return waiting["reason"], waiting.get("message") or ""
    return "PodPending", "the trainer pod is starting"


def _result(outcome: contract.Outcome | None) -> Obj:
    if outcome is None or outcome.kind != "result" or outcome.result is None:
        return {
            "phase": "Failed",
            "reason": "NoResult",
            "message": "the trainer finished without reporting an outcome",
        }
    found = outcome.result
    result = found.to_wire()
    if found.ready:
        return {"phase": "Succeeded", "reason": READY, "result": result}
    message = (
        f"{found.metric} {found.quality_after} did not reach the target "
        f"{found.target} within {found.steps} steps"
    )
    return {"phase": "Failed", "reason": "NotReady", "message": message, "result": result}


def _ttl(job: Obj | None, spec: AdapterMigrationSpec, actions: Actions) -> None:
    """Let the Job's TTL run only now that its outcome is in the status."""
    ttl = spec.ttl_seconds_after_finished
    if job is not None and ttl is not None and job["spec"].get("ttlSecondsAfterFinished") != ttl:
        actions.ttl.append((job["metadata"]["name"], ttl))


def _fraction(adapter: Obj) -> float:
    if adapter.get("phase") in FINAL:
        return 1.0
    progress = adapter.get("progress") or {}
    if progress.get("stage") == "search" and progress.get("trials"):
        return 0.3 * float(progress.get("trial", 0)) / float(progress["trials"])
    if progress.get("stage") == "finetune" and progress.get("maxSteps"):
        return 0.3 + 0.7 * float(progress.get("step", 0)) / float(progress["maxSteps"])
    return 0.0


def _describe(adapter: Obj) -> str:
    text = f"{adapter['name']}: {adapter.get('reason', adapter['phase'])}"
    progress = adapter.get("progress") or {}
    if progress.get("stage") == "search":
        text += f" (search trial {progress.get('trial', 0)}/{progress.get('trials', '?')})"
    elif progress.get("stage") == "finetune":
        text += f" (step {progress.get('step', 0)}/{progress.get('maxSteps', '?')})"
    if adapter.get("message") and (
        adapter.get("phase") == "Failed" or adapter.get("reason") in AFTER_DELETION
    ):
        text += f": {adapter['message']}"
    return text


def _conditions(
    migration: Migration, adapters: list[Obj], phase: str, now: datetime.datetime
) -> list[Obj]:
    spec = migration.spec
    failed = [a for a in adapters if a["phase"] == "Failed"]
    waiting = [a for a in adapters if a["phase"] not in FINAL]
    ready_count = sum(a["phase"] == "Succeeded" for a in adapters)
    summary = f"{ready_count}/{len(adapters)} adapters ready"
    if phase == "Succeeded":
        ready = ("True", "Succeeded", summary)
    elif failed:
        ready = ("False", failed[0]["reason"], f"{summary}; {_describe(failed[0])}")
    elif spec.suspend:
        ready = ("False", "Suspended", f"{summary}; suspended")
    else:
        first = waiting[0] if waiting else adapters[0]
        ready = ("False", first.get("reason") or first["phase"], f"{summary}; {_describe(first)}")
    values = {
        "Ready": ready,
        "Succeeded": ("True", "Succeeded", summary)
        if phase == "Succeeded"
        else ("False", "Failed" if phase == "Failed" else "InProgress", summary),
        "Failed": ("True", failed[0]["reason"], "; ".join(_describe(a) for a in failed))
        if failed
        else ("False", "NoFailure", "no adapter failed"),
        "Stalled": ("True", failed[0]["reason"], "a failed adapter needs a new spec or inputs")
        if failed
        else ("False", "Progressing" if waiting else "Finished", summary),
        "Suspended": ("True", "Suspended", "spec.suspend is true")
        if spec.suspend
        else ("False", "NotSuspended", "spec.suspend is false"),
    }
    previous = {c["type"]: c for c in migration.status.get("conditions") or []}
    conditions = []
    for kind, (status, reason, message) in values.items():
        old = previous.get(kind)
        since = (
            old["lastTransitionTime"] if old and old.get("status") == status else times.stamp(now)
        )
        conditions.append(
            {
                "type": kind,
                "status": status,
                "reason": reason,
                "message": _cut(message),
                "observedGeneration": migration.generation,
                "lastTransitionTime": since,
            }
        )
    return conditions


def observe(
    migration: Migration,
    jobs: list[Obj],
    pods: dict[str, list[Obj]],
    progress: dict[str, AdapterProgress],
    now: datetime.datetime,
    strays: list[Obj] | None = None,
    templates: dict[str, str] | None = None,
    progress_every: float | None = None,
) -> tuple[Obj, Actions]:
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
    previous = {a["name"]: a for a in migration.status.get("adapters") or []}
    adapters = []
    for adapter in migration.spec.adapters:
        job = by_adapter.get(adapter.name)
        job_pods = pods.get(job["metadata"]["name"], []) if job is not None else []
        entry = _adapter_status(
            migration,
            adapter,
            job,
            job_pods,
            previous.get(adapter.name),
            progress.get(adapter.name),
            now,
            actions,
            stray_by_adapter.get(adapter.name, []),
            progress_every,
        )
        wanted = (templates or {}).get(adapter.name)
        if job is not None and entry is not previous.get(adapter.name) and _stale(job, wanted):
            entry = _note_stale(entry, job)
        if entry["phase"] in FINAL:
            seal = seals.sign(migration.seal_key, migration.uid, entry)
            entry = {**entry, seals.SEAL_FIELD: seal}
        adapters.append(entry)
    finished = [a for a in adapters if a["phase"] in FINAL]
    if len(finished) == len(adapters):
        phase = "Succeeded" if all(a["phase"] == "Succeeded" for a in adapters) else "Failed"
    elif migration.spec.suspend:
        phase = "Suspended"
    elif any(a["phase"] in ("Running", "Failed", "Succeeded") for a in adapters):
        phase = "Running"
    else:
        phase = "Pending"
    old = migration.status
    starts = [
        j.get("status", {}).get("startTime") for j in jobs if j.get("status", {}).get("startTime")
    ]
    status: Obj = {
        "observedGeneration": migration.generation,
        "phase": phase,
        "conditions": _conditions(migration, adapters, phase, now),
        "progress": f"{len(finished)}/{len(adapters)}",
        "progressPercent": int(100 * sum(_fraction(a) for a in adapters) / len(adapters)),
        "adapters": adapters,
    }
    start = old.get("startTime") or (min(starts) if starts else None)
    if start:
        status["startTime"] = start
    if phase in FINAL:
        status["completionTime"] = old.get("completionTime") or times.stamp(now)
    _events(old, status, actions)
    return status, actions


def _events(old: Obj, new: Obj, actions: Actions) -> None:
    """One Kubernetes event per adapter or migration transition."""
    before = {a["name"]: (a.get("phase"), a.get("reason")) for a in old.get("adapters") or []}
    for adapter in new["adapters"]:
        key = (adapter.get("phase"), adapter.get("reason"))
        if before.get(adapter["name"]) == key:
            continue
        kind = (
            "Warning"
            if adapter["phase"] == "Failed"
            or adapter.get("reason") in ("Unschedulable", *BLOCKING_WAITS)
            else "Normal"
        )
        actions.events.append((kind, f"Adapter{adapter['phase']}", _cut(_describe(adapter))))
    if old.get("phase") != new["phase"] and new["phase"] in FINAL:
        kind = "Normal" if new["phase"] == "Succeeded" else "Warning"
        ready = next(c for c in new["conditions"] if c["type"] == "Ready")
        actions.events.append((kind, f"Migration{new['phase']}", ready["message"]))
