"""The Grafana dashboard and the README's metric table use exactly the operator's metrics."""

from __future__ import annotations

import json
import re
from typing import Any

from prometheus_client.metrics import MetricWrapperBase

from relora_operator import metrics
from tests.conftest import ROOT

DASHBOARD = ROOT / "deploy" / "grafana" / "relora-operator.json"
SUFFIXES = {"counter": ["_total"], "gauge": [""], "histogram": ["_bucket", "_sum", "_count"]}


def defined() -> dict[str, set[str]]:
    """Family name -> the series names Prometheus scrapes for it, from metrics.py."""
    families: dict[str, set[str]] = {}
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase):
            for family in value.describe():
                families[family.name] = {family.name + s for s in SUFFIXES[family.type]}
    return families


def series_in(expr: str) -> set[str]:
    """Metric names in a PromQL expression (label matchers, ranges, functions, groupings out)."""
    expr = re.sub(r'"[^"]*"', "", expr)
    expr = re.sub(r"\{[^}]*\}|\[[^\]]*\]", " ", expr)
    expr = re.sub(r"\b(by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", expr)
    expr = re.sub(r"\b[a-zA-Z_][a-zA-Z0-9_]*\s*\(", "(", expr)  # function calls
    expr = re.sub(r"\b(and|or|unless|offset|bool)\b", " ", expr)
    return set(re.findall(r"\b[a-zA-Z_:][a-zA-Z0-9_:]*\b", expr))


def panel_queries(panels: list[dict[str, Any]]) -> list[str]:
    """The PromQL of every panel's targets, rows' panels included, as the dashboard has them
    (template variables such as $job and $__range unexpanded)."""
    exprs = []
    for panel in panels:
        exprs += [t["expr"] for t in panel.get("targets", [])]
        exprs += panel_queries(panel.get("panels", []))
    return exprs


def test_parser_finds_metric_names() -> None:
    expr = (
        'histogram_quantile(0.9, sum by (le) (rate(a_bucket{job=~"$job"}[5m]))) '
        "/ ignoring(x) sum without (y) (b_total) + c"
    )
    assert series_in(expr) == {"a_bucket", "b_total", "c"}


def test_dashboard_queries_only_metrics_that_exist_and_shows_them_all() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    families = defined()
    allowed = set().union(*families.values())
    assert len(families) >= 10
    exprs = panel_queries(dashboard["panels"])
    assert exprs
    used: set[str] = set()
    for expr in exprs:
        names = series_in(expr)
        assert names, expr
        unknown = names - allowed
        assert not unknown, f"{expr}: {sorted(unknown)} not defined in relora_operator/metrics.py"
        used |= names
    for variable in dashboard["templating"]["list"]:
        if variable["type"] == "query":
            names = series_in(variable["definition"].replace("label_values", "f"))
            assert names <= allowed | {"job"}, names
    missing = [name for name, series in families.items() if not series & used]
    assert not missing, f"no panel shows {missing}"


def test_dashboard_panels_are_well_formed() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    assert dashboard["uid"] and dashboard["title"] == "relora-operator"
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        position = panel["gridPos"]
        assert position["x"] >= 0 and position["x"] + position["w"] <= 24
        if panel["type"] != "row":
            assert panel["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            assert panel["title"] and panel["targets"]
            refs = [t["refId"] for t in panel["targets"]]
            assert len(refs) == len(set(refs))


def test_readme_metric_table_is_metrics_py() -> None:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| metric | type | meaning |") :].split("\n\n")[0]
    rows = [line for line in table.splitlines()[2:] if line.startswith("|")]
    listed: dict[str, str] = {}
    for row in rows:
        cells = [c.strip() for c in row.strip("|").split("|")]
        for name in re.findall(r"`(relora_[a-z_]+)", cells[0]):
            listed[name] = cells[1]
    families = defined()
    expected = {
        name + ("_total" if kind == "counter" else ""): kind
        for value in vars(metrics).values()
        if isinstance(value, MetricWrapperBase)
        for name, kind in [(f.name, f.type) for f in value.describe()]
    }
    assert listed == expected
    assert len(families) == len(expected)
