"""A real Prometheus scrapes the operator while a migration runs in the sandbox, with the chart's
alerting rules loaded: every query of the Grafana dashboard, evaluated by that Prometheus as
Grafana would send it, returns series with numbers (no panel left with "No data" or NaN), the
counter panels that the migration moved show it (above 0), and every rule is evaluated without
error.

The operator runs with the fast trainer stand-in (tests/fake_trainer.py). The migration's one
adapter crashes once (a retry), then becomes ready, and the API server restarts while it runs
(reconcile errors): every metric the dashboard shows gets samples. The scrape job carries the
labels the chart's ServiceMonitor gives (job = the metrics Service's name, namespace = the
release namespace), so the dashboard's $job and the rules' default selector are the real ones.

The server comes from $RELORA_PROMETHEUS, else .tools/bin/prometheus (`make
.tools/bin/prometheus`, with promtool), else PATH; without one the test fails, never skips.
The metrics name no migration: the operator watches only this test's namespace, so every series
is this migration's.
"""

from __future__ import annotations

import json
import math
import re
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from relora_sandbox import processes
from tests.conftest import wait_for
from tests.fault_kit import (
    Cluster,
    OperatorProcess,
    Trainers,
    fake_manifest,
)
from tests.helm_chart import one, render
from tests.test_grafana import DASHBOARD, panel_queries
from tests.test_prometheus_rules import (
    ALERTS,
    NAMESPACE,
    RELEASE,
    prometheus_binary,
    rule_file,
    rule_values,
)

SCRAPE_SECONDS = 1
# Grafana's interval variables, for a run of seconds: $__rate_interval is at least four scrape
# intervals. $__range (the dashboard's time range) is the time since Prometheus started.
INTERVALS = {"$__rate_interval": f"{4 * SCRAPE_SECONDS}s", "$__interval": f"{SCRAPE_SECONDS}s"}
UNEVALUATED = "0001-01-01T00:00:00Z"  # a rule's lastEvaluation before its first evaluation

# The counter panels the migration moves, as (title, refId): each series' labels -> whether it
# is above 0 (True) or exactly 0 (False, what did not happen). The labelled counters' known series
# start at 0 with the operator (relora_operator.metrics.KNOWN_SERIES), so increase() sees the
# first increment. Not here: the reconcile errors by type (the same panel's B), an open-ended
# label whose series is first scraped at 1, so its rate() may read 0.
COUNTED: dict[tuple[str, str], dict[tuple[tuple[str, str], ...], bool]] = {
    ("Migrations finished", "A"): {
        (("result", "succeeded"),): True,
        (("result", "failed"),): False,
    },
    ("Adapter Jobs", "A"): {(): True},  # created
    ("Adapter Jobs", "B"): {(): True},  # retried
    ("Adapters finished, by result and reason", "A"): {
        (("reason", "Ready"), ("result", "ready")): True
    },
    ("Retries", "A"): {(): True},
    ("Reconciliations", "A"): {(): True},
}


def scrape_job() -> str:
    """The job label of the operator's series when the chart's ServiceMonitor scrapes it."""
    docs = render({"metrics": {"serviceMonitor": {"enabled": True}}}, release=RELEASE)
    monitor = one(docs, "ServiceMonitor")["spec"]
    # Without spec.jobLabel, prometheus-operator names the job after the Service.
    assert "jobLabel" not in monitor, monitor
    assert [e["port"] for e in monitor["endpoints"]] == ["metrics"]
    name: str = one(docs, "Service")["metadata"]["name"]
    return name


class Prometheus:
    """A prometheus server process on a free port, its storage and logs in ``folder``."""

    def __init__(self, binary: str, folder: Path, *, job: str, target: str, rules: Path) -> None:
        self.port = processes.free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = folder / "prometheus.log"
        config = {
            "global": {
                "scrape_interval": f"{SCRAPE_SECONDS}s",
                "scrape_timeout": f"{SCRAPE_SECONDS}s",
                "evaluation_interval": f"{SCRAPE_SECONDS}s",
            },
            "rule_files": [str(rules)],
            "scrape_configs": [
                {
                    "job_name": job,
                    "static_configs": [{"targets": [target], "labels": {"namespace": NAMESPACE}}],
                }
            ],
        }
        path = folder / "prometheus.yml"
        path.write_text(yaml.safe_dump(config))
        argv = [
            binary,
            f"--config.file={path}",
            f"--storage.tsdb.path={folder / 'data'}",
            f"--web.listen-address=127.0.0.1:{self.port}",
        ]
        with self.log.open("wb") as out:
            self.process = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT)
        self.started = time.monotonic()
        try:
            wait_for(self._ready, timeout=30, what="prometheus ready")
        except AssertionError:
            self.stop()
            raise

    def _ready(self) -> bool:
        assert self.process.poll() is None, f"prometheus exited: {self.tail()}"
        try:
            with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as response:
                return bool(response.status == 200)
        except OSError:
            return False

    def stop(self) -> None:
        processes.stop(self.process)

    def tail(self, characters: int = 3000) -> str:
        return self.log.read_text(errors="replace")[-characters:]

    def api(self, path: str, **params: str) -> Any:
        """GET /api/v1/``path``: its ``data``, after checking that the call succeeded."""
        query = urllib.parse.urlencode(params)
        with urllib.request.urlopen(f"{self.url}/api/v1/{path}?{query}", timeout=10) as response:
            answer = json.loads(response.read())
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector of ``expr`` now."""
        data = self.api("query", query=expr)
        assert data["resultType"] == "vector", (expr, data)
        result: list[dict[str, Any]] = data["result"]
        return result


def grafana_regex(values: list[str]) -> str:
    """A multi-value variable as Grafana puts it into a `=~` matcher: regex-escaped values,
    alternated; the escapes doubled, as inside a PromQL string."""
    escaped = [re.sub(r"([\\^$*+?.()|{}\[\]])", r"\\\\\1", v) for v in values]
    return escaped[0] if len(escaped) == 1 else "(" + "|".join(escaped) + ")"


def template_variables(prometheus: Prometheus) -> dict[str, str]:
    """The dashboard's query variables as Grafana resolves them (label_values through the
    Prometheus API), every value selected."""
    dashboard = json.loads(DASHBOARD.read_text())
    found = {}
    for variable in dashboard["templating"]["list"]:
        if variable["type"] != "query":
            continue
        call = re.fullmatch(r"label_values\((\w+),\s*(\w+)\)", variable["definition"])
        assert call, f"variable {variable['name']}: {variable['definition']} is not handled here"
        metric, label = call.groups()
        values = prometheus.api(f"label/{label}/values", **{"match[]": metric})
        assert values, f"variable {variable['name']}: no {label} values of {metric}"
        found[f"${variable['name']}"] = grafana_regex(sorted(values))
    return found


def expand(expr: str, variables: dict[str, str], range_seconds: int) -> str:
    """``expr`` with its template variables ($name or ${name}) replaced; an unknown one fails."""
    known = {**INTERVALS, "$__range": f"{range_seconds}s", **variables}

    def value(match: re.Match[str]) -> str:
        name = "$" + (match.group(1) or match.group(2))
        assert name in known, f"{expr}: no value for the template variable {name} here"
        return known[name]

    return re.sub(r"\$\{(\w+)\}|\$(\w+)", value, expr)


def panel_values(
    prometheus: Prometheus, variables: dict[str, str], title: str
) -> dict[str, dict[tuple[tuple[str, str], ...], float]]:
    """The panel titled ``title``: refId -> (its series' sorted labels -> value) now."""
    range_seconds = math.ceil(time.monotonic() - prometheus.started) + 1
    panels = json.loads(DASHBOARD.read_text())["panels"]
    (panel,) = [p for p in panels if p.get("title") == title]
    return {
        target["refId"]: {
            tuple(sorted(series["metric"].items())): float(series["value"][1])
            for series in prometheus.query(expand(target["expr"], variables, range_seconds))
        }
        for target in panel["targets"]
    }


def counter_panels_short_of(prometheus: Prometheus, variables: dict[str, str]) -> list[str]:
    """The counter panels the test's migration moves that do not show it: each series must be
    as ``COUNTED`` says (above 0, or exactly 0 for what did not happen)."""
    wrong = []
    for (title, ref), expected in COUNTED.items():
        shown = panel_values(prometheus, variables, title)[ref]
        ok = set(shown) == set(expected) and all(
            shown[labels] > 0 if above else shown[labels] == 0 for labels, above in expected.items()
        )
        if not ok:
            wrong.append(f"{title} ({ref}): {shown}, wanted {expected} (True: above 0)")
    return wrong


def panels_without_data(prometheus: Prometheus, variables: dict[str, str]) -> list[str]:
    """The dashboard's queries that return no series, or a series that is not a number."""
    range_seconds = math.ceil(time.monotonic() - prometheus.started) + 1
    failing = []
    for raw in panel_queries(json.loads(DASHBOARD.read_text())["panels"]):
        expr = expand(raw, variables, range_seconds)
        result = prometheus.query(expr)
        values = [float(series["value"][1]) for series in result]
        if not values or not all(math.isfinite(v) for v in values):
            failing.append(f"{expr} -> {[(s['metric'], s['value'][1]) for s in result]}")
    return failing


# ------------------------------------------------------------------------------ fixtures
@pytest.fixture
def operator(fake_operator: OperatorProcess) -> OperatorProcess:
    """The operator with the trainer stand-in (conftest's runs the real trainer)."""
    return fake_operator


@pytest.fixture
def binary() -> str:
    """The prometheus server, looked up first: without one the test fails before starting
    anything."""
    return prometheus_binary("prometheus")


@pytest.fixture
def job() -> str:
    return scrape_job()


@pytest.fixture
def prometheus(
    binary: str, operator: OperatorProcess, job: str, tmp_path: Path
) -> Iterator[Prometheus]:
    folder = tmp_path / "prometheus"
    folder.mkdir()
    rules = rule_file(rule_values(), folder)  # the chart's PrometheusRule, default values
    target = f"127.0.0.1:{operator.metrics_port}"
    server = Prometheus(binary, folder, job=job, target=target, rules=rules)
    yield server
    server.stop()


# ---------------------------------------------------------------------------------- test
def test_a_real_prometheus_shows_every_panel_and_evaluates_every_rule(
    binary: str,
    sandbox: Any,
    cluster: Cluster,
    operator: OperatorProcess,
    trainers: Trainers,
    prometheus: Prometheus,
    job: str,
) -> None:
    # The target is up under the ServiceMonitor's labels before the migration starts, so its
    # first transitions are scraped from zero.
    up = f'up{{job="{job}",namespace="{NAMESPACE}"}} == 1'
    wait_for(lambda: prometheus.query(up), timeout=20, what=f"{up} in prometheus")
    variables = template_variables(prometheus)
    assert variables == {"$job": job}, variables

    cluster.create(fake_manifest("scraped", cluster.namespace, ["one"], trainers))
    trainers.wait_started("one")
    cluster.wait_adapter("scraped", "one", "Running")

    # The API server restarts while the adapter runs: the resync (every second here) fails
    # to reach it, a reconcile error.
    sandbox.thread.run(sandbox.restart(down_seconds=2.5))
    wait_for(
        lambda: operator.metric("relora_reconcile_errors_total{") > 0,
        timeout=20,
        what="a reconcile error counted while the API server was down",
    )

    # The trainer crashes once (a retry), then the adapter becomes ready.
    trainers.release("one", "crash")
    trainers.wait_started("one", count=2)
    trainers.release("one")
    cluster.wait_phase("scraped", "Succeeded", "Failed")
    assert cluster.status("scraped")["phase"] == "Succeeded", cluster.status("scraped")
    assert cluster.adapter("scraped", "one")["attempts"] == 2

    # Every panel has data once the finished migration has been scraped a few times, and the
    # counter panels it moved show it: "Migrations finished" and "Adapters finished" above 0
    # too, as their series were scraped at 0 before this migration's increment.
    try:
        wait_for(
            lambda: not panels_without_data(prometheus, variables),
            timeout=20,
            what="data in every panel",
        )
    except AssertionError:
        failing = "\n".join(panels_without_data(prometheus, variables))
        raise AssertionError(f"dashboard queries without data:\n{failing}") from None
    try:
        wait_for(
            lambda: not counter_panels_short_of(prometheus, variables),
            timeout=20,
            what="the migration counted in its counter panels",
        )
    except AssertionError:
        failing = "\n".join(counter_panels_short_of(prometheus, variables))
        raise AssertionError(f"counter panels that do not show the migration:\n{failing}") from None
    succeeded = prometheus.query(f'relora_adapters{{job="{job}",phase="Succeeded"}}')
    assert [s["value"][1] for s in succeeded] == ["1"], succeeded

    # The chart's rules: loaded, each evaluated without error. The operator is up and no
    # adapter failed, so the alerts that say otherwise are inactive; ReloraOperatorDown being
    # inactive also proves that the default selector matches the scraped `up`.
    groups = prometheus.api("rules")["groups"]
    rules = {rule["name"]: rule for group in groups for rule in group["rules"]}
    assert set(rules) == set(ALERTS.values()), sorted(rules)
    for name, rule in rules.items():
        assert rule["health"] == "ok" and not rule.get("lastError"), (name, rule)
        assert rule["lastEvaluation"] != UNEVALUATED, (name, rule)
    assert rules["ReloraOperatorDown"]["state"] == "inactive", rules["ReloraOperatorDown"]
    assert rules["ReloraMigrationFailed"]["state"] == "inactive", rules["ReloraMigrationFailed"]
    assert prometheus.process.poll() is None, prometheus.tail()
