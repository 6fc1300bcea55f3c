"""The CRD is generated from the models, structural, documented, and agrees with them."""

from __future__ import annotations

import copy
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from relora_api import crd, resource
from relora_sandbox import schema
from tests.conftest import EXAMPLES, ROOT

CRD_PATH = ROOT / "crds" / f"{resource.CRD_NAME}.yaml"


def _schema() -> dict[str, Any]:
    schema: dict[str, Any] = crd.crd()["spec"]["versions"][0]["schema"]["openAPIV3Schema"]
    return schema


def violations(document: Any, old: Any = schema.MISSING) -> list[str]:
    """What the API server (as emulated by the sandbox) refuses in ``document``, CEL included."""
    return [f"{path}: {message}" for path, message in schema.check(_schema(), document, old).causes]


def _nodes(node: dict[str, Any], path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    yield path, node
    for name, sub in node.get("properties", {}).items():
        yield from _nodes(sub, f"{path}.{name}")
    if isinstance(node.get("items"), dict):
        yield from _nodes(node["items"], f"{path}[]")
    if isinstance(node.get("additionalProperties"), dict):
        yield from _nodes(node["additionalProperties"], f"{path}{{}}")


def test_committed_crd_matches_the_models() -> None:
    committed = CRD_PATH.read_text(encoding="utf-8")
    assert committed == crd.render_yaml(), (
        f"{CRD_PATH.relative_to(ROOT)} drifted from the models: run `make crd` and commit it"
    )


def test_relora_crd_prints_the_committed_file() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "relora_cli", "crd"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out == CRD_PATH.read_text(encoding="utf-8")


def test_identity_and_subresources() -> None:
    manifest = yaml.safe_load(CRD_PATH.read_text())
    spec = manifest["spec"]
    assert manifest["metadata"]["name"] == "adaptermigrations.relora.dev"
    assert spec["group"] == "relora.dev"
    assert spec["scope"] == "Namespaced"
    assert spec["names"]["kind"] == "AdapterMigration"
    assert spec["names"]["plural"] == "adaptermigrations"
    assert spec["names"]["shortNames"] == ["am"]
    (version,) = spec["versions"]
    assert version["name"] == "v1alpha1"
    assert version["served"] and version["storage"]
    assert version["subresources"] == {"status": {}}


def test_printer_columns() -> None:
    columns = {c["name"]: c for c in crd.PRINTER_COLUMNS}
    assert columns["Ready"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].status'
    assert columns["Reason"]["jsonPath"] == '.status.conditions[?(@.type=="Ready")].reason'
    assert columns["Progress"]["jsonPath"] == ".status.progress"
    assert columns["Age"]["type"] == "date"
    assert [n for n, c in columns.items() if "priority" not in c] == [
        "Ready",
        "Reason",
        "Progress",
        "Age",
    ]
    assert columns["Source"]["priority"] == 1 and columns["Target"]["priority"] == 1


def test_schema_is_structural() -> None:
    for path, node in _nodes(_schema()):
        assert "$ref" not in node and "$defs" not in node, path
        assert "title" not in node and "default" not in node, path
        if node.get("x-kubernetes-int-or-string"):
            assert node["anyOf"] == [{"type": "integer"}, {"type": "string"}], path
            continue
        assert "anyOf" not in node and "oneOf" not in node and "allOf" not in node, path
        if node.get("x-kubernetes-preserve-unknown-fields"):
            assert node["type"] == "object", path
            continue
        assert node.get("type") in {"object", "array", "string", "integer", "number", "boolean"}, (
            f"{path} has no type"
        )
        assert not ("properties" in node and "additionalProperties" in node), path
        if node["type"] == "array":
            assert "items" in node, path


def test_every_field_is_described() -> None:
    undocumented = [p for p, node in _nodes(_schema()) if p and not node.get("description")]
    # Map values and list items are described by their parent field.
    undocumented = [p for p in undocumented if not p.endswith(("{}", "[]"))]
    assert undocumented == []


def test_defaults_are_named_in_descriptions() -> None:
    props = _schema()["properties"]["spec"]["properties"]
    finetune = props["method"]["properties"]["finetune"]["properties"]
    assert finetune["maxSteps"]["description"].endswith("Default: 300.")
    assert props["backoffLimit"]["description"].endswith("Default: 3.")
    assert props["method"]["properties"]["strategy"]["description"].endswith('Default: "relora".')


def test_lists_and_strings_are_bounded_for_cel_cost() -> None:
    spec = _schema()["properties"]["spec"]
    for path, node in _nodes(spec["properties"]["adapters"], ".spec.adapters"):
        if node.get("type") == "string":
            assert "maxLength" in node, f"{path}: unbounded string under a CEL-compared field"
        if node.get("type") == "array":
            assert "maxItems" in node, path
    status = _schema()["properties"]["status"]
    assert status["properties"]["adapters"]["maxItems"] == 64
    assert status["properties"]["conditions"]["x-kubernetes-list-map-keys"] == ["type"]


def test_crd_is_a_valid_kubernetes_object(tmp_path: Path) -> None:
    result = subprocess.run(
        [sys.executable, "-m", "kubernetes_validate", "--strict", "-k", "1.32.0", str(CRD_PATH)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert len(CRD_PATH.read_bytes()) < 262_144 // 4, "the CRD must stay far below apply limits"


@pytest.mark.parametrize("name", ["local-migration.yaml", "cluster-migration.yaml"])
def test_examples_pass_the_crd_schema_and_its_cel_rules(name: str) -> None:
    document = yaml.safe_load((EXAMPLES / name).read_text())
    jsonschema.Draft4Validator(_schema()).validate(document)
    assert violations(document) == []


def test_cel_rules_refuse_bad_uris_like_the_models(manifest: dict[str, Any]) -> None:
    manifest["spec"]["adapters"][0]["uri"] = "pvc://adapters/../../etc"
    manifest["spec"]["output"]["uri"] = "gs://bucket/out"
    assert violations(manifest) == [
        "spec.adapters[0].uri: must not contain '..' path segments",
        "spec.output.uri: unsupported URI scheme; use pvc://, s3://, hf:// or a plain path",
    ]


def test_cel_rules_make_models_and_adapters_immutable(manifest: dict[str, Any]) -> None:
    old = copy.deepcopy(manifest)
    manifest["spec"]["targetModel"]["revision"] = "v2"
    manifest["spec"]["adapters"][0]["uri"] = "pvc://adapters/sentiment/v9"
    manifest["spec"]["suspend"] = True  # mutable: allowed
    assert violations(manifest, old) == [
        "spec.targetModel: targetModel is immutable",
        "spec.adapters: adapters are immutable",
    ]
    assert violations(old, copy.deepcopy(old)) == []


def test_schema_refuses_wrong_types(manifest: dict[str, Any]) -> None:
    manifest["spec"]["backoffLimit"] = "three"
    errors = list(jsonschema.Draft4Validator(_schema()).iter_errors(manifest))
    assert [list(e.path) for e in errors] == [["spec", "backoffLimit"]]
