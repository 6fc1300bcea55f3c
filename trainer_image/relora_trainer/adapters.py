"""The old PEFT LoRA adapter: read, check against a model, and move weights in and out of PEFT.

Weights travel as a mapping from module name (``model.layers.0.self_attn.q_proj``) to a
:class:`LoraFactors` pair. PEFT does the injection and (de)serialization.
"""

from __future__ import annotations

import json
import math
import reprlib
import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import set_peft_model_state_dict
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

from relora_trainer.errors import InvalidAdapter, InvalidWeights, MissingInput

CONFIG_FILE = "adapter_config.json"
WEIGHTS_FILE = "adapter_model.safetensors"
ADAPTER = "default"
_PREFIX = "base_model.model."


@dataclass
class LoraFactors:
    """One adapted Linear: delta W = scale * B @ A, with A (r, in) and B (out, r)."""

    a: torch.Tensor
    b: torch.Tensor


@dataclass
class OldAdapter:
    config: LoraConfig
    factors: dict[str, LoraFactors]

    @property
    def rank(self) -> int:
        return int(self.config.r)


def lora_scale(config: LoraConfig, rank: int) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA."""
    return float(config.lora_alpha) / (rank**0.5 if config.use_rslora else rank)


_UNSUPPORTED: dict[str, str] = {
    "use_dora": "DoRA adapters",
    "rank_pattern": "per-module ranks (rank_pattern)",
    "alpha_pattern": "per-module alphas (alpha_pattern)",
    "modules_to_save": "fully trained extra modules (modules_to_save)",
    "layer_replication": "layer replication",
    "target_parameters": "LoRA on raw parameters (target_parameters)",
    "trainable_token_indices": "trainable token embeddings (trainable_token_indices)",
    "lora_bias": "LoRA biases (lora_bias)",
    "use_qalora": "QA-LoRA adapters (use_qalora)",
    "use_bdlora": "block-diagonal LoRA adapters (use_bdlora)",
    "alora_invocation_tokens": "activated LoRA adapters (alora_invocation_tokens)",
    "arrow_config": "Arrow routing (arrow_config)",
}

MAX_CONFIG_BYTES = 2**20
"""An adapter_config.json is a few KiB; a larger file is not one (and is not read whole)."""


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


# Field -> (check of its JSON value, what it must be). Absent fields take PEFT's defaults.
_FIELD_TYPES: dict[str, tuple[Callable[[Any], bool], str]] = {
    "r": (
        lambda v: isinstance(v, int) and not isinstance(v, bool) and v >= 1,
        "a positive integer",
    ),
    "lora_alpha": (lambda v: _is_number(v) and v > 0, "a positive finite number"),
    "lora_dropout": (lambda v: _is_number(v) and 0 <= v < 1, "a number in [0, 1)"),
    "fan_in_fan_out": (lambda v: v is None or isinstance(v, bool), "true or false"),
    "use_rslora": (lambda v: v is None or isinstance(v, bool), "true or false"),
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
}


def _read_config(config_path: Path, *, what: str) -> dict[str, Any]:
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
    if not isinstance(raw, dict) or raw.get("peft_type") != "LORA":
        kind = raw.get("peft_type") if isinstance(raw, dict) else type(raw).__name__
        raise InvalidAdapter(
            f"{what}: {config_path}: peft_type is {reprlib.repr(kind)}, expected 'LORA'"
        )
    for key, (valid, expected) in _FIELD_TYPES.items():
        if key in raw and not valid(raw[key]):
            raise InvalidAdapter(
                f"{what}: {config_path}: {key} must be {expected}, got {reprlib.repr(raw[key])}"
            )
    return raw


def read_adapter(folder: Path, *, what: str) -> OldAdapter:
    """Read a PEFT LoRA folder; raise a one-line BadInput naming the file or field at fault."""
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
    for path in (config_path, weights_path):
        if not path.is_file():
            raise MissingInput(f"{what}: {path} is missing (expected a PEFT LoRA folder)")
    raw = _read_config(config_path, what=what)
    for key, label in _UNSUPPORTED.items():
        if raw.get(key):
            raise InvalidAdapter(f"{what}: {config_path}: {label} are not supported yet")
    if raw.get("bias", "none") != "none":
        bias = reprlib.repr(raw["bias"])
        raise InvalidAdapter(f"{what}: {config_path}: bias={bias}; only 'none' works")
    try:
        config = LoraConfig.from_pretrained(str(folder))
    except (TypeError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise InvalidAdapter(f"{what}: {config_path}: {reason}") from error
    if not isinstance(config.r, int) or config.r < 1:
        raise InvalidAdapter(f"{what}: {config_path}: r must be a positive integer")
    # The old adapter's weights are loaded right after PEFT attaches it, so its initialization
    # method does not matter; some (PiSSA, OLoRA, LoftQ...) would rewrite the base weights.
    config.init_lora_weights = True
    try:
        state = load_file(str(weights_path))
    except (SafetensorError, OSError) as error:
        reason = " ".join(str(error).split())[:200]
        raise InvalidAdapter(
            f"{what}: {weights_path} is not a readable safetensors file ({reason})"
        ) from error
    factors = _factors(state, what=what)
    for module, pair in factors.items():
        if pair.a.shape[0] != config.r:
            raise InvalidAdapter(
                f"{what}: {config_path} says r={config.r} but module {module} has rank "
                f"{pair.a.shape[0]} weights"
            )
    return OldAdapter(config=config, factors=factors)


def _factors(state: dict[str, torch.Tensor], *, what: str) -> dict[str, LoraFactors]:
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in state.items():
        if "lora_embedding" in key or "lora_magnitude" in key:
            raise InvalidAdapter(f"{what}: {key}: only LoRA on Linear layers is supported")
        for half in ("lora_A", "lora_B"):
            marker = f".{half}."
            if marker in key:
                module = key.split(marker)[0].removeprefix(_PREFIX)
                halves.setdefault(module, {})[half] = tensor.float()
    if not halves:
        raise InvalidAdapter(f"{what}: {WEIGHTS_FILE} holds no lora_A/lora_B weights")
    factors = {}
    for module, pair in sorted(halves.items()):
        if set(pair) != {"lora_A", "lora_B"}:
            raise InvalidAdapter(f"{what}: module {module} lacks lora_A or lora_B")
        a, b = pair["lora_A"], pair["lora_B"]
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidAdapter(f"{what}: module {module}: lora_A/lora_B shapes do not match")
        if not (torch.isfinite(a).all() and torch.isfinite(b).all()):
            raise InvalidWeights(f"{what}: module {module} has NaN or infinite LoRA weights")
        factors[module] = LoraFactors(a=a, b=b)
    return factors


def base_weight(model: nn.Module, module: str, *, fan_in_fan_out: bool) -> torch.Tensor:
    """The (out, in) weight of ``module`` in a base model (transposed for Conv1D layers)."""
    layer = model.get_submodule(module)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InvalidAdapter(f"adapter module {module} is not a layer with a weight in the model")
    return weight.T if fan_in_fan_out else weight


def _targeted(config: LoraConfig, model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that PEFT wraps with ``config`` (by name)."""
    modules = dict(model.named_modules())
    if config.target_modules == "all-linear":
        return {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
    return {name: m for name, m in modules.items() if check_target_module_exists(config, name)}


def check_fits(adapter: OldAdapter, model: nn.Module, *, what: str) -> None:
    """Raise InvalidAdapter unless every adapted module exists in ``model`` with matching shapes
    and the config's target_modules select Linear layers of the model, those with weights."""
    names = {name for name, _ in model.named_modules()}
    for module, pair in adapter.factors.items():
        if module not in names:
            raise InvalidAdapter(
                f"{what}: module {module} is not in the model (adapter trained for another "
                "architecture, or target_modules do not match)"
            )
        out_features, in_features = base_weight(
            model, module, fan_in_fan_out=bool(adapter.config.fan_in_fan_out)
        ).shape
        if pair.a.shape[1] != in_features or pair.b.shape[0] != out_features:
            raise InvalidAdapter(
                f"{what}: module {module} expects ({out_features}, {in_features}) but the adapter "
                f"has ({pair.b.shape[0]}, {pair.a.shape[1]}): trained for another architecture"
            )
    # PEFT attaches the adapter by target_modules, not by the weights it finds: both must agree.
    targets = reprlib.repr(adapter.config.target_modules)
    targeted = _targeted(adapter.config, model)
    if not targeted:
        raise InvalidAdapter(
            f"{what}: target_modules {targets} (with layers_to_transform and exclude_modules) "
            "match no module of the model"
        )
    for module in adapter.factors:
        if module not in targeted:
            raise InvalidAdapter(
                f"{what}: module {module} has LoRA weights but target_modules {targets} (with "
                "layers_to_transform and exclude_modules) do not select it"
            )
    for name, layer in targeted.items():
        if not isinstance(layer, nn.Linear | Conv1D):
            raise InvalidAdapter(
                f"{what}: target_modules {targets} select {name}, a {type(layer).__name__}: "
                "only LoRA on Linear layers is supported"
            )


def attach(model: nn.Module, config: LoraConfig) -> PeftModel:
    """Wrap ``model`` with a fresh LoRA adapter (PEFT's default init); undo with ``.unload()``.

    The config's base_model_name_or_path (a URI) is kept: PEFT would replace it with the local
    folder the model was loaded from.
    """
    base_name = config.base_model_name_or_path
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*base_model_name_or_path.*")
        peft_model: PeftModel = get_peft_model(model, config)
    if base_name is not None:
        peft_model.peft_config[ADAPTER].base_model_name_or_path = base_name
    return peft_model


def load_factors(model: PeftModel, factors: dict[str, LoraFactors]) -> None:
    """Set the adapter weights of ``model`` (same device and dtype as the LoRA layers)."""
    state = {}
    for module, pair in factors.items():
        state[f"{_PREFIX}{module}.lora_A.weight"] = pair.a
        state[f"{_PREFIX}{module}.lora_B.weight"] = pair.b
    result = set_peft_model_state_dict(model, state, adapter_name=ADAPTER)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise InvalidAdapter(f"adapter weights not used by the model: {unexpected[:3]}")


def lora_parameters(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The trainable LoRA parameters by name."""
    return {n: p for n, p in model.named_parameters() if "lora_" in n and p.requires_grad}


def new_config(old: LoraConfig, *, rank: int, base: str) -> LoraConfig:
    """The output adapter's config: the old one's targets and alpha, at ``rank``."""
    return LoraConfig(
        r=rank,
        lora_alpha=old.lora_alpha,
        target_modules=old.target_modules,
        lora_dropout=old.lora_dropout,
        fan_in_fan_out=old.fan_in_fan_out,
        use_rslora=old.use_rslora,
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
