"""Data-parallel workers against one process, side by side: one adapter's migration by the
trainer Job entrypoint (`python -m relora_trainer.job`, the code path of a pod) launched as one
process and as N workers with torchrun's environment (gloo on the CPU), on a testbed's manifest.

    python benchmarks/workers.py --testbed examples/testbed-qwen2-phrases --severity severe \\
        --workers 2 --repeats 2

Each repeat runs, in turn: one process with one torch thread, one process with N threads (the
same cores as the workers), and N workers with one thread each; with ``--shard`` also N workers
that shard the bases (``distributed.shardBase``: FSDP2, each holds 1/N of every weight, every
forward pass in step). It prints, per run, the report's time to readiness, its evaluation,
training and teacher seconds, the steps, the wall time and the largest peak RSS of its
processes, then the means and the ratios against one process with N threads. ``--manifest``
takes any migration manifest instead of a testbed's (benchmarks/trainer_memory.py's 1b world:
the memory a sharded base saves). The runs share the machine's cores with nothing else of this
script; run it on an idle machine.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
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
    peak_rss_gib: list[float]  # each process's own peak RSS (wait4's ru_maxrss)

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
    kill: tuple[int, Callable[[], bool]] | None = None,
) -> Launch:
    """The Job entrypoint for ``adapter`` of ``manifest`` as ``workers`` processes (with
    torchrun's environment when more than one, and ``extra``), ``threads`` torch threads each,
    working in ``cwd`` (default ``root``: relative URIs resolve there); termination messages in
    ``root``. A launch that outlasts ``timeout`` seconds (a worker's collective timeout, plus a
    minute) is killed. ``kill``: (rank, when): that rank is killed (SIGKILL, as a lost node)
    as soon as ``when()`` holds. Each process's output goes through files in ``root`` (a pipe
    could fill while another rank is waited for); its peak RSS is its own (wait4)."""
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
    if spec.shards_base:
        base[contract.ENV_SHARD_BASE] = "1"  # as the operator sets it
    port = str(free_port())
    processes, files = [], []
    logs = Path(tempfile.mkdtemp(prefix="relora-launch-"))  # not in root: its files are checked
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
        out_file, err_file = logs / f"stdout-{rank}", logs / f"stderr-{rank}"
        files.append((out_file, err_file))
        with out_file.open("wb") as out_handle, err_file.open("wb") as err_handle:
            processes.append(
                subprocess.Popen(
                    [sys.executable, "-m", "relora_trainer.job"],
                    cwd=cwd or root,
                    env=env,
                    stdout=out_handle,
                    stderr=err_handle,
                )
            )
    codes: dict[int, int] = {}
    peaks: dict[int, float] = {}
    deadline = time.monotonic() + timeout + 60
    try:
        while len(codes) < len(processes) and time.monotonic() < deadline:
            if kill is not None and kill[0] not in codes and kill[1]():
                processes[kill[0]].kill()
                kill = None
            for rank, process in enumerate(processes):
                if rank in codes:
                    continue
                pid, status, usage = os.wait4(process.pid, os.WNOHANG)
                if pid:
                    codes[rank] = os.waitstatus_to_exitcode(status)
                    peaks[rank] = usage.ru_maxrss / 2**20  # KiB on Linux
                    process.returncode = codes[rank]
            time.sleep(0.05)
    finally:
        for rank, process in enumerate(processes):
            if rank not in codes:
                process.kill()
                codes[rank] = process.wait()
                peaks[rank] = 0.0
    out = Path(spec.output.uri)
    stdout = [o.read_text(errors="replace") for o, _ in files]
    stderr = [e.read_text(errors="replace") for _, e in files]
    shutil.rmtree(logs, ignore_errors=True)
    return Launch(
        codes=[codes[rank] for rank in range(workers)],
        stdout=stdout,
        stderr=stderr,
        root=root,
        adapter=adapter,
        output_dir=out if out.is_absolute() else (cwd or root) / out,
        peak_rss_gib=[peaks[rank] for rank in range(workers)],
    )


def _manifest(
    source: Path, strategy: str, steps: int, out: Path, trials: int | None, shard: int = 0
) -> dict[str, Any]:
    """``source`` with this run's settings; ``shard``: the bases sharded over that many
    processes (one worker of that many GPUs: the world's size; each a CPU process here)."""
    manifest: dict[str, Any] = yaml.safe_load(source.read_text())
    spec = manifest["spec"]
    spec["output"] = {"uri": str(out)}
    if shard:
        spec["distributed"] = {"shardBase": True}
        spec["resources"] = {"limits": {"nvidia.com/gpu": shard}}
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
        "peakRss": max(launched.peak_rss_gib),
        "devicePeak": report.get("device_peak_gib"),  # rank 0's GPU peak (None on a CPU)
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
    parser.add_argument("--manifest", type=Path, help="a manifest instead of the testbed's")
    parser.add_argument("--shard", action="store_true", help="also N workers sharing the bases")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=1)
    parser.add_argument("--out", type=Path, default=Path(".relora/workers"))
    args = parser.parse_args(argv)
    if args.manifest is not None:
        source = args.manifest.resolve()
    else:
        testbed = args.testbed.resolve()
        if not (testbed / "testbed.json").is_file():
            raise SystemExit(f"{testbed}: not a testbed (build it with `relora testbed build`)")
        source = testbed / f"migration-{args.severity}.yaml"
    name = yaml.safe_load(source.read_text())["spec"]["adapters"][0]["name"]
    n = args.workers
    runs = [("1 process, 1 thread", 1, 1, 0), (f"1 process, {n} threads", 1, n, 0)]
    runs.append((f"{n} workers, 1 thread each", n, 1, 0))
    if args.shard:
        runs.append((f"{n} workers sharing the bases", n, 1, n))
    rows = []
    for repeat in range(args.repeats):
        for label, workers, threads, shard in runs:
            root = (args.out / f"{repeat}-{workers}x{threads}{'-shard' if shard else ''}").resolve()
            shutil.rmtree(root, ignore_errors=True)
            manifest = _manifest(
                source, args.strategy, args.steps, root / "out", args.trials, shard
            )
            started = time.perf_counter()
            launched = launch(manifest, name, root, workers, cwd=source.parent, threads=threads)
            rows.append(_row(label, launched, time.perf_counter() - started))
            print(json.dumps(rows[-1]), flush=True)
    print()
    columns = ["timeToReadiness", "evaluation", "training", "teacher", "search", "wall"]
    header = " | ".join(f"{c} (s)" for c in columns)
    print(f"| run | steps | {header} | peak RSS per process (GiB) |")
    print("| --- |" + " ---: |" * (len(columns) + 2))
    means = {}
    for label, *_ in runs:
        mine = [r for r in rows if r["run"] == label]
        means[label] = {c: statistics.mean(r[c] or 0.0 for r in mine) for c in columns}
        steps = "/".join(str(r["steps"]) for r in mine)
        cells = " | ".join(f"{means[label][c]:.2f}" for c in columns)
        rss = statistics.mean(r["peakRss"] for r in mine)
        print(f"| {label} | {steps} | {cells} | {rss:.2f} |")
    reference = means[runs[1][0]]
    print()
    for label, *_ in runs:
        ratios = ", ".join(
            f"{c} {reference[c] / means[label][c]:.2f}x" for c in columns if means[label][c]
        )
        print(f"{runs[1][0]} / {label}: {ratios}")


if __name__ == "__main__":
    main()
