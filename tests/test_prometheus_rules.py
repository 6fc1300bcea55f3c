"""The chart's PrometheusRule (metrics.prometheusRule): off by default, checked by the real
`promtool check rules`, over metrics the operator really exports, and proven by `promtool test
rules` cases (tests/promtool/) where each alert fires when it should and stays silent otherwise.

promtool comes from $RELORA_PROMTOOL, else .tools/bin/promtool (`make .tools/bin/promtool`
copies the one on PATH or extracts it from Debian's `prometheus` package), else PATH. A missing
promtool fails these tests, as a missing helm fails the chart tests: never a skip. The rule is
also loaded into a real Prometheus scraping the operator: tests/test_prometheus_live.py.
"""

from __future__ import annotations

import functools
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.metrics import MetricWrapperBase

from relora_operator import metrics
from tests.conftest import ROOT
from tests.helm_chart import one, render, template
from tests.test_grafana import defined, series_in

CASES = ROOT / "tests" / "promtool" / "relora-alerts.test.yaml"
RULES_NAME = "relora-alerts.rules.yaml"  # what CASES's rule_files names
# The release the cases were written for: the default selector is then
# job="relora-operator-metrics",namespace="relora-system".
RELEASE, NAMESPACE = "relora-operator", "relora-system"
ALERTS = {
    "operatorDown": "ReloraOperatorDown",
    "migrationFailed": "ReloraMigrationFailed",
    "migrationStuck": "ReloraMigrationStuck",
    "reconcileErrors": "ReloraReconcileErrors",
}
# Labels Prometheus attaches to every scraped series (the ServiceMonitor's target labels).
TARGET_LABELS = {"job", "namespace", "instance", "pod", "service", "container", "endpoint"}
SELECTOR = re.compile(r"\b([a-z_:][a-z0-9_:]*)\{([^}]*)\}")  # metric{matchers}
MATCHER = re.compile(r'(\w+)\s*(?:=~|!~|!=|=)\s*"([^"]*)"')  # label op "value"


@functools.cache
def prometheus_binary(tool: str) -> str:
    """Prometheus's ``tool`` (promtool, or the prometheus server of tests/test_prometheus_live.py):
    $RELORA_<TOOL>, else .tools/bin/<tool>, else PATH. Fails the calling test with what to do
    when there is none."""
    env = f"RELORA_{tool.upper()}"
    explicit = os.environ.get(env)
    if explicit:
        candidates = [Path(explicit)]
    else:
        candidates = [ROOT / ".tools" / "bin" / tool]
        found = shutil.which(tool)
        if found:
            candidates.append(Path(found))
    for candidate in candidates:
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    where = f"${env}={explicit}" if explicit else f".tools/bin/{tool} or PATH"
    pytest.fail(
        f"{tool} not found ({where}): run `make .tools/bin/{tool}` (copies it from PATH or "
        f"extracts it from Debian's prometheus package), or set {env}=/path/to/{tool}",
        pytrace=False,
    )


def promtool(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [prometheus_binary("promtool"), *args], capture_output=True, text=True, cwd=cwd, timeout=120
    )


def rule_values(**rule: Any) -> dict[str, Any]:
    return {"metrics": {"prometheusRule": {"enabled": True, **rule}}}


def prometheus_rule(values: dict[str, Any]) -> dict[str, Any]:
    return one(render(values, release=RELEASE, namespace=NAMESPACE), "PrometheusRule")


def rule_file(values: dict[str, Any], folder: Path) -> Path:
    """The PrometheusRule's spec.groups as a plain Prometheus rule file in ``folder``."""
    path = folder / RULES_NAME
    path.write_text(yaml.safe_dump({"groups": prometheus_rule(values)["spec"]["groups"]}))
    return path


def alerts(values: dict[str, Any]) -> dict[str, dict[str, Any]]:
    groups = prometheus_rule(values)["spec"]["groups"]
    return {rule["alert"]: rule for group in groups for rule in group["rules"]}


def run_cases(values: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    rule_file(values, folder)
    shutil.copy(CASES, folder / CASES.name)
    return promtool("test", "rules", CASES.name, cwd=folder)


# ------------------------------------------------------------------------- the object
def test_off_by_default_and_with_only_the_service_monitor() -> None:
    for values in ({}, {"metrics": {"serviceMonitor": {"enabled": True}}}):
        assert "PrometheusRule" not in {d["kind"] for d in render(values)}


def test_the_rule_object_carries_its_labels_and_each_alert_its_labels() -> None:
    """Labels on the object (for a ruleSelector); alertLabels on every alert, where each
    alert's own severity wins."""
    values = rule_values(
        labels={"release": "kube-prometheus"},
        alertLabels={"team": "ml-platform", "severity": "overridden"},
        operatorDown={"severity": "page"},
    )
    rule = prometheus_rule(values)
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == NAMESPACE
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus"
    assert rule["metadata"]["labels"]["app.kubernetes.io/instance"] == RELEASE
    found = alerts(values)
    assert set(found) == set(ALERTS.values())
    for alert in found.values():
        assert alert["labels"]["team"] == "ml-platform"
        assert alert["annotations"]["summary"] and alert["annotations"]["description"]
    assert found["ReloraOperatorDown"]["labels"]["severity"] == "page"
    assert found["ReloraMigrationFailed"]["labels"]["severity"] == "warning"


def test_the_selector_defaults_to_the_service_monitors_job_and_can_be_set() -> None:
    default = alerts(rule_values())
    service = one(render({}, release=RELEASE, namespace=NAMESPACE), "Service")
    matchers = f'job="{service["metadata"]["name"]}",namespace="{NAMESPACE}"'
    assert service["metadata"]["name"] == "relora-operator-metrics"
    for alert in default.values():
        assert matchers in alert["expr"], alert["expr"]
    own = alerts(rule_values(selector='job="relora",cluster="eu-1"'))
    for alert in own.values():
        assert 'job="relora",cluster="eu-1"' in own[alert["alert"]]["expr"]
        assert "relora-operator-metrics" not in alert["expr"]


def test_each_alert_can_be_turned_off_and_takes_its_settings() -> None:
    for key, name in ALERTS.items():
        assert name not in alerts(rule_values(**{key: {"enabled": False}}))
    tuned = alerts(
        rule_values(
            migrationStuck={"duration": "90m", "for": "2m"},
            reconcileErrors={"window": "15m", "threshold": 0.5, "for": "30m"},
        )
    )
    stuck = tuned["ReloraMigrationStuck"]
    assert "offset 90m" in stuck["expr"] and "[90m]" in stuck["expr"] and stuck["for"] == "2m"
    errors = tuned["ReloraReconcileErrors"]
    assert errors["expr"].endswith("[15m])) > 0.5") and errors["for"] == "30m"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        (
            {"metrics": {"enabled": False, "prometheusRule": {"enabled": True}}},
            "metrics.prometheusRule.enabled needs metrics.enabled: true",
        ),
        (
            rule_values(**{key: {"enabled": False} for key in ALERTS}),
            "metrics.prometheusRule.enabled with every alert off",
        ),
        (rule_values(selector='{job="x"}'), "metrics.prometheusRule.selector: Does not match"),
        (rule_values(migrationStuck={"duration": "6 hours"}), "duration: Does not match"),
        (rule_values(reconcileErrors={"threshold": -1}), "threshold: Must be greater than"),
        (rule_values(alertLabels={"bad-name": "x"}), "alertLabels"),
        (rule_values(operatorDown={"severity": ""}), "severity: String length must be"),
        (rule_values(ruleLabels={}), "Additional property ruleLabels is not allowed"),
    ],
)
def test_bad_values_are_refused_with_a_message(values: dict[str, Any], message: str) -> None:
    result = template(values, check=False)
    assert result.returncode != 0, f"accepted: {values}"
    assert message in result.stderr, result.stderr


# --------------------------------------------------------- the metrics the rules query
def _labels_of(family: str) -> set[str]:
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and any(f.name == family for f in value.describe()):
            return set(value._labelnames)
    raise AssertionError(family)


def test_rules_query_only_metrics_and_labels_the_operator_exports() -> None:
    families = defined()
    family_of = {series: family for family, names in families.items() for series in names}
    for alert in alerts(rule_values()).values():
        expr = alert["expr"]
        unknown = series_in(expr) - set(family_of) - {"up"}
        assert not unknown, f"{alert['alert']}: {sorted(unknown)} not in relora_operator/metrics"
        for name, matchers in SELECTOR.findall(expr):
            allowed = TARGET_LABELS | (_labels_of(family_of[name]) if name != "up" else set())
            for label, value in MATCHER.findall(matchers):
                assert label in allowed, f"{alert['alert']}: {name} has no label {label!r}"
                if label == "phase":
                    assert set(value.split("|")) <= set(metrics.PHASES), (alert["alert"], value)


# ------------------------------------------------------------------- promtool itself
def test_promtool_checks_the_rendered_rules(tmp_path: Path) -> None:
    for values in (
        rule_values(),
        rule_values(
            selector='job=~"relora.*",cluster="eu-1"',
            alertLabels={"team": "ml-platform"},
            migrationStuck={"duration": "1d", "for": "15m"},
            reconcileErrors={"window": "1m", "threshold": 0.25, "for": "0s"},
        ),
    ):
        path = rule_file(values, tmp_path)
        result = promtool("check", "rules", str(path), cwd=tmp_path)
        assert result.returncode == 0, result.stdout + result.stderr
        assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout, result.stdout


def test_promtool_check_rules_is_live(tmp_path: Path) -> None:
    """The checker refuses a broken expression, so its success above means something."""
    path = rule_file(rule_values(), tmp_path)
    broken = yaml.safe_load(path.read_text())
    broken["groups"][0]["rules"][0]["expr"] = "sum by (job) (relora_adapters"
    path.write_text(yaml.safe_dump(broken))
    result = promtool("check", "rules", str(path), cwd=tmp_path)
    assert result.returncode != 0, result.stdout


def test_every_alert_has_unit_tests_for_firing_and_silence() -> None:
    cases = yaml.safe_load(CASES.read_text())
    assert cases["rule_files"] == [RULES_NAME]
    checks = [c for test in cases["tests"] for c in test["alert_rule_test"]]
    for name in ALERTS.values():
        mine = [c for c in checks if c["alertname"] == name]
        assert any(c.get("exp_alerts") for c in mine), f"no case where {name} fires"
        assert any(not c.get("exp_alerts") for c in mine), f"no case where {name} is silent"


def test_the_alerts_fire_when_they_should_and_only_then(tmp_path: Path) -> None:
    result = run_cases(rule_values(), tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout, result.stdout


@pytest.mark.parametrize(
    ("rule", "fails"),
    [
        ({"operatorDown": {"for": "30m"}}, "ReloraOperatorDown"),
        ({"migrationFailed": {"for": "15m"}}, "ReloraMigrationFailed"),
        ({"migrationStuck": {"duration": "12h"}}, "ReloraMigrationStuck"),
        ({"migrationStuck": {"duration": "2h"}}, "ReloraMigrationStuck"),
        ({"reconcileErrors": {"threshold": 1}}, "ReloraReconcileErrors"),
        ({"reconcileErrors": {"for": "0s"}}, "ReloraReconcileErrors"),
        ({"selector": 'job="relora-operator-metrics"'}, "ReloraMigrationFailed"),
    ],
    ids=[
        "down-later",
        "failed-later",
        "stuck-later",
        "stuck-sooner",
        "errors-threshold",
        "errors-no-for",
        "selector-without-namespace",
    ],
)
def test_the_cases_catch_rules_that_alert_wrongly(
    rule: dict[str, Any], fails: str, tmp_path: Path
) -> None:
    """Rules changed on purpose (alerting later, sooner, or for another release too) fail the
    cases, and promtool names the alert: the cases are not vacuous."""
    result = run_cases(rule_values(**rule), tmp_path)
    assert result.returncode != 0, f"the cases pass with {rule}"
    assert f"alertname: {fails}" in result.stdout + result.stderr, result.stdout + result.stderr


def test_readme_lists_every_alert() -> None:
    text = (ROOT / "README.md").read_text()
    table = text[text.index("| alert | fires when (defaults) |") :].split("\n\n")[0]
    listed = set(re.findall(r"^\| `(Relora\w+)`", table, flags=re.MULTILINE))
    assert listed == set(ALERTS.values())
    values = (ROOT / "helm" / "relora-operator" / "values.yaml").read_text()
    for key, name in ALERTS.items():
        assert f"{name}:" in values and f"    {key}:" in values, key
