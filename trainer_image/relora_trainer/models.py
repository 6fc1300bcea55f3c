"""Load the source and target base models and check that an adapter can move between them."""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from accelerate import init_empty_weights
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.fsdp import FSDPModule, fully_shard
from torch.distributed.tensor import DTensor, distribute_tensor
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from relora_trainer.errors import IncompatibleModels, InvalidWeights, MissingInput

if TYPE_CHECKING:
    from relora_trainer.distributed import World


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


PRECISIONS: dict[str, torch.dtype] = {
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "fp32": torch.float32,
}


def dtype_for(precision: str, device: torch.device) -> torch.dtype:
    """The dtype the bases are loaded in: ``auto`` is bf16 on a GPU that has it, else fp32 (a
    CPU has no bf16 units). LoRA weights and the optimizer stay in fp32 whatever this is."""
    if precision != "auto":
        return PRECISIONS[precision]
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def load_model(
    folder: Path, *, what: str, device: torch.device, dtype: torch.dtype = torch.float32
) -> nn.Module:
    """An AutoModelForCausalLM from a model folder, in ``dtype``, frozen, on ``device``."""
    _read_config(folder, what)
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype)
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


def load_sharded(
    folder: Path, *, what: str, device: torch.device, dtype: torch.dtype, world: World
) -> nn.Module:
    """The model of ``folder`` sharded across ``world``'s workers with FSDP2 (``fully_shard``
    on every decoder layer, as the model's ``_no_split_modules`` names them, then on the
    whole), frozen, in ``dtype`` on ``device``: built without weights, then each worker copies
    its shard of every weight from the files, one tensor at a time (no worker ever holds the
    whole base). The buffers the model computes itself (rotary frequencies) are kept as built."""
    config = _read_config(folder, what)
    try:
        settings = AutoConfig.from_pretrained(folder)
        with init_empty_weights(include_buffers=False):
            model: Any = AutoModelForCausalLM.from_config(settings, dtype=dtype)
    except (OSError, ValueError, KeyError) as error:
        raise MissingInput(f"{what}: cannot build a causal LM from {folder}: {error}") from error
    model.tie_weights()
    model.requires_grad_(False)
    layers = set(getattr(model, "_no_split_modules", None) or [])
    if not layers:
        kind = config.get("architectures")
        raise IncompatibleModels(
            f"{what}: {kind} does not name its decoder layers (_no_split_modules): it cannot be "
            "sharded (spec.distributed.shardBase); leave shardBase false"
        )
    mesh = world.mesh()
    for module in list(model.modules()):
        if type(module).__name__ in layers:
            fully_shard(module, mesh=mesh)
    # The root's weights resharded after each forward too (FSDP2 keeps a root's whole by
    # default): at rest every weight is a shard, the same on every worker, and copy_weights
    # writes shards.
    fully_shard(model, mesh=mesh, reshard_after_forward=True)
    buffers = dict(model.named_buffers())
    model.to_empty(device=device)
    for name, buffer in buffers.items():  # to_empty dropped their values
        owner, _, attribute = name.rpartition(".")
        model.get_submodule(owner)._buffers[attribute] = buffer.to(device)
    if not copy_weights(model, WeightFiles(folder, what=what)):
        raise InvalidWeights(f"{what}: the files in {folder} do not hold every weight of the model")
    sharded: nn.Module = model
    return sharded


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


@dataclass(frozen=True)
class Shape:
    """What the compatibility check needs of a model: its class and its weights' shapes."""

    kind: str
    shapes: dict[str, tuple[int, ...]]
    partial: bool = False

    @classmethod
    def of(cls, model: nn.Module) -> Shape:
        kind = type(model)
        if issubclass(kind, FSDPModule):  # sharded: FSDP2 subclasses the model's class
            kind = next(base for base in kind.__bases__ if base is not FSDPModule)
        return cls(kind.__name__, {k: tuple(v.shape) for k, v in model.state_dict().items()})

    @classmethod
    def of_files(cls, folder: Path, *, what: str) -> Shape:
        """From config.json and the safetensors headers, without loading a weight. The files
        may leave out what the model derives (tied embeddings): only common weights are
        compared then (``partial``)."""
        config = _read_config(folder, what)
        architectures = config.get("architectures")
        kind = str(architectures[0]) if isinstance(architectures, list) and architectures else "?"
        shapes: dict[str, tuple[int, ...]] = {}
        files = WeightFiles(folder, what=what)
        for path in sorted(set(files.files.values())):
            with _opened(path, what=what) as handle:
                for key in handle.keys():  # noqa: SIM118 - a safetensors handle, not a dict
                    shapes[key] = tuple(handle.get_slice(key).get_shape())
        return cls(kind, shapes, partial=True)


def check_compatible(source: nn.Module | Shape, target: nn.Module | Shape) -> None:
    """Raise IncompatibleModels unless both models have the same architecture and shapes
    (either may be the Shape of a model not in memory: from files, or freed)."""
    found = source if isinstance(source, Shape) else Shape.of(source)
    other = target if isinstance(target, Shape) else Shape.of(target)
    kinds = (found.kind, other.kind)
    if kinds[0] != kinds[1]:
        raise IncompatibleModels(
            f"sourceModel is a {kinds[0]} but targetModel is a {kinds[1]}; an adapter can only "
            "move between versions of one architecture"
        )
    source_shapes, target_shapes = found.shapes, other.shapes
    if found.partial or other.partial:
        source_shapes = {k: v for k, v in source_shapes.items() if k in target_shapes}
        target_shapes = {k: v for k, v in target_shapes.items() if k in source_shapes}
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


class WeightFiles:
    """Single tensors of a model folder's safetensors files, read one at a time (a sharded
    model's ``model.safetensors.index.json`` included): the base evolution W_target - W_source
    needs the source's adapted weights, not a second model in memory."""

    def __init__(self, folder: Path, *, what: str) -> None:
        self.folder, self.what = folder, what
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        self.files: dict[str, Path] = {}
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text()).get("weight_map", {})
            except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as error:
                raise InvalidWeights(f"{what}: {index} is not a safetensors index") from error
            self.files = {str(key): folder / str(name) for key, name in weight_map.items()}
        elif single.is_file():
            with _opened(single, what=what) as handle:
                self.files = {key: single for key in handle.keys()}  # noqa: SIM118

    def get(self, key: str) -> torch.Tensor | None:
        """The tensor ``key`` on the CPU (None if the files do not hold it)."""
        path = self.files.get(key)
        if path is None:
            return None
        with _opened(path, what=self.what) as handle:
            tensor: torch.Tensor = handle.get_tensor(key)
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidWeights(f"{self.what}: weight {key} has NaN or infinite values")
        return tensor


def _stored(
    model: nn.Module | Sequence[tuple[str, nn.Parameter]], files: WeightFiles
) -> tuple[dict[int, str], dict[int, nn.Parameter]] | None:
    """Per parameter of ``model`` (by storage), a name ``files`` hold it under, and the
    parameter; None when the files lack one of them."""
    named = (
        model.named_parameters(remove_duplicate=False) if isinstance(model, nn.Module) else model
    )
    names: dict[int, list[str]] = {}
    tensors: dict[int, nn.Parameter] = {}
    for name, parameter in named:
        # A shard's storage may be empty (a dimension smaller than the workers): by object.
        pointer = id(parameter) if isinstance(parameter, DTensor) else parameter.data_ptr()
        names.setdefault(pointer, []).append(name)
        tensors[pointer] = parameter
    stored: dict[int, str] = {}
    for pointer, aliases in names.items():
        found = next((n for n in aliases if n in files.files), None)
        if found is None:
            return None
        stored[pointer] = found
    return stored, tensors


def holds_all(model: nn.Module, files: WeightFiles) -> bool:
    """Whether ``files`` hold every parameter of ``model`` (:func:`copy_weights` can copy them
    in place)."""
    return _stored(model, files) is not None


def copy_weights(model: nn.Module | Sequence[tuple[str, nn.Parameter]], files: WeightFiles) -> bool:
    """Copy every parameter of ``model`` from ``files`` (another version of the same
    architecture), in place, one tensor at a time: the model becomes that version without a
    second one in memory. A tied parameter is read under any of its names. False, with nothing
    changed, when the files lack one of them (the shapes they hold were checked against the
    model's when the bases were loaded: :func:`check_compatible`). ``model`` may be given as
    its named parameters (``named_parameters(remove_duplicate=False)``), taken before an
    adapter wrapped its layers: the same tensors, under the names the files use."""
    found = _stored(model, files)
    if found is None:
        return False
    stored, tensors = found
    with torch.no_grad():
        for pointer, name in stored.items():
            value = files.get(name)
            if value is None or value.shape != tensors[pointer].shape:
                raise InvalidWeights(
                    f"{files.what}: weight {name} cannot replace the model's "
                    f"{tuple(tensors[pointer].shape)}"
                )
            _assign(tensors[pointer], value)
    return True


def _assign(parameter: torch.Tensor, value: torch.Tensor) -> None:
    """``value`` (a whole weight) into ``parameter``, or into its shard when it is sharded."""
    if isinstance(parameter, DTensor):
        local = value.to(parameter.device, parameter.dtype)
        value = distribute_tensor(
            local, parameter.device_mesh, parameter.placements, src_data_rank=None
        )
    parameter.copy_(value)


@contextlib.contextmanager
def _opened(path: Path, *, what: str) -> Iterator[Any]:
    """A safetensors file open for reading; InvalidWeights when it is torn or not one."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            yield handle
    except (SafetensorError, OSError) as error:
        raise InvalidWeights(
            f"{what}: a weights file in {path.parent} ({path.name}) is not a readable "
            f"safetensors file ({' '.join(str(error).split())[:200]})"
        ) from error


def check_finite(model: nn.Module, *, what: str) -> None:
    """Raise InvalidWeights naming the first weight with NaN or infinite values."""
    for name, tensor in model.state_dict().items():
        if isinstance(tensor, DTensor):  # read from files that WeightFiles.get checked
            continue
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise InvalidWeights(f"{what}: weight {name} has NaN or infinite values")


def recompute(model: nn.Module, on: bool) -> None:
    """Gradient checkpointing on or off (transformers' own; non-reentrant: the frozen
    embeddings need no input gradients for the LoRA layers to get theirs)."""
    pretrained: Any = model  # a transformers PreTrainedModel
    renamed = hasattr(pretrained, "activation_checkpointing_enable")  # transformers >= 5.x
    if on and renamed:
        pretrained.activation_checkpointing_enable({"use_reentrant": False})
    elif on:
        pretrained.gradient_checkpointing_enable(
            gradient_checkpointing_kwargs={"use_reentrant": False}
        )
    elif renamed:
        pretrained.activation_checkpointing_disable()
    else:
        pretrained.gradient_checkpointing_disable()
