"""Progress reporting: one interface, several transports.

The trainer calls :meth:`ProgressSink.update` with an ``AdapterProgress`` (the same model the
operator writes into ``status.adapters[].progress``) and :meth:`ProgressSink.note` with a line
of text. The local CLI shows rich progress bars; the Job runtime plugs in its own sink.
"""

from __future__ import annotations

import json
import sys
from typing import IO, Protocol

from rich.console import Console
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TaskID,
    TextColumn,
    TimeElapsedColumn,
)

from relora_api.status import AdapterProgress


class ProgressSink(Protocol):
    def update(self, adapter: str, progress: AdapterProgress) -> None: ...

    def note(self, adapter: str, message: str) -> None: ...


class NullProgress:
    """Reports nothing."""

    def update(self, adapter: str, progress: AdapterProgress) -> None:
        return None

    def note(self, adapter: str, message: str) -> None:
        return None


class JsonLinesProgress:
    """One JSON object per event on a stream: for logs and machine consumers."""

    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout

    def update(self, adapter: str, progress: AdapterProgress) -> None:
        record = {"adapter": adapter, "event": "progress", **progress.to_wire()}
        self.stream.write(json.dumps(record) + "\n")
        self.stream.flush()

    def note(self, adapter: str, message: str) -> None:
        self.stream.write(json.dumps({"adapter": adapter, "event": "note", "message": message}))
        self.stream.write("\n")
        self.stream.flush()


class RichProgress:
    """Progress bars for the terminal: search trials, then fine-tuning steps with quality."""

    def __init__(self, console: Console | None = None) -> None:
        self.console = console or Console(stderr=True)
        self.bars = Progress(
            TextColumn("[bold]{task.fields[adapter]}[/bold] {task.description}"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("{task.fields[detail]}"),
            TimeElapsedColumn(),
            console=self.console,
            transient=False,
        )
        self._tasks: dict[tuple[str, str], TaskID] = {}

    def __enter__(self) -> RichProgress:
        self.bars.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.bars.stop()

    def _task(self, adapter: str, stage: str, total: int | None) -> TaskID:
        key = (adapter, stage)
        if key not in self._tasks:
            label = {"search": "search trials", "finetune": "fine-tuning steps"}.get(stage, stage)
            self._tasks[key] = self.bars.add_task(label, total=total, adapter=adapter, detail="")
        return self._tasks[key]

    def update(self, adapter: str, progress: AdapterProgress) -> None:
        detail = ""
        if progress.quality is not None and progress.target is not None:
            detail = f"quality {progress.quality:.4f} (target {progress.target:.4f})"
        if progress.stage == "search" and progress.trials:
            task = self._task(adapter, "search", progress.trials)
            self.bars.update(task, completed=progress.trial or 0, detail=detail)
        elif progress.stage == "finetune" and progress.max_steps is not None:
            task = self._task(adapter, "finetune", progress.max_steps)
            self.bars.update(task, completed=progress.step or 0, detail=detail)

    def note(self, adapter: str, message: str) -> None:
        self.bars.console.print(f"[bold]{adapter}[/bold] {message}")
