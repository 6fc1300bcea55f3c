"""Reconcile AdapterMigrations from what the watches brought: planner.plan, then act.

- The migration's body comes from its watch event (Kopf's; or a list, or the answer to the
  operator's own status write: relora_operator.migrations); its Jobs and pods from the cache
  (relora_operator.cache) that the operator's own watches of them fill
  (relora_operator.watching: listed first, and again after 410 Gone, deletions included). A
  reconciliation in steady state asks the API server for nothing; the first one of a
  namespace waits until its Jobs and pods were listed.
- A namespace is also listed (migrations, Jobs, pods) after a watch restart: Kopf's of the
  migrations (Kopf lists again after 410 Gone; its listing events have no type, and it never
  says what was deleted meanwhile) or one of its own; when a running pod's log is gone; and
  every ``relist_seconds``.
- Before a Job is made again for an adapter that had one, the migration is read once more: a
  migration deleted during a watch outage is let go instead of getting a Job.
- Time: each reconciliation sets the migration's one timer from the planner's
  ``requeue_after`` (a blocked pod's deadline, the next progress read while a trainer runs);
  Pending, Queued, Suspended and finished migrations have none. A failed reconciliation is
  retried with backoff.
- A Job says which generation of the spec it was made of: only a Job of another generation
  needs the pod template's hash of the current spec (computed once per generation, from the
  pod templates alone) to tell whether it is stale.
- The status is read into its models (planner.read_status), planned as models, and turned into
  its wire form once, to compare it with the stored one and to send it.
- Progress: a running pod's log is read incrementally (``sinceSeconds`` since the last read,
  ``tailLines``, ``limitBytes``), every ``progress_seconds`` at most, and less often as more pods
  run (``LOG_READS_PER_SECOND`` in all).
"""

from __future__ import annotations

import asyncio
import dataclasses
import datetime
import functools
import logging
import math
import time
from collections.abc import Mapping
from typing import Any

from kubernetes.client.exceptions import ApiException
from pydantic import ValidationError
from urllib3.exceptions import HTTPError

from relora_api import contract, times, validation
from relora_api.spec import AdapterMigrationSpec
from relora_api.status import (
    MAX_MESSAGE,
    AdapterMigrationStatus,
    AdapterProgress,
    Condition,
    ConditionStatus,
    ConditionType,
    Reason,
)
from relora_operator import cache, job_builder, metrics, migrations, naming, planner, watching
from relora_operator.kube import Kube
from relora_operator.migrations import MigrationState
from relora_operator.poker import Poker
from relora_operator.settings import Settings

LOG = logging.getLogger("relora.operator")
Obj = dict[str, Any]
SELECTOR = f"{naming.MANAGED_BY}={naming.OPERATOR}"
LOG_READS_PER_SECOND = 5.0  # progress reads of all running pods together, at most
LOG_LIMIT_BYTES = 64 * 1024
RELIST_DELAY = 1.0  # seconds after the last listing event of a watch restart
RETRY_SECONDS = (1.0, 2.0, 5.0, 10.0, 30.0)
IDLE = 30.0  # seconds until the next reconciliation beyond which a state releases its caches


class Operator:
    """What the handlers share: settings, the API client, the caches, the poker."""

    def __init__(self, settings: Settings, kube: Kube, seal_key: bytes) -> None:
        self.settings = settings
        self.kube = kube
        self.seal_key = seal_key
        self.poker = Poker(self.reconcile)
        self.registry = migrations.Registry()
        self.children = cache.Children()
        self.watchers: dict[str, list[watching.Watcher]] = {}  # namespace -> its watches
        self.listed: dict[str, set[str]] = {}  # namespace -> kinds listed once
        self.synced: dict[str, asyncio.Event] = {}  # namespace -> all its kinds listed
        self.relists: dict[str, asyncio.TimerHandle] = {}  # namespace -> a list asked for
        self.tasks: set[asyncio.Task[None]] = set()

    # ------------------------------------------------------------ watch events
    def migration_event(self, kind: str | None, body: Mapping[str, Any]) -> None:
        """A migration's watch event (``kind`` None: Kopf's listing)."""
        meta = body.get("metadata") or {}
        uid = meta.get("uid", "")
        if kind == "DELETED":
            self.forget(uid)
            return
        if kind is None:  # a listing: at start-up or after a watch restart
            self.relist_soon(meta.get("namespace", ""))
        state = self.registry.get(uid)
        now = time.monotonic()
        if state is None:
            self.registry.add(MigrationState.of(body, now))
        elif not state.offer(body, now) or state.own_write(body):
            return
        self.poker.poke(uid)

    def child_event(self, plural: str, kind: str, body: Obj) -> None:
        """A Job's or pod's watch event: the cache takes it, its migration looks soon."""
        now = time.monotonic()
        if kind == "DELETED":
            uid = self.children.drop(plural, body, now)
        else:
            uid = self.children.put(plural, body, now)
        if uid in self.registry.states:
            self.poker.soon(uid)

    def children_listed(
        self, plural: str, namespace: str, items: list[Obj], started: float
    ) -> None:
        """A watch listed its kind (first, or after 410 Gone): the cache becomes the list."""
        token = self.children.begin_list(started)
        try:
            changed = self.children.replace(plural, namespace, items, token, time.monotonic())
        finally:
            self.children.end_list(token)
        kinds = self.listed.setdefault(namespace, set())
        if plural in kinds:  # listed again: the watch was restarted (410 Gone), and the
            self.relist_soon(namespace)  # migrations' watch most likely too
        kinds.add(plural)
        if kinds >= set(cache.KINDS):
            self.synced.setdefault(namespace, asyncio.Event()).set()
        for uid in changed:
            if uid in self.registry.states:
                self.poker.soon(uid)

    def watch(self, namespace: str) -> None:
        """Watch the operator's Jobs and pods in ``namespace`` (from now until ``stop``)."""
        if namespace in self.watchers:
            return
        loop = asyncio.get_running_loop()
        self.watchers[namespace] = [
            watching.Watcher(
                plural=plural,
                namespace=namespace,
                list_call=functools.partial(self.kube.list_children, plural, selector=SELECTOR),
                watch_call=functools.partial(self.kube.watch_children, plural, selector=SELECTOR),
                loop=loop,
                on_list=self.children_listed,
                on_event=self.child_event,
            )
            for plural in cache.KINDS
        ]
        for watcher in self.watchers[namespace]:
            watcher.start()

    def stop(self) -> None:
        for watchers in self.watchers.values():
            for watcher in watchers:
                watcher.stop()

    def forget(self, uid: str) -> None:
        """A migration is gone: drop all that is kept of it (ownerReferences take its Jobs)."""
        self.registry.pop(uid)
        self.children.forget_migration(uid)
        self.poker.forget(uid)
        metrics.set_phases(self.registry.totals)

    # ------------------------------------------------------------ lists
    def relist_soon(self, namespace: str) -> None:
        """List ``namespace`` once the burst of listing events that asked for it is over."""
        handle = self.relists.pop(namespace, None)
        if handle is not None:
            handle.cancel()
        loop = asyncio.get_running_loop()
        self.relists[namespace] = loop.call_later(RELIST_DELAY, self._spawn_relist, namespace)

    def _spawn_relist(self, namespace: str) -> None:
        self.relists.pop(namespace, None)
        task = asyncio.get_running_loop().create_task(self._relist_logged(namespace))
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def _relist_logged(self, namespace: str) -> None:
        try:
            await self.relist(namespace)
        except (ApiException, HTTPError, OSError) as error:
            LOG.warning("listing %s failed (%s): trying again", namespace, type(error).__name__)
            self.relist_soon(namespace)

    async def relist(self, namespace: str) -> None:
        """Correct the caches of ``namespace`` with lists: what was deleted while no watch said
        so goes; what is there and was missed comes."""
        now = time.monotonic
        token = self.children.begin_list(now())
        started = self.children.listing[token]
        try:
            found = await self.kube.list_migrations(namespace)
            jobs = await self.kube.list_jobs(namespace, SELECTOR)
            pods = await self.kube.list_pods(namespace, SELECTOR)
            changed = self.children.replace("jobs", namespace, jobs, token, now())
            changed |= self.children.replace("pods", namespace, pods, token, now())
        finally:
            self.children.end_list(token)
        listed = {(m.get("metadata") or {}).get("uid", ""): m for m in found}
        for known in self.registry.in_namespace(namespace):
            if known.uid not in listed and known.seen < started:
                self._gone(known)
        for uid, body in listed.items():
            state = self.registry.get(uid)
            if state is None:
                self.registry.add(MigrationState.of(body, now()))
                changed.add(uid)
            elif state.offer(body, now()) and not state.own_write(body):
                changed.add(uid)
        for uid in changed:
            if uid in self.registry.states:
                self.poker.soon(uid)

    async def sync(self, namespace: str) -> None:
        """Wait until the Jobs and pods of ``namespace`` were listed once (the cache is complete
        from then on)."""
        self.watch(namespace)
        await self.synced.setdefault(namespace, asyncio.Event()).wait()

    async def relist_periodically(self) -> None:
        """Every ``relist_seconds``, each namespace with migrations is listed again."""
        while True:
            await asyncio.sleep(self.settings.relist_seconds)
            for namespace in sorted(self.registry.namespaces()):
                try:
                    await self.relist(namespace)
                except (ApiException, HTTPError, OSError) as error:
                    LOG.warning("listing %s failed: %s", namespace, type(error).__name__)

    def _gone(self, state: MigrationState) -> None:
        LOG.info(
            "%s/%s (uid %s) is gone: no more reconciling", state.namespace, state.name, state.uid
        )
        self.forget(state.uid)

    # ------------------------------------------------------------ reconciliation
    async def reconcile(self, uid: str) -> None:
        state = self.registry.get(uid)
        if state is None:
            return  # deleted: ownerReferences take the Jobs away
        metrics.RECONCILES.inc()
        started = time.perf_counter()
        try:
            await self.sync(state.namespace)
            if self.registry.get(uid) is state:
                await self._reconcile(state)
                state.failures = 0
        except (ApiException, HTTPError, OSError) as error:
            self._unreachable(state, "reconcile", error)
        except Exception as error:  # keep the operator running, say why
            metrics.RECONCILE_ERRORS.labels(error=type(error).__name__).inc()
            LOG.exception("reconcile of %s failed", state.name)
            self._retry(state)
        finally:
            metrics.RECONCILE_SECONDS.observe(time.perf_counter() - started)

    def _unreachable(
        self, state: MigrationState, what: str, error: ApiException | HTTPError | OSError
    ) -> None:
        """An API call of ``what`` failed: counted, said, and the migration retried later."""
        if isinstance(error, ApiException):
            label, text = f"http{error.status}", f"HTTP {error.status}"
        else:
            label, text = "connection", type(error).__name__
        metrics.RECONCILE_ERRORS.labels(error=label).inc()
        LOG.warning("%s of %s failed: %s", what, state.name, text)
        self._retry(state)

    def _retry(self, state: MigrationState) -> None:
        if self.registry.get(state.uid) is state:
            delay = RETRY_SECONDS[min(state.failures, len(RETRY_SECONDS) - 1)]
            state.failures += 1
            self.poker.schedule(state.uid, delay)

    def progress_every(self) -> float:
        """Seconds between two progress reads of one running pod: ``progress_seconds``, or
        longer so that all running pods together are read ``LOG_READS_PER_SECOND`` times a
        second at most."""
        return max(
            self.settings.progress_seconds, len(self.children.running) / LOG_READS_PER_SECOND
        )

    async def _reconcile(self, state: MigrationState, confirmed: bool = False) -> None:
        body = state.body
        meta = body["metadata"]
        name, namespace, uid = state.name, state.namespace, state.uid
        stored_status = dict(body.get("status") or {})
        if meta.get("deletionTimestamp"):
            state.unsent.clear()
            self.poker.schedule(uid, None)
            return
        self._post_events(state)  # left over from a failed post
        spec = state.spec()
        if not isinstance(spec, AdapterMigrationSpec):
            await self._invalid(state, spec)
            self.registry.count(state, {})  # an invalid spec has no adapters
            metrics.set_phases(self.registry.totals)
            return
        jobs, all_pods = self.children.children(uid)
        pods, strays = pods_by_job(jobs, all_pods)
        every = self.progress_every()
        progress = await self._progress(state, jobs, pods, every)
        if self.registry.get(uid) is not state:
            return  # found gone meanwhile
        status = planner.read_status(stored_status)
        migration = planner.Migration(
            name, namespace, uid, state.generation, spec, status, self.seal_key
        )
        now = datetime.datetime.now(datetime.UTC)
        templates = (
            state.templates(lambda: self._templates(state, spec))
            if any(_generation(job) != state.generation for job in jobs)
            else {}  # every Job is of this generation's spec: none can be stale
        )
        new_status, actions = planner.plan(
            migration, jobs, pods, progress, now, strays, templates, every
        )
        if actions.create and not confirmed and _made_before(status, actions):
            # A Job is made again: first make sure the migration is still there (deleted
            # during a watch outage, it must not get a Job).
            fresh = await self.kube.find_migration(namespace, name)
            if fresh is None or (fresh.get("metadata") or {}).get("uid") != uid:
                self._gone(state)
                return
            state.offer(fresh, time.monotonic())
            await self._reconcile(state, confirmed=True)
            return
        planned = {entry.name: entry for entry in new_status.adapters or []}
        for adapter in actions.create:
            service = job_builder.build_service(
                name=name, namespace=namespace, uid=uid, spec=spec, adapter=adapter
            )
            if service is not None:  # a worker group's: before its pods look for worker 0
                await self.kube.create_service(namespace, service)
            entry = planned.get(adapter.name)
            job = job_builder.build_job(
                name=name,
                namespace=namespace,
                uid=uid,
                spec=spec,
                adapter=adapter,
                settings=self.settings,
                generation=state.generation,
                restarts=(entry.restarts or 0) if entry is not None else 0,
            )
            created = await self.kube.create_job(namespace, job)
            if created is not None:  # in the cache now: its watch event may come after its pod's
                self.children.put("jobs", created, time.monotonic())
                metrics.JOBS_CREATED.inc()
        if actions.create:
            # Once more with the new Jobs: one status write says what they are, not two.
            jobs, all_pods = self.children.children(uid)
            pods, strays = pods_by_job(jobs, all_pods)
            made = dataclasses.replace(migration, status=new_status)
            first = actions.events
            new_status, actions = planner.plan(
                made, jobs, pods, progress, now, strays, templates, every
            )
            actions.create, actions.events = [], first + actions.events
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
        wire = new_status.to_wire()
        if wire != stored_status:
            state.written = migrations.digest(wire)
            stored = await self.kube.patch_status(namespace, name, wire)
            generation = state.generation
            state.offer(stored, time.monotonic())
            metrics.record_transitions(status, new_status, workers=spec.workers)
            if new_status.phase != status.phase:
                LOG.info("%s/%s: %s -> %s", namespace, name, status.phase, new_status.phase)
            self._observe_queue_wait(state, jobs, pods)
            if state.generation != generation or stored["metadata"].get("deletionTimestamp"):
                self.poker.poke(uid)  # changed while this reconciliation ran
        for job_name in actions.restart:  # the restart is counted in the status written above
            await self.kube.delete_job(namespace, job_name)
        state.unsent.extend(actions.events)
        self._post_events(state)
        self.registry.count(state, wire)
        metrics.set_phases(self.registry.totals)
        self.poker.schedule(uid, actions.requeue_after)
        later = actions.requeue_after
        if new_status.phase in planner.FINAL or (later is not None and later > IDLE):
            state.release()  # not reconciled again soon: its parsed spec goes

    def _templates(self, state: MigrationState, spec: AdapterMigrationSpec) -> dict[str, str]:
        return {
            adapter.name: job_builder.template_hash(
                job_builder.pod_template(
                    name=state.name,
                    namespace=state.namespace,
                    uid=state.uid,
                    spec=spec,
                    adapter=adapter,
                    settings=self.settings,
                )
            )
            for adapter in spec.adapters
        }

    def _post_events(self, state: MigrationState) -> None:
        """Post the events of written transitions, in order, in the background: the
        reconciliation does not wait for them. They come last in the queue of API calls, and
        a migration's next reconciliation (its Job finished) waited seconds behind its own
        events while new migrations' Jobs were being created."""
        if state.unsent and not state.posting:
            state.posting = True
            task = asyncio.get_running_loop().create_task(self._send_events(state))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _send_events(self, state: MigrationState) -> None:
        """One that cannot be sent (API server unreachable) is not lost: the migration is
        reconciled again later (with backoff), which posts what is left, since the status that
        caused it is already written and would not be derived again."""
        try:
            while state.unsent and self.registry.get(state.uid) is state:
                event = state.unsent[0]
                await self.kube.event(state.namespace, state.name, state.uid, *event)
                if state.unsent and state.unsent[0] is event:
                    state.unsent.pop(0)
        except (ApiException, HTTPError, OSError) as error:
            self._unreachable(state, "posting an event", error)
        finally:
            state.posting = False

    async def _invalid(self, state: MigrationState, error: Exception) -> None:
        """A spec the schema let through but the models refuse: Failed, with the field."""
        body = state.body
        generation = state.generation
        if isinstance(error, ValidationError):
            found = validation.explain(error, AdapterMigrationSpec, document=body.get("spec"))
            problems = "; ".join(str(problem) for problem in found)[:MAX_MESSAGE]
        else:
            problems = str(error)[:MAX_MESSAGE]
        since = times.whole_seconds(times.now())

        def condition(kind: ConditionType, status: ConditionStatus) -> Condition:
            return Condition(
                type=kind,
                status=status,
                reason=Reason.INVALID_SPEC,
                message=problems,
                observed_generation=generation,
                last_transition_time=since,
            )

        conditions = [
            condition("Ready", "False"),
            condition("Failed", "True"),
            condition("Stalled", "True"),
        ]
        status = AdapterMigrationStatus(
            observed_generation=generation, phase="Failed", conditions=conditions
        ).to_wire()
        old = body.get("status") or {}
        if {k: v for k, v in old.items() if k != "conditions"} != {
            k: v for k, v in status.items() if k != "conditions"
        } or [c.get("message") for c in old.get("conditions", [])] != [
            c["message"] for c in status["conditions"]
        ]:
            stored = await self.kube.patch_status(state.namespace, state.name, status)
            state.written = migrations.digest(status)
            state.offer(stored, time.monotonic())
            await self.kube.event(
                state.namespace, state.name, state.uid, "Warning", Reason.INVALID_SPEC, problems
            )
        self.poker.schedule(state.uid, None)

    async def _progress(
        self,
        state: MigrationState,
        jobs: list[Obj],
        pods: dict[str, list[Obj]],
        every: float,
    ) -> dict[str, AdapterProgress]:
        """Live progress from each running trainer pod's log, read at most every ``every``
        seconds, only what was written since the last read."""
        running = planner.running_pods(jobs, pods)
        clock = time.monotonic()
        for pod in [p for p in state.log_read if p not in running.values()]:
            del state.log_read[pod]
        for adapter in [a for a in state.progress if a not in running]:
            del state.progress[adapter]
        for adapter, pod in running.items():
            last = state.log_read.get(pod)
            if last is not None and clock < last + every:
                continue
            state.log_read[pod] = clock
            since = None if last is None else math.ceil(clock - last) + 1
            text = await self.kube.pod_log(
                state.namespace,
                pod,
                lines=self.settings.log_tail_lines,
                since_seconds=since,
                limit_bytes=LOG_LIMIT_BYTES,
            )
            if text is None:  # the pod is gone, and no watch said so: list again
                self.relist_soon(state.namespace)
                continue
            found = contract.last_progress(text)
            if found is not None:
                state.progress[adapter] = found
        return {a: p for a, p in state.progress.items() if a in running}

    def _observe_queue_wait(
        self, state: MigrationState, jobs: list[Obj], pods: dict[str, list[Obj]]
    ) -> None:
        current = {job["metadata"]["uid"] for job in jobs}
        state.queue_observed &= current
        for job in jobs:
            first = min(
                pods.get(job["metadata"]["name"], []),
                key=lambda p: p["metadata"].get("creationTimestamp", ""),
                default=None,
            )
            started = (first or {}).get("status", {}).get("startTime")
            key = job["metadata"]["uid"]
            if started and key not in state.queue_observed:
                state.queue_observed.add(key)
                created = times.parse(job["metadata"].get("creationTimestamp"))
                begun = times.parse(started)
                if created and begun:
                    metrics.QUEUE_WAIT.observe(max((begun - created).total_seconds(), 0.0))


def _generation(job: Obj) -> int | None:
    """The generation of the migration's spec that a Job was made of (None: not said)."""
    value = (job["metadata"].get("annotations") or {}).get(naming.GENERATION, "")
    return int(value) if str(value).isdigit() else None


def _made_before(status: AdapterMigrationStatus, actions: planner.Actions) -> bool:
    """Whether an adapter to be given a Job had one before (the status names its Job)."""
    entries = {a.name: a for a in status.adapters or []}
    return any(
        (entry := entries.get(a.name)) is not None and entry.job_name is not None
        for a in actions.create
    )


def pods_by_job(jobs: list[Obj], pods: list[Obj]) -> tuple[dict[str, list[Obj]], list[Obj]]:
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
