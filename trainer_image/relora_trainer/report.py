"""The per-adapter report: report.json (machine-readable) and summary.md (for people).

Time accounting (seconds): ``load`` (both bases, shared by a migration's adapters),
``reference`` (the old adapter measured on both bases: reporting, not the method), ``teacher``
(the old adapter's distributions on the old base, computed only when fine-tuning distils; null
otherwise), ``search``, ``training`` and ``evaluation``. ``timeToReadiness`` = teacher + search +
training + evaluation up to the evaluation that first met the target (null when the target was
not met within the budget).
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from relora_api.spec import Adapter
from relora_api.status import MAX_COEFFICIENTS, AdapterResult
from relora_trainer.adapters import CONFIG_FILE, WEIGHTS_FILE
from relora_trainer.method.finetune import FinetuneOutcome, Target
from relora_trainer.method.quality import Quality
from relora_trainer.method.search import SearchResult

REPORT_FILE = "report.json"
SUMMARY_FILE = "summary.md"


def _quality(q: Quality) -> dict[str, float | None]:
    return {"loss": q.loss, "accuracy": q.accuracy}


@dataclass
class AdapterReport:
    adapter: str
    strategy: str
    ready: bool
    metric: str
    target: float
    output_uri: str
    fingerprint: str
    device: str
    rank: int
    quality: dict[str, dict[str, dict[str, float | None]]]  # source/before/after -> split -> value
    coefficients: dict[str, dict[str, float]] | None
    trials: list[dict[str, Any]]
    steps: int
    ready_step: int | None
    seconds: dict[str, float | None]
    history: list[dict[str, Any]]
    # Peak memory the process allocated on its GPU so far (GiB; None on a CPU), and whether
    # activations were recomputed (gradient checkpointing).
    device_peak_gib: float | None = None
    checkpointing: bool = False
    # Examples per forward pass when fewer than the batch (spec's microBatchSize, or halved
    # after running out of GPU memory); None: the whole batch at once.
    micro_batch: int | None = None
    # relora plan's estimate of this run's peak (GiB) on its device, next to the measured one.
    planned_peak_gib: float | None = None
    # The search's start was worse than the old adapter's: the fine-tuning started from that.
    fell_back: bool = False
    # finetune.distillation ({weight, top_k}) when fine-tuning distilled from the old adapter.
    distillation: dict[str, float | str] | None = None
    # The search stopped before its trials budget: `patience` trials in a row did not improve.
    stopped_early: bool = False
    # No search ran: the old adapter already met the target on the target base (skipWhenReady).
    search_skipped: bool = False
    # Data-parallel workers that fine-tuned (torchrun's WORLD_SIZE), each on a ``device``.
    workers: int = 1
    # The bases were sharded across the workers (spec.distributed.shardBase).
    sharded_base: bool = False

    @classmethod
    def build(
        cls,
        *,
        adapter: Adapter,
        strategy: str,
        output_uri: str,
        fingerprint: str,
        device: str,
        rank: int,
        target: Target,
        qualities: dict[str, dict[str, Quality]],
        search_result: SearchResult | None,
        outcome: FinetuneOutcome,
        load_seconds: float,
        reference_seconds: float,
        device_peak_gib: float | None = None,
        checkpointing: bool = False,
        planned_peak_gib: float | None = None,
        teacher_seconds: float | None = None,
        distillation: dict[str, float | str] | None = None,
        workers: int = 1,
        sharded_base: bool = False,
    ) -> AdapterReport:
        search_seconds = search_result.seconds if search_result else 0.0
        return cls(
            adapter=adapter.name,
            strategy=strategy,
            ready=outcome.ready,
            metric=target.metric,
            target=target.value,
            output_uri=output_uri,
            fingerprint=fingerprint,
            device=device,
            rank=rank,
            quality={
                stage: {split: _quality(q) for split, q in splits.items()}
                for stage, splits in qualities.items()
            },
            coefficients=(
                {g: {"alpha": a, "beta": b} for g, (a, b) in search_result.coefficients.items()}
                if search_result
                else None
            ),
            trials=[asdict(t) for t in search_result.trials] if search_result else [],
            steps=outcome.steps,
            ready_step=outcome.ready_step,
            seconds={
                "load": load_seconds,
                "reference": reference_seconds,
                "teacher": teacher_seconds,
                "search": search_seconds,
                "training": outcome.train_seconds,
                "evaluation": outcome.eval_seconds,
                "timeToReadiness": outcome.ready_seconds,
            },
            history=[asdict(e) for e in outcome.history],
            device_peak_gib=device_peak_gib,
            checkpointing=checkpointing,
            micro_batch=outcome.micro_batch,
            planned_peak_gib=planned_peak_gib,
            fell_back=bool(search_result and search_result.fell_back),
            distillation=distillation,
            stopped_early=bool(search_result and search_result.stopped_early),
            search_skipped=bool(search_result and search_result.skipped),
            workers=workers,
            sharded_base=sharded_base,
        )

    def quality_of(self, stage: str, split: str = "validation") -> float | None:
        values = self.quality.get(stage, {}).get(split)
        return None if values is None else values[self.metric]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def result(self) -> AdapterResult:
        """The compact result the operator records in status.adapters[].result (the fusion
        coefficients flattened to ``[group.]alpha`` / ``[group.]beta``, the first
        MAX_COEFFICIENTS of them)."""
        coefficients = None
        if self.coefficients:
            coefficients = {}
            for group, values in self.coefficients.items():
                prefix = "" if group == "all" else f"{group}."
                coefficients[f"{prefix}alpha"] = values["alpha"]
                coefficients[f"{prefix}beta"] = values["beta"]
            coefficients = dict(list(coefficients.items())[:MAX_COEFFICIENTS])
        return AdapterResult(
            ready=self.ready,
            strategy=self.strategy,
            output_uri=self.output_uri,
            metric="loss" if self.metric == "loss" else "accuracy",
            target=self.target,
            quality_source=self.quality_of("source"),
            quality_before=self.quality_of("before"),
            quality_after=self.quality_of("after"),
            coefficients=coefficients,
            steps=self.steps,
            time_to_readiness_seconds=self.seconds["timeToReadiness"],
        )


def write(folder: Path, report: AdapterReport) -> None:
    """Write report.json and summary.md atomically (report last: it marks the work finished)."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / SUMMARY_FILE).write_text(summary(report))
    partial = folder / f"{REPORT_FILE}.partial"
    partial.write_text(json.dumps(report.to_json(), indent=2) + "\n")
    os.replace(partial, folder / REPORT_FILE)


def load_finished(folder: Path, fingerprint: str) -> AdapterReport | None:
    """A finished report for the same work, if the adapter files it describes are present."""
    path = folder / REPORT_FILE
    if not all((folder / f).is_file() for f in (REPORT_FILE, CONFIG_FILE, WEIGHTS_FILE)):
        return None
    try:
        data = json.loads(path.read_text())
        loaded = AdapterReport(**data)
    except (json.JSONDecodeError, TypeError, UnicodeDecodeError):
        return None
    return loaded if loaded.fingerprint == fingerprint else None


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.4f}"


def _teacher(seconds: float | None) -> str:
    return "" if seconds is None else f"teacher {seconds:.1f} s, "


def _on(report: AdapterReport) -> str:
    workers = report.workers
    if workers == 1:
        return report.device
    sharded = ", the bases sharded across them" if report.sharded_base else ""
    return f"{workers} workers ({report.device} each{sharded})"


def summary(report: AdapterReport) -> str:
    """A short Markdown summary of one adapter's migration."""
    seconds = report.seconds
    ttr = seconds["timeToReadiness"]
    lines = [
        f"# Adapter `{report.adapter}`: {'ready' if report.ready else 'NOT ready'}",
        "",
        f"Strategy `{report.strategy}`, rank {report.rank}, on {_on(report)}. "
        f"Target: {report.metric} {'<=' if report.metric == 'loss' else '>='} "
        f"{report.target:.4f} (validation).",
        "",
        "| model | validation loss | validation accuracy | test accuracy |",
        "| --- | --- | --- | --- |",
    ]
    labels = {
        "source": "old adapter, old base",
        "before": "old adapter, new base",
        "after": "migrated adapter, new base",
    }
    for stage, label in labels.items():
        splits = report.quality.get(stage, {})
        validation = splits.get("validation", {})
        test = splits.get("test", {})
        lines.append(
            f"| {label} | {_fmt(validation.get('loss'))} | {_fmt(validation.get('accuracy'))} "
            f"| {_fmt(test.get('accuracy'))} |"
        )
    lines += [
        "",
        f"Steps: {report.steps} (ready at step {report.ready_step}). "
        f"Time to readiness: {'not reached' if ttr is None else f'{ttr:.1f} s'} "
        f"({_teacher(seconds.get('teacher'))}search {seconds['search']:.1f} s, "
        f"training {seconds['training']:.1f} s, "
        f"evaluation {seconds['evaluation']:.1f} s; not counted: loading "
        f"{seconds['load']:.1f} s, reference measurements {seconds['reference']:.1f} s).",
    ]
    if report.coefficients:
        chosen = ", ".join(
            f"{g}: alpha={c['alpha']:.3f} beta={c['beta']:.3f}"
            for g, c in report.coefficients.items()
        )
        if report.search_skipped and report.ready_step == 0:
            lines += [
                "",
                "No search: the old adapter on the target base already met the readiness "
                "target, so it is the start (initialization.skipWhenReady).",
            ]
        elif report.search_skipped:
            lines += ["", "No search (initialization.trials: 0): the old adapter is the start."]
        else:
            lines += ["", f"Fusion coefficients ({len(report.trials)} trials): {chosen}."]
        if report.stopped_early:
            lines += [
                "The search stopped early: its last trials did not improve on the best "
                "(initialization.patience)."
            ]
        if report.fell_back:
            lines += [
                "The searched start was worse than the old adapter's on the readiness metric: "
                "the fine-tuning started from the old adapter (initialization.fallback)."
            ]
    return "\n".join(lines) + "\n"
