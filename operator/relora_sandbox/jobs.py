"""The Job runner: the batch/v1 Job controller, with a kubelet (relora_sandbox.kubelet) that runs
its pods as local subprocesses and the fault hooks (relora_sandbox.faults).

Job controller (level-based, like the real one): one pod at a time per Job (completions 1,
parallelism 1), or an Indexed Job's pods (completionMode Indexed: one pod per index up to
parallelism, each with its index in the annotation and label
batch.kubernetes.io/job-completion-index, the env JOB_COMPLETION_INDEX and the hostname
``<job>-<index>``; Complete once every index succeeded), status active/succeeded/failed and
conditions (SuccessCriteriaMet + Complete,
FailureTarget + Failed with reasons BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy;
Suspended), backoffLimit, activeDeadlineSeconds, podFailurePolicy (onExitCodes,
onPodConditions; FailJob / Ignore / Count), suspend, ttlSecondsAfterFinished.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import random
import sys
from pathlib import Path
from typing import Any

from relora_sandbox import errors
from relora_sandbox.faults import Fault, FaultHooks
from relora_sandbox.kinds import Kind
from relora_sandbox.kubelet import Kubelet
from relora_sandbox.server import Emulator
from relora_sandbox.status import new_condition, write_status
from relora_sandbox.store import NAME_CHARS, Obj, now

INDEX = "batch.kubernetes.io/job-completion-index"


def _has(obj: Obj, type_: str) -> bool:
    return any(
        c.get("type") == type_ and c.get("status") == "True"
        for c in (obj.get("status") or {}).get("conditions") or []
    )


def _seconds_since(timestamp: str | None) -> float:
    import datetime

    if not timestamp:
        return 0.0
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    return (datetime.datetime.now(datetime.UTC) - then).total_seconds()


class JobRunner(FaultHooks):
    """The Job controller; its pods run on ``kubelet``, its fault hooks come from FaultHooks."""

    def __init__(
        self,
        emulator: Emulator,
        workdir: Path,
        *,
        image_commands: dict[str, list[str]],
        tick_seconds: float = 0.2,
    ) -> None:
        self.emulator = emulator
        self.kubelet = Kubelet(emulator, workdir, image_commands=image_commands)
        self.tick_seconds = tick_seconds
        self.faults: list[Fault] = []
        self._dirty = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self.jobs_kind = emulator.registry.kinds[("batch", "v1", "jobs")]
        self.pods_kind = emulator.registry.kinds[("", "v1", "pods")]

    @property
    def workdir(self) -> Path:
        return self.kubelet.workdir

    @property
    def pvc_root(self) -> Path:
        """Where PVC claims are: ``<workdir>/pvc/CLAIM``."""
        return self.kubelet.pvc_root

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> None:
        self.emulator.store.listeners.append(self._on_change)
        self._task = asyncio.get_running_loop().create_task(self._loop())

    async def stop(self) -> None:
        # A flag, not Task.cancel(): Python 3.11's wait_for can swallow a cancellation.
        self._stopping = True
        self._dirty.set()
        if self._task is not None:
            await self._task
        await self.kubelet.stop()

    def _on_change(self, type_: str, kind: Kind, obj: Obj, old: Obj | None) -> None:
        if kind.key in (("batch", "jobs"), ("", "pods"), ("", "secrets"), ("", "configmaps")):
            self._dirty.set()
        if kind.key == ("", "pods") and type_ == "DELETED":
            key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            self.kubelet.kill_process(key)

    async def _loop(self) -> None:
        while not self._stopping:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._dirty.wait(), self.tick_seconds)
            self._dirty.clear()
            if self._stopping:
                return
            try:
                self.reconcile()
            except errors.APIError:
                self._dirty.set()  # a write raced with another one: try again
            except Exception as error:
                print(f"relora-sandbox: job runner error: {error!r}", file=sys.stderr)

    # ------------------------------------------------------------------ reconcile
    def reconcile(self) -> None:
        # The stored objects themselves, read only (every write below stores a new object):
        # copying every Job and pod on each pass made the runner quadratic in the Jobs it ran.
        jobs = _stored(self.emulator.store, self.jobs_kind)
        pods = _stored(self.emulator.store, self.pods_kind)
        by_owner: dict[str, list[Obj]] = {}
        for pod in pods:
            for ref in pod["metadata"].get("ownerReferences") or []:
                if ref.get("kind") == "Job" and ref.get("controller"):
                    by_owner.setdefault(ref["uid"], []).append(pod)
        for job in jobs:
            self._reconcile_job(job, by_owner.get(job["metadata"]["uid"], []))
        for pod in pods:
            if pod["status"].get("phase") == "Pending" and not pod["metadata"].get(
                "deletionTimestamp"
            ):
                self.kubelet.admit_pod(pod, self.faults)

    def _reconcile_job(self, job: Obj, pods: list[Obj]) -> None:
        spec, meta = job["spec"], job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        if _has(job, "Complete") or _has(job, "Failed"):  # read in place: most Jobs, each pass
            ttl = spec.get("ttlSecondsAfterFinished")
            if ttl is None:
                return
            stored = job.get("status") or {}
            finished = stored.get("completionTime") or next(
                (
                    c["lastTransitionTime"]
                    for c in stored.get("conditions") or []
                    if c["type"] == "Failed"
                ),
                None,
            )
            if _seconds_since(finished) >= ttl:
                self.emulator.delete(self.jobs_kind, namespace, name, "Background")
            return
        status = copy.deepcopy(job.get("status") or {})
        conditions: list[dict[str, Any]] = status.setdefault("conditions", [])
        active = [
            p
            for p in pods
            if p["status"].get("phase") in ("Pending", "Running")
            and not p["metadata"].get("deletionTimestamp")
        ]
        if spec.get("suspend"):
            for pod in active:
                self.emulator.delete(
                    self.pods_kind, namespace, pod["metadata"]["name"], "Background"
                )
            if not _has(job, "Suspended"):
                conditions[:] = [c for c in conditions if c["type"] != "Suspended"]
                conditions.append(
                    new_condition("Suspended", "True", "JobSuspended", "Job suspended")
                )
            status["active"] = 0
            status.pop("startTime", None)
            write_status(self.emulator, self.jobs_kind, job, status)
            return
        if _has(job, "Suspended"):
            conditions[:] = [c for c in conditions if c["type"] != "Suspended"]
            conditions.append(new_condition("Suspended", "False", "JobResumed", "Job resumed"))
        status.setdefault("startTime", now())
        succeeded = [p for p in pods if p["status"].get("phase") == "Succeeded"]
        failed = [p for p in pods if p["status"].get("phase") == "Failed"]
        counted, fail_job = self._apply_failure_policy(spec, failed)
        status["succeeded"], status["failed"] = len(succeeded), counted
        status["active"] = len(active)
        status["ready"] = len([p for p in active if p["status"].get("phase") == "Running"])
        deadline = spec.get("activeDeadlineSeconds")
        indexed = spec.get("completionMode") == "Indexed"
        completions = int(spec.get("completions") or 1)
        done = {i for i in (_pod_index(p) for p in succeeded) if i is not None}
        if indexed:
            status["completedIndexes"] = ",".join(str(i) for i in sorted(done))
        outcome: tuple[str, str] | None = None
        if (len(done) >= completions) if indexed else succeeded:
            outcome = ("Complete", "")
        elif fail_job is not None:
            outcome = ("PodFailurePolicy", fail_job)
        elif counted > spec.get("backoffLimit", 6):
            outcome = ("BackoffLimitExceeded", "Job has reached the specified backoff limit")
        elif deadline is not None and _seconds_since(status["startTime"]) >= deadline:
            outcome = ("DeadlineExceeded", "Job was active longer than specified deadline")
        if outcome is not None:
            for pod in active:
                self.emulator.delete(
                    self.pods_kind, namespace, pod["metadata"]["name"], "Background"
                )
            status["active"], status["ready"] = 0, 0
            stamp = now()
            if outcome[0] == "Complete":
                conditions.append(
                    new_condition(
                        "SuccessCriteriaMet",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    )
                )
                conditions.append(
                    new_condition(
                        "Complete",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    )
                )
                status["completionTime"] = stamp
            else:
                conditions.append(new_condition("FailureTarget", "True", *outcome))
                conditions.append(new_condition("Failed", "True", *outcome))
            write_status(self.emulator, self.jobs_kind, job, status)
            return
        if indexed:
            running = {_pod_index(p) for p in active}
            wanted = [i for i in range(completions) if i not in done and i not in running]
            room = int(spec.get("parallelism") or 1) - len(active)
            for index in wanted[: max(room, 0)]:
                self._create_pod(job, index)
                status["active"] += 1
        elif not active:
            self._create_pod(job)
            status["active"] = 1
        write_status(self.emulator, self.jobs_kind, job, status)

    def _apply_failure_policy(self, spec: Obj, failed: list[Obj]) -> tuple[int, str | None]:
        """Failed pods that count toward backoffLimit, and a FailJob message if a rule says so."""
        rules = (spec.get("podFailurePolicy") or {}).get("rules") or []
        counted = 0
        for pod in sorted(failed, key=lambda p: p["metadata"]["creationTimestamp"]):
            action, message = "Count", ""
            for index, rule in enumerate(rules):
                matched = _rule_matches(rule, pod)
                if matched is not None:
                    action = rule["action"]
                    message = (
                        f"{matched} for pod {pod['metadata']['namespace']}/"
                        f"{pod['metadata']['name']} matching {action} rule at index {index}"
                    )
                    break
            if action == "FailJob":
                return counted + 1, message
            if action != "Ignore":
                counted += 1
        return counted, None

    def _create_pod(self, job: Obj, index: int | None = None) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        pod_meta = copy.deepcopy(template.get("metadata") or {})
        pod_spec = copy.deepcopy(template["spec"])
        labels, annotations = pod_meta.get("labels", {}), pod_meta.get("annotations", {})
        stem = meta["name"]
        if index is not None:  # as the real Job controller does for an Indexed Job
            stem = f"{meta['name']}-{index}"
            labels[INDEX] = annotations[INDEX] = str(index)
            pod_spec["hostname"] = stem
            for container in pod_spec.get("containers") or []:
                env = container.setdefault("env", [])
                if not any(v.get("name") == "JOB_COMPLETION_INDEX" for v in env):
                    path = {"fieldPath": f"metadata.annotations['{INDEX}']"}
                    variable = {"name": "JOB_COMPLETION_INDEX", "valueFrom": {"fieldRef": path}}
                    env.insert(0, variable)
        pod = {
            "metadata": {
                "name": f"{stem}-{''.join(random.choices(NAME_CHARS, k=5))}",
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [
                    {
                        "apiVersion": "batch/v1",
                        "kind": "Job",
                        "name": meta["name"],
                        "uid": meta["uid"],
                        "controller": True,
                        "blockOwnerDeletion": True,
                    }
                ],
            },
            "spec": pod_spec,
        }
        self.emulator.create(self.pods_kind, meta["namespace"], pod)


def _pod_index(pod: Obj) -> int | None:
    value = (pod["metadata"].get("annotations") or {}).get(INDEX, "")
    return int(value) if str(value).isdigit() else None


def _stored(store: Any, kind: Kind) -> list[Obj]:
    return [obj for _, obj in sorted(store.table(kind).items())]


def _rule_matches(rule: Obj, pod: Obj) -> str | None:
    """A description of why ``rule`` matches the failed ``pod``, or None."""
    on_codes = rule.get("onExitCodes")
    if on_codes:
        for status in pod["status"].get("containerStatuses") or []:
            if on_codes.get("containerName") not in (None, status["name"]):
                continue
            terminated = status.get("state", {}).get("terminated")
            if terminated is None or terminated["exitCode"] == 0:
                continue
            inside = terminated["exitCode"] in on_codes.get("values", [])
            if inside == (on_codes.get("operator", "In") == "In"):
                return f"Container {status['name']} failed with exit code {terminated['exitCode']}"
    for pattern in rule.get("onPodConditions") or []:
        for condition in pod["status"].get("conditions") or []:
            if condition["type"] == pattern["type"] and condition["status"] == pattern.get(
                "status", "True"
            ):
                return f"Pod has condition {pattern['type']}"
    return None
