"""Task quality of a model: choice accuracy by log-likelihood, and completion loss.

accuracy: the share of examples whose own completion has the highest summed log-likelihood among
the task's distinct completions (ties go to the first choice listed).
loss: mean cross-entropy per completion token of the right completions.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from relora_trainer.data import IGNORE_INDEX, Encoded, Encoder, Example


@dataclass(frozen=True)
class Quality:
    loss: float
    accuracy: float | None  # None when only the loss was asked for

    def value(self, metric: str) -> float:
        if metric == "loss":
            return self.loss
        if self.accuracy is None:
            raise ValueError("accuracy was not measured")
        return self.accuracy


def sequence_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens, and their count."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    logits = logits[:, :-1].float()
    labels = batch["labels"][:, 1:]
    mask = labels != IGNORE_INDEX
    picked = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    picked = picked.squeeze(-1) * mask
    return picked.sum(dim=1), mask.sum(dim=1)


@torch.no_grad()
def measure(
    model: nn.Module,
    encoder: Encoder,
    examples: Sequence[Example],
    choices: Sequence[str],
    *,
    device: torch.device,
    batch_size: int = 64,
    with_accuracy: bool = True,
) -> Quality:
    """Quality of ``model`` on ``examples``; batched, gradients off, eval mode restored after."""
    was_training = model.training
    model.eval()
    try:
        candidates = list(choices) if with_accuracy else []
        index = {c: i for i, c in enumerate(candidates)}
        items: list[tuple[int, int, Encoded]] = []  # (example, candidate slot, encoding)
        for n, example in enumerate(examples):
            if example.completion not in index:
                items.append((n, -1, encoder.encode(example.prompt, example.completion)))
            for slot, choice in enumerate(candidates):
                items.append((n, slot, encoder.encode(example.prompt, choice)))
        scores = torch.full((len(examples), max(len(candidates), 1)), float("-inf"))
        gold_logprob = torch.zeros(len(examples))
        gold_tokens = torch.zeros(len(examples))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            logprob, count = sequence_logprobs(model, encoder.batch([c[2] for c in chunk], device))
            for (n, slot, _), lp, tokens in zip(chunk, logprob.cpu(), count.cpu(), strict=True):
                if slot >= 0:
                    scores[n, slot] = lp
                is_gold = slot < 0 or candidates[slot] == examples[n].completion
                if is_gold:
                    gold_logprob[n], gold_tokens[n] = lp, tokens
        loss = float(-gold_logprob.sum() / gold_tokens.sum().clamp(min=1))
        accuracy = None
        if with_accuracy:
            gold = torch.tensor([index.get(e.completion, -1) for e in examples])
            accuracy = float((scores.argmax(dim=1) == gold).float().mean())
        return Quality(loss=loss, accuracy=accuracy)
    finally:
        model.train(was_training)
