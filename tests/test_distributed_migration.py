"""One adapter's migration by the trainer Job entrypoint launched as two data-parallel workers
(`python -m relora_trainer.job` twice, each with the environment torchrun gives a worker; gloo
on the CPU) against the same spec in one process: the same search, the same steps and
readiness step, the same adapter up to float summation order, one report (rank 0's), and an
output folder that holds what the single process's holds. Bad input on rank 0 ends both
workers with exit 3, and only rank 0 writes a termination message.
"""

from __future__ import annotations

import fcntl
import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from benchmarks.workers import Launch, launch
from safetensors.torch import load_file, save_file

from relora_api import contract
from relora_trainer import errors
from relora_trainer.distributed import ENV_TIMEOUT
from tests.conftest import toy_manifest

ADAPTER = "toy-category"
WORKERS = 2
TOLERANCE = 1e-5
"""The adapters of 1 vs 2 workers after 12 AdamW steps from the same searched start (rank 0 runs
the search exactly as the single process does): the gradients differ by float summation order
only (two workers' partial sums all-reduced instead of one sum), ~1e-8 per step, which Adam's
normalization can enlarge where a gradient is near zero; 1e-5 is far below what one step moves
a parameter (~lr = 1e-2) and far above the rounding seen (tests/test_distributed.py)."""
TIMEOUT = 240  # seconds a launch may take (a hang fails instead)


def _manifest(toy: Any, root: Path) -> dict[str, Any]:
    """relora with a small budget (3 trials, 12 steps, an evaluation every 4, a checkpoint
    every 4) and distillation on (the teacher is rank 0's, handed to rank 1), readiness relative
    to the source (measured on rank 0): 0.8 x 0.99 validation accuracy, met at step 8 on the
    toy world (0.68 / 0.75 / 0.84 at steps 0 / 4 / 8), so the run stops there."""
    manifest = toy_manifest(toy, strategy="relora")
    manifest["spec"]["adapters"][0]["readiness"] = {"relativeToSource": 0.8}
    method = manifest["spec"]["method"]
    method["initialization"] = {"trials": 3}
    method["finetune"] = {
        "maxSteps": 12,
        "evalEvery": 4,
        "checkpointEvery": 4,
        "learningRate": 0.01,
        "distillation": {"weight": 1.0, "topK": 4},
    }
    manifest["spec"]["output"] = {"uri": str(root / "output")}
    return manifest


def _launch(
    manifest: dict[str, Any], root: Path, workers: int, extra: dict[str, str] | None = None
) -> Launch:
    """The Job entrypoint as ``workers`` processes (with torchrun's environment when more than
    one, and ``extra``), one torch thread each, in ``root``."""
    return launch(manifest, ADAPTER, root, workers, timeout=TIMEOUT, extra=extra)


def _files(folder: Path) -> list[str]:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


def _progress(stdout: str) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]


@pytest.fixture(scope="module")
def runs(toy: Any, tmp_path_factory: pytest.TempPathFactory) -> tuple[Launch, Launch]:
    """The same spec in one process, then as two workers."""
    root = tmp_path_factory.mktemp("distributed-migration")
    alone = _launch(_manifest(toy, root / "one"), root / "one", 1)
    assert alone.codes == [errors.EXIT_OK], alone.stderr[0][-3000:]
    two = _launch(_manifest(toy, root / "two"), root / "two", WORKERS)
    assert two.codes == [errors.EXIT_OK] * WORKERS, [e[-3000:] for e in two.stderr]
    return alone, two


def test_two_workers_migrate_as_one_process(runs: tuple[Launch, Launch]) -> None:
    """The same trials, steps, readiness step and history; the adapter equal within TOLERANCE
    and moved by the fine-tuning far more than that; the report says 2 workers."""
    alone, two = runs
    one_report, two_report = alone.report(), two.report()
    assert one_report["workers"] == 1 and two_report["workers"] == WORKERS
    assert (two_report["steps"], two_report["ready_step"]) == (
        one_report["steps"],
        one_report["ready_step"],
    )
    print(
        f"steps {one_report['steps']}, ready at {one_report['ready_step']}, "
        f"trials {len(one_report['trials'])}"
    )
    assert one_report["steps"] > 0 and len(one_report["trials"]) == 3
    assert one_report["ready_step"] is not None, "a target met within the budget (see _manifest)"
    assert one_report["steps"] == one_report["ready_step"], "stopped when ready"
    assert two_report["coefficients"] == one_report["coefficients"], "rank 0 searched"
    # Each trial's measurement shared by the workers: the same values up to summation order.
    two_values = [t["value"] for t in two_report["trials"]]
    assert two_values == pytest.approx([t["value"] for t in one_report["trials"]], rel=1e-5)
    assert two_report["target"] == one_report["target"], "rank 0's source measurement"
    assert two_report["distillation"] == one_report["distillation"] is not None
    assert [e["step"] for e in two_report["history"]] == [e["step"] for e in one_report["history"]]
    losses = [e["loss"] for e in two_report["history"]]
    assert losses == pytest.approx([e["loss"] for e in one_report["history"]], rel=1e-5)
    for stage in ("source", "before"):  # measured by rank 0 as by the single process
        assert two_report["quality"][stage] == one_report["quality"][stage], stage
    after_one = one_report["quality"]["after"]["validation"]
    after_two = two_report["quality"]["after"]["validation"]
    assert after_two["loss"] == pytest.approx(after_one["loss"], rel=1e-5)

    one_weights = load_file(str(alone.output / "adapter_model.safetensors"))
    two_weights = load_file(str(two.output / "adapter_model.safetensors"))
    assert one_weights.keys() == two_weights.keys()
    difference = max(float((one_weights[n] - two_weights[n]).abs().max()) for n in one_weights)
    print(f"max |1 process - 2 workers| over the saved adapter: {difference:.3g}")
    assert difference <= TOLERANCE
    # The comparison means something: fine-tuning moved the adapter from the searched start
    # (the start is the first checkpoint's anchors, rank 0's search result).
    state = torch.load(alone.output / "state" / "checkpoint.pt", weights_only=False)
    start = {n.replace(".default", ""): a for n, a in state["anchors"].items()}
    moved = max(
        float((one_weights[n] - start[n].to(one_weights[n])).abs().max())
        for n in one_weights
        if n in start
    )
    assert moved > 100 * TOLERANCE


def test_rank_0_alone_writes_the_output_reports_and_ends_the_job(
    runs: tuple[Launch, Launch],
) -> None:
    """The output folder holds what the single process's holds (rank 1 wrote nothing there);
    the termination message and the progress lines come from rank 0 only, the same result."""
    alone, two = runs
    assert _files(two.output) == _files(alone.output)
    assert _files(two.output.parent) == _files(alone.output.parent), "no stray lock or staging"
    assert sorted(p.name for p in two.root.iterdir()) == ["output", "termination-0"]
    outcome = contract.Outcome.decode(two.termination(0).read_text())
    alone_outcome = contract.Outcome.decode(alone.termination(0).read_text())
    assert outcome is not None and outcome.result is not None
    assert alone_outcome is not None and alone_outcome.result is not None
    assert outcome.result.steps == alone_outcome.result.steps
    assert outcome.result.ready == alone_outcome.result.ready
    assert _progress(two.stdout[0]) and not _progress(two.stdout[1]), "progress from rank 0"
    stages = [line.get("stage") for line in _progress(two.stdout[0])]
    assert "search" in stages and "finetune" in stages, stages


def test_bad_input_on_rank_0_ends_every_worker_with_exit_3(toy: Any, tmp_path: Path) -> None:
    """An output that belongs to another migration, found by rank 0's check before anything is
    loaded: both workers exit 3 (rank 1 does not wait until the timeout), rank 0 alone writes
    the termination message, nothing is written in the output."""
    manifest = _manifest(toy, tmp_path)
    output = tmp_path / "output" / ADAPTER
    output.mkdir(parents=True)
    (output / "notes.txt").write_text("someone else's\n")
    launch = _launch(manifest, tmp_path, WORKERS)
    assert launch.codes == [errors.EXIT_BAD_INPUT] * WORKERS, launch.stderr
    assert "OutputInUse" in launch.stderr[1], launch.stderr[1][-2000:]
    outcome = contract.Outcome.decode(launch.termination(0).read_text())
    assert outcome is not None and outcome.reason == "OutputInUse"
    assert not launch.termination(1).exists()
    assert _files(output) == ["notes.txt"]


def test_a_worker_count_that_is_not_a_number_exits_3_with_one_line(
    toy: Any, tmp_path: Path
) -> None:
    """WORLD_SIZE as a launcher (or a hand-written Job) may set it wrongly: bad input, exit 3,
    one line naming it, no traceback (the exit itself reads it too)."""
    launch = _launch(_manifest(toy, tmp_path), tmp_path, 1, extra={"WORLD_SIZE": "two"})
    assert launch.codes == [errors.EXIT_BAD_INPUT], launch.stderr
    assert "WORLD_SIZE: not a number of workers" in launch.stderr[0], launch.stderr[0]
    assert "Traceback" not in launch.stderr[0], launch.stderr[0]


def test_a_failure_of_rank_0_while_the_others_load_ends_them_too(toy: Any, tmp_path: Path) -> None:
    """A source model with a NaN weight: only rank 0 loads the source (its reference and
    teacher), so only rank 0 finds it; rank 1, done loading the target, hears of it at the
    meeting that ends loading and exits 3 too, as InvalidWeights."""
    source = tmp_path / "v1-nan"
    shutil.copytree(toy.v1, source)
    [weights] = source.glob("*.safetensors")
    tensors = load_file(str(weights))
    name = next(n for n, t in tensors.items() if t.is_floating_point())
    tensors[name][0] = float("nan")
    save_file(tensors, str(weights), metadata={"format": "pt"})
    manifest = _manifest(toy, tmp_path)
    manifest["spec"]["sourceModel"] = {"uri": str(source)}
    launch = _launch(manifest, tmp_path, WORKERS)
    assert launch.codes == [errors.EXIT_BAD_INPUT] * WORKERS, launch.stderr
    assert "InvalidWeights: (worker 0) spec.sourceModel" in launch.stderr[1], launch.stderr[1]
    outcome = contract.Outcome.decode(launch.termination(0).read_text())
    assert outcome is not None and outcome.reason == "InvalidWeights"
    assert not launch.termination(1).exists()


def test_a_claim_refused_on_rank_0_ends_the_waiting_workers(toy: Any, tmp_path: Path) -> None:
    """The output's lock held by another process: rank 0's claim (after both loaded the
    bases) is refused; rank 1, waiting for rank 0's start, exits 3 too instead of waiting until
    the timeout, and no worker wrote in the output folder."""
    output = tmp_path / "output"
    output.mkdir()
    with (output / f".{ADAPTER}.relora-lock").open("a+b") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        launch = _launch(_manifest(toy, tmp_path), tmp_path, WORKERS)
    assert launch.codes == [errors.EXIT_BAD_INPUT] * WORKERS, launch.stderr
    assert "OutputInUse: (worker 0)" in launch.stderr[1], launch.stderr[1][-2000:]
    outcome = contract.Outcome.decode(launch.termination(0).read_text())
    assert outcome is not None and outcome.reason == "OutputInUse"
    assert "another process" in str(outcome.message)
    assert _files(output / ADAPTER) == [], "only rank 0's write check, removed"


def test_two_workers_share_the_later_stages_of_rank_0s_teacher(toy: Any, tmp_path: Path) -> None:
    """Never ready in 12 steps (an evaluation every 2): the teacher comes in stages of steps
    up to 4, 8 and the budget, as for one process. Rank 0 computes each (it alone holds the
    source base's weights) when the batch that needs it comes, and hands it to rank 1; the
    adapter equals one process's within TOLERANCE, and the saved teacher is the same."""
    launches = []
    for workers in (1, WORKERS):
        manifest = _manifest(toy, tmp_path / str(workers))
        manifest["spec"]["adapters"][0]["readiness"] = {"target": 0.999}
        method = manifest["spec"]["method"]
        method["initialization"] = {"trials": 0}
        method["finetune"].update(maxSteps=12, evalEvery=2, checkpointEvery=100)
        launched = _launch(manifest, tmp_path / str(workers), workers)
        # A Job that ran its budget is done (exit 0); its result says not ready.
        assert launched.codes == [errors.EXIT_OK] * workers, launched.stderr[0][-3000:]
        assert launched.report()["ready"] is False
        launches.append(launched)
    alone, two = launches
    notes = [p["message"] for p in _progress(two.stdout[0]) if p.get("event") == "note"]
    assert [n.split(" (")[0] for n in notes if n.startswith("teacher:")] == [
        "teacher: steps up to 8 covered",
        "teacher: the whole budget covered",
    ]
    assert two.report()["steps"] == alone.report()["steps"] == 12
    saved = [
        torch.load(launch.output / "state" / "teacher.pt", weights_only=True) for launch in launches
    ]
    assert saved[0]["steps"] is saved[1]["steps"] is None, "the whole budget, in the end"
    for name, value in saved[0]["teacher"].items():
        assert torch.equal(saved[1]["teacher"][name], value), name
    one = load_file(str(alone.output / "adapter_model.safetensors"))
    both = load_file(str(two.output / "adapter_model.safetensors"))
    difference = max(float((one[n] - both[n]).abs().max()) for n in one)
    print(f"max |1 process - 2 workers| with a staged teacher: {difference:.3g}")
    assert difference <= TOLERANCE


def _sharded(manifest: dict[str, Any]) -> dict[str, Any]:
    """``manifest`` with its bases sharded across two processes: one worker of 2 GPUs (the
    world's size; on the CPU each process is a gloo rank)."""
    spec = manifest["spec"]
    spec["distributed"] = {"shardBase": True}
    spec["resources"] = {"limits": {"nvidia.com/gpu": WORKERS}}
    return manifest


def test_a_sharded_base_migrates_as_one_process(toy: Any, tmp_path: Path) -> None:
    """Both bases sharded across 2 processes (FSDP2: each holds half of every weight), so every
    forward pass is collective: the source phase, the reference on the target, the teacher's
    first stage and its later ones (never ready in 12 steps, an evaluation every 2), a search
    whose trials take look-ahead steps, the fine-tuning (activations recomputed: gradient
    checkpointing re-runs a sharded forward in the backward pass) and its evaluations all run
    in step.
    Rank 1 is killed once the checkpoint of step 4 is written (a lost node): the group fails,
    and started again it resumes from that checkpoint. The trials, the steps, the history, the
    saved teacher and the adapter equal one process's straight run (the adapter within
    TOLERANCE)."""
    launches = []
    for workers in (1, WORKERS):
        root = tmp_path / str(workers)
        manifest = _manifest(toy, root)
        # Relative to the old adapter on the source base (measured in the source phase), and
        # out of reach: the whole budget runs.
        manifest["spec"]["adapters"][0]["readiness"] = {"relativeToSource": 2}
        method = manifest["spec"]["method"]
        method["initialization"] = {"trials": 2, "objective": "lookahead", "lookaheadSteps": 1}
        method["finetune"].update(
            maxSteps=12, evalEvery=2, checkpointEvery=4, gradientCheckpointing="on"
        )
        if workers > 1:
            manifest = _sharded(manifest)
            checkpoint = root / "output" / ADAPTER / "state" / "checkpoint.pt"
            lost = launch(
                manifest,
                ADAPTER,
                root,
                workers,
                timeout=TIMEOUT,
                extra={ENV_TIMEOUT: "60"},  # rank 0 stops waiting for the lost rank
                kill=(1, checkpoint.is_file),
            )
            assert lost.codes[1] == -9 and lost.codes[0] not in (0, errors.EXIT_BAD_INPUT), (
                lost.codes
            )
            assert not (lost.output / "report.json").is_file(), "not finished: resumable"
            steps = torch.load(checkpoint, weights_only=False)["outcome"]["steps"]
            assert 4 <= steps < 12, steps
        launched = _launch(manifest, root, workers)
        assert launched.codes == [errors.EXIT_OK] * workers, [e[-3000:] for e in launched.stderr]
        assert launched.report()["ready"] is False
        if workers > 1:  # the steps from the checkpoint's on, not from the start again
            tuned = [p["step"] for p in _progress(launched.stdout[0]) if p.get("step")]
            assert tuned and min(tuned) > steps, (steps, tuned)
        launches.append(launched)
    alone, two = launches
    one_report, two_report = alone.report(), two.report()
    assert two_report["workers"] == WORKERS
    assert two_report["sharded_base"] is True and one_report["sharded_base"] is False
    assert two_report["steps"] == one_report["steps"] == 12
    assert two_report["checkpointing"] is one_report["checkpointing"] is True
    assert two_report["coefficients"] == one_report["coefficients"]
    two_values = [t["value"] for t in two_report["trials"]]
    assert two_values == pytest.approx([t["value"] for t in one_report["trials"]], rel=1e-5)
    for stage in ("source", "before"):  # measured in step on the sharded bases
        for split, quality in one_report["quality"][stage].items():
            assert two_report["quality"][stage][split] == pytest.approx(quality), (stage, split)
    losses = [e["loss"] for e in two_report["history"]]
    assert losses == pytest.approx([e["loss"] for e in one_report["history"]], rel=1e-5)
    saved = [
        torch.load(launch.output / "state" / "teacher.pt", weights_only=True) for launch in launches
    ]
    assert saved[0]["steps"] is saved[1]["steps"] is None, "the whole budget, in the end"
    for name, value in saved[0]["teacher"].items():
        assert torch.allclose(saved[1]["teacher"][name], value, atol=1e-6), name
    one = load_file(str(alone.output / "adapter_model.safetensors"))
    both = load_file(str(two.output / "adapter_model.safetensors"))
    difference = max(float((one[n] - both[n]).abs().max()) for n in one)
    print(f"max |1 process - 2 processes on a sharded base, resumed|: {difference:.3g}")
    assert difference <= TOLERANCE
