"""Validate AdapterMigration manifests and explain problems one line each, naming the field."""

from __future__ import annotations

import difflib
import re
import reprlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ValidationError

from relora_api.base import DNS_LABEL_PATTERN
from relora_api.resource import NAME_PATTERN, AdapterMigration
from relora_api.status import REASON_PATTERN

# What a regular expression means, said for people.
_PATTERN_HINTS = {
    DNS_LABEL_PATTERN: "must be lower-case letters, digits and '-', starting and ending with a "
    "letter or digit (e.g. 'sentiment-v2')",
    NAME_PATTERN: "must be a lower-case DNS name: letters, digits, '-' and '.' (e.g. 'llama-v2')",
    REASON_PATTERN: "must be a CamelCase word (e.g. 'Unschedulable')",
}


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a manifest: the field path and what to do about it."""

    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.path}: {self.message}" if self.path else self.message


# Keys shown as they are in a path; any other key (white space, control characters, a very long
# one) is shown quoted and shortened in brackets, so that a problem stays one short line.
_PLAIN_KEY = re.compile(r"[A-Za-z0-9_][-A-Za-z0-9_./]{0,99}")
_SHORT = reprlib.Repr()
_SHORT.maxstring, _SHORT.maxother, _SHORT.maxlevel = 60, 60, 2
_SHORT.maxlist = _SHORT.maxtuple = _SHORT.maxdict = _SHORT.maxset = 3
_MAX_SHOWN = 100


def shown(value: Any) -> str:
    """``repr(value)``, bounded in length and depth (inputs may be huge or deeply nested)."""
    text = _SHORT.repr(value)
    return text if len(text) <= _MAX_SHOWN else text[: _MAX_SHOWN - 3] + "..."


def field_path(loc: Sequence[int | str], document: Any = None) -> str:
    """The manifest path of a pydantic error location (``spec.adapters[0].uri``).

    ``document`` (the validated input) tells list indexes from integer mapping keys.
    """
    out = ""
    node = document
    for part in loc:
        if part == "[key]":  # pydantic's marker for the key (not the value) of a mapping entry
            continue
        if isinstance(part, int) and not isinstance(node, dict):
            out += f"[{part}]"
            node = node[part] if isinstance(node, list) and -len(node) <= part < len(node) else None
            continue
        if isinstance(part, str) and _PLAIN_KEY.fullmatch(part):
            out += f".{part}" if out else part
        else:
            out += f"[{shown(part)}]"
        node = node.get(part) if isinstance(node, dict) else None
    return out


def _allowed_fields(model: type[BaseModel], loc: tuple[int | str, ...]) -> list[str]:
    """The wire names a model accepts at ``loc`` (the parent of an unknown field)."""
    current: Any = model
    for part in loc:
        if isinstance(part, int):
            continue
        fields = {f.alias or name: f for name, f in current.model_fields.items()}
        field = fields.get(str(part))
        if field is None:
            return []
        current = _model_of(field.annotation)
        if current is None:
            return []
    return [f.alias or name for name, f in current.model_fields.items()]


def _model_of(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in getattr(annotation, "__args__", ()):
        found = _model_of(arg)
        if found is not None:
            return found
    return None


def explain(
    error: ValidationError, model: type[BaseModel] = AdapterMigration, document: Any = None
) -> list[Problem]:
    """Turn a pydantic error into problems with manifest paths and actionable messages."""
    problems = []
    for item in error.errors(include_url=False):
        loc = tuple(part for part in item["loc"] if not str(part).startswith("function-"))
        kind = item["type"]
        if kind == "extra_forbidden":
            allowed = _allowed_fields(model, loc[:-1])
            guess = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f"did you mean '{guess[0]}'?" if guess else f"allowed: {', '.join(allowed)}"
            message = f"unknown field; remove it ({hint})"
        elif kind == "missing":
            message = "required field is missing"
        elif kind == "invalid_key" or "[key]" in loc:
            message = f"keys must be strings, got {shown(item['input'])}"
        elif kind == "string_pattern_mismatch":
            pattern = str((item.get("ctx") or {}).get("pattern", ""))
            message = _PATTERN_HINTS.get(pattern, f"must match the pattern {pattern}")
            message = f"{message}, got {shown(item['input'])}"
        elif kind == "literal_error":
            message = item["msg"].replace("Input should be", "must be")
            message = f"{message}, got {shown(item['input'])}"
        else:
            message = item["msg"].removeprefix("Value error, ")
            message = message.replace("Input should be", "must be")
        problems.append(Problem(path=field_path(loc, document), message=message))
    return problems


def validate_manifest(manifest: Any) -> tuple[AdapterMigration | None, list[Problem]]:
    """Validate one parsed manifest: the resource or the problems found (never both)."""
    if not isinstance(manifest, dict):
        return None, [Problem("", "a manifest must be a YAML mapping (apiVersion, kind, ...)")]
    try:
        return AdapterMigration.from_manifest(manifest), []
    except ValidationError as error:
        return None, explain(error, document=manifest)
