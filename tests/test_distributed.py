"""Data-parallel fine-tuning (torch.distributed, gloo on the CPU): two workers with a global batch
take the same steps as one process, stop at the same readiness step, and resume from rank 0's
checkpoint; alone (no launcher's environment), nothing distributed happens.

The workers are spawned processes (torch.multiprocessing) given a torchrun-style environment.
Training data with completions of one to three tokens: the two workers' shares of a batch hold
different numbers of labelled tokens, so weighting the workers by examples instead of tokens
would not give the single-process gradient.
"""

from __future__ import annotations

import contextlib
import copy
import os
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
from peft import LoraConfig
from torch.multiprocessing.spawn import spawn

from relora_api.spec import Distillation, Finetune, Regularization
from relora_sandbox.processes import free_port
from relora_trainer import adapters, models, workers
from relora_trainer.data import IGNORE_INDEX, Encoded, Encoder, Example, TaskData, read_jsonl
from relora_trainer.distributed import ENVIRONMENT, Failure, World
from relora_trainer.errors import BadInput
from relora_trainer.inputs import TaskQuality
from relora_trainer.method import distillation, quality
from relora_trainer.method import finetune as finetune_module
from relora_trainer.method.config import FinetuneConfig, RegularizationConfig
from relora_trainer.method.finetune import (
    MicroBatch,
    Target,
    finetune,
    labelled_tokens,
    shared_quality,
)

CPU = torch.device("cpu")
WORKERS = 2
TOLERANCE = 1e-5
"""Parameters of 1 vs 2 workers after 6 AdamW steps: the same gradient up to float summation
order (two partial sums all-reduced instead of one sum; another micro-batch split), ~1e-8 per
step, which Adam's normalization can enlarge where a gradient is near zero; 1e-5 is far below
what one step moves a parameter (~lr = 5e-3) and far above the rounding seen."""


class Crash(Exception):
    pass


@dataclass(frozen=True)
class Job:
    """One fine-tuning run, the same on every worker (picklable for the spawned workers)."""

    toy: Any
    config: dict[str, Any]
    out: Path
    dropout: float = 0.0
    target: tuple[str, float] = ("accuracy", 2.0)
    teacher: Path | None = None
    state: Path | None = None
    crash_after: int | None = None


def _train(toy: Any) -> list[Example]:
    """64 training examples whose completions have one to three tokens."""
    train = read_jsonl(toy.split("train"), what="train")[:64]
    return [
        Example(e.prompt, e.completion + "".join(train[n - j].completion for j in range(n % 3)))
        for n, e in enumerate(train)
    ]


def _encoder(toy: Any) -> Encoder:
    return Encoder(models.load_tokenizer(toy.v2, toy.v1))


def _model(toy: Any, base: Path, dropout: float) -> Any:
    old = adapters.read_adapter(toy.adapter, what="adapter")
    lora = LoraConfig(**{**old.config.to_dict(), "lora_dropout": dropout, "inference_mode": False})
    torch.manual_seed(0)
    model = adapters.attach(models.load_model(base, what="base", device=CPU), lora)
    adapters.load_factors(model, old.factors)
    return model


@contextlib.contextmanager
def _counting_scores(scored: list[int]) -> Iterator[None]:
    """Within the block, finetune's scoring records how many examples each call scores."""

    def counted(model: Any, encoder: Any, examples: Any, *args: Any, **kwargs: Any) -> Any:
        scored.append(len(examples))
        return quality.score(model, encoder, examples, *args, **kwargs)

    setattr(finetune_module, "score", counted)  # noqa: B010 (not exported: mypy)
    try:
        yield
    finally:
        setattr(finetune_module, "score", quality.score)  # noqa: B010


def _run(job: Job, world: World | None) -> dict[str, Any]:
    """``job`` on this process (``world``: its place among the workers): the outcome (None when
    it crashed as asked) and the adapter parameters after it."""
    model = _model(job.toy, job.toy.v2, job.dropout)
    train = _train(job.toy)
    teacher = None
    if job.teacher is not None:
        teacher = distillation.Teacher.of_state(torch.load(job.teacher, weights_only=True))

    def crash(step: int, evaluation: object) -> None:
        if step == job.crash_after:
            raise Crash

    scored: list[int] = []  # examples per evaluation scored on this worker
    outcome = None
    with contextlib.suppress(Crash), _counting_scores(scored):
        outcome = finetune(
            model=model,
            encoder=_encoder(job.toy),
            train=train,
            validation=read_jsonl(job.toy.split("validation"), what="validation")[:32],
            choices=sorted({e.completion for e in read_jsonl(job.toy.split("train"), what="t")}),
            config=FinetuneConfig.of(Finetune(**job.config)),
            regularize=RegularizationConfig.of(
                Regularization(schedule="step", strength=1.0, relaxed_strength=0.1)
            ),
            target=Target(*job.target),
            seed=0,
            device=CPU,
            state_dir=job.state,
            on_step=crash if job.crash_after is not None else None,
            teacher=teacher,
            world=world,
        )
    weights = {n: p.detach().clone() for n, p in adapters.trainable(model).items()}
    outcome_dict = None if outcome is None else asdict(outcome)
    return {"outcome": outcome_dict, "weights": weights, "scored": scored}


def _torchrun_environment(rank: int, size: int, port: int) -> None:
    """What torchrun gives a spawned worker, and one torch thread (two workers, a small
    machine)."""
    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(size),
        LOCAL_RANK=str(rank),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    torch.set_num_threads(1)


def _worker(rank: int, size: int, port: int, jobs: list[Job]) -> None:
    """A spawned worker: the environment torchrun would give it, then the jobs in turn."""
    _torchrun_environment(rank, size, port)
    from relora_trainer import local_run

    local_run.quiet_libraries()
    world = World.from_env(timeout=timedelta(seconds=120))  # a hang fails instead
    assert world.size == size and world.rank == rank and dist.is_initialized()
    try:
        for job in jobs:
            job.out.mkdir(parents=True, exist_ok=True)
            torch.save(_run(job, world), job.out / f"rank{rank}.pt")
    finally:
        world.close()


def _launch(jobs: list[Job]) -> list[list[dict[str, Any]]]:
    """The jobs on WORKERS spawned workers; per job, each rank's result."""
    spawn(_worker, args=(WORKERS, free_port(), jobs), nprocs=WORKERS, join=True)
    return [
        [torch.load(job.out / f"rank{r}.pt", weights_only=False) for r in range(WORKERS)]
        for job in jobs
    ]


def _max_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    assert a.keys() == b.keys()
    return max(float((a[n] - b[n]).abs().max()) for n in a)


@pytest.fixture(scope="module")
def teacher_file(toy: Any, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The old adapter on v1 as the teacher of the training data, saved for the workers."""
    teacher = distillation.compute(
        _model(toy, toy.v1, 0.0), _encoder(toy), _train(toy), top_k=4, device=CPU
    )
    path = tmp_path_factory.mktemp("teacher") / "teacher.pt"
    torch.save(teacher.to_state(), path)
    return path


READY_AT_6 = ("loss", 3.45)
"""Validation loss at steps 0/3/6/9 of the config below on the toy world: ~3.61/3.49/3.42/3.40."""


def test_two_workers_take_the_steps_of_one_process(
    toy: Any, teacher_file: Path, tmp_path: Path
) -> None:
    """Global batch 8 (4 + 4 examples of different token counts; micro-batches of 3 on the
    workers, the whole batch at once alone), regularization and distillation on, an evaluation
    every 3 steps, stopping when ready: the same steps, readiness step, history and parameters
    as one process, and both workers' parameters identical."""
    config = {
        "max_steps": 9,
        "batch_size": 8,
        "eval_every": 3,
        "learning_rate": 5e-3,
        "distillation": Distillation(weight=1.0, top_k=4),
    }
    alone_job = Job(toy, config, tmp_path / "alone", target=READY_AT_6, teacher=teacher_file)
    alone = _run(alone_job, None)
    split = Job(
        toy,
        {**config, "micro_batch_size": 3},
        tmp_path / "split",
        target=READY_AT_6,
        teacher=teacher_file,
    )
    [ranks] = _launch([split])
    one = alone["outcome"]
    assert one["ready_step"] == 6 and one["steps"] == 6, "the target is met at step 6, not before"
    for result in ranks:
        two = result["outcome"]
        assert (two["steps"], two["ready_step"]) == (one["steps"], one["ready_step"])
        assert [e["step"] for e in two["history"]] == [0, 3, 6]
        losses = [e["loss"] for e in two["history"]]
        assert losses == pytest.approx([e["loss"] for e in one["history"]], rel=1e-5)
        accuracies = [e["accuracy"] for e in two["history"]]
        assert accuracies == [e["accuracy"] for e in one["history"]]
    assert ranks[0]["outcome"]["history"] == ranks[1]["outcome"]["history"]
    # Each worker scored its half of the 32 validation examples at each evaluation.
    assert alone["scored"] == [32, 32, 32]
    assert ranks[0]["scored"] == ranks[1]["scored"] == [16, 16, 16]
    assert _max_difference(ranks[0]["weights"], ranks[1]["weights"]) == 0.0, "replicas equal"
    difference = _max_difference(ranks[0]["weights"], alone["weights"])
    print(f"max |1 worker - 2 workers| over the LoRA parameters: {difference:.3g}")
    assert difference <= TOLERANCE
    start = _run(Job(toy, {**config, "max_steps": 0}, tmp_path / "start"), None)
    moved = _max_difference(start["weights"], alone["weights"])
    assert moved > 100 * TOLERANCE, "the steps moved the parameters: the comparison means something"


def test_two_workers_resume_from_the_checkpoint_of_two_workers(toy: Any, tmp_path: Path) -> None:
    """With dropout (each worker its own masks): a 2-worker run stopped after step 4 (its
    checkpoint: step 3, written by rank 0) and resumed by a new launch of 2 workers ends where
    an uninterrupted 2-worker run does."""
    config: dict[str, Any] = {"max_steps": 6, "batch_size": 8, "eval_every": 3}
    config.update(checkpoint_every=3, learning_rate=5e-3)
    whole = Job(toy, config, tmp_path / "whole", dropout=0.2, state=tmp_path / "whole-state")
    stopped = Job(
        toy,
        config,
        tmp_path / "stopped",
        dropout=0.2,
        state=tmp_path / "state",
        crash_after=4,
    )
    [whole_ranks, stopped_ranks] = _launch([whole, stopped])
    assert all(r["outcome"] is None for r in stopped_ranks)
    assert sorted(p.name for p in (tmp_path / "state").iterdir()) == ["checkpoint.pt"]
    saved = torch.load(tmp_path / "state" / "checkpoint.pt", weights_only=True)
    assert saved["outcome"]["steps"] == 3 and len(saved["worker_rng"]) == WORKERS
    [resumed_ranks] = _launch([Job(toy, config, tmp_path / "resumed", 0.2, state=stopped.state)])
    for whole_rank, resumed_rank in zip(whole_ranks, resumed_ranks, strict=True):
        assert resumed_rank["outcome"]["steps"] == whole_rank["outcome"]["steps"] == 6
        assert [e["step"] for e in resumed_rank["outcome"]["history"]] == [0, 3, 6]
        difference = _max_difference(resumed_rank["weights"], whole_rank["weights"])
        print(f"max |resumed - uninterrupted| (2 workers): {difference:.3g}")
        assert difference <= TOLERANCE
    assert _max_difference(resumed_ranks[0]["weights"], resumed_ranks[1]["weights"]) == 0.0


def test_alone_nothing_is_distributed(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENVIRONMENT:
        monkeypatch.delenv(name, raising=False)
    world = World.from_env(device=CPU)
    assert (world.rank, world.size, world.distributed, world.is_main) == (0, 1, False, True)
    assert not dist.is_initialized(), "no process group for a world of one"
    grad = torch.ones(3)
    world.all_reduce_([grad])
    world.barrier()
    assert world.broadcast({"a": 1}) == {"a": 1} and world.gather(5) == [5]
    assert world.sum(7) == 7 and torch.equal(grad, torch.ones(3))
    assert world.shard([4, 2, 9]) == [4, 2, 9]
    assert not dist.is_initialized()
    with pytest.raises(ValueError, match="MASTER_ADDR"):
        World.from_env({"WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_PORT": "1"})


def test_shards_split_a_batch_in_rank_order() -> None:
    batch = [7, 3, 5, 1, 0, 2, 6, 4]
    for size in (1, 2, 3, 5, 8, 11):
        shares = [World(rank=r, size=size).shard(batch) for r in range(size)]
        assert [i for share in shares for i in share] == batch
        assert max(map(len, shares)) - min(map(len, shares)) <= 1


class _RankZeroOfTwo(World):
    """Rank 0 of two workers without a process group: the other's contribution to a gather
    is ``theirs``."""

    def __init__(self, theirs: object) -> None:
        super().__init__(rank=0, size=2)
        object.__setattr__(self, "theirs", theirs)

    def gather(self, value: Any) -> list[Any]:
        return [value, self.theirs]  # type: ignore[attr-defined]


def test_a_shared_measurement_joins_the_shares_or_raises_a_workers_failure(toy: Any) -> None:
    """What every worker does to measure the fine-tuned adapter (and at each readiness check):
    it scores its share, the gathered scores give the quality of the whole; a worker that
    failed and meets the others there instead makes them raise its failure."""
    model = _model(toy, toy.v2, 0.0)
    encoder = _encoder(toy)
    examples = read_jsonl(toy.split("validation"), what="validation")[:21]
    choices = sorted({e.completion for e in read_jsonl(toy.split("train"), what="t")})
    micro = MicroBatch(8, batch=8)

    def measured(part: list[Example], world: World | None) -> Any:
        return shared_quality(model, encoder, part, choices, CPU, micro, True, world)

    whole = measured(examples, None)
    theirs = quality.score(model, encoder, examples[10:], choices, device=CPU)
    joined = measured(examples, _RankZeroOfTwo(theirs))
    assert joined.accuracy == pytest.approx(whole.accuracy, abs=1e-9)
    assert joined.loss == pytest.approx(whole.loss, rel=1e-5)
    half = measured(examples[:10], None)
    assert half.loss != pytest.approx(whole.loss, rel=1e-5), "the other share counts"
    failure = Failure.of(BadInput("spec.output: read-only"), 1)
    with pytest.raises(BadInput, match=r"\(worker 1\) spec.output: read-only"):
        measured(examples, _RankZeroOfTwo(failure))


class _Scripted(World):
    """A worker without a process group: broadcasts return rank 0's ``messages`` in turn (on
    rank 0: record what it sends), gathers add ``theirs`` as the other worker's part."""

    def __init__(self, rank: int, messages: list[object], theirs: object = None) -> None:
        super().__init__(rank=rank, size=2)
        object.__setattr__(self, "messages", messages)
        object.__setattr__(self, "theirs", theirs)
        object.__setattr__(self, "sent", [])

    def broadcast(self, value: Any, *, source: int = 0) -> Any:
        if self.rank == source:
            self.sent.append(value)  # type: ignore[attr-defined]
            return value
        return self.messages.pop(0)  # type: ignore[attr-defined]

    def gather(self, value: Any) -> list[Any]:
        theirs = self.theirs  # type: ignore[attr-defined]
        return [value, theirs] if self.rank == 0 else [theirs, value]

    def meet(self, failure: BaseException | None = None) -> None:
        self.sent.append(("meet", failure))  # type: ignore[attr-defined]


def test_the_search_measures_each_trial_with_the_other_workers(toy: Any) -> None:
    """While rank 0 searches, each trial's measurement is shared: rank 0 sends its adapter's
    values (Measure) and scores its share, a worker that serves loads them and scores the
    rest; both shares join into the quality of the whole subset. A Measure then a start: the
    worker returns the start; a failure of rank 0 instead: raised as its copy."""
    encoder = _encoder(toy)
    train = read_jsonl(toy.split("train"), what="train")
    task = TaskData(train, read_jsonl(toy.split("validation"), what="validation"), None)
    measuring = TaskQuality(encoder, task, CPU)
    searched = _model(toy, toy.v2, 0.0)
    with torch.no_grad():
        for p in adapters.trainable(searched).values():
            p.mul_(1.5)  # a trial's start, not the old adapter
    whole = measuring.on(searched, task.validation[:9])
    rank0_share = measuring.on(searched, task.validation[:4])

    serving = _model(toy, toy.v2, 0.0)  # the other worker: the old adapter's values until told
    scored: list[int] = []
    rank1 = _Scripted(1, [], theirs=None)
    with _counting_scores(scored):
        values = {n: p.detach().clone() for n, p in adapters.trainable(searched).items()}
        mine = quality.score(searched, encoder, task.validation[:4], task.choices, device=CPU)
        object.__setattr__(rank1, "theirs", mine)
        rank1.messages.extend([workers.Measure(values, 9, True), "the start"])  # type: ignore[attr-defined]
        assert workers.serve(rank1, _serving(measuring, serving)) == "the start"
    assert scored == [5], "the other worker scored the 5 examples after rank 0's 4"
    for name, value in adapters.trainable(serving).items():
        assert torch.equal(value, values[name]), name

    theirs = quality.score(searched, encoder, task.validation[4:9], task.choices, device=CPU)
    rank0 = _Scripted(0, [], theirs=theirs)
    meetings = workers.Meetings(rank0, lambda error: error)
    measured = meetings.measure(searched, measuring, 9, True)
    first, sent = rank0.sent  # type: ignore[attr-defined]
    assert first == ("meet", None), "past the meeting the others waited at"
    assert isinstance(sent, workers.Measure) and (sent.examples, sent.with_accuracy) == (9, True)
    assert measured.accuracy == pytest.approx(whole.accuracy, abs=1e-9)
    assert measured.loss == pytest.approx(whole.loss, rel=1e-5)
    assert measured.loss != pytest.approx(rank0_share.loss, rel=1e-5)

    failed = _Scripted(1, [Failure.of(BadInput("spec.sourceModel: unreadable"), 0)])
    with pytest.raises(BadInput, match=r"\(worker 0\) spec.sourceModel"):
        workers.serve(failed, _serving(measuring, serving))


def _serving(quality: TaskQuality, model: Any) -> workers.Serving:
    """What a worker other than rank 0 serves a search's measurements with: ``model``, attached
    already (the rest serves the passes of a sharded base: tests/test_distributed_migration)."""
    unused: Any = None
    return workers.Serving(quality, unused, unused, unused, "accuracy", lambda: model, model)


def test_rank_0_tells_a_failure_once_where_the_others_are() -> None:
    """Rank 0's failure reaches the others where they are: at a meeting (meet), serving its
    search (a Failure broadcast), not at all inside a shared measurement's failure (told in
    its gather already: a second meeting would wait for workers that are gone)."""
    error = BadInput("spec.output: read-only")
    at_meeting = _Scripted(0, [])
    workers.Meetings(at_meeting, lambda e: e).fail(error)
    assert at_meeting.sent == [("meet", error)]  # type: ignore[attr-defined]

    serving = _Scripted(0, [])
    meetings = workers.Meetings(serving, lambda e: e)
    meetings._met(serving)  # what a trial's first measurement does before it sends
    meetings.fail(error)
    [met, told] = serving.sent  # type: ignore[attr-defined]
    assert met == ("meet", None) and isinstance(told, Failure) and told.rank == 0

    after = _Scripted(0, [])
    meetings = workers.Meetings(after, lambda e: e)
    meetings.hand("the start")
    meetings.expect()  # fine-tuning done: the others go to the measurement, then the report
    with pytest.raises(RuntimeError), meetings.shared():
        raise RuntimeError("out of memory while scoring")
    meetings.fail(RuntimeError("out of memory while scoring"))
    assert after.sent == [("meet", None), "the start"], "nothing after the shared failure"  # type: ignore[attr-defined]


def test_labelled_tokens_count_what_the_loss_covers(toy: Any) -> None:
    encoder = _encoder(toy)
    items = [encoder.encode(e.prompt, e.completion) for e in _train(toy)[:6]]
    items.append(Encoded([], [5, 6, 7]))  # no prompt (nor BOS): nothing predicts the first
    counted = int((encoder.batch(items, CPU)["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert labelled_tokens(items) == counted
    assert len({len(i.completion_ids) for i in items}) > 1


def test_the_workers_wait_for_rank_zeros_search(
    manifest: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The process group's timeout outlasts what rank 0 does alone: the default plus the
    search's cap (a search raised to 4 hours kills no waiting worker after 2); no search, no
    addition; RELORA_WORKER_TIMEOUT_SECONDS (spec.env) wins. The Job's entrypoint passes its
    spec: the operator sets nothing, this is the one place the timeout is decided."""
    from relora_api import validation
    from relora_trainer import distributed, job

    def spec_of(**method: Any) -> Any:
        manifest["spec"]["method"] = method
        migration, problems = validation.validate_manifest(manifest)
        assert migration is not None, problems
        return migration.spec

    default = distributed.DEFAULT_TIMEOUT
    assert distributed.timeout({}) == default
    assert distributed.timeout({}, spec=spec_of()) == default, "relora: no search by default"
    trials = {"trials": 6}
    assert distributed.timeout({}, spec=spec_of(initialization=trials)) == default + timedelta(
        seconds=900
    )
    searching = spec_of(initialization={**trials, "timeoutSeconds": 4 * 3600})
    assert distributed.timeout({}, spec=searching) == default + timedelta(hours=4)
    assert distributed.timeout({}, spec=spec_of(strategy="warm-start")) == default
    given = {distributed.ENV_TIMEOUT: "60"}
    assert distributed.timeout(given, spec=searching) == timedelta(seconds=60)
    with pytest.raises(ValueError, match="not a positive number"):
        distributed.timeout({distributed.ENV_TIMEOUT: "0"})

    joined: list[timedelta | None] = []

    def from_env(**kw: Any) -> World:
        joined.append(kw.get("timeout"))
        return World()

    monkeypatch.setattr(distributed.World, "from_env", from_env)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.delenv(distributed.ENV_TIMEOUT, raising=False)
    job._join(searching)
    assert joined == [default + timedelta(hours=4)]


def _sharded_worker(rank: int, size: int, port: int, toy: Any, out: Path) -> None:
    """A spawned worker of a sharded base: its shard of the toy world's v2, the whole weights
    gathered back, and what check_fits says of an adapter with a saved module or DoRA."""
    _torchrun_environment(rank, size, port)
    from torch.distributed.tensor import DTensor

    world = World.from_env(timeout=timedelta(seconds=120), sharded=True)
    try:
        model = models.load_sharded(
            Path(toy.v2), what="spec.targetModel", device=CPU, dtype=torch.float32, world=world
        )
        found: dict[str, Any] = {"local": {}, "whole": {}, "refused": []}
        for name, parameter in model.named_parameters():
            assert isinstance(parameter, DTensor), name
            found["local"][name] = tuple(parameter.to_local().shape)
            found["whole"][name] = parameter.full_tensor().clone()
        found["kind"] = models.Shape.of(model).kind
        old = adapters.read_adapter(Path(toy.adapter), what="spec.adapters[a].uri")
        adapters.check_fits(old, model, what="spec.adapters[a].uri")  # plain LoRA: fits
        saved = adapters.OldAdapter(old.config, old.factors, {"lm_head.weight": torch.zeros(1)})
        dora = copy.deepcopy(old.config)
        dora.use_dora = True
        for refused in (saved, adapters.OldAdapter(dora, old.factors)):
            try:
                adapters.check_fits(refused, model, what="spec.adapters[a].uri")
            except BadInput as error:
                found["refused"].append(str(error))
        torch.save(found, out / f"rank{rank}.pt")
    finally:
        world.close()


def test_a_sharded_base_holds_a_shard_per_worker_and_refuses_what_it_cannot_carry(
    toy: Any, tmp_path: Path
) -> None:
    """models.load_sharded over 2 workers: every weight a DTensor whose local part is half of
    its first dimension (rounded up on rank 0), gathered back equal to the files; the model's
    kind is the architecture's, not FSDP2's subclass. An old adapter with modules_to_save or
    DoRA is refused with InvalidAdapter naming shardBase; a plain LoRA fits."""
    spawn(_sharded_worker, args=(2, free_port(), toy, tmp_path), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    files = models.WeightFiles(Path(toy.v2), what="v2")
    assert ranks[0]["kind"] == "LlamaForCausalLM", ranks[0]["kind"]
    for name, whole in ranks[0]["whole"].items():
        stored = files.get(name)
        assert stored is not None and torch.equal(whole, stored), name
        assert torch.equal(ranks[1]["whole"][name], whole), name
        rows = whole.shape[0]
        assert ranks[0]["local"][name][0] == -(-rows // 2), name
        assert ranks[0]["local"][name][0] + ranks[1]["local"][name][0] == rows, name
    for found in ranks:
        saved, dora = found["refused"]
        assert "modules_to_save (lm_head.weight)" in saved and "shardBase" in saved
        assert "DoRA magnitudes" in dora and "leave shardBase false" in dora
