"""The scale benchmark (benchmarks/scale.py) and the scaling fixes it led to, as behaviour.

No timing is asserted here: the benchmark's numbers live in its report (README, "Scale").
"""

from __future__ import annotations

import asyncio
import copy
import json
import logging
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from benchmarks import scale
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from relora_api import contract
from relora_operator import handlers, metrics, reconciler
from relora_operator.kube import Kube
from relora_operator.settings import Settings
from relora_sandbox import schema
from tests.conftest import python_job, untyped, wait_for

CRD_FILE = Path(__file__).parent.parent / "crds" / "adaptermigrations.relora.dev.yaml"
GROUP, VERSION, PLURAL = scale.GROUP, scale.VERSION, scale.PLURAL


# ------------------------------------------------------------------ the benchmark itself
def test_ten_migrations_end_ready_with_one_job_each(tmp_path: Path) -> None:
    report = scale.run(migrations=10, out=tmp_path, batch=4, timeout=120)
    assert json.loads((tmp_path / "scale-report.json").read_text()) == report
    markdown = (tmp_path / "scale-report.md").read_text()
    assert "| metric | relora-operator | plain Kopf floor | ratio |" in markdown
    assert set(report["results"]) == {"relora", "floor"}
    assert (
        set(report["ratios"])
        == {label for label, _, _ in scale.ROWS}
        - {
            "requests / running migration / min"  # only with --hold
        }
        - scale.STEADY_ROWS
    )
    for subject, result in report["results"].items():
        assert result["finished"], subject
        assert result["migrationsReady"] == 10, subject
        assert result["migrationsWithExactlyOneJob"] == 10, subject
        assert result["jobsPerMigration"] == {"1": 10}, subject
        assert result["podsPerMigration"] == 1.0, subject  # no trainer failed
        assert result["createToJobSeconds"]["count"] == 10
        assert result["createToReadySeconds"]["count"] == 10
        for key in ("p50", "p99"):
            assert 0 < result["createToJobSeconds"][key] <= result["createToReadySeconds"]["max"]
        assert result["operatorPeakRssMiB"] > 0 and result["operatorCpuSeconds"] > 0
        assert result["storeEventsPerMigration"]["adaptermigrations"] >= 1
        requests = result["apiRequestsByKind"]
        assert requests["create jobs"] == 10, subject
        assert sum(requests.values()) == result["apiRequests"]
    ours = report["results"]["relora"]["apiRequestsByKind"]
    assert ours["patch adaptermigrations/status"] >= 10  # the operator reports; the floor not
    assert report["results"]["relora"]["reconciles"] >= 10


def test_steady_state_and_churn_are_measured(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--steady: requests per second with every trainer running (progress reads apart), then
    the operator's memory over create/delete cycles."""
    monkeypatch.setenv("RELORA_RESYNC_SECONDS", "1")  # a progress read a second per pod
    found = scale.run_steady(
        "relora",
        4,
        tmp_path,
        settle=1.5,
        window=3.0,
        every=1,
        cycles=2,
        size=3,
        timeout=120,
    )
    steady, churn = found["steady"], found["churn"]
    assert steady["allRunning"] and steady["migrations"] == 4
    assert steady["progressReadsPerSecond"] > 0, steady  # the trainers' progress is read
    assert steady["requestsPerSecond"] == pytest.approx(sum(steady["byKind"].values()))
    assert "list jobs" not in steady["byKind"] and "list pods" not in steady["byKind"]
    assert churn["allRunningAndDeleted"] and len(churn["rssMiB"]) == 2
    assert churn["rssBeforeMiB"] > 0 and churn["rssAfterMiB"] > 0


def test_requests_are_named_by_verb_and_resource() -> None:
    cases: list[tuple[str, str, dict[str, str], str]] = [
        ("GET", "/apis/batch/v1/namespaces/a/jobs", {}, "list jobs"),
        ("GET", "/apis/batch/v1/namespaces/a/jobs", {"watch": "true"}, "watch jobs"),
        ("GET", "/api/v1/namespaces/a/pods/p-1/log", {}, "get pods/log"),
        ("POST", "/api/v1/namespaces/a/events", {}, "create events"),
        (
            "PATCH",
            "/apis/relora.dev/v1alpha1/namespaces/a/adaptermigrations/m/status",
            {},
            "patch adaptermigrations/status",
        ),
        (
            "GET",
            "/apis/apiextensions.k8s.io/v1/customresourcedefinitions",
            {},
            "list customresourcedefinitions",
        ),
        ("GET", "/apis", {}, "discovery"),
        ("GET", "/api/v1", {}, "discovery"),
    ]
    for method, path, query, expected in cases:
        assert scale.classify(method, path, query) == expected


@pytest.mark.parametrize("hold", [0, 1])
def test_the_stand_in_trainer_follows_the_contract(tmp_path: Path, hold: int) -> None:
    termination = tmp_path / "termination-log"
    command = scale.stand_in_command(hold)
    env = {contract.ENV_TERMINATION_LOG: str(termination)}
    run = subprocess.run(command, env=env, check=True, timeout=10, capture_output=True, text=True)
    outcome = contract.Outcome.decode(termination.read_text())
    assert outcome is not None and outcome.kind == "result", shlex.join(command)
    assert outcome.result is not None and outcome.result.ready
    progress = contract.last_progress(run.stdout)
    assert (progress is not None) == bool(hold), run.stdout
    if progress is not None:
        assert progress.stage == "finetune" and progress.max_steps == hold


# ------------------------------------------------------------------ sandbox fixes
def test_cel_verdicts_are_memoized_per_value_and_old_value() -> None:
    crd = yaml.safe_load(CRD_FILE.read_text())
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    document = scale.migration("m1")
    first = schema.check(rules, document).causes
    hits = schema._evaluate.cache_info().hits
    assert schema.check(rules, document).causes == first == []
    assert schema._evaluate.cache_info().hits > hits  # the same values: not evaluated again
    changed = copy.deepcopy(document)
    changed["spec"]["sourceModel"]["uri"] = "pvc://models/v0"
    assert schema.check(rules, document, old=document).causes == []
    causes = schema.check(rules, changed, old=document).causes  # an immutable field changed
    assert any("sourceModel" in path for path, _ in causes), causes


def test_each_subject_starts_without_the_verdicts_of_the_one_before(tmp_path: Path) -> None:
    """The memo is process-wide: the subject measured second would otherwise create its
    migrations (the same specs) almost for free (the floor's create -> Job p99 fell by half)."""
    crd = yaml.safe_load(CRD_FILE.read_text())
    rules = crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    schema.check(rules, scale.migration("m1"))
    assert schema._evaluate.cache_info().currsize > 0
    scale.fresh_sandbox(tmp_path)  # made, not started
    assert schema._evaluate.cache_info().currsize == 0


def test_finished_jobs_are_left_alone_by_the_runner(sandbox: Any, api: Any, namespace: str) -> None:
    batch = untyped(client.BatchV1Api(api))
    batch.create_namespaced_job(namespace, python_job("done", "print('ok')"))
    wait_for(
        lambda: batch.read_namespaced_job_status("done", namespace).status.succeeded == 1,
        timeout=60,
        what="the Job completes",
    )
    store = sandbox.emulator.store
    jobs_kind = sandbox.emulator.kind("batch", "v1", "jobs")
    pods_kind = sandbox.emulator.kind("", "v1", "pods")

    def snapshot() -> Any:
        return copy.deepcopy([store.select(kind, namespace)[0] for kind in (jobs_kind, pods_kind)])

    before = sandbox.thread.call(snapshot)
    for _ in range(3):  # the runner reads the stored objects without copying: none may change
        sandbox.thread.call(sandbox.jobs.reconcile)
    assert sandbox.thread.call(snapshot) == before


# ------------------------------------------------------------------ operator fixes
@pytest.fixture
def migrations(api: Any, namespace: str) -> Iterator[Any]:
    """The AdapterMigration CRD in the sandbox and the custom objects API."""
    extensions = untyped(client.ApiextensionsV1Api(api))
    try:
        extensions.create_custom_resource_definition(yaml.safe_load(CRD_FILE.read_text()))
    except ApiException as error:
        assert error.status == 409
    yield untyped(client.CustomObjectsApi(api))


def _phases() -> dict[str, float]:
    return {p: metrics.ADAPTERS.labels(phase=p)._value.get() for p in metrics.PHASES}


def test_phases_are_counted_per_migration_and_echoes_skipped(
    api: Any, namespace: str, migrations: Any
) -> None:
    settings = Settings(trainer_command=scale.stand_in_command(), metrics_port=0)
    bodies = [
        migrations.create_namespaced_custom_object(
            GROUP, VERSION, namespace, PLURAL, scale.migration(name, namespace)
        )
        for name in ("one", "two")
    ]
    uids = [body["metadata"]["uid"] for body in bodies]

    async def scenario() -> reconciler.Operator:
        operator = reconciler.Operator(settings, Kube(api), b"k" * 32)
        for body in bodies:
            operator.migration_event("ADDED", body)  # as the watch hands it over
        deadline = asyncio.get_running_loop().time() + 60
        while not all(_phase(operator, uid) == "Succeeded" for uid in uids):
            assert asyncio.get_running_loop().time() < deadline, "both migrations succeed"
            await asyncio.sleep(0.2)
            await operator.relist(namespace)  # no watch here: lists feed the cache
        assert _phases()["Succeeded"] == 2 and _phases()["Pending"] == 0
        jobs = untyped(client.BatchV1Api(api)).list_namespaced_job(namespace).items
        assert len(jobs) == 2

        # The watch event of the operator's own last status write needs no reconciliation ...
        state = operator.registry.get(uids[0])
        assert state is not None
        body = migrations.get_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "one")
        assert state.own_write(body)
        # ... unlike one with another status, a new generation, or a deletion under way.
        assert not state.own_write({**body, "status": {**body["status"], "phase": "X"}})
        newer = {**body, "metadata": {**body["metadata"], "generation": 2}}
        assert not state.own_write(newer)
        deleting = {
            **body,
            "metadata": {**body["metadata"], "deletionTimestamp": "2026-01-01T00:00:00Z"},
        }
        assert not state.own_write(deleting)
        other = operator.registry.get(uids[1])
        assert other is not None and not other.own_write(body)  # another migration's status

        # A deleted migration leaves the count and the memory, found by a list (no watch).
        migrations.delete_namespaced_custom_object(GROUP, VERSION, namespace, PLURAL, "one")
        await operator.relist(namespace)
        assert operator.registry.get(uids[0]) is None
        assert _phases()["Succeeded"] == 1
        await asyncio.gather(*operator.poker.tasks)
        operator.stop()  # its watches
        return operator

    operator = asyncio.run(scenario())
    assert uids[0] not in operator.poker.timers and uids[0] not in operator.children.by_migration


def _phase(operator: reconciler.Operator, uid: str) -> str | None:
    state = operator.registry.get(uid)
    return None if state is None else state.body["status"].get("phase")


def test_kopf_handler_successes_are_not_logged_at_info() -> None:
    objects, root = logging.getLogger("kopf.objects"), logging.getLogger()
    saved = objects.level, root.level
    try:
        objects.setLevel(logging.NOTSET)
        root.setLevel(logging.INFO)  # kopf run: INFO by default
        handlers.quiet_handler_logs()
        assert not objects.isEnabledFor(logging.INFO) and objects.isEnabledFor(logging.WARNING)
        objects.setLevel(logging.NOTSET)
        root.setLevel(logging.DEBUG)  # kopf run --verbose or --debug
        handlers.quiet_handler_logs()
        assert objects.isEnabledFor(logging.INFO)
    finally:
        objects.setLevel(saved[0])
        root.setLevel(saved[1])


def test_create_job_reports_twins_and_reuses_its_connection(
    sandbox: Any, api: Any, namespace: str
) -> None:
    from kubernetes import config

    kube = Kube(config.new_client_from_config(config_file=str(sandbox.kubeconfig_path)))
    job = python_job("twin", "print('ok')", suspend=True)

    async def create_twice() -> list[bool]:
        return [await kube.create_job(namespace, copy.deepcopy(job)) is not None for _ in range(3)]

    assert asyncio.run(create_twice()) == [True, False, False]
    pools = kube.api.rest_client.pool_manager.pools
    (key,) = list(pools.keys())
    assert pools[key].num_connections == 1  # each answer was drained: its connection reused
