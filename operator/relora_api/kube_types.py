"""The small subset of core/v1 pod fields an AdapterMigration may override.

A full PodTemplateSpec is deliberately not embedded: it would bloat the CRD past the size that
client-side apply and Argo CD handle. These mirror the Kubernetes field names exactly, so that the
Job builder passes them through unchanged.
"""

from __future__ import annotations

import re
import reprlib
from typing import Annotated, Any, Literal

from pydantic import AfterValidator, BeforeValidator, Field, model_validator

from relora_api.base import APIModel

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


MAX_QUANTITY_LENGTH = 64
MAX_QUANTITY = 2**63 - 1  # what the API server's int64 holds


def _check_quantity(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        shown = reprlib.repr(value)
        raise ValueError(f"must be a quantity such as 1, '500m' or '16Gi', got {shown}")
    if isinstance(value, int) and not -MAX_QUANTITY - 1 <= value <= MAX_QUANTITY:
        raise ValueError("is too large for a quantity (at most 2^63 - 1)")
    if isinstance(value, str) and len(value) > MAX_QUANTITY_LENGTH:
        raise ValueError(f"must be at most {MAX_QUANTITY_LENGTH} characters")
    if isinstance(value, str) and not re.fullmatch(QUANTITY_PATTERN, value):
        raise ValueError(f"{reprlib.repr(value)} is not a quantity; use e.g. 1, '500m' or '16Gi'")
    return value


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    Field(
        description="A Kubernetes quantity, e.g. 1, '500m', '16Gi'.",
        json_schema_extra={
            "pattern": QUANTITY_PATTERN,
            "maxLength": MAX_QUANTITY_LENGTH,
            "minimum": -MAX_QUANTITY - 1,
            "maximum": MAX_QUANTITY,
        },
    ),
]

LabelValue = Annotated[
    str,
    Field(
        max_length=63,
        pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$",
        description="A label value: at most 63 letters, digits, '-', '_' and '.'.",
    ),
]

ResourceName = Annotated[str, Field(min_length=1, max_length=253)]


def without_nulls(value: Any) -> Any:
    """A map's null values count as absent, as on the API server (which prunes them)."""
    if isinstance(value, dict):
        return {k: v for k, v in value.items() if v is not None}
    return value


NoNulls = BeforeValidator(without_nulls)


class ResourceRequirements(APIModel):
    """Compute resources of the trainer container (as in core/v1 ResourceRequirements)."""

    limits: Annotated[dict[ResourceName, Quantity], NoNulls] | None = Field(
        default=None,
        max_length=16,
        description="Maximum resources, e.g. {'nvidia.com/gpu': 1, memory: '32Gi'}.",
    )
    requests: Annotated[dict[ResourceName, Quantity], NoNulls] | None = Field(
        default=None,
        max_length=16,
        description="Requested resources, e.g. {cpu: 4, memory: '24Gi'}.",
    )


class Toleration(APIModel):
    """A pod toleration (as in core/v1 Toleration), e.g. for tainted GPU nodes."""

    key: str | None = Field(default=None, max_length=317, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] | None = Field(
        default=None, description="Exists or Equal (the default)."
    )
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty matches all effects."
    )
    toleration_seconds: int | None = Field(
        default=None,
        ge=-(2**31),  # zero and negative mean 0 (evict at once); bounded like the upper end
        le=2**31 - 1,
        description="For NoExecute: how long the pod stays bound after the taint.",
    )


class KeySelector(APIModel):
    """A key of a Secret or ConfigMap in the migration's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Name of the Secret/ConfigMap.")
    key: str = Field(min_length=1, max_length=253, description="Key inside it.")
    optional: bool | None = Field(default=None, description="Whether the key may be missing.")


class EnvVarSource(APIModel):
    """Where an environment variable's value comes from: a Secret key or a ConfigMap key."""

    secret_key_ref: KeySelector | None = Field(
        default=None, description="A key of a Secret (e.g. AWS_SECRET_ACCESS_KEY or HF_TOKEN)."
    )
    config_map_key_ref: KeySelector | None = Field(
        default=None, description="A key of a ConfigMap."
    )

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvVarSource:
        if (self.secret_key_ref is None) == (self.config_map_key_ref is None):
            raise ValueError("set exactly one of secretKeyRef or configMapKeyRef")
        return self


class EnvVar(APIModel):
    """An environment variable of the trainer container: a literal value or a secret reference."""

    name: str = Field(
        min_length=1,
        max_length=256,
        pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$",
        description="Variable name.",
    )
    value: str | None = Field(
        default=None,
        max_length=4096,
        description="Literal value. Never put credentials here: use valueFrom.secretKeyRef.",
    )
    value_from: EnvVarSource | None = Field(
        default=None, description="Take the value from a Secret or ConfigMap key."
    )

    @model_validator(mode="after")
    def _not_both(self) -> EnvVar:
        if self.value is not None and self.value_from is not None:
            raise ValueError("set either value or valueFrom, not both")
        return self


class LocalObjectReference(APIModel):
    """A Secret or ConfigMap in the migration's namespace."""

    name: str = Field(min_length=1, max_length=253, description="Its name.")
    optional: bool | None = Field(default=None, description="Whether it may be missing.")


class EnvFromSource(APIModel):
    """All keys of a Secret or ConfigMap as environment variables (as in core/v1)."""

    prefix: str | None = Field(default=None, max_length=256, description="Prefix for each key.")
    secret_ref: LocalObjectReference | None = Field(default=None, description="A Secret.")
    config_map_ref: LocalObjectReference | None = Field(default=None, description="A ConfigMap.")

    @model_validator(mode="after")
    def _exactly_one(self) -> EnvFromSource:
        if (self.secret_ref is None) == (self.config_map_ref is None):
            raise ValueError("set exactly one of secretRef or configMapRef")
        return self


MAX_AFFINITY_DEPTH = 32
MAX_AFFINITY_VALUES = 10_000


def _check_affinity(value: dict[str, Any]) -> dict[str, Any]:
    """Bound the free-form affinity (the CRD keeps its unknown fields): a deeper or larger one
    would pass admission and then fail every Job the operator builds from it."""
    count = 0
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        count += 1
        if depth > MAX_AFFINITY_DEPTH:
            raise ValueError(f"nested more than {MAX_AFFINITY_DEPTH} levels deep")
        if count > MAX_AFFINITY_VALUES:
            raise ValueError(f"holds more than {MAX_AFFINITY_VALUES} values")
        if isinstance(node, dict):
            stack.extend((child, depth + 1) for child in node.values())
        elif isinstance(node, list):
            stack.extend((child, depth + 1) for child in node)
    return value


Affinity = Annotated[
    dict[str, Any],
    AfterValidator(_check_affinity),
    Field(
        description=(
            "Pod affinity rules, passed to the pod unchanged (core/v1 Affinity: nodeAffinity, "
            "podAffinity, podAntiAffinity)."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    ),
]
