"""One adapter's inputs as a migration reads them (the old adapter, the task data, refused
before any model is loaded when they cannot be used), where its results go (the output folder,
its state, the work's fingerprint), its readiness target and its quality on the task's splits.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from relora_api.spec import Adapter, AdapterMigrationSpec, Readiness
from relora_trainer import adapter_config, adapters, ownership, report
from relora_trainer.data import MAX_CHOICES, Encoder, Example, TaskData, read_jsonl
from relora_trainer.distributed import World
from relora_trainer.errors import InvalidData
from relora_trainer.method.finetune import EVALUATION_BATCH, MicroBatch, Target, shared_quality
from relora_trainer.method.quality import Quality
from relora_trainer.storage import Storage

STATE_DIR = "state"
FINGERPRINT_FILE = "fingerprint"


def old_adapter(adapter: Adapter, storage: Storage, model: nn.Module) -> adapters.OldAdapter:
    where = f"spec.adapters[{adapter.name}].uri"
    old = adapters.read_adapter(storage.fetch(adapter.uri, what=where), what=where)
    adapters.check_fits(old, model, what=where)
    return old


fingerprint = ownership.fingerprint


def output_dir(spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage) -> Path:
    """The local folder an adapter's results are written to before publishing."""
    return storage.local_path(spec.output_uri(adapter.name), what="spec.output.uri")


def read_data(adapter: Adapter, storage: Storage) -> TaskData:
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
    task_data(spec, adapter, storage)
    where = f"spec.adapters[{adapter.name}].uri"
    adapter_config.check_folder(storage.fetch(adapter.uri, what=where), what=where)


def task_data(spec: AdapterMigrationSpec, adapter: Adapter, storage: Storage) -> TaskData:
    """The adapter's task data, refused when the method cannot use it."""
    task = read_data(adapter, storage)
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


class TaskQuality:
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
        self,
        model: nn.Module,
        examples: list[Example],
        *,
        with_accuracy: bool | None = None,
        world: World | None = None,
    ) -> Quality:
        """``model``'s quality on ``examples``; with data-parallel workers (``world``, every one
        of them calling this with the same examples and a replica of the same model), each
        scores its share and all get the quality of the whole."""
        chosen = self.scores_choices if with_accuracy is None else with_accuracy
        return shared_quality(
            model, self.encoder, examples, self.task.choices, self.device, self.micro, chosen, world
        )

    def splits(self, model: nn.Module, world: World | None = None) -> dict[str, Quality]:
        """Validation and (when given) test; ``world``: shared by the workers (see :meth:`on`)."""
        result = {"validation": self.on(model, self.task.validation, world=world)}
        if self.task.test is not None:
            result["test"] = self.on(model, self.task.test, world=world)
        return result
