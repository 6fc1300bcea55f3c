"""PNG plots of a benchmark: quality-vs-time curves, search trials, time-to-readiness bars."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

from matplotlib.figure import Figure  # no pyplot: no backend, no global state

from relora_lab.bench.running import RunRecord
from relora_lab.bench.summary import Cell

COLORS = {
    "scratch": "tab:gray",
    "reuse": "tab:brown",
    "warm-start": "tab:blue",
    "relora": "tab:red",
}
_OTHERS = ["tab:orange", "tab:green", "tab:purple", "tab:pink", "tab:olive", "tab:cyan"]


def color_of(variant: str, variants: Sequence[str]) -> str:
    if variant in COLORS:
        return COLORS[variant]
    ablations = [v for v in variants if v not in COLORS]
    return _OTHERS[ablations.index(variant) % len(_OTHERS)] if variant in ablations else "black"


def curves(records: Sequence[RunRecord], severity: str, path: Path) -> Path:
    """Validation accuracy against work seconds (left) and steps (right), one line per run."""
    runs = [r for r in records if r.severity == severity and r.history]
    variants = list(dict.fromkeys(r.variant for r in runs))
    figure = Figure(figsize=(12, 4.5))
    by_time, by_step = figure.subplots(1, 2, sharey=True)
    labelled: set[str] = set()
    for record in runs:
        color = color_of(record.variant, variants)
        style = "-" if record.variant in COLORS else "--"
        seconds = [h["seconds"] for h in record.history]
        steps = [h["step"] for h in record.history]
        quality = [h["quality"] for h in record.history]
        label = record.variant if record.variant not in labelled else None
        labelled.add(record.variant)
        width = 2.0 if record.variant == "relora" else 1.2
        by_time.plot(seconds, quality, style, color=color, label=label, lw=width, alpha=0.8)
        by_step.plot(steps, quality, style, color=color, lw=width, alpha=0.8)
        if record.time_to_readiness is not None:
            by_time.plot([record.time_to_readiness], [record.target], "o", color=color, ms=4)
    if runs:
        target = runs[0].target
        for axis in (by_time, by_step):
            axis.axhline(target, color="black", lw=0.8, ls=":")
            axis.grid(alpha=0.3)
        by_time.text(0, target, " target (old adapter on v1)", va="bottom", fontsize=8)
    by_time.set_xlabel("work seconds (search + training + evaluation)")
    by_step.set_xlabel("optimizer steps")
    by_time.set_ylabel("validation accuracy")
    by_time.legend(fontsize=8, loc="lower right")
    figure.suptitle(f"v1 -> v2-{severity}: quality against time, every seed")
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def trials(records: Sequence[RunRecord], severity: str, path: Path) -> Path:
    """The searched (alpha, beta) of relora's global search, coloured by the objective."""
    figure = Figure(figsize=(6, 4.5))
    axis = figure.subplots()
    points = [
        (t["params"].get("alpha"), t["params"].get("beta"), t["value"])
        for r in records
        if r.severity == severity and r.variant == "relora"
        for t in r.trials
        if t.get("value") is not None and "alpha" in t["params"]
    ]
    if points:
        alphas, betas, values = zip(*points, strict=True)
        shown = axis.scatter(alphas, betas, c=values, cmap="viridis_r", s=24)
        figure.colorbar(shown, ax=axis, label="objective (lower is better)")
    chosen = [
        (c["all"]["alpha"], c["all"]["beta"])
        for r in records
        if r.severity == severity and r.variant == "relora" and r.coefficients
        for c in [r.coefficients]
        if "all" in c
    ]
    if chosen:
        xs, ys = zip(*chosen, strict=True)
        axis.scatter(xs, ys, marker="x", color="red", s=80, label="chosen")
        axis.legend(fontsize=8)
    axis.set_xlabel("alpha (old adapter's update)")
    axis.set_ylabel("beta (base evolution, projected)")
    axis.set_title(f"relora search trials, v2-{severity}, every seed")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path


def readiness_bars(table: dict[str, dict[str, Cell]], path: Path) -> Path:
    """Mean time-to-readiness per variant and severity, std as error bars; hatched: censored."""
    severities = list(table)
    variants = list(dict.fromkeys(v for row in table.values() for v in row if v != "reuse"))
    figure = Figure(figsize=(6 * len(severities), 4))
    axes = figure.subplots(1, len(severities), squeeze=False)
    for axis, severity in zip(axes[0], severities, strict=True):
        row = table[severity]
        names = [v for v in variants if v in row]
        means = [row[v].time_to_readiness.mean or 0.0 for v in names]
        errors = [row[v].time_to_readiness.std or 0.0 for v in names]
        bars = axis.bar(
            range(len(names)),
            means,
            yerr=errors,
            color=[color_of(v, variants) for v in names],
            capsize=3,
        )
        for bar, name in zip(bars, names, strict=True):
            if row[name].censored:
                bar.set_hatch("//")
        axis.set_xticks(range(len(names)), names, rotation=30, ha="right", fontsize=8)
        axis.set_ylabel("time to readiness (s)")
        axis.set_title(f"v2-{severity} (hatched: target not met in every seed)")
        axis.grid(axis="y", alpha=0.3)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    return path
