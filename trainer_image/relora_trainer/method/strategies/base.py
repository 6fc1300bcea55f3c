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
    rank: int
    scale: float  # the new adapter's LoRA scale (alpha / r, or rsLoRA's)
    device: torch.device
    # The fusion terms of every adapted module with the base evolution W_target - W_source,
    # for a projection (the caller reads the source weights; only relora asks for them).
    evolution: Callable[[str], dict[str, fusion.ModuleTerms]]
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


def old_update(context: Context) -> None:
    """Load the old adapter's update into the model at the new rank: the balanced square-root
    split of its singular values (the same product when the rank is kept)."""
    old_scale = adapters.lora_scale(context.old.config, context.old.rank)
    terms = {
        module: fusion.prepare(
            factors, None, scale=old_scale, projection="adapter-subspace", device=context.device
        )
        for module, factors in context.old.factors.items()
    }
    factors = fusion.fuse_all(
        terms, {"all": (1.0, 0.0)}, granularity="global", rank=context.rank, scale=context.scale
    )
    adapters.load_factors(context.model, factors)
