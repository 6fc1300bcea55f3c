"""Render the AdapterMigration CustomResourceDefinition from the pydantic models.

The models are the single source of truth; this module only translates pydantic's JSON Schema
(draft 2020-12 with ``$ref``) into a Kubernetes *structural* OpenAPI v3 schema: references
inlined, ``Optional`` unwrapped, ``int | str`` turned into ``x-kubernetes-int-or-string``,
titles and defaults dropped (defaults are applied by the models and named in descriptions).
"""

from __future__ import annotations

import json
from typing import Any

import yaml

from relora_api import resource
from relora_api.spec import AdapterMigrationSpec
from relora_api.status import AdapterMigrationStatus

JSONSchema = dict[str, Any]

# Keys a structural schema does not take (defaults are documented, applied by the models).
_DROPPED_KEYS = {"title", "default", "additionalProperties", "$defs", "examples", "propertyNames"}


def _inline(node: Any, defs: dict[str, JSONSchema]) -> Any:
    """Resolve ``$ref`` recursively; keys beside a ``$ref`` override the referenced ones."""
    if isinstance(node, list):
        return [_inline(item, defs) for item in node]
    if not isinstance(node, dict):
        return node
    if "$ref" in node:
        target = defs[node["$ref"].rsplit("/", 1)[-1]]
        merged = {**target, **{k: v for k, v in node.items() if k != "$ref"}}
        return _inline(merged, defs)
    return {key: _inline(value, defs) for key, value in node.items()}


def _structural(node: JSONSchema) -> JSONSchema:
    """Turn one (already inlined) pydantic schema node into a structural schema node."""
    node = dict(node)
    any_of = node.pop("anyOf", None)
    if any_of is not None:
        variants = [v for v in any_of if v.get("type") != "null"]
        types = sorted(v.get("type", "") for v in variants)
        if len(variants) == 1:
            # Optional[X]: keep X, with the outer node's description and extensions on top.
            node = {**variants[0], **node}
        elif types == ["integer", "string"]:
            # A Kubernetes quantity: the form controller-gen emits.
            patterns = [v["pattern"] for v in variants if "pattern" in v]
            if patterns and "pattern" not in node:
                node["pattern"] = patterns[0]
            return {
                "anyOf": [{"type": "integer"}, {"type": "string"}],
                **_structural(node),
                "x-kubernetes-int-or-string": True,
            }
        else:
            raise ValueError(f"cannot express anyOf {types} in a structural schema")
        return _structural(node)

    out: JSONSchema = {}
    for key, value in node.items():
        if key in _DROPPED_KEYS:
            continue
        if key == "properties":
            out["properties"] = {name: _structural(sub) for name, sub in value.items()}
        elif key == "items":
            out["items"] = _structural(value)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "maxLength" and node.get("type") == "array":
            out["maxItems"] = value
        elif key == "minLength" and node.get("type") == "array":
            out["minItems"] = value
        elif key == "maxLength" and node.get("type") == "object":
            out["maxProperties"] = value
        else:
            out[key] = value
    extra = node.get("additionalProperties")
    if isinstance(extra, dict) and "properties" not in node:
        out["additionalProperties"] = _structural(extra) if extra else {}
    if out.get("type") == "string" and "enum" in out and "maxLength" not in out:
        # Bounds CEL cost estimation on rules that compare whole objects (self == oldSelf).
        out["maxLength"] = max(len(v) for v in out["enum"])
    if out.get("x-kubernetes-preserve-unknown-fields"):
        out.pop("additionalProperties", None)
    if "pattern" in out and out.get("type") not in (None, "string"):
        out.pop("pattern")
    default = node.get("default")
    if isinstance(default, str | int | float) and "Default" not in out.get("description", ""):
        # Documented, not applied by the API server: the models apply defaults.
        out["description"] = f"{out.get('description', '')} Default: {json.dumps(default)}."
    return out


def _section(model: type[AdapterMigrationSpec] | type[AdapterMigrationStatus]) -> JSONSchema:
    schema = model.model_json_schema(by_alias=True, mode="validation")
    defs = schema.get("$defs", {})
    return _structural(_inline(schema, defs))


def openapi_schema() -> JSONSchema:
    """The openAPIV3Schema of the AdapterMigration CRD."""
    return {
        "type": "object",
        "description": (
            "AdapterMigration migrates LoRA adapters trained on an old base model to a new "
            "version of that model (ReLoRA: searched fusion initialization + regularized "
            "fine-tuning), one Job per adapter, until each adapter meets its quality target."
        ),
        "required": ["spec"],
        "properties": {
            "apiVersion": {
                "type": "string",
                "description": "APIVersion of this object: relora.dev/v1alpha1.",
            },
            "kind": {"type": "string", "description": "Kind of this object: AdapterMigration."},
            "metadata": {"type": "object", "description": "Standard object metadata."},
            "spec": _section(AdapterMigrationSpec),
            "status": _section(AdapterMigrationStatus),
        },
    }


PRINTER_COLUMNS: list[JSONSchema] = [
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].status',
        "description": "Whether every adapter met its readiness target.",
    },
    {
        "name": "Reason",
        "type": "string",
        "jsonPath": '.status.conditions[?(@.type=="Ready")].reason',
        "description": "Why the migration is (not) ready.",
    },
    {
        "name": "Progress",
        "type": "string",
        "jsonPath": ".status.progress",
        "description": "Finished adapters out of all.",
    },
    {
        "name": "Age",
        "type": "date",
        "jsonPath": ".metadata.creationTimestamp",
        "description": "Time since creation.",
    },
    {
        "name": "Source",
        "type": "string",
        "jsonPath": ".spec.sourceModel.uri",
        "priority": 1,
        "description": "The old base model.",
    },
    {
        "name": "Target",
        "type": "string",
        "jsonPath": ".spec.targetModel.uri",
        "priority": 1,
        "description": "The new base model.",
    },
    {
        "name": "Strategy",
        "type": "string",
        "jsonPath": ".spec.method.strategy",
        "priority": 1,
        "description": "The migration strategy (empty: relora).",
    },
]


def crd() -> JSONSchema:
    """The CustomResourceDefinition manifest."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": resource.CRD_NAME,
            "labels": {"app.kubernetes.io/name": "relora-operator"},
        },
        "spec": {
            "group": resource.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": resource.KIND,
                "listKind": f"{resource.KIND}List",
                "plural": resource.PLURAL,
                "singular": resource.SINGULAR,
                "shortNames": resource.SHORT_NAMES,
                "categories": resource.CATEGORIES,
            },
            "versions": [
                {
                    "name": resource.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = (
    "# Generated from the pydantic models in operator/relora_api by `relora crd`.\n"
    "# Do not edit: run `make crd` after changing the models (a test fails on drift).\n"
)


def render_yaml() -> str:
    """The CRD as YAML, exactly as committed in crds/."""
    return HEADER + yaml.safe_dump(crd(), sort_keys=False, width=100, allow_unicode=True)
