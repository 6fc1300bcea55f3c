"""The contract between the operator and the trainer pods it starts: one source for both sides.

Operator -> trainer: environment variables (the spec of one adapter's migration as JSON, the
adapter's name, the migration that owns the output, where each PVC claim is mounted, where to
write the termination message).

Trainer -> operator, without any Kubernetes API rights for the trainer (least privilege; the
operator is the only writer of the AdapterMigration status):

- live progress: one JSON object per line on stdout, ``{"event": "progress", ...}`` with the
  fields of ``AdapterProgress`` (written by relora_trainer.progress.JsonLinesProgress); the
  operator reads the tail of the pod's log (`last_progress`);
- the outcome: the container's termination message, a compact JSON ``Outcome`` (at most 4 KiB,
  the kubelet's limit); the full report stays in the output storage;
- the exit code: 0 finished (ready or not: the outcome says), EXIT_BAD_INPUT for deterministic
  bad input (the Job's podFailurePolicy fails the Job at once), anything else is retried.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from relora_api.spec import AdapterMigrationSpec
from relora_api.status import AdapterProgress, AdapterResult

ENV_MIGRATION = "RELORA_MIGRATION"
ENV_ADAPTER = "RELORA_ADAPTER"
ENV_OWNER = "RELORA_OWNER"
ENV_PVC_MOUNTS = "RELORA_PVC_MOUNTS"
ENV_TERMINATION_LOG = "RELORA_TERMINATION_LOG"
ENV_SHARD_BASE = "RELORA_SHARD_BASE"
"""Set to 1 on the workers of a group whose bases are sharded (spec.distributed.shardBase)."""
TERMINATION_LOG = "/dev/termination-log"
PVC_MOUNT_ROOT = "/mnt/pvc"

EXIT_BAD_INPUT = 3
"""Deterministic bad input: no retry (the same value as relora_trainer.errors.EXIT_BAD_INPUT)."""

MAX_TERMINATION_MESSAGE = 4096


class Outcome(BaseModel):
    """What a trainer pod reports when it ends (its termination message): the adapter's result
    in the very model the operator writes into ``status.adapters[].result``, or an error."""

    model_config = ConfigDict(extra="ignore")

    kind: Literal["result", "error"]
    reason: str | None = None  # for errors: IncompatibleModels, InvalidData, ...
    message: str | None = None
    result: AdapterResult | None = None

    def encode(self) -> str:
        """JSON within the termination message limit (a long message cut)."""
        text = self.model_dump_json(exclude_none=True, by_alias=True)
        if len(text.encode()) > MAX_TERMINATION_MESSAGE and self.message:
            room = len(self.message) - (len(text.encode()) - MAX_TERMINATION_MESSAGE) - 16
            short = self.model_copy(update={"message": self.message[: max(room, 0)] + "..."})
            text = short.model_dump_json(exclude_none=True, by_alias=True)
        return text

    @classmethod
    def decode(cls, text: str | None) -> Outcome | None:
        """Parse a termination message; None if it is not one of ours (e.g. a crash's log)."""
        if not text:
            return None
        try:
            return cls.model_validate_json(text.strip())
        except ValidationError:
            return None


def owner(namespace: str, name: str, uid: str) -> str:
    """The ENV_OWNER value: the migration the trainer writes for (its output's owner)."""
    return json.dumps({"namespace": namespace, "name": name, "uid": uid}, sort_keys=True)


_PROGRESS_FIELDS = {f.alias or n for n, f in AdapterProgress.model_fields.items()}


def last_progress(log: str) -> AdapterProgress | None:
    """The newest progress record in a log's tail (other lines are ignored)."""
    for line in reversed(log.splitlines()):
        line = line.strip()
        if not line.startswith("{"):
            continue
        try:
            record: Any = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("event") == "progress":
            # Only the fields this release knows: a newer trainer image may say more.
            fields = {k: v for k, v in record.items() if k in _PROGRESS_FIELDS}
            try:
                return AdapterProgress.model_validate(fields)
            except ValidationError:
                continue
    return None


OPERATOR_FIELDS = (
    "suspend",
    "queue_name",
    "backoff_limit",
    "active_deadline_seconds",
    "pre_running_deadline_seconds",
    "ttl_seconds_after_finished",
    "distributed",  # the pods' environment and command say it (RANK, WORLD_SIZE, torchrun)
)
"""Spec fields the operator applies itself, to the Job or to the status: the trainer has no use
for them, so it gets their defaults, and changing one leaves the trainer pod's template as is."""


def single_adapter_spec(spec: AdapterMigrationSpec, adapter: str) -> str:
    """The spec a trainer pod gets: only its adapter (keeps the Job small), and the defaults of
    the fields the operator applies itself (OPERATOR_FIELDS)."""
    chosen = [a for a in spec.adapters if a.name == adapter]
    defaults = {name: AdapterMigrationSpec.model_fields[name].default for name in OPERATOR_FIELDS}
    return json.dumps(spec.model_copy(update={"adapters": chosen, **defaults}).to_wire())
