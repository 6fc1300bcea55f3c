"""Prometheus metrics of the operator (prometheus-client), named per the Prometheus guide.

No adapter names or UIDs as labels: counters and histograms carry bounded labels only.
Transitions are counted when the status the operator writes changes phase, so a restarted
operator, which re-derives the same status, counts nothing twice.

A labelled counter's series exists only once it has labels, and Prometheus's increase() and
rate() cannot see the increment that a series is first scraped with. So the series whose label
values are known in advance (KNOWN_SERIES) are created at 0 when metrics start. Open-ended
values (a failed adapter's reason, which the Job, the pod or the trainer gives; error types)
cannot be: the first of each is still first scraped at 1.
"""

from __future__ import annotations

from typing import get_args

from prometheus_client import Counter, Gauge, Histogram, start_http_server

from relora_api.status import AdapterMigrationStatus, AdapterPhase, AdapterStatus, Reason
from relora_operator import __version__, planner

PREFIX = "relora"
SECONDS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 21600, 86400)

MIGRATIONS = Counter(
    f"{PREFIX}_migrations_total", "AdapterMigrations finished, by result.", ["result"]
)
JOBS_CREATED = Counter(f"{PREFIX}_adapter_jobs_created_total", "Adapter Jobs created.")
JOBS_FINISHED = Counter(
    f"{PREFIX}_adapter_jobs_finished_total",
    "Adapter migrations finished, by result and reason.",
    ["result", "reason"],
)
JOBS_RETRIED = Counter(
    f"{PREFIX}_adapter_jobs_retried_total",
    "Adapter trainers started again after a failure: each pod of a single-pod Job after its "
    "first (the Job's own retries), each restart of a worker group (spec.distributed.workers > 1: "
    "the operator makes the group's Indexed Job again; one per restart, whatever the workers).",
)
TIME_TO_READINESS = Histogram(
    f"{PREFIX}_adapter_time_to_readiness_seconds",
    "Seconds from the start of an adapter's migration (search included) until it was ready.",
    buckets=SECONDS,
)
QUEUE_WAIT = Histogram(
    f"{PREFIX}_adapter_queue_wait_seconds",
    "Seconds from an adapter Job's creation until its first pod ran.",
    buckets=SECONDS,
)
ADAPTERS = Gauge(f"{PREFIX}_adapters", "Adapters by phase, over all migrations.", ["phase"])
RECONCILES = Counter(f"{PREFIX}_reconcile_total", "Reconciliations of AdapterMigrations.")
RECONCILE_ERRORS = Counter(
    f"{PREFIX}_reconcile_errors_total", "Reconciliations that failed, by error type.", ["error"]
)
RECONCILE_SECONDS = Histogram(
    f"{PREFIX}_reconcile_duration_seconds",
    "Time spent in one reconciliation.",
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
BUILD_INFO = Gauge(f"{PREFIX}_build_info", "Build information (always 1).", ["version"])

PHASES: tuple[AdapterPhase, ...] = get_args(AdapterPhase)

# The `result` label of a finished migration and of a finished adapter, by final phase.
MIGRATION_RESULTS = {phase: phase.lower() for phase in planner.FINAL}
ADAPTER_RESULTS = {"Succeeded": "ready", "Failed": "failed"}

# The labelled counters' series known before anything happened, created at 0 by serve().
KNOWN_SERIES: tuple[tuple[Counter, dict[str, str]], ...] = (
    *((MIGRATIONS, {"result": result}) for result in MIGRATION_RESULTS.values()),
    (JOBS_FINISHED, {"result": ADAPTER_RESULTS["Succeeded"], "reason": Reason.READY.value}),
)


def serve(port: int) -> None:
    BUILD_INFO.labels(version=__version__).set(1)
    for phase in PHASES:
        ADAPTERS.labels(phase=phase).set(0)
    for counter, labels in KNOWN_SERIES:
        counter.labels(**labels)  # at 0 until counted
    if port:
        start_http_server(port)


def record_transitions(
    old: AdapterMigrationStatus, new: AdapterMigrationStatus, *, workers: int = 1
) -> None:
    """Count what changed between the status last written and the new one (of a spec with
    ``workers`` worker pods per adapter)."""
    before = {a.name: a for a in old.adapters or []}
    for adapter in new.adapters or []:
        previous = before.get(adapter.name)
        was = previous.phase if previous is not None else None
        if adapter.phase in planner.FINAL and was != adapter.phase:
            result = ADAPTER_RESULTS[adapter.phase]
            JOBS_FINISHED.labels(result=result, reason=adapter.reason or "").inc()
            seconds = adapter.result.time_to_readiness_seconds if adapter.result else None
            if adapter.phase == "Succeeded" and seconds is not None:
                TIME_TO_READINESS.observe(seconds)
        retries = _retries(previous, adapter, workers)
        if retries > 0:
            JOBS_RETRIED.inc(retries)
    if new.phase in planner.FINAL and old.phase != new.phase:
        MIGRATIONS.labels(result=MIGRATION_RESULTS[new.phase]).inc()


def _retries(previous: AdapterStatus | None, now: AdapterStatus, workers: int) -> int:
    """Retries between two entries of one adapter. A single-pod Job: its pods after the first
    (``attempts`` counts the pods of the Job). A worker group: its restarts (``restarts`` going
    up), not its pods: each Job of a group starts ``workers`` pods at once, and a restart makes a
    new Job whose pods count from 0 again."""
    if workers > 1 or now.restarts is not None:
        before = (previous.restarts or 0) if previous is not None else 0
        return (now.restarts or 0) - before
    return now.attempts - max(previous.attempts if previous is not None else 0, 1)


def set_phases(counts: dict[str, int]) -> None:
    for phase in PHASES:
        ADAPTERS.labels(phase=phase).set(counts.get(phase, 0))
