"""Run the benchmark matrix (severity x seed x variant) through ``migrate.migrate_adapter``.

Per severity the testbed's manifest is read and validated as ``relora run`` does, both bases are
loaded once, then every (seed, variant) run gets its own spec and a fresh output folder. The
variants of a seed run one after another in an order rotated by the seed, so that a slow spell
of the machine (other processes) does not always hit the same strategy.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from relora_api import manifests
from relora_api.status import AdapterProgress
from relora_lab.bench.variants import Variant, spec_for
from relora_trainer import loading, local_run, migrate, teaching
from relora_trainer.errors import BadInput
from relora_trainer.progress import NullProgress, ProgressSink
from relora_trainer.report import AdapterReport
from relora_trainer.storage import Storage


@dataclass
class RunRecord:
    """The figures of one run, taken from its AdapterReport."""

    severity: str
    variant: str
    strategy: str
    seed: int
    ready: bool
    ready_step: int | None
    time_to_readiness: float | None  # report.seconds["timeToReadiness"]
    spent_seconds: float  # teacher + search + training + evaluation over the whole budget
    search_seconds: float
    steps: int
    target: float
    quality: dict[str, dict[str, dict[str, float | None]]]
    history: list[dict[str, Any]]
    trials: list[dict[str, Any]]
    coefficients: dict[str, dict[str, float]] | None
    load_average: tuple[float, float] = (0.0, 0.0)  # 1-minute load before and after the run
    wall_seconds: float = 0.0  # the whole migrate_adapter call, reference measurements included
    extra: dict[str, Any] = field(default_factory=dict)

    def accuracy(self, stage: str, split: str) -> float | None:
        return self.quality.get(stage, {}).get(split, {}).get("accuracy")

    @classmethod
    def of(
        cls,
        report: AdapterReport,
        *,
        severity: str,
        variant: Variant,
        seed: int,
        load_average: tuple[float, float],
        wall_seconds: float,
    ) -> RunRecord:
        seconds = report.seconds
        counted = ("teacher", "search", "training", "evaluation")
        spent = sum(float(seconds.get(k) or 0.0) for k in counted)
        return cls(
            severity=severity,
            variant=variant.name,
            strategy=report.strategy,
            seed=seed,
            ready=report.ready,
            ready_step=report.ready_step,
            time_to_readiness=seconds.get("timeToReadiness"),
            spent_seconds=spent,
            search_seconds=float(seconds.get("search") or 0.0),
            steps=report.steps,
            target=report.target,
            quality=report.quality,
            history=report.history,
            trials=report.trials,
            coefficients=report.coefficients,
            load_average=load_average,
            wall_seconds=wall_seconds,
        )

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        """A record written by :meth:`to_json` (and read back from JSON)."""
        fields = dict(data)
        fields["load_average"] = tuple(fields.get("load_average") or (0.0, 0.0))
        return cls(**fields)


def read_manifest(path: Path) -> dict[str, Any]:
    """The one AdapterMigration in ``path``, validated, as a plain dictionary."""
    try:
        content, migration = local_run.load_document(str(path))
    except manifests.ManifestError as error:
        raise BadInput(f"{path}: {error}") from error
    if len(migration.spec.adapters) != 1:
        raise BadInput(f"{path}: the benchmark migrates exactly one adapter per manifest")
    return content


RunCallback = Callable[[str, Variant, int], ProgressSink]


def _load_average() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:  # not available on this platform
        return 0.0


def order_for(variants: Sequence[Variant], seed: int) -> list[Variant]:
    """The variants of one seed, rotated by the seed (each goes first for some seed)."""
    shift = seed % max(len(variants), 1)
    return list(variants[shift:]) + list(variants[:shift])


def run_matrix(
    *,
    manifests_by_severity: Mapping[str, Path],
    variants: Sequence[Variant],
    seeds: Sequence[int],
    out: Path,
    device: torch.device,
    common: Mapping[str, Any] | None = None,
    readiness: Mapping[str, Any] | None = None,
    on_run: RunCallback | None = None,
    on_done: Callable[[RunRecord], None] | None = None,
) -> list[RunRecord]:
    """Every (severity, seed, variant) run; their outputs go under ``out/runs``."""
    records: list[RunRecord] = []
    for severity, path in manifests_by_severity.items():
        manifest = read_manifest(path)
        storage = Storage(base_dir=path.resolve().parent)
        # The bases' source phase computes the teacher of the first variant that distils.
        specs = [
            spec_for(
                manifest,
                variant,
                seed=seeds[0],
                output=str(out),
                common=common,
                readiness=readiness,
            )
            for variant in variants
        ]
        distilling = [s for s in specs if teaching.distilled(s) is not None]
        first = (distilling or specs)[0]
        bases = loading.load_bases(first, storage, device)
        for seed in seeds:
            for variant in order_for(variants, seed):
                folder = out / "runs" / severity / variant.name / f"seed-{seed}"
                spec = spec_for(
                    manifest,
                    variant,
                    seed=seed,
                    output=str(folder.parent),
                    common=common,
                    readiness=readiness,
                )
                adapter = spec.adapters[0].model_copy(update={"name": folder.name})
                if folder.exists():
                    shutil.rmtree(folder)  # always measure afresh
                sink = on_run(severity, variant, seed) if on_run else NullProgress()
                before = _load_average()
                started = time.perf_counter()
                report = migrate.migrate_adapter(
                    spec=spec, adapter=adapter, bases=bases, storage=storage, progress=sink
                )
                record = RunRecord.of(
                    report,
                    severity=severity,
                    variant=variant,
                    seed=seed,
                    load_average=(before, _load_average()),
                    wall_seconds=time.perf_counter() - started,
                )
                records.append(record)
                if on_done is not None:
                    on_done(record)
        del bases
    return records


class StageSink:
    """A ProgressSink that forwards fine-tuning steps and search trials to one callback."""

    def __init__(self, report: Callable[[str, int, int, str], None]) -> None:
        self.report = report

    def update(self, adapter: str, progress: AdapterProgress) -> None:
        if progress.stage == "search" and progress.trials:
            self.report("search", progress.trial or 0, progress.trials, "")
        elif progress.stage == "finetune" and progress.max_steps is not None:
            detail = ""
            if progress.quality is not None:
                detail = f"accuracy {progress.quality:.3f} (target {progress.target or 0:.3f})"
            self.report("finetune", progress.step or 0, progress.max_steps, detail)

    def note(self, adapter: str, message: str) -> None:
        return None
