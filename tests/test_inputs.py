"""Bad input gives one clear line naming the file or field, and exit code 3 (no retry)."""

from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file
from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

from relora_trainer import local_run
from relora_trainer.errors import EXIT_BAD_INPUT
from tests.conftest import toy_manifest

Breaker = Callable[[Path], object]
ADAPTER_WEIGHTS = "adapters/toy-category/adapter_model.safetensors"
ADAPTER_CONFIG = "adapters/toy-category/adapter_config.json"


def _edit_weights(
    path: Path, edit: Callable[[dict[str, torch.Tensor]], dict[str, torch.Tensor]]
) -> None:
    save_file(edit(load_file(str(path))), str(path))


def _edit_json(path: Path, edit: Callable[[dict[str, Any]], None]) -> None:
    data = json.loads(path.read_text())
    edit(data)
    path.write_text(json.dumps(data))


def _other_size(root: Path) -> None:
    config = LlamaConfig.from_pretrained(root / "models/v2-mild")
    config.hidden_size, config.intermediate_size = 48, 96
    LlamaForCausalLM(config).save_pretrained(root / "models/v2-mild")


def _other_architecture(root: Path) -> None:
    shutil.rmtree(root / "models/v2-mild")
    GPT2LMHeadModel(GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=60)).save_pretrained(
        root / "models/v2-mild"
    )


def _nan_weights(root: Path) -> None:
    path = root / "models/v2-mild/model.safetensors"

    def poison(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        key = next(k for k in state if k.endswith("q_proj.weight"))
        state[key] = state[key].clone()
        state[key][0, 0] = float("nan")
        return state

    _edit_weights(path, poison)


def _rename_modules(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k.replace("q_proj", "qkv_proj"): v for k, v in state.items()}


def _wrong_shape(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: (torch.zeros(v.shape[0], 7) if "lora_A" in k else v) for k, v in state.items()}


def _nan_adapter(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v * float("inf") if "lora_B" in k else v for k, v in state.items()}


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _write(relative: str, text: str) -> Breaker:
    return lambda root: (root / relative).write_text(text)


CASES: list[tuple[str, Breaker, str]] = [
    (
        "missing source model",
        lambda root: shutil.rmtree(root / "models/v1"),
        "MissingInput: spec.sourceModel: ",
    ),
    (
        "model folder without config",
        lambda root: (root / "models/v1/config.json").unlink(),
        "MissingInput: spec.sourceModel: ",
    ),
    ("other hidden size", _other_size, "IncompatibleModels: weight model."),
    (
        "other architecture",
        _other_architecture,
        "IncompatibleModels: sourceModel is a LlamaForCausalLM but targetModel is a "
        "GPT2LMHeadModel",
    ),
    ("non-finite weights", _nan_weights, "InvalidWeights: spec.targetModel: weight model."),
    (
        "truncated model weights",
        lambda root: _truncate(root / "models/v2-mild/model.safetensors"),
        "InvalidWeights: spec.targetModel: a weights file in ",
    ),
    (
        "adapter weights missing",
        lambda root: (root / ADAPTER_WEIGHTS).unlink(),
        "MissingInput: spec.adapters[toy-category].uri: ",
    ),
    (
        "not a LoRA adapter",
        lambda root: _edit_json(root / ADAPTER_CONFIG, lambda c: c.update(peft_type="IA3")),
        "InvalidAdapter: spec.adapters[toy-category].uri: ",
    ),
    (
        "adapter modules not in the model",
        lambda root: _edit_weights(root / ADAPTER_WEIGHTS, _rename_modules),
        "is not in the model (adapter trained for another architecture",
    ),
    (
        "adapter for another architecture",
        lambda root: _edit_weights(root / ADAPTER_WEIGHTS, _wrong_shape),
        "trained for another architecture",
    ),
    (
        "non-finite adapter",
        lambda root: _edit_weights(root / ADAPTER_WEIGHTS, _nan_adapter),
        "InvalidWeights: spec.adapters[toy-category].uri: module ",
    ),
    (
        "empty training data",
        _write("data/toy-category/train.jsonl", "\n\n"),
        "InvalidData: spec.adapters[toy-category].data.train: ",
    ),
    (
        "malformed JSONL",
        _write(
            "data/toy-category/validation.jsonl", '{"prompt": "a", "completion": " b"}\n{oops\n'
        ),
        "validation.jsonl:2: not valid JSON",
    ),
    (
        "missing completion",
        _write("data/toy-category/train.jsonl", '{"prompt": "a"}\n'),
        "train.jsonl:1: field 'completion' must be a string, got NoneType",
    ),
    (
        "a single class",
        lambda root: [
            (root / f"data/toy-category/{s}.jsonl").write_text(
                '{"prompt": "a", "completion": " x"}\n'
            )
            for s in ("train", "validation")
        ],
        "accuracy needs at least two distinct completions",
    ),
]


@pytest.mark.parametrize(("case", "breaker", "expected"), CASES, ids=[c for c, _, _ in CASES])
def test_bad_input_exits_3_with_one_clear_line(
    case: str,
    breaker: Breaker,
    expected: str,
    toy: Any,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    root = tmp_path / "world"
    shutil.copytree(toy.root, root)
    breaker(root)
    manifest = toy_manifest(toy)
    text = yaml.safe_dump(manifest).replace(str(toy.root) + "/", "")
    path = root / "migration.yaml"
    path.write_text(text)
    assert local_run.run(str(path), quiet=True) == EXIT_BAD_INPUT
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: "), err
    assert expected in err[-1], err[-1]
    assert "Traceback" not in "\n".join(err)
