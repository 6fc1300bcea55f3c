"""bench-report.md (tables + plots) and bench-report.json (every run, every figure)."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from relora_lab.bench import plots
from relora_lab.bench.running import RunRecord
from relora_lab.bench.summary import METHOD, Cell, Comparison, Ratio, to_json
from relora_lab.bench.variants import Variant

REPORT_MD = "bench-report.md"
REPORT_JSON = "bench-report.json"


@dataclass
class Context:
    """What the run was: the command, the machine, the testbed, the budget."""

    command: str
    mode: str
    seeds: list[int]
    wall_seconds: float
    device: str
    threads: int
    testbed: str
    testbed_figures: Mapping[str, Any]
    budget: Mapping[str, Any]
    variants: Sequence[Variant]
    target_rule: str = (
        "validation accuracy >= the old adapter's validation accuracy on v1 "
        "(readiness relativeToSource 1.0)"
    )
    load_averages: tuple[float, float] = (0.0, 0.0)  # min and max 1-minute load over the runs
    notes: list[str] = field(default_factory=list)


def _pct(value: float | None) -> str:
    return "-" if value is None else f"{100 * value:.1f}"


def _ratio_text(ratio: Ratio | None) -> str:
    if ratio is None or ratio.seconds is None:
        return "-"
    return f"{ratio.bound}{ratio.seconds:.2f}x"


def _interval_text(ratio: Ratio | None) -> str:
    if ratio is None or ratio.interval is None:
        return "-"
    low, high = ratio.interval
    return f"[{low:.2f}, {high:.2f}]"


def heading(label: str) -> str:
    """A row label as a section title: ``severe`` -> ``v1 -> v2-severe``, a suite's
    ``qwen2-phrases/severe/b1`` -> ``qwen2-phrases (build 1): v1 -> v2-severe``, another kind
    of adapter ``severe+dora`` -> ``v1 -> v2-severe (dora adapter)``."""
    label, _, kind = label.partition("+")
    adapter = f" ({kind} adapter)" if kind else ""
    parts = label.split("/")
    if len(parts) == 1:
        return f"v1 -> v2-{label}{adapter}"
    build = f" (build {parts[2][1:]})" if len(parts) > 2 else ""
    return f"{parts[0]}{build}: v1 -> v2-{parts[1]}{adapter}"


def file_label(label: str) -> str:
    """A row label as part of a file name."""
    return label.replace("/", "_").replace("+", "-")


def suite_table(comparisons: Mapping[str, Comparison]) -> list[str]:
    """One line per row label: the headline ratios with their 95% intervals, and accuracy."""
    lines = [
        "| pair | warm-start/relora time | 95% interval | in steps | scratch/relora time "
        "| accuracy vs best baseline |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for label, comparison in comparisons.items():
        warm = comparison.ratios.get("warm-start")
        scratch = comparison.ratios.get("scratch")
        steps = "-" if warm is None or warm.steps is None else f"{warm.steps:.2f}x"
        delta = (
            "-"
            if comparison.accuracy_delta is None
            else f"{100 * comparison.accuracy_delta:+.1f} ({comparison.best_baseline})"
        )
        lines.append(
            f"| {label} | {_ratio_text(warm)} | {_interval_text(warm)} | {steps} "
            f"| {_ratio_text(scratch)} | {delta} |"
        )
    return lines


def accuracy_at(context: Context) -> str:
    """When the report's test accuracy was measured: at the budget, or at readiness."""
    return "readiness" if context.budget.get("stopWhenReady") else "budget"


def results_table(
    row: Mapping[str, Cell], comparison: Comparison | None, *, accuracy_at: str = "budget"
) -> list[str]:
    """``accuracy_at``: when the test accuracy was measured (budget, or readiness for runs that
    stopped there)."""
    lines = [
        "| variant | ready | time to readiness (s) | steps to readiness | "
        f"baseline/relora time | test accuracy at {accuracy_at} (%) | search (s) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, c in row.items():
        ratio = comparison.ratios.get(name) if comparison else None
        ttr = c.time_to_readiness.text(1)
        steps = c.ready_step.text(0)
        if c.censored:
            ttr, steps = f">= {ttr}", f">= {steps}"
        test = c.test_accuracy
        test_text = (
            "-"
            if test.mean is None or test.std is None
            else f"{100 * test.mean:.1f} ± {100 * test.std:.1f}"
        )
        lines.append(
            f"| {'**' + name + '**' if name == METHOD else name} | {c.ready}/{c.runs} | {ttr} "
            f"| {steps} | {'1.00x' if name == METHOD else _ratio_text(ratio)} | {test_text} "
            f"| {c.search_seconds.text(1)} |"
        )
    return lines


def claims(row: Mapping[str, Cell], comparison: Comparison) -> list[str]:
    """One line per headline figure, with its sign said in words."""
    out = []
    for baseline in ("scratch", "warm-start"):
        ratio = comparison.ratios.get(baseline)
        if ratio is None or ratio.seconds is None:
            continue
        per_seed = ratio.per_seed.text(2)
        steps = "-" if ratio.steps is None else f"{ratio.steps:.2f}x"
        out.append(
            f"- {baseline}/relora time to readiness: **{_ratio_text(ratio)}** (per seed "
            f"{per_seed}, 95% interval {_interval_text(ratio)}; in steps {steps})"
        )
    if comparison.accuracy_delta is not None and comparison.best_baseline is not None:
        out.append(
            f"- relora test accuracy minus the best baseline's ({comparison.best_baseline}): "
            f"**{100 * comparison.accuracy_delta:+.1f} points**"
        )
    verdict = (
        "relora is faster to readiness than every trained baseline"
        if comparison.wins_time
        else "relora is NOT faster to readiness than every trained baseline"
    )
    accuracy = "with no accuracy loss" if comparison.no_accuracy_loss else "and LOSES test accuracy"
    out.append(f"- Verdict: {verdict}, {accuracy} against the best baseline.")
    return out


def markdown(
    context: Context,
    table: Mapping[str, Mapping[str, Cell]],
    comparisons: Mapping[str, Comparison],
    records: Sequence[RunRecord],
    images: Mapping[str, str],
) -> str:
    figures = context.testbed_figures
    budget = ", ".join(f"{k} {v}" for k, v in context.budget.items())
    stopped = accuracy_at(context) == "readiness"
    lines = [
        f"# Benchmark: ReLoRA against its baselines ({context.mode})",
        "",
        f"Command: `{context.command}`. Wall time {context.wall_seconds / 60:.1f} min on "
        f"{context.device} ({context.threads} torch threads); 1-minute load average between "
        f"{context.load_averages[0]:.1f} and {context.load_averages[1]:.1f} during the runs.",
        "",
        f"Testbed `{context.testbed}`. Seeds {context.seeds} (the migration's seed: LoRA init, "
        "batch order, search sampler; the testbed itself is fixed).",
        "",
        f"Same for every variant: {budget}. Readiness target: {context.target_rule}. "
        "Time to readiness counts search + training + evaluation up to the first evaluation "
        "that met the target (`report.seconds.timeToReadiness`); loading and the reference "
        "measurements are not counted. "
        + (
            "Runs stop at readiness (`stopWhenReady: true`): test accuracy is the adapter's "
            "there (after the whole budget for a run never ready), not at the budget. "
            if stopped
            else "Test accuracy is the adapter's after the whole budget (`stopWhenReady: false`). "
        )
        + "Selection and readiness use the validation split only.",
        "",
    ]
    adapter = figures.get("adapter", {})
    if adapter:
        lines += [
            "The old adapter's test accuracy: "
            + ", ".join(
                f"{k.split('/')[0]} {_pct(v)}%"
                for k, v in adapter.items()
                if k.endswith("/adapter/test")
            )
            + " (chance 25%).",
            "",
        ]
    lines += ["## Variants", "", "| variant | what | method fields |", "| --- | --- | --- |"]
    for variant in context.variants:
        fields = json.dumps(dict(variant.method), separators=(",", ":")) or "{}"
        lines.append(f"| {variant.name} | {variant.description} | `{fields}` |")
    for severity, row in table.items():
        comparison = comparisons.get(severity)
        first = next(iter(row.values()))
        lines += [
            "",
            f"## {heading(severity)}",
            "",
            f"Target: validation accuracy {_pct(first.target)}%. Old adapter on v2 as is: test "
            f"accuracy {_pct(first.before_test)}% (on v1: {_pct(first.source_test)}%).",
            "",
            *results_table(row, comparison, accuracy_at=accuracy_at(context)),
            "",
        ]
        if comparison is not None:
            lines += [*claims(row, comparison), ""]
        for key in (f"curves-{severity}", f"trials-{severity}"):
            if key in images:
                lines += [f"![{key}]({images[key]})", ""]
    if len(comparisons) > 1:
        lines += ["## All pairs", "", *suite_table(comparisons), ""]
    if "readiness" in images:
        lines += ["## Time to readiness", "", f"![readiness]({images['readiness']})", ""]
    lines += [
        "## Every run",
        "",
        "| severity | variant | seed | ready step | time to readiness (s) | search (s) | "
        "test accuracy (%) | coefficients | load |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in records:
        ttr = "-" if r.time_to_readiness is None else f"{r.time_to_readiness:.1f}"
        coefficients = (
            " ".join(
                f"{g}:({c['alpha']:.2f},{c['beta']:.2f})" for g, c in sorted(r.coefficients.items())
            )
            if r.coefficients
            else ""
        )
        if len(coefficients) > 60:
            coefficients = coefficients[:57] + "..."
        lines.append(
            f"| {r.severity} | {r.variant} | {r.seed} | "
            f"{'-' if r.ready_step is None else r.ready_step} | {ttr} | {r.search_seconds:.1f} "
            f"| {_pct(r.accuracy('after', 'test'))} | {coefficients} | "
            f"{r.load_average[0]:.1f}/{r.load_average[1]:.1f} |"
        )
    if context.notes:
        lines += ["", "## Notes", "", *[f"- {note}" for note in context.notes]]
    return "\n".join(lines) + "\n"


def write(
    out: Path,
    context: Context,
    table: dict[str, dict[str, Cell]],
    comparisons: dict[str, Comparison],
    records: Sequence[RunRecord],
) -> dict[str, Path]:
    """Write the plots, bench-report.md and bench-report.json under ``out``."""
    out.mkdir(parents=True, exist_ok=True)
    images: dict[str, str] = {}
    for severity in table:
        images[f"curves-{severity}"] = plots.curves(
            records, severity, out / f"curves-{file_label(severity)}.png"
        ).name
        if any(r.trials and r.severity == severity for r in records):
            images[f"trials-{severity}"] = plots.trials(
                records, severity, out / f"trials-{file_label(severity)}.png"
            ).name
    images["readiness"] = plots.readiness_bars(table, out / "readiness.png").name
    text = markdown(context, table, comparisons, records, images)
    _atomic(out / REPORT_MD, text)
    document = {
        "context": {
            **{k: v for k, v in context.__dict__.items() if k != "variants"},
            "variants": [
                {"name": v.name, "description": v.description, "method": dict(v.method)}
                for v in context.variants
            ],
        },
        **to_json(table, comparisons),
        "runs": [r.to_json() for r in records],
    }
    _atomic(out / REPORT_JSON, json.dumps(document, indent=1, default=str) + "\n")
    return {"markdown": out / REPORT_MD, "json": out / REPORT_JSON}


def _atomic(path: Path, text: str) -> None:
    partial = path.with_name(path.name + ".partial")
    partial.write_text(text)
    os.replace(partial, path)
