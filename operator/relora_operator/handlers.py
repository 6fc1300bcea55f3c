"""Kopf handlers: thin. Kopf watches and indexes; `reconcile` applies `observe.observe`.

- indexes: AdapterMigrations by uid, their Jobs by migration uid, the Jobs' pods by Job name;
- every event on one of them pokes the owning migration's reconciliation (coalesced, one at a
  time per migration), and a periodic resync pokes unfinished ones (progress, deadlines);
- the operator writes only `status` (never `spec`), adds no finalizer (ownerReferences delete
  the Jobs), and keeps Kopf's own bookkeeping in annotations under relora.dev.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError

from relora_operator import contract, job_builder, metrics, naming, observe
from relora_operator.api.resource import GROUP, PLURAL, VERSION
from relora_operator.api.spec import AdapterMigrationSpec
from relora_operator.api.status import AdapterProgress
from relora_operator.kube import Kube
from relora_operator.settings import Settings

LOG = logging.getLogger("relora.operator")
Obj = dict[str, Any]
MANAGED = {naming.MANAGED_BY: naming.OPERATOR}


class Poker:
    """Runs ``work(key)`` for poked keys: one run at a time per key, pokes coalesced."""

    def __init__(self, work: Callable[[str], Awaitable[None]]) -> None:
        self.work = work
        self.running: set[str] = set()
        self.again: set[str] = set()
        self.tasks: set[asyncio.Task[None]] = set()

    def poke(self, key: str) -> None:
        if key in self.running:
            self.again.add(key)
            return
        self.running.add(key)
        task = asyncio.get_running_loop().create_task(self._run(key))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _run(self, key: str) -> None:
        try:
            while True:
                self.again.discard(key)
                await self.work(key)
                if key not in self.again:
                    return
        finally:
            self.running.discard(key)


class Operator:
    """What the handlers share: settings, the API client, the indexes and the poker."""

    def __init__(self, settings: Settings, kube: Kube) -> None:
        self.settings = settings
        self.kube = kube
        self.poker = Poker(self.reconcile)
        self.indexes: dict[str, Any] = {}
        self.log_checked: dict[str, float] = {}
        self.progress: dict[tuple[str, str], AdapterProgress] = {}

    def remember(self, kwargs: dict[str, Any]) -> None:
        for name in ("migrations_by_uid", "jobs_by_migration", "pods_by_job"):
            if name in kwargs:
                self.indexes[name] = kwargs[name]

    def _values(self, index: str, key: str) -> list[dict[str, Any]]:
        store = self.indexes.get(index)
        if store is None or key not in store:
            return []
        return [dict(v) for v in store[key]]

    async def reconcile(self, uid: str) -> None:
        found = self._values("migrations_by_uid", uid)
        if not found:
            return  # deleted: ownerReferences take the Jobs away
        body = found[0]
        metrics.RECONCILES.inc()
        started = time.perf_counter()
        try:
            await self._reconcile(body)
        except ApiException as error:
            metrics.RECONCILE_ERRORS.labels(error=f"http{error.status}").inc()
            LOG.warning("reconcile of %s failed: HTTP %s", body["metadata"]["name"], error.status)
        except Exception as error:  # keep the operator running, say why
            metrics.RECONCILE_ERRORS.labels(error=type(error).__name__).inc()
            LOG.exception("reconcile of %s failed", body["metadata"]["name"])
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    async def _reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        status = dict(body.get("status") or {})
        if meta.get("deletionTimestamp"):
            return
        try:
            spec = AdapterMigrationSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            await self._invalid(body, error)
            return
        jobs = self._values("jobs_by_migration", uid)
        pods = {
            job["metadata"]["name"]: self._values("pods_by_job", job["metadata"]["name"])
            for job in jobs
        }
        progress = await self._progress(namespace, uid, jobs, pods)
        migration = observe.Migration(name, namespace, uid, meta.get("generation", 1), spec, status)
        now = datetime.datetime.now(datetime.UTC)
        new_status, actions = observe.observe(migration, jobs, pods, progress, now)
        for adapter in actions.create:
            job = job_builder.build_job(
                name=name,
                namespace=namespace,
                uid=uid,
                spec=spec,
                adapter=adapter,
                settings=self.settings,
            )
            if await self.kube.create_job(namespace, job):
                metrics.JOBS_CREATED.inc()
        for job_name, suspend in actions.suspend:
            await self.kube.patch_job(namespace, job_name, {"spec": {"suspend": suspend}})
        for job_name, reason, message in actions.fail:
            patch = {
                "metadata": {"annotations": {naming.FAILURE: f"{reason}: {message}"}},
                "spec": {"suspend": True},
            }
            await self.kube.patch_job(namespace, job_name, patch)
        for job_name, seconds in actions.ttl:
            ttl = {"spec": {"ttlSecondsAfterFinished": seconds}}
            await self.kube.patch_job(namespace, job_name, ttl)
        if new_status != status:
            await self.kube.patch_status(namespace, name, new_status)
            metrics.record_transitions(status, new_status)
            self._observe_queue_wait(jobs, pods)
        for kind, reason, message in actions.events:
            await self.kube.event(namespace, name, uid, kind, reason, message)
        self._count_phases()

    async def _invalid(self, body: dict[str, Any], error: ValidationError) -> None:
        """A spec the schema let through but the models refuse: Failed, with the field."""
        meta = body["metadata"]
        problems = "; ".join(
            f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in error.errors()
        )
        condition = {
            "status": "True",
            "reason": "InvalidSpec",
            "message": problems[:4096],
            "observedGeneration": meta.get("generation", 1),
            "lastTransitionTime": observe.stamp(datetime.datetime.now(datetime.UTC)),
        }
        status = {
            "observedGeneration": meta.get("generation", 1),
            "phase": "Failed",
            "conditions": [
                {**condition, "type": "Ready", "status": "False"},
                {**condition, "type": "Failed"},
                {**condition, "type": "Stalled"},
            ],
        }
        old = body.get("status") or {}
        if {k: v for k, v in old.items() if k != "conditions"} != {
            k: v for k, v in status.items() if k != "conditions"
        } or [c.get("message") for c in old.get("conditions", [])] != [
            c["message"] for c in status["conditions"]
        ]:
            await self.kube.patch_status(meta["namespace"], meta["name"], status)
            await self.kube.event(
                meta["namespace"], meta["name"], meta["uid"], "Warning", "InvalidSpec", problems
            )

    async def _progress(
        self, namespace: str, uid: str, jobs: list[Obj], pods: dict[str, list[Obj]]
    ) -> dict[str, AdapterProgress]:
        """Live progress from the tail of each running trainer pod's log (rate limited)."""
        result = {}
        for adapter, pod in observe.running_pods(jobs, pods).items():
            key = (uid, adapter)
            due = self.log_checked.get(pod, 0.0) + self.settings.resync_seconds / 2
            if time.monotonic() >= due:
                self.log_checked[pod] = time.monotonic()
                text = await self.kube.pod_log_tail(namespace, pod, self.settings.log_tail_lines)
                found = contract.last_progress(text)
                if found is not None:
                    self.progress[key] = found
            if key in self.progress:
                result[adapter] = self.progress[key]
        return result

    def _observe_queue_wait(self, jobs: list[Obj], pods: dict[str, list[Obj]]) -> None:
        for job in jobs:
            first = min(
                pods.get(job["metadata"]["name"], []),
                key=lambda p: p["metadata"].get("creationTimestamp", ""),
                default=None,
            )
            started = (first or {}).get("status", {}).get("startTime")
            key = f"queue:{job['metadata']['uid']}"
            if started and key not in self.log_checked:
                self.log_checked[key] = 0.0
                created = observe._parse(job["metadata"].get("creationTimestamp"))
                begun = observe._parse(started)
                if created and begun:
                    metrics.QUEUE_WAIT.observe(max((begun - created).total_seconds(), 0.0))

    def _count_phases(self) -> None:
        counts: dict[str, int] = {}
        store = self.indexes.get("migrations_by_uid") or {}
        for key in list(store):
            for body in store[key]:
                for adapter in (body.get("status") or {}).get("adapters") or []:
                    counts[adapter["phase"]] = counts.get(adapter["phase"], 0) + 1
        metrics.set_phases(counts)

    async def resync(self) -> None:
        """Poke every unfinished migration now and then (progress, pre-running deadlines)."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            store = self.indexes.get("migrations_by_uid") or {}
            for uid in list(store):
                bodies = list(store[uid])
                phase = (bodies[0].get("status") or {}).get("phase") if bodies else None
                if bodies and phase not in observe.FINAL:
                    self.poker.poke(uid)


# ---------------------------------------------------------------------- Kopf wiring
@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere $KUBECONFIG, read now (not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


@kopf.on.startup()
async def startup(settings: kopf.OperatorSettings, memo: kopf.Memo, **_: Any) -> None:
    settings.persistence.progress_storage = kopf.AnnotationsProgressStorage(prefix=GROUP)
    settings.persistence.diffbase_storage = kopf.AnnotationsDiffBaseStorage(
        prefix=GROUP, key="last-handled-configuration"
    )
    settings.persistence.finalizer = f"{GROUP}/finalizer"
    settings.posting.level = logging.WARNING
    settings.watching.server_timeout = 300
    settings.watching.client_timeout = 330
    settings.watching.connect_timeout = 30
    options = Settings.from_env()
    operator = Operator(options, Kube.connect())
    memo["relora"] = operator
    metrics.serve(options.metrics_port)
    memo["resync"] = asyncio.get_running_loop().create_task(operator.resync())


@kopf.on.cleanup()
async def cleanup(memo: kopf.Memo, **_: Any) -> None:
    task = memo.get("resync")
    if task is not None:
        task.cancel()


@kopf.on.probe(id="migrations")
def probe(memo: kopf.Memo, **_: Any) -> int:
    operator: Operator = memo["relora"]
    return len(operator.indexes.get("migrations_by_uid") or [])


@kopf.index(GROUP, VERSION, PLURAL)
def migrations_by_uid(uid: str, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {
        uid: {"metadata": dict(body.metadata), "spec": dict(body.spec), "status": dict(body.status)}
    }


@kopf.index("batch", "v1", "jobs", labels=MANAGED)
def jobs_by_migration(labels: kopf.Labels, body: kopf.Body, **_: Any) -> dict[str, Any]:
    return {labels[naming.MIGRATION_UID]: dict(body)}


@kopf.index("", "v1", "pods", labels=MANAGED)
def pods_by_job(body: kopf.Body, **_: Any) -> dict[str, Any]:
    references = body.metadata.get("ownerReferences") or []
    owners = [r["name"] for r in references if r.get("kind") == "Job"]
    return {owners[0]: dict(body)} if owners else {}


@kopf.on.event(GROUP, VERSION, PLURAL)
async def migration_changed(uid: str, memo: kopf.Memo, **kwargs: Any) -> None:
    operator: Operator = memo["relora"]
    operator.remember(kwargs)
    operator.poker.poke(uid)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_changed(labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    operator: Operator = memo["relora"]
    operator.remember(kwargs)
    operator.poker.poke(labels[naming.MIGRATION_UID])


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def pod_changed(labels: kopf.Labels, memo: kopf.Memo, **kwargs: Any) -> None:
    operator: Operator = memo["relora"]
    operator.remember(kwargs)
    uid = labels.get(naming.MIGRATION_UID)
    if uid:
        operator.poker.poke(uid)
