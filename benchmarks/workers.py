"""Data-parallel workers against one process, side by side: one adapter's migration by the
trainer Job entrypoint (`python -m relora_trainer.job`, the code path of a pod) launched as one
process and as N workers with torchrun's environment (gloo on the CPU), on a testbed's manifest.

    python benchmarks/workers.py --testbed examples/testbed-qwen2-phrases --severity severe \\
        --workers 2 --repeats 2

Each repeat runs, in turn: one process with one torch thread, one process with N threads (the
same cores as the workers), and N workers with one thread each. It prints, per run, the report's
time to readiness, its evaluation, training and teacher seconds, the steps and the wall time,
then the means and the ratios against one process with N threads. The runs share the machine's
cores with nothing else of this script; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from relora_api import contract
from relora_api.resource import AdapterMigration
from relora_sandbox.processes import free_port
from relora_trainer.distributed import ENV_TIMEOUT, ENVIRONMENT


@dataclass
class Launch:
    """One launch of the entrypoint: its exit codes and output by rank, and where it wrote."""

    codes: list[int]
    stdout: list[str]
    stderr: list[str]
    root: Path
    adapter: str
    output_dir: Path

    @property
    def output(self) -> Path:
        return self.output_dir / self.adapter

    def termination(self, rank: int) -> Path:
        return self.root / f"termination-{rank}"

    def report(self) -> dict[str, Any]:
        loaded: dict[str, Any] = json.loads((self.output / "report.json").read_text())
        return loaded


def launch(
    manifest: dict[str, Any],
    adapter: str,
    root: Path,
    workers: int,
    *,
    cwd: Path | None = None,
    threads: int = 1,
    timeout: int = 240,
    extra: dict[str, str] | None = None,
) -> Launch:
    """The Job entrypoint for ``adapter`` of ``manifest`` as ``workers`` processes (with
    torchrun's environment when more than one, and ``extra``), ``threads`` torch threads each,
    working in ``cwd`` (default ``root``: relative URIs resolve there); termination messages in
    ``root``. A launch that outlasts ``timeout`` seconds (a worker's collective timeout, plus a
    minute) is killed."""
    root.mkdir(parents=True, exist_ok=True)
    spec = AdapterMigration.from_manifest(manifest).spec
    base = {k: v for k, v in os.environ.items() if k not in ENVIRONMENT}
    base.update(
        {
            contract.ENV_MIGRATION: contract.single_adapter_spec(spec, adapter),
            contract.ENV_ADAPTER: adapter,
            contract.ENV_OWNER: contract.owner("ns", str(manifest["metadata"]["name"]), "uid-1"),
            "OMP_NUM_THREADS": str(threads),
            ENV_TIMEOUT: str(timeout),
        }
    )
    port = str(free_port())
    processes = []
    for rank in range(workers):
        env = {**base, contract.ENV_TERMINATION_LOG: str(root / f"termination-{rank}")}
        if workers > 1:
            env.update(
                RANK=str(rank),
                WORLD_SIZE=str(workers),
                LOCAL_RANK=str(rank),
                MASTER_ADDR="127.0.0.1",
                MASTER_PORT=port,
            )
        env.update(extra or {})
        processes.append(
            subprocess.Popen(
                [sys.executable, "-m", "relora_trainer.job"],
                cwd=cwd or root,
                env=env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    try:
        outputs = [p.communicate(timeout=timeout + 60) for p in processes]
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    out = Path(spec.output.uri)
    return Launch(
        codes=[p.returncode for p in processes],
        stdout=[o for o, _ in outputs],
        stderr=[e for _, e in outputs],
        root=root,
        adapter=adapter,
        output_dir=out if out.is_absolute() else (cwd or root) / out,
    )


def _manifest(
    testbed: Path, severity: str, strategy: str, steps: int, out: Path, trials: int | None
) -> dict[str, Any]:
    manifest: dict[str, Any] = yaml.safe_load((testbed / f"migration-{severity}.yaml").read_text())
    spec = manifest["spec"]
    spec["output"] = {"uri": str(out)}
    method = spec.setdefault("method", {})
    method["strategy"] = strategy
    if trials is not None:
        method.setdefault("initialization", {})["trials"] = trials
    method.setdefault("finetune", {}).update(maxSteps=steps, stopWhenReady=True)
    return manifest


def _row(label: str, launched: Launch, wall: float) -> dict[str, Any]:
    if any(launched.codes):
        raise SystemExit(f"{label}: exit codes {launched.codes}\n{launched.stderr[0][-2000:]}")
    report = launched.report()
    seconds = report["seconds"]
    return {
        "run": label,
        "ready": report["ready"],
        "steps": report["steps"],
        "timeToReadiness": seconds["timeToReadiness"],
        "evaluation": seconds["evaluation"],
        "training": seconds["training"],
        "teacher": seconds.get("teacher") or 0.0,
        "search": seconds.get("search") or 0.0,
        "wall": wall,
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--testbed", type=Path, default=Path("examples/testbed-qwen2-phrases"))
    parser.add_argument("--severity", default="severe")
    parser.add_argument("--strategy", default="relora")
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument(
        "--trials", type=int, help="initialization.trials (default: the manifest's)"
    )
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(".relora/workers"))
    args = parser.parse_args(argv)
    testbed = args.testbed.resolve()
    if not (testbed / "testbed.json").is_file():
        raise SystemExit(f"{testbed}: not a testbed (build it with `relora testbed build`)")
    adapter = yaml.safe_load((testbed / f"migration-{args.severity}.yaml").read_text())
    name = adapter["spec"]["adapters"][0]["name"]
    n = args.workers
    runs = [("1 process, 1 thread", 1, 1), (f"1 process, {n} threads", 1, n)]
    runs.append((f"{n} workers, 1 thread each", n, 1))
    rows = []
    for repeat in range(args.repeats):
        for label, workers, threads in runs:
            root = (args.out / f"{repeat}-{workers}x{threads}").resolve()
            shutil.rmtree(root, ignore_errors=True)
            manifest = _manifest(
                testbed, args.severity, args.strategy, args.steps, root / "out", args.trials
            )
            started = time.perf_counter()
            launched = launch(manifest, name, root, workers, cwd=testbed, threads=threads)
            rows.append(_row(label, launched, time.perf_counter() - started))
            print(json.dumps(rows[-1]), flush=True)
    print()
    columns = ["timeToReadiness", "evaluation", "training", "teacher", "search", "wall"]
    print("| run | steps | " + " | ".join(f"{c} (s)" for c in columns) + " |")
    print("| --- |" + " ---: |" * (len(columns) + 1))
    means = {}
    for label, _, _ in runs:
        mine = [r for r in rows if r["run"] == label]
        means[label] = {c: statistics.mean(r[c] or 0.0 for r in mine) for c in columns}
        steps = "/".join(str(r["steps"]) for r in mine)
        cells = " | ".join(f"{means[label][c]:.2f}" for c in columns)
        print(f"| {label} | {steps} | {cells} |")
    reference = means[runs[1][0]]
    print()
    for label, _, _ in runs:
        ratios = ", ".join(
            f"{c} {reference[c] / means[label][c]:.2f}x" for c in columns if means[label][c]
        )
        print(f"{runs[1][0]} / {label}: {ratios}")


if __name__ == "__main__":
    main()
