"""Watch the operator's Jobs and pods of one namespace: list, then watch from the list's
resourceVersion, list again after 410 Gone; in a thread each, events handed to the loop.

Why not Kopf: Kopf runs every event of every watched object through its per-object workers,
cause detection and handler invocation (about half a millisecond each); Jobs and pods are
seven of the ten events per migration, and the reconciler wants only their bodies. And Kopf
never says when it listed again (after 410 Gone) nor what was deleted meanwhile; here the list
replaces the namespace's part of the cache (relora_operator.cache), deletions included.

The calls are the operator's own (relora_operator.kube, with the rest of its RBAC): ``list``
and ``watch`` of jobs and pods with the label selector of the operator's objects.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.watch.watch import iter_resp_lines

LOG = logging.getLogger("relora.operator")
Obj = dict[str, Any]
Listed = Callable[[str, str, list[Obj], float], None]  # (plural, namespace, items, started)
Event = Callable[[str, str, Obj], None]  # (plural, type, object)


class Watcher:
    """One kind in one namespace, in a daemon thread until ``stop()``."""

    def __init__(
        self,
        *,
        plural: str,
        namespace: str,
        list_call: Callable[[str], tuple[list[Obj], str]],
        watch_call: Callable[[str, str], Any],
        loop: asyncio.AbstractEventLoop,
        on_list: Listed,
        on_event: Event,
    ) -> None:
        self.plural, self.namespace = plural, namespace
        self.list_call, self.watch_call = list_call, watch_call
        self.loop, self.on_list, self.on_event = loop, on_list, on_event
        self.stopped = threading.Event()
        self.response: Any = None
        self.thread = threading.Thread(
            target=self._run, name=f"watch-{plural}-{namespace}", daemon=True
        )

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.stopped.set()
        response = self.response
        if response is not None:
            with contextlib.suppress(Exception):  # already closed
                response.shutdown()  # the blocked read returns

    def _run(self) -> None:
        version: str | None = None
        failures = 0
        while not self.stopped.is_set():
            try:
                if version is None:
                    started = time.monotonic()
                    items, version = self.list_call(self.namespace)
                    self._hand(self.on_list, self.plural, self.namespace, items, started)
                version = self._follow(version)
                failures = 0
            except ApiException as error:
                if error.status == 410:
                    version = None
                    continue
                failures += 1
                LOG.warning("watching %s in %s: HTTP %s", self.plural, self.namespace, error.status)
            except Exception as error:
                if self.stopped.is_set():
                    return
                failures += 1
                LOG.warning(
                    "watching %s in %s: %s: %s",
                    self.plural,
                    self.namespace,
                    type(error).__name__,
                    error,
                )
            if failures:
                self.stopped.wait(min(2.0**failures / 2, 30.0))

    def _follow(self, version: str) -> str | None:
        """Watch from ``version`` until the server ends the stream; the version to go on from
        (None: list again, the history is gone)."""
        self.response = self.watch_call(self.namespace, version)
        try:
            for line in iter_resp_lines(self.response):
                if not line:
                    continue
                event = json.loads(line)
                kind, obj = event.get("type"), event.get("object") or {}
                if kind == "ERROR":
                    if obj.get("code") == 410:
                        return None
                    raise ApiException(status=obj.get("code", 500), reason=obj.get("message"))
                version = (obj.get("metadata") or {}).get("resourceVersion") or version
                if kind in ("ADDED", "MODIFIED", "DELETED"):
                    self._hand(self.on_event, self.plural, kind, obj)
        finally:
            response, self.response = self.response, None
            response.release_conn()
        return version

    def _hand(self, function: Callable[..., None], *args: Any) -> None:
        if not self.stopped.is_set():
            with contextlib.suppress(RuntimeError):  # the loop is closed: the operator stops
                self.loop.call_soon_threadsafe(function, *args)
