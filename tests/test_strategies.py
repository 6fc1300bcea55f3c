"""The strategies behind one interface: each computes only what it needs."""

from __future__ import annotations

from pathlib import Path
from typing import Any, get_args

import pytest
import torch

from relora_api.spec import Initialization, Strategy
from relora_trainer import adapters, models
from relora_trainer.method import strategies
from relora_trainer.method.config import SearchConfig
from relora_trainer.method.quality import Quality

CPU = torch.device("cpu")


def _context(toy: Any, tmp_path: Path, calls: list[str], rank: int | None = None) -> Any:
    base = models.load_model(toy.v2, what="v2", device=CPU)
    old = adapters.read_adapter(toy.adapter, what="adapter")
    rank = rank or old.rank
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
        rank=rank,
        scale=adapters.lora_scale(config, rank),
        device=CPU,
        evolution=evolution,
        measure=measure,
        look_ahead=lambda: calls.append("look-ahead"),
        metric="accuracy",
        search=SearchConfig.of(Initialization(trials=2)),
        seed=0,
        journal=tmp_path / "journal",
        study_name="s",
        on_trial=lambda k, n, v: None,
    )


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


def test_relora_searches_on_the_evolution(toy: Any, tmp_path: Path) -> None:
    calls: list[str] = []
    context = _context(toy, tmp_path, calls)
    with pytest.raises(AssertionError, match="read the source base"):
        strategies.strategy("relora").initialize(context)
    assert calls == ["evolution adapter-subspace"]
    assert strategies.strategy("relora").regularized is True
    spec_values = set(get_args(Strategy))
    assert set(strategies.STRATEGIES) == spec_values, "every spec.method.strategy has a module"
