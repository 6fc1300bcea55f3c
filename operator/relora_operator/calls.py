"""The threads that make the operator's API calls (the kubernetes client is synchronous), in
order of priority, then of arrival.

With one queue (asyncio.to_thread) a burst of new migrations had their Jobs' creations wait
behind the status writes and events of those created just before; here a Job's creation goes
first. Priorities are small integers, lower first (relora_operator.kube names them).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import queue
import threading
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")
WORKERS = 6  # as asyncio.to_thread's default on 2 cores: the API server is the bottleneck


class Calls:
    def __init__(self, workers: int = WORKERS) -> None:
        self.workers = workers
        self.queue: queue.PriorityQueue[tuple[int, int, Any]] = queue.PriorityQueue()
        self.order = itertools.count()
        self.threads: list[threading.Thread] = []

    async def run(self, priority: int, function: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """``function(*args, **kwargs)`` in a thread, after the calls of higher priority."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        call = functools.partial(function, *args, **kwargs)
        self.queue.put((priority, next(self.order), (loop, future, call)))
        if len(self.threads) < self.workers:
            thread = threading.Thread(target=self._work, name="relora-api", daemon=True)
            self.threads.append(thread)
            thread.start()
        return await future

    def _work(self) -> None:
        while True:
            _, _, (loop, future, call) = self.queue.get()
            try:
                result = call()
            except BaseException as error:  # handed to the caller
                _hand(loop, _fail, future, error)
            else:
                _hand(loop, _succeed, future, result)


def _hand(loop: asyncio.AbstractEventLoop, function: Callable[..., None], *args: Any) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
        loop.call_soon_threadsafe(function, *args)


def _succeed(future: asyncio.Future[Any], result: Any) -> None:
    if not future.done():
        future.set_result(result)


def _fail(future: asyncio.Future[Any], error: BaseException) -> None:
    if not future.done():
        future.set_exception(error)
