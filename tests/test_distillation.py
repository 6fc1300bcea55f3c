"""The old adapter on the old base as a distillation teacher: the term, micro-batching, the
teacher computed in the source phase and cached for a retried run, and the API's bounds."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pytest
import torch
from peft import LoraConfig, PeftModel

from relora_api import validation
from relora_api.spec import AdapterMigrationSpec, Distillation, Finetune, Regularization
from relora_trainer import adapters, loading, migrate, models, teaching
from relora_trainer.data import Encoder, Example, read_jsonl
from relora_trainer.distributed import Failure
from relora_trainer.errors import BadInput
from relora_trainer.method import distillation
from relora_trainer.method.config import FinetuneConfig, RegularizationConfig
from relora_trainer.method.finetune import (
    FinetuneOutcome,
    MicroBatch,
    Target,
    batch_indices,
    examples_seen,
    finetune,
    task_loss,
    train_step,
)
from relora_trainer.method.quality import completion_logits
from relora_trainer.storage import Storage
from tests.conftest import toy_manifest
from tests.test_bases import Loads

CPU = torch.device("cpu")
UNREACHABLE = Target("accuracy", 2.0)


def _with_old_adapter(toy: Any, base: Path, *, dropout: float = 0.0) -> PeftModel:
    old = adapters.read_adapter(toy.adapter, what="adapter")
    lora = LoraConfig(**{**old.config.to_dict(), "lora_dropout": dropout, "inference_mode": False})
    torch.manual_seed(0)
    model = adapters.attach(models.load_model(base, what="base", device=CPU), lora)
    adapters.load_factors(model, old.factors)
    return model


def _encoder(toy: Any) -> Encoder:
    return Encoder(models.load_tokenizer(toy.v2, toy.v1))


def _mixed(toy: Any) -> list[Example]:
    """Training examples with completions of one to three tokens (free-form-like rows)."""
    train = read_jsonl(toy.split("train"), what="train")[:12]
    return [
        Example(
            e.prompt, e.completion + "".join(train[(n + j) % 12].completion for j in range(n % 3))
        )
        for n, e in enumerate(train)
    ]


def _kd(
    model: torch.nn.Module,
    encoder: Encoder,
    teacher: distillation.Teacher,
    examples: list[Example],
    rows: list[int],
) -> float:
    batch = encoder.batch(
        [encoder.encode(examples[n].prompt, examples[n].completion) for n in rows], CPU
    )
    with torch.no_grad():
        logits, labels = completion_logits(model.eval(), batch)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        return float(distillation.divergence(logprobs, labels, teacher.rows(rows)))


def test_the_term_is_zero_for_the_teacher_itself_and_positive_for_another_model(toy: Any) -> None:
    encoder, examples = _encoder(toy), _mixed(toy)
    on_old = _with_old_adapter(toy, toy.v1)
    teacher = distillation.compute(on_old, encoder, examples, top_k=4, device=CPU, batch_size=5)
    lengths = [len(encoder.encode(e.prompt, e.completion).completion_ids) for e in examples]
    assert set(lengths) == {1, 2, 3}, "rows of several lengths, padded together"
    assert teacher.examples == 12 and teacher.top_k == 4
    assert torch.equal(teacher.offsets.diff(), torch.tensor(lengths))
    assert bool((teacher.probs.sum(dim=1) <= 1 + 1e-5).all())
    rows = [7, 0, 11, 4, 5, 2]  # another order and batch than the teacher's
    same = _kd(on_old, encoder, teacher, examples, rows)
    assert abs(same) < 1e-5
    on_new = _with_old_adapter(toy, toy.v2)
    other = _kd(on_new, encoder, teacher, examples, rows)
    assert other > 1e-3, other
    # Conditioned on the top k: the teacher's mass outside them does not matter.
    flatter = distillation.Teacher(teacher.ids, teacher.probs * 0.25, teacher.offsets)
    assert _kd(on_new, encoder, flatter, examples, rows) == pytest.approx(other, rel=1e-5)


def test_a_choices_teacher_compares_the_continuations_at_each_fork(toy: Any) -> None:
    """over: choices keeps the teacher's probabilities of the choices' continuations where
    choices that agree so far part ways, and nothing where they do not; the term is zero for
    the teacher itself, positive for another model, and moves no other token."""
    encoder = _encoder(toy)
    choices = [" cat dog oak", " cat dog rose", " fern"]
    ids = {c: encoder.encode("", c).completion_ids for c in choices}
    table = distillation.forks(encoder, choices)
    cat, _, oak, rose, fern = (*ids[" cat dog oak"], ids[" cat dog rose"][2], ids[" fern"][0])
    assert table[" cat dog oak"].tolist() == [[cat, fern], [-1, -1], [oak, rose]]
    assert table[" fern"].tolist() == [[cat, fern]]
    examples = [Example(e.prompt, choices[n % 3]) for n, e in enumerate(_mixed(toy))]
    on_old = _with_old_adapter(toy, toy.v1)
    teacher = distillation.compute(
        on_old, encoder, examples, top_k=16, device=CPU, batch_size=5, choices=choices
    )
    assert teacher.top_k == 2, "as wide as the widest fork"
    first = teacher.rows([0])[0]
    assert first[0].tolist() == table[" cat dog oak"].tolist()
    assert float(first[1][1].sum()) == 0.0 and bool((first[1][0] > 0).all())
    rows = list(range(len(examples)))
    assert abs(_kd(on_old, encoder, teacher, examples, rows)) < 1e-5
    on_new = _with_old_adapter(toy, toy.v2)
    assert _kd(on_new, encoder, teacher, examples, rows) > 1e-4
    # Only the fork tokens carry gradient: the logit of a token in no fork gets none.
    batch = encoder.batch([encoder.encode(e.prompt, e.completion) for e in examples], CPU)
    logits, labels = completion_logits(on_new.eval(), batch)
    logits = logits.detach().float().requires_grad_()
    term = distillation.divergence(torch.log_softmax(logits, dim=-1), labels, teacher.rows(rows))
    term.backward()
    assert logits.grad is not None and float(logits.grad.abs().sum()) > 0
    outside = [t for t in range(logits.shape[-1]) if t not in {cat, fern, oak, rose}]
    log_softmax_leak = float(logits.grad[..., outside].abs().max())
    assert log_softmax_leak < 1e-6, "only through the fork tokens"


def test_an_agreeing_teacher_keeps_only_the_tokens_it_gets_right(toy: Any) -> None:
    """agreeing: a token whose most likely teacher token is not the example's own carries no
    mass (the teacher never pulls against the label); the others are kept as they were."""
    encoder, examples = _encoder(toy), _mixed(toy)
    on_new = _with_old_adapter(toy, toy.v2)  # a teacher that is wrong on some tokens
    full = distillation.compute(on_new, encoder, examples, top_k=4, device=CPU)
    kept = distillation.compute(on_new, encoder, examples, top_k=4, device=CPU, agreeing=True)
    gold = torch.tensor(
        [t for e in examples for t in encoder.encode(e.prompt, e.completion).completion_ids]
    )
    right = full.ids[:, 0] == gold  # top-k ids come most likely first
    assert 0 < int(right.sum()) < len(gold), "both cases present"
    assert torch.equal(kept.probs[right], full.probs[right])
    assert float(kept.probs[~right].abs().sum()) == 0.0


def test_the_loss_adds_weight_times_the_term_from_the_same_logits(toy: Any) -> None:
    encoder, examples = _encoder(toy), _mixed(toy)
    teacher = distillation.compute(
        _with_old_adapter(toy, toy.v1), encoder, examples, top_k=4, device=CPU
    )
    student = _with_old_adapter(toy, toy.v2).eval()
    rows = [3, 8, 1]
    batch = encoder.batch(
        [encoder.encode(examples[n].prompt, examples[n].completion) for n in rows], CPU
    )
    with torch.no_grad():
        plain = float(task_loss(student, batch))
        off = float(task_loss(student, batch, teacher=teacher.rows(rows), weight=0.0))
        on = float(task_loss(student, batch, teacher=teacher.rows(rows), weight=2.0))
    kd = _kd(student, encoder, teacher, examples, rows)
    assert off == pytest.approx(plain, rel=1e-6)
    assert on == pytest.approx(plain + 2.0 * kd, rel=1e-5)
    with pytest.raises(ValueError, match="completion tokens"):
        task_loss(student, batch, teacher=teacher.rows([0, 1, 2]), weight=1.0)


def test_the_emphasis_counts_the_tokens_the_teacher_gets_right_more(toy: Any) -> None:
    """emphasis e: the cross-entropy of a token whose most likely teacher token is the label
    counts 1 + e times, of the others once; with a zero weight no KL term is added."""
    encoder, examples = _encoder(toy), _mixed(toy)
    teacher = distillation.compute(
        _with_old_adapter(toy, toy.v2), encoder, examples, top_k=4, device=CPU
    )  # a teacher that is right on some tokens and wrong on others
    student = _with_old_adapter(toy, toy.v1).eval()
    rows = list(range(len(examples)))
    batch = encoder.batch([encoder.encode(e.prompt, e.completion) for e in examples], CPU)
    with torch.no_grad():
        logits, labels = completion_logits(student, batch)
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        kl, right = distillation.per_token(logprobs, labels, teacher.rows(rows))
        nll = -logprobs.gather(-1, labels.clamp(min=0).unsqueeze(-1)).squeeze(-1)
        labelled = labels != -100
        emphasized = float(task_loss(student, batch, teacher=teacher.rows(rows), emphasis=3.0))
        both = float(
            task_loss(student, batch, teacher=teacher.rows(rows), weight=2.0, emphasis=3.0)
        )
    gold = torch.tensor(
        [t for e in examples for t in encoder.encode(e.prompt, e.completion).completion_ids]
    )
    expected_right = teacher.ids[:, 0] == gold  # top-k ids come most likely first
    assert 0 < int(expected_right.sum()) < len(gold), "both cases present"
    assert torch.equal(right[labelled], expected_right)
    counted = (nll * (1 + 3.0 * right.float()))[labelled].sum() / int(labelled.sum())
    assert emphasized == pytest.approx(float(counted), rel=1e-5)
    assert both == pytest.approx(float(counted + 2.0 * kl.sum() / int(labelled.sum())), rel=1e-5)
    assert float(kl[~labelled].abs().sum()) == 0.0


@pytest.fixture(scope="module")
def teacher(toy: Any) -> distillation.Teacher:
    train = read_jsonl(toy.split("train"), what="train")
    on_old = _with_old_adapter(toy, toy.v1)
    return distillation.compute(on_old, _encoder(toy), train, top_k=8, device=CPU)


def _finetuned(
    toy: Any, config: Finetune, teacher: distillation.Lessons | None, target: Target = UNREACHABLE
) -> tuple[FinetuneOutcome, dict[str, torch.Tensor]]:
    """The old adapter fine-tuned on v2 without the regularizer: the outcome, the parameters."""
    model = _with_old_adapter(toy, toy.v2)
    train = read_jsonl(toy.split("train"), what="train")
    outcome = finetune(
        model=model,
        encoder=_encoder(toy),
        train=train,
        validation=read_jsonl(toy.split("validation"), what="validation")[:16],
        choices=sorted({e.completion for e in train}),
        config=FinetuneConfig.of(config),
        regularize=RegularizationConfig.of(Regularization(schedule="none")),
        target=target,
        seed=0,
        device=CPU,
        teacher=teacher,
    )
    return outcome, {n: p.detach().clone() for n, p in adapters.trainable(model).items()}


def _train(
    toy: Any, config: Finetune, teacher: distillation.Teacher | None
) -> dict[str, torch.Tensor]:
    return _finetuned(toy, config, teacher)[1]


def test_micro_batches_accumulate_the_same_steps_with_distillation(
    toy: Any, teacher: distillation.Teacher
) -> None:
    """microBatchSize 3 of 8 (3 + 3 + 2) with the teacher's term: the parameters equal the
    whole-batch run's; and the term changed them (against weight 0)."""
    config = Finetune(
        max_steps=5,
        batch_size=8,
        eval_every=5,
        learning_rate=5e-3,
        distillation=Distillation(weight=3.0, top_k=8),
    )
    whole = _train(toy, config, teacher)
    split = _train(toy, config.model_copy(update={"micro_batch_size": 3}), teacher)
    for name, value in whole.items():
        assert torch.allclose(split[name], value, atol=1e-6), name
    off = config.model_copy(
        update={"distillation": config.distillation.model_copy(update={"weight": 0.0})}
    )
    plain = _train(toy, off, teacher)
    moved = max(float((plain[n] - v).abs().max()) for n, v in whole.items())
    assert moved > 1e-5, "the distillation term took part in the steps"


def test_a_teacher_covers_only_the_examples_the_budget_sees(
    toy: Any, teacher: distillation.Teacher
) -> None:
    """With a budget smaller than an epoch the teacher computes only the examples those steps
    draw; the others get rows of no mass (as long as their completions), and fine-tuning
    within that budget, with emphasis and a term, moves the adapter exactly as the full
    teacher does."""
    train = read_jsonl(toy.split("train"), what="train")
    seen = examples_seen(steps=3, size=len(train), batch_size=4, seed=0)
    drawn = {
        i for s in range(3) for i in batch_indices(step=s, size=len(train), batch_size=4, seed=0)
    }
    assert seen == sorted(drawn) and len(seen) == 12 < len(train)
    assert examples_seen(steps=-(-len(train) // 4), size=len(train), batch_size=4, seed=0) == list(
        range(len(train))
    )
    epoch = -(-len(train) // 4)  # from a later step: each step's batch, all once two epochs
    for first, steps in ((2, 5), (3, epoch + 2), (epoch - 1, 2 * epoch + 1), (1, 3 * epoch)):
        each = {
            i
            for s in range(first, steps)
            for i in batch_indices(step=s, size=len(train), batch_size=4, seed=0)
        }
        found = examples_seen(first=first, steps=steps, size=len(train), batch_size=4, seed=0)
        assert found == sorted(each), (first, steps)
    on_old = _with_old_adapter(toy, toy.v1)
    part = distillation.compute(on_old, _encoder(toy), train, top_k=8, device=CPU, only=seen)
    assert part.examples == teacher.examples
    for n in range(len(train)):
        (ids, probs), (full_ids, full_probs) = part.rows([n])[0], teacher.rows([n])[0]
        if n in drawn:
            assert torch.equal(ids, full_ids) and torch.allclose(probs, full_probs, atol=1e-6)
        else:
            assert ids.shape == full_ids.shape and bool((ids == -1).all())
            assert float(probs.abs().sum()) == 0.0
    config = Finetune(
        max_steps=3,
        batch_size=4,
        eval_every=3,
        learning_rate=5e-3,
        distillation=Distillation(weight=1.0, emphasis=2.0, top_k=8),
    )
    with_part, with_full = _train(toy, config, part), _train(toy, config, teacher)
    for name, value in with_full.items():
        assert torch.equal(with_part[name], value), name


def test_a_step_distilling_from_the_student_itself_adds_nothing(
    toy: Any, teacher: distillation.Teacher
) -> None:
    """The student is the teacher (the old adapter on v1): at its own distributions the term's
    gradient is zero, so a step with it (SGD: linear in the gradient) equals one without, if and
    only if each picked example gets its own teacher rows."""
    train = read_jsonl(toy.split("train"), what="train")
    encoder = _encoder(toy)

    def one_step(rows: distillation.Teacher, weight: float) -> dict[str, torch.Tensor]:
        model = _with_old_adapter(toy, toy.v1)
        model.train()
        optimizer = torch.optim.SGD(adapters.trainable(model).values(), lr=1.0)
        train_step(
            model,
            encoder,
            train,
            optimizer,
            MicroBatch(3, batch=8),
            step=5,
            batch_size=8,
            seed=0,
            device=CPU,
            teacher=rows,
            distill_weight=weight,
        )
        return {n: p.detach().clone() for n, p in adapters.trainable(model).items()}

    weights = {weight: one_step(teacher, weight) for weight in (0.0, 3.0)}
    for name, value in weights[0.0].items():
        assert torch.allclose(weights[3.0][name], value, atol=1e-5), name
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(1))
    lengths = teacher.offsets.diff()
    assert bool((lengths == 1).all()), "single-token labels: rows can be swapped between examples"
    swapped = distillation.Teacher(teacher.ids[order], teacher.probs[order], teacher.offsets)
    wrong = one_step(swapped, 3.0)
    moved = max(float((wrong[n] - v).abs().max()) for n, v in weights[0.0].items())
    assert moved > 1e-4, "other examples' rows do change the step: the check above means something"


def test_a_positive_weight_without_a_teacher_is_refused(toy: Any) -> None:
    config = Finetune(max_steps=2, batch_size=4, distillation=Distillation(weight=1.0))
    with pytest.raises(ValueError, match="needs the teacher"):
        _train(toy, config, None)


def _spec(toy: Any, tmp_path: Path, **changes: Any) -> AdapterMigrationSpec:
    manifest = toy_manifest(toy, strategy="warm-start")
    manifest["spec"]["output"]["uri"] = str(tmp_path / "out")
    manifest["spec"]["method"]["finetune"].update(
        {"maxSteps": 4, "evalEvery": 2, "distillation": {"weight": 1.0, "topK": 4}}
    )
    for key, value in changes.items():
        if key == "finetune":
            manifest["spec"]["method"]["finetune"].update(value)
        elif key == "readiness":
            manifest["spec"]["adapters"][0]["readiness"] = value
        else:
            manifest["spec"]["method"][key] = value
    migration, problems = validation.validate_manifest(manifest)
    assert migration is not None, problems
    return migration.spec


def test_the_teacher_is_computed_in_place_counted_and_reused_by_a_retry(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The teacher is computed on the old base's weights copied into the loaded new base (no
    second base loaded), equals the one computed on the old base itself, leaves the new base
    as it was, is counted in the time to readiness and is read back by a retried attempt."""
    storage = Storage(base_dir=tmp_path)
    spec = _spec(toy, tmp_path)
    loads = Loads(monkeypatch)
    bases = loading.load_bases(spec, storage, CPU)
    assert loads.folders == ["v1", "v2-mild"] and loads.most == 1, "one base resident at a time"
    target_before = {n: t.clone() for n, t in bases.target.state_dict().items()}
    computed: list[distillation.Teacher] = []
    compute = distillation.compute

    def recorded(*args: Any, **kwargs: Any) -> distillation.Teacher:
        computed.append(compute(*args, **kwargs))
        return computed[-1]

    monkeypatch.setattr(distillation, "compute", recorded)
    first = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    assert loads.folders == ["v1", "v2-mild"], "the old base was not loaded again"
    for name, value in bases.target.state_dict().items():
        assert torch.equal(value, target_before[name]), f"{name} changed"
    teacher_seconds = first.seconds["teacher"]
    assert teacher_seconds is not None and teacher_seconds > 0 and len(computed) == 1
    on_v1 = _with_old_adapter(toy, toy.v1)
    train = read_jsonl(toy.split("train"), what="train")
    choices = sorted({e.completion for e in train})
    direct = compute(on_v1, _encoder(toy), train, top_k=4, device=CPU, choices=choices)
    seen = sorted({i for i in range(len(train)) if float(computed[0].rows([i])[0][1].sum()) > 0})
    assert seen, "the teacher has mass on the examples the budget sees"
    for n in seen:  # the same probabilities of the same ids (the choices in another order)
        (ids, probs), (direct_ids, direct_probs) = computed[0].rows([n])[0], direct.rows([n])[0]
        order, direct_order = ids.argsort(dim=-1), direct_ids.argsort(dim=-1)
        assert torch.equal(ids.gather(-1, order), direct_ids.gather(-1, direct_order))
        assert torch.allclose(
            probs.gather(-1, order), direct_probs.gather(-1, direct_order), atol=1e-5
        )
    assert first.distillation == {
        "weight": 1.0,
        "top_k": 4,
        "over": "choices",
        "agreeing": True,
        "emphasis": 0.0,
        "share": 1.0,
        "since": "start",
        "until": "budget",
    }
    assert first.history[0]["seconds"] >= teacher_seconds, "counted in the time to readiness"
    out = tmp_path / "out" / "toy-category"
    assert (out / "state" / teaching.TEACHER_FILE).is_file()
    (out / "report.json").unlink()  # as if the pod died while saving

    def no_teacher(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the teacher was computed again")

    monkeypatch.setattr(distillation, "compute", no_teacher)
    loads.folders.clear()
    bases = loading.load_bases(spec, storage, CPU)
    assert loads.folders == ["v2-mild"], "neither the reference nor the teacher loads the old base"
    monkeypatch.setattr(bases, "source", no_teacher)
    second = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    assert second.seconds["teacher"] == teacher_seconds, "the first attempt's seconds, counted"
    assert second.history[0]["seconds"] >= teacher_seconds


def _saved_teacher(out: Path) -> dict[str, Any]:
    saved: dict[str, Any] = torch.load(
        out / "state" / teaching.TEACHER_FILE, map_location="cpu", weights_only=True
    )
    return saved


def test_a_teacher_in_stages_trains_as_the_whole_one_and_leaves_the_base_as_it_was(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher_passes: list[int]
) -> None:
    """The first stage covers the examples of the steps up to the second readiness check, each
    later one twice the steps; the first batch past a stage computes the next in the middle of
    fine-tuning (the old adapter added beside the new one, the old base's weights copied in
    place, all undone after). The run trains as one with the whole teacher computed up front,
    its seconds count, the new base is left as it was, and the whole teacher is saved for a
    retried attempt."""
    from safetensors.torch import load_file

    computed = teacher_passes
    storage = Storage(base_dir=tmp_path)
    runs = {}
    for name, evaluations in (("whole", 100), ("staged", 2)):
        monkeypatch.setattr(teaching, "FIRST_STAGE_EVALUATIONS", evaluations)
        spec = _spec(
            toy,
            tmp_path / name,
            readiness={"target": 0.999},
            finetune={"maxSteps": 8, "evalEvery": 1, "batchSize": 4},
        )
        bases = loading.load_bases(spec, storage, CPU)
        target_before = {n: t.clone() for n, t in bases.target.state_dict().items()}
        computed.clear()
        report = migrate.migrate_adapter(
            spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
        )
        for key, value in bases.target.state_dict().items():
            assert torch.equal(value, target_before[key]), f"{name}: {key} changed"
        out = tmp_path / name / "out" / "toy-category"
        weights = load_file(str(out / "adapter_model.safetensors"))
        runs[name] = (report, list(computed), weights, _saved_teacher(out))
    (whole, whole_computed, whole_weights, whole_saved) = runs["whole"]
    (staged, staged_computed, staged_weights, staged_saved) = runs["staged"]
    size = len(read_jsonl(toy.split("train"), what="train"))
    first = examples_seen(steps=2, size=size, batch_size=4, seed=0)
    second = examples_seen(steps=4, size=size, batch_size=4, seed=0)
    everything = examples_seen(steps=8, size=size, batch_size=4, seed=0)
    assert len(first) < len(second) < len(everything) < size
    assert whole_computed == [len(everything)], "one stage: every example the budget draws"
    expected = [len(first), len(second) - len(first), len(everything) - len(second)]
    assert staged_computed == expected, "steps up to 2, then 4, then the budget's 8"
    assert whole.steps == staged.steps == 8 and whole.ready_step is None
    assert set(staged_weights) == set(whole_weights)
    for key, value in whole_weights.items():
        assert torch.allclose(staged_weights[key], value, atol=1e-5), key
    seconds = staged.seconds["teacher"]
    assert seconds is not None and seconds > 0
    parts = ("teacher", "search", "training", "evaluation")
    counted_seconds = sum(staged.seconds[k] or 0.0 for k in parts)
    assert counted_seconds == pytest.approx(staged.history[-1]["seconds"], abs=1e-6), (
        "the later stages count once, as the teacher's"
    )
    assert whole_saved["steps"] is None and staged_saved["steps"] is None, "the whole saved"
    assert staged_saved["seconds"] > 0
    both = distillation.Teacher.of_state(staged_saved["teacher"])
    wholly = distillation.Teacher.of_state(whole_saved["teacher"])
    assert torch.equal(both.offsets, wholly.offsets) and torch.equal(both.ids, wholly.ids)
    assert torch.allclose(both.probs, wholly.probs, atol=1e-5)


def test_a_retry_after_a_stage_computes_only_the_later_ones(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher_passes: list[int]
) -> None:
    """An attempt that dies while its teacher's third stage is computed leaves the first two
    stages in its state; the retry reads them back and computes only the last, then saves the
    whole."""
    monkeypatch.setattr(teaching, "FIRST_STAGE_EVALUATIONS", 2)
    spec = _spec(
        toy,
        tmp_path,
        readiness={"target": 0.999},
        finetune={"maxSteps": 8, "evalEvery": 1, "batchSize": 4},
    )
    storage = Storage(base_dir=tmp_path)
    later_stages = teaching.later_stages

    def dies_at_the_third(*args: Any, **kwargs: Any) -> Any:
        extend = later_stages(*args, **kwargs)

        def killed(teacher: distillation.Teacher, examples: list[int], n: int) -> Any:
            if n == 1:
                raise RuntimeError("the pod was killed")
            return extend(teacher, examples, n)

        return killed

    monkeypatch.setattr(teaching, "later_stages", dies_at_the_third)
    with pytest.raises(RuntimeError, match="killed"):
        migrate.migrate_adapter(
            spec=spec,
            adapter=spec.adapters[0],
            bases=loading.load_bases(spec, storage, CPU),
            storage=storage,
        )
    size = len(read_jsonl(toy.split("train"), what="train"))
    first = examples_seen(steps=2, size=size, batch_size=4, seed=0)
    second = examples_seen(steps=4, size=size, batch_size=4, seed=0)
    everything = examples_seen(steps=8, size=size, batch_size=4, seed=0)
    out = tmp_path / "out" / "toy-category"
    assert teacher_passes == [len(first), len(second) - len(first)]
    assert _saved_teacher(out)["steps"] == 4, "the first two stages, saved"
    monkeypatch.setattr(teaching, "later_stages", later_stages)
    teacher_passes.clear()
    report = migrate.migrate_adapter(
        spec=spec,
        adapter=spec.adapters[0],
        bases=loading.load_bases(spec, storage, CPU),
        storage=storage,
    )
    assert teacher_passes == [len(everything) - len(second)], "only the last stage"
    assert report.steps == 8 and _saved_teacher(out)["steps"] is None


def _never_ready(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, eval_every: int, **teacher: Any
) -> tuple[AdapterMigrationSpec, Any, int, set[int]]:
    """A migration with a teacher of these settings (wire names) in stages, never ready in its
    8 steps of 4 examples: the spec, the report, the training examples' count and those the
    saved whole teacher has mass on."""
    monkeypatch.setattr(teaching, "FIRST_STAGE_EVALUATIONS", 2)
    spec = _spec(
        toy,
        tmp_path,
        readiness={"target": 0.999},
        finetune={
            "maxSteps": 8,
            "evalEvery": eval_every,
            "batchSize": 4,
            "distillation": {"weight": 1.0, "topK": 4, **teacher},
        },
    )
    storage = Storage(base_dir=tmp_path)
    report = migrate.migrate_adapter(
        spec=spec,
        adapter=spec.adapters[0],
        bases=loading.load_bases(spec, storage, CPU),
        storage=storage,
    )
    size = len(read_jsonl(toy.split("train"), what="train"))
    saved = distillation.Teacher.of_state(
        _saved_teacher(tmp_path / "out" / "toy-category")["teacher"]
    )
    with_mass = {n for n in range(size) if float(saved.rows([n])[0][1].sum()) > 0}
    assert report.steps == 8 and report.distillation is not None
    return spec, report, size, with_mass


def test_a_teacher_with_a_share_covers_one_subset_in_every_stage(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``share: 0.5``: a fixed half of the training examples (the same in every stage and in
    another call) is all the teacher computes, stage by stage; the saved teacher has mass on
    the examples of that half the budget drew and nowhere else, and the report says so."""
    passes: list[list[int]] = []
    compute = distillation.compute

    def recorded(*args: Any, **kwargs: Any) -> distillation.Teacher:
        passes.append(sorted(kwargs["only"]))
        return compute(*args, **kwargs)

    monkeypatch.setattr(distillation, "compute", recorded)
    spec, report, size, with_mass = _never_ready(toy, tmp_path, monkeypatch, 1, share=0.5)
    half = set(teaching.taught(spec, size, range(size)))
    assert len(half) == round(size / 2) and half == set(teaching.taught(spec, size, range(size)))
    steps = [examples_seen(steps=s, size=size, batch_size=4, seed=0) for s in (2, 4, 8)]
    first, second, everything = (set(s) for s in steps)
    assert passes == [
        sorted(first & half),
        sorted((second - first) & half),
        sorted((everything - second) & half),
    ]
    assert everything - half, "the budget drew examples the teacher does not cover"
    assert with_mass and with_mass <= everything & half
    assert report.distillation["share"] == 0.5


def test_a_teacher_since_the_first_check_computes_nothing_before_it(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, teacher_passes: list[int]
) -> None:
    """``since: first-check`` (evaluations every 2 steps, budget 8, never ready): nothing is
    computed before fine-tuning; the batch of step 2 computes the examples of steps 2 and 3,
    then those of steps 4 to 7; the whole teacher has mass on those and on none of the
    examples only steps 0 and 1 drew."""
    _, report, size, with_mass = _never_ready(toy, tmp_path, monkeypatch, 2, since="first-check")
    before = set(examples_seen(steps=2, size=size, batch_size=4, seed=0))
    then = set(examples_seen(steps=4, size=size, batch_size=4, seed=0)) - before
    later = set(examples_seen(steps=8, size=size, batch_size=4, seed=0)) - before - then
    assert before and then and later and size > 8 * 4, "one epoch: the steps draw apart"
    assert teacher_passes == [0, len(then), len(later)]
    assert with_mass and with_mass <= then | later and not with_mass & before
    assert report.distillation["since"] == "first-check"


class _Handing:
    """A stand-in for the workers' world on a rank other than 0: each broadcast returns what
    rank 0 hands next."""

    distributed = True
    rank = 1

    def __init__(self, handed: list[object]) -> None:
        self.handed = handed

    def broadcast(self, value: object) -> object:
        return self.handed.pop(0)


def test_a_worker_takes_each_later_stage_from_rank_0_or_its_failure(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A worker other than rank 0 computes no stage: the batch that asks for the next one
    takes what rank 0 hands over (the teacher grown by it); a failure of rank 0 there is
    raised as its copy (a BadInput as the same BadInput)."""
    monkeypatch.setattr(teaching, "FIRST_STAGE_EVALUATIONS", 2)
    spec = _spec(toy, tmp_path, finetune={"maxSteps": 8, "evalEvery": 1, "batchSize": 4})
    size = len(read_jsonl(toy.split("train"), what="train"))
    first_steps = examples_seen(steps=2, size=size, batch_size=4, seed=0)
    later = examples_seen(steps=4, size=size, batch_size=4, seed=0)
    rows = torch.zeros((size, 1), dtype=torch.int32)

    def teacher(mass: set[int]) -> distillation.Teacher:
        probs = torch.tensor([[1.0 if n in mass else 0.0] for n in range(size)])
        return distillation.Teacher(rows, probs, torch.arange(size + 1))

    first = teaching.TeacherPart(teacher(set(first_steps)), 0.0, 2)
    grown = teacher(set(later))
    handed: list[object] = [{k: v.clone() for k, v in grown.to_state().items()}]
    lessons = teaching.received(spec, size, first, _Handing(handed))  # type: ignore[arg-type]
    assert isinstance(lessons, distillation.Staged)
    assert float(lessons.rows(first_steps[:1])[0][1].sum()) == 1.0 and len(handed) == 1
    new = next(n for n in later if n not in first_steps)
    assert float(lessons.rows([new])[0][1].sum()) == 1.0 and not handed, "stage 2: rank 0's"
    beyond = next(
        n for n in examples_seen(steps=8, size=size, batch_size=4, seed=0) if n not in later
    )
    handed.append(Failure.of(BadInput("spec.sourceModel: unreadable"), 0))
    with pytest.raises(BadInput, match=r"\(worker 0\) spec.sourceModel: unreadable"):
        lessons.rows([beyond])
    whole = teaching.TeacherPart(teacher(set(range(size))), 0.0, None)
    assert teaching.received(spec, size, whole, _Handing([])) is whole.teacher  # type: ignore[arg-type]


def test_a_staged_teacher_computes_each_stage_once_and_only_when_a_batch_needs_it() -> None:
    def rows(values: list[float]) -> distillation.Teacher:
        return distillation.Teacher(
            ids=torch.zeros((len(values), 2), dtype=torch.int32),
            probs=torch.tensor([[v, 0.0] for v in values]),
            offsets=torch.arange(len(values) + 1),
        )

    calls: list[tuple[list[int], int]] = []

    def extend(teacher: distillation.Teacher, examples: list[int], n: int) -> Any:
        calls.append((examples, n))
        return teacher.merged(rows([10.0 + i for i in range(6)]), examples)

    stages = [[0, 1, 2], [0, 1, 2, 3], [0, 1, 2, 3, 4, 5]]
    staged = distillation.Staged(rows([1.0, 2.0] + [0.0] * 4), [0, 1], stages, extend)
    assert [float(p[0, 0]) for _, p in staged.rows([1, 0])] == [2.0, 1.0]
    assert not calls and not staged.completed and staged.seconds == 0.0
    assert [float(p[0, 0]) for _, p in staged.rows([0, 2])] == [1.0, 12.0]
    assert calls == [([2], 0)] and not staged.completed and staged.seconds > 0
    # A batch past the next stage: the stages up to the one that covers it, together.
    assert [float(p[0, 0]) for _, p in staged.rows([5, 1])] == [15.0, 2.0]
    assert calls == [([2], 0), ([3, 4, 5], 2)] and staged.completed
    assert [float(p[0, 0]) for _, p in staged.rows([3, 2])] == [13.0, 12.0]
    assert len(calls) == 2, "each computed once"
    with pytest.raises(ValueError, match="3 examples merged into 4"):
        rows([1.0] * 4).merged(rows([1.0] * 3), [0])


def test_an_absolute_target_computes_the_teacher_without_loading_the_source(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = Loads(monkeypatch)
    spec = _spec(toy, tmp_path, readiness={"target": 0.99})
    storage = Storage(base_dir=tmp_path)
    bases = loading.load_bases(spec, storage, CPU)
    assert loads.folders == ["v2-mild"] and not bases.on_source
    report = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    assert loads.folders == ["v2-mild"]
    assert "source" not in report.quality
    assert report.seconds["teacher"] is not None and report.seconds["teacher"] > 0


def test_an_adapter_ready_on_the_new_base_as_it_is_computes_no_teacher(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The old adapter already meets the target on the new base: nothing to learn from the
    teacher, so its seconds are not spent (distillation on, a strategy that trains)."""

    def no_teacher(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("a teacher was computed")

    monkeypatch.setattr(distillation, "compute", no_teacher)
    spec = _spec(toy, tmp_path, readiness={"target": 0.01})
    storage = Storage(base_dir=tmp_path)
    bases = loading.load_bases(spec, storage, CPU)
    report = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    assert report.ready_step == 0 and report.seconds["teacher"] is None


def test_weights_are_copied_in_place_only_when_the_files_hold_them_all(
    toy: Any, tmp_path: Path
) -> None:
    model = models.load_model(toy.v2, what="base", device=CPU)
    before = {n: t.clone() for n, t in model.state_dict().items()}
    v1 = models.WeightFiles(toy.v1, what="v1")
    assert models.copy_weights(model, v1)
    reloaded = models.load_model(toy.v1, what="base", device=CPU).state_dict()
    assert all(torch.equal(t, reloaded[n]) for n, t in model.state_dict().items())
    assert models.copy_weights(model, models.WeightFiles(toy.v2, what="v2"))
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items())
    partial = models.WeightFiles(toy.v1, what="v1")
    partial.files.pop(next(iter(partial.files)))
    assert not models.copy_weights(model, partial)
    assert all(torch.equal(t, before[n]) for n, t in model.state_dict().items()), "untouched"


def test_a_strategy_that_does_not_train_computes_no_teacher(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = Loads(monkeypatch)
    spec = _spec(toy, tmp_path, strategy="reuse", readiness={"target": 0.5})
    storage = Storage(base_dir=tmp_path)
    bases = loading.load_bases(spec, storage, CPU)
    report = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    assert loads.folders == ["v2-mild"]
    assert report.seconds["teacher"] is None and report.distillation is None


@pytest.mark.parametrize(
    ("field", "value", "expected"),
    [
        (
            "weight",
            -0.5,
            "spec.method.finetune.distillation.weight: must be greater than or equal to 0",
        ),
        (
            "weight",
            101,
            "spec.method.finetune.distillation.weight: must be less than or equal to 100",
        ),
        ("topK", 1, "spec.method.finetune.distillation.topK: must be greater than or equal to 2"),
    ],
)
def test_out_of_range_distillation_is_refused_with_the_field_named(
    toy: Any, field: str, value: float, expected: str
) -> None:
    manifest = toy_manifest(toy)
    manifest["spec"]["method"]["finetune"]["distillation"] = {field: value}
    migration, problems = validation.validate_manifest(manifest)
    assert migration is None
    assert any(str(p).startswith(expected) for p in problems), problems


def test_relora_distils_by_default_and_the_baselines_do_not() -> None:
    """The distillation weight and emphasis default by strategy (relora: 3 and 3; the
    baselines: 0); a value the manifest sets, 0 included, is kept; null means the default."""
    from relora_api.spec import STRATEGY_DEFAULTS, Method

    def teaching(method: dict[str, Any]) -> tuple[float, float]:
        distilled = Method.model_validate(method).finetune.distillation
        return distilled.weight, distilled.emphasis

    assert STRATEGY_DEFAULTS["relora"] == {"weight": 3.0, "emphasis": 3.0}
    assert teaching({}) == (3.0, 3.0)
    for strategy in ("warm-start", "scratch", "reuse"):
        assert teaching({"strategy": strategy}) == (0.0, 0.0), strategy
    assert teaching({"finetune": {"distillation": {"weight": 0}}}) == (0.0, 3.0)
    assert teaching({"finetune": {"distillation": {"weight": None, "emphasis": 0}}}) == (3.0, 0.0)
    assert teaching({"strategy": "warm-start", "finetune": {"distillation": {"weight": 1}}}) == (
        1.0,
        0.0,
    )
    made = Method(finetune=Finetune(max_steps=3, distillation=Distillation(emphasis=1.0)))
    assert (made.finetune.distillation.weight, made.finetune.distillation.emphasis) == (3.0, 1.0)
    assert made.finetune.max_steps == 3
    wire = Method.model_validate({"strategy": "relora"}).to_wire()
    assert wire["finetune"]["distillation"]["weight"] == 3.0
    assert Method.model_validate(wire).to_wire() == wire


class _Asked:
    """A teacher that records the examples each step asks it for."""

    def __init__(self, teacher: distillation.Teacher) -> None:
        self.teacher, self.asked = teacher, list[list[int]]()

    @property
    def examples(self) -> int:
        return self.teacher.examples

    def rows(self, indices: list[int]) -> list[tuple[torch.Tensor, torch.Tensor]]:
        self.asked.append(list(indices))
        return self.teacher.rows(indices)


class _MetFrom(Target):
    """A target first met at the ``at``-th evaluation (0-based), whatever the quality."""

    def __init__(self, at: int) -> None:
        super().__init__("accuracy", 0.0)
        self.calls, self.at = 0, at

    def met(self, quality: float) -> bool:
        self.calls += 1
        return self.calls > self.at


@pytest.mark.parametrize("since", ["start", "first-check"])
@pytest.mark.parametrize("until", ["ready", "budget"])
def test_a_teacher_takes_part_from_since_to_until(
    toy: Any,
    teacher: distillation.Teacher,
    until: Literal["ready", "budget"],
    since: Literal["start", "first-check"],
) -> None:
    """stopWhenReady false, ready at the evaluation after step 2 of 5 (the first check): with
    until ready the teacher is asked for the batches of steps 0 and 1 only (the later steps
    are plain fine-tuning), with until budget for all five; since first-check, for none before
    step 2 (with until ready: for none at all)."""
    train = read_jsonl(toy.split("train"), what="train")
    config = Finetune(
        max_steps=5,
        batch_size=4,
        eval_every=2,
        learning_rate=5e-3,
        stop_when_ready=False,
        distillation=Distillation(weight=3.0, emphasis=3.0, top_k=8, until=until, since=since),
    )
    asked = _Asked(teacher)
    outcome, _ = _finetuned(toy, config, asked, _MetFrom(1))  # type: ignore[arg-type]
    assert outcome.ready_step == 2 and outcome.steps == 5
    drawn = [batch_indices(step=s, size=len(train), batch_size=4, seed=0) for s in range(5)]
    during = drawn[:2] if until == "ready" else drawn
    assert asked.asked == (during if since == "start" else during[2:])
