"""Load the source and target base models and check that an adapter can move between them."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from relora_trainer.errors import IncompatibleModels, InvalidWeights, MissingInput


def pick_device(requested: str = "auto") -> torch.device:
    """cuda when present (or asked for), else cpu."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise MissingInput("--device cuda: no CUDA device is visible")
    return torch.device(requested)


def _read_config(folder: Path, what: str) -> dict[str, object]:
    config = folder / "config.json"
    if not config.is_file():
        raise MissingInput(f"{what}: {folder} has no config.json (expected a Hugging Face model)")
    try:
        loaded: dict[str, object] = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise MissingInput(f"{what}: {config} is not valid JSON ({error})") from error
    return loaded


def load_model(folder: Path, *, what: str, device: torch.device) -> nn.Module:
    """An AutoModelForCausalLM from a model folder, in float32 (bf16 autocast is applied later)."""
    _read_config(folder, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    except SafetensorError as error:  # a torn or corrupted weights file: no retry mends it
        raise InvalidWeights(
            f"{what}: a weights file in {folder} is not a readable safetensors file "
            f"({' '.join(str(error).split())[:200]})"
        ) from error
    except (OSError, ValueError, KeyError, RuntimeError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise MissingInput(f"{what}: cannot load a causal LM from {folder}: {first}") from error
    model.requires_grad_(False)
    moved: nn.Module = model.to(device)  # type: ignore[arg-type]
    return moved


def load_tokenizer(*folders: Path) -> PreTrainedTokenizerBase:
    """The tokenizer of the first folder that has one (the target model first)."""
    problems = []
    for folder in folders:
        try:
            tokenizer: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder)
            return tokenizer
        except (OSError, ValueError) as error:
            problems.append(f"{folder}: {type(error).__name__}")
    raise MissingInput(f"no tokenizer found ({'; '.join(problems)})")


def check_compatible(source: nn.Module, target: nn.Module) -> None:
    """Raise IncompatibleModels unless both models have the same architecture and shapes."""
    kinds = (type(source).__name__, type(target).__name__)
    if kinds[0] != kinds[1]:
        raise IncompatibleModels(
            f"sourceModel is a {kinds[0]} but targetModel is a {kinds[1]}; an adapter can only "
            "move between versions of one architecture"
        )
    source_shapes = {k: tuple(v.shape) for k, v in source.state_dict().items()}
    target_shapes = {k: tuple(v.shape) for k, v in target.state_dict().items()}
    missing = sorted(source_shapes.keys() ^ target_shapes.keys())
    if missing:
        raise IncompatibleModels(
            f"sourceModel and targetModel differ in weights ({len(missing)} not in both, first: "
            f"{missing[0]}); they must be versions of the same architecture"
        )
    for key, shape in source_shapes.items():
        if target_shapes[key] != shape:
            raise IncompatibleModels(
                f"weight {key} is {shape} in sourceModel but {target_shapes[key]} in targetModel"
            )


def check_finite(model: nn.Module, *, what: str) -> None:
    """Raise InvalidWeights naming the first weight with NaN or infinite values."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidWeights(f"{what}: weight {name} has NaN or infinite values")
