"""OpenAPI v3 documents: what kubectl reads to validate (`apply`) and explain.

Every served group-version gets a document whose operations carry the
``x-kubernetes-group-version-kind`` extension and the ``fieldValidation`` query parameter, so
kubectl delegates validation to the server (fieldValidation=Strict). Custom resources also get
their CRD's schema, so `kubectl explain` works for them; built-in kinds have no schema here.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from relora_sandbox import errors
from relora_sandbox.kinds import Kind, Registry

OPERATIONS = ("get", "put", "patch", "delete", "post")
FIELD_VALIDATION = {
    "name": "fieldValidation",
    "in": "query",
    "description": "Strict, Warn or Ignore handling of unknown fields.",
    "schema": {"type": "string", "uniqueItems": True},
}


def _definition_name(kind: Kind) -> str:
    reverse = ".".join(reversed(kind.group.split("."))) if kind.group else "io.k8s.api.core"
    return f"{reverse}.{kind.version}.{kind.kind}"


def _group_document(kinds: list[Kind]) -> dict[str, Any]:
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for kind in kinds:
        gvk = {"group": kind.group, "version": kind.version, "kind": kind.kind}
        if kind.schema is not None:
            schemas[_definition_name(kind)] = {
                **kind.schema,
                "x-kubernetes-group-version-kind": [gvk],
            }
        base = f"/apis/{kind.group}/{kind.version}" if kind.group else f"/api/{kind.version}"
        scope = "/namespaces/{namespace}" if kind.namespaced else ""
        operation = {
            "parameters": [FIELD_VALIDATION],
            "responses": {"200": {"description": "OK"}},
            "x-kubernetes-group-version-kind": gvk,
        }
        paths[f"{base}{scope}/{kind.plural}/{{name}}"] = {op: operation for op in OPERATIONS}
        paths[f"{base}{scope}/{kind.plural}"] = {"post": operation, "get": operation}
    return {
        "openapi": "3.0.0",
        "info": {"title": "Kubernetes", "version": "v1.32.0"},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _documents(registry: Registry) -> dict[str, dict[str, Any]]:
    by_group: dict[str, list[Kind]] = {}
    for kind in registry.kinds.values():
        path = f"apis/{kind.group}/{kind.version}" if kind.group else f"api/{kind.version}"
        by_group.setdefault(path, []).append(kind)
    return {path: _group_document(kinds) for path, kinds in by_group.items()}


def document(registry: Registry, parts: list[str], query: Mapping[str, str]) -> dict[str, Any]:
    """/openapi/v3 (the index) or /openapi/v3/apis/G/V; v2 is not served (404)."""
    if not parts or parts[0] != "v3":
        raise errors.not_found("openapi", "/".join(parts) or "openapi")
    documents = _documents(registry)
    if len(parts) == 1:
        index = {}
        for path, doc in documents.items():
            digest = hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]
            index[path] = {"serverRelativeURL": f"/openapi/v3/{path}?hash={digest}"}
        return {"paths": index}
    path = "/".join(parts[1:])
    if path not in documents:
        raise errors.not_found("openapi", path)
    return documents[path]
