"""Migrate the adapters of an AdapterMigration: the one code path of `relora run` and the Job.

For each adapter: read the old adapter and data, measure the reference qualities (old adapter on
the old base and on the new base), compute the teacher's distributions when fine-tuning distils
and the old adapter is not already ready on the new base (the old adapter on the old base's
weights, copied into the new base in place), build the starting adapter (the strategy),
fine-tune until ready, save a PEFT folder and a report. Timing separates loading and reference
measurements (reporting) from the teacher, search, training and evaluation (the
time-to-readiness).
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any, Literal

import torch
from peft import PeftModel
from torch import nn
from torch.distributed.tensor import DTensor

from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_api.status import AdapterProgress
from relora_trainer import adapters, models, ownership, plan, report, teaching
from relora_trainer.data import Encoder, TaskData
from relora_trainer.distributed import World
from relora_trainer.errors import IncompatibleModels
from relora_trainer.inputs import (
    FINGERPRINT_FILE,
    STATE_DIR,
    TaskQuality,
    fingerprint,
    old_adapter,
    readiness_target,
    task_data,
)
from relora_trainer.loading import REFERENCE_FILE, Bases, free, reference_key, save_reference
from relora_trainer.method import distillation, fusion, search, strategies
from relora_trainer.method.config import FinetuneConfig, SearchConfig
from relora_trainer.method.finetune import Evaluation, MicroBatch, finetune
from relora_trainer.progress import NullProgress, ProgressSink
from relora_trainer.storage import Storage
from relora_trainer.workers import (
    LookAhead,
    Meetings,
    Reference,
    Start,
    Teach,
    ahead,
    explained,
    follow,
    same_adapter,
)


def migrate_adapter(
    *,
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    bases: Bases,
    storage: Storage,
    progress: ProgressSink | None = None,
    owner: ownership.Owner = ownership.LOCAL,
    world: World | None = None,
) -> report.AdapterReport:
    """Migrate one adapter; resumable: state lives in ``<output>/<name>/state``. The output
    folder is claimed for ``owner`` for the whole run (see relora_trainer.ownership).

    ``world``: data-parallel workers, every one of them calling this with the same arguments
    (``bases`` loaded on its own device). Rank 0 does what a process alone does: it claims the
    output, measures the references, computes the teacher, searches the start, reports progress,
    saves the adapter and the report and publishes them; the others load the data and the old
    adapter, wait for rank 0's start (:class:`Start`), fine-tune with it (:func:`finetune`
    broadcasts rank 0's adapter parameters at its start; rank 0 writes its checkpoints) and
    return rank 0's report. They write nothing in the output. A failure of any worker before
    or after the fine-tuning fails every worker (:meth:`World.meet`)."""
    workers = world if world is not None and world.distributed else None
    if workers is not None and not workers.is_main:
        return follow(spec=spec, adapter=adapter, bases=bases, storage=storage, world=workers)
    meetings = Meetings(workers, lambda error: explained(error, spec, adapter, storage))
    try:
        # Refused before the claim writes anything: an output that is an input, unusable data.
        ownership.check_apart(spec, adapter, storage)
        task = task_data(spec, adapter, storage)
        key = fingerprint(spec, adapter)
        with ownership.Claim(
            spec=spec, adapter=adapter, storage=storage, owner=owner, work=key
        ) as claim:
            try:
                return _migrate_claimed(
                    spec, adapter, task, bases, storage, progress, claim, key, meetings
                )
            except (torch.OutOfMemoryError, MemoryError) as error:
                free(bases.device)
                raise plan.out_of_memory(
                    error, spec, adapter, storage, bases.device.type
                ) from error
    except Exception as error:
        meetings.fail(error)  # the other workers, waiting for the start or the report, stop too
        raise


def _migrate_claimed(
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    task: TaskData,
    bases: Bases,
    storage: Storage,
    progress: ProgressSink | None,
    claim: ownership.Claim,
    key: str,
    meetings: Meetings,
) -> report.AdapterReport:
    sink = progress or NullProgress()
    method = spec.method
    out = claim.folder
    state = out / STATE_DIR
    finished = report.load_finished(out, key)
    if finished is not None:
        sink.note(adapter.name, "already migrated with this spec: keeping the existing result")
        meetings.hand(finished)
        return finished
    if (state / FINGERPRINT_FILE).is_file() and (state / FINGERPRINT_FILE).read_text() != key:
        shutil.rmtree(state)  # the spec changed: saved progress belongs to other work
    state.mkdir(parents=True, exist_ok=True)
    (state / FINGERPRINT_FILE).write_text(key)

    old = old_adapter(adapter, storage, bases.target)
    encoder = Encoder(bases.tokenizer)
    tune = FinetuneConfig.of(method.finetune)
    micro = MicroBatch(
        tune.micro_batch_size or tune.batch_size,
        batch=tune.batch_size,
        on_change=lambda message: sink.note(adapter.name, message),
    )
    quality = TaskQuality(encoder, task, bases.device, metric=adapter.readiness.metric, micro=micro)
    torch.manual_seed(method.seed)

    planned = _plan(spec, adapter, storage, bases.device, sink, encoder, task)
    checkpointing = _checkpointing(spec, planned, bases.device)
    peak = round(planned.peak(checkpointing=checkpointing), 2) if planned else None

    def record(**fields: Any) -> AdapterProgress:
        return AdapterProgress(planned_peak_gib=peak, **fields)

    sink.update(adapter.name, record(stage="evaluate"))
    started = time.perf_counter()
    reference = reference_key(adapter)
    if reference not in bases.on_source and adapter.readiness.needs_source:
        on_source = adapters.attach_old(bases.source(), old)
        bases.on_source[reference] = quality.splits(on_source)
        adapters.detach(on_source)
    if reference not in bases.on_target:
        meetings.together(Reference())
        on_target = adapters.attach_old(bases.target, old)
        bases.on_target[reference] = quality.splits(on_target)
        adapters.detach(on_target)
    source_quality = bases.on_source.get(reference)
    if source_quality is not None and not (state / REFERENCE_FILE).is_file():
        save_reference(state, key, source_quality)
        claim.save_state(STATE_DIR)
    before_quality = bases.on_target[reference]
    reference_seconds = time.perf_counter() - started + bases.source_seconds
    target = readiness_target(
        adapter.readiness, source_quality["validation"] if source_quality else None
    )
    ready_before = target.met(before_quality["validation"].value(target.metric))
    part = None
    if not ready_before:  # else nothing to learn from it: no teacher's seconds
        part = teaching.first_part(
            spec,
            adapter,
            reference,
            old,
            task,
            bases,
            encoder,
            state,
            key,
            computing=lambda only: meetings.together(Teach(only)),
        )
    if part is not None and not (state / teaching.TEACHER_FILE).is_file():
        teaching.save(state, key, part)
        claim.save_state(STATE_DIR)
    base_weights = list(bases.target.named_parameters(remove_duplicate=False))

    rank = method.rank or old.rank
    config = adapters.new_config(old.config, rank=method.rank, base=spec.target_model.uri)
    torch.manual_seed(method.seed)
    model = adapters.attach(bases.target, config)
    if checkpointing:
        models.recompute(bases.target, True)
    result: search.SearchResult | None = None
    teacher: distillation.Lessons | None = None
    if part is not None:

        def stage_done(grown: teaching.TeacherPart) -> None:
            upto = "the whole budget" if grown.steps is None else f"steps up to {grown.steps}"
            sink.note(adapter.name, f"teacher: {upto} covered ({grown.seconds:.1f} s in all)")
            teaching.save(state, key, grown)
            claim.save_state(STATE_DIR)

        metric = adapter.readiness.metric
        where = teaching.InPlace(model, base_weights, old, task, bases, encoder, metric)
        teacher = teaching.lessons(spec, where, part, stage_done, meetings.world, meetings.explain)

    def trial_done(trial: int, trials: int, value: float | None) -> None:
        claim.save_state(STATE_DIR)  # the search journal, for a pod that takes over
        sink.update(adapter.name, record(stage="search", trial=trial, trials=trials))

    try:
        chosen = strategies.strategy(method.strategy)
        context = _context(
            spec=spec,
            model=model,
            old=old,
            bases=bases,
            quality=quality,
            tune=tune,
            journal=state / "search.journal",
            study_name=f"{search.STUDY_NAME}-{key}",
            on_trial=trial_done,
            ready_before=ready_before,
            meetings=meetings,
        )
        result = chosen.initialize(context)
        # The old adapter as is: its reference measurement on the target is the start's.
        as_old = chosen.starts_as_old(result) and strategies.keeps_update(context)
        start_quality = before_quality["validation"] if as_old else None
        finetune_config = tune.as_run(trains=chosen.trains, distils=teacher is not None)
        shared = None if part is None else {k: v.cpu() for k, v in part.teacher.to_state().items()}
        steps = None if part is None else part.steps
        meetings.hand(Start(shared, steps, target, checkpointing, start_quality))
        same_adapter(meetings.world, model)

        def on_step(step: int, evaluation: Evaluation | None) -> None:
            sink.update(
                adapter.name,
                record(
                    stage="finetune",
                    step=step,
                    max_steps=finetune_config.max_steps,
                    quality=evaluation.quality if evaluation else None,
                    target=target.value,
                ),
            )

        outcome = finetune(
            model=model,
            encoder=encoder,
            train=task.train,
            validation=task.validation,
            choices=task.choices,
            config=finetune_config,
            regularize=finetune_config.regularization if chosen.regularized else None,
            target=target,
            seed=method.seed,
            device=bases.device,
            state_dir=state,
            seconds_before=(part.seconds if part else 0.0) + (result.seconds if result else 0.0),
            on_step=on_step,
            micro=micro,
            on_checkpoint=lambda: claim.save_state(STATE_DIR),
            teacher=teacher,
            world=meetings.world,
            start_quality=start_quality,
        )
        meetings.expect()  # the others wait for the report
        if isinstance(teacher, distillation.Staged):  # its later stages: the teacher's seconds
            outcome = replace(outcome, train_seconds=outcome.train_seconds - teacher.seconds)
        sink.update(adapter.name, record(stage="saving"))
        staging = claim.fresh_staging()
        model.save_pretrained(str(staging), save_embedding_layers=False)
        with meetings.shared():  # each worker scores a share
            after_quality = quality.splits(model, meetings.world)
    finally:
        adapters.detach(model)
        if checkpointing:
            models.recompute(bases.target, False)

    adapter_report = report.AdapterReport.build(
        adapter=adapter,
        strategy=method.strategy,
        output_uri=spec.output_uri(adapter.name),
        fingerprint=key,
        device=str(bases.device),
        rank=rank,
        target=target,
        qualities={
            **({"source": source_quality} if source_quality else {}),
            "before": before_quality,
            "after": after_quality,
        },
        search_result=result,
        outcome=outcome,
        load_seconds=bases.load_seconds,
        reference_seconds=reference_seconds,
        teacher_seconds=teaching.total_seconds(part, teacher),
        distillation=asdict(tune.distillation) if part is not None else None,
        device_peak_gib=(
            torch.cuda.max_memory_allocated(bases.device) / plan.GIB
            if bases.device.type == "cuda"
            else None
        ),
        checkpointing=checkpointing,
        planned_peak_gib=peak,
        workers=meetings.world.size if meetings.world is not None else 1,
        sharded_base=bases.in_step is not None,
    )
    report.write(staging, adapter_report)
    claim.publish(keep=(STATE_DIR,))
    storage.publish(out, adapter_report.output_uri)
    meetings.hand(adapter_report)
    return adapter_report


def _plan(
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    storage: Storage,
    device: torch.device,
    sink: ProgressSink,
    encoder: Encoder,
    task: TaskData,
) -> plan.Estimate | None:
    """relora plan's estimate for this run's device, on the lengths of the training examples
    as the fine-tuning encodes them (the encoder keeps the ids for it); None where the models'
    configs do not say enough (an architecture the plan does not know): the migration runs
    without it."""
    encoded = [encoder.encode(e.prompt, e.completion) for e in task.train]
    sequence = max(len(e.prompt_ids) + len(e.completion_ids) for e in encoded)
    completion = max(len(e.completion_ids) for e in encoded)
    try:
        return plan.estimate(
            spec, adapter, storage, device=device.type, sequence=sequence, completion=completion
        )
    except Exception as error:  # a courtesy: never a reason to fail a migration
        sink.note(adapter.name, f"no memory plan ({type(error).__name__}: {error})")
        return None


def _checkpointing(
    spec: AdapterMigrationSpec, planned: plan.Estimate | None, device: torch.device
) -> bool:
    """Whether to recompute activations: as set, or (auto) when the plan's estimate without it
    does not fit this GPU (a CPU's memory is the host's: off)."""
    wanted = spec.method.finetune.gradient_checkpointing
    if wanted != "auto":
        return wanted == "on"
    if device.type != "cuda" or planned is None:
        return False
    total = torch.cuda.get_device_properties(device).total_memory / plan.GIB
    return planned.peak() > plan.USABLE * total


def _terms(old: adapters.OldAdapter, bases: Bases, *, projection: str) -> fusion.Terms:
    """Per adapted module: the old update and the base evolution W_target - W_source (the
    source weight read from its files, one tensor at a time, in fp32); per saved parameter the
    same in full."""
    fan_in_fan_out = bool(old.config.fan_in_fan_out)
    terms = fusion.Terms(modules={})
    with torch.no_grad():
        for module, factors in old.factors.items():
            name = f"{module}.weight"
            w_target = adapters.base_weight(bases.target, module, fan_in_fan_out=fan_in_fan_out)
            w_source = _source(bases, name, w_target, transpose=fan_in_fan_out)
            if bases.in_step is not None:  # a shard: the whole weight from the files, as loaded
                stored = _source(bases, name, w_target, transpose=fan_in_fan_out, files="target")
                w_target = stored.to(bases.dtype)
            scale = old.scale(module)
            terms.modules[module] = fusion.prepare(
                factors, w_target.float() - w_source, scale=scale, projection=projection
            )
            if factors.magnitude is not None:
                norm = adapters.direction_norm(w_source, factors, scale)
                terms.modules[module].ratio = factors.magnitude.to(norm) / norm.clamp(min=1e-12)
            del w_source
        for name, saved in old.saved.items():
            weight = adapters.base_parameter(bases.target, name)
            source = _source(bases, name, weight, transpose=False)
            target = weight.detach().float()
            terms.saved[name] = fusion.SavedTerms(
                target=target.clone(), task=saved.to(target) - source, evolution=target - source
            )
            del source
    return terms


def _source(
    bases: Bases,
    name: str,
    target: torch.Tensor,
    *,
    transpose: bool,
    files: Literal["source", "target"] = "source",
) -> torch.Tensor:
    """The source base's parameter ``name`` (from its files, else from the model) as fp32 on the
    target's device, transposed like ``target`` (Conv1D); refused when the shapes differ.
    ``files="target"``: the target base's, from its files (a sharded base's whole weight)."""
    found = bases.source_files if files == "source" else bases.target_files
    stored = found.get(name)
    for alias in _aliases(bases.target, target) if stored is None else []:
        stored = found.get(alias)  # a tied weight: stored under its other name
        if stored is not None:
            break
    if stored is None:  # named otherwise in the files: from the model itself
        stored = bases.source().get_parameter(name).detach()
    source = (stored.T if transpose else stored).to(target.device, torch.float32)
    if source.shape != target.shape:
        raise IncompatibleModels(
            f"weight {name.removesuffix('.weight')} is {tuple(source.shape)} in sourceModel but "
            f"{tuple(target.shape)} in targetModel"
        )
    return source


def _aliases(model: nn.Module, tensor: torch.Tensor) -> list[str]:
    """The names of ``model``'s parameters that share ``tensor``'s storage (tied weights)."""
    named = model.named_parameters(remove_duplicate=False)
    if isinstance(tensor, DTensor):  # a shard's storage says nothing (it may be empty)
        return [n for n, p in named if p is tensor]  # type: ignore[comparison-overlap]
    pointer = tensor.data_ptr()
    return [n for n, p in named if p.data_ptr() == pointer]


def _context(
    *,
    spec: AdapterMigrationSpec,
    model: PeftModel,
    old: adapters.OldAdapter,
    bases: Bases,
    quality: TaskQuality,
    tune: FinetuneConfig,
    journal: Path,
    study_name: str,
    on_trial: Callable[[int, int, float | None], None],
    ready_before: bool,
    meetings: Meetings,
) -> strategies.Context:
    """What a strategy may use, the I/O behind it done here: the evolution read from the
    source's files, quality measured on the search's validation subset (with workers, each
    scores a share: :meth:`Meetings.measure`)."""
    init = SearchConfig.of(spec.method.initialization)
    examples = init.validation_samples  # the first ones (all when fewer)

    def look_ahead_steps() -> None:
        values = {name: p.detach().cpu() for name, p in adapters.trainable(model).items()}
        meetings.together(LookAhead(values))
        ahead(model, spec, quality)

    return strategies.Context(
        model=model,
        old=old,
        layout=adapters.layout(model),
        device=bases.device,
        evolution=lambda projection: _terms(old, bases, projection=projection),
        measure=lambda with_accuracy: meetings.measure(model, quality, examples, with_accuracy),
        look_ahead=look_ahead_steps,
        metric=quality.metric,
        ready_before=ready_before,
        search=init,
        seed=spec.method.seed,
        journal=journal,
        study_name=study_name,
        on_trial=on_trial,
    )
