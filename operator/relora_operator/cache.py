"""The Jobs and Pods of managed migrations, held in memory from the watch streams.

Fed by the watch events (``put`` for ADDED/MODIFIED and Kopf's listing, ``drop`` for DELETED)
and corrected by a list of a namespace (``replace``): after a watch restart (410 Gone) the
watcher lists again but is never told what was deleted meanwhile, so a list is the only way to
find it. An object missing from such a list is dropped only if the cache last heard of it
before the list was asked for (an object created meanwhile comes by its watch event, which may
arrive before the list's answer); an object in the list is taken from it unless a watch event
newer than the list's start was seen, or it was deleted while the list was under way.

Each object is kept slim (what the planner reads: planner.py), indexed by the uid of the
migration that owns it (label ``relora.dev/migration-uid``). Nothing is kept for a migration
that has no Job and no pod left: no map only grows.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from relora_operator import migrations, naming

Obj = dict[str, Any]
KINDS = ("jobs", "pods")
TOMBSTONE_SECONDS = 60.0
_LABELS = (naming.MIGRATION_UID, naming.ADAPTER)
# A worker group's Job says its restarts; its pods, their completion index (worker 0's speaks).
_ANNOTATIONS = (
    naming.FAILURE,
    naming.TEMPLATE_HASH,
    naming.GENERATION,
    naming.RESTARTS,
    naming.INDEX,
)
_JOB_SPEC = ("suspend", "ttlSecondsAfterFinished")


def slim(kind: str, obj: Obj) -> Obj:
    """The fields of a Job or Pod that the operator reads (planner.py), nothing else: the
    pod template, the pod spec, managedFields, most of the status are most of an object's
    size (a pod of 5 KB of JSON kept whole took 8 KB of memory, slim 2 KB)."""
    meta = obj.get("metadata") or {}
    status = obj.get("status") or {}
    kept_meta: Obj = {
        k: meta[k]
        for k in ("name", "namespace", "uid", "creationTimestamp", "resourceVersion")
        if k in meta
    }
    labels = meta.get("labels") or {}
    kept_meta["labels"] = {k: labels[k] for k in _LABELS if k in labels}
    annotations = meta.get("annotations") or {}
    kept_meta["annotations"] = {k: annotations[k] for k in _ANNOTATIONS if k in annotations}
    kept_meta["ownerReferences"] = [
        {"kind": r.get("kind"), "uid": r.get("uid"), "controller": r.get("controller")}
        for r in meta.get("ownerReferences") or []
        if r.get("controller")
    ]
    kept: Obj = {"metadata": kept_meta}
    if kind == "jobs":
        spec = obj.get("spec") or {}
        kept["spec"] = {k: spec[k] for k in _JOB_SPEC if k in spec}
        kept["status"] = {
            "conditions": [c for c in status.get("conditions") or [] if c.get("status") == "True"]
        }
    else:
        kept["status"] = {
            "conditions": [
                c for c in status.get("conditions") or [] if c.get("type") == "PodScheduled"
            ],
            "containerStatuses": [
                {"state": c.get("state") or {}} for c in status.get("containerStatuses") or []
            ],
        }
    for key in ("phase", "startTime"):
        if key in status:
            kept["status"][key] = status[key]
    return kept


def owner_of(obj: Obj) -> str:
    """The uid of the migration an object belongs to ('' for none)."""
    return str(((obj.get("metadata") or {}).get("labels") or {}).get(naming.MIGRATION_UID, ""))


@dataclass
class Entry:
    obj: Obj
    seen: float  # monotonic time of the event or list this copy came from
    migration: str
    namespace: str


@dataclass
class Children:
    entries: dict[str, dict[str, Entry]] = field(default_factory=lambda: {k: {} for k in KINDS})
    by_migration: dict[str, dict[str, set[str]]] = field(default_factory=dict)
    running: set[str] = field(default_factory=set)  # uids of pods in phase Running
    listing: dict[int, float] = field(default_factory=dict)  # lists under way -> started
    deleted: dict[str, float] = field(default_factory=dict)  # uid -> when: recent deletions
    _next_list: int = 0

    # ------------------------------------------------------------ watch events
    def put(self, kind: str, obj: Obj, now: float) -> str:
        """Keep (a slim copy of) an added or modified object, unless the copy kept is newer
        (the answer to the operator's own create can come after the watch's next event); the
        uid of its migration."""
        obj = slim(kind, obj)
        uid = obj["metadata"].get("uid", "")
        migration = owner_of(obj)
        if uid in self.deleted:
            return migration  # a late copy of an object already deleted (see drop)
        old = self.entries[kind].get(uid)
        if old is not None and migrations.older(
            obj["metadata"].get("resourceVersion"), old.obj["metadata"].get("resourceVersion")
        ):
            return old.migration
        if old is not None and old.migration != migration:
            self._unindex(kind, uid, old.migration)
        namespace = obj["metadata"].get("namespace", "")
        self.entries[kind][uid] = Entry(obj, now, migration, namespace)
        self.by_migration.setdefault(migration, {}).setdefault(kind, set()).add(uid)
        if kind == "pods":
            if (obj.get("status") or {}).get("phase") == "Running":
                self.running.add(uid)
            else:
                self.running.discard(uid)
        return migration

    def drop(self, kind: str, obj: Obj, now: float) -> str:
        """Forget a deleted object; the uid of its migration."""
        uid = (obj.get("metadata") or {}).get("uid", "")
        self.deleted[uid] = now
        self._prune(now)
        return self._remove(kind, uid) or owner_of(obj)

    # ------------------------------------------------------------ lists
    def begin_list(self, now: float) -> int:
        """Say that a list is asked for now; the token for ``replace``."""
        self._next_list += 1
        self.listing[self._next_list] = now
        return self._next_list

    def end_list(self, token: int) -> None:
        """A list is answered or failed."""
        self.listing.pop(token, None)

    def replace(
        self, kind: str, namespace: str, items: Iterable[Obj], token: int, now: float
    ) -> set[str]:
        """Make the namespace's ``kind`` what a list (asked with ``token``, still to be ended
        with ``end_list``) found; the uids of the migrations whose children changed."""
        started = self.listing.get(token, now)
        changed: set[str] = set()
        listed: set[str] = set()
        for item in items:
            uid = (item.get("metadata") or {}).get("uid", "")
            listed.add(uid)
            entry = self.entries[kind].get(uid)
            if self.deleted.get(uid, -1.0) >= started:
                continue  # deleted while the list was under way: the list is older
            if entry is None or entry.seen < started:
                before = entry.obj if entry is not None else None
                migration = self.put(kind, item, now)
                if before != self.entries[kind][uid].obj:
                    changed.add(migration)
        gone = [
            uid
            for uid, entry in self.entries[kind].items()
            if entry.namespace == namespace and uid not in listed and entry.seen < started
        ]
        for uid in gone:
            changed.add(self._remove(kind, uid))
        changed.discard("")
        return changed

    # ------------------------------------------------------------ reads
    def children(self, migration: str) -> tuple[list[Obj], list[Obj]]:
        """The Jobs and the pods of a migration."""
        found = self.by_migration.get(migration) or {}
        return (
            [self.entries["jobs"][uid].obj for uid in found.get("jobs", ())],
            [self.entries["pods"][uid].obj for uid in found.get("pods", ())],
        )

    def forget_migration(self, migration: str) -> None:
        """A migration is gone: its children go with it (the API server collects them)."""
        found = self.by_migration.get(migration) or {}
        for kind, uid in [(kind, uid) for kind, uids in found.items() for uid in uids]:
            self._remove(kind, uid)
        self.by_migration.pop(migration, None)

    def __len__(self) -> int:
        return sum(len(entries) for entries in self.entries.values())

    # ------------------------------------------------------------ internals
    def _prune(self, now: float) -> None:
        """Deletions are remembered ``TOMBSTONE_SECONDS`` (a late answer to a create, a list
        under way) and while a list that started before them is out."""
        horizon = min([now - TOMBSTONE_SECONDS, *self.listing.values()])
        while self.deleted:
            uid, when = next(iter(self.deleted.items()))
            if when >= horizon:
                break
            del self.deleted[uid]

    def _remove(self, kind: str, uid: str) -> str:
        entry = self.entries[kind].pop(uid, None)
        if kind == "pods":
            self.running.discard(uid)
        if entry is None:
            return ""
        self._unindex(kind, uid, entry.migration)
        return entry.migration

    def _unindex(self, kind: str, uid: str, migration: str) -> None:
        kinds = self.by_migration.get(migration)
        if kinds is None:
            return
        uids = kinds.get(kind)
        if uids is not None:
            uids.discard(uid)
            if not uids:
                del kinds[kind]
        if not kinds:
            del self.by_migration[migration]
