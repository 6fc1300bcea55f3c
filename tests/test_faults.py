"""Fault injection, end to end: the operator (its own process) against the sandbox, with a fast
trainer stand-in (tests/fake_trainer.py) that the test holds in the phase it wants.

Each test injects one kind of fault into a running migration and checks the end state: the
status is right and explains itself, one Job per adapter, attempts not inflated, no finished
result lost, nothing left stuck. The faults that need the real trainer (a pod killed during the
search, corrupted inputs and checkpoints) are in tests/test_faults_trainer.py.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from kubernetes import client
from kubernetes.client.exceptions import ApiException

from relora_operator import leadership
from relora_sandbox.faults import Fault
from tests.conftest import kubectl_binary, wait_for
from tests.fault_kit import (
    FAKE_TRAINER,
    Cluster,
    Obj,
    OperatorProcess,
    Trainers,
    fake_manifest,
    process_alive,
)


@pytest.fixture
def operator(fake_operator: OperatorProcess) -> OperatorProcess:
    """The operator with the trainer stand-in (conftest's runs the real trainer)."""
    return fake_operator


class Requests:
    """Records (method, path, query) of every API request while installed."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, str, str]] = []
        self.lock = threading.Lock()

    def __call__(self, request: web.Request) -> None:
        with self.lock:
            self.seen.append((request.method, request.path, request.query_string))

    def relists(self, plural: str) -> int:
        """Kopf's LISTs of ``plural`` (it lists again after 410 Gone): not watches, and not the
        operator's own reads, which select by migration name or uid."""
        with self.lock:
            return sum(
                1
                for method, path, query in self.seen
                if method == "GET"
                and path.endswith(f"/{plural}")
                and "watch=" not in query
                and "fieldSelector" not in query
                and "migration-uid" not in query
            )


@pytest.fixture
def requests(sandbox: Any) -> Iterator[Requests]:
    recorder = Requests()
    hooks = sandbox.emulator.request_hooks
    sandbox.thread.call(hooks.append, recorder)
    yield recorder
    sandbox.thread.call(hooks.remove, recorder)


def _running(cluster: Cluster, name: str, adapters: list[str]) -> None:
    for adapter in adapters:
        cluster.wait_adapter(name, adapter, "Running")


def _assert_succeeded(cluster: Cluster, name: str, adapters: list[str]) -> dict[str, Any]:
    status = cluster.status(name)
    assert status["phase"] == "Succeeded", status
    assert status["progress"] == f"{len(adapters)}/{len(adapters)}"
    ready = cluster.condition(name, "Ready")
    assert ready["status"] == "True" and ready["reason"] == "Succeeded", ready
    assert ready["message"] == f"{len(adapters)}/{len(adapters)} adapters ready"
    entries = {a["name"]: a for a in status["adapters"]}
    assert sorted(entries) == sorted(adapters)
    for entry in entries.values():
        assert entry["phase"] == "Succeeded" and entry["reason"] == "Ready", entry
        assert entry["result"]["ready"] is True and entry["result"]["qualityAfter"] == 0.93
    return status


def _wait_events(cluster: Cluster, name: str, expected: dict[str, int]) -> None:
    """The events of ``name`` with these reasons number exactly ``expected`` (they are posted
    just after the status: wait for them, then check there are no duplicates)."""

    def counts() -> dict[str, int]:
        found = [e["reason"] for e in cluster.events(name)]
        return {reason: found.count(reason) for reason in expected}

    def enough() -> dict[str, int] | None:
        found = counts()
        return found if all(found[r] >= n for r, n in expected.items()) else None

    wait_for(enough, timeout=10, what=f"events {expected}")
    assert counts() == expected, [(e["reason"], e["message"]) for e in cluster.events(name)]


# ---------------------------------------------------------------- 1. API server faults
def test_api_server_restart_and_dropped_watches_during_a_migration(
    sandbox: Any,
    cluster: Cluster,
    operator: OperatorProcess,
    trainers: Trainers,
    requests: Requests,
) -> None:
    adapters = ["compacted", "restarted", "slowed"]
    cluster.create(fake_manifest("outage", cluster.namespace, adapters, trainers))
    _running(cluster, "outage", adapters)
    store = sandbox.emulator.store

    # History compacted, then every watch dropped: the resumed watches get 410 Gone, Kopf lists
    # again. The first adapter finishes meanwhile.
    relists = {plural: requests.relists(plural) for plural in ("jobs", "adaptermigrations")}
    sandbox.thread.call(store.compact)
    sandbox.thread.call(store.close_watches)
    trainers.release("compacted")
    cluster.wait_adapter("outage", "compacted", "Ready")
    for plural, before in relists.items():
        wait_for(
            lambda plural=plural, before=before: requests.relists(plural) > before,
            what=f"Kopf listing the {plural} again after 410 Gone",
        )

    # The API server restarts (connections reset, port refusing for 1.5 s); the second adapter
    # finishes while it is down.
    restart = sandbox.thread.run  # blocks until served again
    trainers.release("restarted")
    restart(sandbox.restart(down_seconds=1.5))
    cluster.wait_adapter("outage", "restarted", "Ready")

    # Slow responses (0.3 s each) while the last adapter finishes.
    sandbox.thread.call(setattr, sandbox.emulator, "delay_seconds", 0.3)
    try:
        trainers.release("slowed")
        cluster.wait_phase("outage", "Succeeded", "Failed", timeout=60)
    finally:
        sandbox.thread.call(setattr, sandbox.emulator, "delay_seconds", 0.0)

    status = _assert_succeeded(cluster, "outage", adapters)
    assert [a["attempts"] for a in status["adapters"]] == [1, 1, 1]
    assert len(cluster.jobs("outage")) == 3
    assert operator.alive, operator.tail()
    assert operator.metric("relora_adapter_jobs_created_total") == 3
    assert operator.metric('relora_migrations_total{result="succeeded"}') == 1
    assert all(len(trainers.attempts(a)) == 1 for a in adapters)
    # Each transition counted and announced once, though the faults replayed the objects.
    finished_metric = 'relora_adapter_jobs_finished_total{reason="Ready",result="ready"}'
    assert operator.metric(finished_metric) == 3
    _wait_events(cluster, "outage", {"AdapterSucceeded": 3, "MigrationSucceeded": 1})


def test_a_job_deleted_while_the_watches_were_down_is_noticed(
    sandbox: Any, cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """Kopf lists again after 410 Gone but sends no DELETED for what vanished meanwhile: the
    operator must not act on a Job that is gone (here: wait forever for its pod)."""
    cluster.create(fake_manifest("blind", cluster.namespace, ["one"], trainers))
    _running(cluster, "blind", ["one"])
    (job,) = cluster.jobs("blind")
    (first,) = trainers.wait_started("one")
    emulator, store = sandbox.emulator, sandbox.emulator.store
    jobs_kind = emulator.registry.kinds[("batch", "v1", "jobs")]

    def outage() -> None:  # one step on the sandbox's loop: no watch sees the deletion
        store.close_watches()
        emulator.delete(jobs_kind, cluster.namespace, job["metadata"]["name"], "Background")
        store.compact()

    sandbox.thread.call(outage)
    trainers.wait_started("one", 2)
    trainers.release("one")
    cluster.wait_phase("blind", "Succeeded", "Failed", timeout=30)
    status = _assert_succeeded(cluster, "blind", ["one"])
    assert status["adapters"][0]["attempts"] == 1
    (again,) = cluster.jobs("blind")
    assert again["metadata"]["uid"] != job["metadata"]["uid"]
    assert first not in [p["metadata"]["name"] for p in cluster.pods("blind")]


# ---------------------------------------------------------------- 2. operator SIGKILL
def _job_condition(job: dict[str, Any] | None, kind: str) -> bool:
    conditions = ((job or {}).get("status") or {}).get("conditions") or []
    return any(c["type"] == kind and c["status"] == "True" for c in conditions)


def test_operator_killed_at_every_phase_of_a_migration(
    sandbox: Any, cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """One SIGKILL while migrations stand at each phase; what happens while the operator is down
    (a new migration, a pod finishing, a pod crashing) is picked up by the restarted one."""
    namespace = cluster.namespace
    fault = Fault("Unschedulable", "relora.dev/migration=pending")
    sandbox.thread.call(sandbox.jobs.add_fault, fault)
    try:
        cluster.create(fake_manifest("queued", namespace, ["a"], trainers, queueName="gpu"))
        cluster.create(fake_manifest("pending", namespace, ["b"], trainers))
        cluster.create(fake_manifest("running", namespace, ["c"], trainers))
        finishing = fake_manifest("finishing", namespace, ["d"], trainers)
        finishing["spec"]["ttlSecondsAfterFinished"] = 0
        cluster.create(finishing)
        cluster.create(fake_manifest("crashing", namespace, ["e"], trainers))
        cluster.wait_adapter("queued", "a", "Queued")
        cluster.wait_adapter("pending", "b", "Unschedulable")
        for name, adapter in (("running", "c"), ("finishing", "d"), ("crashing", "e")):
            cluster.wait_adapter(name, adapter, "Running")
            trainers.wait_started(adapter)
        before = {j["metadata"]["name"]: j["metadata"]["uid"] for j in cluster.jobs()}
        assert len(before) == 5

        operator.kill()
        # While it is down: a migration is created (no Job yet), a pod finishes (its Job's
        # TTL must not run before the result is recorded), a pod crashes and is retried.
        cluster.create(fake_manifest("new", namespace, ["f"], trainers))
        trainers.release("d")
        trainers.release("e", "crash")
        (finished_job,) = cluster.jobs("finishing")
        wait_for(
            lambda: _job_condition(cluster.job(finished_job["metadata"]["name"]), "Complete"),
            what="the finishing Job complete",
        )
        trainers.wait_started("e", 2)
        operator.start()

        cluster.wait_phase("finishing", "Succeeded", "Failed")
        cluster.wait_adapter("new", "f", "Running")
        cluster.wait_adapter("crashing", "e", "Running")
        (queued_job,) = cluster.jobs("queued")
        cluster.batch.patch_namespaced_job(  # admitted by the queue, as Kueue does
            queued_job["metadata"]["name"], namespace, {"spec": {"suspend": False}}
        )
    finally:
        sandbox.thread.call(sandbox.jobs.faults.remove, fault)
    for adapter in "abcef":
        trainers.release(adapter)
    for name in ("queued", "pending", "running", "crashing", "new"):
        cluster.wait_phase(name, "Succeeded", "Failed")

    attempts = {}
    for name, adapter in zip(
        ("queued", "pending", "running", "finishing", "crashing", "new"), "abcdef", strict=True
    ):
        _assert_succeeded(cluster, name, [adapter])
        attempts[name] = cluster.adapter(name, adapter)["attempts"]
        assert len(trainers.attempts(adapter)) == attempts[name]
    assert attempts == {
        "queued": 1,
        "pending": 1,
        "running": 1,
        "finishing": 1,
        "crashing": 2,
        "new": 1,
    }
    # No twin: every Job from before the kill is the same object, "new" got exactly one, and
    # the finished Job went away by its TTL only after its result was recorded.
    wait_for(lambda: not cluster.jobs("finishing"), what="the finished Job deleted by its TTL")
    after = {j["metadata"]["name"]: j["metadata"]["uid"] for j in cluster.jobs()}
    assert {k: v for k, v in after.items() if k in before} == {
        k: v for k, v in before.items() if not k.startswith("finishing-")
    }
    assert len(after) == 5 and len(cluster.jobs("new")) == 1
    assert operator.metric("relora_adapter_jobs_created_total") == 1
    assert operator.metric("relora_adapter_jobs_retried_total") == 1
    assert cluster.adapter("finishing", "d")["result"]["qualityAfter"] == 0.93


def test_operator_killed_while_it_creates_the_jobs(
    sandbox: Any, cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """SIGKILL once the API server has stored the first Job, before its answer reaches the
    operator, which therefore writes no status. The restarted one makes only the missing Job."""
    killed = threading.Event()

    def kill_on_job_stored(type_: str, kind: Any, obj: dict[str, Any], old: Any) -> None:
        if (
            type_ == "ADDED"
            and kind.plural == "jobs"
            and obj["metadata"]["namespace"] == cluster.namespace
            and not killed.is_set()
        ):
            killed.set()
            assert operator.process is not None
            operator.process.send_signal(signal.SIGKILL)

    listeners = sandbox.emulator.store.listeners
    sandbox.thread.call(listeners.append, kill_on_job_stored)
    try:
        cluster.create(fake_manifest("midway", cluster.namespace, ["one", "two"], trainers))
        wait_for(killed.is_set, what="the first Job stored")
        assert operator.process is not None
        operator.process.wait(timeout=10)
    finally:
        sandbox.thread.call(listeners.remove, kill_on_job_stored)
    wait_for(lambda: len(cluster.jobs("midway")) == 1, what="the Job the POST created")
    assert not cluster.status("midway"), "the killed operator wrote no status"
    operator.start()
    for adapter in ("one", "two"):
        cluster.wait_adapter("midway", adapter, "Running")
        trainers.release(adapter)
    cluster.wait_phase("midway", "Succeeded", "Failed")
    status = _assert_succeeded(cluster, "midway", ["one", "two"])
    assert [a["attempts"] for a in status["adapters"]] == [1, 1]
    assert len(cluster.jobs("midway")) == 2
    assert operator.metric("relora_adapter_jobs_created_total") == 1


# ---------------------------------------------------------------- 3. Job deleted by hand
def test_a_job_deleted_by_hand_mid_run_is_created_again(
    cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """`kubectl delete job` (propagation Background: its pod goes too). The migration is not
    finished, so the operator creates the Job again and says so; the trainer would resume from
    the state it saved in the output."""
    cluster.create(fake_manifest("handy", cluster.namespace, ["one"], trainers))
    cluster.wait_adapter("handy", "one", "Running")
    (first,) = trainers.wait_started("one")
    (job,) = cluster.jobs("handy")
    cluster.batch.delete_namespaced_job(
        job["metadata"]["name"], cluster.namespace, propagation_policy="Background"
    )
    second = trainers.wait_started("one", 2)[1]
    assert not process_alive(trainers.pid("one", first)), "the deleted Job's trainer was stopped"
    wait_for(
        lambda: any(
            e["message"].startswith("one: JobRecreated: Job handy-one-")
            and "was deleted before it finished; created again" in e["message"]
            for e in cluster.events("handy")
        ),
        what="an event saying the Job was created again",
    )
    (again,) = cluster.jobs("handy")
    assert again["metadata"]["name"] == job["metadata"]["name"]
    assert again["metadata"]["uid"] != job["metadata"]["uid"]
    trainers.release("one")
    cluster.wait_phase("handy", "Succeeded", "Failed")
    status = _assert_succeeded(cluster, "handy", ["one"])
    assert status["adapters"][0]["attempts"] == 1  # pods of the new Job only
    assert [p["metadata"]["name"] for p in cluster.pods("handy")] == [second]


def test_a_job_deleted_without_its_pod_waits_for_the_old_trainer(
    cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """A client deleting the Job with the API's default for Jobs (propagation Orphan) leaves its
    pod running: a new Job now would run two trainers on one output folder. The operator waits
    for the old pod to end, saying why, and only then creates the Job again."""
    cluster.create(fake_manifest("orphans", cluster.namespace, ["one"], trainers))
    cluster.wait_adapter("orphans", "one", "Running")
    (first,) = trainers.wait_started("one")
    (job,) = cluster.jobs("orphans")
    cluster.batch.delete_namespaced_job(job["metadata"]["name"], cluster.namespace)
    waiting = cluster.wait_adapter("orphans", "one", "WaitingForOldPod")
    assert first in waiting["message"] and "deleted" in waiting["message"], waiting
    ready = cluster.condition("orphans", "Ready")
    assert ready["status"] == "False" and ready["reason"] == "WaitingForOldPod", ready
    assert cluster.jobs("orphans") == [] and trainers.attempts("one") == [first]
    assert process_alive(trainers.pid("one", first))
    trainers.release("one")  # the old trainer ends; the new Job's trainer finds the release too
    cluster.wait_phase("orphans", "Succeeded", "Failed")
    _assert_succeeded(cluster, "orphans", ["one"])
    assert len(trainers.attempts("one")) == 2 and len(cluster.jobs("orphans")) == 1


# ---------------------------------------------------------------- 7. migration deleted
def test_deleting_a_migration_mid_run_cleans_up_and_the_others_go_on(
    cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    namespace = cluster.namespace
    cluster.create(fake_manifest("doomed", namespace, ["a", "b"], trainers))
    cluster.create(fake_manifest("foreground", namespace, ["c"], trainers))
    cluster.create(fake_manifest("survivor", namespace, ["d"], trainers))
    pids = {}
    for name, adapters in (("doomed", "ab"), ("foreground", "c"), ("survivor", "d")):
        for adapter in adapters:
            cluster.wait_adapter(name, adapter, "Running")
            (pod,) = trainers.wait_started(adapter)
            pids[adapter] = trainers.pid(adapter, pod)
        assert not cluster.get(name)["metadata"].get("finalizers"), "no finalizer to get stuck"

    cluster.delete("doomed")  # Background, the default for custom resources
    cluster.delete("foreground", "Foreground")  # kubectl delete --cascade=foreground
    for name in ("doomed", "foreground"):
        wait_for(lambda name=name: cluster.find(name) is None, what=f"{name} gone")
        wait_for(
            lambda name=name: not cluster.jobs(name) and not cluster.pods(name),
            what=f"the Jobs and pods of {name} gone",
        )
    for adapter in "abc":
        wait_for(lambda a=adapter: not process_alive(pids[a]), what=f"trainer {adapter} stopped")

    assert process_alive(pids["d"]) and cluster.adapter("survivor", "d")["reason"] == "Running"
    trainers.release("d")
    cluster.wait_phase("survivor", "Succeeded", "Failed")
    _assert_succeeded(cluster, "survivor", ["d"])
    assert operator.alive and "Traceback" not in operator.tail(100_000), operator.tail()
    assert operator.metric("relora_adapter_jobs_created_total") == 4


def test_a_migration_deleted_while_the_watches_were_down_is_let_go(
    sandbox: Any, cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """Kopf's cache keeps a migration deleted during a watch outage: the operator must neither
    recreate its Jobs (their owner is gone) nor keep reconciling it."""
    namespace = cluster.namespace
    cluster.create(fake_manifest("vanished", namespace, ["one"], trainers))
    cluster.wait_adapter("vanished", "one", "Running")
    (first,) = trainers.wait_started("one")
    pid = trainers.pid("one", first)
    emulator, store = sandbox.emulator, sandbox.emulator.store
    kind = emulator.kind("relora.dev", "v1alpha1", "adaptermigrations")

    def outage() -> None:  # one step on the sandbox's loop: no watch sees the deletion
        store.close_watches()
        emulator.delete(kind, namespace, "vanished")
        store.compact()

    sandbox.thread.call(outage)
    wait_for(
        lambda: (
            "/vanished (uid " in operator.tail(100_000)
            and "is gone: no more reconciling" in operator.tail(100_000)
        ),
        what="the operator letting the deleted migration go",
    )
    wait_for(lambda: not cluster.jobs("vanished") and not cluster.pods("vanished"))
    wait_for(lambda: not process_alive(pid), what="its trainer stopped")
    assert trainers.attempts("one") == [first], "no Job made again for a deleted migration"
    assert operator.metric("relora_adapter_jobs_created_total") == 1

    cluster.create(fake_manifest("next", namespace, ["two"], trainers))
    cluster.wait_adapter("next", "two", "Running")
    trainers.release("two")
    cluster.wait_phase("next", "Succeeded", "Failed")
    _assert_succeeded(cluster, "next", ["two"])
    assert trainers.attempts("one") == [first]


# ---------------------------------------------------------------- 8. spec edited mid-run
def test_immutable_fields_are_refused_and_suspend_applies_by_level(
    cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    manifest = fake_manifest("edited", cluster.namespace, ["one"], trainers)
    cluster.create(manifest)
    cluster.wait_adapter("edited", "one", "Running")
    (first,) = trainers.wait_started("one")
    moved = [{**manifest["spec"]["adapters"][0], "uri": "pvc://adapters/elsewhere"}]
    for patch, message in (
        ({"sourceModel": {"uri": "pvc://models/v0"}}, "sourceModel is immutable"),
        ({"targetModel": {"uri": "pvc://models/v3"}}, "targetModel is immutable"),
        ({"adapters": moved}, "adapters are immutable"),
    ):
        with pytest.raises(ApiException) as refused:
            cluster.patch("edited", {"spec": patch})
        assert refused.value.status == 422, refused.value
        assert message in str(refused.value.body), refused.value.body
    assert cluster.get("edited")["metadata"]["generation"] == 1

    cluster.patch("edited", {"spec": {"suspend": True}})
    cluster.wait_phase("edited", "Suspended")
    (job,) = cluster.jobs("edited")
    assert job["spec"]["suspend"] is True
    wait_for(lambda: not process_alive(trainers.pid("one", first)), what="the trainer stopped")
    wait_for(lambda: not cluster.pods("edited"), what="the suspended Job's pod gone")
    suspended = cluster.condition("edited", "Suspended")
    assert suspended["status"] == "True" and suspended["observedGeneration"] == 2
    assert cluster.condition("edited", "Ready")["reason"] == "Suspended"
    assert cluster.adapter("edited", "one")["reason"] == "Suspended"

    cluster.patch("edited", {"spec": {"suspend": False}})
    trainers.wait_started("one", 2)
    cluster.wait_adapter("edited", "one", "Running")
    trainers.release("one")
    done = cluster.wait_phase("edited", "Succeeded", "Failed")
    _assert_succeeded(cluster, "edited", ["one"])
    assert done["status"]["observedGeneration"] == 3
    resumed = cluster.adapter("edited", "one")
    assert resumed["attempts"] == 1, resumed  # the suspension is no failure
    assert "message" not in resumed, "suspend is applied to the Job: its pod is the same"
    assert [j["metadata"]["uid"] for j in cluster.jobs("edited")] == [job["metadata"]["uid"]]
    assert cluster.condition("edited", "Suspended")["status"] == "False"


def test_a_method_edit_mid_run_is_reported_and_applies_to_a_new_job(
    cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """`method` may change, but a running Job's pod cannot: the status says the running Job
    goes on with the spec it was made from; deleting the Job runs the new spec."""
    cluster.create(fake_manifest("tuned", cluster.namespace, ["one"], trainers))
    cluster.wait_adapter("tuned", "one", "Running")
    (first,) = trainers.wait_started("one")
    (job,) = cluster.jobs("tuned")
    assert trainers.spec("one", first)["method"]["finetune"]["maxSteps"] == 300  # the default
    cluster.patch("tuned", {"spec": {"method": {"finetune": {"maxSteps": 42}}}})

    def noted() -> dict[str, Any] | None:
        entry = cluster.adapter("tuned", "one")
        return entry if "spec changed after Job" in entry.get("message", "") else None

    entry = wait_for(noted, what="the status saying the running Job keeps its spec")
    assert entry["reason"] == "Running" and "delete the Job to run the new spec" in entry["message"]
    assert cluster.status("tuned")["observedGeneration"] == 2
    assert [j["metadata"]["uid"] for j in cluster.jobs("tuned")] == [job["metadata"]["uid"]]

    cluster.batch.delete_namespaced_job(
        job["metadata"]["name"], cluster.namespace, propagation_policy="Background"
    )
    second = trainers.wait_started("one", 2)[1]
    assert trainers.spec("one", second)["method"]["finetune"]["maxSteps"] == 42
    cluster.wait_adapter("tuned", "one", "Running")
    assert "message" not in cluster.adapter("tuned", "one")
    trainers.release("one")
    cluster.wait_phase("tuned", "Succeeded", "Failed")
    status = _assert_succeeded(cluster, "tuned", ["one"])
    assert "message" not in status["adapters"][0]


def test_a_forged_finished_status_is_reverted(
    sandbox: Any, cluster: Cluster, operator: OperatorProcess, trainers: Trainers
) -> None:
    """`kubectl patch --subresource=status` turning a failed migration into a ready one (what a
    user allowed to write the status could do, and Ready gates rollouts): the operator finds
    that the entry does not carry its seal and derives it again, with a Warning event; once the
    Job is gone, a new Job reads the result again."""
    cluster.create(fake_manifest("forged", cluster.namespace, ["one"], trainers))
    trainers.wait_started("one")
    trainers.release("one", "not-ready")
    cluster.wait_phase("forged", "Failed")
    measured = cluster.adapter("forged", "one")
    assert measured["reason"] == "NotReady" and measured["seal"]
    lie = [
        {"op": "replace", "path": "/status/phase", "value": "Succeeded"},
        {"op": "replace", "path": "/status/adapters/0/phase", "value": "Succeeded"},
        {"op": "replace", "path": "/status/adapters/0/reason", "value": "Ready"},
        {"op": "replace", "path": "/status/adapters/0/result/ready", "value": True},
    ]
    kubectl = [kubectl_binary(), f"--kubeconfig={sandbox.kubeconfig_path}", "-n", cluster.namespace]
    patch = [*kubectl, "patch", "adaptermigration", "forged", "--subresource=status"]
    subprocess.run([*patch, "--type=json", "-p", json.dumps(lie)], check=True, capture_output=True)

    def reverted() -> bool:
        entry = cluster.adapter("forged", "one")
        phase = cluster.status("forged")["phase"]
        return bool(entry["reason"] == "NotReady" and phase == "Failed")

    wait_for(reverted, timeout=30, what="the forged status reverted")
    assert cluster.adapter("forged", "one") == measured

    def warnings_now() -> list[Obj]:
        return [e for e in cluster.events("forged") if e["reason"] == "StatusReverted"]

    wait_for(warnings_now, what="the StatusReverted event")  # posted just after the write
    warnings = warnings_now()
    assert len(warnings) == 1 and warnings[0]["type"] == "Warning", warnings
    assert "(Succeeded/Ready) was not written by the operator" in warnings[0]["message"]

    # The Job gone (its TTL), the lie told again: a new Job reads the result again.
    (job,) = cluster.jobs("forged")
    cluster.batch.delete_namespaced_job(
        job["metadata"]["name"], cluster.namespace, propagation_policy="Background"
    )
    wait_for(lambda: not cluster.jobs("forged"), what="the Job gone")
    subprocess.run([*patch, "--type=json", "-p", json.dumps(lie)], check=True, capture_output=True)
    # Reverifying, then Running, can both pass between two polls (the stand-in trainer ends at
    # once): what they leave is the second Warning and the real outcome. Which way the entry is
    # re-derived depends on whether the operator's reconcile still saw the deleted Job (then
    # from its pod) or not (then from a new Job, a second trainer start).
    wait_for(lambda: len(warnings_now()) >= 2, what="a second StatusReverted event")
    second = warnings_now()[1]["message"]
    assert "(Succeeded/Ready) was not written by the operator" in second, second
    if "a new Job reads the result again" in second:
        trainers.wait_started("one", 2)
    else:
        assert "restored from Job" in second, second
    cluster.wait_phase("forged", "Failed")  # the release file still says not-ready
    assert cluster.adapter("forged", "one")["reason"] == "NotReady"
    assert cluster.condition("forged", "Ready")["status"] == "False"


def test_two_replicas_elect_one_leader_and_the_standby_takes_over(
    sandbox: Any, cluster: Cluster, trainers: Trainers, tmp_path: Path
) -> None:
    """Two operator processes on the same namespace (two replicas of the Deployment): one
    leads, the other stands by (answering its liveness probe) instead of doubling every event;
    the leader SIGKILLed (no release), the standby takes over once the Lease expires and
    finishes the migration: one Job, each event once."""
    lease = {
        leadership.NAMESPACE_ENV: cluster.namespace,
        leadership.SECONDS_ENV: "3",
    }

    def replica(name: str) -> OperatorProcess:
        return OperatorProcess(
            Path(sandbox.kubeconfig_path),
            cluster.namespace,
            tmp_path / f"{name}.log",
            trainer=[sys.executable, str(FAKE_TRAINER)],
            env=lease,
        )

    first, second = replica("first"), replica("second")
    first.start()
    second.start()  # returns once its liveness probe answers: standing by
    try:
        coordination = client.CoordinationV1Api(cluster.api)

        def holder() -> str:
            found = coordination.read_namespaced_lease(leadership.DEFAULT_NAME, cluster.namespace)
            assert found.spec is not None
            return str(found.spec.holder_identity or "")

        assert first.process is not None and second.process is not None
        assert f"-{first.process.pid}-" in holder()
        wait_for(lambda: "standing by: the lease is held by" in second.tail(), what="a standby")
        cluster.create(fake_manifest("led", cluster.namespace, ["one"], trainers))
        trainers.wait_started("one")
        cluster.wait_adapter("led", "one", "Running")
        # Killed once its events are out (an event queued in a killed process is lost: that is
        # the operator-restart test's business, not this one's).
        wait_for(
            lambda: "AdapterRunning" in [e["reason"] for e in cluster.events("led")],
            what="the Running event",
        )
        first.kill()
        wait_for(lambda: f"-{second.process.pid}-" in holder(), timeout=30, what="a new leader")
        trainers.release("one")
        cluster.wait_phase("led", "Succeeded", timeout=60)
        assert len(cluster.jobs("led")) == 1 and len(trainers.attempts("one")) == 1
        expected = ("AdapterPending", "AdapterRunning", "AdapterSucceeded")

        def posted() -> list[tuple[str, str]]:
            return [(str(e["reason"]), str(e["message"])) for e in cluster.events("led")]

        # The event of a status write is posted just after it: wait for the last one.
        wait_for(lambda: set(expected) <= {r for r, _ in posted()}, what="the Succeeded event")
        # Each event once: no replica posted what the other had. (An adapter may have several
        # events of one reason, each with its own message: Pending while its Job is made, then
        # while its pod is pending; CI saw that twice, both from the first replica's log.)
        events = posted()
        assert len(set(events)) == len(events), events
        second.stop()  # a clean exit gives the lease up at once
        wait_for(lambda: holder() == "", timeout=10, what="the lease released")
    finally:
        first.stop()
        second.stop()
