"""Fine-tuning with scheduled regularization, readiness checks and resumable checkpoints.

loss = task loss + lambda(step) * mean ||theta - theta0||^2  (theta: the LoRA tensors)
         [+ w * KL(teacher || student) over the teacher's top-k tokens (see distillation)]
with a cosine learning-rate decay, an evaluation every ``evalEvery`` steps (and at step 0) that
stops the run as soon as the readiness target is met (with ``stopWhenReady: false`` the whole
budget runs and the first evaluation that met the target is still recorded), and a checkpoint
every ``checkpointEvery`` steps. The batch order is a pure function of (seed, step) and the RNG
state is checkpointed, so a resumed run continues exactly where the interrupted one left off.

Data-parallel (``world``: several workers under torch.distributed, each holding a full replica):
the batch of a step stays the global batch of ``batchSize`` examples whatever the number of
workers; each worker computes the gradient of its share (:meth:`World.shard`) with the loss
divided by the labelled tokens of the *whole* batch (summed over the workers), so the sum of the
workers' gradients (all-reduced) is the single-process gradient of the batch; every worker then
adds the regularizer's gradient, clips and steps identically, and the replicas stay equal.
An evaluation splits validation the same way: each worker scores its share, the scores are
gathered and every worker reduces the same whole (rank 0's result is taken by all: the same
history and the same readiness step everywhere); rank 0 alone writes checkpoints, the others
wait for it at a barrier; a resume reads them on every worker.
"""

from __future__ import annotations

import contextlib
import functools
import gc
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, TypeVar

import torch
from peft import PeftModel

from relora_trainer.adapters import trainable
from relora_trainer.data import IGNORE_INDEX, Encoded, Encoder, Example
from relora_trainer.distributed import Failure, World
from relora_trainer.method import distillation, regularization
from relora_trainer.method.config import FinetuneConfig, RegularizationConfig
from relora_trainer.method.quality import Quality, Scores, completion_logits, score

CHECKPOINT_FILE = "checkpoint.pt"
T = TypeVar("T")


@dataclass(frozen=True)
class Target:
    """A readiness target on one metric."""

    metric: str
    value: float

    def met(self, quality: float) -> bool:
        return quality <= self.value if self.metric == "loss" else quality >= self.value


@dataclass
class Evaluation:
    step: int
    seconds: float  # work seconds since the migration of this adapter began, search included
    loss: float
    accuracy: float | None
    quality: float


@dataclass
class FinetuneOutcome:
    steps: int = 0
    ready_step: int | None = None
    ready_seconds: float | None = None
    train_seconds: float = 0.0
    eval_seconds: float = 0.0
    history: list[Evaluation] = field(default_factory=list)
    micro_batch: int | None = None  # examples per forward pass, when fewer than the batch

    @property
    def ready(self) -> bool:
        return self.ready_step is not None


StepCallback = Callable[[int, Evaluation | None], None]


def autocast(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """bf16 autocast on CUDA; nothing on the CPU."""
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return contextlib.nullcontext()


def batch_indices(*, step: int, size: int, batch_size: int, seed: int) -> list[int]:
    """The examples of ``step``: consecutive slices of per-epoch permutations seeded by epoch."""
    indices: list[int] = []
    position = step * batch_size
    while len(indices) < batch_size:
        epoch, offset = divmod(position, size)
        order = torch.randperm(size, generator=torch.Generator().manual_seed(seed * 7919 + epoch))
        take = min(batch_size - len(indices), size - offset)
        indices += order[offset : offset + take].tolist()
        position += take
    return indices


def examples_seen(
    *, steps: int, size: int, batch_size: int, seed: int, first: int = 0
) -> list[int]:
    """The examples the batches of steps ``first`` .. ``steps`` - 1 draw (sorted): all ``size``
    once they span an epoch (two from another step than 0), else those of each step."""
    span = (steps - first) * batch_size
    if span >= (size if first == 0 else 2 * size):
        return list(range(size))
    return sorted(
        {
            i
            for step in range(first, steps)
            for i in batch_indices(step=step, size=size, batch_size=batch_size, seed=seed)
        }
    )


def task_loss(
    model: torch.nn.Module,
    batch: dict[str, torch.Tensor],
    *,
    tokens: int | None = None,
    teacher: distillation.TeacherRows | None = None,
    weight: float = 0.0,
    emphasis: float = 0.0,
) -> torch.Tensor:
    """Mean cross-entropy of the labelled (completion) tokens, as ``model(**batch).loss``; with
    ``tokens``, their summed cross-entropy divided by it (a micro-batch's share of its step).
    With ``teacher`` (the batch's rows): plus ``weight`` times the distillation term over the
    same tokens, from the same logits, and the cross-entropy of the tokens where the teacher is
    right counted ``1 + emphasis`` times."""
    logits, labels = completion_logits(model, batch)
    reduction = "mean" if tokens is None else "sum"
    if teacher is None or (weight == 0 and emphasis == 0):
        loss = torch.nn.functional.cross_entropy(
            logits.float().reshape(-1, logits.shape[-1]),
            labels.reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction=reduction,
        )
        return loss if tokens is None else loss / tokens
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    nll = torch.nn.functional.nll_loss(
        logprobs.transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
    )
    kl, right = distillation.per_token(logprobs, labels, teacher)
    total = (nll * (1 + emphasis * right.float()) + weight * kl).sum()
    count = int((labels != IGNORE_INDEX).sum()) if tokens is None else tokens
    return total / max(count, 1)


def backward(
    model: torch.nn.Module,
    encoder: Encoder,
    examples: Sequence[Encoded],
    *,
    micro_batch: int,
    device: torch.device,
    teacher: distillation.TeacherRows | None = None,
    weight: float = 0.0,
    emphasis: float = 0.0,
    tokens: int | None = None,
) -> None:
    """The gradient of one step's task loss (the mean over all its labelled tokens), computed
    ``micro_batch`` examples at a time and accumulated: the same gradient as the whole batch at
    once, with the activations of a micro-batch only. ``teacher``: the examples' teacher rows
    (in the same order) for the distillation term of ``weight``. ``tokens``: the labelled
    tokens the loss is divided by (default: these examples'; a worker's share of a batch: the
    whole batch's)."""
    starts = range(0, len(examples), micro_batch)
    batches = [encoder.batch(examples[start : start + micro_batch], device) for start in starts]
    if tokens is None:
        tokens = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
    for start, batch in zip(starts, batches, strict=True):
        rows = None if teacher is None else teacher[start : start + micro_batch]
        with autocast(device):
            loss = task_loss(
                model,
                batch,
                tokens=max(tokens, 1),
                teacher=rows,
                weight=weight,
                emphasis=emphasis,
            )
        loss.backward()


def labelled_tokens(examples: Sequence[Encoded]) -> int:
    """The tokens the loss of ``examples`` covers, as :func:`backward` counts them in its batches:
    every completion token but one at the very start of a sequence (nothing predicts it)."""
    return sum(len(e.completion_ids) - (1 if not e.prompt_ids else 0) for e in examples)


EVALUATION_BATCH = 64
"""Examples per forward pass when measuring quality (no gradients), until memory runs short."""


class MicroBatch:
    """Examples per forward pass: the step's whole batch (or spec's microBatchSize), halved
    whenever work runs out of GPU memory (the work is then redone), down to 1. Quality is
    measured EVALUATION_BATCH examples at a time until then, a micro-batch at a time after.
    Not on a sharded base (``halves`` False, for the process): one worker taking smaller
    batches alone would break the step its forward passes keep with the others'; the error
    stands (relora plan says what fits)."""

    halves: ClassVar[bool] = True

    def __init__(
        self, size: int, *, batch: int, on_change: Callable[[str], None] | None = None
    ) -> None:
        self.size, self.batch = min(size, batch), batch
        self.on_change = on_change

    @property
    def evaluation(self) -> int:
        return EVALUATION_BATCH if self.size >= self.batch else self.size

    def run(self, work: Callable[[], T], reset: Callable[[], None] | None = None) -> T:
        """``work()`` (which reads the sizes) until it fits; ``reset()`` drops what a failed
        attempt left (partial gradients) before the redo."""
        while True:
            try:
                return work()
            except torch.OutOfMemoryError:
                if self.size == 1 or not self.halves:
                    raise
            if reset is not None:
                reset()  # outside the handler: the error's frames (and tensors) are gone
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
            self.size = max(1, self.size // 2)
            if self.on_change is not None:
                self.on_change(
                    f"ran out of GPU memory: continuing with micro-batches of {self.size} "
                    "examples (gradient accumulation: the same steps)"
                )

    def backward(
        self, model: torch.nn.Module, encoder: Encoder, examples: Sequence[Encoded], **kw: Any
    ) -> None:
        """:func:`backward` at the current size, as ``run`` redoes it."""
        backward(model, encoder, examples, micro_batch=self.size, **kw)


def _pull(
    lam: float, parameters: dict[str, torch.nn.Parameter], anchors: dict[str, torch.Tensor]
) -> torch.Tensor:
    return lam * regularization.penalty(parameters, anchors)


def train_step(
    model: torch.nn.Module,
    encoder: Encoder,
    train: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    micro: MicroBatch,
    *,
    step: int,
    batch_size: int,
    seed: int,
    device: torch.device,
    penalty: Callable[[], torch.Tensor] | None = None,
    teacher: distillation.Lessons | None = None,
    distill_weight: float = 0.0,
    emphasis: float = 0.0,
    world: World | None = None,
) -> None:
    """One optimizer step on the batch of ``step``: the task loss's gradient (plus
    ``distill_weight`` times the distillation term toward ``teacher``) accumulated over
    micro-batches (redone smaller if memory runs out), ``penalty`` (the regularizer) added
    once, the gradient norm clipped to 1 (``emphasis``: see :func:`task_loss`). With a
    distributed ``world``: this worker's share of the batch, its loss divided by the whole
    batch's labelled tokens, the gradients summed over the workers before the regularizer's
    is added (on every worker, once)."""
    whole = batch_indices(step=step, size=len(train), batch_size=batch_size, seed=seed)
    workers = world if world is not None and world.distributed else None
    picked = workers.shard(whole) if workers is not None else whole
    encoded = [encoder.encode(train[i].prompt, train[i].completion) for i in picked]
    reset = functools.partial(optimizer.zero_grad, set_to_none=True)
    reset()
    distilling: dict[str, Any] = {}
    if teacher is not None and (distill_weight > 0 or emphasis > 0):
        # The whole batch's rows on every worker: a later stage of the teacher starts on all
        # of them at the same step (rank 0 computes it, the others receive it).
        rows = teacher.rows(whole)
        distilling = {
            "teacher": workers.shard(rows) if workers is not None else rows,
            "weight": distill_weight,
            "emphasis": emphasis,
        }
    if workers is not None:
        distilling["tokens"] = max(workers.sum(labelled_tokens(encoded)), 1)
    work = functools.partial(micro.backward, model, encoder, encoded, device=device, **distilling)
    micro.run(work, reset)
    parameters = [p for group in optimizer.param_groups for p in group["params"]]
    if workers is not None:
        workers.all_reduce_gradients(parameters)
    if penalty is not None:
        penalty().backward()
    torch.nn.utils.clip_grad_norm_(parameters, 1.0)
    optimizer.step()


def look_ahead(
    model: PeftModel,
    encoder: Encoder,
    train: Sequence[Example],
    *,
    steps: int,
    learning_rate: float,
    batch_size: int,
    seed: int,
    device: torch.device,
    micro: MicroBatch | None = None,
) -> None:
    """``steps`` plain AdamW steps on the adapter parameters from their current values, on the
    batches the fine-tune itself starts with (a search trial's look-ahead)."""
    parameters = trainable(model)
    optimizer = torch.optim.AdamW(parameters.values(), lr=learning_rate, weight_decay=0.0)
    micro = micro or MicroBatch(batch_size, batch=batch_size)
    was_training = model.training
    model.train()
    try:
        for step in range(steps):
            train_step(
                model,
                encoder,
                train,
                optimizer,
                micro,
                step=step,
                batch_size=batch_size,
                seed=seed,
                device=device,
            )
    finally:
        model.train(was_training)


def _cosine(max_steps: int) -> Callable[[int], float]:
    return lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step / max(max_steps, 1), 1.0)))


class _Checkpoints:
    """Atomic save and load of the fine-tuning state in a folder."""

    def __init__(self, folder: Path | None) -> None:
        self.path = folder / CHECKPOINT_FILE if folder is not None else None

    def load(self) -> dict[str, Any] | None:
        if self.path is None or not self.path.is_file():
            return None
        try:
            state: dict[str, Any] = torch.load(self.path, map_location="cpu", weights_only=True)
        except Exception:
            # A torn or corrupted checkpoint: start over rather than fail. Whatever the bytes
            # make the unpickler raise (random bytes have given IndexError, KeyError, ...).
            return None
        return state

    def save(self, state: dict[str, Any]) -> None:
        if self.path is None:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        partial = self.path.with_suffix(".partial")
        torch.save(state, partial)
        os.replace(partial, self.path)


def _rng_state(device: torch.device) -> dict[str, Any]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return {"cpu": torch.get_rng_state(), "cuda": cuda}


def _fork_worker_rng(world: World) -> None:
    """Workers other than rank 0 draw their own random numbers (dropout masks) from here on:
    the seed in use, offset by the rank."""
    if world.rank > 0:
        torch.manual_seed((torch.initial_seed() + 1_000_003 * world.rank) % 2**63)


def _restore_worker_rng(world: World, saved: dict[str, Any], device: torch.device) -> None:
    """This worker's RNG as checkpointed (rank 0's is already set); a checkpoint of another
    number of workers (or of one): rank 0's state, forked."""
    states = saved.get("worker_rng")
    if states is None or len(states) != world.size:
        _fork_worker_rng(world)
        return
    mine = states[world.rank]
    torch.set_rng_state(mine["cpu"])
    if mine["cuda"] is not None and device.type == "cuda":
        torch.cuda.set_rng_state(mine["cuda"], device)


def _agree(world: World, saved: dict[str, Any] | None) -> None:
    """Every worker read the same checkpoint (or none): a worker that could not see or read
    the file rank 0 read (a folder not shared between nodes, a torn file) fails them all."""
    steps = world.gather(None if saved is None else int(saved["outcome"]["steps"]))
    if len(set(steps)) > 1:
        raise RuntimeError(
            "the workers read different checkpoints (steps by rank: "
            f"{steps}): the state folder must be one folder all of them see"
        )


def shared_quality(
    model: torch.nn.Module,
    encoder: Encoder,
    examples: Sequence[Example],
    choices: Sequence[str],
    device: torch.device,
    micro: MicroBatch,
    with_accuracy: bool,
    world: World | None = None,
) -> Quality:
    """``model``'s quality on ``examples`` (mixed precision on a GPU, batches of
    ``micro.evaluation``, redone smaller when memory runs out). With data-parallel workers
    (``world``; every one of them calls this with the same examples and an equal replica), each
    scores its share and all of them reduce the gathered scores: the quality of the whole. A
    worker that fails to score tells the others there (they raise its failure), as does one
    that failed elsewhere and meets them there (:meth:`World.meet`). On a sharded base
    (:attr:`World.in_step`) every worker scores all of them, in step (shares would take
    different numbers of forward passes), and keeps its own quality (the same numbers)."""
    workers = world if world is not None and world.distributed else None
    if workers is not None and workers.in_step:
        workers = None
    share = list(examples) if workers is None else workers.shard(examples)

    def once() -> Scores:
        with autocast(device):
            return score(
                model,
                encoder,
                share,
                choices,
                device=device,
                batch_size=micro.evaluation,
                with_accuracy=with_accuracy,
            )

    try:
        scores: Scores = micro.run(once)
    except Exception as error:
        if workers is not None:
            workers.meet(error)  # the others, in the gather below, hear of it
        raise
    if workers is not None:
        gathered = workers.gather(scores)
        # A worker that failed meets the others here (World.meet): its failure, raised.
        failed = next((g for g in gathered if isinstance(g, Failure)), None)
        if failed is not None:
            raise failed.error()
        scores = Scores.joined(gathered)
    return scores.quality()


def finetune(
    *,
    model: PeftModel,
    encoder: Encoder,
    train: Sequence[Example],
    validation: Sequence[Example],
    choices: Sequence[str],
    config: FinetuneConfig,
    regularize: RegularizationConfig | None,
    target: Target,
    seed: int,
    device: torch.device,
    state_dir: Path | None = None,
    seconds_before: float = 0.0,
    on_step: StepCallback | None = None,
    micro: MicroBatch | None = None,
    on_checkpoint: Callable[[], None] | None = None,
    teacher: distillation.Lessons | None = None,
    world: World | None = None,
    start_quality: Quality | None = None,
) -> FinetuneOutcome:
    """Train the adapter parameters of ``model`` from their current values until ready or budget.
    With a distillation weight or emphasis > 0, ``teacher`` (over ``train``) is required; with
    ``until: ready`` it takes no part in the steps after the first evaluation that met ``target``.

    ``world``: data-parallel workers (see the module's docstring); every worker calls this with
    the same arguments (``teacher`` over all of ``train``; ``state_dir`` one folder all of them
    read). The adapter parameters start from rank 0's values. ``on_step`` is called on every
    worker, with the same evaluations; ``on_checkpoint`` on rank 0 only, before the others go
    on. None (or a world of one): this process alone, no collective.

    ``start_quality``: the start's quality on ``validation``, when it was measured already (the
    old adapter as is: the reference measurement on the target base); the step-0 evaluation
    takes it, in no time, instead of measuring the same again."""
    distill_weight = config.distillation.weight
    if config.distillation.teaches and config.max_steps > 0:
        if teacher is None:
            raise ValueError("a distillation weight or emphasis > 0 needs the teacher")
        if teacher.examples != len(train):
            raise ValueError(
                f"the teacher covers {teacher.examples} examples, the training data has "
                f"{len(train)}"
            )
    parameters = trainable(model)
    workers = world if world is not None and world.distributed else None
    if workers is not None:  # replicas start equal, whatever each worker's initialization
        workers.broadcast_(list(parameters.values()))
    anchors = {n: p.detach().clone() for n, p in parameters.items()}
    optimizer = torch.optim.AdamW(parameters.values(), lr=config.learning_rate, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, _cosine(config.max_steps))
    outcome = FinetuneOutcome()
    checkpoints = _Checkpoints(state_dir)
    saved = checkpoints.load()
    if workers is not None:
        _agree(workers, saved)
    if saved is not None:
        with torch.no_grad():
            for name, value in saved["parameters"].items():
                parameters[name].copy_(value)
        anchors = {n: v.to(device) for n, v in saved["anchors"].items()}
        optimizer.load_state_dict(saved["optimizer"])
        schedule.load_state_dict(saved["schedule"])
        torch.set_rng_state(saved["rng"])
        if saved.get("cuda_rng") is not None and device.type == "cuda":
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
        outcome = FinetuneOutcome(**{**saved["outcome"], "history": []})
        outcome.history = [Evaluation(**e) for e in saved["outcome"]["history"]]
        if workers is not None:
            _restore_worker_rng(workers, saved, device)
    elif workers is not None:
        _fork_worker_rng(workers)
    if micro is None:
        micro = MicroBatch(config.micro_batch_size or config.batch_size, batch=config.batch_size)
    if outcome.micro_batch is not None:  # a resumed run that had to shrink: not again
        micro.size = min(micro.size, outcome.micro_batch)

    def clock() -> float:
        return seconds_before + outcome.train_seconds + outcome.eval_seconds

    def evaluate(step: int) -> Evaluation:
        started = time.perf_counter()
        known = start_quality if step == 0 else None
        if known is not None and (target.metric == "loss" or known.accuracy is not None):
            quality = known
        else:
            quality = measured()
        outcome.eval_seconds += time.perf_counter() - started
        evaluation = Evaluation(
            step, clock(), quality.loss, quality.accuracy, quality.value(target.metric)
        )
        if workers is not None:  # rank 0's numbers: the same readiness decision everywhere
            evaluation = workers.broadcast(evaluation)
        outcome.history.append(evaluation)
        if target.met(evaluation.quality) and outcome.ready_step is None:
            outcome.ready_step, outcome.ready_seconds = step, evaluation.seconds
        return evaluation

    def measured() -> Quality:
        with_accuracy = target.metric == "accuracy"
        return shared_quality(
            model, encoder, validation, choices, device, micro, with_accuracy, workers
        )

    if not outcome.history:
        first = evaluate(0)
        if on_step is not None:
            on_step(0, first)

    def stopped() -> bool:
        return outcome.ready and config.stop_when_ready

    model.train()
    while outcome.steps < config.max_steps and not stopped():
        step = outcome.steps
        started = time.perf_counter()
        lam = 0.0
        if regularize is not None:
            lam = regularization.strength(regularize, step=step, max_steps=config.max_steps)
        train_step(
            model,
            encoder,
            train,
            optimizer,
            micro,
            step=step,
            batch_size=config.batch_size,
            seed=seed,
            device=device,
            penalty=functools.partial(_pull, lam, parameters, anchors) if lam > 0 else None,
            teacher=(
                None
                if (config.distillation.until == "ready" and outcome.ready)
                or step < config.distilled_from
                else teacher
            ),
            distill_weight=distill_weight,
            emphasis=config.distillation.emphasis,
            world=workers,
        )
        if micro.size < config.batch_size:
            outcome.micro_batch = micro.size
        schedule.step()
        outcome.steps = step + 1
        outcome.train_seconds += time.perf_counter() - started
        done = step + 1
        evaluation = None
        if done % config.eval_every == 0 or done == config.max_steps:
            evaluation = evaluate(done)
        if done % config.checkpoint_every == 0 and done < config.max_steps and not stopped():
            ranks = None
            if workers is not None:  # each worker's RNG (dropout), for an exact resume
                ranks = workers.gather(_rng_state(device))
            if workers is None or workers.is_main:
                state = {
                    "parameters": {n: p.detach().cpu() for n, p in parameters.items()},
                    "anchors": {n: a.cpu() for n, a in anchors.items()},
                    "optimizer": optimizer.state_dict(),
                    "schedule": schedule.state_dict(),
                    "rng": torch.get_rng_state(),
                    "cuda_rng": torch.cuda.get_rng_state_all() if device.type == "cuda" else None,
                    "outcome": asdict(outcome),
                }
                if ranks is not None:
                    state["worker_rng"] = ranks
                checkpoints.save(state)
                if on_checkpoint is not None:
                    on_checkpoint()
            if workers is not None:  # a checkpoint counts once written (and kept) in full
                workers.barrier()
        if on_step is not None:
            on_step(done, evaluation)
    return outcome
