"""Argo CD: the AdapterMigration health check (Lua, run here with Lua 5.1 like Argo CD's
gopher-lua), its argocd-cm snippet, and the example Application's chart values."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from lupa import lua51

from relora_api.status import AdapterMigrationStatus, Condition
from tests.conftest import ROOT
from tests.helm_chart import CHART, KUBE_VERSION, one, render

ARGOCD = ROOT / "deploy" / "argocd"
CHECK = ARGOCD / "resource_customizations" / "relora.dev" / "AdapterMigration"
HEALTH_KEY = "resource.customizations.health.relora.dev_AdapterMigration"
STATUSES = {"Healthy", "Progressing", "Degraded", "Suspended", "Missing", "Unknown"}


def health(obj: dict[str, Any], script: str | None = None) -> dict[str, str]:
    """Run the health check on ``obj`` as Argo CD does: the resource is the global ``obj``."""
    lua = lua51.LuaRuntime(unpack_returned_tuples=True)
    lua.globals().obj = lua.table_from(obj, recursive=True)
    source = script if script is not None else (CHECK / "health.lua").read_text()
    result = lua.execute(source)
    return {key: str(value) for key, value in dict(result).items()}


def _cases() -> list[dict[str, Any]]:
    cases: list[dict[str, Any]] = yaml.safe_load((CHECK / "health_test.yaml").read_text())["tests"]
    return cases


@pytest.mark.parametrize("case", _cases(), ids=lambda case: Path(case["inputPath"]).stem)
def test_health_check_cases(case: dict[str, Any]) -> None:
    obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
    assert health(obj) == case["healthStatus"]


def test_cases_cover_every_rule_and_use_real_statuses() -> None:
    cases = _cases()
    assert {c["healthStatus"]["status"] for c in cases} == {
        "Healthy",
        "Progressing",
        "Degraded",
        "Suspended",
    }
    assert len({c["inputPath"] for c in cases}) == len(cases)
    assert {p.name for p in (CHECK / "testdata").iterdir()} == {
        Path(c["inputPath"]).name for c in cases
    }
    seen_types: set[str] = set()
    for case in cases:
        obj = yaml.safe_load((CHECK / case["inputPath"]).read_text())
        assert obj["apiVersion"] == "relora.dev/v1alpha1" and obj["kind"] == "AdapterMigration"
        if "status" in obj:
            # The fixtures are statuses the operator can write: the API models accept them.
            status = AdapterMigrationStatus.model_validate(obj["status"])
            seen_types |= {c.type for c in status.conditions or []}
    assert seen_types == set(Condition.model_fields["type"].annotation.__args__)  # type: ignore[union-attr]


def test_health_check_order() -> None:
    """generation first, then Suspended, then Failed/Stalled, then Ready."""

    def migration(generation: int, observed: int, **conditions: str) -> dict[str, Any]:
        return {
            "metadata": {"generation": generation},
            "status": {
                "observedGeneration": observed,
                "conditions": [
                    {"type": kind, "status": value, "message": f"{kind} says so"}
                    for kind, value in conditions.items()
                ],
            },
        }

    everything = {"Ready": "True", "Failed": "True", "Stalled": "True", "Suspended": "True"}
    assert health(migration(2, 1, **everything))["status"] == "Progressing"
    assert health(migration(2, 2, **everything))["status"] == "Suspended"
    assert health(migration(2, 2, **{**everything, "Suspended": "False"}))["status"] == "Degraded"
    only_stalled = {"Ready": "True", "Stalled": "True", "Failed": "False"}
    assert health(migration(1, 1, **only_stalled))["status"] == "Degraded"
    assert health(migration(1, 1, Ready="True")) == {
        "status": "Healthy",
        "message": "Ready says so",
    }
    assert health(migration(1, 1, Ready="Unknown"))["status"] == "Progressing"
    assert health(migration(1, 1))["status"] == "Progressing"
    for result in (health(migration(3, 1)), health({"metadata": {"generation": 1}})):
        assert result["status"] in STATUSES and result["message"]


def test_argocd_cm_carries_the_tested_lua_verbatim() -> None:
    snippet = yaml.safe_load((ARGOCD / "argocd-cm.yaml").read_text())
    kubernetes_validate.validate(snippet, KUBE_VERSION, strict=True)
    assert snippet["kind"] == "ConfigMap" and snippet["metadata"]["name"] == "argocd-cm"
    assert snippet["data"][HEALTH_KEY] == (CHECK / "health.lua").read_text(), (
        "deploy/argocd/argocd-cm.yaml: copy health.lua into it (indented 4 spaces)"
    )
    ready = yaml.safe_load((CHECK / "testdata" / "ready.yaml").read_text())
    assert health(ready, snippet["data"][HEALTH_KEY])["status"] == "Healthy"


def test_example_application_renders_the_chart_with_its_values() -> None:
    application = yaml.safe_load((ARGOCD / "application.yaml").read_text())
    assert application["apiVersion"] == "argoproj.io/v1alpha1"
    assert application["kind"] == "Application"
    source = application["spec"]["source"]
    assert (ROOT / source["path"]).resolve() == CHART.resolve()
    values = yaml.safe_load(source["helm"]["values"])
    docs = render(values, release=source["helm"]["releaseName"])
    crd = one(docs, "CustomResourceDefinition")
    assert crd["metadata"]["annotations"] == {
        "helm.sh/resource-policy": "keep",
        "argocd.argoproj.io/sync-wave": "-1",
        "argocd.argoproj.io/sync-options": "Prune=false,Delete=false",
    }
    # The CRD syncs in an earlier wave than everything else in the Application.
    for doc in docs:
        if doc is not crd:
            assert "argocd.argoproj.io/sync-wave" not in doc["metadata"].get("annotations", {})
