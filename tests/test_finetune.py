"""Fine-tuning: batch order, readiness early stop, and resume equivalence after a crash."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig

from relora_operator.api.spec import Finetune, Regularization
from relora_trainer import adapters, models
from relora_trainer.data import Encoder, read_jsonl
from relora_trainer.finetune import FinetuneOutcome, Target, batch_indices, finetune

CPU = torch.device("cpu")


class Crash(Exception):
    pass


def test_batch_order_is_a_pure_function_of_seed_and_step() -> None:
    first = [batch_indices(step=s, size=10, batch_size=4, seed=3) for s in range(5)]
    again = [batch_indices(step=s, size=10, batch_size=4, seed=3) for s in range(5)]
    assert first == again
    epoch = [i for batch in first for i in batch][:10]
    assert sorted(epoch) == list(range(10)), "an epoch visits every example once"
    assert first != [batch_indices(step=s, size=10, batch_size=4, seed=4) for s in range(5)]


def _run(
    toy: Any, *, state: Path | None, config: Finetune, target: Target, **kw: Any
) -> tuple[FinetuneOutcome, dict[str, torch.Tensor]]:
    base = models.load_model(toy.v2, what="v2", device=CPU)
    old = adapters.read_adapter(toy.adapter, what="adapter")
    lora = LoraConfig(**{**old.config.to_dict(), "lora_dropout": 0.2, "inference_mode": False})
    torch.manual_seed(0)
    model = adapters.attach(base, lora)
    adapters.load_factors(model, old.factors)
    train = read_jsonl(toy.split("train"), what="train")
    validation = read_jsonl(toy.split("validation"), what="validation")[:32]
    outcome = finetune(
        model=model,
        encoder=Encoder(models.load_tokenizer(toy.v2)),
        train=train,
        validation=validation,
        choices=sorted({e.completion for e in train}),
        config=config,
        regularize=Regularization(schedule="step", strength=1.0, relaxed_strength=0.1),
        target=target,
        seed=0,
        device=CPU,
        state_dir=state,
        **kw,
    )
    weights = {n: p.detach().clone() for n, p in adapters.lora_parameters(model).items()}
    return outcome, weights


UNREACHABLE = Target("accuracy", 2.0)


def test_a_resumed_run_matches_an_uninterrupted_one(toy: Any, tmp_path: Path) -> None:
    config = Finetune(max_steps=30, eval_every=10, checkpoint_every=10, batch_size=8)
    whole, whole_weights = _run(toy, state=tmp_path / "a", config=config, target=UNREACHABLE)

    def crash_at_17(step: int, evaluation: object) -> None:
        if step == 17:
            raise Crash

    with pytest.raises(Crash):
        _run(toy, state=tmp_path / "b", config=config, target=UNREACHABLE, on_step=crash_at_17)
    steps_run: list[int] = []
    resumed, resumed_weights = _run(
        toy,
        state=tmp_path / "b",
        config=config,
        target=UNREACHABLE,
        on_step=lambda step, evaluation: steps_run.append(step),
    )
    assert steps_run[0] == 11, "resumes after the last checkpoint (step 10), not from zero"
    assert len(steps_run) == 20 < 30
    assert resumed.steps == whole.steps == 30
    assert [e.step for e in resumed.history] == [e.step for e in whole.history] == [0, 10, 20, 30]
    for name, value in whole_weights.items():
        assert torch.allclose(resumed_weights[name], value, atol=1e-5), name
    assert resumed.history[-1].loss == pytest.approx(whole.history[-1].loss, rel=1e-4)


def test_a_corrupted_checkpoint_starts_over_instead_of_failing(toy: Any, tmp_path: Path) -> None:
    (tmp_path / "checkpoint.pt").write_bytes(b"not a checkpoint")
    config = Finetune(max_steps=4, eval_every=2, checkpoint_every=2, batch_size=4)
    outcome, _ = _run(toy, state=tmp_path, config=config, target=UNREACHABLE)
    assert outcome.steps == 4


def test_stops_at_readiness(toy: Any) -> None:
    config = Finetune(max_steps=50, eval_every=5, batch_size=8)
    outcome, _ = _run(toy, state=None, config=config, target=Target("loss", 100.0))
    assert outcome.ready and outcome.ready_step == 0 and outcome.steps == 0
    assert outcome.ready_seconds is not None and outcome.ready_seconds > 0


def test_runs_the_budget_when_never_ready(toy: Any) -> None:
    config = Finetune(max_steps=7, eval_every=3, batch_size=4)
    outcome, _ = _run(toy, state=None, config=config, target=UNREACHABLE)
    assert not outcome.ready and outcome.steps == 7
    assert [e.step for e in outcome.history] == [0, 3, 6, 7]
    assert outcome.ready_seconds is None and outcome.train_seconds > 0
