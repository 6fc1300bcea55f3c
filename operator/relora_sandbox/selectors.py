"""Label and field selectors, parsed as the API server parses them."""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any

from relora_sandbox.errors import bad_request

Matcher = Callable[[dict[str, Any]], bool]

_SET = re.compile(r"^\s*(!?)([\w./-]+)\s*(?:(notin|in)\s*\(([^)]*)\))?\s*$")
_EQUALITY = re.compile(r"^\s*([\w./-]+)\s*(==|=|!=)\s*([\w./-]*)\s*$")


def _split(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses."""
    parts, depth, current = [], 0, ""
    for char in selector:
        depth += char == "("
        depth -= char == ")"
        if char == "," and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += char
    parts.append(current)
    return [p for p in parts if p.strip()]


LabelTest = Callable[[dict[str, str]], bool]


def _equals(key: str, value: str, *, negate: bool) -> LabelTest:
    return lambda labels: (labels.get(key) == value) != negate


def _member(key: str, allowed: set[str], *, negate: bool) -> LabelTest:
    return lambda labels: (labels.get(key) in allowed) != negate


def _present(key: str, *, negate: bool) -> LabelTest:
    return lambda labels: (key in labels) != negate


def label_matcher(selector: str | None) -> Matcher:
    """``a=b,c!=d,e in (x,y),f notin (z),g,!h`` against metadata.labels."""
    if not selector:
        return lambda obj: True
    tests: list[LabelTest] = []
    for part in _split(selector):
        equality = _EQUALITY.match(part)
        if equality:
            key, op, value = equality.groups()
            tests.append(_equals(key, value, negate=op == "!="))
            continue
        match = _SET.match(part)
        if not match:
            raise bad_request(f"unable to parse requirement: {part!r}")
        negated, key, op, values = match.groups()
        if op:
            allowed = {v.strip() for v in values.split(",") if v.strip()}
            tests.append(_member(key, allowed, negate=op == "notin"))
        else:
            tests.append(_present(key, negate=bool(negated)))
    return lambda obj: all(t(obj.get("metadata", {}).get("labels") or {}) for t in tests)


def _field(obj: dict[str, Any], path: str) -> str:
    node: Any = obj
    for part in path.split("."):
        node = node.get(part) if isinstance(node, dict) else None
    return "" if node is None else str(node)


def field_matcher(selector: str | None) -> Matcher:
    """``metadata.name=x,status.phase!=Running`` (any dotted path, equality only)."""
    if not selector:
        return lambda obj: True
    tests: list[Matcher] = []
    for part in _split(selector):
        match = _EQUALITY.match(part)
        if not match:
            raise bad_request(f"invalid field selector: {part!r}")
        path, op, value = match.groups()
        tests.append(_field_equals(path, value, negate=op == "!="))
    return lambda obj: all(t(obj) for t in tests)


def _field_equals(path: str, value: str, *, negate: bool) -> Matcher:
    return lambda obj: (_field(obj, path) == value) != negate
