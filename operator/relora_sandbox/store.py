"""The object store: resourceVersions, watches, finalizers and garbage collection.

Everything runs on one asyncio loop; each operation is synchronous and atomic with respect to
the others. Every write bumps one global resourceVersion and appends an event to a bounded
history; a watch replays the history after its resourceVersion (410 Gone when that part of the
history was compacted away) and then follows live events.
"""

from __future__ import annotations

import asyncio
import copy
import datetime
import random
import string
import uuid
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from relora_sandbox import errors
from relora_sandbox.kinds import Kind, Registry
from relora_sandbox.selectors import Matcher

Obj = dict[str, Any]
Key = tuple[str, str]  # (group, plural)
Listener = Callable[[str, Kind, Obj, Obj | None], None]

NAME_CHARS = string.ascii_lowercase + string.digits


def now() -> str:
    """The current time in the API's format (RFC 3339, seconds, UTC)."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Event:
    rv: int
    type: str  # ADDED, MODIFIED, DELETED
    key: Key
    namespace: str
    obj: Obj
    old: Obj | None


@dataclass
class Watch:
    """A subscriber to events of one resource (optionally one namespace)."""

    key: Key
    namespace: str | None
    queue: asyncio.Queue[Event | None] = field(default_factory=asyncio.Queue)

    def wants(self, event: Event) -> bool:
        return event.key == self.key and self.namespace in (None, event.namespace)


class Store:
    def __init__(self, registry: Registry, *, history: int = 10_000) -> None:
        self.registry = registry
        self.revision = 1000
        self.objects: dict[Key, dict[tuple[str, str], Obj]] = {}
        self.history: deque[Event] = deque(maxlen=history)
        self.compacted = self.revision  # events at or below this revision are gone
        self.watches: list[Watch] = []
        self.listeners: list[Listener] = []
        # Kept by _emit, which sees every write, so that a write need not scan every object:
        # the uids stored now, and those of objects waiting in foreground deletion.
        self.live: set[str] = set()
        self.waiting: dict[str, tuple[Key, str, str]] = {}

    # ----------------------------------------------------------------- reading
    def table(self, kind: Kind) -> dict[tuple[str, str], Obj]:
        return self.objects.setdefault(kind.key, {})

    def _find(self, kind: Kind, namespace: str, name: str) -> Obj:
        obj = self.table(kind).get((namespace, name))
        if obj is None:
            raise errors.not_found(_resource(kind), name)
        return obj

    def get(self, kind: Kind, namespace: str, name: str) -> Obj:
        return self._view(kind, self._find(kind, namespace, name))

    def find(self, kind: Kind, namespace: str, name: str) -> Obj | None:
        obj = self.table(kind).get((namespace, name))
        return None if obj is None else self._view(kind, obj)

    def select(
        self, kind: Kind, namespace: str | None, matches: Matcher = lambda obj: True
    ) -> tuple[list[Obj], str]:
        items = [
            self._view(kind, obj)
            for (ns, _), obj in sorted(self.table(kind).items())
            if namespace in (None, ns) and matches(obj)
        ]
        return items, str(self.revision)

    def _view(self, kind: Kind, obj: Obj) -> Obj:
        view = copy.deepcopy(obj)
        view["apiVersion"], view["kind"] = kind.api_version, kind.kind
        return view

    def all_objects(self) -> Iterator[tuple[Kind, Obj]]:
        kinds = {k.key: k for k in self.registry.kinds.values()}
        for key, table in self.objects.items():
            if key in kinds:
                for obj in table.values():
                    yield kinds[key], obj

    # ----------------------------------------------------------------- writing
    def _bump(self) -> str:
        self.revision += 1
        return str(self.revision)

    def _index(self, kind: Kind, obj: Obj, *, gone: bool = False) -> None:
        """Keep ``live`` and ``waiting`` as ``obj`` is written (or ``gone``)."""
        meta = obj["metadata"]
        uid = meta["uid"]
        if gone:
            self.live.discard(uid)
            self.waiting.pop(uid, None)
            return
        self.live.add(uid)
        if meta.get("deletionTimestamp") and "foregroundDeletion" in (meta.get("finalizers") or []):
            self.waiting[uid] = (kind.key, meta.get("namespace", ""), meta["name"])
        else:
            self.waiting.pop(uid, None)

    def _emit(self, kind: Kind, type_: str, obj: Obj, old: Obj | None) -> None:
        self._index(kind, obj, gone=type_ == "DELETED")
        event = Event(
            int(obj["metadata"]["resourceVersion"]),
            type_,
            kind.key,
            obj["metadata"].get("namespace", ""),
            copy.deepcopy(obj),
            copy.deepcopy(old) if old is not None else None,
        )
        if len(self.history) == self.history.maxlen:
            self.compacted = self.history[0].rv
        self.history.append(event)
        for watch in self.watches:
            if watch.wants(event):
                watch.queue.put_nowait(event)
        for listener in list(self.listeners):
            listener(type_, kind, event.obj, event.old)

    def create(self, kind: Kind, namespace: str, body: Obj) -> Obj:
        meta = body.setdefault("metadata", {})
        if not meta.get("name"):
            prefix = meta.get("generateName")
            if not prefix:
                raise errors.invalid(kind.kind, "", [("metadata.name", "Required value")])
            meta["name"] = prefix + "".join(random.choices(NAME_CHARS, k=5))
        name = meta["name"]
        if kind.namespaced:
            self._check_namespace(namespace)
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = ""
        if (namespace, name) in self.table(kind):
            raise errors.already_exists(_resource(kind), name)
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now()
        meta["generation"] = 1
        meta["resourceVersion"] = self._bump()
        for transient in ("deletionTimestamp", "deletionGracePeriodSeconds", "managedFields"):
            meta.pop(transient, None)
        body["apiVersion"], body["kind"] = kind.api_version, kind.kind
        self.table(kind)[(namespace, name)] = body
        self._emit(kind, "ADDED", body, None)
        return self._view(kind, body)

    def _check_namespace(self, namespace: str) -> None:
        namespaces = self.table(self.registry.kinds[("", "v1", "namespaces")])
        found = namespaces.get(("", namespace))
        if found is None:
            raise errors.not_found("namespaces", namespace)
        if found["metadata"].get("deletionTimestamp"):
            raise errors.APIError(
                403,
                "Forbidden",
                f"unable to create new content in namespace {namespace} because it is being "
                "terminated",
            )

    def replace(self, kind: Kind, namespace: str, name: str, body: Obj, *, status: bool) -> Obj:
        """An update (PUT, or the result of a PATCH) of the object or of its status."""
        current = self._find(kind, namespace, name)
        meta = body.setdefault("metadata", {})
        wanted = meta.get("resourceVersion")
        if wanted and wanted != current["metadata"]["resourceVersion"]:
            raise errors.conflict(_resource(kind), name)
        if status:
            updated = copy.deepcopy(current)
            if "status" in body:
                updated["status"] = body["status"]
            else:
                updated.pop("status", None)
        else:
            updated = body
            if kind.status_subresource:
                if "status" in current:
                    updated["status"] = copy.deepcopy(current["status"])
                else:
                    updated.pop("status", None)
            for fixed in ("uid", "creationTimestamp", "name", "namespace", "deletionTimestamp"):
                if fixed in current["metadata"]:
                    meta[fixed] = current["metadata"][fixed]
                else:
                    meta.pop(fixed, None)
            meta["generation"] = current["metadata"].get("generation", 1)
            if _spec_of(updated, kind) != _spec_of(current, kind):
                meta["generation"] += 1
        updated["apiVersion"], updated["kind"] = kind.api_version, kind.kind
        if _same(updated, current):
            return self._view(kind, current)  # no-op writes keep the resourceVersion
        updated["metadata"]["resourceVersion"] = self._bump()
        old = current
        self.table(kind)[(namespace, name)] = updated
        if updated["metadata"].get("deletionTimestamp") and not updated["metadata"].get(
            "finalizers"
        ):
            self._remove(kind, namespace, name, old=updated)
            return self._view(kind, updated)
        self._emit(kind, "MODIFIED", updated, old)
        return self._view(kind, updated)

    def delete(
        self, kind: Kind, namespace: str, name: str, *, propagation: str | None = None
    ) -> Obj:
        current = self._find(kind, namespace, name)
        policy = propagation or ("Orphan" if kind.key == ("batch", "jobs") else "Background")
        meta = current["metadata"]
        if policy == "Orphan":
            self._orphan(meta["uid"])
        if policy == "Foreground":
            finalizers = meta.setdefault("finalizers", [])
            if "foregroundDeletion" not in finalizers:
                finalizers.append("foregroundDeletion")
        if kind.plural == "namespaces" and not kind.group:
            return self._delete_namespace(kind, current)
        if meta.get("finalizers"):
            if not meta.get("deletionTimestamp"):
                old = copy.deepcopy(current)
                meta["deletionTimestamp"] = now()
                meta["deletionGracePeriodSeconds"] = 0
                meta["resourceVersion"] = self._bump()
                self._emit(kind, "MODIFIED", current, old)
            if policy == "Foreground":
                self._index(kind, current)  # already terminating: waits from now on too
                self.collect_foreground(current)
            return self._view(kind, current)
        self._remove(kind, namespace, name, old=current)
        return self._view(kind, current)

    def _remove(self, kind: Kind, namespace: str, name: str, *, old: Obj) -> None:
        removed = self.table(kind).pop((namespace, name))
        removed["metadata"]["resourceVersion"] = self._bump()
        self._emit(kind, "DELETED", removed, old)
        self._collect_dependents(removed["metadata"]["uid"])
        if namespace:
            self._finish_namespace(namespace)

    # -------------------------------------------------------- garbage collection
    def dependents(self, uid: str) -> list[tuple[Kind, Obj]]:
        return [
            (kind, obj)
            for kind, obj in self.all_objects()
            if any(ref.get("uid") == uid for ref in obj["metadata"].get("ownerReferences") or [])
        ]

    def drop_table(self, key: Key) -> None:
        """Forget every object of a kind at once, without events (its CRD was deleted)."""
        for obj in self.objects.pop(key, {}).values():
            self.live.discard(obj["metadata"]["uid"])
            self.waiting.pop(obj["metadata"]["uid"], None)

    def _collect_dependents(self, uid: str) -> None:
        live = self.live
        for kind, obj in self.dependents(uid):
            meta = obj["metadata"]
            owners = [r for r in meta.get("ownerReferences") or [] if r.get("uid") in live]
            if (meta.get("namespace", ""), meta["name"]) not in self.table(kind):
                continue
            if owners:  # other owners still hold it: just drop the dead reference
                body = copy.deepcopy(obj)
                body["metadata"]["ownerReferences"] = owners
                body["metadata"].pop("resourceVersion", None)
                self.replace(kind, meta.get("namespace", ""), meta["name"], body, status=False)
            elif not meta.get("deletionTimestamp"):
                self.delete(kind, meta.get("namespace", ""), meta["name"], propagation="Background")

    def collect_foreground(self, owner: Obj) -> None:
        """Delete the dependents of an owner being deleted in the foreground, then the owner."""
        uid = owner["metadata"]["uid"]
        for kind, obj in self.dependents(uid):
            meta = obj["metadata"]
            if not meta.get("deletionTimestamp"):
                self.delete(kind, meta.get("namespace", ""), meta["name"], propagation="Foreground")
        if not self.dependents(uid):
            kind = next(k for k, o in self.all_objects() if o["metadata"]["uid"] == uid)
            body = copy.deepcopy(owner)
            body["metadata"]["finalizers"] = [
                f for f in body["metadata"].get("finalizers", []) if f != "foregroundDeletion"
            ]
            body["metadata"].pop("resourceVersion", None)
            meta = owner["metadata"]
            self.replace(kind, meta.get("namespace", ""), meta["name"], body, status=False)

    def collect_dangling(self, kind: Kind, obj: Obj) -> None:
        """Delete an object whose owners all never existed or are gone (as the GC does).

        ``obj`` may be an older copy: the owners that count are those stored now (an object
        orphaned meanwhile has none left and stays)."""
        meta = obj["metadata"]
        current = self.table(kind).get((meta.get("namespace", ""), meta["name"]))
        if current is None or current["metadata"].get("uid") != meta.get("uid"):
            return
        references = current["metadata"].get("ownerReferences") or []
        owners = {r.get("uid") for r in references}
        if owners and not owners & self.live:
            # In the background, as the garbage collector deletes: a Job's own default
            # (Orphan) would leave its pods running without a Job.
            namespace = meta.get("namespace", "")
            self.delete(kind, namespace, meta["name"], propagation="Background")

    def _orphan(self, uid: str) -> None:
        for kind, obj in self.dependents(uid):
            body = copy.deepcopy(obj)
            meta = body["metadata"]
            meta["ownerReferences"] = [r for r in meta["ownerReferences"] if r.get("uid") != uid]
            meta.pop("resourceVersion", None)
            self.replace(kind, meta.get("namespace", ""), meta["name"], body, status=False)

    def finish_foreground(self) -> None:
        """Re-check owners waiting in foreground deletion (called after removals)."""
        for uid, (key, namespace, name) in list(self.waiting.items()):
            obj = self.objects.get(key, {}).get((namespace, name))
            if obj is None or obj["metadata"]["uid"] != uid:
                self.waiting.pop(uid, None)
                continue
            meta = obj["metadata"]
            waiting = "foregroundDeletion" in (meta.get("finalizers") or [])
            if waiting and meta.get("deletionTimestamp") and not self.dependents(uid):
                self.collect_foreground(obj)

    # ----------------------------------------------------------------- namespaces
    def _delete_namespace(self, kind: Kind, namespace_obj: Obj) -> Obj:
        name = namespace_obj["metadata"]["name"]
        if not namespace_obj["metadata"].get("deletionTimestamp"):
            old = copy.deepcopy(namespace_obj)
            namespace_obj["metadata"]["deletionTimestamp"] = now()
            namespace_obj.setdefault("status", {})["phase"] = "Terminating"
            namespace_obj["metadata"]["resourceVersion"] = self._bump()
            self._emit(kind, "MODIFIED", namespace_obj, old)
        for other_kind, obj in list(self.all_objects()):
            meta = obj["metadata"]
            inside = other_kind.namespaced and meta.get("namespace") == name
            stored = (name, meta["name"]) in self.table(other_kind)  # GC may have taken it
            if inside and stored and not meta.get("deletionTimestamp"):
                self.delete(other_kind, name, meta["name"], propagation="Background")
        self._finish_namespace(name)
        return self._view(kind, namespace_obj)

    def _finish_namespace(self, name: str) -> None:
        kind = self.registry.kinds[("", "v1", "namespaces")]
        namespace_obj = self.table(kind).get(("", name))
        if namespace_obj is None or not namespace_obj["metadata"].get("deletionTimestamp"):
            return
        remaining = any(
            k.namespaced and o["metadata"].get("namespace") == name for k, o in self.all_objects()
        )
        if not remaining:
            self._remove(kind, "", name, old=namespace_obj)

    # ----------------------------------------------------------------- watching
    def events_since(self, rv: int, watch: Watch) -> list[Event]:
        """History after ``rv`` for ``watch``; raise 410 Gone when it was compacted away."""
        if rv < self.compacted:
            raise errors.gone(f"too old resource version: {rv} ({self.compacted})")
        return [e for e in self.history if e.rv > rv and watch.wants(e)]

    def subscribe(self, watch: Watch) -> None:
        self.watches.append(watch)

    def unsubscribe(self, watch: Watch) -> None:
        if watch in self.watches:
            self.watches.remove(watch)

    def compact(self) -> None:
        """Forget the event history (fault injection: older watches then get 410 Gone)."""
        self.history.clear()
        self.compacted = self.revision

    def close_watches(self) -> None:
        """End every open watch stream (fault injection: a dropped connection)."""
        for watch in list(self.watches):
            watch.queue.put_nowait(None)


def _resource(kind: Kind) -> str:
    return f"{kind.plural}.{kind.group}" if kind.group else kind.plural


def _spec_of(obj: Obj, kind: Kind) -> Any:
    """What counts as the spec for metadata.generation: all but metadata and status."""
    return {k: v for k, v in obj.items() if k not in ("metadata", "status", "apiVersion", "kind")}


def _same(a: Obj, b: Obj) -> bool:
    strip = {"resourceVersion", "managedFields"}

    def clean(o: Obj) -> Obj:
        return {**o, "metadata": {k: v for k, v in o["metadata"].items() if k not in strip}}

    return clean(a) == clean(b)
