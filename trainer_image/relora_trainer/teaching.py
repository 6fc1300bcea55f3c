"""The old adapter on the old base as the teacher of one adapter's migration: which training
examples it covers and when (stages), computing them on the source base's weights copied into
the loaded target base in place (one base resident), and keeping them in the adapter's state
for a retried attempt. The distillation term and the teacher's rows: relora_trainer.method.
distillation.

A teacher comes in stages: before fine-tuning, the examples of the steps up to
:data:`FIRST_STAGE_EVALUATIONS` readiness checks; then, each time a batch first draws an example
not covered yet (the adapter was not ready by then), those of twice as many steps, the last
stage the whole budget. A run ready early pays for the examples it drew, give or take a factor
of two, in at most a logarithm of the budget of passes over the old base's weights. Among
data-parallel workers, rank 0 (which alone holds the source base's weights) computes each stage
and hands it to the others (:func:`lessons`, :func:`received`): every worker asks for the rows
of the whole batch, so all of them reach a stage at the same step.
"""

from __future__ import annotations

import copy
import io
import json
import pickle
import random
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from peft import PeftModel
from torch import nn

from relora_api.spec import Adapter, AdapterMigrationSpec, Distillation
from relora_trainer import adapters, models, ownership
from relora_trainer.data import Encoder, TaskData
from relora_trainer.distributed import Failure, World
from relora_trainer.method import distillation, strategies
from relora_trainer.method.config import DistillationConfig, FinetuneConfig
from relora_trainer.method.finetune import EVALUATION_BATCH, MicroBatch, autocast, examples_seen

if TYPE_CHECKING:
    from relora_trainer.loading import Bases

TEACHER_FILE = "teacher.pt"
"""The teacher distributions (fine-tuning that distils), in the state folder."""
TEACHER_ADAPTER = "relora-teacher"
"""The old adapter's name beside the new one while a later stage of the teacher is computed."""
FIRST_STAGE_EVALUATIONS = 2
"""The teacher's first stage covers the examples of the steps up to this many readiness checks
(an adapter ready by then never pays for the rest); each later stage twice the steps of the one
before, the last the whole budget."""


Extend = Callable[[distillation.Teacher, list[int], int], distillation.Teacher]
"""What computes a later stage: (the teacher so far, the examples it adds, its index) -> the
teacher with them."""


@dataclass(frozen=True)
class TeacherPart:
    """The teacher's rows computed so far, the seconds they took, and the fine-tuning steps
    whose examples they cover (None: all those of the budget)."""

    teacher: distillation.Teacher
    seconds: float
    steps: int | None = None


def distilled(spec: AdapterMigrationSpec) -> Distillation | None:
    """The teacher's settings when this spec's fine-tuning distils (a strategy that trains, a
    budget, a positive weight or emphasis), else None: no teacher is computed."""
    tune = spec.method.finetune
    trains = strategies.strategy(spec.method.strategy).trains
    teaches = DistillationConfig.of(tune.distillation).teaches
    if teaches and tune.max_steps > 0 and trains:
        return tune.distillation
    return None


def _budget(spec: AdapterMigrationSpec) -> dict[str, int]:
    """What decides the training examples a fine-tune sees (the teacher covers those only)."""
    tune = spec.method.finetune
    return {"steps": tune.max_steps, "batch_size": tune.batch_size, "seed": spec.method.seed}


def key(reference: str, teaching: Distillation, spec: AdapterMigrationSpec) -> str:
    """What a teacher depends on: the adapter's inputs (``reference``), the teacher's settings
    and the budget (the weight and the emphasis are the fine-tune's, not the teacher's)."""
    settings = {k: v for k, v in teaching.to_wire().items() if k not in ("weight", "emphasis")}
    what = {"reference": reference, **settings, "budget": _budget(spec)}
    return json.dumps(what, sort_keys=True)


def _first_step(spec: AdapterMigrationSpec) -> int:
    """The first step of ``spec``'s fine-tuning that distils."""
    return FinetuneConfig.of(spec.method.finetune).distilled_from


def seen(spec: AdapterMigrationSpec, size: int, steps: int | None = None) -> list[int]:
    """The training examples that the steps of ``spec``'s fine-tuning that distil draw, up to
    step ``steps`` (None: its whole budget)."""
    budget = _budget(spec)
    if steps is not None:
        budget["steps"] = min(steps, budget["steps"])
    return examples_seen(size=size, first=_first_step(spec), **budget)


def taught(spec: AdapterMigrationSpec, size: int, examples: Iterable[int]) -> list[int]:
    """Those of ``examples`` the teacher covers: all of them, or with ``share`` < 1 those in a
    fixed random subset of the ``size`` training examples (drawn from the method's seed, the
    same in every stage and attempt)."""
    share = spec.method.finetune.distillation.share
    if share >= 1:
        return list(examples)
    # A stream of its own: the batches' order is drawn from the same seed (a subset taken from
    # that permutation would be the examples the first steps draw).
    draw = random.Random(f"teacher share {spec.method.seed}")
    subset = set(draw.sample(range(size), k=round(share * size)))
    return [n for n in examples if n in subset]


def stages(spec: AdapterMigrationSpec, size: int) -> list[int | None]:
    """The steps whose examples each stage of the teacher covers: those up to
    ``FIRST_STAGE_EVALUATIONS`` readiness checks, then twice as many steps per stage, the last
    (None) the whole budget. Only stages that add examples; ``[None]``: one stage."""
    whole = len(seen(spec, size))
    # From a later step (since first-check): a first stage of nothing, ending there.
    steps = _first_step(spec) or FIRST_STAGE_EVALUATIONS * spec.method.finetune.eval_every
    found: list[int | None] = []
    while steps < spec.method.finetune.max_steps and len(seen(spec, size, steps)) < whole:
        found.append(steps)
        steps *= 2
    return [*found, None]


def compute(
    model: nn.Module,
    encoder: Encoder,
    task: TaskData,
    device: torch.device,
    spec: AdapterMigrationSpec,
    metric: str,
    only: list[int],
) -> distillation.Teacher:
    """The teacher's distributions over the training examples ``only`` (``model``: the old
    adapter on the source base); redone in smaller batches when memory runs out. Over the
    task's choices for an accuracy target (``over: choices``), else its top k."""
    teaching = spec.method.finetune.distillation
    micro = MicroBatch(EVALUATION_BATCH, batch=EVALUATION_BATCH)
    choices = task.choices if teaching.over == "choices" and metric == "accuracy" else None

    def once() -> distillation.Teacher:
        with autocast(device):
            return distillation.compute(
                model,
                encoder,
                task.train,
                top_k=teaching.top_k,
                device=device,
                batch_size=micro.evaluation,
                choices=choices,
                agreeing=teaching.agreeing,
                only=only,
            )

    return micro.run(once)


def load(state: Path, fingerprint: str) -> TeacherPart | None:
    """The teacher (the seconds it took, the steps it covers) as an earlier attempt of the work
    ``fingerprint`` saved it in the state folder ``state`` (:func:`save`), else None."""
    path = state / TEACHER_FILE
    if not path.is_file():
        return None
    try:
        saved = torch.load(path, map_location="cpu", weights_only=True)
        if saved.get("fingerprint") != fingerprint:
            return None
        steps = saved.get("steps")
        return TeacherPart(
            distillation.Teacher.of_state(saved["teacher"]),
            float(saved["seconds"]),
            None if steps is None else int(steps),
        )
    except (
        RuntimeError,
        EOFError,
        OSError,
        ValueError,
        TypeError,
        KeyError,
        AttributeError,
        pickle.UnpicklingError,
    ):
        return None  # unreadable, torn or foreign: compute again


def save(state: Path, fingerprint: str, part: TeacherPart) -> None:
    """``part`` in the state folder ``state`` (atomically), for :func:`load`."""
    buffer = io.BytesIO()
    saved = {"teacher": part.teacher.to_state(), "seconds": part.seconds, "steps": part.steps}
    torch.save({"fingerprint": fingerprint, **saved}, buffer)
    ownership.write_atomic(state / TEACHER_FILE, buffer.getvalue())


def first_part(
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    reference: str,
    old: adapters.OldAdapter,
    task: TaskData,
    bases: Bases,
    encoder: Encoder,
    state: Path,
    fingerprint: str,
    computing: Callable[[list[int]], None] = lambda only: None,
) -> TeacherPart | None:
    """The teacher distributions when fine-tuning distils, the seconds they took and the steps
    they cover: computed before for the same inputs (``reference``: a benchmark's runs), else
    an earlier attempt's (saved in ``state`` for the work ``fingerprint``), else computed now
    on the source base's weights copied into the target base in place (one base resident; the
    target's own weights copied back after), else (weights the files name otherwise than the
    model) on the source base loaded again. Computed now in place, it covers only the examples
    of the first stage (:func:`stages`; the others: :func:`lessons`). ``computing`` is told
    the examples before they are computed in place (the workers of a sharded base compute them
    too: :func:`compute_in_place`)."""
    teaching = distilled(spec)
    if teaching is None:
        return None
    wanted = key(reference, teaching, spec)
    if wanted not in bases.teachers:
        part = load(state, fingerprint)
        if part is None:
            started = time.perf_counter()
            size, metric = len(task.train), adapter.readiness.metric
            in_place = models.holds_all(bases.target, bases.source_files)
            steps = stages(spec, size)[0] if in_place else None
            only = taught(spec, size, seen(spec, size, steps))
            if not only:  # nothing to compute yet: rows of no mass (no forward pass)
                teacher = compute(bases.target, encoder, task, bases.device, spec, metric, only)
            elif in_place:
                computing(only)
                teacher = compute_in_place(spec, old, task, bases, encoder, metric, only)
            else:
                on_old = adapters.attach_old(bases.source(), old)
                teacher = compute(on_old, encoder, task, bases.device, spec, metric, only)
                adapters.detach(on_old)
            part = TeacherPart(teacher, time.perf_counter() - started, steps)
        bases.teachers[wanted] = part
    return bases.teachers[wanted]


def compute_in_place(
    spec: AdapterMigrationSpec,
    old: adapters.OldAdapter,
    task: TaskData,
    bases: Bases,
    encoder: Encoder,
    metric: str,
    only: list[int],
) -> distillation.Teacher:
    """The teacher's rows of the examples ``only``, on the source base's weights copied into
    the target base in place (the target's copied back after). On a sharded base every worker
    computes them together (relora_trainer.workers)."""
    if not models.copy_weights(bases.target, bases.source_files):
        raise RuntimeError("the source base's weights could not be read in place")
    try:
        on_old = adapters.attach_old(bases.target, old)
        teacher = compute(on_old, encoder, task, bases.device, spec, metric, only)
        adapters.detach(on_old)
    finally:
        if not models.copy_weights(bases.target, bases.target_files):
            raise RuntimeError("the target base's weights could not be read back")
    return teacher


@dataclass(frozen=True)
class InPlace:
    """What the later stages are computed with, in the middle of fine-tuning ``model``: the
    base's parameters as named before the new adapter wrapped its layers (``base_weights``),
    the old adapter, the task, the bases, the encoder and the readiness metric."""

    model: PeftModel
    base_weights: list[tuple[str, nn.Parameter]]
    old: adapters.OldAdapter
    task: TaskData
    bases: Bases
    encoder: Encoder
    metric: str


def lessons(
    spec: AdapterMigrationSpec,
    where: InPlace,
    part: TeacherPart,
    on_stage: Callable[[TeacherPart], None],
    world: World | None = None,
    explain: Callable[[Exception], Exception] = lambda error: error,
) -> distillation.Lessons:
    """What fine-tuning distils from: ``part`` when it covers the whole budget, else a
    :class:`distillation.Staged` whose later stages :func:`later_stages` computes (and
    ``on_stage`` gets the teacher so far after each). With workers (rank 0, which computes
    them): each stage is handed to the others (:func:`received`), or its failure told (as
    ``explain`` makes it: an output that cannot be written, bad input everywhere)."""
    if part.steps is None:
        return part.teacher
    extend = later_stages(spec, where, part, _later(spec, len(where.task.train), part), on_stage)
    if world is not None and world.distributed:
        extend = _handed(extend, world, explain)
    return _staged(spec, len(where.task.train), part, extend)


def received(
    spec: AdapterMigrationSpec,
    size: int,
    part: TeacherPart,
    world: World,
    where: InPlace | None = None,
) -> distillation.Lessons:
    """A worker other than rank 0: ``part`` (rank 0's first stage, over ``size`` training
    examples), and each later stage as rank 0 hands it over, when the same batch asks for
    it on every worker (a failure of rank 0 there: raised here as its copy). ``where``: on a
    sharded base, this worker computes each stage with rank 0 first (in step), then takes
    rank 0's."""
    if part.steps is None:
        return part.teacher
    alongside = None
    if where is not None:
        alongside = later_stages(spec, where, part, _later(spec, size, part), lambda grown: None)

    def extend(teacher: distillation.Teacher, examples: list[int], n: int) -> distillation.Teacher:
        if alongside is not None:
            alongside(teacher, examples, n)
        handed: object = world.broadcast(None)
        if isinstance(handed, Failure):
            raise handed.error()
        if not isinstance(handed, dict):
            raise TypeError(f"rank 0 handed {type(handed).__name__}, not a teacher")
        return distillation.Teacher.of_state(handed)

    return _staged(spec, size, part, extend)


def _later(spec: AdapterMigrationSpec, size: int, part: TeacherPart) -> list[int | None]:
    """The stages after ``part``'s (the steps each covers; None: the whole budget)."""
    steps = part.steps
    return [s for s in stages(spec, size) if s is None or (steps is not None and s > steps)]


def _staged(
    spec: AdapterMigrationSpec, size: int, part: TeacherPart, extend: Extend
) -> distillation.Staged:
    return distillation.Staged(
        part.teacher,
        seen(spec, size, part.steps),
        [seen(spec, size, steps) for steps in _later(spec, size, part)],
        extend,
    )


def _handed(extend: Extend, world: World, explain: Callable[[Exception], Exception]) -> Extend:
    """``extend`` on rank 0, its result (or failure, as ``explain`` makes it) then handed to
    the other workers."""

    def handing(teacher: distillation.Teacher, examples: list[int], n: int) -> distillation.Teacher:
        try:
            grown = extend(teacher, examples, n)
        except Exception as error:
            world.broadcast(Failure.of(explain(error), world.rank))
            raise
        world.broadcast({k: v.cpu() for k, v in grown.to_state().items()})
        return grown

    return handing


def later_stages(
    spec: AdapterMigrationSpec,
    where: InPlace,
    first: TeacherPart,
    later: list[int | None],
    on_done: Callable[[TeacherPart], None],
) -> Extend:
    """What extends the teacher ``first`` in the middle of fine-tuning ``where.model`` by
    stage ``n`` of ``later`` (the steps each covers): the old adapter added beside the new one
    and made active, the source base's weights copied into the base in place (through
    ``where.base_weights``), the examples given computed, then the target's weights, the new
    adapter (trainable again) restored and the old one removed. ``on_done`` gets the teacher so
    far after each stage."""
    seconds = first.seconds
    model, bases, old = where.model, where.bases, where.old

    def extend(teacher: distillation.Teacher, examples: list[int], n: int) -> distillation.Teacher:
        nonlocal seconds
        started = time.perf_counter()
        model.add_adapter(TEACHER_ADAPTER, copy.deepcopy(old.config))
        try:
            adapters.load_factors(model, old.factors, old.saved, adapter_name=TEACHER_ADAPTER)
            model.set_adapter(TEACHER_ADAPTER, inference_mode=True)
            if not models.copy_weights(where.base_weights, bases.source_files):
                raise RuntimeError("the source base's weights could not be read in place")
            try:
                size = len(where.task.train)
                rows = compute(
                    model,
                    where.encoder,
                    where.task,
                    bases.device,
                    spec,
                    where.metric,
                    taught(spec, size, examples),
                )
            finally:
                if not models.copy_weights(where.base_weights, bases.target_files):
                    raise RuntimeError("the target base's weights could not be read back")
        finally:
            model.set_adapter(adapters.ADAPTER)
            model.delete_adapter(TEACHER_ADAPTER)
        grown = teacher.merged(rows, examples)
        seconds += time.perf_counter() - started
        on_done(TeacherPart(grown, seconds, later[n]))
        return grown

    return extend


def total_seconds(part: TeacherPart | None, teacher: distillation.Lessons | None) -> float | None:
    """The teacher's seconds in all (its later stages' too, when any was computed)."""
    if part is None:
        return None
    return part.seconds + (teacher.seconds if isinstance(teacher, distillation.Staged) else 0.0)
