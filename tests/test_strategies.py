"""The strategies behind one interface: each computes only what it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from relora_api.spec import Initialization, Strategy
from relora_trainer import adapters, models
from relora_trainer.method import fusion, search, strategies
from relora_trainer.method.config import SearchConfig
from relora_trainer.method.quality import Quality

CPU = torch.device("cpu")


def _context(toy: Any, tmp_path: Path, calls: list[str], rank: int | None = None) -> Any:
    base = models.load_model(toy.v2, what="v2", device=CPU)
    old = adapters.read_adapter(toy.adapter, what="adapter")
    config = adapters.new_config(old.config, rank=rank, base=str(toy.v2))
    torch.manual_seed(0)
    model = adapters.attach(base, config)

    def evolution(projection: str) -> Any:
        calls.append(f"evolution {projection}")
        raise AssertionError("read the source base")

    def measure(with_accuracy: bool) -> Quality:
        calls.append("measure")
        return Quality(loss=1.0, accuracy=None)

    return strategies.Context(
        model=model,
        old=old,
        layout=adapters.layout(model),
        device=CPU,
        evolution=evolution,
        measure=measure,
        look_ahead=lambda: calls.append("look-ahead"),
        metric="accuracy",
        ready_before=False,
        search=SearchConfig.of(Initialization(trials=2)),
        seed=0,
        journal=tmp_path / "journal",
        study_name="s",
        on_trial=lambda k, n, v: None,
    )


def _small_evolution(context: Any) -> None:
    """A random base evolution (1% of unit scale) in place of the one read from files."""
    old = context.old
    torch.manual_seed(1)
    evolution = fusion.Terms(
        modules={
            m: fusion.prepare(
                f,
                torch.randn(f.b.shape[0], f.a.shape[1]) * 0.01,
                scale=old.scale(m),
                projection="adapter-subspace",
            )
            for m, f in old.factors.items()
        }
    )
    context.evolution = lambda projection: evolution


def _update(model: Any, module: str) -> torch.Tensor:
    state = {n: p.detach() for n, p in model.named_parameters() if module in n and "lora_" in n}
    a = next(v for n, v in state.items() if "lora_A" in n)
    b = next(v for n, v in state.items() if "lora_B" in n)
    product: torch.Tensor = b @ a
    return product


@pytest.mark.parametrize("name", ["scratch", "reuse", "warm-start"])
def test_the_baselines_never_read_the_source_base(toy: Any, tmp_path: Path, name: str) -> None:
    calls: list[str] = []
    context = _context(toy, tmp_path, calls)
    chosen = strategies.strategy(name)
    assert chosen.initialize(context) is None and calls == []
    assert chosen.trains is (name != "reuse") and chosen.regularized is False
    module = next(iter(context.old.factors))
    got = _update(context.model, module)
    if name == "scratch":  # PEFT's own init: B = 0
        assert float(got.abs().max()) == 0.0
    else:  # the old update itself (same rank, same scale)
        old = context.old.factors[module]
        assert torch.allclose(got, old.b @ old.a, atol=1e-5)


@pytest.mark.parametrize(("rank", "kept"), [(None, True), (8, True), (2, False)])
def test_which_starts_are_the_old_adapter_as_is(
    toy: Any, tmp_path: Path, rank: int | None, kept: bool
) -> None:
    """The start whose quality is the old adapter's on the target base: the old update loaded
    whole (a higher rank keeps it, a lower one truncates it), by a strategy that loads it."""
    context = _context(toy, tmp_path, [], rank=rank)
    assert strategies.keeps_update(context) is kept
    strategies.strategy("warm-start").initialize(context)
    module = next(iter(context.old.factors))
    old = context.old.factors[module]
    got = _update(context.model, module) * context.layout[module][1]
    same = torch.allclose(got, old.b @ old.a * context.old.scale(module), atol=1e-5)
    assert same is kept, "keeps_update must say whether the product is the old one"
    assert strategies.strategy("reuse").starts_as_old(None) is True
    assert strategies.strategy("warm-start").starts_as_old(None) is True
    assert strategies.strategy("scratch").starts_as_old(None) is False
    relora = strategies.strategy("relora")
    skipped = search.SearchResult(coefficients={"all": (1.0, 0.0)}, best_value=None, skipped=True)
    searched = search.SearchResult(coefficients={"all": (1.0, 0.0)}, best_value=0.5)
    assert relora.starts_as_old(skipped) is True
    assert relora.starts_as_old(searched) is False  # fused, even at the anchor
    assert relora.starts_as_old(None) is False


def test_relora_searches_on_the_evolution(toy: Any, tmp_path: Path) -> None:
    calls: list[str] = []
    context = _context(toy, tmp_path, calls)
    with pytest.raises(AssertionError, match="read the source base"):
        strategies.strategy("relora").initialize(context)
    assert calls == ["evolution adapter-subspace"]
    assert strategies.strategy("relora").regularized is True
    spec_values = set(get_args(Strategy))
    assert set(strategies.STRATEGIES) == spec_values, "every spec.method.strategy has a module"


@pytest.mark.parametrize(
    ("searched", "anchor", "falls_back"), [(0.5, 0.6, True), (0.6, 0.6, False)]
)
def test_relora_falls_back_to_the_old_adapter_when_its_start_is_worse(
    toy: Any, tmp_path: Path, searched: float, anchor: float, falls_back: bool
) -> None:
    """The search picks by its objective (here: any start but the anchor); then the start is
    compared with the old adapter's on the readiness metric, and the worse of the two is
    never handed to the fine-tuning. Ties keep the searched start."""
    calls: list[str] = []
    context = _context(toy, tmp_path, calls)
    old = context.old
    _small_evolution(context)
    losses = iter([10.0, 5.0, 1.0, 2.0])  # the anchor trial first: the search leaves it
    accuracies = iter([searched, anchor])  # the check: the searched start, then the anchor

    def measure(with_accuracy: bool) -> Quality:
        if with_accuracy:
            return Quality(loss=1.0, accuracy=next(accuracies))
        return Quality(loss=next(losses), accuracy=None)

    context.measure = measure
    context.search = SearchConfig.of(Initialization(trials=4, sampler="random"))
    result = strategies.strategy("relora").initialize(context)
    assert result is not None and result.fell_back is falls_back
    module = next(iter(old.factors))
    got = _update(context.model, module)
    as_old = torch.allclose(got, old.factors[module].b @ old.factors[module].a, atol=1e-5)
    assert as_old is falls_back, "the model holds the start that was kept"
    assert (result.coefficients == {"all": (1.0, 0.0)}) is falls_back


def test_the_fallback_check_reuses_what_the_trials_measured(toy: Any, tmp_path: Path) -> None:
    """With choice-loss the trials score accuracy too: the check compares the searched start
    and the anchor from their trials, with no evaluation of its own."""
    calls: list[str] = []
    context = _context(toy, tmp_path, calls)
    _small_evolution(context)
    # Trial by trial (the anchor first): the searched best has the lowest choice loss but a
    # lower accuracy than the anchor.
    scores = iter([(2.0, 0.6), (3.0, 0.3), (1.0, 0.5), (1.5, 0.55)])
    measured: list[bool] = []

    def measure(with_accuracy: bool) -> Quality:
        measured.append(with_accuracy)
        choice_loss, accuracy = next(scores)
        return Quality(loss=9.0, accuracy=accuracy, choice_loss=choice_loss)

    context.measure = measure
    context.search = SearchConfig.of(
        Initialization(trials=4, sampler="random", objective="choice-loss")
    )
    result = strategies.strategy("relora").initialize(context)
    assert result is not None and result.fell_back, "0.5 < 0.6: back to the old adapter"
    assert measured == [True] * 4, "four trials, no extra evaluation"


def test_relora_does_not_search_when_the_old_adapter_is_already_ready(
    toy: Any, tmp_path: Path
) -> None:
    """skipWhenReady (default on): the start is the old adapter, nothing measured, the
    source base never read; off, the search runs as always."""
    calls: list[str] = []
    context = _context(toy, tmp_path, calls)
    context.ready_before = True
    result = strategies.strategy("relora").initialize(context)
    assert result is not None and result.skipped and result.trials == []
    assert calls == [], "neither the evolution nor a trial"
    module = next(iter(context.old.factors))
    old = context.old.factors[module]
    assert torch.allclose(_update(context.model, module), old.b @ old.a, atol=1e-5)
    context.search = SearchConfig.of(Initialization(trials=2, skip_when_ready=False))
    with pytest.raises(AssertionError, match="read the source base"):
        strategies.strategy("relora").initialize(context)


def test_relora_without_trials_starts_from_the_old_adapter_without_reading_the_source(
    toy: Any, tmp_path: Path
) -> None:
    """initialization.trials: 0 turns the search off: the start is the old adapter (as
    warm-start's), no trial measured, the base evolution never read."""
    calls: list[str] = []
    context = _context(toy, tmp_path, calls)
    context.search = SearchConfig.of(Initialization(trials=0))
    result = strategies.strategy("relora").initialize(context)
    assert result is not None and result.skipped and result.trials == []
    assert result.seconds == 0.0, "loading the old adapter is no search (warm-start's start)"
    assert result.coefficients == {"all": (1.0, 0.0)}
    assert calls == [], "neither the evolution nor a trial"
    module = next(iter(context.old.factors))
    old = context.old.factors[module]
    assert torch.allclose(_update(context.model, module), old.b @ old.a, atol=1e-5)
