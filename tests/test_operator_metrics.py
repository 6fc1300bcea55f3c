"""The operator's metrics as a fresh operator exposes them: the labelled counters' known series
exist at 0 before anything happened, so Prometheus's increase() sees their first increment."""

from __future__ import annotations

import subprocess
import sys

from prometheus_client.parser import text_string_to_metric_families

from relora_operator import metrics, planner

# What a fresh process writes: the exposition of the default registry once metrics start.
FRESH = """
import sys
from prometheus_client import generate_latest
from relora_operator import metrics
metrics.serve(0)
sys.stdout.buffer.write(generate_latest())
"""


def fresh_exposition() -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """(sample name, sorted labels) -> value, as a just started operator serves /metrics."""
    run = subprocess.run(
        [sys.executable, "-c", FRESH], capture_output=True, text=True, timeout=60, check=True
    )
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(run.stdout)
        for sample in family.samples
    }


def test_a_fresh_operator_exposes_the_known_counter_series_at_zero() -> None:
    samples = fresh_exposition()
    counted = {
        key: value
        for key, value in samples.items()
        if key[0] in ("relora_migrations_total", "relora_adapter_jobs_finished_total")
    }
    assert counted == {
        ("relora_migrations_total", (("result", "succeeded"),)): 0.0,
        ("relora_migrations_total", (("result", "failed"),)): 0.0,
        ("relora_adapter_jobs_finished_total", (("reason", "Ready"), ("result", "ready"))): 0.0,
    }
    # Each known series, as metrics.KNOWN_SERIES names it, is there at 0.
    for counter, labels in metrics.KNOWN_SERIES:
        (family,) = counter.describe()
        key = (family.name + "_total", tuple(sorted(labels.items())))
        assert samples.get(key) == 0.0, key
    # Open-ended labels (error types) start with no series, the unlabelled counters at 0.
    assert not [key for key in samples if key[0] == "relora_reconcile_errors_total"]
    for name in ("created", "retried"):
        assert samples[(f"relora_adapter_jobs_{name}_total", ())] == 0.0
    assert samples[("relora_reconcile_total", ())] == 0.0


def test_results_are_named_for_every_final_phase() -> None:
    assert set(metrics.MIGRATION_RESULTS) == set(planner.FINAL)
    assert set(metrics.ADAPTER_RESULTS) == set(planner.FINAL)
