"""The Job runner: the Job controller and a kubelet that runs pods as local subprocesses.

Job controller (level-based, like the real one): one pod at a time per Job (completions 1,
parallelism 1), status active/succeeded/failed and conditions (SuccessCriteriaMet + Complete,
FailureTarget + Failed with reasons BackoffLimitExceeded, DeadlineExceeded, PodFailurePolicy;
Suspended), backoffLimit, activeDeadlineSeconds, podFailurePolicy (onExitCodes,
onPodConditions; FailJob / Ignore / Count), suspend, ttlSecondsAfterFinished.

Kubelet: a pod's container runs as a subprocess with its command and args, its env (literal,
Secret and ConfigMap keys, fieldRef metadata.name/namespace, envFrom), KUBERNETES_SERVICE_HOST/
PORT pointing at the emulator, and its volumes as local folders: a PVC is ``<workdir>/pvc/CLAIM``,
an emptyDir a per-pod folder, Secrets/ConfigMaps files. Paths under a volume's mountPath (and the
terminationMessagePath) in the command, args, env and workingDir are rewritten to those folders,
except for an emptyDir mounted over a folder this machine has (e.g. /tmp): that one is shared,
so that host paths below it (a virtualenv under /tmp) keep working.
The termination message is read from that file when the process exits.

Fault hooks (Python or POST /sandbox/v1/...): keep matching pods Pending Unschedulable, fail
their image pull, kill a running pod with a DisruptionTarget condition.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import random
import re
import signal
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from relora_sandbox import errors
from relora_sandbox.kinds import Kind
from relora_sandbox.selectors import label_matcher
from relora_sandbox.server import Emulator
from relora_sandbox.store import NAME_CHARS, Obj, now

PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR", "TZ")
MAX_MESSAGE = 4096


@dataclass
class Fault:
    """Pods matching ``label_selector`` (and ``image``, if set) get ``effect``."""

    effect: str  # Unschedulable | ImagePullBackOff
    label_selector: str = ""
    image: str = ""

    def matches(self, pod: Obj) -> bool:
        images = [c.get("image", "") for c in pod["spec"].get("containers", [])]
        if self.image and self.image not in images:
            return False
        return label_matcher(self.label_selector)(pod)


@dataclass
class Running:
    process: asyncio.subprocess.Process | None
    folder: Path
    termination_file: Path
    started: str
    disruption: str | None = None  # reason of a DisruptionTarget kill


def _condition(type_: str, status: str, reason: str = "", message: str = "") -> dict[str, Any]:
    condition = {"type": type_, "status": status, "lastTransitionTime": now()}
    if reason:
        condition["reason"] = reason
    if message:
        condition["message"] = message
    return condition


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


class JobRunner:
    def __init__(
        self,
        emulator: Emulator,
        workdir: Path,
        *,
        image_commands: dict[str, list[str]],
        tick_seconds: float = 0.2,
    ) -> None:
        self.emulator = emulator
        self.workdir = workdir
        self.pvc_root = workdir / "pvc"
        self.image_commands = image_commands
        self.tick_seconds = tick_seconds
        self.faults: list[Fault] = []
        self.api_port = 0  # set by the Sandbox once it listens
        self.running: dict[tuple[str, str], Running] = {}
        self._dirty = asyncio.Event()
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._waiters: set[asyncio.Task[None]] = set()
        self.jobs_kind = emulator.registry.kinds[("batch", "v1", "jobs")]
        self.pods_kind = emulator.registry.kinds[("", "v1", "pods")]
        emulator.log_source = self.logs
        emulator.admin.update(
            {
                ("POST", "/sandbox/v1/faults"): self._http_add_fault,
                ("DELETE", "/sandbox/v1/faults"): self._http_clear_faults,
                ("POST", "/sandbox/v1/kill"): self._http_kill,
                ("POST", "/sandbox/v1/watches/close"): self._http_close_watches,
                ("POST", "/sandbox/v1/history/compact"): self._http_compact,
            }
        )

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
        for key in list(self.running):
            self._kill_process(key)
        for task in list(self._waiters):
            task.cancel()
        for running in self.running.values():
            if running.process is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(running.process.wait(), 5)

    def _on_change(self, type_: str, kind: Kind, obj: Obj, old: Obj | None) -> None:
        if kind.key in (("batch", "jobs"), ("", "pods"), ("", "secrets"), ("", "configmaps")):
            self._dirty.set()
        if kind.key == ("", "pods") and type_ == "DELETED":
            key = (obj["metadata"].get("namespace", ""), obj["metadata"]["name"])
            self._kill_process(key)

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

    # ------------------------------------------------------------------ fault hooks
    def add_fault(self, fault: Fault) -> None:
        self.faults.append(fault)
        self._dirty.set()

    def clear_faults(self) -> None:
        self.faults.clear()
        self._dirty.set()

    def kill(self, namespace: str, pod: str, *, reason: str = "PreemptionByScheduler") -> bool:
        """Kill a running pod as a disruption would (DisruptionTarget condition, exit 137)."""
        running = self.running.get((namespace, pod))
        if running is None:
            return False
        running.disruption = reason
        self._kill_process((namespace, pod), keep=True)
        return True

    async def _http_add_fault(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.add_fault(Fault(body["effect"], body.get("labelSelector", ""), body.get("image", "")))
        return web.json_response({"faults": len(self.faults)})

    async def _http_clear_faults(self, request: web.Request) -> web.StreamResponse:
        self.clear_faults()
        return web.json_response({"faults": 0})

    async def _http_kill(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        killed = self.kill(
            body["namespace"], body["pod"], reason=body.get("reason", "PreemptionByScheduler")
        )
        return web.json_response({"killed": killed}, status=200 if killed else 404)

    async def _http_close_watches(self, request: web.Request) -> web.StreamResponse:
        self.emulator.store.close_watches()
        return web.json_response({"closed": True})

    async def _http_compact(self, request: web.Request) -> web.StreamResponse:
        self.emulator.store.compact()
        return web.json_response({"compacted": self.emulator.store.compacted})

    # ------------------------------------------------------------------ logs
    def logs(self, namespace: str, pod: str) -> str | None:
        path = self.workdir / "pods" / namespace / pod / "log.txt"
        return path.read_text(errors="replace") if path.is_file() else None

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
                self._admit_pod(pod)

    def _write_status(self, kind: Kind, obj: Obj, status: dict[str, Any]) -> None:
        """Write ``status`` unless unchanged; a condition keeps its lastTransitionTime (and
        reason) while its status stays the same, as controllers do."""
        previous = {c["type"]: c for c in (obj.get("status") or {}).get("conditions") or []}
        for condition in status.get("conditions") or []:
            old = previous.get(condition["type"])
            if old is not None and old.get("status") == condition.get("status"):
                condition["lastTransitionTime"] = old.get("lastTransitionTime")
        if status == obj.get("status"):
            return
        body = {
            "metadata": {"resourceVersion": obj["metadata"]["resourceVersion"]},
            "status": status,
        }
        self.emulator.update(
            kind, obj["metadata"].get("namespace", ""), obj["metadata"]["name"], body, status=True
        )

    def _reconcile_job(self, job: Obj, pods: list[Obj]) -> None:
        spec, meta = job["spec"], job["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        status = copy.deepcopy(job.get("status") or {})
        conditions: list[dict[str, Any]] = status.setdefault("conditions", [])
        if _has(job, "Complete") or _has(job, "Failed"):
            ttl = spec.get("ttlSecondsAfterFinished")
            finished = status.get("completionTime") or next(
                (c["lastTransitionTime"] for c in conditions if c["type"] == "Failed"), None
            )
            if ttl is not None and _seconds_since(finished) >= ttl:
                self.emulator.delete(self.jobs_kind, namespace, name, "Background")
            return
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
                conditions.append(_condition("Suspended", "True", "JobSuspended", "Job suspended"))
            status["active"] = 0
            status.pop("startTime", None)
            self._write_status(self.jobs_kind, job, status)
            return
        if _has(job, "Suspended"):
            conditions[:] = [c for c in conditions if c["type"] != "Suspended"]
            conditions.append(_condition("Suspended", "False", "JobResumed", "Job resumed"))
        status.setdefault("startTime", now())
        succeeded = [p for p in pods if p["status"].get("phase") == "Succeeded"]
        failed = [p for p in pods if p["status"].get("phase") == "Failed"]
        counted, fail_job = self._apply_failure_policy(spec, failed)
        status["succeeded"], status["failed"] = len(succeeded), counted
        status["active"] = len(active)
        status["ready"] = len([p for p in active if p["status"].get("phase") == "Running"])
        deadline = spec.get("activeDeadlineSeconds")
        outcome: tuple[str, str] | None = None
        if succeeded:
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
                    _condition(
                        "SuccessCriteriaMet",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    )
                )
                conditions.append(
                    _condition(
                        "Complete",
                        "True",
                        "CompletionsReached",
                        "Reached expected number of succeeded pods",
                    )
                )
                status["completionTime"] = stamp
            else:
                conditions.append(_condition("FailureTarget", "True", *outcome))
                conditions.append(_condition("Failed", "True", *outcome))
            self._write_status(self.jobs_kind, job, status)
            return
        if not active:
            self._create_pod(job)
            status["active"] = 1
        self._write_status(self.jobs_kind, job, status)

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

    def _create_pod(self, job: Obj) -> None:
        meta, template = job["metadata"], job["spec"]["template"]
        pod_meta = copy.deepcopy(template.get("metadata") or {})
        pod = {
            "metadata": {
                "name": f"{meta['name']}-{''.join(random.choices(NAME_CHARS, k=5))}",
                "labels": pod_meta.get("labels", {}),
                "annotations": pod_meta.get("annotations", {}),
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
            "spec": copy.deepcopy(template["spec"]),
        }
        self.emulator.create(self.pods_kind, meta["namespace"], pod)

    # ------------------------------------------------------------------ kubelet
    def _admit_pod(self, pod: Obj) -> None:
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if key in self.running:
            return
        status = copy.deepcopy(pod["status"])
        for fault in self.faults:
            if fault.matches(pod):
                self._write_status(self.pods_kind, pod, _faulted(status, fault, pod))
                return
        try:
            launch = self._prepare(pod)
        except _ConfigError as problem:
            status["conditions"] = [_condition("PodScheduled", "True")]
            status["containerStatuses"] = [
                _waiting(pod, "CreateContainerConfigError", str(problem))
            ]
            self._write_status(self.pods_kind, pod, status)
            return
        if launch is None:
            status.update(phase="Failed", startTime=now())
            status["containerStatuses"] = [
                _terminated(
                    pod,
                    128,
                    "ContainerCannotRun",
                    "no command for image "
                    f"{pod['spec']['containers'][0].get('image')}: give the container a "
                    "command, or map the image with --image",
                    now(),
                    now(),
                )
            ]
            self._write_status(self.pods_kind, pod, status)
            return
        argv, env, cwd, folder, termination = launch
        task = asyncio.get_running_loop().create_task(
            self._run(pod, argv, env, cwd, folder, termination)
        )
        self._waiters.add(task)
        task.add_done_callback(self._waiters.discard)
        self.running[key] = Running(None, folder, termination, now())

    def _prepare(self, pod: Obj) -> tuple[list[str], dict[str, str], Path, Path, Path] | None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        container = pod["spec"]["containers"][0]
        folder = self.workdir / "pods" / namespace / name
        folder.mkdir(parents=True, exist_ok=True)
        mounts = self._mounts(pod, container, folder)
        termination = folder / "termination-log"
        termination.write_text("")
        mounts[container.get("terminationMessagePath", "/dev/termination-log")] = termination
        pattern = re.compile(
            r"(?<![\w.-])("
            + "|".join(re.escape(p.rstrip("/")) for p in sorted(mounts, key=len, reverse=True))
            + r")(?=/|$|[^\w.-])"
        )
        local = {p.rstrip("/"): str(path) for p, path in mounts.items()}

        def rewrite(value: str) -> str:
            return pattern.sub(lambda m: local[m.group(1)], value)

        command = container.get("command")
        if not command:
            command = self.image_commands.get(container.get("image", ""))
            if command is None:
                return None
        argv = [rewrite(a) for a in list(command) + list(container.get("args") or [])]
        env = {k: os.environ[k] for k in PASSED_ENV if k in os.environ}
        env.update(
            HOSTNAME=name,
            KUBERNETES_SERVICE_HOST="127.0.0.1",
            KUBERNETES_SERVICE_PORT=str(self.api_port),
        )
        env.update({k: rewrite(v) for k, v in self._container_env(pod, container).items()})
        cwd = Path(rewrite(container["workingDir"])) if container.get("workingDir") else folder
        return argv, env, cwd, folder, termination

    def _mounts(self, pod: Obj, container: Obj, folder: Path) -> dict[str, Path]:
        namespace = pod["metadata"]["namespace"]
        volumes: dict[str, Path] = {}
        scratch: set[str] = set()
        for volume in pod["spec"].get("volumes") or []:
            name = volume["name"]
            if "emptyDir" in volume:
                scratch.add(name)
            if "persistentVolumeClaim" in volume:
                path = self.pvc_root / volume["persistentVolumeClaim"]["claimName"]
            elif "secret" in volume or "configMap" in volume:
                path = folder / "volumes" / name
                self._project(namespace, volume, path)
            else:  # emptyDir and anything else: a private folder
                path = folder / "volumes" / name
            path.mkdir(parents=True, exist_ok=True)
            volumes[name] = path
        mounts = {}
        for mount in container.get("volumeMounts") or []:
            if mount["name"] in scratch and Path(mount["mountPath"]).exists():
                continue  # scratch over a real folder (/tmp): share it, host paths stay valid
            if mount["name"] in volumes:
                local = volumes[mount["name"]] / mount.get("subPath", "")
                local.mkdir(parents=True, exist_ok=True)
                mounts[mount["mountPath"]] = local
        return mounts

    def _project(self, namespace: str, volume: Obj, path: Path) -> None:
        path.mkdir(parents=True, exist_ok=True)
        if "secret" in volume:
            obj = self._lookup("secrets", namespace, volume["secret"]["secretName"], False)
            data = {k: base64.b64decode(v) for k, v in (obj or {}).get("data", {}).items()}
        else:
            obj = self._lookup("configmaps", namespace, volume["configMap"]["name"], False)
            data = {k: v.encode() for k, v in (obj or {}).get("data", {}).items()}
        for key, value in data.items():
            (path / key).write_bytes(value)

    def _lookup(self, plural: str, namespace: str, name: str, optional: bool) -> Obj | None:
        kind = self.emulator.registry.kinds[("", "v1", plural)]
        found = self.emulator.store.find(kind, namespace, name)
        if found is None and not optional:
            raise _ConfigError(f'{plural[:-1]} "{name}" not found')
        return found

    def _container_env(self, pod: Obj, container: Obj) -> dict[str, str]:
        namespace = pod["metadata"]["namespace"]
        env: dict[str, str] = {}
        for source in container.get("envFrom") or []:
            prefix = source.get("prefix", "")
            if "secretRef" in source:
                ref = source["secretRef"]
                obj = self._lookup("secrets", namespace, ref["name"], ref.get("optional", False))
                for key, value in (obj or {}).get("data", {}).items():
                    env[prefix + key] = base64.b64decode(value).decode()
            elif "configMapRef" in source:
                ref = source["configMapRef"]
                obj = self._lookup("configmaps", namespace, ref["name"], ref.get("optional", False))
                for key, value in (obj or {}).get("data", {}).items():
                    env[prefix + key] = value
        for variable in container.get("env") or []:
            if "value" in variable:
                env[variable["name"]] = str(variable["value"])
                continue
            source = variable.get("valueFrom") or {}
            if "secretKeyRef" in source:
                ref = source["secretKeyRef"]
                obj = self._lookup("secrets", namespace, ref["name"], ref.get("optional", False))
                data = (obj or {}).get("data", {})
                if ref["key"] in data:
                    env[variable["name"]] = base64.b64decode(data[ref["key"]]).decode()
                elif not ref.get("optional"):
                    raise _ConfigError(
                        f"couldn't find key {ref['key']} in Secret {namespace}/{ref['name']}"
                    )
            elif "configMapKeyRef" in source:
                ref = source["configMapKeyRef"]
                obj = self._lookup("configmaps", namespace, ref["name"], ref.get("optional", False))
                data = (obj or {}).get("data", {})
                if ref["key"] in data:
                    env[variable["name"]] = data[ref["key"]]
                elif not ref.get("optional"):
                    raise _ConfigError(
                        f"couldn't find key {ref['key']} in ConfigMap {namespace}/{ref['name']}"
                    )
            elif "fieldRef" in source:
                path = source["fieldRef"]["fieldPath"]
                node: Any = pod
                for part in path.split("."):
                    node = node.get(part, "") if isinstance(node, dict) else ""
                env[variable["name"]] = str(node)
        return env

    async def _run(
        self,
        pod: Obj,
        argv: list[str],
        env: dict[str, str],
        cwd: Path,
        folder: Path,
        termination: Path,
    ) -> None:
        namespace, name = pod["metadata"]["namespace"], pod["metadata"]["name"]
        key = (namespace, name)
        log = (folder / "log.txt").open("ab")
        try:
            process = await asyncio.create_subprocess_exec(
                *argv, env=env, cwd=cwd, stdout=log, stderr=log, start_new_session=True
            )
        except OSError as error:
            log.close()
            self.running.pop(key, None)
            self._finish(pod, 128, "StartError", f"cannot start {argv[0]}: {error.strerror}")
            return
        self.running[key].process = process
        started = self.running[key].started
        self._mark_running(key, started)
        code = await process.wait()
        log.close()
        running = self.running.pop(key, None)
        message = (
            termination.read_text(errors="replace")[-MAX_MESSAGE:] if termination.is_file() else ""
        )
        disruption = running.disruption if running else None
        self._finish(
            pod,
            code if code >= 0 else 128 - code,
            "Completed" if code == 0 else "Error",
            message,
            disruption=disruption,
            started=started,
        )

    def _mark_running(self, key: tuple[str, str], started: str) -> None:
        pod = self.emulator.store.find(self.pods_kind, *key)
        if pod is None:
            return
        status = copy.deepcopy(pod["status"])
        status.update(phase="Running", startTime=started, hostIP="127.0.0.1", podIP="127.0.0.1")
        status["conditions"] = [
            _condition(t, "True")
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]
        status["containerStatuses"] = [
            _container_status(pod, {"running": {"startedAt": started}}, running=True)
        ]
        self._write_status(self.pods_kind, pod, status)

    def _finish(
        self,
        pod: Obj,
        code: int,
        reason: str,
        message: str,
        *,
        disruption: str | None = None,
        started: str | None = None,
    ) -> None:
        current = self.emulator.store.find(
            self.pods_kind, pod["metadata"]["namespace"], pod["metadata"]["name"]
        )
        if current is None:
            return  # deleted while running
        status = copy.deepcopy(current["status"])
        status["phase"] = "Succeeded" if code == 0 and disruption is None else "Failed"
        conditions = [
            c
            for c in status.get("conditions") or []
            if c["type"] not in ("Ready", "ContainersReady")
        ]
        conditions += [
            _condition("Ready", "False", "PodCompleted"),
            _condition("ContainersReady", "False", "PodCompleted"),
        ]
        if disruption is not None:
            conditions.append(
                _condition(
                    "DisruptionTarget",
                    "True",
                    disruption,
                    "the pod was killed by the sandbox's fault injection",
                )
            )
        status["conditions"] = conditions
        status["containerStatuses"] = [
            _terminated(current, code, reason, message, started or now(), now())
        ]
        self._write_status(self.pods_kind, current, status)

    def _kill_process(self, key: tuple[str, str], *, keep: bool = False) -> None:
        running = self.running.get(key)
        if running is None or running.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.process.pid, signal.SIGKILL)
        if not keep:
            running.disruption = None


def _stored(store: Any, kind: Kind) -> list[Obj]:
    return [obj for _, obj in sorted(store.table(kind).items())]


class _ConfigError(Exception):
    """A pod's env or volumes refer to a missing Secret/ConfigMap (CreateContainerConfigError)."""


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


def _container_status(pod: Obj, state: dict[str, Any], *, running: bool = False) -> Obj:
    """The status of a pod's (only) container in ``state`` (running, waiting, terminated)."""
    container = pod["spec"]["containers"][0]
    return {
        "name": container["name"],
        "image": container.get("image", ""),
        "imageID": "",
        "ready": running,
        "started": running,
        "restartCount": 0,
        "state": state,
    }


def _waiting(pod: Obj, reason: str, message: str) -> Obj:
    return _container_status(pod, {"waiting": {"reason": reason, "message": message}})


def _terminated(pod: Obj, code: int, reason: str, message: str, started: str, finished: str) -> Obj:
    terminated = {"exitCode": code, "reason": reason, "startedAt": started, "finishedAt": finished}
    if message:
        terminated["message"] = message
    return _container_status(pod, {"terminated": terminated})


def _faulted(status: Obj, fault: Fault, pod: Obj) -> Obj:
    if fault.effect == "Unschedulable":
        status["conditions"] = [
            _condition(
                "PodScheduled",
                "False",
                "Unschedulable",
                "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes "
                "are available: 1 No preemption victims found for incoming pod.",
            )
        ]
        return status
    image = pod["spec"]["containers"][0].get("image", "")
    status["conditions"] = [_condition("PodScheduled", "True")]
    status["containerStatuses"] = [
        _waiting(pod, "ImagePullBackOff", f'Back-off pulling image "{image}"')
    ]
    return status
