"""The observed state of an AdapterMigration, written only by the operator (status subresource).

Bounded in size: per-adapter entries follow the spec's adapter list (at most MAX_ADAPTERS),
messages are capped, and coefficients are summarized (at most MAX_COEFFICIENTS entries).
"""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Any, Literal

from pydantic import ConfigDict, Field
from pydantic.config import JsonDict

from relora_api.base import URI, APIModel
from relora_api.spec import MAX_ADAPTERS

MAX_COEFFICIENTS = 32
MAX_MESSAGE = 4096
MAX_COUNT = 2**31 - 1
MAX_GENERATION = 2**63 - 1
TIMESTAMP: JsonDict = {"maxLength": 64}  # RFC 3339 date-times are short; bounds CEL cost estimates

ConditionType = Literal["Ready", "Succeeded", "Failed", "Stalled", "Suspended"]
ConditionStatus = Literal["True", "False", "Unknown"]
MigrationPhase = Literal["Pending", "Running", "Succeeded", "Failed", "Suspended"]
AdapterPhase = Literal["Pending", "Queued", "Running", "Succeeded", "Failed", "Suspended"]
Stage = Literal["loading", "search", "finetune", "evaluate", "saving"]

REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"


class Reason(StrEnum):
    """The reasons the operator itself gives, in adapter entries, conditions and events (the
    values are the wire strings). Others pass through as plain strings: a Job's
    (BackoffLimitExceeded, DeadlineExceeded), a pod's (Unschedulable with its scheduler's
    message, ImagePullBackOff...), the trainer's (IncompatibleModels, InvalidData...)."""

    # An adapter's entry (status.adapters[].reason), and the Ready condition that repeats it.
    JOB_CREATED = "JobCreated"
    JOB_RECREATED = "JobRecreated"  # its Job was deleted before it finished
    WAITING_FOR_OLD_POD = "WaitingForOldPod"  # ...and that Job's pod still runs
    REVERIFYING = "Reverifying"  # a finished entry not sealed by the operator, its Job gone
    QUEUED = "Queued"  # suspended by Kueue until admitted
    RESUMING = "Resuming"
    SUSPENDED = "Suspended"  # also the Suspended condition's
    POD_PENDING = "PodPending"  # the trainer pod is starting
    UNSCHEDULABLE = "Unschedulable"  # a pod not scheduled that gives no reason of its own
    RUNNING = "Running"
    RETRYING = "Retrying"
    RESTARTING = "Restarting"  # a worker of its group failed: the whole group starts again
    READY = "Ready"  # the reason of every Succeeded adapter
    NOT_READY = "NotReady"  # the trainer ended below its readiness target
    NO_RESULT = "NoResult"  # the trainer ended without reporting an outcome
    JOB_FAILED = "JobFailed"  # a failed Job that gives no reason
    INVALID_INPUT = "InvalidInput"  # bad input, the trainer naming no reason
    # The migration's conditions.
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    IN_PROGRESS = "InProgress"
    NO_FAILURE = "NoFailure"
    PROGRESSING = "Progressing"
    FINISHED = "Finished"
    NOT_SUSPENDED = "NotSuspended"
    INVALID_SPEC = "InvalidSpec"  # a spec the schema let through but the models refuse
    # Events only.
    STATUS_REVERTED = "StatusReverted"  # a finished entry the operator did not write


class StatusModel(APIModel):
    """Status models read back what the API server stored (timestamps as strings): lax."""

    model_config = ConfigDict(strict=False, allow_inf_nan=True)

    def to_wire(self) -> dict[str, Any]:
        """The wire form: camelCase keys; what was set and is not null, nothing else. A default
        is not written unless it was set (an adapter's ``attempts`` says that its Job was seen;
        a status read back and written again is the same)."""
        return self.model_dump(by_alias=True, exclude_none=True, exclude_unset=True, mode="json")


class Condition(StatusModel):
    """A condition in the metav1.Condition shape (kubectl wait and kstatus read these)."""

    type: ConditionType = Field(
        description="Ready (summary), Succeeded, Failed, Stalled (permanent failure) or Suspended."
    )
    status: ConditionStatus = Field(description="True, False or Unknown.")
    observed_generation: int | None = Field(
        default=None,
        ge=0,
        le=MAX_GENERATION,
        description="The spec generation this condition was computed from.",
    )
    last_transition_time: datetime = Field(
        description="When status last changed.", json_schema_extra=TIMESTAMP
    )
    reason: str = Field(
        min_length=1,
        max_length=1024,
        pattern=REASON_PATTERN,
        description="CamelCase reason, e.g. Queued, Unschedulable, IncompatibleModels.",
    )
    message: str = Field(default="", max_length=MAX_MESSAGE, description="Human-readable detail.")


class AdapterProgress(StatusModel):
    """Live progress of one adapter's trainer."""

    stage: Stage | None = Field(default=None, description="What the trainer is doing now.")
    trial: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Current search trial.")
    trials: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Search trial budget.")
    step: int | None = Field(
        default=None, ge=0, le=MAX_COUNT, description="Current fine-tuning step."
    )
    max_steps: int | None = Field(
        default=None, ge=0, le=MAX_COUNT, description="Fine-tuning step budget."
    )
    quality: float | None = Field(default=None, description="Latest measured quality.")
    target: float | None = Field(default=None, description="The readiness target.")
    planned_peak_gib: float | None = Field(
        default=None,
        ge=0,
        alias="plannedPeakGiB",
        description=(
            "The trainer's memory plan (relora plan) on its device: the estimated peak in GiB, "
            "computed from the models' headers before any weight is loaded."
        ),
    )


class AdapterResult(StatusModel):
    """The outcome of one adapter's migration."""

    ready: bool = Field(description="Whether the adapter met its readiness target.")
    strategy: str = Field(max_length=32, description="The strategy that produced it.")
    output_uri: URI = Field(description="Where the migrated PEFT adapter was written.")
    metric: Literal["accuracy", "loss"] = Field(description="The readiness metric.")
    target: float | None = Field(default=None, description="The readiness target.")
    quality_source: float | None = Field(
        default=None, description="The old adapter on the old base (the reference)."
    )
    quality_before: float | None = Field(
        default=None, description="The old adapter on the new base, before migration."
    )
    quality_after: float | None = Field(default=None, description="The migrated adapter.")
    coefficients: dict[str, float] | None = Field(
        default=None,
        max_length=MAX_COEFFICIENTS,
        description="Chosen fusion coefficients (alpha/beta, by group when not global).",
    )
    steps: int | None = Field(default=None, ge=0, le=MAX_COUNT, description="Optimizer steps run.")
    time_to_readiness_seconds: float | None = Field(
        default=None, ge=0, description="Wall-clock seconds until ready, search included."
    )


class AdapterStatus(StatusModel):
    """The state of one adapter's migration."""

    name: str = Field(max_length=40, description="The adapter's name in the spec.")
    phase: AdapterPhase = Field(description="Pending, Queued, Running, Succeeded, Failed...")
    reason: str | None = Field(default=None, max_length=1024, description="Why, in one word.")
    message: str | None = Field(default=None, max_length=MAX_MESSAGE, description="Detail.")
    job_name: str | None = Field(default=None, max_length=63, description="Its batch/v1 Job.")
    attempts: int = Field(default=0, ge=0, le=MAX_COUNT, description="Pods started for it so far.")
    restarts: int | None = Field(
        default=None,
        ge=0,
        le=MAX_COUNT,
        description=(
            "Restarts of its worker group (spec.distributed.workers > 1): a failed worker fails "
            "the group, which starts again from the last checkpoint, at most backoffLimit times."
        ),
    )
    progress: AdapterProgress | None = Field(default=None, description="Live progress.")
    result: AdapterResult | None = Field(default=None, description="Final outcome.")
    seal: str | None = Field(
        default=None,
        max_length=128,
        description=(
            "The operator's signature of a finished entry; one changed by anyone else is "
            "derived again from the Job or the output."
        ),
    )


class AdapterMigrationStatus(StatusModel):
    """What the operator observed; never written by users."""

    observed_generation: int | None = Field(
        default=None, ge=0, le=MAX_GENERATION, description="The spec generation last reconciled."
    )
    phase: MigrationPhase | None = Field(
        default=None, description="Pending, Running, Succeeded, Failed or Suspended."
    )
    conditions: list[Condition] | None = Field(
        default=None,
        max_length=8,
        description="Ready, Succeeded, Failed, Stalled, Suspended.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
    progress: str | None = Field(
        default=None, max_length=32, description="Finished adapters, e.g. 2/3."
    )
    progress_percent: int | None = Field(
        default=None, ge=0, le=100, description="Overall progress in percent."
    )
    start_time: datetime | None = Field(
        default=None, description="When the first Job started.", json_schema_extra=TIMESTAMP
    )
    completion_time: datetime | None = Field(
        default=None, description="When the last adapter finished.", json_schema_extra=TIMESTAMP
    )
    adapters: list[AdapterStatus] | None = Field(
        default=None,
        max_length=MAX_ADAPTERS,
        description="Per-adapter state and results, in spec order.",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["name"],
        },
    )
