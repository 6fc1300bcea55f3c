"""Task quality of a model: choice accuracy by log-likelihood, and completion loss.

accuracy: the share of examples whose own completion has the highest summed log-likelihood among
the task's distinct completions (ties go to the first choice listed).
loss: mean cross-entropy per completion token of the right completions.
choice loss: mean cross-entropy of the right completion under a softmax over the completions'
summed log-likelihoods (what accuracy takes the argmax of).

When every completion to score is a single token (a classification with one-token label words),
one forward pass of the prompt scores all of them: the next-token distribution after the prompt,
read at the prompt's last position only. Multi-token choices: each prompt runs once into the
key/value cache and every choice follows it. Otherwise each (prompt, completion) pair is scored by
its own sequence. The paths batch examples of similar length together (less padding); they give
the same numbers up to float rounding.

Every path scores each example on its own (:class:`Scores`); the quality is reduced from those,
so the scores of parts of the examples (data-parallel workers, each scoring a share) join into
the quality of the whole.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from relora_trainer.data import IGNORE_INDEX, Encoded, Encoder, Example


@dataclass(frozen=True)
class Quality:
    loss: float
    accuracy: float | None  # None when only the loss was asked for
    # Cross-entropy of the right completion among the task's completions only (a smooth proxy
    # of accuracy); None without accuracy or when a right completion is not among the choices.
    choice_loss: float | None = None

    def value(self, metric: str) -> float:
        if metric == "loss":
            return self.loss
        if self.accuracy is None:
            raise ValueError("accuracy was not measured")
        return self.accuracy


@dataclass(frozen=True)
class Scores:
    """Per example: the summed log-likelihood of each candidate completion (``choices``:
    [examples, candidates], -inf where not scored; None when only the loss was asked for), the
    position of its own completion among them (-1: not a candidate), and its own completion's
    summed log-likelihood and token count. What :func:`measure` reduces to a :class:`Quality`;
    those of parts of the examples concatenate (:meth:`joined`), so that workers each score a
    share and agree on one quality."""

    choices: torch.Tensor | None
    gold: torch.Tensor  # long
    gold_logprob: torch.Tensor
    gold_tokens: torch.Tensor

    def quality(self) -> Quality:
        loss = float(-self.gold_logprob.sum() / self.gold_tokens.sum().clamp(min=1))
        if self.choices is None:
            return Quality(loss=loss, accuracy=None)
        return _with_choices(loss, self.choices, self.gold)

    @staticmethod
    def joined(parts: Sequence[Scores]) -> Scores:
        """The scores of the examples of ``parts``, in that order."""
        with_choices = parts[0].choices is not None
        return Scores(
            choices=torch.cat([p.choices for p in parts if p.choices is not None])
            if with_choices
            else None,
            gold=torch.cat([p.gold for p in parts]),
            gold_logprob=torch.cat([p.gold_logprob for p in parts]),
            gold_tokens=torch.cat([p.gold_tokens for p in parts]),
        )


def completion_logits(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """The logits of the positions that predict a labelled (completion) token, and those labels
    (IGNORE_INDEX in the rows where that column is prompt or padding).

    Only those columns get logits (``logits_to_keep``): the output projection, the largest
    matrix of the model, and the fp32 logits (batch x columns x vocabulary) skip every prompt
    token. The columns are the union over the batch's rows (right-padded).
    """
    labels = batch["labels"][:, 1:]
    columns = torch.nonzero((labels != IGNORE_INDEX).any(dim=0)).squeeze(1)
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=columns).logits
    except TypeError:  # a model class without logits_to_keep: all positions
        logits = model(**inputs).logits[:, :-1][:, columns]
    return logits, labels[:, columns]


def sequence_logprobs(
    model: nn.Module, batch: dict[str, torch.Tensor]
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row: the summed log-probability of the labelled tokens, and their count."""
    logits, labels = completion_logits(model, batch)
    mask = labels != IGNORE_INDEX
    picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, labels.clamp(min=0).unsqueeze(-1))
    picked = picked.squeeze(-1) * mask
    return picked.sum(dim=1), mask.sum(dim=1)


def _single_tokens(encoder: Encoder, texts: Sequence[str]) -> list[int] | None:
    """The token of each text, or None unless every text is exactly one token."""
    tokens = []
    for text in texts:
        ids = encoder.encode("", text).completion_ids
        if len(ids) != 1:
            return None
        tokens.append(ids[0])
    return tokens


def _next_token_logprobs(
    model: nn.Module, encoder: Encoder, prompts: Sequence[Encoded], device: torch.device
) -> torch.Tensor:
    """(rows, vocab) log-probabilities of the token after each prompt (right-padded batch)."""
    batch = encoder.batch(prompts, device)
    last = batch["attention_mask"].sum(dim=1) - 1
    keep = torch.unique(last)  # sorted positions; only those rows of hidden states get logits
    inputs = {"input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"]}
    try:
        logits = model(**inputs, use_cache=False, logits_to_keep=keep).logits
        column = torch.searchsorted(keep, last)
    except TypeError:  # a model class without logits_to_keep: all positions
        logits = model(**inputs).logits
        column = last
    picked = logits[torch.arange(len(prompts), device=logits.device), column]
    return torch.log_softmax(picked.float(), dim=-1)


def _measure_next_token(
    model: nn.Module,
    encoder: Encoder,
    examples: Sequence[Example],
    candidates: Sequence[str],
    tokens: dict[str, int],
    *,
    device: torch.device,
    batch_size: int,
) -> Scores:
    prompts = [encoder.encode(e.prompt, e.completion) for e in examples]
    order = sorted(range(len(examples)), key=lambda n: len(prompts[n].prompt_ids))
    candidate_ids = torch.tensor([tokens[c] for c in candidates], dtype=torch.long)
    gold_ids = torch.tensor([tokens[e.completion] for e in examples], dtype=torch.long)
    scores = torch.full((len(examples), max(len(candidates), 1)), float("-inf"))
    gold_logprob = torch.zeros(len(examples))
    for start in range(0, len(order), batch_size):
        rows = order[start : start + batch_size]
        logprobs = _next_token_logprobs(
            model, encoder, [Encoded(prompts[n].prompt_ids, []) for n in rows], device
        ).cpu()
        index = torch.tensor(rows, dtype=torch.long)
        if len(candidates):
            scores[index] = logprobs[:, candidate_ids]
        gold_logprob[index] = logprobs.gather(1, gold_ids[index].unsqueeze(1)).squeeze(1)
    ones = torch.ones(len(examples))
    if not candidates:
        return Scores(None, torch.full((len(examples),), -1), gold_logprob, ones)
    position = {c: i for i, c in enumerate(candidates)}
    gold = torch.tensor([position[e.completion] for e in examples], dtype=torch.long)
    return Scores(scores, gold, gold_logprob, ones)


def _shared_prompts(
    encoder: Encoder, examples: Sequence[Example], candidates: Sequence[str]
) -> tuple[list[list[int]], dict[str, list[int]]] | None:
    """Each example's prompt ids and each candidate's ids, when the prompts can be scored once
    for all candidates (:func:`_measure_shared_prompt`): every completion among the candidates,
    every prompt at least two tokens and none cut to make room for a candidate; else None."""
    if not candidates or any(e.completion not in candidates for e in examples):
        return None
    tokens = {c: encoder.encode("", c).completion_ids for c in candidates}
    longest = max(candidates, key=lambda c: len(tokens[c]))
    # With room left beside the longest candidate, no prompt was cut for any of them.
    prompts = [encoder.encode(e.prompt, longest).prompt_ids for e in examples]
    if any(len(p) < 2 or len(p) + len(tokens[longest]) >= encoder.max_length for p in prompts):
        return None
    return prompts, tokens


def _measure_shared_prompt(
    model: nn.Module,
    encoder: Encoder,
    examples: Sequence[Example],
    candidates: Sequence[str],
    prompts: list[list[int]],
    tokens: dict[str, list[int]],
    *,
    device: torch.device,
    batch_size: int,
) -> Scores | None:
    """Multi-token candidates, each prompt run once: all but its last token into the key/value
    cache (right-padded), the cache repeated once per candidate, then each candidate's tokens
    after the prompt's last one, at the positions that follow the prompt's own. The same
    numbers as one sequence per (prompt, candidate) up to float rounding, for about one prompt's
    cost instead of one per candidate. None when the model's cache cannot be repeated (the
    caller scores one sequence per pair)."""
    width = min(len(candidates), batch_size)
    group = max(1, batch_size // width)
    order = sorted(range(len(examples)), key=lambda n: len(prompts[n]))
    scores = torch.full((len(examples), len(candidates)), float("-inf"))
    for start in range(0, len(order), group):
        rows = order[start : start + group]
        heads = [Encoded(prompts[n][:-1], []) for n in rows]
        batch = encoder.batch(heads, device)
        head_mask = batch["attention_mask"]
        inputs = {"input_ids": batch["input_ids"], "attention_mask": head_mask}
        try:
            out = model(**inputs, use_cache=True, logits_to_keep=1)
        except TypeError:  # a model class without logits_to_keep
            out = model(**inputs, use_cache=True)
        # transformers 5.x names the cache `cache`, earlier versions `past_key_values`
        name = "cache" if "cache" in out else "past_key_values"
        cached = out.get(name)
        if not hasattr(cached, "batch_repeat_interleave"):
            return None
        lengths = head_mask.sum(dim=1)
        for first in range(0, len(candidates), width):
            chunk = candidates[first : first + width]
            cache = cached if first + width >= len(candidates) else copy.deepcopy(cached)
            cache.batch_repeat_interleave(len(chunk))
            steps = max(len(tokens[c]) for c in chunk)
            ids = torch.full((len(rows) * len(chunk), steps), encoder.pad_id, dtype=torch.long)
            wanted = torch.zeros((len(rows) * len(chunk), steps), dtype=torch.long)
            mask = torch.zeros((len(rows) * len(chunk), steps), dtype=torch.long)
            for i, n in enumerate(rows):
                for k, choice in enumerate(chunk):
                    row, own = i * len(chunk) + k, tokens[choice]
                    ids[row, : len(own)] = torch.tensor([prompts[n][-1], *own[:-1]])
                    wanted[row, : len(own)] = torch.tensor(own)
                    mask[row, : len(own)] = 1
            mask, wanted = mask.to(device), wanted.to(device)
            positions = lengths.repeat_interleave(len(chunk)).unsqueeze(1) + torch.arange(
                steps, device=device
            )
            logits = model(
                input_ids=ids.to(device),
                attention_mask=torch.cat([head_mask.repeat_interleave(len(chunk), 0), mask], 1),
                position_ids=positions,
                use_cache=True,
                **{name: cache},
            ).logits
            picked = torch.log_softmax(logits.float(), dim=-1).gather(-1, wanted.unsqueeze(-1))
            summed = (picked.squeeze(-1) * mask).sum(dim=1).view(len(rows), len(chunk)).cpu()
            scores[torch.tensor(rows).unsqueeze(1), torch.arange(first, first + len(chunk))] = (
                summed
            )
    position = {c: i for i, c in enumerate(candidates)}
    gold = torch.tensor([position[e.completion] for e in examples], dtype=torch.long)
    counts = torch.tensor([len(tokens[e.completion]) for e in examples], dtype=torch.float)
    return Scores(scores, gold, scores.gather(1, gold.unsqueeze(1)).squeeze(1), counts)


def _with_choices(loss: float, scores: torch.Tensor, gold: torch.Tensor) -> Quality:
    """Accuracy and choice loss from (examples, choices) scores; gold -1: not among them."""
    accuracy = float((scores.argmax(dim=1) == gold).float().mean())
    choice_loss = None
    if len(gold) and bool((gold >= 0).all()):
        picked = torch.log_softmax(scores, dim=1).gather(1, gold.unsqueeze(1))
        choice_loss = float(-picked.mean())
    return Quality(loss=loss, accuracy=accuracy, choice_loss=choice_loss)


@torch.no_grad()
def score(
    model: nn.Module,
    encoder: Encoder,
    examples: Sequence[Example],
    choices: Sequence[str],
    *,
    device: torch.device,
    batch_size: int = 64,
    with_accuracy: bool = True,
) -> Scores:
    """:class:`Scores` of ``model`` on ``examples``; batched, gradients off, eval mode restored
    after."""
    was_training = model.training
    model.eval()
    try:
        candidates = list(choices) if with_accuracy else []
        needed = list(dict.fromkeys([*candidates, *(e.completion for e in examples)]))
        single = _single_tokens(encoder, needed)
        if single is not None and (not with_accuracy or set(needed) == set(candidates)):
            return _measure_next_token(
                model,
                encoder,
                examples,
                candidates,
                dict(zip(needed, single, strict=True)),
                device=device,
                batch_size=batch_size,
            )
        shared = _shared_prompts(encoder, examples, candidates) if with_accuracy else None
        if shared is not None:
            found = _measure_shared_prompt(
                model, encoder, examples, candidates, *shared, device=device, batch_size=batch_size
            )
            if found is not None:
                return found
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
        items.sort(key=lambda item: len(item[2].prompt_ids) + len(item[2].completion_ids))
        for start in range(0, len(items), batch_size):
            chunk = items[start : start + batch_size]
            logprob, count = sequence_logprobs(model, encoder.batch([c[2] for c in chunk], device))
            for (n, slot, _), lp, tokens in zip(chunk, logprob.cpu(), count.cpu(), strict=True):
                if slot >= 0:
                    scores[n, slot] = lp
                is_gold = slot < 0 or candidates[slot] == examples[n].completion
                if is_gold:
                    gold_logprob[n], gold_tokens[n] = lp, tokens
        gold = torch.tensor([index.get(e.completion, -1) for e in examples], dtype=torch.long)
        return Scores(scores if with_accuracy else None, gold, gold_logprob, gold_tokens)
    finally:
        model.train(was_training)


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
    """Quality of ``model`` on ``examples`` (:func:`score`, reduced)."""
    return score(
        model,
        encoder,
        examples,
        choices,
        device=device,
        batch_size=batch_size,
        with_accuracy=with_accuracy,
    ).quality()
