"""Progress reporting: the interface the Job runtime will plug into."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import torch

from relora_api.resource import AdapterMigration
from relora_api.status import AdapterProgress
from relora_trainer import loading, migrate
from relora_trainer.progress import JsonLinesProgress
from relora_trainer.storage import Storage
from tests.conftest import toy_manifest


class Recorder:
    def __init__(self) -> None:
        self.updates: list[AdapterProgress] = []
        self.notes: list[str] = []

    def update(self, adapter: str, progress: AdapterProgress) -> None:
        assert adapter == "toy-category"
        self.updates.append(progress)

    def note(self, adapter: str, message: str) -> None:
        self.notes.append(message)


def test_a_migration_reports_trials_steps_and_quality(toy: Any, tmp_path: Path) -> None:
    spec = AdapterMigration.from_manifest(toy_manifest(toy)).spec
    storage = Storage(base_dir=tmp_path)
    bases = loading.load_bases(spec, storage, torch.device("cpu"))
    recorder = Recorder()
    migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage, progress=recorder
    )
    stages = [u.stage for u in recorder.updates]
    assert stages[0] == "evaluate" and stages[-1] == "saving"
    trials = [(u.trial, u.trials) for u in recorder.updates if u.stage == "search"]
    assert trials == [(k, 6) for k in range(1, 7)]
    steps = [u for u in recorder.updates if u.stage == "finetune"]
    assert steps[0].step == 0 and steps[0].quality is not None
    assert all(u.target is not None and u.max_steps == 60 for u in steps)
    last = steps[-1].step
    assert last is not None and [u.step for u in steps] == list(range(last + 1))
    # The memory plan rides on every record, from the first (before any weight is trained),
    # and it is the report's too.
    planned = {u.planned_peak_gib for u in recorder.updates}
    (peak,) = planned
    assert peak is not None and peak > 0
    report = json.loads((tmp_path / "output/toy-category/report.json").read_text())
    assert report["planned_peak_gib"] in planned


def test_the_operator_reads_the_plan_from_the_trainers_log() -> None:
    """A trainer's JSON line -> the operator's parser -> the status: plannedPeakGiB."""
    from relora_api import contract

    stream = io.StringIO()
    JsonLinesProgress(stream).update(
        "a", AdapterProgress(stage="finetune", step=3, max_steps=9, planned_peak_gib=17.25)
    )
    found = contract.last_progress("starting\n" + stream.getvalue())
    assert found is not None
    assert found.to_wire() == {
        "stage": "finetune",
        "step": 3,
        "maxSteps": 9,
        "plannedPeakGiB": 17.25,
    }


def test_json_lines_progress() -> None:
    stream = io.StringIO()
    sink = JsonLinesProgress(stream)
    sink.update("a", AdapterProgress(stage="search", trial=2, trials=8))
    sink.note("a", "hello")
    first, second = (json.loads(line) for line in stream.getvalue().splitlines())
    assert first == {
        "adapter": "a",
        "event": "progress",
        "stage": "search",
        "trial": 2,
        "trials": 8,
    }
    assert second == {"adapter": "a", "event": "note", "message": "hello"}
