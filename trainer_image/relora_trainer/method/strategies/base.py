"""The interface of a migration strategy and what it is given to work with."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from peft import PeftModel

from relora_trainer import adapters
from relora_trainer.method import fusion
from relora_trainer.method.config import SearchConfig
from relora_trainer.method.quality import Quality
from relora_trainer.method.search import SearchResult


@dataclass
class Context:
    """What a strategy may use to initialize ``model`` (the new rank-``rank`` LoRA, attached
    to the target base with PEFT's own initialization)."""

    model: PeftModel
    old: adapters.OldAdapter
    layout: dict[str, tuple[int, float]]  # the new adapter's (rank, scale) per module
    device: torch.device
    # The fusion terms of every adapted module (and saved parameter) with the base evolution
    # W_target - W_source, for a projection (the caller reads the source weights; only relora
    # asks for them).
    evolution: Callable[[str], fusion.Terms]
    # The current model's quality on the search's validation subset (with accuracy or not).
    measure: Callable[[bool], Quality]
    # A few plain fine-tuning steps from the current values (the lookahead objective).
    look_ahead: Callable[[], None]
    metric: str  # the readiness metric: accuracy or loss
    # The old adapter on the target base already meets the readiness target (validation).
    ready_before: bool
    search: SearchConfig
    seed: int
    journal: Path  # the search's Optuna journal (resumable)
    study_name: str
    on_trial: Callable[[int, int, float | None], None]


class Strategy(Protocol):
    name: str
    trains: bool  # fine-tunes after initializing
    regularized: bool  # the scheduled pull toward the initialization while fine-tuning

    def initialize(self, context: Context) -> SearchResult | None:
        """Set the starting adapter in ``context.model``; the search's result, if any."""
        ...

    def starts_as_old(self, result: SearchResult | None) -> bool:
        """Whether the start :meth:`initialize` set (its ``result``) is :func:`old_update`, so
        that its quality is the old adapter's on the target base when :func:`keeps_update`."""
        ...


def old_update(context: Context) -> None:
    """Load the old adapter into the model as PEFT would load it on the new base: its update at
    the new ranks (the balanced square-root split of its singular values: the same product when
    the rank is kept), its DoRA magnitudes and its saved modules as they are."""
    old = context.old
    terms = fusion.Terms(
        modules={
            module: fusion.prepare(
                factors,
                None,
                scale=old.scale(module),
                projection="adapter-subspace",
                device=context.device,
            )
            for module, factors in old.factors.items()
        }
    )
    start = fusion.fuse_all(terms, {"all": (1.0, 0.0)}, granularity="global", layout=context.layout)
    for module, factors in start.factors.items():
        factors.magnitude = old.factors[module].magnitude
    adapters.load_factors(context.model, start.factors, old.saved)


def keeps_update(context: Context) -> bool:
    """Whether :func:`old_update` loads the old update whole: every module's new rank at
    least its old one (a lower rank truncates it)."""
    old = context.old
    return all(
        context.layout[module][0] >= int(factors.a.shape[0])
        for module, factors in old.factors.items()
    )


def with_magnitudes(
    context: Context, start: fusion.Start, terms: fusion.Terms, rule: str
) -> fusion.Start:
    """A DoRA start's magnitudes: the old adapter's as trained on the source (``kept``), or its
    ratio to the direction's norm carried over to the start's norm on the target base
    (``rescaled``). Not DoRA: the start unchanged."""
    if not context.old.dora:
        return start
    for module, factors in start.factors.items():
        if rule == "kept":
            factors.magnitude = context.old.factors[module].magnitude
            continue
        ratio = terms.modules[module].ratio
        if ratio is None:
            raise ValueError(f"module {module}: a rescaled magnitude needs the terms' ratio")
        norm = adapters.dora_norm(context.model, module, factors, context.layout[module][1])
        factors.magnitude = ratio.to(norm) * norm
    return start
