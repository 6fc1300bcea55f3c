"""PATCH bodies: JSON merge patch, JSON patch (RFC 6902) and strategic merge patch.

Strategic merge follows the Kubernetes rules for the fields clients patch in practice: lists
merged by key (containers and env by name, conditions by type, ownerReferences by uid, ...),
primitive sets (finalizers) merged as unions, and the ``$patch``, ``$retainKeys``,
``$setElementOrder/`` and ``$deleteFromPrimitiveList/`` directives. Other lists are replaced.
"""

from __future__ import annotations

import copy
from typing import Any

import jsonpatch

from relora_sandbox.errors import APIError, bad_request

MERGE = "application/merge-patch+json"
JSON_PATCH = "application/json-patch+json"
STRATEGIC = "application/strategic-merge-patch+json"
APPLY = "application/apply-patch+yaml"

MERGE_KEYS = {
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "ports": "containerPort",
    "conditions": "type",
    "ownerReferences": "uid",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "topologySpreadConstraints": "topologyKey",
}
PRIMITIVE_SETS = {"finalizers"}


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386: maps merge recursively, null deletes, anything else replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def json_patch(target: Any, operations: Any) -> Any:
    """RFC 6902; a failed ``test`` or a bad path is 422 Unprocessable, as the API server says."""
    if not isinstance(operations, list):
        raise bad_request("a JSON patch must be a list of operations")
    try:
        return jsonpatch.apply_patch(target, operations)
    except jsonpatch.JsonPatchTestFailed as error:
        raise APIError(422, "Invalid", f"the server rejected our request: {error}") from error
    except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException) as error:
        raise APIError(422, "Invalid", f"the server rejected our request: {error}") from error


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    """Kubernetes strategic merge patch for built-in kinds."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys") or key.startswith("$setElementOrder/"):
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            result[field] = [v for v in result.get(field) or [] if v not in value]
            continue
        if value is None:
            result.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS:
            result[key] = _merge_list(result.get(key) or [], value, MERGE_KEYS[key])
        elif isinstance(value, list) and key in PRIMITIVE_SETS:
            merged = list(result.get(key) or [])
            result[key] = merged + [v for v in value if v not in merged]
        elif isinstance(value, dict):
            merged_value = strategic_merge_patch(result.get(key), value)
            if merged_value is None:
                result.pop(key, None)
            else:
                result[key] = merged_value
        else:
            result[key] = copy.deepcopy(value)
    if isinstance(retain, list):
        result = {k: v for k, v in result.items() if k in retain}
    return result


def _merge_list(current: list[Any], patch: list[Any], key: str) -> list[Any]:
    merged = copy.deepcopy(current)
    for item in patch:
        if not isinstance(item, dict) or key not in item:
            return copy.deepcopy(patch)  # not keyed as expected: replace, as for atomic lists
        index = next((i for i, e in enumerate(merged) if e.get(key) == item[key]), None)
        if item.get("$patch") == "delete":
            if index is not None:
                merged.pop(index)
        elif index is None:
            merged.append({k: v for k, v in item.items() if k != "$patch"})
        else:
            merged[index] = strategic_merge_patch(merged[index], item)
    return merged


def apply(content_type: str, target: dict[str, Any], body: Any, *, builtin: bool) -> Any:
    """The patched object for a PATCH request of ``content_type``."""
    kind = content_type.split(";")[0].strip()
    if kind == MERGE:
        return merge_patch(target, body)
    if kind == JSON_PATCH:
        return json_patch(target, body)
    if kind == STRATEGIC:
        if not builtin:
            raise APIError(
                415,
                "UnsupportedMediaType",
                "the body of the request was in an unknown format - accepted media types "
                f"include: {JSON_PATCH}, {MERGE}, {APPLY}",
            )
        return strategic_merge_patch(target, body)
    if kind == APPLY:
        # Server-side apply, approximated: the applied configuration is merged in
        # (no field ownership or conflict detection).
        return merge_patch(target, body)
    raise APIError(415, "UnsupportedMediaType", f"unsupported patch type {kind!r}")
