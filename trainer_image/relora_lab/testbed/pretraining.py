"""Language-model pretraining for the testbed: v1 on one corpus, v2 continued on a mixture.

Batches are windows of ``seq_len + 1`` tokens cut from token streams; each row picks its stream
by weight (a mixture such as 80% Bible + 20% Austen replay) and its offset at random, from a
generator seeded by (seed, step): a run is a pure function of its parameters. AdamW with a linear
warm-up and a cosine decay to a tenth of the peak learning rate; bf16 autocast on CUDA.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from transformers import LlamaConfig, PretrainedConfig, PreTrainedTokenizerBase, Qwen2Config

from relora_trainer.method.finetune import autocast

FAMILIES: dict[str, Callable[..., PretrainedConfig]] = {"llama": LlamaConfig, "qwen2": Qwen2Config}
"""Decoder families a testbed base can have: Llama, or Qwen2 (biases on q, k and v)."""


@dataclass(frozen=True)
class Architecture:
    """The testbed's tiny decoder (tied input and output embeddings)."""

    hidden_size: int = 128
    layers: int = 4
    heads: int = 4
    intermediate_size: int = 512
    max_positions: int = 256
    family: str = "llama"
    kv_heads: int | None = None  # grouped-query attention; None: one per head

    def config(self, tokenizer: PreTrainedTokenizerBase) -> PretrainedConfig:
        if self.family not in FAMILIES:
            raise ValueError(f"architecture family {self.family!r}: known {sorted(FAMILIES)}")
        return FAMILIES[self.family](
            vocab_size=len(tokenizer),
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.layers,
            num_attention_heads=self.heads,
            num_key_value_heads=self.kv_heads or self.heads,
            max_position_embeddings=self.max_positions,
            tie_word_embeddings=True,
            pad_token_id=tokenizer.pad_token_id,
            bos_token_id=tokenizer.bos_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )


@dataclass(frozen=True)
class Schedule:
    """One pretraining phase: steps, peak learning rate, batch shape, mixture weights."""

    steps: int
    learning_rate: float
    batch_size: int = 32
    seq_len: int = 128
    warmup_steps: int = 20
    weight_decay: float = 0.1


def tokenize(
    tokenizer: PreTrainedTokenizerBase, text: str, *, chunk_chars: int = 200_000
) -> torch.Tensor:
    """``text`` as one 1-D stream of token ids (encoded in line-aligned chunks)."""
    ids: list[int] = []
    start = 0
    while start < len(text):
        end = min(start + chunk_chars, len(text))
        if end < len(text):
            newline = text.rfind("\n", start, end)
            end = newline + 1 if newline > start else end
        ids += tokenizer(text[start:end], add_special_tokens=False)["input_ids"]
        start = end
    return torch.tensor(ids, dtype=torch.long)


def split_stream(stream: torch.Tensor, *, held_out: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(train, held-out): the last ``held_out`` share of the stream is kept for evaluation."""
    cut = int(len(stream) * (1.0 - held_out))
    return stream[:cut], stream[cut:]


def _batch(
    streams: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    batch_size: int,
    seq_len: int,
    generator: torch.Generator,
) -> torch.Tensor:
    probabilities = torch.tensor(weights, dtype=torch.float64)
    picks = torch.multinomial(probabilities, batch_size, replacement=True, generator=generator)
    rows = []
    for pick in picks.tolist():
        stream = streams[pick]
        offset = int(torch.randint(0, len(stream) - seq_len - 1, (1,), generator=generator))
        rows.append(stream[offset : offset + seq_len + 1])
    return torch.stack(rows)


def _lr_factor(step: int, schedule: Schedule) -> float:
    if step < schedule.warmup_steps:
        return (step + 1) / schedule.warmup_steps
    span = max(schedule.steps - schedule.warmup_steps, 1)
    progress = min((step - schedule.warmup_steps) / span, 1.0)
    return 0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress))


def pretrain(
    model: nn.Module,
    streams: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    schedule: Schedule,
    seed: int,
    device: torch.device,
    on_step: Callable[[int, float], None] | None = None,
) -> list[float]:
    """Train every parameter of ``model`` on the stream mixture; return the per-step losses."""
    for stream in streams:
        if len(stream) <= schedule.seq_len + 1:
            raise ValueError(f"a stream of {len(stream)} tokens is too short for the windows")
    model.train()
    model.requires_grad_(True)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    rest = [p for p in model.parameters() if p.dim() < 2]
    groups: list[dict[str, Any]] = [
        {"params": decay, "weight_decay": schedule.weight_decay},
        {"params": rest},
    ]
    optimizer = torch.optim.AdamW(
        groups,
        lr=schedule.learning_rate,
        betas=(0.9, 0.95),
        weight_decay=0.0,
    )
    losses = []
    for step in range(schedule.steps):
        generator = torch.Generator().manual_seed(seed * 1_000_003 + step)
        batch = _batch(
            streams,
            weights,
            batch_size=schedule.batch_size,
            seq_len=schedule.seq_len,
            generator=generator,
        ).to(device)
        for group in optimizer.param_groups:
            group["lr"] = schedule.learning_rate * _lr_factor(step, schedule)
        with autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        losses.append(float(loss.detach()))
        if on_step is not None:
            on_step(step + 1, losses[-1])
    model.eval()
    model.requires_grad_(False)
    return losses


@torch.no_grad()
def held_out_loss(
    model: nn.Module,
    stream: torch.Tensor,
    *,
    device: torch.device,
    seq_len: int = 128,
    max_windows: int = 64,
    batch_size: int = 16,
) -> float:
    """Mean next-token loss on consecutive windows from the start of ``stream``."""
    model.eval()
    count = min(max_windows, (len(stream) - 1) // (seq_len + 1))
    if count < 1:
        raise ValueError("the held-out stream is shorter than one window")
    windows = stream[: count * (seq_len + 1)].view(count, seq_len + 1)
    total = 0.0
    for start in range(0, count, batch_size):
        batch = windows[start : start + batch_size].to(device)
        with autocast(device):
            loss = model(input_ids=batch, labels=batch).loss
        total += float(loss) * len(batch)
    return total / count
