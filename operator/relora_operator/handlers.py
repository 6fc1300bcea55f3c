"""Kopf handlers: thin. Kopf watches and indexes; `reconcile` applies `observe.observe`.

- an index of AdapterMigrations by uid; watches of their Jobs and the Jobs' pods;
- every event on one of them pokes the owning migration's reconciliation (coalesced, one at a
  time per migration), and a periodic resync pokes unfinished ones (progress, deadlines);
- a reconciliation reads the migration, its Jobs and their pods from the API, not from Kopf's
  caches: after a watch outage (410 Gone) Kopf lists again but is never told what was deleted
  meanwhile, and its copy of the status can lag behind the operator's own last write;
- the operator writes only `status` (never `spec`), adds no finalizer (ownerReferences delete
  the Jobs), and keeps Kopf's own bookkeeping in annotations under relora.dev.
"""

from __future__ import annotations

import asyncio
import datetime
import hashlib
import json
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf
from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from relora_api import contract, times, validation
from relora_api.resource import GROUP, PLURAL, VERSION
from relora_api.spec import Adapter, AdapterMigrationSpec
from relora_api.status import MAX_MESSAGE, AdapterProgress
from relora_operator import job_builder, metrics, naming, observe, seals
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

    def __init__(self, settings: Settings, kube: Kube, seal_key: bytes) -> None:
        self.settings = settings
        self.kube = kube
        self.seal_key = seal_key
        self.poker = Poker(self.reconcile)
        self.indexes: dict[str, Any] = {}
        self.log_checked: dict[str, float] = {}
        self.progress: dict[tuple[str, str], AdapterProgress] = {}
        # Migrations found deleted although Kopf's index still holds them (deleted during a
        # watch outage: no DELETED event ever comes). A uid is never reused.
        self.gone: set[str] = set()
        self.unsent: dict[str, list[tuple[str, str, str]]] = {}  # uid -> events to post
        self.written: dict[str, str] = {}  # uid -> digest of the status last written
        self.phases: dict[str, Counter[str]] = {}  # uid -> its adapters by phase
        self.phase_totals: Counter[str] = Counter()  # the sum of those: relora_adapters

    def remember(self, kwargs: dict[str, Any]) -> None:
        if "migrations_by_uid" in kwargs:
            self.indexes["migrations_by_uid"] = kwargs["migrations_by_uid"]

    def _values(self, index: str, key: str) -> list[dict[str, Any]]:
        store = self.indexes.get(index)
        if store is None or key not in store:
            return []
        return [dict(v) for v in store[key]]

    async def reconcile(self, uid: str) -> None:
        found = self._values("migrations_by_uid", uid)
        if not found or uid in self.gone:
            self.written.pop(uid, None)
            self._count_phases(uid, None)
            return  # deleted: ownerReferences take the Jobs away
        name, namespace = found[0]["metadata"]["name"], found[0]["metadata"]["namespace"]
        metrics.RECONCILES.inc()
        started = time.perf_counter()
        try:
            body = await self.kube.find_migration(namespace, name)
            if body is None or body["metadata"].get("uid") != uid:
                LOG.info("%s/%s (uid %s) is gone: no more reconciling", namespace, name, uid)
                self._forget(uid)
                return
            await self._reconcile(body)
        except ApiException as error:
            metrics.RECONCILE_ERRORS.labels(error=f"http{error.status}").inc()
            LOG.warning("reconcile of %s failed: HTTP %s", name, error.status)
        except HTTPError as error:  # API server unreachable: the next poke or resync retries
            metrics.RECONCILE_ERRORS.labels(error="connection").inc()
            LOG.warning("reconcile of %s failed: %s", name, type(error).__name__)
        except Exception as error:  # keep the operator running, say why
            metrics.RECONCILE_ERRORS.labels(error=type(error).__name__).inc()
            LOG.exception("reconcile of %s failed", name)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    def own_write(self, uid: str, body: Mapping[str, Any]) -> bool:
        """Whether ``body`` is the migration as the operator's own last status write left it
        (same status, spec unchanged since): reconciling it again would find nothing to do.
        While trainers run, each progress update is a write, and these echoes were a third of
        all reconciliations."""
        written = self.written.get(uid)
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        return (
            written is not None
            and not meta.get("deletionTimestamp")
            and status.get("observedGeneration") == meta.get("generation")
            and _digest(status) == written
        )

    def _forget(self, uid: str) -> None:
        """A migration deleted behind Kopf's back: stop reconciling it, drop what is kept."""
        self.gone.add(uid)
        self.unsent.pop(uid, None)
        self.written.pop(uid, None)
        self._count_phases(uid, None)
        for key in [k for k in self.progress if k[0] == uid]:
            del self.progress[key]

    async def _reconcile(self, body: dict[str, Any]) -> None:
        meta = body["metadata"]
        name, namespace, uid = meta["name"], meta["namespace"], meta["uid"]
        status = dict(body.get("status") or {})
        if meta.get("deletionTimestamp"):
            self.unsent.pop(uid, None)
            return
        await self._send_events(namespace, name, uid)  # left over from a failed reconciliation
        try:
            spec = AdapterMigrationSpec.model_validate(body.get("spec") or {})
        except ValidationError as error:
            await self._invalid(body, error)
            self._count_phases(uid, {})  # an invalid spec has no adapters
            return
        selector = f"{naming.MANAGED_BY}={naming.OPERATOR},{naming.MIGRATION_UID}={uid}"
        jobs = await self.kube.list_jobs(namespace, selector)
        pods, strays = _pods_by_job(jobs, await self.kube.list_pods(namespace, selector))
        progress = await self._progress(namespace, uid, jobs, pods)
        migration = observe.Migration(
            name, namespace, uid, meta.get("generation", 1), spec, status, self.seal_key
        )
        now = datetime.datetime.now(datetime.UTC)
        wanted = {
            adapter.name: self._job(name, namespace, uid, spec, adapter)
            for adapter in spec.adapters
        }
        templates = {a: job_builder.template_hash(j["spec"]["template"]) for a, j in wanted.items()}
        new_status, actions = observe.observe(
            migration, jobs, pods, progress, now, strays, templates
        )
        for adapter in actions.create:
            if await self.kube.create_job(namespace, wanted[adapter.name]):
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
            self.written[uid] = _digest(new_status)
            await self.kube.patch_status(namespace, name, new_status)
            metrics.record_transitions(status, new_status)
            self._observe_queue_wait(jobs, pods)
        self.unsent.setdefault(uid, []).extend(actions.events)
        await self._send_events(namespace, name, uid)
        self._count_phases(uid, new_status)

    async def _send_events(self, namespace: str, name: str, uid: str) -> None:
        """Post the events of written transitions. One that cannot be sent (API server
        unreachable) waits for the next reconciliation instead of being lost: the status that
        caused it is already written, so it would not be derived again."""
        queue = self.unsent.get(uid) or []
        while queue:
            kind, reason, message = queue[0]
            await self.kube.event(namespace, name, uid, kind, reason, message)
            queue.pop(0)
        self.unsent.pop(uid, None)

    def _job(
        self, name: str, namespace: str, uid: str, spec: AdapterMigrationSpec, adapter: Adapter
    ) -> Obj:
        return job_builder.build_job(
            name=name,
            namespace=namespace,
            uid=uid,
            spec=spec,
            adapter=adapter,
            settings=self.settings,
        )

    async def _invalid(self, body: dict[str, Any], error: ValidationError) -> None:
        """A spec the schema let through but the models refuse: Failed, with the field."""
        meta = body["metadata"]
        found = validation.explain(error, AdapterMigrationSpec, document=body.get("spec"))
        problems = "; ".join(str(problem) for problem in found)[:MAX_MESSAGE]
        condition = {
            "status": "True",
            "reason": "InvalidSpec",
            "message": problems,
            "observedGeneration": meta.get("generation", 1),
            "lastTransitionTime": times.stamp(times.now()),
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
                created = times.parse(job["metadata"].get("creationTimestamp"))
                begun = times.parse(started)
                if created and begun:
                    metrics.QUEUE_WAIT.observe(max((begun - created).total_seconds(), 0.0))

    def _count_phases(self, uid: str, status: Obj | None) -> None:
        """Update relora_adapters with one migration's adapters (None: it is gone). Kept per
        migration: recounting every migration after each reconciliation was quadratic."""
        counts = Counter(a["phase"] for a in (status or {}).get("adapters") or [])
        self.phase_totals.subtract(self.phases.pop(uid, Counter()))
        if status is not None:
            self.phases[uid] = counts
            self.phase_totals.update(counts)
        metrics.set_phases(self.phase_totals)

    async def resync(self) -> None:
        """Poke every unfinished migration now and then (progress, pre-running deadlines)."""
        while True:
            await asyncio.sleep(self.settings.resync_seconds)
            store = self.indexes.get("migrations_by_uid") or {}
            for uid in list(store):
                if uid in self.gone:
                    continue
                bodies = list(store[uid])
                phase = (bodies[0].get("status") or {}).get("phase") if bodies else None
                if bodies and (phase not in observe.FINAL or self.unsent.get(uid)):
                    self.poker.poke(uid)


def _digest(status: Mapping[str, Any]) -> str:
    text = json.dumps(status, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def _pods_by_job(jobs: list[Obj], pods: list[Obj]) -> tuple[dict[str, list[Obj]], list[Obj]]:
    """Job name -> its pods, matched by the Job's uid (a Job deleted and created again under
    the same name does not inherit the pods of the old one); and the pods of no current Job."""
    uids = {job["metadata"]["uid"] for job in jobs}
    owned: dict[str, list[Obj]] = {}
    strays = []
    for pod in pods:
        owner = next(
            (
                r.get("uid", "")
                for r in pod["metadata"].get("ownerReferences") or []
                if r.get("kind") == "Job" and r.get("controller")
            ),
            None,
        )
        if owner is not None and owner in uids:
            owned.setdefault(str(owner), []).append(pod)
        else:
            strays.append(pod)
    found = {job["metadata"]["name"]: owned.get(job["metadata"]["uid"], []) for job in jobs}
    return found, strays


# ---------------------------------------------------------------------- Kopf wiring
@kopf.on.login()
def login(**kwargs: Any) -> kopf.ConnectionInfo | None:
    """In a pod: its service account; elsewhere $KUBECONFIG, read now (not at import time)."""
    return kopf.login_with_service_account(**kwargs) or kopf.login_with_kubeconfig(**kwargs)


def quiet_handler_logs() -> None:
    """Kopf logs each event handler's success at INFO: ten lines per migration saying nothing
    (the handlers only poke a reconciliation), 99% of the log at scale. Keep Kopf's warnings
    and errors; with --verbose or --debug (the root logger at DEBUG) everything stays."""
    objects = logging.getLogger("kopf.objects")
    if objects.getEffectiveLevel() == logging.INFO:
        objects.setLevel(logging.WARNING)


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


@kopf.on.event(GROUP, VERSION, PLURAL)
async def migration_changed(
    uid: str, type: str | None, body: kopf.Body, memo: kopf.Memo, **kwargs: Any
) -> None:
    operator: Operator = memo["relora"]
    operator.remember(kwargs)
    if type == "MODIFIED" and operator.own_write(uid, body):
        return
    operator.poker.poke(uid)


@kopf.on.event("batch", "v1", "jobs", labels=MANAGED)
async def job_changed(labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo["relora"]
    uid = labels.get(naming.MIGRATION_UID)
    if uid:
        operator.poker.poke(uid)


@kopf.on.event("", "v1", "pods", labels=MANAGED)
async def pod_changed(labels: kopf.Labels, memo: kopf.Memo, **_: Any) -> None:
    operator: Operator = memo["relora"]
    uid = labels.get(naming.MIGRATION_UID)
    if uid:
        operator.poker.poke(uid)
