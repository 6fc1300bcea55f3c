"""What the operator keeps per AdapterMigration: one object, dropped when the migration goes.

The body is the newest the operator has seen: from the watch event, a list, or the answer to
its own status write. A watch event older than the operator's own last write (it is still in
the stream when the answer comes back) must not replace it, or the status would be derived
again from an older one (events twice). Resource versions are opaque strings by the API's
contract, but every etcd-backed server issues increasing integers; when both are integers the
older one is refused, otherwise each body is taken as it comes.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

from relora_api.spec import AdapterMigrationSpec
from relora_api.status import AdapterProgress

Obj = dict[str, Any]
_META = ("name", "namespace", "uid", "generation", "resourceVersion", "deletionTimestamp")


def slim(body: Mapping[str, Any]) -> Obj:
    """The parts of a migration the operator reads (no managedFields, no annotations: a
    client-side apply's last-applied annotation alone is the size of the spec)."""
    meta = body.get("metadata") or {}
    return {
        "metadata": {k: meta[k] for k in _META if k in meta},
        "spec": body.get("spec") or {},
        "status": body.get("status") or {},
    }


def _pack(body: Mapping[str, Any]) -> tuple[Obj, str]:
    kept = slim(body)
    rest = {"spec": kept["spec"], "status": kept["status"]}
    return kept["metadata"], json.dumps(rest, separators=(",", ":"))


def older(version: str | None, than: str | None) -> bool:
    """Whether resource version ``version`` is older than ``than`` (see the module doc)."""
    if version is None or than is None or not version.isdigit() or not than.isdigit():
        return False
    return int(version) < int(than)


def digest(status: Mapping[str, Any]) -> str:
    text = json.dumps(status, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


@dataclass
class MigrationState:
    uid: str
    name: str
    namespace: str
    meta: Obj  # the body's metadata (slim)
    text: str  # the body's spec and status, as compact JSON (a fifth of the memory of dicts)
    seen: float  # monotonic time the body was last confirmed by an event, list or read
    written: str | None = None  # digest of the status last written
    unsent: list[tuple[str, str, str]] = field(default_factory=list)  # events to post
    posting: bool = False  # its events are being posted (relora_operator.reconciler)
    progress: dict[str, AdapterProgress] = field(default_factory=dict)  # adapter -> latest
    log_read: dict[str, float] = field(default_factory=dict)  # running pod -> last log read
    queue_observed: set[str] = field(default_factory=set)  # Job uids whose wait was counted
    phases: Counter[str] = field(default_factory=Counter)  # its adapters by phase
    failures: int = 0  # reconciliations failed in a row (retry backoff)
    _spec: tuple[int, AdapterMigrationSpec | Exception] | None = None
    _templates: tuple[int, dict[str, str]] | None = None

    @classmethod
    def of(cls, body: Mapping[str, Any], now: float) -> MigrationState:
        meta, text = _pack(body)
        return cls(meta["uid"], meta["name"], meta["namespace"], meta, text, now)

    @property
    def body(self) -> Obj:
        """The newest body seen (slim: see ``slim``), a fresh copy."""
        return {"metadata": dict(self.meta), **json.loads(self.text)}

    @property
    def generation(self) -> int:
        return int(self.meta.get("generation", 1))

    @property
    def version(self) -> str | None:
        version = self.meta.get("resourceVersion")
        return None if version is None else str(version)

    def offer(self, body: Mapping[str, Any], now: float) -> bool:
        """Take a body seen in a watch event or a list unless it is older than the one held;
        whether it brings anything new (a reconciliation is due)."""
        version = (body.get("metadata") or {}).get("resourceVersion")
        if older(version, self.version):
            return False
        self.seen = now
        if version is not None and version == self.version:
            return False  # the same object: typically the echo of the operator's own write
        self.meta, self.text = _pack(body)
        return True

    def own_write(self, body: Mapping[str, Any]) -> bool:
        """Whether ``body`` is the migration as the operator's own last status write left it
        (same status, spec unchanged since): reconciling it again would find nothing to do."""
        meta = body.get("metadata") or {}
        status = body.get("status") or {}
        return (
            self.written is not None
            and not meta.get("deletionTimestamp")
            and status.get("observedGeneration") == meta.get("generation")
            and digest(status) == self.written
        )

    def spec(self) -> AdapterMigrationSpec | Exception:
        """The spec as the models read it (or why they refuse it), parsed once per generation."""
        if self._spec is None or self._spec[0] != self.generation:
            try:
                parsed: AdapterMigrationSpec | Exception = AdapterMigrationSpec.model_validate(
                    self.body.get("spec") or {}
                )
            except ValueError as error:  # pydantic's ValidationError
                parsed = error
            self._spec = (self.generation, parsed)
        return self._spec[1]

    def release(self) -> None:
        """Drop what is computed again on demand (the parsed spec takes 8 KB, four times the
        body): for a migration not reconciled again soon."""
        self._spec = self._templates = None

    def templates(self, compute: Any) -> dict[str, str]:
        """Adapter -> the hash of the pod template its Job would get now, computed once per
        generation (``compute()`` gives them)."""
        if self._templates is None or self._templates[0] != self.generation:
            self._templates = (self.generation, compute())
        return self._templates[1]


@dataclass
class Registry:
    """Migration uid -> its state. A state is dropped with its migration."""

    states: dict[str, MigrationState] = field(default_factory=dict)
    totals: Counter[str] = field(default_factory=Counter)  # adapters by phase: relora_adapters

    def get(self, uid: str) -> MigrationState | None:
        return self.states.get(uid)

    def add(self, state: MigrationState) -> None:
        self.states[state.uid] = state

    def pop(self, uid: str) -> MigrationState | None:
        state = self.states.pop(uid, None)
        if state is not None:
            self.count(state, None)
        return state

    def count(self, state: MigrationState, status: Mapping[str, Any] | None) -> None:
        """Update the adapters-by-phase totals with one migration's (None: it is gone).
        Kept per migration: recounting every migration each time was quadratic."""
        self.totals.subtract(state.phases)
        state.phases = Counter(a["phase"] for a in (status or {}).get("adapters") or [])
        self.totals.update(state.phases)

    def in_namespace(self, namespace: str) -> Iterator[MigrationState]:
        return (s for s in list(self.states.values()) if s.namespace == namespace)

    def namespaces(self) -> set[str]:
        return {s.namespace for s in self.states.values()}

    def __len__(self) -> int:
        return len(self.states)
