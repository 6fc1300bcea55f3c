"""A synthetic model pair, adapter and task, built in seconds: for smoke tests and the quick demo.

Not a benchmark (the corpus-based testbed is): the bases are random tiny Llamas, v2 is v1 with a
low-rank plus dense perturbation, the task maps bags of words to one of four category words, and
the old LoRA adapter is trained on v1 with the same fine-tuning code the migrations use.

Layout written under ``out`` (the same as the testbed's, so the example manifests fit both)::

    models/v1  models/v2-mild           Hugging Face model folders with a tokenizer
    adapters/<task>                     PEFT LoRA adapter trained on v1
    data/<task>/{train,validation,test}.jsonl
"""

from __future__ import annotations

import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from relora_api.spec import Finetune
from relora_trainer import adapters
from relora_trainer.data import Encoder, Example, read_jsonl
from relora_trainer.method.config import FinetuneConfig
from relora_trainer.method.finetune import Target, finetune

TASK = "toy-category"
CATEGORIES = {
    "animal": ["cat", "dog", "horse", "sheep", "lion", "mouse", "otter", "zebra"],
    "plant": ["oak", "fern", "rose", "moss", "pine", "tulip", "ivy", "reed"],
    "tool": ["hammer", "saw", "drill", "wrench", "chisel", "file", "vise", "plane"],
    "food": ["bread", "cheese", "apple", "soup", "rice", "honey", "bean", "plum"],
}
SPECIALS = ["<unk>", "<pad>", "<s>", "</s>"]
FILLERS = ["classify", ":", "->", "the", "a", "of", "and", "with"]


@dataclass(frozen=True)
class ToyPaths:
    root: Path

    @property
    def v1(self) -> Path:
        return self.root / "models" / "v1"

    @property
    def v2(self) -> Path:
        return self.root / "models" / "v2-mild"

    @property
    def adapter(self) -> Path:
        return self.root / "adapters" / TASK

    def split(self, name: str) -> Path:
        return self.root / "data" / TASK / f"{name}.jsonl"

    def variant(self, name: str) -> Path:
        """Where :func:`train_adapter` writes another kind of adapter for the same task."""
        return self.root / "adapters" / f"{TASK}-{name}"


def _tokenizer() -> PreTrainedTokenizerFast:
    words = FILLERS + [w for members in CATEGORIES.values() for w in members] + list(CATEGORIES)
    vocab = {token: i for i, token in enumerate(SPECIALS + sorted(set(words)))}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="<unk>",
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
    )


def _examples(count: int, rng: random.Random) -> list[Example]:
    examples = []
    names = list(CATEGORIES)
    for _ in range(count):
        category = rng.choice(names)
        words = rng.sample(CATEGORIES[category], 3)
        for other in rng.sample([n for n in names if n != category], 2):
            words.append(rng.choice(CATEGORIES[other]))
        rng.shuffle(words)
        examples.append(Example(f"classify : {' '.join(words)} ->", f" {category}"))
    return examples


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "completion": e.completion}) for e in examples]
    path.write_text("\n".join(lines) + "\n")


def _base(vocab_size: int, seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=4,
        max_position_embeddings=64,
        tie_word_embeddings=True,
        pad_token_id=1,
        bos_token_id=2,
        eos_token_id=3,
    )
    return LlamaForCausalLM(config)


def _evolve(model: LlamaForCausalLM, *, strength: float, seed: int) -> None:
    """Perturb every Linear weight: a rank-2 drift plus dense noise (the 'vendor update')."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.Linear) and module.weight.shape[0] != model.vocab_size:
                out_features, in_features = module.weight.shape
                left = torch.randn(out_features, 2, generator=generator)
                right = torch.randn(2, in_features, generator=generator)
                scale = module.weight.std() * strength
                drift = (left @ right) / (2 * in_features) ** 0.5
                noise = torch.randn(out_features, in_features, generator=generator)
                module.weight += scale * (drift + 0.5 * noise)


def build(out: Path, *, seed: int = 0, adapter_steps: int = 200, strength: float = 3.0) -> ToyPaths:
    """Write the toy world under ``out`` (deterministic for ``seed``); return its paths.

    A finished build leaves ``toyworld.json`` with its parameters; building again with the same
    parameters returns at once.
    """
    paths = ToyPaths(out)
    marker = out / "toyworld.json"
    parameters = {"seed": seed, "adapter_steps": adapter_steps, "strength": strength}
    if marker.is_file() and json.loads(marker.read_text()) == parameters:
        return paths
    rng = random.Random(seed)
    splits = {"train": _examples(512, rng), "validation": _examples(96, rng)}
    splits["test"] = _examples(192, rng)
    for name, examples in splits.items():
        _write_jsonl(paths.split(name), examples)

    tokenizer = _tokenizer()
    v1 = _base(len(tokenizer), seed)
    v1.save_pretrained(paths.v1)
    tokenizer.save_pretrained(paths.v1)
    v2 = _base(len(tokenizer), seed)
    v2.load_state_dict(v1.state_dict())
    _evolve(v2, strength=strength, seed=seed + 1)
    v2.save_pretrained(paths.v2)
    tokenizer.save_pretrained(paths.v2)

    train_adapter(paths, paths.adapter, seed=seed, steps=adapter_steps)
    marker.write_text(json.dumps(parameters))
    return paths


def train_adapter(
    paths: ToyPaths, out: Path, *, seed: int = 0, steps: int = 200, **lora: Any
) -> Path:
    """Train the task's adapter on v1 into ``out`` (PEFT LoraConfig fields in ``lora`` override
    the default recipe: ``use_dora``, ``rank_pattern``, ``modules_to_save``...); return ``out``."""
    if (out / adapters.WEIGHTS_FILE).is_file():
        return out
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(paths.v1))
    v1 = LlamaForCausalLM.from_pretrained(str(paths.v1))
    v1.requires_grad_(False)
    fields = {
        "r": 4,
        "lora_alpha": 8,
        "target_modules": ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"],
        "lora_dropout": 0.0,
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(paths.v1),
        **lora,
    }
    torch.manual_seed(seed)
    model = adapters.attach(v1, LoraConfig(**fields))
    examples = {
        split: read_jsonl(paths.split(split), what=split) for split in ("train", "validation")
    }
    finetune(
        model=model,
        encoder=Encoder(tokenizer),
        train=examples["train"],
        validation=examples["validation"],
        choices=[f" {c}" for c in CATEGORIES],
        config=FinetuneConfig.of(Finetune(max_steps=steps, learning_rate=1e-2, eval_every=steps)),
        regularize=None,
        target=Target("accuracy", 2.0),  # unreachable: train the whole budget
        seed=seed,
        device=torch.device("cpu"),
    )
    model.save_pretrained(str(out), save_embedding_layers=False)
    adapters.detach(model)
    return out
