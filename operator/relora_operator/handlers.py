"""Kopf wiring, nothing else: Kopf watches AdapterMigrations, relora_operator.reconciler
reconciles them.

- each migration event is handed to the reconciler, which keeps the body
  (relora_operator.migrations) and reconciles the migration (relora_operator.poker: one at a
  time per migration); the operator's Jobs and pods are watched by the reconciler itself
  (relora_operator.watching: the API server selects them by label) into its cache
  (relora_operator.cache);
- the operator writes only `status` (never `spec`), adds no finalizer (ownerReferences delete
  the Jobs), and keeps Kopf's own bookkeeping in annotations under relora.dev.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import kopf

from relora_api.resource import GROUP, PLURAL, VERSION
from relora_operator import metrics, seals
from relora_operator.kube import Kube
from relora_operator.reconciler import Operator
from relora_operator.settings import Settings

LOG = logging.getLogger("relora.operator")


class UnusedDiffBase(kopf.AnnotationsDiffBaseStorage):
    """Kopf builds every event's "essence" (a deep copy of the body) to find the changes that
    change-detecting handlers (on.create, on.update...) react to. This operator has none, only
    on.event handlers, so nothing reads it: built empty, it no longer costs a third of the
    operator's CPU. Stored nowhere either (Kopf stores a diffbase only after such handlers)."""

    def build(
        self, *, body: kopf.Body, extra_fields: Iterable[Any] | None = None
    ) -> kopf.BodyEssence:
        return kopf.BodyEssence()


@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere $KUBECONFIG, read now (not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def quiet_handler_logs() -> None:
    """Kopf logs each event handler's success at INFO: ten lines per migration saying nothing
    (the handlers only hand the event on), 99% of the log at scale. Keep Kopf's warnings
    and errors; with --verbose or --debug (the root logger at DEBUG) everything stays."""
    objects = logging.getLogger("kopf.objects")
    if objects.getEffectiveLevel() == logging.INFO:
        objects.setLevel(logging.WARNING)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = UnusedDiffBase(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    quiet_handler_logs()
    options = Settings.from_env()
    # Off: no list/watch of CRDs and namespaces, so a single-namespace install needs no
    # cluster-scoped RBAC (the chart's namespaced mode).
    settings.scanning.disabled = not options.cluster_scanning
    seal_key, given = seals.key_from_env()
    if not given:
        LOG.warning(
            "%s is not set: finished outcomes are signed with a key of this process only, so "
            "after a restart each is derived again (from its Job, or a new Job)",
            seals.KEY_ENV,
        )
    operator = Operator(options, Kube.connect(), seal_key)
    memo["relora"] = operator
    metrics.serve(options.metrics_port)
    memo["relist"] = asyncio.get_running_loop().create_task(operator.relist_periodically())


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("relist")
    if task is not None:
        task.cancel()
    operator: Operator | None = memo.get("relora")
    if operator is not None:
        operator.stop()


@kopf.on.probe(id="migrations")
def probe(memo: kopf.Memo, **_: Any) -> int:
    operator: Operator = memo["relora"]
    return len(operator.registry)


@kopf.on.event(GROUP, VERSION, PLURAL)
async def migration_changed(
    type: str | None, event: kopf.RawEvent, memo: kopf.Memo, **_: Any
) -> None:
    operator: Operator = memo["relora"]
    operator.migration_event(type, event["object"])
