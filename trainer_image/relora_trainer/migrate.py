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

import gc
import json
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from relora_api.spec import Adapter, AdapterMigrationSpec, Readiness
from relora_api.status import AdapterProgress
from relora_trainer import adapter_config, adapters, models, ownership, plan, report, teaching
from relora_trainer import storage as store
from relora_trainer.data import MAX_CHOICES, Encoder, Example, TaskData, read_jsonl
from relora_trainer.distributed import World
from relora_trainer.errors import IncompatibleModels, InvalidData, MissingInput
from relora_trainer.method import distillation, fusion, search, strategies
from relora_trainer.method.config import FinetuneConfig, SearchConfig
from relora_trainer.method.finetune import (
    EVALUATION_BATCH,
    Evaluation,
    MicroBatch,
    Target,
    autocast,
    finetune,
    look_ahead,
)
from relora_trainer.method.quality import Quality, measure
from relora_trainer.progress import NullProgress, ProgressSink
from relora_trainer.storage import Storage

STATE_DIR = "state"
REFERENCE_FILE = "reference.json"
"""The source phase's measurement, in the state folder: a retried pod need not load the old base."""
FINGERPRINT_FILE = "fingerprint"


@dataclass
class Bases:
    """The target base, the tokenizer and what was measured on the source base, loaded once
    for all adapters of a migration.

    One base is resident at a time: the source base is loaded first, only when an adapter
    needs it (a readiness target relative to the old adapter on the old base), measured and
    freed; then the target base is loaded. The base evolution W_target - W_source of the
    adapted modules reads the source's weights one tensor at a time from its files.
    """

    target: nn.Module
    tokenizer: PreTrainedTokenizerBase
    device: torch.device
    dtype: torch.dtype
    load_seconds: float
    # None on a worker other than rank 0: it never reads the source base (not even fetched).
    source_dir: Path | None
    _source_files: models.WeightFiles | None
    target_files: models.WeightFiles
    # The old adapter on the source base, by adapter inputs (measured in the source phase),
    # and on the target base: adapters that share inputs (a benchmark's runs) measure once.
    on_source: dict[str, dict[str, Quality]] = field(default_factory=dict)
    on_target: dict[str, dict[str, Quality]] = field(default_factory=dict)
    source_seconds: float = 0.0
    # The old adapter on the source base as a teacher (its first stage), by adapter inputs,
    # settings and budget, with the seconds its computation took (counted in the time to
    # readiness of a run that uses it; each run computes its own later stages).
    teachers: dict[str, teaching.TeacherPart] = field(default_factory=dict)
    _source: nn.Module | None = None

    @property
    def source_files(self) -> models.WeightFiles:
        """The source base's weights, read one tensor at a time from its files."""
        if self._source_files is None:
            raise RuntimeError("the source base was not fetched by this worker")
        return self._source_files

    def source(self) -> nn.Module:
        """The source base, loaded again (the slow path: an adapter that was not measured in
        the source phase, or weights the files name otherwise than the model)."""
        if self._source is None:
            if self.source_dir is None:
                raise RuntimeError("the source base was not fetched by this worker")
            self._source = models.load_model(
                self.source_dir, what="spec.sourceModel", device=self.device, dtype=self.dtype
            )
        return self._source


def _reference_key(adapter: Adapter) -> str:
    return json.dumps({"uri": adapter.uri, "data": adapter.data.to_wire()}, sort_keys=True)


def load_bases(
    spec: AdapterMigrationSpec,
    storage: Storage,
    device: torch.device,
    adapters_to_measure: list[Adapter] | None = None,
    *,
    world: World | None = None,
) -> Bases:
    """Fetch and load the bases (see :func:`_load_bases`); OutOfMemory, with the estimate,
    when they do not fit the device. Among data-parallel workers (``world``) only rank 0
    fetches the source base and measures on it: the others fetch and load the target alone
    (rank 0 checks that the two agree; a failure there ends them too)."""
    measuring = world is None or world.is_main
    try:
        return _load_bases(spec, storage, device, adapters_to_measure, source_phase=measuring)
    except (torch.OutOfMemoryError, MemoryError) as error:
        _free(device)
        first = (adapters_to_measure or spec.adapters)[0]
        raise plan.out_of_memory(error, spec, first, storage, device.type) from error


def _load_bases(
    spec: AdapterMigrationSpec,
    storage: Storage,
    device: torch.device,
    adapters_to_measure: list[Adapter] | None,
    *,
    source_phase: bool = True,
) -> Bases:
    """Fetch the bases; measure the old adapters that need it on the source base, free it, then
    load the target. (A teacher is computed later, only for an adapter that is not ready on the
    target base as it is: see :func:`_teacher`.)
    Raise IncompatibleModels / InvalidWeights / MissingInput / InvalidAdapter.

    ``adapters_to_measure`` (default: every adapter of the spec) are measured on the source now;
    another one measured later loads the source base again. Without ``source_phase`` (a worker
    other than rank 0): none is (nor any saved measurement read), and the source base is neither
    fetched (unless the target has no tokenizer: the source's) nor checked against the target."""
    started = time.perf_counter()

    def fetch_source() -> Path:
        return storage.fetch(
            spec.source_model.uri, what="spec.sourceModel", revision=spec.source_model.revision
        )

    source_dir = fetch_source() if source_phase else None
    target_dir = storage.fetch(
        spec.target_model.uri, what="spec.targetModel", revision=spec.target_model.revision
    )
    dtype = models.dtype_for(spec.method.precision, device)
    shape = None
    if source_dir is not None:  # before minutes of loading: the architectures and shapes agree
        shape = models.Shape.of_files(source_dir, what="spec.sourceModel")
        models.check_compatible(shape, models.Shape.of_files(target_dir, what="spec.targetModel"))
        tokenizer = models.load_tokenizer(target_dir, source_dir)
    else:
        try:
            tokenizer = models.load_tokenizer(target_dir)
        except MissingInput:
            source_dir = fetch_source()
            tokenizer = models.load_tokenizer(target_dir, source_dir)
    on_source: dict[str, dict[str, Quality]] = {}
    wanted = []  # the adapters to measure on the source base
    for adapter in (adapters_to_measure or spec.adapters) if source_phase else []:
        if not adapter.readiness.needs_source:
            continue
        saved = saved_reference(spec, adapter, storage)
        if saved is not None:  # measured by an earlier attempt of this work
            on_source[_reference_key(adapter)] = saved
        else:
            wanted.append(adapter)
    source_seconds = 0.0
    if wanted and source_dir is not None:  # else the source base is not loaded at all
        source = models.load_model(source_dir, what="spec.sourceModel", device=device, dtype=dtype)
        models.check_finite(source, what="spec.sourceModel")
        shape = models.Shape.of(source)  # all of its weights, not only the stored ones
        measuring = time.perf_counter()
        for adapter in wanted:
            key = _reference_key(adapter)
            if key in on_source:  # measured for an adapter with the same inputs
                continue
            old, task = _old_adapter(adapter, storage, source), _read_data(adapter, storage)
            on_old = adapters.attach_old(source, old)
            on_source[key] = _Quality(Encoder(tokenizer), task, device).splits(on_old)
            adapters.detach(on_old)
            del on_old
        source_seconds = time.perf_counter() - measuring
        del source  # one base resident at a time
        _free(device)
    target = models.load_model(target_dir, what="spec.targetModel", device=device, dtype=dtype)
    models.check_finite(target, what="spec.targetModel")
    if shape is not None:
        models.check_compatible(shape, target)
    return Bases(
        target,
        tokenizer,
        device,
        dtype,
        time.perf_counter() - started - source_seconds,
        source_dir,
        None if source_dir is None else models.WeightFiles(source_dir, what="spec.sourceModel"),
        models.WeightFiles(target_dir, what="spec.targetModel"),
        on_source=on_source,
        source_seconds=source_seconds,
    )


def saved_reference(
    spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage
) -> dict[str, Quality] | None:
    """The old adapter's quality on the source base as an earlier attempt of this very work
    saved it in the adapter's state (a retried pod skips the source phase), else None."""
    path = output_dir(spec, adapter, storage) / STATE_DIR / REFERENCE_FILE
    try:
        saved = json.loads(path.read_text())
        if saved.get("fingerprint") != fingerprint(spec, adapter):
            return None
        return {split: Quality(**values) for split, values in saved["quality"].items()}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None  # none yet, or unreadable: measure again


def _save_reference(state: Path, key: str, quality: dict[str, Quality]) -> None:
    fields = {split: asdict(q) for split, q in quality.items()}
    saved = json.dumps({"fingerprint": key, "quality": fields}).encode()
    ownership.write_atomic(state / REFERENCE_FILE, saved)


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _old_adapter(adapter: Adapter, storage: Storage, model: nn.Module) -> adapters.OldAdapter:
    where = f"spec.adapters[{adapter.name}].uri"
    old = adapters.read_adapter(storage.fetch(adapter.uri, what=where), what=where)
    adapters.check_fits(old, model, what=where)
    return old


fingerprint = ownership.fingerprint


def output_dir(spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage) -> Path:
    """The local folder an adapter's results are written to before publishing."""
    return storage.local_path(spec.output_uri(adapter.name), what="spec.output.uri")


def _read_data(adapter: Adapter, storage: Storage) -> TaskData:
    where = f"spec.adapters[{adapter.name}].data"
    data = adapter.data
    train = read_jsonl(storage.fetch(data.train, what=f"{where}.train"), what=f"{where}.train")
    validation = read_jsonl(
        storage.fetch(data.validation, what=f"{where}.validation"), what=f"{where}.validation"
    )
    test = None
    if data.test is not None:
        test = read_jsonl(storage.fetch(data.test, what=f"{where}.test"), what=f"{where}.test")
    task = TaskData(train, validation, test)
    if adapter.readiness.metric == "accuracy" and len(task.choices) < 2:
        raise InvalidData(
            f"{where}: accuracy needs at least two distinct completions, found {task.choices}"
        )
    if adapter.readiness.metric == "accuracy" and len(task.choices) > MAX_CHOICES:
        raise InvalidData(
            f"{where}: {len(task.choices)} distinct completions; accuracy scores every example "
            f"against each of them, so it takes at most {MAX_CHOICES} (a classification task): "
            f"set spec.adapters[{adapter.name}].readiness.metric: loss for free-form completions"
        )
    return task


def finished(
    spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage, owner: ownership.Owner
) -> report.AdapterReport | None:
    """The finished result of this very work by this owner, if the output holds one: found
    before any model is loaded (a retried pod, or the operator re-reading an outcome)."""
    ownership.restore(spec, adapter, storage, owner)  # an s3:// output, on a new machine
    folder = output_dir(spec, adapter, storage)
    record = ownership.read_record(folder)
    if record is None or not record.owner.same(owner):
        return None
    return report.load_finished(folder, fingerprint(spec, adapter))


def check_inputs(spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage) -> None:
    """What can be refused before any model is loaded: an output that is an input, an adapter
    of a kind that cannot be migrated, task data that cannot be used, a search objective the
    data cannot serve."""
    ownership.check_apart(spec, adapter, storage)
    _task(spec, adapter, storage)
    where = f"spec.adapters[{adapter.name}].uri"
    adapter_config.check_folder(storage.fetch(adapter.uri, what=where), what=where)


def _task(spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage) -> TaskData:
    """The adapter's task data, refused when the method cannot use it."""
    task = _read_data(adapter, storage)
    objective = spec.method.initialization.objective
    choosing = spec.method.strategy == "relora" and objective == "choice-loss"
    if choosing and len(task.choices) > MAX_CHOICES:
        raise InvalidData(
            f"spec.method.initialization.objective: choice-loss scores each validation "
            f"example against every distinct completion, and adapter {adapter.name!r} has "
            f"{len(task.choices)} (at most {MAX_CHOICES}): use objective: loss"
        )
    return task


def readiness_target(readiness: Readiness, source: Quality | None) -> Target:
    """The absolute target: as given, or relative to the old adapter on the old base."""
    if readiness.target is not None:
        return Target(readiness.metric, readiness.target)
    if source is None:
        raise ValueError("a relative readiness target needs the old adapter's source quality")
    fraction = readiness.relative_to_source or 1.0
    reference = source.value(readiness.metric)
    value = reference / fraction if readiness.metric == "loss" else reference * fraction
    return Target(readiness.metric, value)


class _Quality:
    """Measures a model on the task's splits with the migration's encoder, device and
    micro-batch (a measurement that runs out of GPU memory is redone with smaller batches)."""

    def __init__(
        self,
        encoder: Encoder,
        task: TaskData,
        device: torch.device,
        *,
        metric: str = "accuracy",
        micro: MicroBatch | None = None,
    ) -> None:
        self.encoder, self.task, self.device, self.metric = encoder, task, device, metric
        self.micro = micro or MicroBatch(EVALUATION_BATCH, batch=EVALUATION_BATCH)
        # Accuracy scores each example against every completion: reported only where bounded.
        self.scores_choices = len(task.choices) <= MAX_CHOICES

    def on(
        self, model: nn.Module, examples: list[Example], *, with_accuracy: bool | None = None
    ) -> Quality:
        chosen = self.scores_choices if with_accuracy is None else with_accuracy

        def once() -> Quality:
            with autocast(self.device):
                return measure(
                    model,
                    self.encoder,
                    examples,
                    self.task.choices,
                    device=self.device,
                    batch_size=self.micro.evaluation,
                    with_accuracy=chosen,
                )

        return self.micro.run(once)

    def splits(self, model: nn.Module) -> dict[str, Quality]:
        result = {"validation": self.on(model, self.task.validation)}
        if self.task.test is not None:
            result["test"] = self.on(model, self.task.test)
        return result


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
    adapter, wait for rank 0's start (:class:`_Start`), fine-tune with it (:func:`finetune`
    broadcasts rank 0's adapter parameters at its start; rank 0 writes its checkpoints) and
    return rank 0's report. They write nothing in the output. A failure of any worker before
    or after the fine-tuning fails every worker (:meth:`World.meet`)."""
    workers = world if world is not None and world.distributed else None
    if workers is not None and not workers.is_main:
        return _follow(spec=spec, adapter=adapter, bases=bases, storage=storage, world=workers)
    meetings = _Meetings(workers, lambda error: _explained(error, spec, adapter, storage))
    try:
        # Refused before the claim writes anything: an output that is an input, unusable data.
        ownership.check_apart(spec, adapter, storage)
        task = _task(spec, adapter, storage)
        key = fingerprint(spec, adapter)
        with ownership.Claim(
            spec=spec, adapter=adapter, storage=storage, owner=owner, work=key
        ) as claim:
            try:
                return _migrate_claimed(
                    spec, adapter, task, bases, storage, progress, claim, key, meetings
                )
            except (torch.OutOfMemoryError, MemoryError) as error:
                _free(bases.device)
                raise plan.out_of_memory(
                    error, spec, adapter, storage, bases.device.type
                ) from error
    except Exception as error:
        meetings.fail(error)  # the other workers, waiting for the start or the report, stop too
        raise


@dataclass
class _Start:
    """What rank 0 hands the other workers before they fine-tune together: the teacher's
    distributions over all of train (None: no distillation), the readiness target (relative to
    rank 0's source measurement), whether activations are recomputed. The adapter's start
    itself (the search's choice) reaches them at the start of :func:`finetune`, which broadcasts
    rank 0's trainable parameters: the others attach the same fresh adapter and skip the
    strategy (a strategy sets values only, never the adapter's layout; checked by
    :func:`_same_adapter`)."""

    teacher: dict[str, torch.Tensor] | None
    target: Target
    checkpointing: bool


class _Meetings:
    """Rank 0's side of its meetings with the other workers (:meth:`World.meet`): they wait at
    one for the start (:class:`_Start`) while rank 0 prepares it, then for the report (or for
    the finished report rank 0 found) after the fine-tuning. A failure of rank 0 while they
    wait is told there; one inside the fine-tuning's collectives cannot be (the others stop at
    the process group's timeout, or when the launcher ends them). Alone: nothing."""

    def __init__(self, world: World | None, explain: Callable[[Exception], Exception]) -> None:
        self.world, self.explain = world, explain
        self.waiting = world is not None  # the others are at a meeting, waiting for rank 0

    def hand(self, value: object) -> None:
        """Meet the waiting workers and give them ``value``."""
        if self.world is not None:
            self.waiting = False
            self.world.meet()
            self.world.broadcast(value)

    def expect(self) -> None:
        """The others go on to the next meeting (fine-tuning done)."""
        self.waiting = self.world is not None

    def fail(self, error: Exception) -> None:
        """Tell the waiting workers, if they wait, that rank 0 failed with ``error``."""
        if self.world is None or not self.waiting:
            return
        self.waiting = False
        try:
            self.world.meet(self.explain(error))
        except Exception as unheard:  # its own error matters more than the others' hearing it
            print(f"could not tell the other workers: {unheard}", file=sys.stderr)


def _explained(
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


def _same_adapter(world: World | None, model: PeftModel) -> None:
    """Every worker's adapter has the same trainable parameters (names and shapes): rank 0's
    values can be broadcast into the others'."""
    if world is None:
        return
    shapes = {name: tuple(p.shape) for name, p in adapters.trainable(model).items()}
    if any(theirs != shapes for theirs in world.gather(shapes)):
        raise RuntimeError("the workers attached different adapters: cannot fine-tune together")


def _follow(
    *,
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    bases: Bases,
    storage: Storage,
    world: World,
) -> report.AdapterReport:
    """A worker other than rank 0 (see :func:`migrate_adapter`): rank 0's report."""
    method = spec.method
    try:
        task = _task(spec, adapter, storage)
        old = _old_adapter(adapter, storage, bases.target)
    except Exception as error:
        world.meet(error)
        raise
    world.meet()  # rank 0 claimed the output (its state folder is ready to be read) ...
    start: object = world.broadcast(None)  # ... and prepared the start
    if isinstance(start, report.AdapterReport):  # finished before: nothing to do
        return start
    if not isinstance(start, _Start):
        raise TypeError(f"rank 0 handed {type(start).__name__}, not the start")
    teacher = None if start.teacher is None else distillation.Teacher.of_state(start.teacher)
    tune = FinetuneConfig.of(method.finetune)
    chosen = strategies.strategy(method.strategy)
    finetune_config = _finetune_config(tune, chosen, teacher)
    config = adapters.new_config(old.config, rank=method.rank, base=spec.target_model.uri)
    torch.manual_seed(method.seed)  # as rank 0 before attaching: finetune forks from this seed
    model = adapters.attach(bases.target, config)
    if start.checkpointing:
        _recompute(bases.target, True)
    try:
        _same_adapter(world, model)
        finetune(
            model=model,
            encoder=Encoder(bases.tokenizer),
            train=task.train,
            validation=task.validation,
            choices=task.choices,
            config=finetune_config,
            regularize=finetune_config.regularization if chosen.regularized else None,
            target=start.target,
            seed=method.seed,
            device=bases.device,
            state_dir=output_dir(spec, adapter, storage) / STATE_DIR,
            micro=MicroBatch(tune.micro_batch_size or tune.batch_size, batch=tune.batch_size),
            teacher=teacher,
            world=world,
        )
    finally:
        adapters.detach(model)
        if start.checkpointing:
            _recompute(bases.target, False)
    world.meet()  # rank 0 saved, reported and published
    finished: object = world.broadcast(None)
    if not isinstance(finished, report.AdapterReport):
        raise TypeError(f"rank 0 handed {type(finished).__name__}, not its report")
    return finished


def _finetune_config(
    tune: FinetuneConfig, chosen: strategies.Strategy, teacher: distillation.Lessons | None
) -> FinetuneConfig:
    """The fine-tuning of a strategy: none for one that does not train; no distillation without
    a teacher (the old adapter was ready on the new base as it is: none was computed)."""
    config = tune if chosen.trains else replace(tune, max_steps=0)
    if teacher is None:
        off = replace(config.distillation, weight=0.0, emphasis=0.0)
        config = replace(config, distillation=off)
    return config


def _migrate_claimed(
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    task: TaskData,
    bases: Bases,
    storage: Storage,
    progress: ProgressSink | None,
    claim: ownership.Claim,
    key: str,
    meetings: _Meetings,
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

    old = _old_adapter(adapter, storage, bases.target)
    encoder = Encoder(bases.tokenizer)
    tune = FinetuneConfig.of(method.finetune)
    micro = MicroBatch(
        tune.micro_batch_size or tune.batch_size,
        batch=tune.batch_size,
        on_change=lambda message: sink.note(adapter.name, message),
    )
    quality = _Quality(encoder, task, bases.device, metric=adapter.readiness.metric, micro=micro)
    torch.manual_seed(method.seed)

    planned = _plan(spec, adapter, storage, bases.device, sink, encoder, task)
    checkpointing = _checkpointing(spec, planned, bases.device)
    peak = round(planned.peak(checkpointing=checkpointing), 2) if planned else None

    def record(**fields: Any) -> AdapterProgress:
        return AdapterProgress(planned_peak_gib=peak, **fields)

    sink.update(adapter.name, record(stage="evaluate"))
    started = time.perf_counter()
    reference_key = _reference_key(adapter)
    if reference_key not in bases.on_source and adapter.readiness.needs_source:
        on_source = adapters.attach_old(bases.source(), old)
        bases.on_source[reference_key] = quality.splits(on_source)
        adapters.detach(on_source)
    if reference_key not in bases.on_target:
        on_target = adapters.attach_old(bases.target, old)
        bases.on_target[reference_key] = quality.splits(on_target)
        adapters.detach(on_target)
    source_quality = bases.on_source.get(reference_key)
    if source_quality is not None and not (state / REFERENCE_FILE).is_file():
        _save_reference(state, key, source_quality)
        claim.save_state(STATE_DIR)
    before_quality = bases.on_target[reference_key]
    reference_seconds = time.perf_counter() - started + bases.source_seconds
    target = readiness_target(
        adapter.readiness, source_quality["validation"] if source_quality else None
    )
    ready_before = target.met(before_quality["validation"].value(target.metric))
    part = None
    # Workers get the whole teacher before they start: no later stage among them.
    staged = meetings.world is None or not meetings.world.distributed
    if not ready_before:  # else nothing to learn from it: no teacher's seconds
        part = teaching.first_part(
            spec, adapter, reference_key, old, task, bases, encoder, state, key, staged=staged
        )
    # Saved once; by workers also over a partial one (they computed the whole teacher again).
    if part is not None and (not staged or not (state / teaching.TEACHER_FILE).is_file()):
        teaching.save(state, key, part)
        claim.save_state(STATE_DIR)
    base_weights = list(bases.target.named_parameters(remove_duplicate=False))

    rank = method.rank or old.rank
    config = adapters.new_config(old.config, rank=method.rank, base=spec.target_model.uri)
    torch.manual_seed(method.seed)
    model = adapters.attach(bases.target, config)
    if checkpointing:
        _recompute(bases.target, True)
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
        teacher = teaching.lessons(spec, where, part, stage_done)

    def trial_done(trial: int, trials: int, value: float | None) -> None:
        claim.save_state(STATE_DIR)  # the search journal, for a pod that takes over
        sink.update(adapter.name, record(stage="search", trial=trial, trials=trials))

    try:
        chosen = strategies.strategy(method.strategy)
        result = chosen.initialize(
            _context(
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
            )
        )
        finetune_config = _finetune_config(tune, chosen, teacher)
        shared = None if part is None else {k: v.cpu() for k, v in part.teacher.to_state().items()}
        meetings.hand(_Start(shared, target, checkpointing))
        _same_adapter(meetings.world, model)

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
        )
        meetings.expect()  # the others wait for the report
        if isinstance(teacher, distillation.Staged):  # its later stages: the teacher's seconds
            outcome = replace(outcome, train_seconds=outcome.train_seconds - teacher.seconds)
        sink.update(adapter.name, record(stage="saving"))
        staging = claim.fresh_staging()
        model.save_pretrained(str(staging), save_embedding_layers=False)
        after_quality = quality.splits(model)
    finally:
        adapters.detach(model)
        if checkpointing:
            _recompute(bases.target, False)

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


def _recompute(model: nn.Module, on: bool) -> None:
    """Gradient checkpointing on or off (transformers' own; non-reentrant: the frozen
    embeddings need no input gradients for the LoRA layers to get theirs)."""
    pretrained: Any = model  # a transformers PreTrainedModel
    renamed = hasattr(pretrained, "activation_checkpointing_enable")  # transformers >= 5.x
    if on and renamed:
        pretrained.activation_checkpointing_enable({"use_reentrant": False})
    elif on:
        pretrained.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif renamed:
        pretrained.activation_checkpointing_disable()
    else:
        pretrained.gradient_checkpointing_disable()


def _terms(old: adapters.OldAdapter, bases: Bases, *, projection: str) -> fusion.Terms:
    """Per adapted module: the old update and the base evolution W_target - W_source (the
    source weight read from its files, one tensor at a time, in fp32); per saved parameter the
    same in full."""
    fan_in_fan_out = bool(old.config.fan_in_fan_out)
    terms = fusion.Terms(modules={})
    with torch.no_grad():
        for module, factors in old.factors.items():
            w_target = adapters.base_weight(bases.target, module, fan_in_fan_out=fan_in_fan_out)
            w_source = _source(bases, f"{module}.weight", w_target, transpose=fan_in_fan_out)
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


def _source(bases: Bases, name: str, target: torch.Tensor, *, transpose: bool) -> torch.Tensor:
    """The source base's parameter ``name`` (from its files, else from the model) as fp32 on the
    target's device, transposed like ``target`` (Conv1D); refused when the shapes differ."""
    stored = bases.source_files.get(name)
    for alias in _aliases(bases.target, target) if stored is None else []:
        stored = bases.source_files.get(alias)  # a tied weight: stored under its other name
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
    pointer = tensor.data_ptr()
    named = model.named_parameters(remove_duplicate=False)
    return [n for n, p in named if p.data_ptr() == pointer]


def _context(
    *,
    spec: AdapterMigrationSpec,
    model: PeftModel,
    old: adapters.OldAdapter,
    bases: Bases,
    quality: _Quality,
    tune: FinetuneConfig,
    journal: Path,
    study_name: str,
    on_trial: Callable[[int, int, float | None], None],
    ready_before: bool,
) -> strategies.Context:
    """What a strategy may use, the I/O behind it done here: the evolution read from the
    source's files, quality measured on the search's validation subset."""
    init = SearchConfig.of(spec.method.initialization)
    subset = quality.task.validation[: init.validation_samples]

    def look_ahead_steps() -> None:
        look_ahead(
            model,
            quality.encoder,
            quality.task.train,
            steps=init.lookahead_steps,
            learning_rate=tune.learning_rate,
            batch_size=tune.batch_size,
            seed=spec.method.seed,
            device=quality.device,
            micro=quality.micro,
        )

    return strategies.Context(
        model=model,
        old=old,
        layout=adapters.layout(model),
        device=bases.device,
        evolution=lambda projection: _terms(old, bases, projection=projection),
        measure=lambda with_accuracy: quality.on(model, subset, with_accuracy=with_accuracy),
        look_ahead=look_ahead_steps,
        metric=quality.metric,
        ready_before=ready_before,
        search=init,
        seed=spec.method.seed,
        journal=journal,
        study_name=study_name,
        on_trial=on_trial,
    )
