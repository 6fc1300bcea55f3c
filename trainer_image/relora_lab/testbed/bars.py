"""The build's progress on the product's :class:`~relora_trainer.progress.RichProgress`.

RichProgress draws bars for a migration's search and fine-tuning; the build needs one bar per
stage and notes between them, so this adds a generic bar on its Progress (the stage's name where
RichProgress puts the adapter's, in bold). ``console=None``: nothing is shown.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console

from relora_trainer.progress import RichProgress

Tick = Callable[[int, str], None]
"""Report a stage's progress: (steps done, detail text)."""


class StageBars:
    def __init__(self, console: Console | None) -> None:
        self.rich = RichProgress(console) if console is not None else None

    def __enter__(self) -> StageBars:
        if self.rich is not None:
            self.rich.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.rich is not None:
            self.rich.__exit__(*exc)

    @contextmanager
    def stage(self, name: str, what: str, total: int) -> Iterator[Tick]:
        """A bar for stage ``name`` doing ``what`` in ``total`` steps; full when the block ends."""
        if self.rich is None:
            yield lambda done, detail: None
            return
        bars = self.rich.bars
        bar = bars.add_task(what, total=total, adapter=name, detail="")
        yield lambda done, detail: bars.update(bar, completed=done, detail=detail)
        bars.update(bar, completed=total)

    def note(self, name: str, message: str) -> None:
        if self.rich is not None:
            self.rich.note(name, message)
