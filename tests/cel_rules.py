"""Evaluate a CRD schema's x-kubernetes-validations (CEL) rules on objects, with cel-python.

Test support only: it walks schema and object together the way the API server does, so tests can
show that the rules rendered into the CRD accept and refuse what the models accept and refuse.
"""

from __future__ import annotations

from typing import Any

import celpy
from celpy.adapter import json_to_cel

_ENV = celpy.Environment()


def _evaluate(rule: str, value: Any, old: Any) -> bool:
    program = _ENV.program(_ENV.compile(rule))
    activation = {"self": json_to_cel(value)}
    if old is not None:
        activation["oldSelf"] = json_to_cel(old)
    return bool(program.evaluate(activation))


def violations(schema: dict[str, Any], value: Any, old: Any = None, path: str = "") -> list[str]:
    """Messages of the rules ``value`` breaks (transition rules only where ``old`` exists)."""
    found = []
    for rule in schema.get("x-kubernetes-validations", []):
        is_transition = "oldSelf" in rule["rule"]
        if is_transition and old is None:
            continue
        if not _evaluate(rule["rule"], value, old if is_transition else None):
            found.append(f"{path}: {rule['message']}")
    if isinstance(value, dict):
        for name, sub in schema.get("properties", {}).items():
            if name in value:
                child_old = old.get(name) if isinstance(old, dict) else None
                found += violations(sub, value[name], child_old, f"{path}.{name}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            # Items of atomic lists are not correlatable: no oldSelf below a list.
            found += violations(schema["items"], item, None, f"{path}[{index}]")
    return found
