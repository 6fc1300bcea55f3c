"""The AdapterMigration resource: its identity in the Kubernetes API and its manifest form."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from relora_api.spec import AdapterMigrationSpec
from relora_api.status import AdapterMigrationStatus

GROUP = "relora.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "AdapterMigration"
PLURAL = "adaptermigrations"
SINGULAR = "adaptermigration"
SHORT_NAMES = ["am"]
CATEGORIES = ["relora"]
CRD_NAME = f"{PLURAL}.{GROUP}"
NAME_PATTERN = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$"


class ObjectMeta(BaseModel):
    """The metadata fields a manifest needs; everything else is the API server's business."""

    model_config = ConfigDict(extra="allow", frozen=True)

    name: str = Field(
        min_length=1,
        max_length=253,
        pattern=NAME_PATTERN,
        description="Resource name: a lower-case DNS subdomain.",
    )
    namespace: str | None = Field(default=None, max_length=63)
    labels: dict[str, str] | None = None
    annotations: dict[str, str] | None = None


class AdapterMigration(BaseModel):
    """A whole AdapterMigration manifest, as ``kubectl apply`` and ``relora run`` take it."""

    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    api_version: Literal["relora.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["AdapterMigration"]
    metadata: ObjectMeta
    spec: AdapterMigrationSpec
    status: AdapterMigrationStatus | None = None

    @classmethod
    def from_manifest(cls, manifest: dict[str, Any]) -> AdapterMigration:
        """Validate a manifest (raises pydantic.ValidationError, see ``validation.explain``)."""
        return cls.model_validate(manifest)
