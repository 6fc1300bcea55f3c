"""Validate custom resources against a CRD's structural openAPIV3Schema, as the API server does.

Unknown fields are pruned (and reported, for fieldValidation=Strict/Warn), defaults applied,
types, bounds, patterns, enums, list-map keys and CEL rules (``x-kubernetes-validations``,
evaluated with cel-python; transition rules see ``oldSelf`` where the value is correlatable:
through object properties and the items of map lists) checked. Problems come back as
(field path, message) pairs.
"""

from __future__ import annotations

import copy
import datetime
import json
from dataclasses import dataclass, field
from functools import cache, lru_cache
from typing import Any

import celpy
import re2
from celpy.adapter import json_to_cel

_ENV = celpy.Environment()
MISSING = object()


@cache
def _program(rule: str) -> Any:
    return _ENV.program(_ENV.compile(rule))


@dataclass
class Outcome:
    value: Any
    causes: list[tuple[str, str]] = field(default_factory=list)
    unknown: list[str] = field(default_factory=list)


def check(schema: dict[str, Any], value: Any, old: Any = MISSING) -> Outcome:
    """Pruned and defaulted ``value``, with its problems; ``old`` enables transition rules."""
    outcome = Outcome(value=None)
    outcome.value = _walk(schema, copy.deepcopy(value), old, "", outcome)
    return outcome


def _type_ok(schema: dict[str, Any], value: Any) -> bool:
    if schema.get("x-kubernetes-int-or-string"):
        return isinstance(value, int | str) and not isinstance(value, bool)
    expected = schema.get("type")
    if expected is None:
        return True
    return {
        "object": isinstance(value, dict),
        "array": isinstance(value, list),
        "string": isinstance(value, str),
        "integer": isinstance(value, int) and not isinstance(value, bool),
        "number": isinstance(value, int | float) and not isinstance(value, bool),
        "boolean": isinstance(value, bool),
    }.get(expected, True)


def _walk(schema: dict[str, Any], value: Any, old: Any, path: str, out: Outcome) -> Any:
    where = path.lstrip(".") or "<root>"
    if not _type_ok(schema, value):
        kind = "integer or string" if schema.get("x-kubernetes-int-or-string") else schema["type"]
        out.causes.append((where, f"must be of type {kind}, got {type(value).__name__}"))
        return value
    if isinstance(value, dict):
        value = _walk_object(schema, value, old, path, out)
    elif isinstance(value, list):
        _walk_array(schema, value, old, path, out)
    else:
        _check_scalar(schema, value, where, out)
    _check_rules(schema, value, old, where, out)
    return value


def _walk_object(
    schema: dict[str, Any], value: dict[str, Any], old: Any, path: str, out: Outcome
) -> dict[str, Any]:
    where = path.lstrip(".") or "<root>"
    properties = schema.get("properties")
    extra = schema.get("additionalProperties")
    result: dict[str, Any] = {}
    for key, item in value.items():
        sub = properties.get(key) if properties is not None else None
        if sub is None and isinstance(extra, dict):
            sub = extra
        if item is None and sub is not None and not sub.get("nullable"):
            continue  # null values of known non-nullable fields are dropped (unknown: reported)
        child_old = old.get(key, MISSING) if isinstance(old, dict) else MISSING
        if sub is not None:
            result[key] = _walk(sub, item, child_old, f"{path}.{key}", out)
        elif schema.get("x-kubernetes-preserve-unknown-fields") or (
            properties is None and extra is None and schema.get("type") != "object"
        ):
            result[key] = item
        elif properties is None and extra is None:
            result[key] = item  # a free-form object (e.g. metadata)
        else:
            out.unknown.append(f"{path}.{key}".lstrip("."))
    for key, sub in (properties or {}).items():
        if key not in result and "default" in sub:
            result[key] = copy.deepcopy(sub["default"])
    for key in schema.get("required", []):
        if key not in result:
            out.causes.append((f"{path}.{key}".lstrip("."), "Required value"))
    if "maxProperties" in schema and len(result) > schema["maxProperties"]:
        out.causes.append((where, f"must have at most {schema['maxProperties']} properties"))
    return result


def _map_key(item: dict[str, Any], keys: list[str]) -> str:
    """A hashable identity of a map-list item (its keys may hold any JSON, even lists)."""
    return json.dumps([item.get(k) for k in keys], sort_keys=True, default=repr)


def _walk_array(
    schema: dict[str, Any], value: list[Any], old: Any, path: str, out: Outcome
) -> None:
    where = path.lstrip(".")
    items = schema.get("items") or {}
    keys = schema.get("x-kubernetes-list-map-keys") or []
    is_map = schema.get("x-kubernetes-list-type") == "map" and keys
    old_by_key = {}
    if is_map and isinstance(old, list):
        old_by_key = {_map_key(o, keys): o for o in old if isinstance(o, dict)}
    seen: set[Any] = set()
    for index, item in enumerate(value):
        child_old: Any = MISSING
        if is_map and isinstance(item, dict):
            key = _map_key(item, keys)
            if key in seen:
                found = {k: item.get(k) for k in keys}
                out.causes.append((f"{where}[{index}]", f"Duplicate value: {found}"))
            seen.add(key)
            child_old = old_by_key.get(key, MISSING)
        elif schema.get("x-kubernetes-list-type") == "set":
            marker = repr(item)
            if marker in seen:
                out.causes.append((f"{where}[{index}]", f"Duplicate value: {item!r}"))
            seen.add(marker)
        value[index] = _walk(items, item, child_old, f"{path}[{index}]", out)
    if "maxItems" in schema and len(value) > schema["maxItems"]:
        out.causes.append((where, f"must have at most {schema['maxItems']} items"))
    if "minItems" in schema and len(value) < schema["minItems"]:
        out.causes.append((where, f"must have at least {schema['minItems']} items"))


def _check_scalar(schema: dict[str, Any], value: Any, where: str, out: Outcome) -> None:
    if "enum" in schema and value not in schema["enum"]:
        allowed = ", ".join(f'"{v}"' for v in schema["enum"])
        out.causes.append((where, f'Unsupported value: "{value}": supported values: {allowed}'))
    if isinstance(value, str):
        if "maxLength" in schema and len(value) > schema["maxLength"]:
            out.causes.append((where, f"may not be longer than {schema['maxLength']}"))
        if "minLength" in schema and len(value) < schema["minLength"]:
            out.causes.append((where, f"should be at least {schema['minLength']} chars long"))
        # RE2, as the API server (Go's regexp): Python's '$' would also match before a final
        # newline, letting 'name\n' through a '^...$' pattern.
        if "pattern" in schema and not re2.search(schema["pattern"], value):
            out.causes.append((where, f"should match '{schema['pattern']}'"))
        if schema.get("format") == "date-time" and not _is_datetime(value):
            out.causes.append((where, "must be an RFC 3339 date-time"))
    elif isinstance(value, int | float) and not isinstance(value, bool):
        if "minimum" in schema:
            low = schema["minimum"]
            if value < low or (schema.get("exclusiveMinimum") and value == low):
                sign = ">" if schema.get("exclusiveMinimum") else ">="
                out.causes.append((where, f"should be {sign} {low}"))
        if "maximum" in schema:
            high = schema["maximum"]
            if value > high or (schema.get("exclusiveMaximum") and value == high):
                sign = "<" if schema.get("exclusiveMaximum") else "<="
                out.causes.append((where, f"should be {sign} {high}"))


def _is_datetime(value: str) -> bool:
    try:
        datetime.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return False
    return True


def _check_rules(schema: dict[str, Any], value: Any, old: Any, where: str, out: Outcome) -> None:
    for rule in schema.get("x-kubernetes-validations", []):
        expression = rule["rule"]
        transition = "oldSelf" in expression
        if transition and old is MISSING:
            continue
        try:
            passed = _evaluate(
                expression, _canonical(value), _canonical(old) if transition else None
            )
        except _Unevaluable as error:
            out.causes.append((where, f"rule {expression!r} could not be evaluated: {error}"))
            continue
        if not passed:
            message = rule.get("message") or f"failed rule: {expression}"
            out.causes.append((rule.get("fieldPath", "").lstrip(".") or where, message))


class _Unevaluable(Exception):
    """A CEL rule that raised while evaluated (the message says why)."""


def forget_verdicts() -> None:
    """Drop the memoized CEL programs and verdicts, as an API server starts without them (a
    benchmark's second subject in the same process must not find the first one's)."""
    _program.cache_clear()
    _evaluate.cache_clear()


def _canonical(value: Any) -> str:
    return json.dumps(value, sort_keys=True, separators=(",", ":"))


@lru_cache(maxsize=8192)
def _evaluate(expression: str, value: str, old: str | None) -> bool:
    """A CEL rule on JSON values; memoized: CEL is pure, and cel-python takes about a
    millisecond per rule, so a status write, which leaves the spec as it was, or many resources
    with the same values would otherwise spend most of the API server's time here."""
    try:
        # A value out of CEL's types (an integer past int64) fails here: the schema's own
        # checks have already refused it.
        activation = {"self": json_to_cel(json.loads(value))}
        if old is not None:
            activation["oldSelf"] = json_to_cel(json.loads(old))
        return bool(_program(expression).evaluate(activation))
    except Exception as error:
        raise _Unevaluable(str(error)) from error
