"""Hostile task data and adapters: one clear BadInput line naming the file, never a traceback.

JSONL task data (``read_jsonl``) is fuzzed with hypothesis: random bytes, invalid UTF-8, lines
that are not objects, missing and extra keys, deep nesting, huge numbers, lone surrogates, huge
lines. Adapter configs and weights are broken in the ways a user's folder can be, and run
through ``relora run`` on the toy world (exit code 3), reusing tests/test_inputs.py's helpers;
the cases there are not repeated here.
"""

from __future__ import annotations

import json
import shutil
import struct
import tracemalloc
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from relora_trainer import adapters, data, local_run
from relora_trainer.data import read_jsonl
from relora_trainer.errors import EXIT_BAD_INPUT, BadInput, InvalidData
from tests.conftest import toy_manifest
from tests.test_inputs import ADAPTER_CONFIG, ADAPTER_WEIGHTS, _edit_json, _edit_weights

PROPERTY = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
SMALL_LINE = 2000  # MAX_LINE_BYTES while fuzzing, so that "too long" lines stay cheap


# ------------------------------------------------------------------ JSONL
def _valid_line(prompt: str, completion: str, extra: dict[str, Any]) -> bytes:
    return json.dumps({**extra, "prompt": prompt, "completion": completion}).encode()


VALID_LINES = st.builds(
    _valid_line,
    st.text(max_size=20),
    st.text(min_size=1, max_size=5),
    st.dictionaries(st.sampled_from(["label", "id", "meta"]), st.integers(), max_size=2),
)
BLANK_LINES = st.sampled_from([b"", b"   ", b"\t", b"\r", b" \x0b\x0c "])
BAD_LINES = st.one_of(
    st.sampled_from(
        [
            b'{"prompt": "\xff\xfe", "completion": " x"}',  # invalid UTF-8
            b'{"prompt": "a", "completion": " \xc3"}',  # truncated UTF-8 sequence
            b'{"prompt": "a", "compl',  # truncated JSON
            b"[1, 2]",
            b'"just a string"',
            b"null",
            b"42",
            b'{"prompt": "a"}',
            b'{"completion": " x"}',
            b'{"prompt": 1, "completion": " x"}',
            b'{"prompt": "a", "completion": ["x"]}',
            b'{"prompt": "a", "completion": ""}',
            b'{"prompt": NaN, "completion": " x"}',
            b'{"prompt": "\\ud800", "completion": " x"}',  # a lone surrogate
            b'{"prompt": "a", "completion": " \\udfff"}',
            b'{"prompt": ' + b"1" * 5000 + b', "completion": " x"}',  # int too long
            b"[" * 1999,  # nested too deeply for the parser
            b"{" * 1999,
            b"\x00\x01\x02",
            b"\xef\xbb\xbf",  # a BOM alone
            b"x" * (SMALL_LINE + 5),  # too long
        ]
    ),
    st.binary(min_size=1, max_size=40).filter(lambda raw: b"\n" not in raw and raw.strip()),
)


def _check_refusal(error: BadInput, path: Path, lines: int) -> int | None:
    """The error is one line naming the file (and the line, returned, unless the file is empty)."""
    message = str(error)
    assert len(message.splitlines()) == 1 and message.isprintable(), repr(message)
    assert message.startswith(f"train: {path}"), message
    assert len(message) < 400, message
    if message.endswith("has no examples"):
        return None
    number = int(message.removeprefix(f"train: {path}:").split(":")[0])
    assert 1 <= number <= max(lines, 1), message
    return number


@PROPERTY
@given(
    head=st.lists(VALID_LINES | BLANK_LINES, max_size=6),
    bad=st.none() | BAD_LINES,
    tail=st.lists(VALID_LINES | BAD_LINES | BLANK_LINES, max_size=3),
    newline=st.sampled_from([b"\n", b"\r\n"]),
)
def test_jsonl_refuses_the_first_bad_line_by_number(
    head: list[bytes],
    bad: bytes | None,
    tail: list[bytes],
    newline: bytes,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(data, "MAX_LINE_BYTES", SMALL_LINE)
    lines = head + ([bad, *tail] if bad is not None else [])
    path = tmp_path / "train.jsonl"
    path.write_bytes(newline.join(lines))
    try:
        examples = read_jsonl(path, what="train")
    except InvalidData as error:
        number = _check_refusal(error, path, len(lines))
        if bad is not None:
            assert number == len(head) + 1, (str(error), lines)
        else:  # only blank lines
            assert number is None and not any(line.strip() for line in head), str(error)
        return
    assert bad is None, f"accepted a bad line: {bad!r}"
    assert len(examples) == sum(1 for line in head if line.strip())
    assert all(isinstance(e.prompt, str) and e.completion for e in examples)


@PROPERTY
@given(content=st.binary(max_size=600))
def test_jsonl_of_random_bytes_gives_examples_or_invalid_data(
    content: bytes, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 300)
    path = tmp_path / "train.jsonl"
    path.write_bytes(content)
    try:
        examples = read_jsonl(path, what="train")
    except InvalidData as error:
        _check_refusal(error, path, content.count(b"\n") + 1)
        return
    for example in examples:
        example.prompt.encode("utf-8")  # valid Unicode: the tokenizer can take it
        assert example.completion


def test_a_huge_line_is_not_read_whole(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A file with no newline was read into memory whole before its length was checked."""
    monkeypatch.setattr(data, "MAX_LINE_BYTES", 1000)
    path = tmp_path / "train.jsonl"
    with path.open("wb") as handle:
        handle.truncate(64 * 2**20)  # 64 MiB of NUL bytes, no newline (sparse: no disk)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidData, match=r"train.jsonl:1: line longer than 1000 bytes"):
            read_jsonl(path, what="train")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 2**20, f"read {peak} bytes at once"


def test_an_unreadable_file_is_bad_input() -> None:
    """/proc/self/mem is a regular file whose first page cannot be read (EIO)."""
    with pytest.raises(BadInput, match=r"^train: /proc/self/mem: cannot read"):
        read_jsonl(Path("/proc/self/mem"), what="train")


# ------------------------------------------------------------------ adapter_config.json
def _config(edit: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    return lambda root: _edit_json(root / ADAPTER_CONFIG, edit)


def _config_text(text: str) -> Callable[[Path], object]:
    return lambda root: (root / ADAPTER_CONFIG).write_text(text)


def _weights_bytes(edit: Callable[[bytes], bytes]) -> Callable[[Path], None]:
    def apply(root: Path) -> None:
        path = root / ADAPTER_WEIGHTS
        path.write_bytes(edit(path.read_bytes()))

    return apply


def _header_length(raw: bytes) -> bytes:
    return struct.pack("<Q", 2**62) + raw[8:]


def _rank_zero(root: Path) -> None:
    def edit(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {
            k: torch.zeros(0, v.shape[1]) if "lora_A" in k else torch.zeros(v.shape[0], 0)
            for k, v in state.items()
        }

    _edit_weights(root / ADAPTER_WEIGHTS, edit)


def _int_weights(root: Path) -> None:
    path = root / ADAPTER_WEIGHTS
    from safetensors.torch import load_file

    save_file({k: v.to(torch.int8) for k, v in load_file(str(path)).items()}, str(path))


CONFIG = "adapter_config.json: "
ADAPTER_CASES: list[tuple[str, Callable[[Path], object], str]] = [
    ("config: truncated JSON", _config_text('{"peft_type": "LORA", "r": '), "is not valid JSON"),
    ("config: nested too deeply", _config_text("[" * 100_000), "JSON (nested too deeply)"),
    (
        "config: integer too long",
        _config_text('{"peft_type": "LORA", "r": ' + "9" * 5000 + "}"),
        "is not valid JSON (Exceeds the limit",
    ),
    (
        "config: invalid UTF-8",
        lambda root: (root / ADAPTER_CONFIG).write_bytes(b'{"peft_type": "\xff"}'),
        "is not valid JSON ('utf-8' codec can't decode byte 0xff",
    ),
    ("config: huge file", _config_text(" " * (2**20 + 1)), "larger than 1 MiB"),
    (
        "config: null",
        _config_text("null"),
        "holds a NoneType, not an adapter config; supported: LORA adapters",
    ),
    ("rank is a string", _config(lambda c: c.update(r="4")), f"{CONFIG}r must be a positive"),
    ("rank is a boolean", _config(lambda c: c.update(r=True)), f"{CONFIG}r must be a positive"),
    ("rank is zero", _config(lambda c: c.update(r=0)), f"{CONFIG}r must be a positive integer"),
    (
        "absurd rank",
        _config(lambda c: c.update(r=1_000_000)),
        "says r=1000000 but module model.layers.0",
    ),
    ("rank of the weights is zero", _rank_zero, "says r=4 but module"),
    (
        "alpha is text",
        _config(lambda c: c.update(lora_alpha="x")),
        f"{CONFIG}lora_alpha must be a positive finite number, got 'x'",
    ),
    (
        "alpha is NaN",
        _config_text(
            '{"peft_type": "LORA", "r": 4, "lora_alpha": NaN, "target_modules": ["q_proj"]}'
        ),
        f"{CONFIG}lora_alpha must be a positive finite number, got nan",
    ),
    (
        "dropout above 1",
        _config(lambda c: c.update(lora_dropout=2)),
        f"{CONFIG}lora_dropout must be a number in [0, 1), got 2",
    ),
    (
        "rsLoRA flag is text",
        _config(lambda c: c.update(use_rslora="no")),
        f"{CONFIG}use_rslora must be true or false, got 'no'",
    ),
    (
        "target modules is a number",
        _config(lambda c: c.update(target_modules=5)),
        f"{CONFIG}target_modules must be a module name pattern or a non-empty list",
    ),
    (
        "unknown target modules",
        _config(lambda c: c.update(target_modules=["nonexistent_proj"])),
        "target_modules {'nonexistent_proj'} (with layers_to_transform and exclude_modules) "
        "match no module of the model",
    ),
    (
        "a regex matching nothing",
        _config(lambda c: c.update(target_modules=".*nothing.*")),
        "match no module of the model",
    ),
    (
        "layers that do not exist",
        _config(lambda c: c.update(layers_to_transform=[99])),
        "match no module of the model",
    ),
    (
        "weights for modules not targeted",
        _config(lambda c: c.update(target_modules=["q_proj"])),
        "has LoRA weights but target_modules {'q_proj'}",
    ),
    (
        "targets an embedding",
        _config(lambda c: c.update(target_modules=c["target_modules"] + ["embed_tokens"])),
        "select model.embed_tokens, a Embedding: only LoRA on Linear layers is supported",
    ),
    (
        "a LoRA variant",
        _config(lambda c: c.update(use_qalora=True)),
        "QA-LoRA adapters (use_qalora) cannot be migrated; supported: LORA adapters",
    ),
    (
        "weights: truncated",
        _weights_bytes(lambda raw: raw[: len(raw) // 2]),
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    (
        "weights: header length beyond the file",
        _weights_bytes(_header_length),
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    (
        "weights: random bytes",
        _weights_bytes(lambda raw: bytes(range(256)) * 8),
        "adapter_model.safetensors is not a readable safetensors file",
    ),
    (
        "weights: empty",
        _weights_bytes(lambda raw: b""),
        "adapter_model.safetensors is not a readable safetensors file",
    ),
]


def _run_broken(
    breaker: Callable[[Path], object], toy: Any, tmp_path: Path, **method: Any
) -> tuple[int, list[str]]:
    """`relora run` on a copy of the toy world broken by ``breaker`` (as tests/test_inputs.py)."""
    root = tmp_path / "world"
    shutil.copytree(toy.root, root)
    breaker(root)
    text = yaml.safe_dump(toy_manifest(toy, **method)).replace(str(toy.root) + "/", "")
    path = root / "migration.yaml"
    path.write_text(text)
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        code = local_run.run(str(path), quiet=True, device="cpu")
    return code, err.getvalue().strip().splitlines()


@pytest.mark.parametrize(
    ("case", "breaker", "expected"), ADAPTER_CASES, ids=[c for c, _, _ in ADAPTER_CASES]
)
def test_a_broken_adapter_exits_3_with_one_clear_line(
    case: str, breaker: Callable[[Path], object], expected: str, toy: Any, tmp_path: Path
) -> None:
    code, err = _run_broken(breaker, toy, tmp_path, strategy="reuse")
    assert code == EXIT_BAD_INPUT, err
    assert err[-1].startswith("error: InvalidAdapter: spec.adapters[toy-category].uri: "), err
    assert expected in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)


DATA_CASES: list[tuple[str, bytes, str]] = [
    ("nested too deeply", b"[" * 200_000, "train.jsonl:1: JSON nested too deeply"),
    ("integer too long", b'{"prompt": ' + b"7" * 5000 + b"}", "train.jsonl:1: not valid JSON"),
    (
        "lone surrogate",
        b'{"prompt": "ok", "completion": " food"}\n{"prompt": "\\udc80", "completion": " x"}',
        "train.jsonl:2: field 'prompt' holds an unpaired surrogate",
    ),
    (
        "invalid UTF-8",
        b'{"prompt": "caf\xe9", "completion": " food"}',
        "train.jsonl:1: not valid JSON ('utf-8' codec can't decode byte 0xe9",
    ),
    ("a line too long", b"x" * (data.MAX_LINE_BYTES + 1), "train.jsonl:1: line longer than"),
]


@pytest.mark.parametrize(
    ("case", "content", "expected"), DATA_CASES, ids=[c[0] for c in DATA_CASES]
)
def test_broken_training_data_exits_3_naming_file_and_line(
    case: str, content: bytes, expected: str, toy: Any, tmp_path: Path
) -> None:
    def breaker(root: Path) -> None:
        (root / "data/toy-category/train.jsonl").write_bytes(content)

    code, err = _run_broken(breaker, toy, tmp_path, strategy="reuse")
    assert code == EXIT_BAD_INPUT, err
    assert err[-1].startswith("error: InvalidData: spec.adapters[toy-category].data.train: ")
    assert expected in err[-1], err[-1]


def test_the_old_adapters_init_method_cannot_rewrite_the_base(toy: Any, tmp_path: Path) -> None:
    """PiSSA-style inits rewrite the base weights when PEFT attaches the adapter; the old
    adapter's weights replace the init anyway, so the init is reset to PEFT's plain one."""
    folder = tmp_path / "adapter"
    shutil.copytree(toy.adapter, folder)
    _edit_json(folder / "adapter_config.json", lambda c: c.update(init_lora_weights="pissa"))
    old = adapters.read_adapter(folder, what="x")
    assert old.config.init_lora_weights is True


def test_a_folder_in_place_of_the_config_is_missing_input(toy: Any, tmp_path: Path) -> None:
    folder = tmp_path / "adapter"
    shutil.copytree(toy.adapter, folder)
    (folder / "adapter_config.json").unlink()
    (folder / "adapter_config.json").mkdir()
    with pytest.raises(BadInput, match=r"adapter_config\.json is missing"):
        adapters.read_adapter(folder, what="x")
