"""The small subset of core/v1 pod fields an AdapterMigration may override.

A full PodTemplateSpec is deliberately not embedded: it would bloat the CRD past the size that
client-side apply and Argo CD handle. These mirror the Kubernetes field names exactly, so that the
Job builder passes them through unchanged.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BeforeValidator, Field, model_validator

from relora_operator.api.base import APIModel

QUANTITY_PATTERN = (
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)


def _check_quantity(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise ValueError(f"must be a quantity such as 1, '500m' or '16Gi', got {value!r}")
    if isinstance(value, str) and not re.match(QUANTITY_PATTERN, value):
        raise ValueError(f"'{value}' is not a quantity; use e.g. 1, '500m' or '16Gi'")
    return value


Quantity = Annotated[
    int | str,
    BeforeValidator(_check_quantity),
    Field(
        description="A Kubernetes quantity, e.g. 1, '500m', '16Gi'.",
        json_schema_extra={"pattern": QUANTITY_PATTERN},
    ),
]

ResourceName = Annotated[str, Field(min_length=1, max_length=253)]


class ResourceRequirements(APIModel):
    """Compute resources of the trainer container (as in core/v1 ResourceRequirements)."""

    limits: dict[ResourceName, Quantity] | None = Field(
        default=None,
        max_length=16,
        description="Maximum resources, e.g. {'nvidia.com/gpu': 1, memory: '32Gi'}.",
    )
    requests: dict[ResourceName, Quantity] | None = Field(
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
        default=None, description="For NoExecute: how long the pod stays bound after the taint."
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


Affinity = Annotated[
    dict[str, Any],
    Field(
        description=(
            "Pod affinity rules, passed to the pod unchanged (core/v1 Affinity: nodeAffinity, "
            "podAffinity, podAntiAffinity)."
        ),
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
    ),
]
