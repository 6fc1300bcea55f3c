"""The base of every API model: camelCase names on the wire, unknown fields refused."""

from __future__ import annotations

from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator
from pydantic.alias_generators import to_camel

from relora_api import uris


class APIModel(BaseModel):
    """Fields are snake_case in Python and camelCase in manifests (``sourceModel``).

    Strict, like the API server: ``"3"`` is not an integer, ``1`` or ``"yes"`` not a boolean
    and ``2.0`` not an integer, so that ``relora validate`` accepts no manifest the CRD schema
    refuses; infinities and NaN (which JSON cannot carry) are refused too, and null fields are
    unset.
    """

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        frozen=True,
        strict=True,
        allow_inf_nan=False,
    )

    @model_validator(mode="before")
    @classmethod
    def _drop_nulls(cls, data: Any) -> Any:
        """A null field counts as unset, as on the API server (which prunes nulls before it
        validates): ``backoffLimit: null`` means the default, ``uri: null`` a missing uri."""
        if not isinstance(data, dict):
            return data
        known = {field.alias or name for name, field in cls.model_fields.items()}
        known |= set(cls.model_fields)
        return {k: v for k, v in data.items() if v is not None or k not in known}

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
