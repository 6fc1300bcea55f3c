"""The regularization schedule and penalty."""

from __future__ import annotations

import itertools

import pytest
import torch

from relora_api.spec import Regularization, RegularizationSchedule
from relora_trainer.method import regularization
from relora_trainer.method.config import RegularizationConfig


def _config(schedule: RegularizationSchedule) -> RegularizationConfig:
    return RegularizationConfig.of(
        Regularization(schedule=schedule, strength=2.0, relaxed_strength=0.1, switch_fraction=0.5)
    )


def test_step_schedule_is_strong_then_relaxed() -> None:
    values = [regularization.strength(_config("step"), step=s, max_steps=10) for s in range(10)]
    assert values == [2.0] * 5 + [0.1] * 5


def test_cosine_schedule_decays_smoothly_to_the_relaxed_value() -> None:
    config = _config("cosine")
    values = [regularization.strength(config, step=s, max_steps=10) for s in range(10)]
    assert values[0] == pytest.approx(2.0)
    assert all(a > b for a, b in itertools.pairwise(values[:6]))
    assert values[5:] == pytest.approx([0.1] * 5)


@pytest.mark.parametrize(("schedule", "expected"), [("constant", 2.0), ("none", 0.0)])
def test_flat_schedules(schedule: RegularizationSchedule, expected: float) -> None:
    config = _config(schedule)
    assert {regularization.strength(config, step=s, max_steps=10) for s in range(10)} == {expected}


def test_penalty_is_the_mean_squared_distance_per_tensor() -> None:
    params = {"a": torch.ones(2, 2), "b": torch.zeros(3)}
    anchors = {"a": torch.zeros(2, 2), "b": torch.full((3,), 2.0)}
    # a: 4 * 1 = 4; b: 3 * 4 = 12; mean over the two tensors = 8
    assert float(regularization.penalty(params, anchors)) == pytest.approx(8.0)
