"""The tuning behind the benchmark's settings: the same effort for every trained strategy.

Each of scratch, warm-start and relora gets six candidate configurations (six learning rates;
until session 9, when relora's search went off by default, relora's were three learning rates x
two search objectives), run on tuning seeds the
benchmark never uses, with the benchmark's budget and target, on both severities. One selection
rule for all: the lowest mean time-to-readiness on the validation split (a run that never met
the target counts what it spent). The test split plays no part. ``relora bench --tune`` reruns
it and writes tuning-report.md; the chosen settings are the ``*_METHOD`` constants of
:mod:`relora_lab.settings`.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from relora_lab.bench.running import RunRecord
from relora_lab.bench.summary import Stat
from relora_lab.bench.variants import Variant
from relora_lab.settings import RELORA_METHOD, merge
from relora_trainer.errors import BadInput

TUNING_SEEDS = (100, 101)
RATES = (0.001, 0.002, 0.003, 0.004, 0.006, 0.008)
REPORT_MD = "tuning-report.md"


def grid(names: Sequence[str] | None = None) -> list[Variant]:
    """Six configurations per trained strategy (only those ``names`` if given)."""
    candidates = []
    for strategy in ("scratch", "warm-start", "relora"):
        base = RELORA_METHOD if strategy == "relora" else {"strategy": strategy}
        for rate in RATES:
            candidates.append(
                Variant(
                    f"{strategy}@lr={rate:g}",
                    f"{strategy}, learning rate {rate:g}",
                    merge(base, {"finetune": {"learningRate": rate}}),
                )
            )
    if names:
        known = {c.name for c in candidates}
        unknown = [n for n in names if n not in known]
        if unknown:
            raise BadInput(f"--variant with --tune: unknown {unknown}; known: {sorted(known)}")
        candidates = [c for c in candidates if c.name in names]
    return candidates


def strategy_of(name: str) -> str:
    return name.split("@", 1)[0]


@dataclass(frozen=True)
class Candidate:
    name: str
    time_to_readiness: Stat  # seconds; censored runs count what they spent
    ready_step: Stat
    ready: int
    runs: int


def candidates(records: Sequence[RunRecord]) -> list[Candidate]:
    grouped: dict[str, list[RunRecord]] = {}
    for record in records:
        grouped.setdefault(record.variant, []).append(record)
    result = []
    for name, runs in grouped.items():
        result.append(
            Candidate(
                name=name,
                time_to_readiness=Stat.of(
                    [
                        r.time_to_readiness if r.time_to_readiness is not None else r.spent_seconds
                        for r in runs
                    ]
                ),
                ready_step=Stat.of(
                    [float(r.ready_step if r.ready_step is not None else r.steps) for r in runs]
                ),
                ready=sum(r.ready for r in runs),
                runs=len(runs),
            )
        )
    return result


def select(records: Sequence[RunRecord]) -> dict[str, Candidate]:
    """Per strategy: the candidate with the lowest mean time-to-readiness."""
    best: dict[str, Candidate] = {}
    for candidate in candidates(records):
        mean = candidate.time_to_readiness.mean
        if mean is None:
            continue
        strategy = strategy_of(candidate.name)
        current = best.get(strategy)
        if current is None or mean < (current.time_to_readiness.mean or float("inf")):
            best[strategy] = candidate
    return best


def write(out: Path, records: Sequence[RunRecord], *, command: str) -> Path:
    """tuning-report.md: every candidate, the chosen one per strategy in bold."""
    chosen = {c.name for c in select(records).values()}
    lines = [
        "# Tuning of the benchmark's strategies",
        "",
        f"Command: `{command}`. Seeds {list(TUNING_SEEDS)} (never used by the benchmark), "
        "both severities. Rule: the lowest mean time to readiness on the validation split "
        "(a run that never met the target counts what it spent).",
        "",
        "| candidate | ready | time to readiness (s) | steps to readiness |",
        "| --- | --- | --- | --- |",
    ]
    for c in sorted(candidates(records), key=lambda c: c.name):
        name = f"**{c.name}**" if c.name in chosen else c.name
        lines.append(
            f"| {name} | {c.ready}/{c.runs} | {c.time_to_readiness.text(1)} "
            f"| {c.ready_step.text(0)} |"
        )
    out.mkdir(parents=True, exist_ok=True)
    path = out / REPORT_MD
    partial = path.with_name(path.name + ".partial")
    partial.write_text("\n".join(lines) + "\n")
    os.replace(partial, path)
    return path
