"""The chart, installed into the sandbox: its CRD, ServiceAccount, RBAC, Service and Deployment
applied with kubectl, then the operator started with the Deployment's args and env. It must
reconcile an AdapterMigration up to its Job, and every API request it makes must be allowed by
the chart's Role (the sandbox does not enforce RBAC: the test audits the requests instead).

These tests need the sandbox itself (its request hooks, a local operator process), so they
ignore $RELORA_E2E_KUBECONFIG.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from aiohttp import web
from kubernetes import client, config

from relora_api.resource import GROUP, PLURAL, VERSION
from relora_sandbox import processes
from tests.conftest import kubectl_binary, untyped, wait_for
from tests.helm_chart import (
    CHART,
    container,
    container_env,
    helm,
    render,
    rules_of,
    values_file,
)
from tests.test_argocd import health

TOKEN = "relora-operator-e2e"  # tells the operator's requests apart from the test's
TRAINER_IMAGE = "registry.example/relora-trainer"

Request = tuple[str, str, dict[str, str]]  # method, path, query


def rbac_attributes(method: str, path: str, query: dict[str, str]) -> tuple[str, ...] | None:
    """(namespace, apiGroup, resource[/sub], verb) of a resource request; None for discovery."""
    parts = [p for p in path.split("/") if p]
    if parts[:2] == ["api", "v1"]:
        group, rest = "", parts[2:]
    elif parts[:1] == ["apis"] and len(parts) >= 3:
        group, rest = parts[1], parts[3:]
    else:
        return None
    if not rest:
        return None
    namespace = ""
    if rest[0] == "namespaces" and len(rest) >= 3:
        namespace, rest = rest[1], rest[2:]
    name = rest[1] if len(rest) > 1 else None
    resource = "/".join([rest[0], *rest[2:3]])
    if method == "GET":
        if name is not None:
            verb = "get"
        else:
            verb = "watch" if query.get("watch") in ("1", "true") else "list"
    else:
        verbs = {"POST": "create", "PUT": "update", "PATCH": "patch"}
        verb = verbs.get(method) or ("delete" if name else "deletecollection")
    return namespace, group, resource, verb


def test_rbac_attributes() -> None:
    attributes = rbac_attributes
    assert attributes("GET", "/apis", {}) is None and attributes("GET", "/api/v1", {}) is None
    assert attributes("GET", "/apis/batch/v1/namespaces/a/jobs", {"watch": "true"}) == (
        "a",
        "batch",
        "jobs",
        "watch",
    )
    assert attributes("GET", "/api/v1/namespaces/a/pods/p/log", {}) == ("a", "", "pods/log", "get")
    assert attributes("PATCH", f"/apis/{GROUP}/{VERSION}/namespaces/a/{PLURAL}/m/status", {}) == (
        "a",
        GROUP,
        f"{PLURAL}/status",
        "patch",
    )
    assert attributes("GET", "/api/v1/namespaces", {}) == ("", "", "namespaces", "list")
    assert attributes("GET", "/api/v1/namespaces/a", {}) == ("", "", "namespaces", "get")


class Cluster:
    """The sandbox through the test's own client, with namespaces made for one test."""

    def __init__(self, sandbox: Any) -> None:
        self.sandbox = sandbox
        self.api = config.new_client_from_config(config_file=str(sandbox.kubeconfig_path))
        self.core = untyped(client.CoreV1Api(self.api))
        self.namespaces: list[str] = []

    def namespace(self, stem: str) -> str:
        name = f"{stem}-{uuid.uuid4().hex[:5]}"
        self.core.create_namespace({"metadata": {"name": name}})
        self.namespaces.append(name)
        return name

    def kubectl(self, *args: str, stdin: str | None = None) -> str:
        result = subprocess.run(
            [kubectl_binary(), f"--kubeconfig={self.sandbox.kubeconfig_path}", *args],
            input=stdin,
            capture_output=True,
            text=True,
        )
        assert result.returncode == 0, result.stderr
        return result.stdout

    def close(self) -> None:
        for name in self.namespaces:
            self.core.delete_namespace(name)


@pytest.fixture
def cluster(sandbox: Any) -> Iterator[Cluster]:
    found = Cluster(sandbox)
    yield found
    found.close()


@pytest.fixture
def audit(sandbox: Any) -> Iterator[list[Request]]:
    """Requests made with the operator's token while the test runs."""
    seen: list[Request] = []

    def record(request: web.Request) -> None:
        if request.headers.get("Authorization") == f"Bearer {TOKEN}":
            seen.append((request.method, request.path, dict(request.query)))

    hooks = sandbox.emulator.request_hooks
    hooks.append(record)
    yield seen
    hooks.remove(record)


def _start_operator(
    docs: list[dict[str, Any]], kubeconfig: Path, log: Path
) -> subprocess.Popen[bytes]:
    """`relora-operator` (the image's entrypoint) with the Deployment's args and env (the seal
    key from the chart's Secret)."""
    deployment_container = container(docs)
    env = {**os.environ, **container_env(docs), "KUBECONFIG": str(kubeconfig)}
    argv = [sys.executable, "-m", "relora_operator", *deployment_container["args"]]
    [liveness] = [a for a in deployment_container["args"] if a.startswith("--liveness=")]
    port = int(re.findall(r":(\d+)/", liveness)[0])
    return processes.start_live(argv, env=env, log=log, liveness_port=port)


def _migration(name: str, namespace: str) -> dict[str, Any]:
    # queueName: the Jobs start suspended (Kueue would admit them), so no trainer runs here.
    return {
        "apiVersion": f"{GROUP}/{VERSION}",
        "kind": "AdapterMigration",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "sourceModel": {"uri": "pvc://models/v1"},
            "targetModel": {"uri": "pvc://models/v2"},
            "adapters": [
                {
                    "name": "sentiment",
                    "uri": "pvc://adapters/sentiment",
                    "data": {
                        "train": "pvc://data/sst2/train.jsonl",
                        "validation": "pvc://data/sst2/validation.jsonl",
                    },
                }
            ],
            "output": {"uri": "pvc://adapters/migrated"},
            "queueName": "gpu-queue",
        },
    }


def test_chart_installs_and_its_operator_creates_the_job(
    sandbox: Any, cluster: Cluster, audit: list[Request], tmp_path: Path
) -> None:
    release_namespace = cluster.namespace("relora-system")
    watched = cluster.namespace("team-a")
    metrics_port = processes.free_port()
    docs = render(
        {
            "watchNamespaces": [watched],
            "operator": {"resyncSeconds": 1, "livenessPort": processes.free_port()},
            "metrics": {"port": metrics_port},
            "trainer": {"image": {"repository": TRAINER_IMAGE, "tag": "e2e"}},
        },
        release="relora",
        namespace=release_namespace,
    )
    applied = cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump_all(docs))
    assert {line.split("/")[0] for line in applied.splitlines()} == {
        "customresourcedefinition.apiextensions.k8s.io",
        "serviceaccount",
        "role.rbac.authorization.k8s.io",
        "rolebinding.rbac.authorization.k8s.io",
        "secret",
        "service",
        "deployment.apps",
    }, applied
    [role] = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == watched]
    [leases] = [
        d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] == release_namespace
    ]
    assert cluster.kubectl("get", "role", "-n", watched, role["metadata"]["name"], "-o", "name")

    operator_kubeconfig = yaml.safe_load(Path(sandbox.kubeconfig_path).read_text())
    operator_kubeconfig["users"][0]["user"] = {"token": TOKEN}
    kubeconfig = tmp_path / "operator-kubeconfig"
    kubeconfig.write_text(yaml.safe_dump(operator_kubeconfig))
    log = tmp_path / "operator.log"
    process = _start_operator(docs, kubeconfig, log)
    try:
        cluster.kubectl("apply", "-f", "-", stdin=yaml.safe_dump(_migration("chart", watched)))
        batch = untyped(client.BatchV1Api(cluster.api))
        jobs = wait_for(
            lambda: batch.list_namespaced_job(watched).items,
            timeout=30,
            what=f"the Job (operator log: {log})",
        )
        custom = untyped(client.CustomObjectsApi(cluster.api))

        def queued() -> dict[str, Any] | None:
            found: dict[str, Any] = custom.get_namespaced_custom_object(
                GROUP, VERSION, watched, PLURAL, "chart"
            )
            adapters = (found.get("status") or {}).get("adapters") or []
            return found if adapters and adapters[0]["phase"] == "Queued" else None

        migration = wait_for(queued, timeout=30, what="the adapter to be Queued")
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            metrics = r.read().decode()
    finally:
        processes.stop(process)

    [job] = jobs
    trainer = job.spec.template.spec.containers[0]
    assert trainer.image == f"{TRAINER_IMAGE}:e2e"
    assert trainer.command == ["python", "-m", "relora_trainer.job"]
    assert job.spec.suspend is True
    assert job.metadata.labels["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    assert "relora_adapter_jobs_created_total 1.0" in metrics
    # Argo CD's health check reads the status the operator wrote.
    ready = next(c for c in migration["status"]["conditions"] if c["type"] == "Ready")
    assert health(migration) == {"status": "Progressing", "message": ready["message"]}

    # Every request the operator made is allowed by the chart's Role in its namespace: the
    # watched one, or the release namespace for the leader election's Lease.
    allowed = {watched: rules_of(role), release_namespace: rules_of(leases)}
    made: set[tuple[str, ...]] = set()
    elected: set[tuple[str, ...]] = set()
    for method, path, query in audit:
        attributes = rbac_attributes(method, path, query)
        if attributes is None:
            assert method == "GET", path  # discovery: allowed to every authenticated user
            continue
        namespace, *rule = attributes
        assert namespace in allowed, f"{method} {path}: outside the watched namespace"
        (made if namespace == watched else elected).add(tuple(rule))
    assert made <= allowed[watched], f"not granted by the chart: {sorted(made - allowed[watched])}"
    assert elected <= allowed[release_namespace], sorted(elected)
    assert ("coordination.k8s.io", "leases", "create") in elected, "it took the Lease"
    assert {
        (GROUP, PLURAL, "list"),
        (GROUP, PLURAL, "watch"),
        (GROUP, f"{PLURAL}/status", "patch"),
        ("batch", "jobs", "create"),
        ("batch", "jobs", "watch"),
        ("", "pods", "watch"),
    } <= made, sorted(made)


def test_notes_render_for_an_install(sandbox: Any, tmp_path: Path) -> None:
    """`helm install` with the in-memory driver: renders NOTES.txt, writes nothing."""
    empty = tmp_path / "releases.yaml"
    empty.write_text("")
    env = {
        "KUBECONFIG": str(sandbox.kubeconfig_path),
        "HELM_DRIVER": "memory",
        "HELM_MEMORY_DRIVER_DATA": str(empty),
    }
    namespaced = values_file({"watchNamespaces": ["team-a", "team-b"]})
    for extra, expected in (
        ([], "It watches AdapterMigrations in every namespace"),
        (["--values", str(namespaced)], "It watches AdapterMigrations in: team-a, team-b"),
    ):
        out = helm("install", "relora", str(CHART), "-n", "relora-system", *extra, env=env).stdout
        assert "STATUS: deployed" in out and expected in out, out
        assert "helm.sh/resource-policy: keep" in out
        assert "trainer pods get no Kubernetes API rights" in out
