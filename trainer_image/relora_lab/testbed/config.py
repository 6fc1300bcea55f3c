"""What a testbed build is made of: its parameters (every stage's cache key derives from them)."""

from __future__ import annotations

from dataclasses import dataclass, field, replace

from relora_lab.testbed import task
from relora_lab.testbed.pretraining import Architecture, Schedule


@dataclass(frozen=True)
class Severity:
    """One evolution of v1: continued pretraining on the Bible with Austen replay."""

    name: str
    steps: int
    learning_rate: float
    replay: float = 0.2


@dataclass(frozen=True)
class AdapterRecipe:
    """How the task adapter is trained on v1 (with ``finetune()``, the whole budget)."""

    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = (
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "gate_proj",
        "up_proj",
        "down_proj",
    )
    steps: int = 600
    learning_rate: float = 2e-3
    batch_size: int = 16


@dataclass(frozen=True)
class BuildConfig:
    seed: int = 0
    vocab_size: int = 4096
    architecture: Architecture = field(default_factory=Architecture)
    v1: Schedule = field(default_factory=lambda: Schedule(steps=270, learning_rate=3e-3))
    severities: tuple[Severity, ...] = (
        Severity("mild", steps=60, learning_rate=3e-3),
        Severity("severe", steps=130, learning_rate=1e-2),
    )
    sizes: task.Sizes = field(default_factory=task.Sizes)
    adapter: AdapterRecipe = field(default_factory=AdapterRecipe)
    model: str | None = None  # a real Hugging Face model folder as v1


def config_for(*, seed: int = 0, quick: bool = False, model: str | None = None) -> BuildConfig:
    """The default build, its quick variant (a smoke test: minutes less, weaker models), or the
    build around a real model (small learning rates for the evolution)."""
    built = BuildConfig(seed=seed, model=model)
    if quick:
        built = replace(
            built,
            v1=Schedule(steps=60, learning_rate=3e-3),
            severities=(
                Severity("mild", steps=15, learning_rate=3e-3),
                Severity("severe", steps=30, learning_rate=1e-2),
            ),
            sizes=task.Sizes(train=150, validation=50, test=100),
            adapter=replace(built.adapter, steps=100),
        )
    if model is not None:
        built = replace(
            built,
            severities=(
                Severity("mild", steps=60, learning_rate=1e-5),
                Severity("severe", steps=150, learning_rate=5e-5),
            ),
            adapter=replace(built.adapter, learning_rate=2e-4),
        )
    return built
