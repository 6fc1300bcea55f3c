"""What the fault-injection tests share: the operator as a process, the trainer stand-in, and
a few typed views of the sandbox's objects (plain dicts, as they are on the wire)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import urllib.request
from pathlib import Path
from typing import Any, ClassVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from relora_operator import seals
from relora_sandbox import processes
from tests.conftest import untyped, wait_for

GROUP, VERSION, PLURAL = "relora.dev", "v1alpha1", "adaptermigrations"
CRD_FILE = Path(__file__).parent.parent / "crds" / "adaptermigrations.relora.dev.yaml"
FAKE_TRAINER = Path(__file__).parent / "fake_trainer.py"
FINAL = ("Succeeded", "Failed")
SEAL_KEY = "relora-fault-tests-seal-key-0123456789"  # one key across operator restarts
Obj = dict[str, Any]


class OperatorProcess:
    """`python -m relora_operator` watching one namespace: started, SIGKILLed, restarted.

    ``started`` holds the processes started during the current test (tests/conftest.py empties
    it before each): a failing test shows their logs (pytest_runtest_makereport)."""

    started: ClassVar[list[OperatorProcess]] = []

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        logs: Path,
        *,
        trainer: list[str] | None = None,
        env: dict[str, str] | None = None,
    ) -> None:
        self.kubeconfig, self.namespace, self.logs = kubeconfig, namespace, logs
        self.extra_env = env or {}
        self.trainer = trainer or [sys.executable, "-m", "relora_trainer.job"]
        self.metrics_port = processes.free_port()
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self) -> None:
        liveness = processes.free_port()
        env = {
            **os.environ,
            "KUBECONFIG": str(self.kubeconfig),
            "RELORA_TRAINER_COMMAND": json.dumps(self.trainer),
            "RELORA_RESYNC_SECONDS": "1",
            "RELORA_METRICS_PORT": str(self.metrics_port),
            seals.KEY_ENV: SEAL_KEY,
            **self.extra_env,
        }
        argv = [
            sys.executable,
            "-m",
            "relora_operator",
            "--namespace",
            self.namespace,
            f"--liveness={processes.liveness_url(liveness)}",
        ]
        with self.logs.open("ab") as log:
            log.write(f"---- start {self.starts + 1}\n".encode())
        self.starts += 1
        if self not in OperatorProcess.started:
            OperatorProcess.started.append(self)
        self.process = processes.start_live(argv, env=env, log=self.logs, liveness_port=liveness)

    @property
    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def kill(self) -> None:
        """SIGKILL: no cleanup handler runs, as when a node dies or the OOM killer strikes."""
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> None:
        if self.process is not None:
            processes.stop(self.process)

    def tail(self, characters: int = 3000) -> str:
        return self.logs.read_text(errors="replace")[-characters:]

    def metrics(self) -> str:
        """The Prometheus exposition text of the operator's metrics endpoint."""
        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as response:
            return str(response.read().decode())

    def metric(self, line_start: str) -> float:
        """The value of the first metric sample whose line starts with ``line_start``."""
        for line in self.metrics().splitlines():
            if line.startswith(line_start):
                return float(line.rsplit(" ", 1)[1])
        return 0.0


class Trainers:
    """Drives the stand-in trainer pods (tests/fake_trainer.py) through a control folder."""

    def __init__(self, control: Path) -> None:
        self.control = control
        control.mkdir(parents=True, exist_ok=True)

    def attempts(self, adapter: str) -> list[str]:
        """Names of the pods that started a trainer for ``adapter``, oldest first."""
        folder = self.control / adapter
        found = sorted(folder.glob("*.pid"), key=lambda p: p.stat().st_mtime_ns)
        return [p.stem for p in found]

    def wait_started(self, adapter: str, count: int = 1, timeout: float = 30.0) -> list[str]:
        """Wait until ``count`` trainers of ``adapter`` have started; their pod names."""
        found: list[str] = wait_for(
            lambda: len(pods := self.attempts(adapter)) >= count and pods,
            timeout=timeout,
            what=f"{count} trainer(s) of {adapter} started",
        )
        return found

    def spec(self, adapter: str, pod: str) -> Obj:
        """The spec the trainer of ``pod`` was given (RELORA_MIGRATION)."""
        found: Obj = json.loads((self.control / adapter / f"{pod}.spec.json").read_text())
        return found

    def pid(self, adapter: str, pod: str) -> int:
        return int((self.control / adapter / f"{pod}.pid").read_text())

    def release(self, adapter: str, action: str = "ready") -> None:
        folder = self.control / adapter
        folder.mkdir(parents=True, exist_ok=True)
        partial = folder / "release.partial"
        partial.write_text(action)
        partial.replace(folder / "release")


def process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (exited, not reaped yet) is not alive.
    stat = Path(f"/proc/{pid}/stat")
    return not (stat.is_file() and stat.read_text().split(") ")[-1].startswith("Z"))


def fake_manifest(
    name: str, namespace: str, adapters: list[str], trainers: Trainers, **spec: Any
) -> Obj:
    """An AdapterMigration for the stand-in trainer (its URIs are never read)."""
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterMigration",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "sourceModel": {"uri": "pvc://models/v1"},
            "targetModel": {"uri": "pvc://models/v2"},
            "adapters": [
                {
                    "name": adapter,
                    "uri": f"pvc://adapters/{adapter}",
                    "data": {
                        "train": f"pvc://data/{adapter}/train.jsonl",
                        "validation": f"pvc://data/{adapter}/validation.jsonl",
                    },
                    "readiness": {"target": 0.9},
                }
                for adapter in adapters
            ],
            "output": {"uri": f"pvc://out/{namespace}/{name}"},
            "env": [{"name": "FAKE_TRAINER_CONTROL", "value": str(trainers.control)}],
            **spec,
        },
    }


class Cluster:
    """The test namespace through the kubernetes client, objects as plain dicts."""

    def __init__(self, api: Any, namespace: str) -> None:
        self.api, self.namespace = api, namespace
        self.custom = untyped(client.CustomObjectsApi(api))
        self.batch = untyped(client.BatchV1Api(api))
        self.core = untyped(client.CoreV1Api(api))

    def _plain(self, value: Any) -> Any:
        return self.api.sanitize_for_serialization(value)

    # ------------------------------------------------------------ AdapterMigrations
    def create(self, manifest: Obj) -> Obj:
        created: Obj = self.custom.create_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, manifest
        )
        return created

    def find(self, name: str) -> Obj | None:
        try:
            found: Obj = self.custom.get_namespaced_custom_object(
                GROUP, VERSION, self.namespace, PLURAL, name
            )
        except ApiException as error:
            if error.status == 404:
                return None
            raise
        return found

    def get(self, name: str) -> Obj:
        found = self.find(name)
        assert found is not None, f"{name} not found"
        return found

    def patch(self, name: str, patch: Obj) -> Obj:
        patched: Obj = self.custom.patch_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, patch
        )
        return patched

    def delete(self, name: str, policy: str | None = None) -> None:
        body = {"propagationPolicy": policy} if policy else None
        self.custom.delete_namespaced_custom_object(
            GROUP, VERSION, self.namespace, PLURAL, name, body=body
        )

    def status(self, name: str) -> Obj:
        status: Obj = self.get(name).get("status") or {}
        return status

    def adapter(self, name: str, adapter: str) -> Obj:
        for entry in self.status(name).get("adapters") or []:
            if entry["name"] == adapter:
                found: Obj = entry
                return found
        return {}

    def condition(self, name: str, kind: str) -> Obj:
        for condition in self.status(name).get("conditions") or []:
            if condition["type"] == kind:
                found: Obj = condition
                return found
        return {}

    def wait_phase(self, name: str, *phases: str, timeout: float = 60.0) -> Obj:
        def reached() -> Obj | None:
            found = self.get(name)
            return found if (found.get("status") or {}).get("phase") in phases else None

        found: Obj = wait_for(reached, timeout=timeout, what=f"{name} in {phases}")
        return found

    def wait_adapter(self, name: str, adapter: str, *reasons: str, timeout: float = 60.0) -> Obj:
        def reached() -> Obj | None:
            entry = self.adapter(name, adapter)
            return entry if entry.get("reason") in reasons else None

        found: Obj = wait_for(reached, timeout=timeout, what=f"{name}/{adapter} in {reasons}")
        return found

    # ------------------------------------------------------------ Jobs and pods
    def jobs(self, migration: str | None = None) -> list[Obj]:
        selector = f"relora.dev/migration={migration}" if migration else None
        listed = self.batch.list_namespaced_job(self.namespace, label_selector=selector)
        return [self._plain(job) for job in listed.items]

    def job(self, name: str) -> Obj | None:
        try:
            return dict(self._plain(self.batch.read_namespaced_job(name, self.namespace)))
        except ApiException as error:
            if error.status == 404:
                return None
            raise

    def pods(self, migration: str | None = None) -> list[Obj]:
        selector = f"relora.dev/migration={migration}" if migration else None
        listed = self.core.list_namespaced_pod(self.namespace, label_selector=selector)
        return [self._plain(pod) for pod in listed.items]

    def log(self, pod: str) -> str:
        text: str = self.core.read_namespaced_pod_log(pod, self.namespace)
        return text

    def events(self, name: str) -> list[Obj]:
        listed = self.core.list_namespaced_event(self.namespace)
        return [
            self._plain(e)
            for e in listed.items
            if e.involved_object and e.involved_object.name == name
        ]


def ensure_crd(api: Any) -> None:
    import yaml

    extensions = untyped(client.ApiextensionsV1Api(api))
    try:
        extensions.create_custom_resource_definition(yaml.safe_load(CRD_FILE.read_text()))
    except ApiException as error:
        assert error.status == 409, error
