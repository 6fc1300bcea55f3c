"""The method's settings as plain, frozen dataclasses, built from the API's models once (the
defaults live there only).

The method modules read these and nothing of the API: they can be driven from a benchmark or a
test without building a manifest, and the API can evolve its wire format without touching them.
"""

from __future__ import annotations

from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

T = TypeVar("T")


def _plain(cls: type[T], model: Any, **nested: Any) -> T:
    """``cls`` from the same-named attributes of ``model`` (``nested`` ones given converted)."""
    names = [f.name for f in fields(cls)]  # type: ignore[arg-type]
    return cls(**{n: nested[n] if n in nested else getattr(model, n) for n in names})


@dataclass(frozen=True)
class Bounds:
    """A closed interval searched for a fusion coefficient."""

    min: float
    max: float


@dataclass(frozen=True)
class SearchConfig:
    """Adaptive initialization: the Bayesian search of the fusion coefficients."""

    trials: int
    timeout_seconds: int
    sampler: str
    granularity: str
    projection: str
    alpha: Bounds
    beta: Bounds
    validation_samples: int
    objective: str
    lookahead_steps: int
    fallback: bool
    patience: int | None  # None (not reachable from the API, where null is unset): no stop
    skip_when_ready: bool
    magnitude: str

    @classmethod
    def of(cls, model: Any) -> SearchConfig:
        return _plain(
            cls, model, alpha=_plain(Bounds, model.alpha), beta=_plain(Bounds, model.beta)
        )


@dataclass(frozen=True)
class RegularizationConfig:
    """The scheduled pull toward the initialization."""

    schedule: str
    strength: float
    relaxed_strength: float
    switch_fraction: float

    @classmethod
    def of(cls, model: Any) -> RegularizationConfig:
        return _plain(cls, model)


@dataclass(frozen=True)
class DistillationConfig:
    """The old adapter on the source base as a teacher: weight 0 is off."""

    weight: float
    top_k: int
    over: str
    agreeing: bool
    emphasis: float
    share: float
    since: str
    until: str

    @property
    def teaches(self) -> bool:
        """The teacher's distributions are needed: a distillation term or an emphasis."""
        return self.weight > 0 or self.emphasis > 0

    @classmethod
    def of(cls, model: Any) -> DistillationConfig:
        return _plain(cls, model)


@dataclass(frozen=True)
class FinetuneConfig:
    """Fine-tuning until ready or out of budget."""

    max_steps: int
    learning_rate: float
    batch_size: int
    micro_batch_size: int | None
    eval_every: int
    checkpoint_every: int
    stop_when_ready: bool
    regularization: RegularizationConfig
    distillation: DistillationConfig

    @classmethod
    def of(cls, model: Any) -> FinetuneConfig:
        return _plain(
            cls,
            model,
            regularization=RegularizationConfig.of(model.regularization),
            distillation=DistillationConfig.of(model.distillation),
        )

    @property
    def distilled_from(self) -> int:
        """The first step that distils: 0, or the first readiness check's with ``since:
        first-check`` (the steps before it train on the task loss alone)."""
        return self.eval_every if self.distillation.since == "first-check" else 0

    def as_run(self, *, trains: bool, distils: bool) -> FinetuneConfig:
        """This fine-tuning as a strategy's run does it: no step for one that does not train;
        no distillation without a teacher (``distils`` false: the old adapter was ready on the
        new base as it is, none was computed)."""
        config = self if trains else replace(self, max_steps=0)
        if not distils:
            off = replace(config.distillation, weight=0.0, emphasis=0.0)
            config = replace(config, distillation=off)
        return config
