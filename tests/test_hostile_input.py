"""Hostile manifests: validation never crashes, names real fields and agrees with the CRD.

A manifest meets two gates: the pydantic models (`relora validate`, the local runner, the
operator) and the CRD generated from them (the API server: its schema and CEL rules, evaluated
here by the sandbox's validator). Property-based tests (hypothesis) mutate the example manifests
with values drawn from the CRD schema itself (bounds, bounds + 1, enums, patterns) and with
arbitrary JSON (wrong types, huge numbers, unicode, long strings, deep nesting) and check:

- validation returns problems, never raises, one short line each, naming a field of the input
  or of the schema;
- what the models accept, the CRD accepts; what the models refuse for a reason the CRD can
  express (types, bounds, enums, patterns, URIs, required and unknown fields), the CRD refuses
  at the same path. Only cross-field rules (``min <= max``, ``value`` xor ``valueFrom``...) are
  the models' alone.
"""

from __future__ import annotations

import copy
import posixpath
import re
from collections.abc import Iterator
from functools import cache
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

import relora_cli as cli
from relora_api import crd, manifests, uris, validation
from relora_api.resource import AdapterMigration
from relora_sandbox import schema as sandbox_schema
from relora_trainer.errors import EXIT_BAD_INPUT, EXIT_USAGE
from relora_trainer.storage import Storage
from tests.conftest import EXAMPLES
from tests.test_crd import _nodes

SCHEMA: dict[str, Any] = crd.openapi_schema()
SPEC: dict[str, Any] = SCHEMA["properties"]["spec"]
EXAMPLE_MANIFESTS: dict[str, dict[str, Any]] = {
    path.name: yaml.safe_load(path.read_text()) for path in sorted(EXAMPLES.glob("*.yaml"))
}
PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

Loc = tuple[int | str, ...]


# ------------------------------------------------------------------ the two gates
def crd_problems(document: Any) -> dict[str, list[str]]:
    """What the API server refuses in ``document`` (CEL rules included), by field path; unknown
    fields count as refused (kubectl's default fieldValidation=Strict)."""
    outcome = sandbox_schema.check(SCHEMA, document)
    if not outcome.causes and not outcome.unknown:
        # A second opinion on what the API server stores (nulls pruned, as it does).
        jsonschema.Draft4Validator(SCHEMA).validate(outcome.value)
    found: dict[str, list[str]] = {}
    for path, message in outcome.causes:
        found.setdefault(path, []).append(message)
    for path in outcome.unknown:
        found.setdefault(path, []).append("unknown field")
    return found


def schema_node(loc: Loc) -> dict[str, Any] | None:
    """The CRD schema node at a pydantic location (None outside the schema)."""
    node: dict[str, Any] | None = SCHEMA
    for part in loc:
        if node is None:
            return None
        if isinstance(part, int) and node.get("type") == "array":
            node = node.get("items")
        elif part in node.get("properties", {}):
            node = node["properties"][part]
        elif isinstance(node.get("additionalProperties"), dict):
            node = node["additionalProperties"]
        else:
            return None
    return node


def _is_scalar(node: dict[str, Any] | None) -> bool:
    return node is not None and (
        node.get("type") in ("string", "integer", "number", "boolean")
        or bool(node.get("x-kubernetes-int-or-string"))
    )


def crd_expressible(error: Any) -> bool:
    """Whether the CRD can refuse what pydantic refused here: anything but a cross-field rule
    (a model or list validator: ``value_error`` on an object or array) and mapping keys."""
    loc = tuple(error["loc"])
    if "[key]" in loc or not loc or loc[0] != "spec":
        return False
    if error["type"] == "value_error":
        return _is_scalar(schema_node(loc))
    return True


def input_paths(document: Any) -> set[str]:
    """Every field path of ``document``, and every schema field that could be added to one of
    its objects (a missing required field is named by such a path)."""
    paths = {""}
    stack: list[tuple[Any, Loc]] = [(document, ())]
    while stack:
        node, loc = stack.pop()
        if len(loc) > 40:
            continue  # deeper than any schema field: only its top is named in a problem
        paths.add(validation.field_path(loc, document))
        if isinstance(node, dict):
            here = schema_node(loc)
            for name in (here or {}).get("properties", {}):
                paths.add(validation.field_path((*loc, name), document))
            stack.extend((value, (*loc, key)) for key, value in node.items())
        elif isinstance(node, list):
            stack.extend((value, (*loc, index)) for index, value in enumerate(node))
    if isinstance(document, dict):
        for name in AdapterMigration.model_fields:
            paths.add(name if name != "api_version" else "apiVersion")
    return paths


def check_problems(document: Any) -> tuple[Any, list[validation.Problem]]:
    """validate_manifest's verdict, with the properties every verdict has."""
    migration, problems = validation.validate_manifest(document)
    assert (migration is None) == bool(problems), "a resource or problems, never both"
    known = input_paths(document)
    for problem in problems:
        line = str(problem)
        assert len(line.splitlines()) == 1 and line.isprintable(), repr(line)
        assert len(line) < 700, line
        assert problem.path in known, f"{problem.path!r} is in neither the input nor the schema"
    return migration, problems


def check_agreement(document: dict[str, Any]) -> None:
    """The models and the CRD agree on ``document`` (as far as the CRD can express)."""
    migration, _ = check_problems(document)
    refused = crd_problems(document)
    if migration is not None:
        assert refused == {}, f"the models accept what the CRD refuses: {refused}"
        return
    try:
        AdapterMigration.model_validate(document)
    except ValidationError as error:
        for item in error.errors(include_url=False):
            if crd_expressible(item):
                path = validation.field_path(tuple(item["loc"]), document)
                assert path in refused, (
                    f"the models refuse {path} ({item['msg']}) but the CRD does not: {refused}"
                )
    else:  # pragma: no cover - validate_manifest said no
        raise AssertionError("validate_manifest refused what model_validate accepts")


# ------------------------------------------------------------------ strategies
PLAIN_KEYS = st.from_regex(r"[a-z][a-zA-Z0-9]{0,11}", fullmatch=True)
ODD_TEXT = st.sampled_from(
    ["", " ", "\x00", "..", "a\nb", "\u2028", "\u202e", "é", "\U0001d518", "\ud7ff", "x" * 5000]
)
SCALARS = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**80), max_value=2**80),
    st.sampled_from([0, -1, 2**31 - 1, 2**31, 2**63 - 1, 2**63, 10**30]),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=20),
    ODD_TEXT,
)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(PLAIN_KEYS, inner, max_size=3),
    max_leaves=8,
)
ANY_KEYS = st.one_of(PLAIN_KEYS, st.text(max_size=30), ODD_TEXT.filter(bool))
WILD_VALUES = st.recursive(
    SCALARS | st.floats(),  # NaN and infinities too: YAML has .nan and .inf
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(ANY_KEYS, inner, max_size=4),
    max_leaves=20,
)

SEGMENTS = st.one_of(
    st.sampled_from(
        [
            "..",
            ".",
            "%2e%2e",
            "%2E%2e",
            ".%2e",
            "%2e.",
            "...",
            "a..b",
            "",
            "a",
            "claim",
            "my-bucket",
            "org",
            "Name_1.x",
            "a\\..\\b",
            "\\",
            "%2f..%2f",
            "%5c..",
            "..%2f",
            "\x00",
            "\t",
            " ",
            "\u00a0",
            "\u3000",
            "é",
            "a:b",
            "x" * 300,
        ]
    ),
    st.text(max_size=6),
)
URI_PREFIXES = st.sampled_from(
    [
        *("", "", "/", "pvc://", "s3://", "hf://", "file://", "gs://", "PVC://", "javascript:"),
        *("data:", "http://", "C:", "pvc:", " pvc://", "hf:///", "s3:///"),
    ]
)
URIS = st.one_of(
    st.builds(lambda p, s: p + "/".join(s), URI_PREFIXES, st.lists(SEGMENTS, max_size=5)),
    st.text(max_size=12),
    st.text(alphabet="a/.%2e", min_size=1018, max_size=1030),
)


def _is_uri(node: dict[str, Any]) -> bool:
    return any("matches" in rule["rule"] for rule in node.get("x-kubernetes-validations", []))


@cache
def _strategy(node_id: int) -> st.SearchStrategy[Any]:
    return _from_schema(_NODES[node_id])


_NODES: dict[int, dict[str, Any]] = {}


def from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    """Values for a schema node: mostly valid, often at a bound, sometimes one past it."""
    _NODES[id(node)] = node
    return _strategy(id(node))


def _from_schema(node: dict[str, Any]) -> st.SearchStrategy[Any]:
    if node.get("x-kubernetes-int-or-string"):
        return st.one_of(
            st.integers(min_value=-(2**64), max_value=2**64),
            st.from_regex(node["pattern"], fullmatch=True),
            st.text(max_size=8),
            st.text(alphabet="9", min_size=node["maxLength"], max_size=node["maxLength"] + 1),
        )
    kind = node.get("type")
    if kind == "boolean":
        return st.booleans()
    if kind == "integer":
        low, high = node.get("minimum", -(2**63)), node.get("maximum", 2**63)
        return st.integers(low, high) | st.sampled_from([low - 1, low, high, high + 1])
    if kind == "number":
        low, high = node.get("minimum", -1e9), node.get("maximum", 1e9)
        edges = [low, high, low - 1, high + 1, high * 2]
        return st.floats(low, high) | st.sampled_from(edges) | st.integers(-3, 3)
    if kind == "string":
        if "enum" in node:
            return st.sampled_from(node["enum"]) | st.text(max_size=4)
        if _is_uri(node):
            return URIS
        longest = node.get("maxLength", 64)
        edge = st.text(alphabet="ab", min_size=longest, max_size=longest + 1)
        if "pattern" in node:
            return st.from_regex(node["pattern"], fullmatch=True) | edge | st.text(max_size=6)
        return st.text(max_size=12) | edge
    if kind == "array":
        items = from_schema(node["items"])
        return st.lists(items, min_size=node.get("minItems", 0), max_size=2)
    if kind == "object" and "properties" in node:
        required = set(node.get("required", []))
        properties = node["properties"]
        return st.fixed_dictionaries(
            {k: from_schema(v) for k, v in properties.items() if k in required},
            optional={k: from_schema(v) for k, v in properties.items() if k not in required},
        )
    if isinstance(node.get("additionalProperties"), dict):
        return st.dictionaries(PLAIN_KEYS, from_schema(node["additionalProperties"]), max_size=2)
    return st.dictionaries(PLAIN_KEYS, JSON_VALUES, max_size=2)  # free-form (affinity)


def schema_paths(node: dict[str, Any], loc: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every field of a schema node, '[]' for list items and '{}' for map values."""
    yield loc
    for name, sub in node.get("properties", {}).items():
        yield from schema_paths(sub, (*loc, name))
    if isinstance(node.get("items"), dict):
        yield from schema_paths(node["items"], (*loc, "[]"))
    if isinstance(node.get("additionalProperties"), dict):
        yield from schema_paths(node["additionalProperties"], (*loc, "{}"))


SPEC_FIELDS = [p for p in schema_paths(SPEC) if p]


def _node_at(path: tuple[str, ...]) -> dict[str, Any]:
    node = SPEC
    for part in path:
        node = (
            node["items"]
            if part == "[]"
            else node["additionalProperties"]
            if part == "{}"
            else (node["properties"][part])
        )
    return node


def _set(spec: dict[str, Any], path: tuple[str, ...], value: Any, data: st.DataObject) -> bool:
    """Set ``path`` in ``spec`` (creating parents); False when a mutation already broke it."""
    node: Any = spec
    for position, part in enumerate(path):
        last = position == len(path) - 1
        if part == "[]":
            if not isinstance(node, list):
                return False
            if not node or data.draw(st.booleans()):
                node.append({} if not last else value)
                index = len(node) - 1
            else:
                index = data.draw(st.integers(0, len(node) - 1))
            if last:
                node[index] = value
            node = node[index]
            continue
        if not isinstance(node, dict):
            return False
        key = data.draw(PLAIN_KEYS) if part == "{}" else part
        if last:
            node[key] = value
        else:
            following = path[position + 1]
            node = node.setdefault(key, [] if following == "[]" else {})
    return True


def _existing(node: Any, loc: Loc = ()) -> Iterator[Loc]:
    yield loc
    if isinstance(node, dict):
        for key, value in node.items():
            yield from _existing(value, (*loc, key))
    elif isinstance(node, list):
        for index, value in enumerate(node):
            yield from _existing(value, (*loc, index))


def mutate(document: dict[str, Any], data: st.DataObject, *, wild: bool) -> None:
    """One random change to the spec of ``document``."""
    spec = document["spec"]
    action = data.draw(st.sampled_from(["schema", "wrong", "delete", "unknown"]))
    if action in ("schema", "wrong"):
        path = data.draw(st.sampled_from(SPEC_FIELDS))
        values = from_schema(_node_at(path)) if action == "schema" else JSON_VALUES
        _set(spec, path, data.draw(WILD_VALUES if wild else values), data)
        return
    locs = [loc for loc in _existing(spec) if loc]
    if not locs:
        return
    loc = data.draw(st.sampled_from(locs))
    parent: Any = spec
    for part in loc[:-1]:
        parent = parent[part]
    if action == "delete":
        del parent[loc[-1]]
    elif isinstance(parent, dict):
        parent[data.draw(ANY_KEYS if wild else PLAIN_KEYS)] = data.draw(JSON_VALUES)


def mutated_example(data: st.DataObject, *, wild: bool = False) -> dict[str, Any]:
    name = data.draw(st.sampled_from(sorted(EXAMPLE_MANIFESTS)))
    document = copy.deepcopy(EXAMPLE_MANIFESTS[name])
    for _ in range(data.draw(st.integers(1, 3))):
        mutate(document, data, wild=wild)
    return document


# ------------------------------------------------------------------ manifests
@PROPERTY
@given(data=st.data())
def test_the_models_and_the_crd_agree_on_mutated_examples(data: st.DataObject) -> None:
    check_agreement(mutated_example(data))


@PROPERTY
@given(data=st.data())
def test_validation_of_wild_manifests_returns_one_line_problems(data: st.DataObject) -> None:
    if data.draw(st.booleans()):
        document = data.draw(WILD_VALUES)
    else:
        document = mutated_example(data, wild=True)
    check_problems(document)


def test_the_property_helpers_can_fail() -> None:
    """The oracles above are not vacuous: a known disagreement and a made-up path are caught."""
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    document["spec"]["backoffLimit"] = 21
    assert crd_problems(document) == {"spec.backoffLimit": ["should be <= 20"]}
    assert "spec.backoffLimit" in input_paths(document)
    assert "spec.adapters[0].nope" not in input_paths(document)
    assert validation.field_path(("spec", "nodeSelector", "a\nb"), document).endswith("['a\\nb']")


@pytest.mark.parametrize(
    ("path", "value", "reason"),
    [
        ("spec.backoffLimit", "2", "a string is not an integer"),
        ("spec.backoffLimit", 2.0, "a float is not an integer"),
        ("spec.backoffLimit", True, "a boolean is not an integer"),
        ("spec.suspend", "yes", "a string is not a boolean"),
        ("spec.suspend", 1, "an integer is not a boolean"),
        ("spec.method.finetune.learningRate", "0.001", "a string is not a number"),
        ("spec.resources.limits.memory", "16Gi\n", "'$' does not match before a newline"),
        ("spec.resources.limits.memory", 2**63, "beyond int64"),
        ("spec.resources.limits.memory", "9" * 65, "longer than maxLength"),
        ("spec.nodeSelector.zone", "x" * 64, "a label value is at most 63 characters"),
        ("spec.nodeSelector.zone", "a b", "a label value has no spaces"),
        ("spec.activeDeadlineSeconds", 10**30, "beyond the bound"),
        ("spec.preRunningDeadlineSeconds", 2**31, "beyond the bound"),
        ("spec.ttlSecondsAfterFinished", 2**31, "beyond batch/v1's int32"),
        ("spec.tolerations.0.tolerationSeconds", 2**31, "beyond the bound"),
        ("spec.adapters.1.readiness.target", 1e308, "a loss target beyond the bound"),
    ],
)
def test_disagreements_found_are_fixed(path: str, value: Any, reason: str) -> None:
    """Regressions: each of these was accepted by `relora validate` (or by both gates)."""
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    document["spec"]["nodeSelector"]["zone"] = "a"
    document["spec"]["adapters"][1]["readiness"] = {"metric": "loss", "target": 1.0}
    *parents, last = path.split(".")
    node: Any = document
    for part in parents:
        node = node[int(part)] if isinstance(node, list) else node[part]
    node[last] = value
    _, problems = check_problems(document)
    shown = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)
    assert [p.path for p in problems] == [shown], (reason, problems)
    assert shown in crd_problems(document), reason


def test_nulls_are_unset_fields_as_on_the_api_server() -> None:
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    document["spec"]["backoffLimit"] = None  # pruned by the API server: the default applies
    document["spec"]["adapters"][0]["uri"] = None  # pruned: a required field goes missing
    _, problems = check_problems(document)
    assert [str(p) for p in problems] == ["spec.adapters[0].uri: required field is missing"]
    assert crd_problems(document) == {"spec.adapters[0].uri": ["Required value"]}


def test_infinite_and_nan_values_are_refused() -> None:
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    document["spec"]["adapters"][1]["readiness"] = {"metric": "loss", "target": float("inf")}
    document["spec"]["method"]["finetune"]["learningRate"] = float("nan")
    _, problems = check_problems(document)
    assert {p.path for p in problems} == {
        "spec.adapters[1].readiness.target",
        "spec.method.finetune.learningRate",
    }


def test_huge_inputs_give_short_messages() -> None:
    """A huge value is not echoed whole (it was: 500 MB of error text for a YAML bomb)."""
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    document["spec"]["method"]["strategy"] = [["x" * 10_000] * 100] * 100
    document["spec"]["adapters"][0]["name"] = "N" * 40
    document["spec"]["x" * 10_000] = 1
    document["spec"]["weird\nkey\u2028"] = 1
    _, problems = check_problems(document)
    assert len(problems) == 4


def test_the_affinity_is_bounded_in_depth_and_size() -> None:
    """A free-form affinity 3000 levels deep passed validation, then broke every Job build."""
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    deep: dict[str, Any] = {}
    node = deep
    for _ in range(3000):
        node["a"] = {}
        node = node["a"]
    document["spec"]["affinity"] = deep
    _, problems = check_problems(document)
    assert [str(p) for p in problems] == ["spec.affinity: nested more than 32 levels deep"]
    document["spec"]["affinity"] = {"nodeAffinity": {"terms": list(range(20_000))}}
    _, problems = check_problems(document)
    assert [str(p) for p in problems] == ["spec.affinity: holds more than 10000 values"]


# ------------------------------------------------------------------ YAML files
def _validate_text(tmp_path: Path, text: str, capsys: pytest.CaptureFixture[str]) -> str:
    path = tmp_path / "hostile.yaml"
    path.write_text(text)
    assert cli.main(["validate", "-f", str(path)]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: ") and len(err.splitlines()) == 1, err
    return err


def _bomb(target: str) -> str:
    lines = ["apiVersion: relora.dev/v1alpha1", "kind: AdapterMigration", "metadata: {name: x}"]
    lines.append("l0: &l0 [x, x, x, x, x, x, x, x, x, x]")
    for level in range(1, 8):
        lines.append(f"l{level}: &l{level} [" + ", ".join([f"*l{level - 1}"] * 10) + "]")
    return "\n".join(lines) + f"\nspec:\n  {target}\n"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("spec:\n  ? [a, b]\n  : c\n", "line 2: a mapping key must be a scalar, not a list"),
        ("a: " + "[" * 1000 + "]" * 1000 + "\n", "nested more than 100 levels deep"),
        ("a: " + "{b: " * 150 + "1" + "}" * 150 + "\n", "nested more than 100 levels deep"),
        (_bomb("method: {strategy: *l7}"), "expands to more than 1000000 values"),
        ("a: &a [1, *a]\n", "expands to more than 1000000 values"),
        ('{"a\\nb": 1, "a\\nb": 2}\n', "duplicate key 'a\\nb'"),
        ("a: b\n\x00\n", "invalid YAML"),
    ],
    ids=["list key", "deep flow", "deep mapping", "billion laughs", "alias cycle", "dup", "nul"],
)
def test_hostile_yaml_is_one_usage_error(
    text: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Each of these gave a traceback, or (the bomb) 500 MB of error text after 9 s."""
    assert expected in _validate_text(tmp_path, text, capsys)


def test_a_huge_or_endless_file_is_not_read_whole(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["validate", "-f", "/dev/zero"]) == EXIT_USAGE
    assert f"larger than {manifests.MAX_BYTES // 2**20} MiB" in capsys.readouterr().err


YAML_TEXT = st.one_of(
    st.binary(max_size=300).map(lambda raw: raw.decode("latin-1")),
    st.text(alphabet=":{}[]-&*!|>'\"\n #?,%@\t\\.0x1 ab", max_size=200),
    st.builds(
        lambda head, tail: head + tail,
        st.sampled_from([(EXAMPLES / name).read_text() for name in EXAMPLE_MANIFESTS]),
        st.text(alphabet=":{}[]-&*!|> \n ab\t", max_size=40),
    ),
)


@PROPERTY
@given(text=YAML_TEXT)
def test_relora_validate_answers_every_text_with_an_exit_code(text: str) -> None:
    """Random bytes and broken YAML: exit 0, 2 or 3 with messages, never an exception."""
    import contextlib
    import io
    import tempfile

    with tempfile.TemporaryDirectory() as folder:
        path = Path(folder) / "m.yaml"
        path.write_bytes(text.encode("utf-8", "surrogatepass"))
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            code = cli.main(["validate", "-f", str(path)])
    assert code in (0, EXIT_USAGE, EXIT_BAD_INPUT)
    lines = err.getvalue().splitlines()
    assert all(line.startswith(("error: ", str(path))) and str(path) in line for line in lines)
    assert (code == 0) == (lines == [])


# ------------------------------------------------------------------ URIs
URI_FIELDS = [
    ("spec.sourceModel.uri", ("spec", "sourceModel", "uri")),
    ("spec.adapters[0].uri", ("spec", "adapters", 0, "uri")),
    ("spec.adapters[0].data.train", ("spec", "adapters", 0, "data", "train")),
    ("spec.adapters[1].data.test", ("spec", "adapters", 1, "data", "test")),
    ("spec.output.uri", ("spec", "output", "uri")),
]
URI_RULES = SPEC["properties"]["output"]["properties"]["uri"]


def cel_accepts(uri: str) -> bool:
    """The CRD's verdict on a URI field: its length bounds and CEL rules."""
    return not sandbox_schema.check(URI_RULES, uri).causes


def _with_uri(loc: Loc, uri: str) -> dict[str, Any]:
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    node: Any = document
    for part in loc[:-1]:
        node = node[part]
    node[loc[-1]] = uri
    if loc[:2] == ("spec", "sourceModel"):
        node.pop("revision", None)  # a revision needs an hf:// uri: not the point here
    return document


HOSTILE_URIS = [
    "../secrets",
    "pvc://adapters/../../etc",
    "pvc://adapters/%2e%2e/%2e%2e/etc",
    "pvc://adapters/%2E%2e/etc",
    "s3://bucket/.%2e/key",
    "hf://org/name/%2e%2e%2f%2e%2e%2fetc",
    "pvc://adapters/..%5c..%5cetc",
    "pvc://adapters\\..\\etc",
    "models\\v1",
    "pvc://claim//etc/passwd",
    "hf://org/name//etc/passwd",
    "s3:///etc/passwd",
    "pvc:///etc/passwd",
    "file:///etc/passwd",
    "javascript:alert(1)",
    "data:text/plain,x",
    "http://example.com/x",
    "C:/models",
    "pvc://adapters/a\x00b",
    "pvc://adapters/x\n",
    "pvc://adapters/\x1b[31mred",
    " pvc://adapters/x",
    "models/v1\u00a0",
    "pvc://adapters/" + "a" * 1024,
    "",
]


@pytest.mark.parametrize("uri", HOSTILE_URIS)
@pytest.mark.parametrize(("path", "loc"), URI_FIELDS, ids=[p for p, _ in URI_FIELDS])
def test_hostile_uris_are_refused_by_the_models_and_the_crd_naming_the_field(
    uri: str, path: str, loc: Loc
) -> None:
    with pytest.raises(uris.InvalidURI):
        uris.parse_uri(uri)
    document = _with_uri(loc, uri)
    _, problems = check_problems(document)
    assert [p.path for p in problems] == [path], problems
    refused = crd_problems(document)
    assert list(refused) == [path], refused


def test_plain_absolute_paths_stay_accepted() -> None:
    """Plain paths may be absolute by design (README, URIs): a local runner's folders."""
    for path, loc in URI_FIELDS:
        document = _with_uri(loc, "/data/models/v1")
        assert check_problems(document)[1] == [], path
        assert crd_problems(document) == {}, path


def test_every_unicode_space_is_named_in_the_edge_rule() -> None:
    """The white-space rule spells its characters out (RE2 and Python differ on \\s)."""
    for code in range(0x110000):
        char = chr(code)
        if char.isspace() and not re.fullmatch(uris.CONTROL, char):
            assert re.search(uris.EDGE_SPACE, f"a{char}"), hex(code)


def _inside(path: Path, root: Path) -> bool:
    normal = posixpath.normpath(str(path))
    return normal == str(root) or normal.startswith(f"{root}/")


@settings(max_examples=400, deadline=None)
@given(uri=URIS)
def test_parse_uri_and_the_cel_rules_agree_and_accepted_uris_stay_inside(uri: str) -> None:
    try:
        parsed = uris.parse_uri(uri)
    except uris.InvalidURI as error:
        assert not cel_accepts(uri), f"CEL accepts {uri!r}, parse_uri refuses: {error}"
        assert len(str(error).splitlines()) == 1 and len(str(error)) < 300
        return
    assert cel_accepts(uri), f"parse_uri accepts {uri!r}, CEL refuses"
    assert ".." not in parsed.path.split("/")
    storage = Storage(
        base_dir=Path("/base"), pvc_root=Path("/pvc"), cache_dir=Path("/cache"), pvc_mounts={}
    )
    local = storage.local_path(uri)
    if parsed.scheme == "path":
        if not uri.startswith("/"):
            assert _inside(local, Path("/base")), (uri, local)
    elif parsed.scheme == "pvc":
        assert _inside(local, Path("/pvc") / parsed.authority), (uri, local)
    else:
        assert _inside(local, Path("/cache") / parsed.scheme / parsed.authority), (uri, local)


def test_hf_paths_cannot_escape_the_cache() -> None:
    """hf://org/name//etc/passwd resolved to /etc/passwd (an absolute path inside the repo)."""
    with pytest.raises(uris.InvalidURI, match="empty path segment"):
        uris.parse_uri("hf://org/name//etc/passwd")
    storage = Storage(cache_dir=Path("/cache"))
    assert storage.local_path("hf://org/name/etc/passwd") == Path("/cache/hf/org/name/etc/passwd")


# ------------------------------------------------------------------ bounds
EXEMPT = {
    ".apiVersion": "checked by the API server itself",
    ".kind": "checked by the API server itself",
    ".metadata": "checked by the API server itself",
    ".spec.affinity": "free-form core/v1 Affinity; the models bound its depth and size",
}


def unbounded(root: dict[str, Any]) -> list[str]:
    """Fields of a CRD schema without an upper bound on their size."""
    found = []
    for path, node in _nodes(root):
        if path in EXEMPT:
            continue
        kind = node.get("type")
        if node.get("x-kubernetes-int-or-string"):
            if "maxLength" not in node or "maximum" not in node:
                found.append(f"{path}: int-or-string without maxLength and maximum")
        elif kind == "integer" and "maximum" not in node:
            found.append(f"{path}: integer without maximum")
        elif kind == "number" and "maximum" not in node and path.startswith(".spec"):
            found.append(f"{path}: number without maximum")
        elif kind == "string" and "maxLength" not in node and "enum" not in node:
            found.append(f"{path}: string without maxLength or enum")
        elif kind == "array" and "maxItems" not in node:
            found.append(f"{path}: array without maxItems")
        elif kind == "object" and "additionalProperties" in node and "maxProperties" not in node:
            found.append(f"{path}: map without maxProperties")
        elif kind == "object" and "properties" not in node and "additionalProperties" not in node:
            found.append(f"{path}: free-form object")
    return found


def test_every_field_of_the_crd_is_bounded() -> None:
    assert unbounded(SCHEMA) == []


def test_the_bounds_walk_finds_unbounded_fields() -> None:
    loose = {
        "type": "object",
        "properties": {
            "n": {"type": "integer", "minimum": 0},
            "s": {"type": "string", "pattern": "^a$"},
            "l": {"type": "array", "items": {"type": "boolean"}},
            "m": {"type": "object", "additionalProperties": {"type": "string", "maxLength": 1}},
        },
    }
    assert unbounded(loose) == [
        ".n: integer without maximum",
        ".s: string without maxLength or enum",
        ".l: array without maxItems",
        ".m: map without maxProperties",
    ]


def _bound_cases() -> Iterator[tuple[str, tuple[str, ...], Any]]:
    """(label, schema path, one past the bound) for every bounded spec field."""
    for path in SPEC_FIELDS:
        if "{}" in path[:-1] or path[0] == "affinity":
            continue
        node = _node_at(path)
        label = ".".join(path)
        if node.get("x-kubernetes-int-or-string"):
            yield f"{label} (integer)", path, node["maximum"] + 1
            yield f"{label} (string)", path, "1" * (node["maxLength"] + 1)
        elif node.get("type") == "integer":
            yield label, path, node["maximum"] + 1
        elif node.get("type") == "number":
            yield label, path, node["maximum"] * 2 + 1
        elif node.get("type") == "string" and "maxLength" in node and "enum" not in node:
            yield label, path, "a" * (node["maxLength"] + 1)
        elif node.get("type") == "array":
            yield (
                label,
                path,
                [{}] * (node["maxItems"] + 1)
                if node["items"].get("type") == "object"
                else ["a"] * (node["maxItems"] + 1),
            )
        elif node.get("type") == "object" and "maxProperties" in node:
            value = "1" if _is_scalar(node["additionalProperties"]) else "a"
            yield label, path, {f"k{i}": value for i in range(node["maxProperties"] + 1)}


BOUND_CASES = list(_bound_cases())


@pytest.mark.parametrize(("label", "path", "value"), BOUND_CASES, ids=[c[0] for c in BOUND_CASES])
def test_one_past_every_bound_is_refused_by_both_gates(
    label: str, path: tuple[str, ...], value: Any
) -> None:
    document = copy.deepcopy(EXAMPLE_MANIFESTS["cluster-migration.yaml"])
    loc: list[int | str] = ["spec"]
    node: Any = document["spec"]
    for position, part in enumerate(path):
        last = position == len(path) - 1
        if part == "{}":
            part = "k"
        if part == "[]":
            if not node:
                node.append({})
            loc.append(0)
            if last:
                node[0] = value
            node = node[0]
            continue
        loc.append(part)
        if last:
            node[part] = value
        else:
            node = node.setdefault(part, [] if path[position + 1] == "[]" else {})
    where = validation.field_path(tuple(loc), document)
    _, problems = check_problems(document)
    assert where in {p.path for p in problems}, (label, problems)
    assert where in crd_problems(document), label


def test_there_are_bound_cases_for_every_kind() -> None:
    labels = " ".join(label for label, _, _ in BOUND_CASES)
    for field in ("maxSteps", "rank", "adapters", "nodeSelector", "limits", "uri", "trials"):
        assert field in labels
    assert len(BOUND_CASES) >= 40
