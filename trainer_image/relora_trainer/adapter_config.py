"""An old adapter's ``adapter_config.json``, checked before any model (or torch) is loaded.

Pure JSON: ``relora validate`` reads it without the ML stack, and the trainer refuses an adapter
it cannot migrate before minutes of model loading. ``relora_trainer.adapters`` reads the weights.
"""

from __future__ import annotations

import json
import math
import reprlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

from relora_trainer.errors import InvalidAdapter, MissingInput

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"

MAX_CONFIG_BYTES = 2**20
"""An adapter_config.json is a few KiB; a larger file is not one (and is not read whole)."""

SUPPORTED = (
    "LORA adapters on Linear layers: plain LoRA, rsLoRA, DoRA (use_dora), per-module ranks and "
    "alphas (rank_pattern, alpha_pattern) and fully trained extra modules (modules_to_save)"
)
"""What can be migrated, named in every refusal."""

_UNSUPPORTED: dict[str, str] = {
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "lora_bias": "LoRA biases (lora_bias)",
    "use_qalora": "QA-LoRA adapters (use_qalora)",
    "use_bdlora": "block-diagonal LoRA adapters (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA adapters (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
}
"""LoraConfig fields that make an adapter this project cannot migrate (when set)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


def _is_rank(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _is_pattern(valid: Callable[[Any], bool]) -> Callable[[Any], bool]:
    return lambda v: (
        v is None
        or (
            isinstance(v, dict) and all(isinstance(k, str) and k and valid(x) for k, x in v.items())
        )
    )


def _is_names(v: Any) -> bool:
    return v is None or (isinstance(v, list) and all(isinstance(m, str) and m for m in v))


# Field -> (check of its JSON value, what it must be). Absent fields take PEFT's defaults.
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (_is_rank, "a positive integer"),
    "lora_alpha": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_dora": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "target_modules": (
        lambda v: (
            v is None
            or (isinstance(v, str) and bool(v))
            or (isinstance(v, list) and bool(v) and all(isinstance(m, str) and m for m in v))
        ),
        "a module name pattern or a non-empty list of module names",
    ),
    "layers_to_transform": (
        lambda v: (
            v is None
            or (isinstance(v, int) and not isinstance(v, bool))
            or (
                isinstance(v, list)
                and all(isinstance(i, int) and not isinstance(i, bool) for i in v)
            )
        ),
        "a layer index or a list of layer indexes",
    ),
    "rank_pattern": (
        _is_pattern(_is_rank),
        "a mapping of module name patterns to positive integer ranks",
    ),
    "alpha_pattern": (
        _is_pattern(lambda v: _is_number(v) and v > 0),
        "a mapping of module name patterns to positive alphas",
    ),
    "modules_to_save": (_is_names, "a list of module names"),
}


def read_config(config_path: Path, *, what: str) -> dict[str, Any]:
    """The JSON of an adapter config this project can migrate; else a one-line BadInput naming
    the file and the field (and, for another kind of adapter, what is supported)."""
    try:
        with config_path.open("rb") as handle:
            data = handle.read(MAX_CONFIG_BYTES + 1)
    except OSError as error:
        raise MissingInput(f"{what}: {config_path}: cannot read: {error.strerror}") from error
    if len(data) > MAX_CONFIG_BYTES:
        raise InvalidAdapter(f"{what}: {config_path} is larger than 1 MiB; not an adapter config")
    try:
        raw = json.loads(data.decode("utf-8"))
    except RecursionError:
        raise InvalidAdapter(
            f"{what}: {config_path} is not valid JSON (nested too deeply)"
        ) from None
    except ValueError as error:  # JSONDecodeError, UnicodeDecodeError, over-long integers
        reason = " ".join(str(error).split())[:200]
        raise InvalidAdapter(f"{what}: {config_path} is not valid JSON ({reason})") from error
    if not isinstance(raw, dict):
        raise InvalidAdapter(
            f"{what}: {config_path} holds a {type(raw).__name__}, not an adapter config; "
            f"supported: {SUPPORTED}"
        )
    kind = raw.get("peft_type")
    if kind != "LORA":
        named = "no peft_type" if kind is None else f"peft_type {reprlib.repr(kind)}"
        raise InvalidAdapter(
            f"{what}: {config_path}: {named} cannot be migrated; supported: {SUPPORTED}"
        )
    for key, (valid, expected) in _FIELD_TYPES.items():
        if key in raw and not valid(raw[key]):
            raise InvalidAdapter(
                f"{what}: {config_path}: {key} must be {expected}, got {reprlib.repr(raw[key])}"
            )
    for key, label in _UNSUPPORTED.items():
        if raw.get(key):
            raise InvalidAdapter(
                f"{what}: {config_path}: {label} cannot be migrated; supported: {SUPPORTED}"
            )
    if raw.get("bias", "none") != "none":
        bias = reprlib.repr(raw["bias"])
        raise InvalidAdapter(f"{what}: {config_path}: bias={bias}; only 'none' works")
    return raw


def check_folder(folder: Path, *, what: str) -> dict[str, Any]:
    """Both files of a PEFT adapter folder present and its config migratable: its JSON."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingInput(f"{what}: {path} is missing (expected a PEFT LoRA folder)")
    return read_config(config_path, what=what)
