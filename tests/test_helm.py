"""The Helm chart (helm/relora-operator): lint, valid manifests, least privilege, one source of
truth for the CRD, the settings and the ports, and a values schema that refuses bad values."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import kubernetes_validate
import pytest
import yaml

import relora_operator
from relora_api import resource
from relora_api.spec import AdapterMigrationSpec
from relora_operator import __main__ as operator_main
from relora_operator import job_builder, leadership, seals, settings
from tests.conftest import ROOT
from tests.helm_chart import (
    CHART,
    KUBE_VERSION,
    container,
    container_env,
    helm,
    lease_rules,
    one,
    operator_rules,
    render,
    rules_of,
    template,
    values_file,
)

NAMESPACED: dict[str, Any] = {"watchNamespaces": ["team-a", "team-b"]}
EVERYTHING_ON: dict[str, Any] = {
    **NAMESPACED,
    "metrics": {
        "serviceMonitor": {"enabled": True, "labels": {"release": "kube-prometheus"}},
        "prometheusRule": {"enabled": True, "labels": {"release": "kube-prometheus"}},
    },
    "networkPolicy": {
        "enabled": True,
        "metricsFrom": [{"namespaceSelector": {"matchLabels": {"name": "monitoring"}}}],
        "apiServer": {"ports": [6443], "cidrs": ["10.0.0.1/32"]},
    },
    "image": {"digest": "sha256:" + "a" * 64},
    "trainer": {"image": {"repository": "registry.example/relora-trainer", "tag": "0.1.0-cu128"}},
    "operator": {"logLevel": "verbose"},
}
# Kinds that kubernetes-validate knows; ServiceMonitor and PrometheusRule (prometheus-operator
# CRDs) are checked by hand below and in tests/test_prometheus_rules.py.
LEASE_ENV = (leadership.NAMESPACE_ENV, leadership.NAME_ENV, leadership.SECONDS_ENV)
BUILT_IN = {
    "CustomResourceDefinition",
    "ServiceAccount",
    "Secret",
    "ClusterRole",
    "ClusterRoleBinding",
    "Role",
    "RoleBinding",
    "Deployment",
    "Service",
    "NetworkPolicy",
}


def _env(docs: list[dict[str, Any]]) -> dict[str, str]:
    """The settings the chart gives the operator (the seal key apart: a generated secret)."""
    env = container_env(docs)
    for variable in (seals.KEY_ENV, *LEASE_ENV):
        env.pop(variable, None)
    return env


def _arg(docs: list[dict[str, Any]], flag: str) -> list[str]:
    return [a.split("=", 1)[1] for a in container(docs)["args"] if a.startswith(f"{flag}=")]


def test_chart_lints_strictly() -> None:
    for values in ({}, NAMESPACED, EVERYTHING_ON, QUIET):
        result = helm("lint", "--strict", str(CHART), "--values", str(values_file(values)))
        assert "1 chart(s) linted, 0 chart(s) failed" in result.stdout, result.stdout


QUIET: dict[str, Any] = {
    "metrics": {"enabled": False},
    "networkPolicy": {"enabled": True},
    "crds": {"install": False},
    "rbac": {"create": False},
    "serviceAccount": {"create": False, "name": "existing"},
    "operator": {"sealKey": {"existingSecret": "own-seal-key"}},
}


@pytest.mark.parametrize(
    "values",
    [{}, NAMESPACED, EVERYTHING_ON, QUIET],
    ids=["default", "namespaced", "everything-on", "quiet"],
)
def test_rendered_manifests_are_valid(values: dict[str, Any]) -> None:
    docs = render(values)
    kinds = sorted(doc["kind"] for doc in docs)
    assert set(kinds) <= BUILT_IN | {"ServiceMonitor", "PrometheusRule"}, kinds
    for doc in docs:
        if doc["kind"] in BUILT_IN:
            kubernetes_validate.validate(doc, KUBE_VERSION, strict=True)
    # The validator is live: a wrong type in the same Deployment is refused.
    broken = one(docs, "Deployment")
    broken["spec"]["replicas"] = "one"
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(broken, KUBE_VERSION, strict=True)


def test_default_install_objects() -> None:
    docs = render()
    assert sorted(d["kind"] for d in docs) == [
        "ClusterRole",
        "ClusterRoleBinding",
        "CustomResourceDefinition",
        "Deployment",
        "Role",
        "RoleBinding",
        "Secret",
        "Service",
        "ServiceAccount",
    ]
    for doc in docs:
        if doc["kind"] not in ("CustomResourceDefinition", "ClusterRole", "ClusterRoleBinding"):
            assert doc["metadata"]["namespace"] == "relora-system", doc["kind"]


def test_chart_crd_is_the_repository_crd() -> None:
    repository = ROOT / "crds" / f"{resource.CRD_NAME}.yaml"
    copy = CHART / "files" / f"{resource.CRD_NAME}.yaml"
    assert copy.read_bytes() == repository.read_bytes(), (
        f"{copy.relative_to(ROOT)} differs from {repository.relative_to(ROOT)}: run `make crd`"
    )
    rendered = one(render(), "CustomResourceDefinition")
    # `kubectl apply` (client-side) and Argo CD store the object in a 256 KiB annotation.
    assert len(json.dumps(rendered)) < 262_144 // 2
    annotations = rendered["metadata"].pop("annotations")
    assert annotations == {"helm.sh/resource-policy": "keep"}
    assert rendered == yaml.safe_load(repository.read_text())
    # Extra annotations (Argo CD's sync wave) add to the keep policy; crds.install=false drops it.
    extra = {"argocd.argoproj.io/sync-wave": "-1"}
    annotated = one(render({"crds": {"annotations": extra}}), "CustomResourceDefinition")
    assert annotated["metadata"]["annotations"] == {"helm.sh/resource-policy": "keep", **extra}
    kinds = {d["kind"] for d in render({"crds": {"install": False}})}
    assert "CustomResourceDefinition" not in kinds


def test_rbac_is_exactly_what_the_operator_calls_cluster_wide() -> None:
    docs = render()
    role = one(docs, "ClusterRole")
    assert rules_of(role) == operator_rules(cluster_wide=True)
    binding = one(docs, "ClusterRoleBinding")
    account = one(docs, "ServiceAccount")
    assert binding["roleRef"] == {
        "apiGroup": "rbac.authorization.k8s.io",
        "kind": "ClusterRole",
        "name": role["metadata"]["name"],
    }
    assert binding["subjects"] == [
        {
            "kind": "ServiceAccount",
            "name": account["metadata"]["name"],
            "namespace": "relora-system",
        }
    ]
    assert _arg(docs, "--namespace") == [] and "--all-namespaces" in container(docs)["args"]
    assert _env(docs)["RELORA_CLUSTER_SCANNING"] == "true"


def test_rbac_namespaced_mode_has_no_cluster_scoped_permission() -> None:
    docs = render(NAMESPACED)
    kinds = {d["kind"] for d in docs}
    assert not kinds & {"ClusterRole", "ClusterRoleBinding"}
    watched = ("team-a", "team-b")
    roles = [d for d in docs if d["kind"] == "Role" and d["metadata"]["namespace"] in watched]
    bindings = [
        d for d in docs if d["kind"] == "RoleBinding" and d["metadata"]["namespace"] in watched
    ]
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert rules_of(role) == operator_rules(cluster_wide=False)
    for binding in bindings:
        assert binding["roleRef"]["kind"] == "Role"
        assert binding["subjects"][0]["namespace"] == "relora-system"
    assert _arg(docs, "--namespace") == ["team-a", "team-b"]
    assert "--all-namespaces" not in container(docs)["args"]
    # Kopf must not try to list namespaces or watch CRDs: it has no right to.
    assert settings.Settings.from_env(_env(docs)).cluster_scanning is False


def test_leader_election_rights_are_exactly_what_it_calls_in_the_release_namespace() -> None:
    for values in ({}, NAMESPACED):
        docs = render(values)
        [role] = [d for d in docs if d["kind"] == "Role" and "leader" in d["metadata"]["name"]]
        assert role["metadata"]["namespace"] == "relora-system"
        assert rules_of(role) == lease_rules()
        env = container_env(docs)
        assert env[leadership.NAMESPACE_ENV] == "relora-system"
        config = leadership.LeaseConfig.from_env(env)
        assert config is not None and config.name == role["metadata"]["name"].removesuffix(
            "-leader-election"
        )
    off = render({"leaderElection": {"enabled": False}})
    assert not [d for d in off if d["kind"] == "Role"]
    assert leadership.LeaseConfig.from_env(container_env(off)) is None


def test_operator_rules_are_what_the_readme_lists() -> None:
    text = (ROOT / "README.md").read_text()
    sentence = re.search(r"The\s+operator's own RBAC[^:]*:(.*?)Kopf's bookkeeping", text, re.S)
    assert sentence, "README: the sentence listing the operator's RBAC is missing"
    listed = {
        (name, verb)
        for name, verbs in re.findall(r"`([a-z/]+)`\s+([a-z/]+)", sentence.group(1))
        for verb in verbs.split("/")
    }
    expected = {(name, verb) for _, name, verb in operator_rules(cluster_wide=True)}
    assert listed == expected


def test_nothing_binds_the_trainer_pods() -> None:
    for values in ({}, NAMESPACED):
        docs = render(values)
        accounts = [d["metadata"]["name"] for d in docs if d["kind"] == "ServiceAccount"]
        assert accounts == ["relora-relora-operator"]
        for doc in docs:
            if doc["kind"] in ("RoleBinding", "ClusterRoleBinding"):
                assert [s["name"] for s in doc["subjects"]] == accounts
    # ...and the trainer Jobs mount no API token unless a migration asks for a ServiceAccount.
    spec = AdapterMigrationSpec.model_validate(
        yaml.safe_load((ROOT / "examples" / "sandbox-migration.yaml").read_text())["spec"]
    )
    job = job_builder.build_job(
        name="m",
        namespace="n",
        uid="u",
        spec=spec,
        adapter=spec.adapters[0],
        settings=settings.Settings(),
    )
    assert job["spec"]["template"]["spec"]["automountServiceAccountToken"] is False


def test_deployment_runs_one_hardened_operator() -> None:
    docs = render()
    deployment = one(docs, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    # Leader election on by default: a rolling update's new pod stands by until the old one
    # hands the Lease over; without it, Recreate (never two operators side by side).
    assert deployment["spec"]["strategy"] == {"type": "RollingUpdate"}
    alone = one(render({"leaderElection": {"enabled": False}}), "Deployment")
    assert alone["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == one(docs, "ServiceAccount")["metadata"]["name"]
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    main = container(docs)
    hardened = main["securityContext"]
    assert hardened["runAsNonRoot"] is True
    assert hardened["readOnlyRootFilesystem"] is True
    assert hardened["allowPrivilegeEscalation"] is False
    assert hardened["privileged"] is False
    assert hardened["capabilities"] == {"drop": ["ALL"]}
    assert hardened["seccompProfile"] == {"type": "RuntimeDefault"}
    assert main["resources"]["requests"] and main["resources"]["limits"]["memory"]
    assert main["volumeMounts"] == [{"name": "tmp", "mountPath": "/tmp"}]
    # The chart's selector is stable across upgrades: no version in it.
    selector = deployment["spec"]["selector"]["matchLabels"]
    assert "app.kubernetes.io/version" not in selector
    assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()


def test_liveness_probe_hits_the_operators_liveness_endpoint() -> None:
    for values in ({}, {"operator": {"livenessPort": 9000}}):
        docs = render(values)
        main = container(docs)
        [liveness] = _arg(docs, "--liveness")
        url = urlparse(liveness)
        ports = {p["name"]: p["containerPort"] for p in main["ports"]}
        for probe in (main["livenessProbe"], main["startupProbe"]):
            assert probe["httpGet"] == {"path": url.path, "port": "liveness"}
        assert ports["liveness"] == url.port
    # The chart's default is the operator's own default.
    default = urlparse(operator_main.LIVENESS)
    assert default.port == 8081 and _arg(render(), "--liveness") == [
        f"http://0.0.0.0:{default.port}{default.path}"
    ]


def test_settings_come_from_the_chart_with_the_operators_defaults() -> None:
    docs = render()
    env = _env(docs)
    assert set(env) == set(settings.ENV.values()), "the chart must set every RELORA_* setting"
    assert settings.Settings.from_env(env) == settings.Settings()
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert values["trainer"]["command"] == settings.Settings().trainer_command
    chart = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert chart["appVersion"] == relora_operator.__version__
    image = container(docs)["image"]
    assert image == f"ghcr.io/relora-dev/relora-operator:{relora_operator.__version__}"
    custom = settings.Settings.from_env(
        _env(
            render(
                {
                    "operator": {"resyncSeconds": 2.5, "logTailLines": 200},
                    "metrics": {"port": 9100},
                    "trainer": {
                        "command": ["relora-train"],
                        "image": {"repository": "r.example/t", "digest": "sha256:" + "b" * 64},
                    },
                }
            )
        )
    )
    assert custom.resync_seconds == 2.5 and custom.log_tail_lines == 200
    assert custom.metrics_port == 9100 and custom.trainer_command == ["relora-train"]
    assert custom.trainer_image == f"r.example/t:{relora_operator.__version__}@sha256:{'b' * 64}"
    off = settings.Settings.from_env(_env(render({"metrics": {"enabled": False}})))
    assert off.metrics_port == 0


def test_values_schema_bounds_match_the_settings() -> None:
    schema = json.loads((CHART / "values.schema.json").read_text())["properties"]
    fields = settings.Settings.model_json_schema()["properties"]
    operator = schema["operator"]["properties"]
    assert (
        operator["resyncSeconds"]["exclusiveMinimum"]
        == fields["resync_seconds"]["exclusiveMinimum"]
    )
    for bound in ("minimum", "maximum"):
        assert operator["logTailLines"][bound] == fields["log_tail_lines"][bound]
    port = schema["metrics"]["properties"]["port"]
    assert fields["metrics_port"]["minimum"] < port["minimum"]
    assert port["maximum"] == fields["metrics_port"]["maximum"]


def test_metrics_service_and_service_monitor_select_the_operator() -> None:
    docs = render(EVERYTHING_ON)
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    ports = {p["name"]: p["containerPort"] for p in container(docs)["ports"]}
    service = one(docs, "Service")
    assert service["spec"]["selector"].items() <= pod_labels.items()
    [port] = service["spec"]["ports"]
    assert port["targetPort"] == "metrics" and ports["metrics"] == settings.Settings().metrics_port
    assert port["port"] == settings.Settings().metrics_port
    monitor = one(docs, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus"
    selected = monitor["spec"]["selector"]["matchLabels"]
    assert selected.items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": ["relora-system"]}
    [endpoint] = monitor["spec"]["endpoints"]
    assert endpoint["port"] == port["name"] and endpoint["path"] == "/metrics"
    # Off by default; no metrics, no Service.
    assert "ServiceMonitor" not in {d["kind"] for d in render()}
    quiet = render({"metrics": {"enabled": False}})
    assert "Service" not in {d["kind"] for d in quiet}
    assert "metrics" not in {p["name"] for p in container(quiet)["ports"]}


def test_network_policy_admits_only_metrics_and_reaches_only_dns_and_the_api() -> None:
    docs = render(EVERYTHING_ON)
    policy = one(docs, "NetworkPolicy")["spec"]
    pod_labels = one(docs, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert policy["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert policy["policyTypes"] == ["Ingress", "Egress"]
    [ingress] = policy["ingress"]
    assert ingress["ports"] == [{"port": "metrics", "protocol": "TCP"}]
    assert ingress["from"] == EVERYTHING_ON["networkPolicy"]["metricsFrom"]
    dns, api = policy["egress"]
    assert {p["port"] for p in dns["ports"]} == {53} and "to" not in dns
    assert api["ports"] == [{"port": 6443, "protocol": "TCP"}]
    assert api["to"] == [{"ipBlock": {"cidr": "10.0.0.1/32"}}]
    assert "NetworkPolicy" not in {d["kind"] for d in render()}
    assert one(render(QUIET), "NetworkPolicy")["spec"]["ingress"] == []


def test_bring_your_own_service_account_and_rbac() -> None:
    docs = render(QUIET)
    assert sorted(d["kind"] for d in docs) == ["Deployment", "NetworkPolicy"]
    assert one(docs, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "existing"
    (key,) = [e for e in container(docs)["env"] if e["name"] == seals.KEY_ENV]
    assert key["valueFrom"]["secretKeyRef"] == {"name": "own-seal-key", "key": "key"}


def test_the_seal_key_is_a_generated_secret_kept_across_upgrades() -> None:
    """The key that signs finished outcomes: generated (long enough for the operator), kept on
    uninstall, read by the operator from the Secret (never a plain value in the Deployment)."""
    docs = render()
    secret = one(docs, "Secret")
    assert secret["metadata"]["annotations"]["helm.sh/resource-policy"] == "keep"
    (key,) = [e for e in container(docs)["env"] if e["name"] == seals.KEY_ENV]
    assert key["valueFrom"]["secretKeyRef"] == {"name": secret["metadata"]["name"], "key": "key"}
    value, given = seals.key_from_env(container_env(docs))
    assert given and len(value) >= seals.MIN_KEY_LENGTH
    assert container_env(render())[seals.KEY_ENV] != value.decode(), "a fresh install: a new key"


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"watchNamespaces": ["Team_A"]}, "watchNamespaces.0: Does not match pattern"),
        ({"watchNamespaces": ["a", "a"]}, "watchNamespaces: array items[0,1] must be unique"),
        ({"operator": {"resyncSeconds": 0}}, "operator.resyncSeconds: Must be greater than 0"),
        ({"operator": {"logTailLines": 0}}, "operator.logTailLines: Must be greater than or"),
        ({"image": {"pullPolicy": "Sometimes"}}, "image.pullPolicy must be one of"),
        ({"image": {"digest": "latest"}}, "image.digest: Does not match pattern"),
        ({"metrics": {"port": 70000}}, "metrics.port: Must be less than or equal to 65535"),
        ({"replicas": 2}, "Additional property replicas is not allowed"),
        (
            {"replicaCount": 2, "leaderElection": {"enabled": False, "leaseSeconds": 15}},
            "replicaCount > 1 needs leaderElection.enabled: true",
        ),
        ({"leaderElection": {"leaseSeconds": 0}}, "leaderElection.leaseSeconds: Must be greater"),
        ({"trainer": {"command": []}}, "trainer.command: Array must have at least 1 items"),
        (
            {"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}},
            "metrics.serviceMonitor.enabled needs metrics.enabled: true",
        ),
        ({"serviceAccount": {"create": False}}, "serviceAccount.name is required"),
        (
            {"metrics": {"port": 8081}},
            "metrics.port and operator.livenessPort must differ",
        ),
    ],
)
def test_bad_values_are_refused_with_a_message(values: dict[str, Any], message: str) -> None:
    result = template(values, check=False)
    assert result.returncode != 0, f"accepted: {values}"
    assert message in result.stderr, result.stderr


def test_helm_readme_points_at_the_chart() -> None:
    text = (ROOT / "helm" / "README.md").read_text()
    assert "helm/relora-operator" in text and "to come" not in text
    assert Path(CHART / "values.schema.json").is_file()
