"""What the benchmark compares: strategies and ablations, each a set of ``spec.method`` fields.

Every variant runs through ``migrate.migrate_adapter`` (the code path of ``relora run``) with
an ``AdapterMigrationSpec`` built from the testbed's manifest: the shared budget (``COMMON``),
then the variant's own fields, then the seed. ``relora`` is the method as shipped: the defaults
of ``spec.method`` plus the shared budget, nothing tuned for the benchmark alone. Each
strategy's settings live in :mod:`relora_lab.settings` (the testbed's manifests use them too).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from relora_api import validation
from relora_api.spec import AdapterMigrationSpec
from relora_lab.settings import (
    METHODS,
    RELORA_METHOD,
    RELORA_SEARCH,
    SCRATCH_METHOD,
    WARM_START_METHOD,
    merge,
)
from relora_trainer.errors import BadInput


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    method: Mapping[str, Any] = field(default_factory=dict)  # wire names (camelCase)
    baseline: bool = False  # a strategy the method must beat (not an ablation of it)
    quick: bool = True  # part of `relora bench --quick`

    @property
    def strategy(self) -> str:
        return str(self.method.get("strategy", "relora"))


COMMON_FINETUNE: Mapping[str, Any] = {
    "maxSteps": 120,
    "evalEvery": 10,
    "batchSize": 16,
    "checkpointEvery": 1000,
    "stopWhenReady": False,
}
"""The budget every variant gets: the same steps, batch and readiness-check interval; the whole
budget runs (the test accuracy is the one at the budget), readiness is recorded on the way."""


def _searching(**update: Any) -> dict[str, Any]:
    """relora with its search on (:data:`RELORA_SEARCH`), then ``update``."""
    return merge(merge(RELORA_METHOD, {"initialization": RELORA_SEARCH}), update)


def _teaching(method: Mapping[str, Any], **distillation: Any) -> dict[str, Any]:
    """``method`` with these ``finetune.distillation`` fields (wire names)."""
    return merge(method, {"finetune": {"distillation": distillation}})


VARIANTS: tuple[Variant, ...] = (
    Variant("scratch", "a fresh LoRA on v2 (PEFT init), plain fine-tune", SCRATCH_METHOD, True),
    Variant("reuse", "the old adapter on v2 as is (no training)", METHODS["reuse"], True),
    Variant(
        "warm-start",
        "the old adapter as init, plain fine-tune (PortLLM + FT)",
        WARM_START_METHOD,
        baseline=True,
    ),
    Variant(
        "relora",
        "the old adapter as start (no search: relora's default since session 9) + scheduled "
        "regularization + the old adapter on v1 as a teacher (distillation weight 3, emphasis "
        "3: relora's defaults)",
        RELORA_METHOD,
    ),
    Variant(
        "relora-search",
        "relora with its search on (6 trials on 128 validation examples, choice-loss "
        "objective, fallback to the old adapter): relora's default in sessions 4-8",
        _searching(),
    ),
    Variant(
        "relora-no-teacher",
        "relora without the teacher (distillation weight 0, emphasis 0)",
        _teaching(RELORA_METHOD, weight=0.0, emphasis=0.0),
        quick=False,
    ),
    Variant(
        "relora-until-ready",
        "relora with the teacher only until the adapter is ready (plain task loss after)",
        _teaching(RELORA_METHOD, until="ready"),
        quick=False,
    ),
    Variant(
        "relora-teacher-after-check",
        "relora with the teacher from the first readiness check on (since first-check: an "
        "adapter ready there pays for no teacher)",
        _teaching(RELORA_METHOD, since="first-check"),
        quick=False,
    ),
    Variant(
        "relora-half-teacher",
        "relora with the teacher on half the training examples (share 0.5: half its seconds)",
        _teaching(RELORA_METHOD, share=0.5),
        quick=False,
    ),
    Variant(
        "relora-quarter-teacher",
        "relora with the teacher on a quarter of the training examples (share 0.25)",
        _teaching(RELORA_METHOD, share=0.25),
        quick=False,
    ),
    Variant(
        "relora-half-teacher-x2",
        "relora-half-teacher with twice the distillation weight and emphasis (6 and 6: per "
        "step, as strong as relora's on all examples)",
        _teaching(RELORA_METHOD, share=0.5, weight=6.0, emphasis=6.0),
        quick=False,
    ),
    Variant(
        "relora-no-fallback",
        "relora-search keeping the searched start even when it is worse than the old adapter's",
        _searching(initialization={"fallback": False}),
        quick=False,
    ),
    Variant(
        "relora-no-patience",
        "relora-search running every search trial (no early stop)",
        _searching(initialization={"patience": 500}),  # >= trials: no early stop
        quick=False,
    ),
    Variant(
        "relora-no-reg",
        "relora without the regularizer (schedule none)",
        merge(RELORA_METHOD, {"finetune": {"regularization": {"schedule": "none"}}}),
        quick=False,
    ),
    Variant(
        "relora-weak-pull",
        "relora with a ten times weaker pull before the switch (strength 0.1)",
        merge(RELORA_METHOD, {"finetune": {"regularization": {"strength": 0.1}}}),
        quick=False,
    ),
    Variant(
        "relora-short-pull",
        "relora with the pull relaxed after 10% of the budget (switchFraction 0.1)",
        merge(RELORA_METHOD, {"finetune": {"regularization": {"switchFraction": 0.1}}}),
        quick=False,
    ),
    Variant(
        "relora-constant",
        "relora with a constant lambda (no relaxation)",
        merge(RELORA_METHOD, {"finetune": {"regularization": {"schedule": "constant"}}}),
        quick=False,
    ),
    Variant(
        "relora-per-layer",
        "relora-search with one (alpha, beta) per layer",
        _searching(initialization={"granularity": "layer"}),
        quick=False,
    ),
    Variant(
        "relora-module-type",
        "relora-search with one (alpha, beta) per module type",
        _searching(initialization={"granularity": "module-type"}),
        quick=False,
    ),
    Variant(
        "relora-full-evolution",
        "relora-search fusing the whole evolution (projection none, randomized SVD)",
        _searching(initialization={"projection": "none"}),
        quick=False,
    ),
    Variant(
        "relora-teacher",
        "relora with session 6's teacher: distillation weight 3 (over the choices, where the "
        "teacher is right), no emphasis",
        _teaching(RELORA_METHOD, weight=3.0, emphasis=0.0),
        quick=False,
    ),
    Variant(
        "warm-start-teacher",
        "warm-start with the old adapter on v1 as a distillation teacher (weight 3; over the "
        "choices, where the teacher is right: the distillation defaults)",
        _teaching(WARM_START_METHOD, weight=3.0),
        quick=False,
    ),
    Variant(
        "warm-start-teacher-w1",
        "warm-start-teacher-unfiltered at distillation weight 1",
        _teaching(WARM_START_METHOD, weight=1.0, agreeing=False),
        quick=False,
    ),
    Variant(
        "warm-start-teacher-unfiltered",
        "warm-start-teacher distilling also where the teacher is wrong (agreeing: false)",
        _teaching(WARM_START_METHOD, weight=3.0, agreeing=False),
        quick=False,
    ),
    Variant(
        "relora-teacher-unfiltered",
        "relora-teacher distilling also where the teacher is wrong (agreeing: false)",
        _teaching(RELORA_METHOD, weight=3.0, agreeing=False, emphasis=0.0),
        quick=False,
    ),
    Variant(
        "relora-teacher-top-k",
        "relora-teacher over the teacher's top 16 tokens at every completion token",
        _teaching(RELORA_METHOD, weight=3.0, over="top-k", agreeing=False, emphasis=0.0),
        quick=False,
    ),
    Variant(
        "warm-start-teacher-top-k",
        "warm-start-teacher over the teacher's top 16 tokens at every completion token",
        _teaching(WARM_START_METHOD, weight=3.0, over="top-k", agreeing=False),
        quick=False,
    ),
    Variant(
        "warm-start-emphasis",
        "warm-start-teacher with the task loss counted 4 times where the teacher is right "
        "(distillation weight 3, emphasis 3)",
        _teaching(WARM_START_METHOD, weight=3.0, emphasis=3.0),
        quick=False,
    ),
    Variant(
        "warm-start-emphasis-only",
        "warm-start with the task loss counted 4 times where the teacher is right, no "
        "distillation term (weight 0, emphasis 3)",
        _teaching(WARM_START_METHOD, emphasis=3.0),
        quick=False,
    ),
    Variant(
        "relora-emphasis",
        "relora with distillation weight 3 and emphasis 3 set explicitly (the defaults since "
        "session 8: the same runs as relora)",
        _teaching(RELORA_METHOD, weight=3.0, emphasis=3.0),
        quick=False,
    ),
    Variant(
        "relora-magnitude-kept",
        "relora-search with a DoRA adapter's magnitudes kept as trained on v1 (the default "
        "rescales them to a fused start's direction on v2; the same for other adapters)",
        _searching(initialization={"magnitude": "kept"}),
        quick=False,
    ),
)

BASELINES = tuple(v.name for v in VARIANTS if v.baseline)


def by_name(names: list[str] | None, *, quick: bool) -> list[Variant]:
    """The variants to run: those named (any mode), else every variant of the mode."""
    if not names:
        return [v for v in VARIANTS if v.quick or not quick]
    known = {v.name: v for v in VARIANTS}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise BadInput(f"--variant: unknown {unknown}; known: {sorted(known)}")
    return [known[n] for n in names]


def spec_for(
    manifest: Mapping[str, Any],
    variant: Variant,
    *,
    seed: int,
    output: str,
    common: Mapping[str, Any] | None = None,
    readiness: Mapping[str, Any] | None = None,
) -> AdapterMigrationSpec:
    """The validated spec of one run: the manifest's models, adapter and data; the shared budget
    and the variant's fields (the manifest's own method is not used); seed; output; and (if
    given) the readiness of every adapter."""
    method = merge({"finetune": common or COMMON_FINETUNE}, variant.method)
    method["seed"] = seed
    method.setdefault("strategy", "relora")
    document = merge(manifest, {"spec": {"output": {"uri": output}}})
    document["spec"]["method"] = method
    if readiness is not None:
        for adapter in document["spec"]["adapters"]:
            adapter["readiness"] = dict(readiness)
    migration, problems = validation.validate_manifest(document)
    if migration is None:
        raise BadInput(f"variant {variant.name}: " + "; ".join(str(p) for p in problems))
    return migration.spec
