"""Stages ``v1`` and ``v2-<severity>``: the bases, v1 pretrained and each v2 continued from it."""

from __future__ import annotations

import time
from dataclasses import asdict, replace
from typing import Any

import torch
from transformers import AutoModelForCausalLM, PreTrainedTokenizerBase

from relora_lab import pretrained
from relora_lab.testbed import pretraining
from relora_lab.testbed.builder import WorldBuilder
from relora_lab.testbed.cache import digest
from relora_lab.testbed.config import Severity


def v1_stage(
    world: WorldBuilder, tokenizer: PreTrainedTokenizerBase, tokenizer_key: dict[str, Any]
) -> dict[str, Any]:
    """v1 in ``models/v1``: a tiny decoder pretrained on Austen (or the real model); its key."""
    config, paths, device = world.config, world.paths, world.device
    params: dict[str, Any] = {"tokenizer": digest(tokenizer_key), "seed": config.seed}
    if config.model is not None:
        params["model"] = config.model
    else:
        params["architecture"] = asdict(config.architecture)
        params["schedule"] = asdict(config.v1)
    if world.cache.done("v1", params) is not None and (paths.v1 / "config.json").is_file():
        return params
    started = time.perf_counter()
    streams = world.texts.streams(tokenizer, _corpora(config.severities))
    losses: list[float] = []
    if config.model is not None:
        model = pretrained.load(config.model).to(device)
    else:
        torch.manual_seed(config.seed)
        model = AutoModelForCausalLM.from_config(config.architecture.config(tokenizer)).to(device)
        with world.bars.stage("v1", "pretraining on Austen", config.v1.steps) as tick:
            losses = pretraining.pretrain(
                model,
                [streams["austen"][0]],
                [1.0],
                schedule=config.v1,
                seed=config.seed,
                device=device,
                on_step=lambda step, loss: tick(step, f"loss {loss:.3f}"),
            )
    stats: dict[str, Any] = _lm_losses(model, streams, device, seq_len=config.v1.seq_len)
    stats["final_train_loss"] = losses[-1] if losses else None
    stats["seconds"] = time.perf_counter() - started
    world.save_model(model, tokenizer, paths.v1)
    world.cache.mark("v1", params, stats)
    world.bars.note(
        "v1",
        f"held-out loss Austen {stats['austen_held_out_loss']:.3f}, "
        f"Bible {stats['bible_held_out_loss']:.3f} ({stats['seconds']:.0f} s)",
    )
    return params


def v2_stage(
    world: WorldBuilder,
    severity: Severity,
    tokenizer: PreTrainedTokenizerBase,
    v1_key: dict[str, Any],
) -> dict[str, Any]:
    """v2 of one severity in ``models/v2-<severity>``: v1 continued on the severity's corpus
    (the Bible, or the instructions) with Austen replay; its key."""
    config, paths, device = world.config, world.paths, world.device
    name = f"v2-{severity.name}"
    schedule = replace(
        config.v1,
        steps=severity.steps,
        learning_rate=severity.learning_rate,
        warmup_steps=min(10, severity.steps),
    )
    params = {"v1": digest(v1_key), "severity": asdict(severity), "schedule": asdict(schedule)}
    if (
        world.cache.done(name, params) is not None
        and (paths.v2(severity.name) / "config.json").is_file()
    ):
        return params
    started = time.perf_counter()
    streams = world.texts.streams(tokenizer, _corpora(config.severities))
    model = world.load_model(paths.v1)
    what = f"{severity.corpus} + {severity.replay:.0%} Austen replay"
    with world.bars.stage(name, what, severity.steps) as tick:
        losses = pretraining.pretrain(
            model,
            [streams[severity.corpus][0], streams["austen"][0]],
            [1.0 - severity.replay, severity.replay],
            schedule=schedule,
            seed=config.seed + 1,
            device=device,
            on_step=lambda step, loss: tick(step, f"loss {loss:.3f}"),
        )
    stats: dict[str, Any] = _lm_losses(model, streams, device, seq_len=config.v1.seq_len)
    stats["final_train_loss"] = losses[-1] if losses else None
    v1 = world.load_model(paths.v1)
    stats["relative_weight_change"] = _relative_change(v1, model)
    stats["seconds"] = time.perf_counter() - started
    world.save_model(model, tokenizer, paths.v2(severity.name))
    world.cache.mark(name, params, stats)
    world.bars.note(
        name,
        f"held-out loss Austen {stats['austen_held_out_loss']:.3f}, "
        f"Bible {stats['bible_held_out_loss']:.3f}, ||W2-W1||/||W1|| "
        f"{stats['relative_weight_change']:.3f} ({stats['seconds']:.0f} s)",
    )
    return params


def _corpora(severities: tuple[Severity, ...]) -> tuple[str, ...]:
    """The corpora whose held-out losses the bases report: Austen, the Bible, and any other
    corpus an update trains on."""
    return tuple(dict.fromkeys(("austen", "bible", *(s.corpus for s in severities))))


def _lm_losses(
    model: torch.nn.Module,
    streams: dict[str, tuple[torch.Tensor, torch.Tensor]],
    device: torch.device,
    *,
    seq_len: int,
) -> dict[str, float]:
    return {
        f"{name}_held_out_loss": pretraining.held_out_loss(
            model, held, device=device, seq_len=seq_len
        )
        for name, (_, held) in streams.items()
    }


def _relative_change(v1: torch.nn.Module, v2: torch.nn.Module) -> float:
    """||W2 - W1|| / ||W1|| over the linear weights of the decoder layers."""
    first, second = v1.state_dict(), v2.state_dict()
    num = den = 0.0
    for key, value in first.items():
        if "layers." in key and key.endswith("proj.weight"):
            num += float((second[key].float() - value.float()).pow(2).sum())
            den += float(value.float().pow(2).sum())
    return (num / den) ** 0.5 if den > 0 else 0.0
