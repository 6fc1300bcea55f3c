"""`relora validate`: accepts the examples, refuses bad manifests with one field-named line each."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

import relora_cli as cli
from relora_api.resource import AdapterMigration
from relora_trainer.errors import EXIT_BAD_INPUT, EXIT_OK, EXIT_USAGE
from tests.conftest import EXAMPLES

Mutation = Callable[[dict[str, Any]], None]


def _set(path: str, value: Any) -> Mutation:
    """A mutation that sets a dotted path (``spec.adapters.0.name``) in a manifest."""

    def mutate(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = manifest
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        if isinstance(node, list):
            node[int(last)] = value
        else:
            node[last] = value

    return mutate


def _delete(path: str) -> Mutation:
    def mutate(manifest: dict[str, Any]) -> None:
        *parents, last = path.split(".")
        node: Any = manifest
        for part in parents:
            node = node[int(part)] if isinstance(node, list) else node[part]
        del node[last]

    return mutate


def _duplicate_first_adapter(manifest: dict[str, Any]) -> None:
    manifest["spec"]["adapters"].append(dict(manifest["spec"]["adapters"][0]))


INVALID: list[tuple[str, Mutation, str]] = [
    ("wrong kind", _set("kind", "Adapter"), "kind: must be 'AdapterMigration', got 'Adapter'"),
    ("wrong apiVersion", _set("apiVersion", "relora.dev/v1"), "apiVersion: must be"),
    ("missing name", _delete("metadata.name"), "metadata.name: required field is missing"),
    (
        "bad resource name",
        _set("metadata.name", "My_Migration"),
        "metadata.name: must be a lower-case DNS name",
    ),
    ("missing spec", _delete("spec"), "spec: required field is missing"),
    (
        "missing target model",
        _delete("spec.targetModel"),
        "spec.targetModel: required field is missing",
    ),
    (
        "model is a string",
        _set("spec.sourceModel", "hf://org/name"),
        "spec.sourceModel: must be a valid dictionary",
    ),
    ("no adapters", _set("spec.adapters", []), "spec.adapters: List should have at least 1 item"),
    (
        "path escape",
        _set("spec.adapters.0.uri", "pvc://adapters/../../etc"),
        "spec.adapters[0].uri: must not contain '..' path segments",
    ),
    (
        "relative path escape",
        _set("spec.output.uri", "../outside"),
        "spec.output.uri: must not contain '..' path segments",
    ),
    (
        "unsupported scheme",
        _set("spec.adapters.1.data.train", "gs://bucket/train.jsonl"),
        "spec.adapters[1].data.train: unsupported URI scheme 'gs://'",
    ),
    (
        "hf uri without name",
        _set("spec.targetModel.uri", "hf://meta-llama"),
        "spec.targetModel.uri: expected hf://ORG/NAME",
    ),
    (
        "revision on a pvc",
        _set("spec.sourceModel", {"uri": "pvc://models/v1", "revision": "main"}),
        "spec.sourceModel: revision applies to hf:// URIs only",
    ),
    (
        "negative step budget",
        _set("spec.method.finetune.maxSteps", -5),
        "spec.method.finetune.maxSteps: must be greater than or equal to 0",
    ),
    (
        "negative trials",
        _set("spec.method.initialization", {"trials": -1}),
        "spec.method.initialization.trials: must be greater than or equal to 0",
    ),
    (
        "learning rate is text",
        _set("spec.method.finetune.learningRate", "fast"),
        "spec.method.finetune.learningRate: must be a valid number",
    ),
    (
        "unknown strategy",
        _set("spec.method.strategy", "distill"),
        "spec.method.strategy: must be 'relora', 'scratch', 'reuse' or 'warm-start', got 'distill'",
    ),
    (
        "unknown top-level field",
        _set("spec.backofLimit", 2),
        "spec.backofLimit: unknown field; remove it (did you mean 'backoffLimit'?)",
    ),
    (
        "unknown nested field",
        _set("spec.adapters.0.data.validaton", "x.jsonl"),
        "spec.adapters[0].data.validaton: unknown field; remove it (did you mean 'validation'?)",
    ),
    (
        "duplicate adapter names",
        _duplicate_first_adapter,
        "spec.adapters: duplicate adapter names ['sentiment']; each adapter needs a unique name",
    ),
    (
        "bad adapter name",
        _set("spec.adapters.0.name", "Sentiment_V1"),
        "spec.adapters[0].name: must be lower-case letters, digits and '-'",
    ),
    (
        "both readiness targets",
        _set("spec.adapters.0.readiness", {"target": 0.9, "relativeToSource": 1.0}),
        "spec.adapters[0].readiness: set either target or relativeToSource, not both",
    ),
    (
        "accuracy target above 1",
        _set("spec.adapters.0.readiness", {"metric": "accuracy", "target": 90}),
        "spec.adapters[0].readiness: an accuracy target must be in (0, 1]",
    ),
    (
        "inverted coefficient range",
        _set("spec.method.initialization", {"alpha": {"min": 2, "max": 1}}),
        "spec.method.initialization.alpha: min (2.0) must not be greater than max (1.0)",
    ),
    (
        "same source and target",
        _set("spec.targetModel", {"uri": "hf://meta-llama/Llama-3.1-8B", "revision": "main"}),
        "spec: sourceModel and targetModel are the same model; nothing to migrate",
    ),
    (
        "backoff limit too high",
        _set("spec.backoffLimit", 1000),
        "spec.backoffLimit: must be less than or equal to 20",
    ),
    (
        "env with value and secret",
        _set(
            "spec.env.0",
            {
                "name": "HF_TOKEN",
                "value": "x",
                "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}},
            },
        ),
        "spec.env[0]: set either value or valueFrom, not both",
    ),
    (
        "quantity is a list",
        _set("spec.resources.limits.memory", ["64Gi"]),
        "spec.resources.limits.memory: must be a quantity such as 1, '500m' or '16Gi'",
    ),
    (
        "quantity with a bad unit",
        _set("spec.resources.requests.memory", "64GB"),
        "spec.resources.requests.memory: '64GB' is not a quantity",
    ),
    (
        "too many adapters",
        lambda m: m["spec"].__setitem__(
            "adapters", [{**m["spec"]["adapters"][0], "name": f"a{i}"} for i in range(65)]
        ),
        "spec.adapters: List should have at most 64 items",
    ),
]


@pytest.mark.parametrize(("case", "mutate", "expected"), INVALID, ids=[c for c, _, _ in INVALID])
def test_invalid_manifest_is_refused_with_the_field_named(
    case: str,
    mutate: Mutation,
    expected: str,
    manifest: dict[str, Any],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mutate(manifest)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert cli.main(["validate", "-f", str(path)]) == EXIT_BAD_INPUT
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert any(line.startswith(f"{path}: {expected}") for line in lines), err


def test_there_are_at_least_fifteen_invalid_cases() -> None:
    assert len(INVALID) >= 15


def test_examples_are_valid(capsys: pytest.CaptureFixture[str]) -> None:
    files = sorted(str(p) for p in EXAMPLES.glob("*.yaml"))
    assert len(files) >= 2
    args = ["validate"] + [arg for f in files for arg in ("-f", f)]
    assert cli.main(args) == EXIT_OK
    out = capsys.readouterr().out
    assert out.count("valid AdapterMigration") == len(files)


def test_defaults_apply_when_omitted(manifest: dict[str, Any]) -> None:
    del manifest["spec"]["method"]
    migration = AdapterMigration.from_manifest(manifest)
    method = migration.spec.method
    assert method.strategy == "relora"
    assert method.initialization.sampler == "gp" and method.initialization.trials == 0
    assert (method.initialization.alpha.min, method.initialization.alpha.max) == (0.0, 1.5)
    assert method.finetune.regularization.schedule == "step"
    assert migration.spec.adapters[1].readiness.target == 0.9
    assert migration.spec.suspend is False


def test_wire_round_trip(manifest: dict[str, Any]) -> None:
    spec = AdapterMigration.from_manifest(manifest).spec
    wire = spec.to_wire()
    assert wire["sourceModel"] == manifest["spec"]["sourceModel"]
    assert wire["adapters"][0]["readiness"]["relativeToSource"] == 0.99
    assert type(spec).model_validate(wire) == spec


def test_every_problem_is_reported_one_per_line(
    manifest: dict[str, Any], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    manifest["spec"]["backoffLimit"] = -1
    manifest["spec"]["adapters"][0]["uri"] = "gs://x/y"
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert cli.main(["validate", "-f", str(path)]) == EXIT_BAD_INPUT
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 2
    assert {line.split(": ")[1] for line in lines} == {"spec.adapters[0].uri", "spec.backoffLimit"}


def test_duplicate_yaml_keys_are_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    text = (EXAMPLES / "local-migration.yaml").read_text()
    path = tmp_path / "dup.yaml"
    path.write_text(text.replace("  suspend", "") + "  output:\n    uri: elsewhere\n")
    assert cli.main(["validate", "-f", str(path)]) == EXIT_USAGE
    assert "duplicate key 'output'" in capsys.readouterr().err


def test_yaml_syntax_error_names_the_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: relora.dev/v1alpha1\nkind: [AdapterMigration\n")
    assert cli.main(["validate", "-f", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: invalid YAML: line ")


def test_missing_file(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "-f", "/nonexistent/m.yaml"]) == EXIT_USAGE
    assert "/nonexistent/m.yaml: cannot read" in capsys.readouterr().err


def test_multi_document_file_skips_other_kinds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    secret = "apiVersion: v1\nkind: Secret\nmetadata: {name: hf-credentials}\n"
    path = tmp_path / "bundle.yaml"
    path.write_text(secret + "---\n" + (EXAMPLES / "cluster-migration.yaml").read_text())
    assert cli.main(["validate", "-f", str(path)]) == EXIT_OK
    out = capsys.readouterr().out
    assert "skipped Secret" in out and "(document 2): valid AdapterMigration" in out


def test_a_file_without_migrations_is_refused(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "cm.yaml"
    path.write_text("apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n")
    assert cli.main(["validate", "-f", str(path)]) == EXIT_BAD_INPUT
    assert "no AdapterMigration found" in capsys.readouterr().err


def test_reads_standard_input() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "relora_cli", "validate", "-f", "-"],
        input=(EXAMPLES / "local-migration.yaml").read_text(),
        capture_output=True,
        text=True,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("-: valid AdapterMigration 'toy-v1-to-v2'")
