"""Server-side printing (``Accept: ...;as=Table``): the columns kubectl get shows.

Custom resources use their CRD's additionalPrinterColumns, evaluated with the JSONPath subset
those use (``.a.b``, ``.a[0]``, ``.a[?(@.k=="v")].b``); built-in kinds get NAME and AGE, plus
STATUS for Pods and Jobs.
"""

from __future__ import annotations

import datetime
import re
from typing import Any

from relora_sandbox.kinds import Kind

_STEP = re.compile(r'\.([\w-]+)|\[(\d+)\]|\[\?\(@\.([\w-]+)\s*==\s*["\']([^"\']*)["\']\)\]')


def jsonpath(obj: Any, path: str) -> Any:
    """Evaluate a printer-column JSONPath; None when any step is missing."""
    nodes = [obj]
    for match in _STEP.finditer(path.strip().strip("{}")):
        key, index, filter_key, filter_value = match.groups()
        next_nodes = []
        for node in nodes:
            if key is not None and isinstance(node, dict) and key in node:
                next_nodes.append(node[key])
            elif index is not None and isinstance(node, list) and int(index) < len(node):
                next_nodes.append(node[int(index)])
            elif filter_key is not None and isinstance(node, list):
                next_nodes += [
                    item
                    for item in node
                    if isinstance(item, dict) and str(item.get(filter_key)) == filter_value
                ]
        nodes = next_nodes
    if not nodes:
        return None
    return nodes[0] if len(nodes) == 1 else ",".join(str(n) for n in nodes)


def _age(timestamp: str | None) -> str:
    if not timestamp:
        return "<unknown>"
    then = datetime.datetime.fromisoformat(timestamp.replace("Z", "+00:00"))
    seconds = int((datetime.datetime.now(datetime.UTC) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{max(seconds, 0)}s"


def _job_status(obj: dict[str, Any]) -> str:
    for condition in (obj.get("status") or {}).get("conditions") or []:
        if condition.get("status") == "True" and condition.get("type") in (
            "Complete",
            "Failed",
            "Suspended",
        ):
            return str(condition["type"])
    return "Running" if (obj.get("status") or {}).get("active") else "Pending"


def columns(kind: Kind) -> list[dict[str, Any]]:
    base = [
        {
            "name": "Name",
            "type": "string",
            "format": "name",
            "priority": 0,
            "description": "Name of the object",
        }
    ]
    if kind.printer_columns:
        extra = [
            {
                "name": c["name"],
                "type": "string" if c.get("type") == "date" else c.get("type", "string"),
                "format": c.get("format", ""),
                "priority": c.get("priority", 0),
                "description": c.get("description", ""),
            }
            for c in kind.printer_columns
        ]
        return base + extra
    status = [
        {
            "name": "Status",
            "type": "string",
            "format": "",
            "priority": 0,
            "description": "Phase or outcome",
        }
    ]
    age = [
        {
            "name": "Age",
            "type": "string",
            "format": "",
            "priority": 0,
            "description": "Time since creation",
        }
    ]
    if kind.key in (("", "pods"), ("batch", "jobs")):
        return base + status + age
    return base + age


def cells(kind: Kind, obj: dict[str, Any]) -> list[Any]:
    row: list[Any] = [obj["metadata"]["name"]]
    if kind.printer_columns:
        for column in kind.printer_columns:
            value = jsonpath(obj, column["jsonPath"])
            if column.get("type") == "date":
                value = _age(value) if value else None
            row.append(value)
        return row
    if kind.key == ("", "pods"):
        row.append((obj.get("status") or {}).get("phase", "Unknown"))
    elif kind.key == ("batch", "jobs"):
        row.append(_job_status(obj))
    row.append(_age(obj["metadata"].get("creationTimestamp")))
    return row


def table(kind: Kind, items: list[dict[str, Any]], resource_version: str) -> dict[str, Any]:
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": columns(kind),
        "rows": [
            {
                "cells": cells(kind, item),
                "object": {
                    "kind": "PartialObjectMetadata",
                    "apiVersion": "meta.k8s.io/v1",
                    "metadata": item["metadata"],
                },
            }
            for item in items
        ],
    }
