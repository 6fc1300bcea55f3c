"""The old PEFT LoRA adapter: read, check against a model, and move weights in and out of PEFT.

Weights travel as a mapping from module name (``model.layers.0.self_attn.q_proj``) to a
:class:`LoraFactors` pair (with DoRA's magnitude vector), and the full weights of the modules an
adapter trains whole (``modules_to_save``) by parameter name (``lm_head.weight``). PEFT does the
injection and (de)serialization; the config's rank_pattern and alpha_pattern give each module its
own rank and scale (:func:`rank_of`, :func:`lora_scale`).
"""

from __future__ import annotations

import reprlib
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from peft.tuners.tuners_utils import check_target_module_exists
from peft.utils import ModulesToSaveWrapper, set_peft_model_state_dict
from peft.utils.other import get_pattern_key
from safetensors import SafetensorError
from safetensors.torch import load_file
from torch import nn
from torch.distributed.tensor import DTensor
from transformers.pytorch_utils import Conv1D

from relora_trainer import adapter_config
from relora_trainer.adapter_config import CONFIG_FILE, WEIGHTS_FILE
from relora_trainer.errors import InvalidAdapter, InvalidWeights

ADAPTER = "default"
_PREFIX = "base_model.model."
_MAGNITUDE = "lora_magnitude_vector"

__all__ = ["CONFIG_FILE", "WEIGHTS_FILE"]


@dataclass
class LoraFactors:
    """One adapted Linear: delta W = scale * B @ A, with A (r, in) and B (out, r); for DoRA the
    layer is ``magnitude * (W + delta W) / ||W + delta W||`` (norms per output feature)."""

    a: torch.Tensor
    b: torch.Tensor
    magnitude: torch.Tensor | None = None  # (out,): DoRA only


@dataclass
class OldAdapter:
    config: LoraConfig
    factors: dict[str, LoraFactors]
    saved: dict[str, torch.Tensor] = field(default_factory=dict)  # modules_to_save, by parameter

    @property
    def rank(self) -> int:
        """The config's r (modules in rank_pattern have their own: :func:`rank_of`)."""
        return int(self.config.r)

    @property
    def dora(self) -> bool:
        return bool(self.config.use_dora)

    def scale(self, module: str) -> float:
        return lora_scale(self.config, rank_of(self.config, module), module)


def pattern_value(pattern: dict[str, Any] | None, module: str, default: float) -> float:
    """PEFT's lookup of a module's entry in rank_pattern or alpha_pattern."""
    if not pattern:
        return default
    return float(pattern.get(get_pattern_key(list(pattern), module), default))


def rank_of(config: LoraConfig, module: str) -> int:
    """A module's LoRA rank under ``config`` (its rank_pattern entry, else r)."""
    return int(pattern_value(config.rank_pattern, module, config.r))


def lora_scale(config: LoraConfig, rank: int, module: str | None = None) -> float:
    """PEFT's scaling: lora_alpha / r, or lora_alpha / sqrt(r) with rsLoRA; the alpha of
    ``module`` from alpha_pattern when it has an entry there."""
    alpha = pattern_value(config.alpha_pattern, module, config.lora_alpha) if module else None
    return float(alpha or config.lora_alpha) / (rank**0.5 if config.use_rslora else rank)


def read_adapter(folder: Path, *, what: str) -> OldAdapter:
    """Read a PEFT LoRA folder; raise a one-line BadInput naming the file or field at fault."""
    adapter_config.check_folder(folder, what=what)
    config_path, weights_path = folder / CONFIG_FILE, folder / WEIGHTS_FILE
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
    factors, saved = _factors(state, dora=bool(config.use_dora), what=what)
    for module, pair in factors.items():
        expected = rank_of(config, module)
        if pair.a.shape[0] != expected:
            said = "rank_pattern says" if expected != config.r else "says"
            raise InvalidAdapter(
                f"{what}: {config_path} {said} r={expected} but module {module} has rank "
                f"{pair.a.shape[0]} weights"
            )
    wanted = set(config.modules_to_save or [])
    for name in saved:
        if not any(part_of(name, module) for module in wanted):
            raise InvalidAdapter(
                f"{what}: {weights_path} holds {name}, which is neither LoRA weights nor in "
                f"modules_to_save {sorted(wanted)}"
            )
    for module in wanted:
        if not any(part_of(name, module) for name in saved):
            raise InvalidAdapter(
                f"{what}: {config_path}: modules_to_save names {module!r} but "
                f"{WEIGHTS_FILE} holds no weights of it"
            )
    return OldAdapter(config=config, factors=factors, saved=saved)


def part_of(parameter: str, module: str) -> bool:
    """``model.score.weight`` is a parameter of the module PEFT's modules_to_save entry
    ``score`` names (a name or a dotted suffix of one)."""
    owner = parameter.rsplit(".", 1)[0]
    return owner == module or owner.endswith(f".{module}")


def _factors(
    state: dict[str, torch.Tensor], *, dora: bool, what: str
) -> tuple[dict[str, LoraFactors], dict[str, torch.Tensor]]:
    """The LoRA factors by module (with DoRA magnitudes), and every other tensor by parameter
    name (the modules_to_save weights)."""
    parts: dict[str, dict[str, torch.Tensor]] = {}
    saved: dict[str, torch.Tensor] = {}
    for key, tensor in state.items():
        if "lora_embedding" in key:
            raise InvalidAdapter(f"{what}: {key}: only LoRA on Linear layers is supported")
        for part in ("lora_A", "lora_B", _MAGNITUDE):
            marker = f".{part}."
            if marker in f"{key}.":
                module = f"{key}.".split(marker)[0].removeprefix(_PREFIX)
                parts.setdefault(module, {})[part] = tensor.float()
                break
        else:
            if not torch.isfinite(tensor).all():
                raise InvalidWeights(f"{what}: {key} has NaN or infinite weights")
            saved[key.removeprefix(_PREFIX)] = tensor.float()
    if not parts:
        raise InvalidAdapter(f"{what}: {WEIGHTS_FILE} holds no lora_A/lora_B weights")
    factors = {}
    expected = {"lora_A", "lora_B", _MAGNITUDE} if dora else {"lora_A", "lora_B"}
    for module, pair in sorted(parts.items()):
        if set(pair) != expected:
            missing = sorted(expected - set(pair)) or sorted(set(pair) - expected)
            which = "lacks" if expected - set(pair) else "has, without use_dora,"
            raise InvalidAdapter(f"{what}: module {module} {which} {', '.join(missing)}")
        a, b, magnitude = pair["lora_A"], pair["lora_B"], pair.get(_MAGNITUDE)
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise InvalidAdapter(f"{what}: module {module}: lora_A/lora_B shapes do not match")
        if magnitude is not None and tuple(magnitude.shape) != (b.shape[0],):
            raise InvalidAdapter(
                f"{what}: module {module}: {_MAGNITUDE} has shape {tuple(magnitude.shape)}, "
                f"expected ({b.shape[0]},)"
            )
        tensors = (a, b) if magnitude is None else (a, b, magnitude)
        if not all(torch.isfinite(t).all() for t in tensors):
            raise InvalidWeights(f"{what}: module {module} has NaN or infinite LoRA weights")
        factors[module] = LoraFactors(a=a, b=b, magnitude=magnitude)
    return factors, saved


def base_weight(model: nn.Module, module: str, *, fan_in_fan_out: bool) -> torch.Tensor:
    """The (out, in) weight of ``module`` in a base model (transposed for Conv1D layers)."""
    layer = model.get_submodule(module)
    weight = getattr(layer, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise InvalidAdapter(f"adapter module {module} is not a layer with a weight in the model")
    return weight.T if fan_in_fan_out else weight


def base_parameter(model: nn.Module, name: str) -> torch.Tensor:
    """The base's parameter ``name`` (``lm_head.weight``), also when PEFT wraps its module for
    modules_to_save (then the original module's, not the trained copy's)."""
    owner, _, leaf = name.rpartition(".")
    module = model.get_submodule(owner) if owner else model
    if isinstance(module, ModulesToSaveWrapper):
        module = module.original_module
    tensor = getattr(module, leaf, None)
    if not isinstance(tensor, torch.Tensor):
        raise InvalidAdapter(f"modules_to_save weight {name} is not a parameter of the model")
    return tensor


def _targeted(config: LoraConfig, model: nn.Module) -> dict[str, nn.Module]:
    """The modules of ``model`` that PEFT wraps with ``config`` (by name)."""
    modules = dict(model.named_modules())
    if config.target_modules == "all-linear":
        return {name: m for name, m in modules.items() if isinstance(m, nn.Linear)}
    return {name: m for name, m in modules.items() if check_target_module_exists(config, name)}


def check_fits(adapter: OldAdapter, model: nn.Module, *, what: str) -> None:
    """Raise InvalidAdapter unless every adapted module exists in ``model`` with matching shapes
    and the config's target_modules select Linear layers of the model, those with weights."""
    sharded = any(isinstance(p, DTensor) for p in model.parameters())
    if sharded and (adapter.saved or adapter.dora):
        kept = f"modules_to_save ({next(iter(adapter.saved), '')})"
        kind = "DoRA magnitudes" if adapter.dora else kept
        raise InvalidAdapter(
            f"{what}: the adapter has {kind}; a sharded base (spec.distributed.shardBase) takes "
            "plain LoRA factors only: leave shardBase false for it"
        )
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
    for name, tensor in adapter.saved.items():
        try:
            found = base_parameter(model, name)
        except (AttributeError, InvalidAdapter):
            raise InvalidAdapter(
                f"{what}: modules_to_save weight {name} is not a parameter of the model "
                "(adapter trained for another architecture)"
            ) from None
        if tuple(found.shape) != tuple(tensor.shape):
            raise InvalidAdapter(
                f"{what}: modules_to_save weight {name} is {tuple(tensor.shape)} but the model's "
                f"is {tuple(found.shape)}: trained for another architecture"
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
    """Wrap ``model`` with a fresh LoRA adapter (PEFT's default init); undo with :func:`detach`.

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


def detach(model: PeftModel) -> nn.Module:
    """The base without the adapter, as it was before :func:`attach`. PEFT's own ``unload()``
    leaves the trained copy of each modules_to_save module in the base (and unties it from the
    embeddings): the original modules are put back first."""
    root: nn.Module = model.get_base_model()
    for name, module in list(root.named_modules()):
        if isinstance(module, ModulesToSaveWrapper):
            owner, _, leaf = name.rpartition(".")
            setattr(root.get_submodule(owner) if owner else root, leaf, module.original_module)
    base: nn.Module = model.unload()
    return base


def load_factors(
    model: PeftModel,
    factors: dict[str, LoraFactors],
    saved: dict[str, torch.Tensor] | None = None,
    *,
    adapter_name: str = ADAPTER,
) -> None:
    """Set the weights of ``model``'s adapter ``adapter_name`` (same device and dtype as the
    LoRA layers): the factors, DoRA magnitudes where given, and the modules_to_save weights in
    ``saved``."""
    state = {}
    for module, pair in factors.items():
        state[f"{_PREFIX}{module}.lora_A.weight"] = pair.a
        state[f"{_PREFIX}{module}.lora_B.weight"] = pair.b
        if pair.magnitude is not None:
            state[f"{_PREFIX}{module}.{_MAGNITUDE}"] = pair.magnitude
    for name, tensor in (saved or {}).items():
        state[f"{_PREFIX}{name}"] = tensor
    result = set_peft_model_state_dict(model, state, adapter_name=adapter_name)
    unexpected = getattr(result, "unexpected_keys", [])
    if unexpected:
        raise InvalidAdapter(f"adapter weights not used by the model: {unexpected[:3]}")


def attach_old(base: nn.Module, old: OldAdapter) -> PeftModel:
    """``base`` with the old adapter attached as PEFT would load it."""
    model = attach(base, old.config)
    load_factors(model, old.factors, old.saved)
    return model


def layout(model: PeftModel) -> dict[str, tuple[int, float]]:
    """The attached adapter's rank and scale per adapted module (they differ by module under a
    rank_pattern or alpha_pattern)."""
    found = {}
    for name, layer in model.named_modules():
        if isinstance(layer, LoraLayer) and ADAPTER in layer.r:
            module = name.removeprefix(_PREFIX)
            found[module] = (int(layer.r[ADAPTER]), float(layer.scaling[ADAPTER]))
    return found


def dora_norm(model: PeftModel, module: str, factors: LoraFactors, scale: float) -> torch.Tensor:
    """``||W + scale * B @ A||`` per output feature, W the attached model's base weight of
    ``module``: the norm DoRA divides the direction by (its magnitude's value at PEFT's init)."""
    layer = model.get_submodule(f"{_PREFIX}{module}")
    if not isinstance(layer, LoraLayer):
        raise ValueError(f"{module} is not a LoRA layer of the model")
    base_layer: nn.Module = layer.get_base_layer()
    weight = base_layer.weight
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"{module} has no base weight")
    config = model.peft_config[ADAPTER]
    fan_in_fan_out = bool(getattr(config, "fan_in_fan_out", False))
    return direction_norm((weight.T if fan_in_fan_out else weight).detach(), factors, scale)


def direction_norm(weight: torch.Tensor, factors: LoraFactors, scale: float) -> torch.Tensor:
    """``||W + scale * B @ A||`` per output feature, in fp32, for an (out, in) ``weight``."""
    w = weight.float()
    norm: torch.Tensor = torch.linalg.vector_norm(
        w + scale * (factors.b.to(w) @ factors.a.to(w)), dim=1
    )
    return norm


def trainable(model: PeftModel) -> dict[str, torch.nn.Parameter]:
    """The adapter's trainable parameters by name: LoRA factors, DoRA magnitudes and the
    modules_to_save copies (the base is frozen)."""
    return {n: p for n, p in model.named_parameters() if p.requires_grad}


def new_config(old: LoraConfig, *, rank: int | None, base: str) -> LoraConfig:
    """The output adapter's config: the old one's targets, alphas, DoRA and modules_to_save;
    its ranks (rank_pattern too), or ``rank`` for every module."""
    return LoraConfig(
        r=rank or old.r,
        rank_pattern={} if rank else dict(old.rank_pattern or {}),
        lora_alpha=old.lora_alpha,
        alpha_pattern=dict(old.alpha_pattern or {}),
        target_modules=old.target_modules,
        lora_dropout=old.lora_dropout,
        fan_in_fan_out=old.fan_in_fan_out,
        use_rslora=old.use_rslora,
        use_dora=old.use_dora,
        modules_to_save=list(old.modules_to_save) if old.modules_to_save else None,
        ensure_weight_tying=bool(getattr(old, "ensure_weight_tying", False)),
        bias="none",
        task_type="CAUSAL_LM",
        base_model_name_or_path=base,
    )
