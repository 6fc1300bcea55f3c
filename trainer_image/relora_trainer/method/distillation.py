"""The old adapter on the old base as a teacher: its top-k next-token distributions at the
completion tokens of the training examples, and the distillation term of fine-tuning.

The teacher is computed once (where the source base is resident) and kept compactly: for every
completion token of every training example, the ids of its ``top_k`` most likely next tokens
(int32) and their probabilities (float32), rows concatenated in example order with offsets.

Fine-tuning adds ``weight * KL(p_t || p_s)`` per completion token, summed over the completion
tokens and divided by the step's completion tokens, exactly as the task loss is. Both
distributions are conditioned on the teacher's top-k tokens (each renormalized over them): the
term matches the teacher's preferences among its candidates and leaves the mass outside them to
the task loss. It is zero when the student is the teacher (a top-k of 1 makes it zero always).

For a classification task (``choices`` given: accuracy compares the candidate completions'
likelihoods) the teacher's distribution is kept over the *choices' tokens* instead of its top k:
at each completion token where several choices that share the completion so far continue
differently, the probabilities of those continuations (an id of -1 pads the row); elsewhere
nothing (the term is zero there). For one-token labels that is the teacher's distribution over
the labels; for phrases it is the teacher's choice at each fork, not its language model.

Why conditioned: on the corpus testbed the old adapter on v1 puts only ~8% of its mass on its
top 16 tokens at the label position (accuracy compares the labels' likelihoods, not the whole
vocabulary). A KL over k + 1 outcomes (the top k, and the rest as one) taught the student that
flatness and did nothing for readiness; renormalizing the teacher alone would push the student
to put all its mass on the k tokens. Conditioned on them, the term carries the teacher's
ranking of the candidates (for one-token labels: of the labels), which is what accuracy reads.

A teacher may come in stages (:class:`Staged`): the examples of the first steps computed
before fine-tuning starts, those of later steps only when a batch first draws one of them, that
is when the adapter was not ready by then.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from relora_trainer.data import IGNORE_INDEX, Encoder, Example
from relora_trainer.method.quality import completion_logits


@dataclass(frozen=True)
class Teacher:
    """Top-k distributions per completion token; example ``n``'s rows are
    ``offsets[n]:offsets[n + 1]`` of ``ids`` and ``probs`` (each [tokens, top_k])."""

    ids: torch.Tensor  # int32
    probs: torch.Tensor  # float32, the teacher's full-vocabulary probabilities of those ids
    offsets: torch.Tensor  # int64, examples + 1

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])

    @property
    def examples(self) -> int:
        return len(self.offsets) - 1

    def rows(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(ids, probs) of each example in ``indices``, in that order."""
        picked = []
        for n in indices:
            start, end = int(self.offsets[n]), int(self.offsets[n + 1])
            picked.append((self.ids[start:end], self.probs[start:end]))
        return picked

    def merged(self, other: Teacher, taken: Collection[int]) -> Teacher:
        """This teacher with the rows of the examples in ``taken`` from ``other`` (over the same
        examples, e.g. computed for those only)."""
        if other.examples != self.examples:
            raise ValueError(f"{other.examples} examples merged into {self.examples}")
        taken = set(taken)
        rows = [(other if n in taken else self).rows([n])[0] for n in range(self.examples)]
        lengths = torch.tensor([0, *(len(ids) for ids, _ in rows)], dtype=torch.long)
        return Teacher(
            ids=torch.cat([ids for ids, _ in rows]) if rows else self.ids[:0],
            probs=torch.cat([probs for _, probs in rows]) if rows else self.probs[:0],
            offsets=lengths.cumsum(0),
        )

    def to_state(self) -> dict[str, Any]:
        return {"ids": self.ids, "probs": self.probs, "offsets": self.offsets}

    @classmethod
    def of_state(cls, state: dict[str, Any]) -> Teacher:
        """From :meth:`to_state`; ValueError when the tensors do not fit together."""
        teacher = cls(state["ids"], state["probs"], state["offsets"])
        rows = int(teacher.offsets[-1])
        if teacher.ids.shape != teacher.probs.shape or teacher.ids.shape[0] != rows:
            raise ValueError("inconsistent teacher tensors")
        return teacher


TeacherRows = Sequence[tuple[torch.Tensor, torch.Tensor]]


class Staged:
    """A teacher computed in stages: ``first`` holds the rows of the examples in ``covered``
    (those of the first steps); ``stages`` are the examples each later stage covers (each a
    superset of the one before; the last: all the budget draws). The first batch that draws an
    example not covered yet calls ``extend(teacher, examples, stage)`` once for the first stage
    that covers the whole batch, with the examples that stage adds to those covered so far (the
    stages in between are taken together); it returns the teacher with their rows.
    :attr:`seconds` says how long the later stages took (spent inside the steps that needed
    them)."""

    def __init__(
        self,
        first: Teacher,
        covered: Collection[int],
        stages: Sequence[Collection[int]],
        extend: Callable[[Teacher, list[int], int], Teacher],
    ) -> None:
        self.teacher = first
        self.covered = frozenset(covered)
        self.stages = [frozenset(stage) for stage in stages]
        self.next = 0  # the first stage not computed yet
        self._extend = extend
        self.seconds = 0.0

    @property
    def examples(self) -> int:
        return self.teacher.examples

    @property
    def completed(self) -> bool:
        return self.next >= len(self.stages)

    def rows(self, indices: Sequence[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        if not self.completed and not self.covered.issuperset(indices):
            wanted = self.covered.union(indices)
            started = time.perf_counter()
            stage = next(
                (n for n in range(self.next, len(self.stages)) if self.stages[n] >= wanted),
                len(self.stages) - 1,
            )
            added = sorted(self.stages[stage] - self.covered)
            self.teacher = self._extend(self.teacher, added, stage)
            self.covered, self.next = self.stages[stage], stage + 1
            self.seconds += time.perf_counter() - started
        return self.teacher.rows(indices)


Lessons = Teacher | Staged
"""What fine-tuning distils from: a teacher, whole or in stages."""


@torch.no_grad()
def compute(
    model: nn.Module,
    encoder: Encoder,
    examples: Sequence[Example],
    *,
    top_k: int,
    device: torch.device,
    batch_size: int = 64,
    choices: Sequence[str] | None = None,
    agreeing: bool = False,
    only: Sequence[int] | None = None,
) -> Teacher:
    """``model``'s top-k next-token distribution at every completion token of ``examples``, or
    with ``choices`` its probabilities of the choices' continuations (see :func:`forks`) (eval
    mode, restored after; examples of similar length batched together). ``agreeing``: zero
    mass at the tokens where the teacher's most likely one is not the example's own.
    ``only``: the indices of the examples to compute (those a fine-tune's budget will see);
    the others get rows of no mass (ids -1), as long as their completions: never a term."""
    was_training = model.training
    model.eval()
    try:
        encoded = [encoder.encode(e.prompt, e.completion) for e in examples]
        at_forks = None
        if choices is not None:
            at_forks = forks(encoder, choices)
            top_k = max((int(f.shape[1]) for f in at_forks.values()), default=1)
        order = sorted(
            range(len(encoded)) if only is None else set(only),
            key=lambda n: len(encoded[n].prompt_ids) + len(encoded[n].completion_ids),
        )
        ids: list[torch.Tensor | None] = [None] * len(encoded)
        probs: list[torch.Tensor | None] = [None] * len(encoded)
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            batch = encoder.batch([encoded[n] for n in rows], device)
            logits, labels = completion_logits(model, batch)
            mask = (labels != IGNORE_INDEX).cpu()
            if at_forks is not None:
                full = torch.softmax(logits.float(), dim=-1).cpu()
                for row, n in enumerate(rows):
                    fork = at_forks[examples[n].completion]
                    padded = torch.zeros((len(fork), top_k), dtype=torch.int32) - 1
                    padded[:, : fork.shape[1]] = fork
                    picked = full[row][mask[row]].gather(-1, padded.long().clamp(min=0))
                    ids[n], probs[n] = padded, picked * (padded >= 0)
                continue
            k = min(top_k, logits.shape[-1])
            top, top_ids = torch.softmax(logits.float(), dim=-1).topk(k, dim=-1)
            top, top_ids = top.cpu(), top_ids.to("cpu", torch.int32)
            for row, n in enumerate(rows):
                ids[n], probs[n] = top_ids[row][mask[row]], top[row][mask[row]]
        width = next((int(i.shape[1]) for i in ids if i is not None), top_k)
        kept_ids, kept_probs = [], []
        for n, item in enumerate(encoded):
            row_ids, row_probs = ids[n], probs[n]
            if row_ids is None or row_probs is None:  # not computed: as long, no mass
                length = len(item.completion_ids) - (0 if item.prompt_ids else 1)
                row_ids = torch.full((length, width), -1, dtype=torch.int32)
                row_probs = torch.zeros((length, width))
            elif agreeing and len(row_ids):
                best = row_ids.gather(-1, row_probs.argmax(dim=-1, keepdim=True)).squeeze(-1)
                right = best == torch.tensor(item.completion_ids, dtype=torch.int32)
                row_probs = row_probs * right.unsqueeze(-1)
            kept_ids.append(row_ids)
            kept_probs.append(row_probs)
        lengths = torch.tensor([0, *(len(i) for i in kept_ids)], dtype=torch.long)
        return Teacher(
            ids=torch.cat(kept_ids) if kept_ids else torch.zeros((0, width), dtype=torch.int32),
            probs=torch.cat(kept_probs) if kept_probs else torch.zeros((0, width)),
            offsets=lengths.cumsum(0),
        )
    finally:
        model.train(was_training)


def forks(encoder: Encoder, choices: Sequence[str]) -> dict[str, torch.Tensor]:
    """For each choice, per completion token, the ids of the next tokens of every choice that
    shares its tokens so far (itself included), when there are at least two such ids; a row
    of -1 where there are not (int32, [tokens, widest fork], -1 padded)."""
    tokens = {c: encoder.encode("", c).completion_ids for c in choices}
    table = {}
    for choice, own in tokens.items():
        rows = []
        for j in range(len(own)):
            nexts = dict.fromkeys(o[j] for o in tokens.values() if len(o) > j and o[:j] == own[:j])
            rows.append(list(nexts) if len(nexts) > 1 else [])
        width = max([len(r) for r in rows] + [1])
        table[choice] = torch.tensor(
            [r + [-1] * (width - len(r)) for r in rows], dtype=torch.int32
        ).view(len(rows), width)
    return table


def per_token(
    logprobs: torch.Tensor, labels: torch.Tensor, teacher: TeacherRows
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per position of ``labels``: KL(teacher || student), both conditioned on the teacher's
    top-k tokens (zero where the position is not labelled or the teacher has nothing there),
    and whether the teacher is right there (its most likely token among those kept is the
    label; False where it kept no mass). ``logprobs``: the student's fp32 log-softmax at
    completion_logits' columns; ``teacher``: one (ids, probs) pair per row, as many positions
    as the row has labelled tokens."""
    mask = (labels != IGNORE_INDEX).cpu()
    if len(teacher) != mask.shape[0]:
        raise ValueError(f"{len(teacher)} teacher rows for a batch of {mask.shape[0]}")
    k = teacher[0][0].shape[1] if len(teacher) else 1
    ids = torch.zeros((*mask.shape, k), dtype=torch.long)
    probs = torch.zeros((*mask.shape, k), dtype=torch.float32)
    for row, (row_ids, row_probs) in enumerate(teacher):
        count = int(mask[row].sum())
        if len(row_ids) != count:
            raise ValueError(
                f"the teacher has {len(row_ids)} completion tokens for an example with {count}: "
                "computed with another tokenizer or other data"
            )
        ids[row, mask[row]] = row_ids.long()
        probs[row, mask[row]] = row_probs.float()
    device = logprobs.device
    ids, probs, mask = ids.to(device), probs.to(device), mask.to(device)
    # Both distributions conditioned on the teacher's top k (renormalized over them); an id
    # of -1 pads a row (a choices teacher): no mass for either.
    valid = ids >= 0
    mass = probs.sum(dim=-1, keepdim=True)
    teacher_k = probs / mass.clamp(min=1e-30)
    gathered = logprobs.gather(-1, ids.clamp(min=0)).masked_fill(~valid, -1e4)
    student_k = torch.log_softmax(gathered, dim=-1)
    cross = torch.where(valid, teacher_k * student_k, torch.zeros_like(student_k))
    kl = (torch.xlogy(teacher_k, teacher_k) - cross).sum(dim=-1) * mask
    best = ids.gather(-1, probs.argmax(dim=-1, keepdim=True)).squeeze(-1)
    right = mask & (mass.squeeze(-1) > 0) & (best == labels.to(device))
    return kl, right


def divergence(
    logprobs: torch.Tensor,
    labels: torch.Tensor,
    teacher: TeacherRows,
    *,
    tokens: int | None = None,
) -> torch.Tensor:
    """KL(teacher || student) of :func:`per_token`, summed over the labelled positions and
    divided by ``tokens`` (default: their count, a mean)."""
    kl, _ = per_token(logprobs, labels, teacher)
    count = int((labels != IGNORE_INDEX).sum()) if tokens is None else tokens
    return kl.sum() / max(count, 1)
