"""Stages ``adapter`` and ``adapter-figures``: the task adapter trained on v1, and its accuracy on
v1 and reused as is on each v2."""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict
from typing import Any

import torch
from peft import LoraConfig
from transformers import PreTrainedTokenizerBase

from relora_api.spec import Finetune
from relora_lab.testbed.builder import WorldBuilder
from relora_lab.testbed.cache import digest
from relora_lab.testbed.config import ADAPTER_KINDS
from relora_lab.testbed.layout import TestbedPaths
from relora_trainer import adapters
from relora_trainer.data import Encoder, Example, read_jsonl
from relora_trainer.method.config import FinetuneConfig
from relora_trainer.method.finetune import Target, autocast, finetune
from relora_trainer.method.quality import measure


def adapter_stage(
    world: WorldBuilder,
    tokenizer: PreTrainedTokenizerBase,
    v1_key: dict[str, Any],
    task_key: dict[str, Any],
    kind: str | None = None,
) -> dict[str, Any]:
    """The task adapter in ``adapters/<task>`` (a ``kind`` of ADAPTER_KINDS: in
    ``adapters/<task>-<kind>``, with its LoraConfig fields), trained on v1 for the whole budget
    with the same recipe; its key."""
    config, paths, device = world.config, world.paths, world.device
    params: dict[str, Any] = {
        "v1": digest(v1_key),
        "task": digest(task_key),
        "recipe": asdict(config.adapter),
        "seed": config.seed,
    }
    extra = ADAPTER_KINDS[kind] if kind else {}
    if kind:
        params["kind"] = extra
    stage, folder = f"adapter-{kind}" if kind else "adapter", paths.adapter_of(kind)
    if world.cache.done(stage, params) is not None and (folder / adapters.WEIGHTS_FILE).is_file():
        return params
    started = time.perf_counter()
    recipe = config.adapter
    data = _task_data(paths)
    choices = list(dict.fromkeys(e.completion for e in data["train"] + data["validation"]))
    lora = LoraConfig(
        r=recipe.rank,
        lora_alpha=recipe.alpha,
        target_modules=list(recipe.targets),
        lora_dropout=0.0,
        task_type="CAUSAL_LM",
        base_model_name_or_path="models/v1",
        **extra,
    )
    base = world.load_model(paths.v1)
    torch.manual_seed(config.seed)
    model = adapters.attach(base, lora)
    label = f"{kind} LoRA on v1" if kind else "LoRA on v1"
    with world.bars.stage("task adapter", label, recipe.steps) as tick:
        outcome = finetune(
            model=model,
            encoder=Encoder(tokenizer),
            train=data["train"],
            validation=data["validation"],
            choices=choices,
            config=FinetuneConfig.of(
                Finetune(
                    max_steps=recipe.steps,
                    learning_rate=recipe.learning_rate,
                    batch_size=recipe.batch_size,
                    eval_every=max(recipe.steps // 4, 1),
                    checkpoint_every=recipe.steps + 1,
                )
            ),
            regularize=None,
            target=Target("accuracy", 2.0),  # unreachable: train the whole budget
            seed=config.seed,
            device=device,
            on_step=lambda step, ev: tick(
                step, f"validation accuracy {ev.quality:.3f}" if ev is not None else ""
            ),
        )
    if folder.exists():
        shutil.rmtree(folder)
    model.save_pretrained(str(folder), save_embedding_layers=False)
    adapters.detach(model)
    stats = {
        "history": [{"step": e.step, "accuracy": e.accuracy} for e in outcome.history],
        "seconds": time.perf_counter() - started,
    }
    world.cache.mark(stage, params, stats)
    return params


def adapter_figures(
    world: WorldBuilder,
    tokenizer: PreTrainedTokenizerBase,
    adapter_key: dict[str, Any],
    v2_keys: dict[str, dict[str, Any]],
) -> dict[str, Any]:
    """The adapter's accuracy on v1 (its own base) and reused as is on each v2."""
    config, paths, device = world.config, world.paths, world.device
    params = {"adapter": digest(adapter_key), "v2": {k: digest(v) for k, v in v2_keys.items()}}
    saved = world.cache.done("adapter-figures", params)
    if saved is not None:
        return saved
    data = _task_data(paths)
    choices = list(dict.fromkeys(e.completion for e in data["train"] + data["validation"]))
    encoder = Encoder(tokenizer)
    old = adapters.read_adapter(paths.adapter, what="adapter")
    figures: dict[str, Any] = {}
    for name, folder in [("v1", paths.v1)] + [
        (f"v2-{s.name}", paths.v2(s.name)) for s in config.severities
    ]:
        base = world.load_model(folder)
        for label, model in (("base", base), ("adapter", None)):
            if model is None:
                model = adapters.attach(base, old.config)
                adapters.load_factors(model, old.factors)
            for split in ("validation", "test"):
                with autocast(device):
                    quality = measure(model, encoder, data[split], choices, device=device)
                figures[f"{name}/{label}/{split}"] = quality.accuracy
    world.cache.mark("adapter-figures", params, figures)
    world.bars.note(
        "task adapter",
        "test accuracy: "
        + ", ".join(
            f"{name} {figures[f'{name}/adapter/test']:.3f}"
            for name in ["v1"] + [f"v2-{s.name}" for s in config.severities]
        )
        + f" (v1 without adapter {figures['v1/base/test']:.3f}; chance 0.25)",
    )
    return figures


def _task_data(paths: TestbedPaths) -> dict[str, list[Example]]:
    return {
        split: read_jsonl(paths.split(split), what=split)
        for split in ("train", "validation", "test")
    }
