"""The bases of a migration, loaded once for all its adapters: the source phase (the old
adapters measured on the source base, then freed; the measurement kept in each adapter's
state for a retried pod), then the target base; one base resident at a time."""

from __future__ import annotations

import gc
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from transformers import PreTrainedTokenizerBase

from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_trainer import adapters, models, ownership, plan, teaching
from relora_trainer.data import Encoder
from relora_trainer.distributed import World
from relora_trainer.errors import IncompatibleModels, MissingInput
from relora_trainer.inputs import (
    STATE_DIR,
    TaskQuality,
    fingerprint,
    old_adapter,
    output_dir,
    read_data,
)
from relora_trainer.method.finetune import MicroBatch
from relora_trainer.method.quality import Quality
from relora_trainer.storage import Storage

REFERENCE_FILE = "reference.json"
"""The source phase's measurement, in the state folder: a retried pod need not load the old base."""


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
    # The workers the bases are sharded across (None: whole on this worker).
    in_step: World | None = None

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
            if self.in_step is not None:
                raise IncompatibleModels(
                    "the models' files name a weight otherwise than the model does (or an "
                    "adapter was not measured in the source phase), and a sharded base "
                    "(spec.distributed.shardBase) cannot load sourceModel a second time beside "
                    "the target: leave shardBase false for these models"
                )
            if self.source_dir is None:
                raise RuntimeError("the source base was not fetched by this worker")
            self._source = models.load_model(
                self.source_dir, what="spec.sourceModel", device=self.device, dtype=self.dtype
            )
        return self._source


def reference_key(adapter: Adapter) -> str:
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
    (rank 0 checks that the two agree; a failure there ends them too); on a sharded base
    (:attr:`World.in_step`) every worker loads its shard of both and measures with rank 0."""
    measuring = world is None or world.is_main
    in_step = world if world is not None and world.in_step else None
    if in_step is not None:
        MicroBatch.halves = False  # a smaller batch on one worker alone breaks the step
    try:
        return _load_bases(
            spec,
            storage,
            device,
            adapters_to_measure,
            source_phase=measuring or in_step is not None,
            in_step=in_step,
        )
    except (torch.OutOfMemoryError, MemoryError) as error:
        free(device)
        first = (adapters_to_measure or spec.adapters)[0]
        raise plan.out_of_memory(error, spec, first, storage, device.type) from error


def _load_bases(
    spec: AdapterMigrationSpec,
    storage: Storage,
    device: torch.device,
    adapters_to_measure: list[Adapter] | None,
    *,
    source_phase: bool = True,
    in_step: World | None = None,
) -> Bases:
    """Fetch the bases; measure the old adapters that need it on the source base, free it, then
    load the target. (A teacher is computed later, only for an adapter that is not ready on the
    target base as it is: see :func:`relora_trainer.teaching.first_part`.)
    Raise IncompatibleModels / InvalidWeights / MissingInput / InvalidAdapter.

    ``adapters_to_measure`` (default: every adapter of the spec) are measured on the source now;
    another one measured later loads the source base again. Without ``source_phase`` (a worker
    other than rank 0): none is (nor any saved measurement read), and the source base is neither
    fetched (unless the target has no tokenizer: the source's) nor checked against the target.
    ``in_step``: the workers of a sharded base, every one with ``source_phase``: each loads its
    shard of the bases, and all measure on the source base together what rank 0 decided to."""
    started = time.perf_counter()

    def load(folder: Path, what: str) -> nn.Module:
        if in_step is not None:
            return models.load_sharded(folder, what=what, device=device, dtype=dtype, world=in_step)
        return models.load_model(folder, what=what, device=device, dtype=dtype)

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
            on_source[reference_key(adapter)] = saved
        else:
            wanted.append(adapter)
    if in_step is not None:  # rank 0's reading of the saved measurements, the same everywhere
        on_source, names = in_step.broadcast((on_source, [a.name for a in wanted]))
        wanted = [a for a in (adapters_to_measure or spec.adapters) if a.name in names]
    source_seconds = 0.0
    if wanted and source_dir is not None:  # else the source base is not loaded at all
        source = load(source_dir, "spec.sourceModel")
        models.check_finite(source, what="spec.sourceModel")
        shape = models.Shape.of(source)  # all of its weights, not only the stored ones
        measuring = time.perf_counter()
        for adapter in wanted:
            key = reference_key(adapter)
            if key in on_source:  # measured for an adapter with the same inputs
                continue
            old, task = old_adapter(adapter, storage, source), read_data(adapter, storage)
            on_old = adapters.attach_old(source, old)
            on_source[key] = TaskQuality(Encoder(tokenizer), task, device).splits(on_old)
            adapters.detach(on_old)
            del on_old
        source_seconds = time.perf_counter() - measuring
        del source  # one base resident at a time
        free(device)
    target = load(target_dir, "spec.targetModel")
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
        in_step=in_step,
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


def save_reference(state: Path, key: str, quality: dict[str, Quality]) -> None:
    fields = {split: asdict(q) for split, q in quality.items()}
    saved = json.dumps({"fingerprint": key, "quality": fields}).encode()
    ownership.write_atomic(state / REFERENCE_FILE, saved)


def free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
