"""Leader election on a Lease: the pure rules, then two candidates against the sandbox's API."""

from __future__ import annotations

import threading
from typing import Any

import pytest
from kubernetes import client

from relora_operator import leadership
from relora_operator.leadership import LeaseConfig, Observed, claim


def _held(holder: str | None, renew: str = "2026-12-01T00:00:00.000000Z") -> dict[str, Any]:
    return {
        "holderIdentity": holder,
        "leaseDurationSeconds": 15,
        "acquireTime": "2026-12-01T00:00:00.000000Z",
        "renewTime": renew,
        "leaseTransitions": 2,
    }


def test_no_lease_yet_is_taken() -> None:
    spec = claim(None, me="a", duration=15, observed=Observed(), now=0.0)
    assert spec is not None and spec["holderIdentity"] == "a" and spec["leaseTransitions"] == 0


def test_a_lease_held_by_another_expires_on_this_clock_only() -> None:
    observed = Observed()
    held = _held("b")
    # First sight: fresh from this process's point of view, whatever its timestamps say (no
    # comparison of clocks across machines).
    assert claim(held, me="a", duration=15, observed=observed, now=1000.0) is None
    assert claim(held, me="a", duration=15, observed=observed, now=1014.0) is None
    # The holder renewed: the record changed, the clock starts again.
    renewed = _held("b", renew="2026-12-01T00:00:10.000000Z")
    assert claim(renewed, me="a", duration=15, observed=observed, now=1014.5) is None
    assert claim(renewed, me="a", duration=15, observed=observed, now=1029.0) is None
    # Unchanged for its duration: expired, taken, one more transition.
    taken = claim(renewed, me="a", duration=15, observed=observed, now=1030.0)
    assert taken is not None and taken["holderIdentity"] == "a"
    assert taken["leaseTransitions"] == 3 and taken["acquireTime"] != renewed["acquireTime"]


def test_own_and_released_leases() -> None:
    mine = claim(_held("a"), me="a", duration=15, observed=Observed(), now=0.0)
    assert mine is not None and mine["leaseTransitions"] == 2, "a renewal is no transition"
    assert mine["acquireTime"] == _held("a")["acquireTime"]
    released = claim(_held(None), me="a", duration=15, observed=Observed(), now=0.0)
    assert released is not None and released["holderIdentity"] == "a"


def test_settings_from_the_environment() -> None:
    assert LeaseConfig.from_env({}) is None, "off unless a namespace is given"
    config = LeaseConfig.from_env({leadership.NAMESPACE_ENV: "relora-system"})
    assert config is not None and (config.name, config.duration) == ("relora-operator", 15)
    assert config.renew_deadline == 10 and config.retry == 2
    with pytest.raises(ValueError, match="RELORA_LEASE_SECONDS: between 1 and 3600"):
        LeaseConfig.from_env({leadership.NAMESPACE_ENV: "x", leadership.SECONDS_ENV: "0"})
    with pytest.raises(ValueError, match="RELORA_LEASE_SECONDS: not a whole number"):
        LeaseConfig.from_env({leadership.NAMESPACE_ENV: "x", leadership.SECONDS_ENV: "1.5"})


def test_two_candidates_at_once_one_wins(api: Any, namespace: str) -> None:
    """Both read "no lease" or the same version; the API server's create / resourceVersion
    check lets exactly one write: the other sees a 409 and stands by."""
    for attempt in range(5):
        name = f"race-{attempt}"
        electors = [
            leadership.Elector(LeaseConfig(namespace, name, 15, identity=who), api)
            for who in ("a", "b")
        ]
        barrier = threading.Barrier(2)
        won: dict[str, bool] = {}

        def run(
            elector: leadership.Elector, barrier: threading.Barrier, won: dict[str, bool]
        ) -> None:
            barrier.wait()
            won[elector.config.identity] = elector.try_hold()

        threads = [threading.Thread(target=run, args=(e, barrier, won)) for e in electors]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert sorted(won.values()) == [False, True], won
        lease = client.CoordinationV1Api(api).read_namespaced_lease(name, namespace)
        winner = next(who for who, ok in won.items() if ok)
        assert lease.spec is not None and lease.spec.holder_identity == winner
        loser = next(e for e in electors if e.config.identity != winner)
        assert loser.try_hold() is False, "held and fresh: the other stands by"
        # The winner renews; after release the other takes it at once.
        holder = next(e for e in electors if e.config.identity == winner)
        assert holder.try_hold() is True
        holder.release()
        assert loser.try_hold() is True
