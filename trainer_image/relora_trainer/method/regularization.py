"""The scheduled pull toward the initialization: lambda(t) * mean_m ||theta_m - theta0_m||^2.

Strong early (steer into the region the initialization found), relaxed late (task refinement).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from relora_trainer.method.config import RegularizationConfig


def strength(config: RegularizationConfig, *, step: int, max_steps: int) -> float:
    """lambda at ``step`` (0-based) of a ``max_steps`` run."""
    if config.schedule == "none":
        return 0.0
    if config.schedule == "constant":
        return config.strength
    switch = config.switch_fraction * max_steps
    if config.schedule == "step":
        return config.strength if step < switch else config.relaxed_strength
    # cosine: from strength at step 0 down to relaxed_strength at the switch, then flat
    progress = min(step / switch, 1.0) if switch > 0 else 1.0
    weight = 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.relaxed_strength + (config.strength - config.relaxed_strength) * weight


def penalty(
    parameters: Mapping[str, torch.Tensor], anchors: Mapping[str, torch.Tensor]
) -> torch.Tensor:
    """Mean over LoRA tensors of the squared distance to their initial values."""
    terms = [torch.sum((parameters[name] - anchor) ** 2) for name, anchor in anchors.items()]
    return torch.stack(terms).mean()
