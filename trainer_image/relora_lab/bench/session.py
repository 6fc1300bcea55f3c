"""One `relora bench` session: testbed, runs, summary, report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
)

from relora_lab.bench import running, summary, tuning, variants, writing
from relora_lab.settings import TARGET_FRACTION
from relora_lab.testbed import world
from relora_lab.testbed.commands import testbed_folder
from relora_lab.testbed.config import DEFAULT_WORLD, WORLDS, config_for
from relora_lab.testbed.layout import TestbedPaths
from relora_trainer import local_run, models
from relora_trainer.errors import BadInput
from relora_trainer.progress import ProgressSink

QUICK_SEEDS = 3
FULL_SEEDS = 5


@dataclass
class Options:
    quick: bool = False
    seeds: int | None = None
    out: str = ".relora/bench"
    testbed: str | None = None  # one world's folder (default: testbed_folder(world, seed))
    worlds: list[str] | None = None  # worlds of the suite (default: the original testbed)
    build_seeds: int = 1  # builds of each world with seeds 0..N-1 (the build as a factor)
    first_build: int = 0  # the builds are first_build .. first_build + build_seeds - 1
    adapter_kinds: list[str] | None = None  # other kinds of task adapter, rows of their own
    model: str | None = None
    device: str = "auto"
    threads: int = 2
    variants: list[str] | None = None
    severities: list[str] | None = None
    steps: int | None = None  # the step budget (default: variants.COMMON_FINETUNE)
    stop_when_ready: bool = False  # each run stops when ready (time to readiness only)
    target_fraction: float = TARGET_FRACTION
    first_seed: int = 0  # the seeds are first_seed .. first_seed + seeds - 1
    tune: bool = False  # run the tuning grid on the tuning seeds instead of the benchmark
    from_reports: list[str] | None = None  # summarize these reports' runs instead of running
    command: str = "relora bench"


def run(options: Options, *, console: Console | None = None) -> dict[str, Path]:
    """Run the benchmark; return the paths of the written reports."""
    started = time.perf_counter()
    if options.from_reports:
        return resummarize(options, console=console or Console(stderr=True))
    local_run.quiet_libraries()
    if options.threads:
        torch.set_num_threads(options.threads)
    console = console or Console(stderr=True)
    device = models.pick_device(options.device)
    if options.tune:
        chosen = tuning.grid(options.variants)
        seeds = list(tuning.TUNING_SEEDS)
    else:
        chosen = variants.by_name(options.variants, quick=options.quick)
        count = options.seeds or (QUICK_SEEDS if options.quick else FULL_SEEDS)
        seeds = list(range(options.first_seed, options.first_seed + count))
    testbeds = _testbeds(options, device, console)
    manifests = {
        label: paths.manifest(severity, kind)
        for label, (paths, severity, kind) in testbeds.items()
        if not options.severities or severity in options.severities
    }
    if not manifests:
        raise BadInput(f"--severity {options.severities}: none of the testbeds has it")
    out = Path(options.out).resolve()  # run outputs too: not relative to the manifests
    load_range = [float("inf"), 0.0]
    budget = dict(variants.COMMON_FINETUNE)
    if options.steps is not None:
        budget["maxSteps"] = options.steps
    if options.stop_when_ready:
        budget["stopWhenReady"] = True
    readiness = {"metric": "accuracy", "relativeToSource": options.target_fraction}

    with Progress(
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("{task.fields[detail]}"),
        TimeElapsedColumn(),
        console=console,
    ) as bars:
        total = len(manifests) * len(seeds) * len(chosen)
        overall = bars.add_task("runs", total=total, detail="")
        current = bars.add_task("run", total=1, detail="")

        def on_run(severity: str, variant: variants.Variant, seed: int) -> ProgressSink:
            label = f"{severity} {variant.name} seed {seed}"

            def report(stage: str, done: int, of: int, detail: str) -> None:
                bars.update(
                    current,
                    description=f"{label}: {stage}",
                    completed=done,
                    total=of,
                    detail=detail,
                )

            bars.update(current, description=label, completed=0, total=1, detail="")
            return running.StageSink(report)

        def on_done(record: running.RunRecord) -> None:
            load_range[0] = min(load_range[0], *record.load_average)
            load_range[1] = max(load_range[1], *record.load_average)
            ttr = "-" if record.time_to_readiness is None else f"{record.time_to_readiness:.1f} s"
            bars.update(overall, advance=1, detail=f"last: {record.variant} ready in {ttr}")

        records = running.run_matrix(
            manifests_by_severity=manifests,
            variants=chosen,
            seeds=seeds,
            out=out,
            device=device,
            common=budget,
            readiness=readiness,
            on_run=on_run,
            on_done=on_done,
        )
    if options.tune:
        path = tuning.write(out, records, command=options.command)
        (out / "tuning-runs.json").write_text(
            json.dumps([r.to_json() for r in records], indent=1, default=str) + "\n"
        )
        for strategy, best in tuning.select(records).items():
            console.print(f"{strategy}: {best.name} ({best.time_to_readiness.text(1)} s)")
        return {"markdown": path, "json": out / "tuning-runs.json"}
    table = summary.cells(records)
    comparisons = summary.compare(table, records, baselines=variants.BASELINES)
    roots = list(dict.fromkeys(str(paths.root) for paths, _, _ in testbeds.values()))
    summaries = {
        str(paths.root): json.loads(paths.summary.read_text()).get("figures", {})
        for paths, _, _ in testbeds.values()
    }
    context = writing.Context(
        command=options.command,
        mode="quick" if options.quick else "full",
        seeds=seeds,
        wall_seconds=time.perf_counter() - started,
        device=str(device),
        threads=torch.get_num_threads(),
        testbed=", ".join(roots),
        testbed_figures=summaries[roots[0]] if len(roots) == 1 else {},
        budget=budget,
        variants=chosen,
        target_rule=_target_rule(options.target_fraction),
        load_averages=(load_range[0] if records else 0.0, load_range[1]),
    )
    written = writing.write(out, context, table, comparisons, records)
    _print_summary(console.print, table, comparisons, writing.accuracy_at(context))
    return written


def _target_rule(fraction: float) -> str:
    return (
        f"validation accuracy >= {fraction:g} x the old adapter's validation accuracy on v1 "
        f"(readiness relativeToSource {fraction:g})"
    )


def resummarize(options: Options, *, console: Console) -> dict[str, Path]:
    """The report of the runs of earlier ``bench-report.json`` files (several: merged, e.g. two
    sessions that ran different variants on the same pairs), at ``options.target_fraction``:
    each run's readiness re-read from its evaluation history. Nothing is run."""
    records: list[running.RunRecord] = []
    chosen: dict[str, variants.Variant] = {}
    contexts = []
    for name in options.from_reports or []:
        try:
            document = json.loads(Path(name).read_text())
            contexts.append(document["context"])
            records += [running.RunRecord.from_json(r) for r in document["runs"]]
            for v in document["context"]["variants"]:
                chosen.setdefault(
                    v["name"], variants.Variant(v["name"], v["description"], v["method"])
                )
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise BadInput(f"--from-report {name}: not a bench-report.json ({error})") from error
    records = [summary.retarget(r, options.target_fraction) for r in records]
    table = summary.cells(records)
    comparisons = summary.compare(table, records, baselines=variants.BASELINES)
    first = contexts[0]
    context = writing.Context(
        command=options.command,
        mode=first["mode"],
        seeds=sorted({r.seed for r in records}),
        wall_seconds=sum(float(c["wall_seconds"]) for c in contexts),
        device=first["device"],
        threads=first["threads"],
        testbed=", ".join(dict.fromkeys(c["testbed"] for c in contexts)),
        testbed_figures=first["testbed_figures"] if len(contexts) == 1 else {},
        budget=first["budget"],
        variants=list(chosen.values()),
        target_rule=_target_rule(options.target_fraction),
        load_averages=(
            min(c["load_averages"][0] for c in contexts),
            max(c["load_averages"][1] for c in contexts),
        ),
        notes=[f"Summarized from {', '.join(options.from_reports or [])}: no run was repeated."],
    )
    written = writing.write(Path(options.out).resolve(), context, table, comparisons, records)
    _print_summary(console.print, table, comparisons, writing.accuracy_at(context))
    return written


def _testbeds(
    options: Options, device: torch.device, console: Console
) -> dict[str, tuple[TestbedPaths, str, str | None]]:
    """Build (or reuse) every testbed of the session: row label -> (its paths, severity, kind
    of adapter). One world built once is labelled by severity alone (``severe``); a suite by
    world and severity (``qwen2-phrases/severe``), by world and build seed when there are
    several builds or another than build 0 (``.../b1``), and another kind of adapter by its
    name (``severe+dora``)."""
    names = list(WORLDS) if options.worlds == ["all"] else options.worlds or [DEFAULT_WORLD]
    unknown = [n for n in names if n not in WORLDS]
    if unknown:
        raise BadInput(f"--world {unknown}: known worlds are {', '.join(WORLDS)}")
    first = options.first_build
    if first < 0:
        raise BadInput(f"--first-build {first}: a build seed is 0 or more")
    build_seeds = range(first, first + max(options.build_seeds, 1))
    by_build = len(build_seeds) > 1 or first > 0
    if options.testbed is not None and (len(names) > 1 or len(build_seeds) > 1):
        raise BadInput("--testbed names one folder: give it with one --world and one build")
    kinds = list(options.adapter_kinds or [])
    labelled: dict[str, tuple[TestbedPaths, str, str | None]] = {}
    for name in names:
        for build_seed in build_seeds:
            folder = Path(options.testbed or testbed_folder(name, build_seed))
            console.print(f"Testbed {folder} (world {name}, build seed {build_seed}) ...")
            config = config_for(
                model=options.model, world=name, seed=build_seed, adapter_kinds=tuple(kinds)
            )
            paths = world.build(folder, config, device=device, console=console)
            for severity in paths.severities:
                label = severity if len(names) == 1 and not by_build else f"{name}/{severity}"
                if by_build:
                    label += f"/b{build_seed}"
                for kind in (None, *kinds):
                    labelled[f"{label}+{kind}" if kind else label] = (paths, severity, kind)
    return labelled


def _print_summary(
    say: Callable[[str], None],
    table: dict[str, dict[str, summary.Cell]],
    comparisons: dict[str, summary.Comparison],
    accuracy_at: str,
) -> None:
    for severity, row in table.items():
        say(f"[bold]v2-{severity}[/bold]")
        for line in writing.results_table(row, comparisons.get(severity), accuracy_at=accuracy_at):
            say(line)
        if severity in comparisons:
            for line in writing.claims(row, comparisons[severity]):
                say(line)
