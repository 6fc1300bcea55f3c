"""Data-parallel workers of one adapter's migration: rank 0's side of its meetings with the
others (:class:`Meetings`), what they score for its search meanwhile (:class:`Measure`,
:func:`serve`), what it hands them before they fine-tune together (:class:`Start`), and what a
worker other than rank 0 does (:func:`follow`).

On a sharded base (:attr:`World.in_step`) every forward pass is collective, so the others also
run with rank 0 the passes it would run alone: it tells them each one first (:class:`Reference`,
:class:`Teach`, :class:`LookAhead`, a later teacher stage: relora_trainer.teaching.received),
and they compute it beside it, on the same examples, keeping rank 0's results."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Literal

import torch
from peft import PeftModel

from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_trainer import adapters, models, report, teaching
from relora_trainer import storage as store
from relora_trainer.data import Encoder
from relora_trainer.distributed import Failure, World
from relora_trainer.inputs import STATE_DIR, TaskQuality, old_adapter, output_dir, task_data
from relora_trainer.loading import Bases
from relora_trainer.method import distillation, strategies
from relora_trainer.method.config import FinetuneConfig, SearchConfig
from relora_trainer.method.finetune import MicroBatch, Target, finetune, look_ahead
from relora_trainer.method.quality import Quality
from relora_trainer.storage import Storage


@dataclass
class Start:
    """What rank 0 hands the other workers before they fine-tune together: the teacher's
    distributions so far (None: no distillation; its later stages, when any, reach them from
    rank 0 as the batches ask for them: :func:`teaching.received`), the readiness target
    (relative to rank 0's source measurement), whether activations are recomputed, the start's
    quality when measured already. The adapter's start itself (the search's choice) reaches
    them at the start of :func:`finetune`, which broadcasts rank 0's trainable parameters: the
    others attach the same fresh adapter and skip the strategy (a strategy sets values only,
    never the adapter's layout; checked by :func:`same_adapter`)."""

    teacher: dict[str, torch.Tensor] | None
    teacher_steps: int | None  # the steps the teacher covers so far (None: all)
    target: Target
    checkpointing: bool
    start_quality: Quality | None = None  # the start's, measured already (see finetune)


@dataclass(frozen=True)
class Reference:
    """On a sharded base: rank 0 measures the old adapter on the target base; the others
    measure with it."""


@dataclass(frozen=True)
class Teach:
    """On a sharded base: rank 0 computes the teacher's first stage over the training examples
    ``only`` in place (relora_trainer.teaching.compute_in_place); the others compute with it."""

    only: list[int]


@dataclass(frozen=True)
class LookAhead:
    """On a sharded base: rank 0 takes a search trial's look-ahead steps from the adapter at
    ``values``; the others take them with it (their own values are then replaced by rank 0's
    at the trial's :class:`Measure`)."""

    values: dict[str, torch.Tensor]


@dataclass(frozen=True)
class Measure:
    """Rank 0 asks the other workers, while it searches the start, to score their share of
    the first ``examples`` validation examples with the adapter at ``values`` (a trial's
    start: rank 0 alone can fuse it, the others hold the same base and attach the same
    adapter)."""

    values: dict[str, torch.Tensor]
    examples: int
    with_accuracy: bool


class Meetings:
    """Rank 0's side of its meetings with the other workers (:meth:`World.meet`): they wait at
    one for the start (:class:`Start`) while rank 0 prepares it, then for the report (or for
    the finished report rank 0 found) after the fine-tuning. While rank 0 searches, they score
    a share of each trial's measurement (:meth:`measure`, :func:`serve`). A failure of rank 0
    while they wait or serve is told there; one inside the fine-tuning's collectives cannot be
    (the others stop at the process group's timeout, or when the launcher ends them). Alone:
    nothing."""

    def __init__(self, world: World | None, explain: Callable[[Exception], Exception]) -> None:
        self.world, self.explain = world, explain
        # Where the others are: at a meeting, serving rank 0's search (waiting for its next
        # message), or None (in the fine-tuning's collectives, told already, or alone).
        self.others: Literal["meeting", "serving"] | None = "meeting" if world else None

    def _met(self, world: World) -> None:
        """Past the meeting the others wait at (they serve next)."""
        if self.others == "meeting":
            world.meet()
        self.others = "serving"

    def hand(self, value: object) -> None:
        """Meet the waiting workers (when they wait at a meeting) and give them ``value``."""
        if self.world is not None:
            self._met(self.world)
            self.others = None
            self.world.broadcast(value)

    def together(self, work: Reference | Teach | LookAhead) -> None:
        """On a sharded base, before rank 0 runs ``work``'s forward passes: the others run them
        too (:func:`serve`). Else nothing."""
        if self.world is not None and self.world.in_step:
            self._met(self.world)
            self.world.broadcast(work)

    def measure(
        self, model: PeftModel, quality: TaskQuality, examples: int, with_accuracy: bool
    ) -> Quality:
        """``model``'s quality on the first ``examples`` validation examples; with workers,
        each scores a share with rank 0's adapter values (:class:`Measure`)."""
        subset = quality.task.validation[:examples]
        if self.world is None:
            return quality.on(model, subset, with_accuracy=with_accuracy)
        self._met(self.world)
        values = {name: p.detach().cpu() for name, p in adapters.trainable(model).items()}
        self.world.broadcast(Measure(values, examples, with_accuracy))
        with self.shared():
            return quality.on(model, subset, with_accuracy=with_accuracy, world=self.world)

    @contextlib.contextmanager
    def shared(self) -> Iterator[None]:
        """A measurement every worker takes part in (its scores gathered): a failure in it is
        told there (:func:`relora_trainer.method.finetune.shared_quality`), not again after."""
        try:
            yield
        except Exception:
            self.others = None
            raise

    def expect(self) -> None:
        """The others go on to the next meeting (fine-tuning done)."""
        self.others = "meeting" if self.world else None

    def fail(self, error: Exception) -> None:
        """Tell the other workers, if they wait or serve, that rank 0 failed with ``error``."""
        where, self.others = self.others, None
        if self.world is None or where is None:
            return
        try:
            told = self.explain(error)
            if where == "meeting":
                self.world.meet(told)
            else:
                self.world.broadcast(Failure.of(told, self.world.rank))
        except Exception as unheard:  # its own error matters more than the others' hearing it
            print(f"could not tell the other workers: {unheard}", file=sys.stderr)


@dataclass
class Serving:
    """What a worker other than rank 0 needs to run its part of rank 0's passes (:func:`serve`):
    the new adapter is attached (``attach``) at the first pass that needs it."""

    quality: TaskQuality
    old: adapters.OldAdapter
    bases: Bases
    spec: AdapterMigrationSpec
    metric: str
    attach: Callable[[], PeftModel]
    model: PeftModel | None = None

    def attached(self) -> PeftModel:
        if self.model is None:
            self.model = self.attach()
        return self.model


def serve(world: World, serving: Serving) -> object:
    """A worker other than rank 0 while rank 0 prepares the start: score a share of each
    :class:`Measure` rank 0 asks for with its values (on a sharded base, run each pass rank 0
    tells of beside it), until it hands something else (returned; a failure of rank 0: raised
    as its copy). A failure here meets rank 0 in its gather."""
    quality = serving.quality
    while True:
        message: object = world.broadcast(None)
        if isinstance(message, Failure):
            raise message.error()
        if isinstance(message, Reference):
            on_target = adapters.attach_old(serving.bases.target, serving.old)
            quality.splits(on_target, world)
            adapters.detach(on_target)
            continue
        if isinstance(message, Teach):
            teaching.compute_in_place(
                serving.spec,
                serving.old,
                quality.task,
                serving.bases,
                quality.encoder,
                serving.metric,
                message.only,
            )
            continue
        if isinstance(message, LookAhead):
            _load(serving.attached(), message.values)
            ahead(serving.attached(), serving.spec, quality)
            continue
        if not isinstance(message, Measure):
            return message
        try:
            model = serving.attached()
            _load(model, message.values)
            subset = quality.task.validation[: message.examples]
        except Exception as error:
            world.meet(error)  # rank 0 waits in the measurement's gather: it hears of it there
            raise
        quality.on(model, subset, with_accuracy=message.with_accuracy, world=world)


def _load(model: PeftModel, values: dict[str, torch.Tensor]) -> None:
    """Rank 0's values of the adapter's trainable parameters, into ``model``'s."""
    parameters = adapters.trainable(model)
    with torch.no_grad():
        for name, value in values.items():
            parameters[name].copy_(value)


def ahead(model: PeftModel, spec: AdapterMigrationSpec, quality: TaskQuality) -> None:
    """A search trial's look-ahead steps (``initialization.lookaheadSteps`` plain AdamW steps
    on the fine-tune's first batches) from ``model``'s adapter values."""
    tune = FinetuneConfig.of(spec.method.finetune)
    look_ahead(
        model,
        quality.encoder,
        quality.task.train,
        steps=SearchConfig.of(spec.method.initialization).lookahead_steps,
        learning_rate=tune.learning_rate,
        batch_size=tune.batch_size,
        seed=spec.method.seed,
        device=quality.device,
        micro=quality.micro,
    )


def explained(
    error: Exception, spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage
) -> Exception:
    """The failure the other workers are told of: an output that cannot be written as the
    OutputNotWritable the Job entrypoint makes of it (the same exit code everywhere)."""
    if isinstance(error, OSError):
        uri = spec.output_uri(adapter.name)
        folder = output_dir(spec, adapter, storage)
        found = store.unwritable(error, what="spec.output", uri=uri, folder=folder)
        if found is not None:
            return found
    return error


def same_adapter(world: World | None, model: PeftModel) -> None:
    """Every worker's adapter has the same trainable parameters (names and shapes): rank 0's
    values can be broadcast into the others'."""
    if world is None:
        return
    shapes = {name: tuple(p.shape) for name, p in adapters.trainable(model).items()}
    if any(theirs != shapes for theirs in world.gather(shapes)):
        raise RuntimeError("the workers attached different adapters: cannot fine-tune together")


def follow(
    *,
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    bases: Bases,
    storage: Storage,
    world: World,
) -> report.AdapterReport:
    """A worker other than rank 0 (see relora_trainer.migrate.migrate_adapter): rank 0's report."""
    method = spec.method
    try:
        task = task_data(spec, adapter, storage)
        old = old_adapter(adapter, storage, bases.target)
    except Exception as error:
        world.meet(error)
        raise
    world.meet()  # rank 0 claimed the output (its state folder is ready to be read)
    tune = FinetuneConfig.of(method.finetune)
    micro = MicroBatch(tune.micro_batch_size or tune.batch_size, batch=tune.batch_size)
    encoder = Encoder(bases.tokenizer)
    metric = adapter.readiness.metric
    quality = TaskQuality(encoder, task, bases.device, metric=metric, micro=micro)
    config = adapters.new_config(old.config, rank=method.rank, base=spec.target_model.uri)
    base_weights = list(bases.target.named_parameters(remove_duplicate=False))

    def attach() -> PeftModel:
        torch.manual_seed(method.seed)  # as rank 0 before attaching: finetune forks from this seed
        return adapters.attach(bases.target, config)

    serving = Serving(quality, old, bases, spec, metric, attach)
    recomputing = False
    try:
        start = serve(world, serving)  # rank 0's search, then its start
        if isinstance(start, report.AdapterReport):  # finished before: nothing to do
            return start
        if not isinstance(start, Start):
            raise TypeError(f"rank 0 handed {type(start).__name__}, not the start")
        model = serving.attached()
        teacher = None
        if start.teacher is not None:
            first = distillation.Teacher.of_state(start.teacher)
            part = teaching.TeacherPart(first, 0.0, start.teacher_steps)
            where = None
            if world.in_step:  # this worker computes each later stage beside rank 0
                where = teaching.InPlace(model, base_weights, old, task, bases, encoder, metric)
            teacher = teaching.received(spec, len(task.train), part, world, where)
        chosen = strategies.strategy(method.strategy)
        finetune_config = tune.as_run(trains=chosen.trains, distils=teacher is not None)
        if start.checkpointing:
            models.recompute(bases.target, True)
            recomputing = True
        same_adapter(world, model)
        finetune(
            model=model,
            encoder=encoder,
            train=task.train,
            validation=task.validation,
            choices=task.choices,
            config=finetune_config,
            regularize=finetune_config.regularization if chosen.regularized else None,
            target=start.target,
            seed=method.seed,
            device=bases.device,
            state_dir=output_dir(spec, adapter, storage) / STATE_DIR,
            micro=micro,
            teacher=teacher,
            world=world,
            start_quality=start.start_quality,
        )
        quality.splits(model, world)  # rank 0's measurement of the fine-tuned adapter: a share
    finally:
        if serving.model is not None:
            adapters.detach(serving.model)
        if recomputing:
            models.recompute(bases.target, False)
    world.meet()  # rank 0 saved, reported and published
    finished: object = world.broadcast(None)
    if not isinstance(finished, report.AdapterReport):
        raise TypeError(f"rank 0 handed {type(finished).__name__}, not its report")
    return finished
