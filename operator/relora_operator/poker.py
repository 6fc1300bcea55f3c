"""Run the reconciliation of a key (a migration's uid) when poked, soon, or at a set time.

- ``poke(key)``: now; one run at a time per key, pokes during a run coalesced into one more run;
- ``soon(key)``: after ``delay`` seconds, pokes meanwhile folded into the same run (the watch
  events of a Job and its pods come in bursts: one reconciliation sees the whole burst);
- ``schedule(key, seconds)``: the one timer of a key, set again by each reconciliation from
  what its planner says (a pod's pre-running deadline, the next progress read), or cleared;
- ``forget(key)``: the key is gone: its timers are cancelled, nothing of it is kept.

Nothing here outlives its key: the dicts hold a key only while a run or a timer is pending.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable


class Poker:
    def __init__(self, work: Callable[[str], Awaitable[None]], *, delay: float = 0.5) -> None:
        self.work = work
        self.delay = delay
        self.running: set[str] = set()
        self.again: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.soon_handles: dict[str, asyncio.TimerHandle] = {}
        self.timers: dict[str, asyncio.TimerHandle] = {}

    def poke(self, key: str) -> None:
        handle = self.soon_handles.pop(key, None)
        if handle is not None:
            handle.cancel()
        if key in self.running:
            self.again.add(key)
            return
        self.running.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def soon(self, key: str) -> None:
        if key not in self.soon_handles:
            loop = asyncio.get_running_loop()
            self.soon_handles[key] = loop.call_later(self.delay, self.poke, key)

    def schedule(self, key: str, seconds: float | None) -> None:
        """Replace the key's timer: a run in ``seconds`` (None: no timer)."""
        handle = self.timers.pop(key, None)
        if handle is not None:
            handle.cancel()
        if seconds is not None:
            loop = asyncio.get_running_loop()
            self.timers[key] = loop.call_later(max(seconds, 0.0), self._fire, key)

    def due(self, key: str) -> float | None:
        """Seconds until the key's timer fires (None: no timer)."""
        handle = self.timers.get(key)
        if handle is None:
            return None
        return handle.when() - asyncio.get_running_loop().time()

    def forget(self, key: str) -> None:
        for handles in (self.soon_handles, self.timers):
            handle = handles.pop(key, None)
            if handle is not None:
                handle.cancel()
        self.again.discard(key)

    def _fire(self, key: str) -> None:
        self.timers.pop(key, None)
        self.poke(key)

    async def _run(self, key: str) -> None:
        try:
            while True:
                self.again.discard(key)
                await self.work(key)
                if key not in self.again:
                    return
        finally:
            self.running.discard(key)
