"""Fine-tuning: batch order, readiness early stop, and resume equivalence after a crash."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig

from relora_api.spec import Finetune, Regularization
from relora_trainer import adapters, models
from relora_trainer.data import Encoder, read_jsonl
from relora_trainer.method import finetune as finetune_module
from relora_trainer.method.config import FinetuneConfig, RegularizationConfig
from relora_trainer.method.finetune import (
    CHECKPOINT_FILE,
    FinetuneOutcome,
    MicroBatch,
    Target,
    _Checkpoints,
    batch_indices,
    finetune,
)

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
    toy: Any,
    *,
    state: Path | None,
    config: Finetune,
    target: Target,
    dropout: float = 0.2,
    **kw: Any,
) -> tuple[FinetuneOutcome, dict[str, torch.Tensor]]:
    base = models.load_model(toy.v2, what="v2", device=CPU)
    old = adapters.read_adapter(toy.adapter, what="adapter")
    lora = LoraConfig(**{**old.config.to_dict(), "lora_dropout": dropout, "inference_mode": False})
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
        config=FinetuneConfig.of(config),
        regularize=RegularizationConfig.of(
            Regularization(schedule="step", strength=1.0, relaxed_strength=0.1)
        ),
        target=target,
        seed=0,
        device=CPU,
        state_dir=state,
        **kw,
    )
    weights = {n: p.detach().clone() for n, p in adapters.trainable(model).items()}
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


def test_micro_batches_accumulate_the_same_steps(toy: Any) -> None:
    """microBatchSize 3 of a batch of 8 (uneven: 3 + 3 + 2 examples, each micro-batch padded to
    its own width): the loss is the mean over the whole step's labelled tokens, so the
    parameters after 6 steps equal the whole-batch run's (fp32, no dropout)."""
    config = Finetune(max_steps=6, batch_size=8, eval_every=3, learning_rate=5e-3)
    whole, whole_weights = _run(toy, state=None, config=config, target=UNREACHABLE, dropout=0.0)
    split_config = config.model_copy(update={"micro_batch_size": 3})
    split, split_weights = _run(
        toy, state=None, config=split_config, target=UNREACHABLE, dropout=0.0
    )
    assert whole.micro_batch is None and split.micro_batch == 3
    for name, value in whole_weights.items():
        assert torch.allclose(split_weights[name], value, atol=1e-6), name
    moved = max(float((v - whole_weights[n]).abs().max()) for n, v in _initial(toy).items())
    assert moved > 1e-4, "the steps did move the parameters: the comparison means something"
    assert [e.loss for e in split.history] == pytest.approx([e.loss for e in whole.history])


def _initial(toy: Any) -> dict[str, torch.Tensor]:
    _, weights = _run(toy, state=None, config=Finetune(max_steps=0), target=UNREACHABLE)
    return weights


def test_running_out_of_gpu_memory_halves_the_micro_batch(
    toy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A step (or an evaluation) that runs out of GPU memory is redone with half the examples
    per forward pass, gradients accumulated, and the run goes on with the same steps as one
    that had the memory; what happened is told once per halving."""
    config = Finetune(max_steps=4, batch_size=8, eval_every=2, learning_rate=5e-3)
    roomy, roomy_weights = _run(toy, state=None, config=config, target=UNREACHABLE, dropout=0.0)

    real_loss = finetune_module.task_loss
    from relora_trainer.method.quality import score as real_score

    def loss(model: Any, batch: dict[str, torch.Tensor], **kw: Any) -> torch.Tensor:
        if batch["input_ids"].shape[0] > 2:  # then the first step, 4 at a time: halved to 2
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB")
        return real_loss(model, batch, **kw)

    def score(*args: Any, batch_size: int, **kw: Any) -> Any:
        if batch_size > 4:  # the first evaluation, 64 examples at a time: halved to 4
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 3.00 GiB")
        return real_score(*args, batch_size=batch_size, **kw)

    monkeypatch.setattr(finetune_module, "task_loss", loss)
    monkeypatch.setattr(finetune_module, "score", score)
    told: list[str] = []
    micro = MicroBatch(8, batch=8, on_change=told.append)
    tight, tight_weights = _run(
        toy, state=None, config=config, target=UNREACHABLE, dropout=0.0, micro=micro
    )
    assert tight.micro_batch == 2 and tight.steps == roomy.steps == 4
    assert [e.step for e in tight.history] == [e.step for e in roomy.history] == [0, 2, 4]
    assert [e.accuracy for e in tight.history] == [e.accuracy for e in roomy.history]
    for name, value in roomy_weights.items():
        assert torch.allclose(tight_weights[name], value, atol=1e-6), name
    assert told == [
        "ran out of GPU memory: continuing with micro-batches of 4 examples (gradient "
        "accumulation: the same steps)",
        "ran out of GPU memory: continuing with micro-batches of 2 examples (gradient "
        "accumulation: the same steps)",
    ]


def test_out_of_memory_at_one_example_is_not_swallowed(
    toy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    def loss(*args: Any, **kw: Any) -> torch.Tensor:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(finetune_module, "task_loss", loss)
    config = Finetune(max_steps=2, batch_size=4, eval_every=2)
    with pytest.raises(torch.OutOfMemoryError):
        _run(toy, state=None, config=config, target=UNREACHABLE)


def test_a_micro_batch_larger_than_the_batch_is_refused() -> None:
    with pytest.raises(ValueError, match=r"microBatchSize \(9\) must not exceed batchSize \(8\)"):
        Finetune(batch_size=8, micro_batch_size=9)


def test_a_checkpoint_of_any_torn_bytes_is_read_as_none(tmp_path: Path) -> None:
    """Whatever bytes a torn checkpoint holds, reading it gives None (start over), never an
    error: random bytes make torch's unpickler raise UnpicklingError, but also IndexError or
    KeyError (seeds 2 and 14 of these: the fault suite's torn-checkpoint test failed on 8% of
    its random files before)."""
    checkpoints = _Checkpoints(tmp_path)
    for seed in range(40):
        (tmp_path / CHECKPOINT_FILE).write_bytes(random.Random(seed).randbytes(4096))
        assert checkpoints.load() is None, seed
