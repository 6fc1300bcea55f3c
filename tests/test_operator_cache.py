"""The operator's watch-fed memory: the Jobs and pods cache, the per-migration state, the
poker's timers. Pure, in-process: no API server."""

from __future__ import annotations

import asyncio
from typing import Any

from relora_operator import cache, migrations, naming
from relora_operator.poker import Poker

Obj = dict[str, Any]


def _child(uid: str, migration: str, *, namespace: str = "ml", phase: str = "Pending") -> Obj:
    return {
        "metadata": {
            "name": f"name-{uid}",
            "namespace": namespace,
            "uid": uid,
            "labels": {naming.MIGRATION_UID: migration, naming.MANAGED_BY: naming.OPERATOR},
            "managedFields": [{"manager": "kube-controller-manager"}],
            "resourceVersion": "1",
        },
        "spec": {"suspend": False, "template": {"spec": {"containers": [{"name": "trainer"}]}}},
        "status": {"phase": phase},
    }


def test_the_cache_follows_watch_events_and_keeps_objects_slim() -> None:
    children = cache.Children()
    assert children.put("jobs", _child("j1", "m1"), 1.0) == "m1"
    assert children.put("pods", _child("p1", "m1", phase="Running"), 1.0) == "m1"
    children.put("pods", _child("p2", "m2"), 1.0)
    jobs, pods = children.children("m1")
    assert [j["metadata"]["uid"] for j in jobs] == ["j1"]
    assert [p["metadata"]["uid"] for p in pods] == ["p1"]
    assert "managedFields" not in jobs[0]["metadata"] and "template" not in jobs[0]["spec"]
    assert jobs[0]["spec"] == {"suspend": False}
    assert children.running == {"p1"}
    children.put("pods", _child("p1", "m1", phase="Succeeded"), 2.0)
    assert children.running == set()

    assert children.drop("jobs", _child("j1", "m1"), 3.0) == "m1"
    assert children.children("m1")[0] == []
    children.forget_migration("m1")
    assert "m1" not in children.by_migration, "nothing kept for a migration with no child"
    children.drop("pods", _child("p2", "m2"), 3.0)
    assert children.by_migration == {} and len(children) == 0
    children.put("pods", _child("p2", "m2"), 4.0)  # a late copy of a deleted pod
    assert len(children) == 0, "a deleted object does not come back"
    children.drop("pods", _child("p3", "m3"), 3.0 + cache.TOMBSTONE_SECONDS + 1)
    assert set(children.deleted) == {"p3"}, "deletions are remembered only a while"


def test_an_older_copy_does_not_replace_a_newer_one() -> None:
    """The answer to the operator's own create (version 1) may come after the watch brought
    the Job's next state (version 2)."""
    children = cache.Children()
    newer = _child("j", "m")
    newer["metadata"]["resourceVersion"] = "2"
    newer["status"] = {"conditions": [{"type": "Complete", "status": "True"}]}
    children.put("jobs", newer, 1.0)
    children.put("jobs", _child("j", "m"), 2.0)
    assert children.children("m")[0][0]["status"] == newer["status"]


def test_a_list_finds_what_was_deleted_while_no_watch_said_so() -> None:
    children = cache.Children()
    children.put("jobs", _child("gone", "m1"), 1.0)
    children.put("jobs", _child("kept", "m1"), 1.0)
    children.put("jobs", _child("elsewhere", "m2", namespace="other"), 1.0)
    token = children.begin_list(5.0)
    # While the list is out: a Job is created (its event comes before the list's answer) and
    # one that the list will still show is deleted.
    children.put("jobs", _child("new", "m3"), 6.0)
    children.drop("jobs", _child("kept", "m1"), 6.5)
    listed = [_child("kept", "m1"), _child("missed", "m4")]
    changed = children.replace("jobs", "ml", listed, token, 7.0)
    children.end_list(token)
    uids = {uid for uid in children.entries["jobs"]}
    assert uids == {"new", "missed", "elsewhere"}
    assert changed == {"m1", "m4"}
    assert children.listing == {}


def test_a_list_does_not_undo_a_newer_watch_event() -> None:
    children = cache.Children()
    token = children.begin_list(1.0)
    children.put("pods", _child("p", "m", phase="Running"), 2.0)  # newer than the list
    children.replace("pods", "ml", [_child("p", "m", phase="Pending")], token, 3.0)
    children.end_list(token)
    assert children.children("m")[1][0]["status"]["phase"] == "Running"


def _body(version: str, phase: str = "Pending", generation: int = 1) -> Obj:
    return {
        "metadata": {
            "name": "m",
            "namespace": "ml",
            "uid": "u",
            "generation": generation,
            "resourceVersion": version,
            "annotations": {"kubectl.kubernetes.io/last-applied-configuration": "{...}"},
        },
        "spec": {"adapters": []},
        "status": {"phase": phase, "observedGeneration": generation},
    }


def test_a_state_refuses_a_body_older_than_its_own_write() -> None:
    state = migrations.MigrationState.of(_body("10"), 0.0)
    assert "annotations" not in state.body["metadata"]
    # The operator's write came back as version 12; the watch still delivers 11, then 12.
    state.written = migrations.digest({"phase": "Running", "observedGeneration": 1})
    assert state.offer(_body("12", "Running"), 1.0)
    assert not state.offer(_body("11", "Pending"), 2.0), "older: refused"
    assert state.body["status"]["phase"] == "Running"
    assert not state.offer(_body("12", "Running"), 3.0), "the echo brings nothing new"
    assert state.own_write(_body("12", "Running"))
    assert state.offer(_body("13", "Running", generation=2), 4.0)
    assert not state.own_write(_body("13", "Running", generation=2)), "a new generation"
    # Versions that are not integers are taken as they come.
    assert state.offer(_body("x"), 5.0) and state.offer(_body("w"), 6.0)


def test_the_registry_counts_adapters_by_phase_and_drops_a_gone_migration() -> None:
    registry = migrations.Registry()
    state = migrations.MigrationState.of(_body("1"), 0.0)
    registry.add(state)
    registry.count(state, {"adapters": [{"phase": "Running"}, {"phase": "Succeeded"}]})
    registry.count(state, {"adapters": [{"phase": "Succeeded"}, {"phase": "Succeeded"}]})
    assert +registry.totals == {"Succeeded": 2}
    registry.pop("u")
    assert +registry.totals == {} and len(registry) == 0


def test_the_poker_coalesces_and_keeps_one_timer_per_key() -> None:
    runs: list[str] = []

    async def scenario() -> None:
        gate = asyncio.Event()

        async def work(key: str) -> None:
            runs.append(key)
            await gate.wait()

        poker = Poker(work, delay=0.05)
        poker.poke("a")
        await asyncio.sleep(0)
        poker.poke("a")  # during the run: one more run after it
        poker.poke("a")
        gate.set()
        await asyncio.sleep(0.01)
        assert runs == ["a", "a"]

        poker.soon("b")
        poker.soon("b")  # folded into the same delayed run
        await asyncio.sleep(0.1)
        assert runs.count("b") == 1 and not poker.soon_handles

        poker.schedule("c", 10.0)
        poker.schedule("c", 0.02)  # replaces the first: one timer per key
        assert len(poker.timers) == 1
        await asyncio.sleep(0.06)
        assert runs.count("c") == 1 and not poker.timers

        poker.schedule("d", 0.02)
        poker.forget("d")
        await asyncio.sleep(0.05)
        assert "d" not in runs and not poker.timers
        await asyncio.gather(*poker.tasks)
        assert not poker.running and not poker.again

    asyncio.run(scenario())


def test_the_spec_is_parsed_once_per_generation_and_released_when_idle() -> None:
    from benchmarks import scale

    body = scale.migration("m")
    body["metadata"].update({"uid": "u", "generation": 1, "resourceVersion": "1"})
    state = migrations.MigrationState.of(body, 0.0)
    first = state.spec()
    assert state.spec() is first, "parsed once"
    state.release()
    assert state.spec() is not first and state.spec() == first, "parsed again on demand"
    body["metadata"].update({"generation": 2, "resourceVersion": "2"})
    body["spec"]["suspend"] = True
    assert state.offer(body, 1.0)
    spec = state.spec()
    assert not isinstance(spec, Exception) and spec.suspend, "a new generation is parsed anew"


def test_events_are_posted_in_order_behind_the_reconciliation_and_kept_when_refused() -> None:
    """A reconciliation hands its events to one background sender per migration and does not
    wait for them (they come last among the API calls: the migration's next reconciliation
    waited seconds behind them); one that cannot reach the API server stays, and the migration
    is reconciled again later to post it."""
    from benchmarks import scale

    from relora_operator.reconciler import Operator
    from relora_operator.settings import Settings

    class Kube:
        def __init__(self) -> None:
            self.gate = asyncio.Event()
            self.posted: list[str] = []
            self.refuse = 0

        async def event(self, *args: str) -> None:
            await self.gate.wait()
            if self.refuse:
                self.refuse -= 1
                raise ConnectionResetError("the API server went away")
            self.posted.append(args[4])  # the reason

    async def scenario() -> None:
        kube = Kube()
        operator = Operator(Settings(), kube, b"key")  # type: ignore[arg-type]
        body = scale.migration("m")
        body["metadata"].update({"uid": "u", "generation": 1, "resourceVersion": "1"})
        state = migrations.MigrationState.of(body, 0.0)
        operator.registry.add(state)
        state.unsent += [("Normal", "First", "1"), ("Normal", "Second", "2")]
        operator._post_events(state)  # returns at once: nothing is posted yet
        assert state.posting and kube.posted == []
        state.unsent.append(("Normal", "Third", "3"))
        operator._post_events(state)  # the sender under way takes it too: no second one
        assert len(operator.tasks) == 1
        kube.gate.set()
        await asyncio.gather(*operator.tasks)
        assert kube.posted == ["First", "Second", "Third"] and not state.unsent
        assert not state.posting
        kube.refuse = 1
        state.unsent += [("Warning", "Fourth", "4"), ("Normal", "Fifth", "5")]
        operator._post_events(state)
        await asyncio.gather(*operator.tasks)
        assert [reason for _, reason, _ in state.unsent] == ["Fourth", "Fifth"]
        assert operator.poker.due("u") is not None, "reconciled again later"
        operator._post_events(state)  # what that reconciliation does first
        await asyncio.gather(*operator.tasks)
        assert kube.posted[3:] == ["Fourth", "Fifth"] and not state.unsent
        operator.poker.forget("u")

    asyncio.run(scenario())
