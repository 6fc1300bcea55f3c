"""The base of every API model: camelCase names on the wire, unknown fields refused."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from relora_operator.api import uris


class APIModel(BaseModel):
    """Fields are snake_case in Python and camelCase in manifests (``sourceModel``)."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
    )

    def to_wire(self) -> dict[str, Any]:
        """The manifest form: camelCase keys, unset optional fields left out."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


def _check_uri(value: str) -> str:
    uris.parse_uri(value)
    return value


URI = Annotated[
    str,
    AfterValidator(_check_uri),
    Field(
        min_length=1,
        max_length=uris.MAX_URI_LENGTH,
        json_schema_extra={"x-kubernetes-validations": uris.CEL_RULES},
    ),
]
"""A storage URI: a plain path, ``pvc://CLAIM/PATH``, ``s3://BUCKET/KEY`` or ``hf://ORG/NAME``."""

DNS_LABEL_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
