"""The kubelet: a pod's container runs as a subprocess with its command and args, its env
(literal, Secret and ConfigMap keys, fieldRef metadata.name/namespace, envFrom),
KUBERNETES_SERVICE_HOST/PORT pointing at the emulator, and its volumes as local folders: a PVC is
``<workdir>/pvc/CLAIM``, an emptyDir a per-pod folder, Secrets/ConfigMaps files. Paths under a
volume's mountPath (and the terminationMessagePath) in the command, args, env and workingDir are
rewritten to those folders, except for an emptyDir mounted over a folder this machine has (e.g.
/tmp): that one is shared, so that host paths below it (a virtualenv under /tmp) keep working.
The termination message is read from that file when the process exits; the output goes to the
pod's log. ``$(VAR)`` in the command and args is replaced by the container's variable VAR, as
the kubelet does; fieldRef reads metadata.annotations['KEY'] and metadata.labels['KEY'] too.

No DNS here: every pod runs on 127.0.0.1. A variable whose value names a pod in a Service's
subdomain (``<host>.<service>[.<namespace>.svc...]``, e.g. an Indexed Job's worker 0 as
MASTER_ADDR) is rewritten to 127.0.0.1; and since every group of workers shares that address,
MASTER_PORT is rewritten to a free local port chosen once per group (the pod's subdomain, else
the pod alone), so that two groups running at once do not meet on one port.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from relora_sandbox.faults import Fault, disruption_target, faulted
from relora_sandbox.server import Emulator
from relora_sandbox.status import (
    container_status,
    new_condition,
    terminated_status,
    waiting_status,
    write_status,
)
from relora_sandbox.store import Obj, now

PASSED_ENV = ("PATH", "HOME", "LANG", "LC_ALL", "PYTHONPATH", "VIRTUAL_ENV", "TMPDIR", "TZ")
MAX_MESSAGE = 4096


@dataclass
class Running:
    process: asyncio.subprocess.Process | None
    folder: Path
    termination_file: Path
    started: str
    disruption: str | None = None  # reason of a DisruptionTarget kill


class Kubelet:
    """Runs the pods the Job runner admits as local subprocesses, in ``<workdir>/pods``."""

    def __init__(
        self, emulator: Emulator, workdir: Path, *, image_commands: dict[str, list[str]]
    ) -> None:
        self.emulator = emulator
        self.workdir = workdir
        self.pvc_root = workdir / "pvc"
        self.image_commands = image_commands
        self.api_port = 0  # set by the Sandbox once it listens
        self.running: dict[tuple[str, str], Running] = {}
        self.ports: dict[tuple[str, str], str] = {}  # (namespace, group) -> its MASTER_PORT
        self._waiters: set[asyncio.Task[None]] = set()
        self.pods_kind = emulator.registry.kinds[("", "v1", "pods")]

    # ------------------------------------------------------------------ lifecycle
    async def stop(self) -> None:
        """Kill every pod process and wait for them."""
        for key in list(self.running):
            self.kill_process(key)
        for task in list(self._waiters):
            task.cancel()
        for running in self.running.values():
            if running.process is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(running.process.wait(), 5)

    # ------------------------------------------------------------------ logs
    def logs(self, namespace: str, pod: str) -> str | None:
        path = self.workdir / "pods" / namespace / pod / "log.txt"
        return path.read_text(errors="replace") if path.is_file() else None

    def log_age(self, namespace: str, pod: str) -> float | None:
        """Seconds since the pod's log was last written (None: no log)."""
        path = self.workdir / "pods" / namespace / pod / "log.txt"
        try:
            return max(time.time() - path.stat().st_mtime, 0.0)
        except OSError:
            return None

    # ------------------------------------------------------------------ pods
    def admit_pod(self, pod: Obj, faults: list[Fault]) -> None:
        """Start a Pending pod's process, unless a fault holds it or it cannot run."""
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        if key in self.running:
            return
        status = copy.deepcopy(pod["status"])
        for fault in faults:
            if fault.matches(pod):
                write_status(self.emulator, self.pods_kind, pod, faulted(status, fault, pod))
                return
        try:
            launch = self._prepare(pod)
        except _ConfigError as problem:
            status["conditions"] = [new_condition("PodScheduled", "True")]
            status["containerStatuses"] = [
                waiting_status(pod, "CreateContainerConfigError", str(problem))
            ]
            write_status(self.emulator, self.pods_kind, pod, status)
            return
        if launch is None:
            status.update(phase="Failed", startTime=now())
            status["containerStatuses"] = [
                terminated_status(
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
            write_status(self.emulator, self.pods_kind, pod, status)
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
        own = {k: rewrite(v) for k, v in self._container_env(pod, container).items()}
        own = self._localize(pod, own)
        env.update(own)
        argv = [_expand(a, own) for a in argv]
        cwd = Path(rewrite(container["workingDir"])) if container.get("workingDir") else folder
        return argv, env, cwd, folder, termination

    def _localize(self, pod: Obj, env: dict[str, str]) -> dict[str, str]:
        """Service subdomain addresses -> 127.0.0.1; MASTER_PORT -> the group's local port."""
        namespace = pod["metadata"]["namespace"]
        kind = self.emulator.registry.kinds[("", "v1", "services")]
        out = dict(env)
        for key, value in env.items():
            parts = value.split(".")
            addressed = len(parts) == 2 or (len(parts) > 3 and parts[3] == "svc")
            if addressed and self.emulator.store.find(kind, namespace, parts[1]) is not None:
                out[key] = "127.0.0.1"
        if "MASTER_PORT" in out:
            group = pod["spec"].get("subdomain") or pod["metadata"]["name"]
            port = self.ports.get((namespace, group))
            if port is None:
                with socket.socket() as probe:
                    probe.bind(("127.0.0.1", 0))
                    port = str(probe.getsockname()[1])
                self.ports[(namespace, group)] = port
            out["MASTER_PORT"] = port
        return out

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
                keyed = re.fullmatch(r"metadata\.(annotations|labels)\['(.+)'\]", path)
                node: Any = pod
                if keyed:
                    node = (pod["metadata"].get(keyed.group(1)) or {}).get(keyed.group(2), "")
                else:
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
            new_condition(t, "True")
            for t in ("PodScheduled", "Initialized", "ContainersReady", "Ready")
        ]
        status["containerStatuses"] = [
            container_status(pod, {"running": {"startedAt": started}}, running=True)
        ]
        write_status(self.emulator, self.pods_kind, pod, status)

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
            new_condition("Ready", "False", "PodCompleted"),
            new_condition("ContainersReady", "False", "PodCompleted"),
        ]
        if disruption is not None:
            conditions.append(disruption_target(disruption))
        status["conditions"] = conditions
        status["containerStatuses"] = [
            terminated_status(current, code, reason, message, started or now(), now())
        ]
        write_status(self.emulator, self.pods_kind, current, status)

    def kill_process(self, key: tuple[str, str], *, keep: bool = False) -> None:
        running = self.running.get(key)
        if running is None or running.process is None:
            return
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(running.process.pid, signal.SIGKILL)
        if not keep:
            running.disruption = None


def _expand(value: str, env: dict[str, str]) -> str:
    """``$(VAR)`` -> the container's VAR (left as is when it has none); ``$$`` -> ``$``."""
    return re.sub(
        r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: "$" if m.group(0) == "$$" else env.get(m.group(1), m.group(0)),
        value,
    )


class _ConfigError(Exception):
    """A pod's env or volumes refer to a missing Secret/ConfigMap (CreateContainerConfigError)."""
