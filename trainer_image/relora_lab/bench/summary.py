"""Aggregate benchmark runs: mean +- std over seeds, ratios against relora, accuracy deltas.

A run that never met the target is *censored*: its time-to-readiness is unknown but at least what
it spent (teacher + search + training + evaluation over the whole budget), and its steps at least
the budget. Means then use those lower bounds and are flagged, and a ratio over a censored baseline
is a lower bound (``>=``).
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from typing import Any

from relora_lab.bench.running import RunRecord
from relora_trainer.errors import BadInput

METHOD = "relora"


@dataclass(frozen=True)
class Stat:
    mean: float | None
    std: float | None
    n: int

    @classmethod
    def of(cls, values: Sequence[float | None]) -> Stat:
        known = [v for v in values if v is not None and math.isfinite(v)]
        if not known:
            return cls(None, None, 0)
        std = statistics.stdev(known) if len(known) > 1 else 0.0
        return cls(statistics.fmean(known), std, len(known))

    def text(self, digits: int = 3, unit: str = "") -> str:
        if self.mean is None or self.std is None:
            return "-"
        return f"{self.mean:.{digits}f} ± {self.std:.{digits}f}{unit}"


@dataclass(frozen=True)
class Cell:
    """One (severity, variant) over its seeds."""

    severity: str
    variant: str
    runs: int
    ready: int
    time_to_readiness: Stat  # seconds; censored runs count what they spent
    ready_step: Stat  # steps; censored runs count the budget
    test_accuracy: Stat  # the adapter at the end of the budget
    validation_accuracy: Stat
    search_seconds: Stat
    target: float
    source_test: float | None  # the old adapter on v1
    before_test: float | None  # the old adapter on v2

    @property
    def censored(self) -> bool:
        return self.ready < self.runs


@dataclass(frozen=True)
class Ratio:
    """mean time-to-readiness of a baseline / of relora; ``bound`` '>=' when only a bound."""

    baseline: str
    seconds: float | None
    steps: float | None
    bound: str  # "", ">=" (baseline censored), "<=" (relora censored), "?" (both)
    per_seed: Stat  # the ratio seed by seed (seconds)
    interval: tuple[float, float] | None = None  # 95% interval of the per-seed ratios' mean


def interval95(ratios: Sequence[float]) -> tuple[float, float] | None:
    """A 95% confidence interval of the typical paired ratio: Student's t on the logarithms
    of the per-seed ratios (ratios are multiplicative), back-transformed; None under 2 seeds."""
    logs = [math.log(r) for r in ratios if r > 0 and math.isfinite(r)]
    if len(logs) < 2:
        return None
    from scipy.stats import t  # the trainer extra's dependency (Optuna's GPSampler)

    half = float(t.ppf(0.975, len(logs) - 1)) * statistics.stdev(logs) / math.sqrt(len(logs))
    centre = statistics.fmean(logs)
    return math.exp(centre - half), math.exp(centre + half)


def retarget(record: RunRecord, fraction: float) -> RunRecord:
    """``record`` as if its readiness target had been ``fraction`` x the old adapter's
    validation accuracy on v1: readiness, its step and its seconds re-read from the evaluation
    history (each entry carries the counted seconds up to it)."""
    source = record.accuracy("source", "validation")
    if source is None:
        raise BadInput(f"run {record.severity}/{record.variant}: no source accuracy to retarget")
    target = fraction * source
    met = next((h for h in record.history if float(h["quality"]) >= target), None)
    return replace(
        record,
        target=target,
        ready=met is not None,
        ready_step=None if met is None else int(met["step"]),
        time_to_readiness=None if met is None else float(met["seconds"]),
    )


def _ttr(record: RunRecord) -> float:
    if record.time_to_readiness is not None:
        return record.time_to_readiness
    return record.spent_seconds


def _steps(record: RunRecord) -> float:
    return float(record.ready_step if record.ready_step is not None else record.steps)


def cell(records: Sequence[RunRecord]) -> Cell:
    first = records[0]
    return Cell(
        severity=first.severity,
        variant=first.variant,
        runs=len(records),
        ready=sum(r.ready for r in records),
        time_to_readiness=Stat.of([_ttr(r) for r in records]),
        ready_step=Stat.of([_steps(r) for r in records]),
        test_accuracy=Stat.of([r.accuracy("after", "test") for r in records]),
        validation_accuracy=Stat.of([r.accuracy("after", "validation") for r in records]),
        search_seconds=Stat.of([r.search_seconds for r in records]),
        target=first.target,
        source_test=first.accuracy("source", "test"),
        before_test=first.accuracy("before", "test"),
    )


def cells(records: Sequence[RunRecord]) -> dict[str, dict[str, Cell]]:
    """severity -> variant -> Cell, in the order the runs were listed."""
    grouped: dict[str, dict[str, list[RunRecord]]] = {}
    for record in records:
        grouped.setdefault(record.severity, {}).setdefault(record.variant, []).append(record)
    return {
        severity: {variant: cell(runs) for variant, runs in by_variant.items()}
        for severity, by_variant in grouped.items()
    }


def _bound(baseline: Cell, method: Cell) -> str:
    if baseline.censored and method.censored:
        return "?"
    if baseline.censored:
        return ">="
    if method.censored:
        return "<="
    return ""


RESOLUTION = 0.01
"""Seconds to readiness below this count as this in a ratio: a start ready at step 0 takes
(almost) none, and 0 against a thousandth of a second (the skipped search's bookkeeping) is a
tie, not 0x."""


def ratio(baseline: Cell, method: Cell, records: Sequence[RunRecord], *, severity: str) -> Ratio:
    """Time-to-readiness of ``baseline`` over ``method`` (> 1: the method is faster)."""

    def divide(top: float | None, bottom: float | None) -> float | None:
        return top / bottom if top is not None and bottom else None

    def seconds(top: float | None, bottom: float | None) -> float | None:
        if top is None or bottom is None:
            return None
        return max(top, RESOLUTION) / max(bottom, RESOLUTION)

    by_seed: dict[int, dict[str, float]] = {}
    for r in records:
        if r.severity == severity and r.variant in (baseline.variant, method.variant):
            by_seed.setdefault(r.seed, {})[r.variant] = _ttr(r)
    paired = [
        seconds(pair[baseline.variant], pair[method.variant])
        for pair in by_seed.values()
        if len(pair) == 2
    ]
    return Ratio(
        baseline=baseline.variant,
        seconds=seconds(baseline.time_to_readiness.mean, method.time_to_readiness.mean),
        steps=divide(baseline.ready_step.mean, method.ready_step.mean),
        bound=_bound(baseline, method),
        per_seed=Stat.of(paired),
        interval=interval95([r for r in paired if r is not None]),
    )


@dataclass(frozen=True)
class Comparison:
    """What the benchmark claims for one severity."""

    severity: str
    ratios: dict[str, Ratio]  # variant -> its time-to-readiness over relora's
    best_baseline: str | None  # by mean test accuracy at the budget
    accuracy_delta: float | None  # relora's mean test accuracy minus the best baseline's
    wins_time: bool  # relora reaches the target faster than every trained baseline
    no_accuracy_loss: bool  # ... and ends no lower than the best baseline


def compare(
    table: dict[str, dict[str, Cell]],
    records: Sequence[RunRecord],
    *,
    baselines: Sequence[str],
    method: str = METHOD,
    tolerance: float = 0.0,
) -> dict[str, Comparison]:
    """Per severity: ratios of every other variant to ``method`` and the accuracy delta."""
    result = {}
    for severity, by_variant in table.items():
        if method not in by_variant:
            continue
        ours = by_variant[method]
        ratios = {
            name: ratio(other, ours, records, severity=severity)
            for name, other in by_variant.items()
            if name != method
        }
        present = [b for b in baselines if b in by_variant]
        accuracies = {b: by_variant[b].test_accuracy.mean for b in present}
        known = {b: a for b, a in accuracies.items() if a is not None}
        best = max(known, key=lambda b: known[b]) if known else None
        delta = (
            ours.test_accuracy.mean - known[best]
            if best is not None and ours.test_accuracy.mean is not None
            else None
        )
        trained = [b for b in present if b != "reuse"]
        wins = not ours.censored and all(
            (ratios[b].seconds or 0.0) > 1.0 or by_variant[b].ready == 0 for b in trained
        )
        result[severity] = Comparison(
            severity=severity,
            ratios=ratios,
            best_baseline=best,
            accuracy_delta=delta,
            wins_time=wins,
            no_accuracy_loss=delta is not None and delta >= -tolerance,
        )
    return result


def to_json(
    table: dict[str, dict[str, Cell]], comparisons: dict[str, Comparison]
) -> dict[str, Any]:
    return {
        "cells": {s: {v: asdict(c) for v, c in row.items()} for s, row in table.items()},
        "comparisons": {s: asdict(c) for s, c in comparisons.items()},
    }
