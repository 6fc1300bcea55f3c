"""What the benchmark relies on in the method's code path, on the toy world.

- the one-forward scoring of single-token completions gives the numbers of the general path;
- the choice loss is the cross-entropy among the task's completions;
- ``stopWhenReady: false`` trains the whole budget and still records the readiness step;
- reference measurements are taken once per pair of bases;
- a run's spec is the manifest + shared budget + variant + seed, validated like ``relora run``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from peft import LoraConfig

from relora_api.spec import Finetune, Initialization
from relora_lab import settings
from relora_lab.bench import variants
from relora_trainer import adapters, loading, migrate, models
from relora_trainer.data import Encoder, Example, read_jsonl
from relora_trainer.errors import BadInput
from relora_trainer.method import quality
from relora_trainer.method.config import FinetuneConfig
from relora_trainer.method.finetune import Target, finetune
from relora_trainer.storage import Storage
from tests.conftest import toy_manifest

CPU = torch.device("cpu")


def _toy_model(toy: Any) -> tuple[Any, Encoder, list[Example], list[str]]:
    base = models.load_model(toy.v2, what="v2", device=CPU)
    old = adapters.read_adapter(toy.adapter, what="adapter")
    model = adapters.attach(base, old.config)
    adapters.load_factors(model, old.factors)
    examples = read_jsonl(toy.split("validation"), what="validation")
    choices = sorted({e.completion for e in examples})
    return model, Encoder(models.load_tokenizer(toy.v2)), examples, choices


def _pairs_scored(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """One entry per batch that quality scores one sequence per (prompt, completion), from now
    on in this test."""
    calls: list[int] = []
    original = quality.sequence_logprobs

    def counted(*args: Any) -> Any:
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(quality, "sequence_logprobs", counted)
    return calls


def test_single_token_scoring_matches_the_general_path(
    toy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, encoder, examples, choices = _toy_model(toy)
    fast = quality.measure(model, encoder, examples, choices, device=CPU, batch_size=7)
    fast_loss_only = quality.measure(
        model, encoder, examples, choices, device=CPU, with_accuracy=False
    )
    calls = _pairs_scored(monkeypatch)
    monkeypatch.setattr(quality, "_single_tokens", lambda encoder, texts: None)
    monkeypatch.setattr(quality, "_shared_prompts", lambda *args: None)
    slow = quality.measure(model, encoder, examples, choices, device=CPU, batch_size=7)
    assert calls, "the general path ran"
    assert fast.accuracy == pytest.approx(slow.accuracy, abs=1e-9)
    assert fast.loss == pytest.approx(slow.loss, rel=1e-5)
    assert fast.choice_loss is not None and slow.choice_loss is not None
    assert fast.choice_loss == pytest.approx(slow.choice_loss, rel=1e-5)
    assert fast_loss_only.loss == pytest.approx(fast.loss, rel=1e-6)
    assert fast_loss_only.accuracy is None and fast_loss_only.choice_loss is None


def test_multi_token_choices_score_each_prompt_once_as_one_sequence_per_pair_does(
    toy: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Phrases of 2-4 tokens after prompts of 9-13: each prompt run once into the key/value
    cache, then every phrase after it, gives the numbers of one sequence per (prompt, phrase),
    in one chunk of phrases or several (a batch smaller than the phrases: the cache copied per
    chunk). A completion that is not a phrase, or a prompt cut to make room, takes the
    per-pair path."""
    model, encoder, examples, choices = _toy_model(toy)
    phrases = {c: c * (2 + i % 3) for i, c in enumerate(choices)}
    assert sorted({len(encoder.encode("", p).completion_ids) for p in phrases.values()}) == [
        2,
        3,
        4,
    ]
    examples = [
        Example(e.prompt + " and" * (n % 5), phrases[e.completion]) for n, e in enumerate(examples)
    ]
    candidates = list(phrases.values())
    pairs = _pairs_scored(monkeypatch)
    shared = [
        quality.measure(model, encoder, examples, candidates, device=CPU, batch_size=size)
        for size in (64, 3)
    ]
    assert not pairs, "each prompt scored once"
    for odd in (
        [*examples[:-1], Example(examples[-1].prompt, " rock rock")],  # not a phrase
    ):
        quality.measure(model, encoder, odd, candidates, device=CPU)
        assert pairs, "the per-pair path"
        pairs.clear()
    encoder.max_length = 17  # 13 + 4 tokens do not fit: a prompt would be cut
    quality.measure(model, encoder, examples, candidates, device=CPU)
    assert pairs, "the per-pair path"
    encoder.max_length = 512
    monkeypatch.setattr(quality, "_shared_prompts", lambda *args: None)
    per_pair = quality.measure(model, encoder, examples, candidates, device=CPU, batch_size=7)
    for found in shared:
        assert found.accuracy == pytest.approx(per_pair.accuracy, abs=1e-9)
        assert found.loss == pytest.approx(per_pair.loss, rel=1e-5)
        assert found.choice_loss is not None and per_pair.choice_loss is not None
        assert found.choice_loss == pytest.approx(per_pair.choice_loss, rel=1e-5)


@pytest.mark.parametrize("path", ["single-token", "shared-prompt", "per-pair", "loss-only"])
def test_the_scores_of_shares_join_into_the_quality_of_the_whole(
    toy: Any, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """What workers do at a readiness check: each scores a share of validation, the shares
    joined in rank order give the quality of the whole (on every scoring path, with the
    completions' token counts weighing the loss of multi-token ones)."""
    model, encoder, examples, choices = _toy_model(toy)
    if path != "single-token":  # phrases of 2-4 tokens, prompts of different lengths
        phrases = {c: c * (2 + i % 3) for i, c in enumerate(choices)}
        examples = [
            Example(e.prompt + " and" * (n % 5), phrases[e.completion])
            for n, e in enumerate(examples)
        ]
        choices = list(phrases.values())
    if path == "per-pair":
        monkeypatch.setattr(quality, "_shared_prompts", lambda *args: None)
    accuracy = path != "loss-only"

    def scored(part: list[Example]) -> quality.Scores:
        return quality.score(
            model, encoder, part, choices, device=CPU, batch_size=5, with_accuracy=accuracy
        )

    whole = scored(examples).quality()
    cut = len(examples) // 3
    joined = quality.Scores.joined([scored(examples[:cut]), scored(examples[cut:])]).quality()
    # more workers than examples: a worker's share may be empty
    with_empty = quality.Scores.joined([scored(examples[:0]), scored(examples)]).quality()
    assert with_empty == whole
    assert (joined.accuracy is None) is (whole.accuracy is None) is (not accuracy)
    if accuracy:
        assert joined.accuracy == pytest.approx(whole.accuracy, abs=1e-9)
        assert joined.choice_loss == pytest.approx(whole.choice_loss, rel=1e-5)
    assert joined.loss == pytest.approx(whole.loss, rel=1e-5)
    unweighted = (cut * scored(examples[:cut]).quality().loss) + (
        (len(examples) - cut) * scored(examples[cut:]).quality().loss
    )
    if path != "single-token":  # a mean of the shares' means would weigh examples, not tokens
        assert unweighted / len(examples) != pytest.approx(whole.loss, rel=1e-5)


def test_the_choice_loss_is_the_cross_entropy_among_the_choices(toy: Any) -> None:
    model, encoder, examples, choices = _toy_model(toy)
    measured = quality.measure(model, encoder, examples[:5], choices, device=CPU)
    expected = 0.0
    for example in examples[:5]:
        scores = []
        for choice in choices:
            encoded = encoder.encode(example.prompt, choice)
            logprob, _ = quality.sequence_logprobs(model, encoder.batch([encoded], CPU))
            scores.append(float(logprob[0]))
        logits = torch.tensor(scores)
        expected -= float(torch.log_softmax(logits, 0)[choices.index(example.completion)])
    assert measured.choice_loss == pytest.approx(expected / 5, rel=1e-4)
    assert measured.choice_loss is not None and measured.choice_loss < measured.loss


def test_multi_token_completions_use_the_general_path(toy: Any) -> None:
    model, encoder, examples, _ = _toy_model(toy)
    renamed = [Example(e.prompt, e.completion + " ->") for e in examples[:6]]
    choices = sorted({e.completion for e in renamed})
    measured = quality.measure(model, encoder, renamed, choices, device=CPU)
    assert measured.accuracy is not None and 0 <= measured.accuracy <= 1
    assert measured.choice_loss is not None and measured.choice_loss > 0


def test_without_stop_when_ready_the_whole_budget_runs(toy: Any) -> None:
    base = models.load_model(toy.v2, what="v2", device=CPU)
    old = adapters.read_adapter(toy.adapter, what="adapter")
    model = adapters.attach(base, LoraConfig(**{**old.config.to_dict(), "inference_mode": False}))
    adapters.load_factors(model, old.factors)
    train = read_jsonl(toy.split("train"), what="train")
    validation = read_jsonl(toy.split("validation"), what="validation")[:16]

    def run(stop: bool) -> Any:
        return finetune(
            model=model,
            encoder=Encoder(models.load_tokenizer(toy.v2)),
            train=train,
            validation=validation,
            choices=sorted({e.completion for e in train}),
            config=FinetuneConfig.of(
                Finetune(max_steps=6, eval_every=2, batch_size=4, stop_when_ready=stop)
            ),
            regularize=None,
            target=Target("loss", 1000.0),  # met at once
            seed=0,
            device=CPU,
        )

    stopped = run(True)
    assert stopped.ready_step == 0 and stopped.steps == 0
    whole = run(False)
    assert whole.ready_step == 0 and whole.steps == 6
    assert [e.step for e in whole.history] == [0, 2, 4, 6]
    assert whole.ready_seconds == whole.history[0].seconds


def test_reference_qualities_are_measured_once_per_pair_of_bases(toy: Any, tmp_path: Path) -> None:
    from relora_api import validation

    manifest = toy_manifest(toy, strategy="reuse")
    manifest["spec"]["output"]["uri"] = str(tmp_path / "out")
    migration, _ = validation.validate_manifest(manifest)
    assert migration is not None
    spec = migration.spec
    storage = Storage(base_dir=tmp_path)
    bases = loading.load_bases(spec, storage, CPU)
    first = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    renamed = spec.adapters[0].model_copy(update={"name": "again"})
    second = migrate.migrate_adapter(spec=spec, adapter=renamed, bases=bases, storage=storage)
    assert len(bases.on_target) == len(bases.on_source) == 1
    assert second.quality["source"] == first.quality["source"]
    assert second.quality["before"] == first.quality["before"]
    assert second.seconds["reference"] is not None and first.seconds["reference"] is not None
    assert second.seconds["reference"] < first.seconds["reference"]


def test_a_run_spec_layers_budget_variant_and_seed(toy: Any) -> None:
    manifest = toy_manifest(toy)
    searching = next(v for v in variants.VARIANTS if v.name == "relora-per-layer")
    spec = variants.spec_for(manifest, searching, seed=7, output="/tmp/out")
    method = spec.method
    assert method.seed == 7 and method.strategy == "relora"
    assert method.initialization.granularity == "layer"
    assert method.initialization.trials == settings.RELORA_SEARCH["trials"] > 0
    relora = next(v for v in variants.VARIANTS if v.name == "relora")
    assert variants.spec_for(manifest, relora, seed=0, output="o").method.initialization.trials == (
        Initialization().trials
    ), "relora as shipped: the search as spec.method defaults it"
    assert method.finetune.max_steps == variants.COMMON_FINETUNE["maxSteps"]
    assert spec.output.uri == "/tmp/out"
    scratch = next(v for v in variants.VARIANTS if v.name == "scratch")
    assert variants.spec_for(manifest, scratch, seed=0, output="o").method.strategy == "scratch"
    assert settings.merge({"a": {"b": 1, "c": 2}}, {"a": {"b": 3}}) == {"a": {"b": 3, "c": 2}}
    broken = variants.Variant("broken", "x", {"finetune": {"maxSteps": -1}})
    with pytest.raises(BadInput, match="maxSteps"):
        variants.spec_for(manifest, broken, seed=0, output="o")
    with pytest.raises(BadInput, match="unknown"):
        variants.by_name(["nope"], quick=True)
    quick = {v.name for v in variants.by_name(None, quick=True)}
    assert {"scratch", "reuse", "warm-start", "relora"} <= quick
    assert quick < {v.name for v in variants.by_name(None, quick=False)}


def _migrate(toy: Any, tmp_path: Path, name: str, **initialization: Any) -> Any:
    from relora_api import validation

    manifest = toy_manifest(toy)
    manifest["spec"]["output"]["uri"] = str(tmp_path / name)
    manifest["spec"]["method"]["initialization"] = {"trials": 3, **initialization}
    manifest["spec"]["method"]["finetune"]["maxSteps"] = 0
    migration, problems = validation.validate_manifest(manifest)
    assert migration is not None, problems
    spec = migration.spec
    storage = Storage(base_dir=tmp_path)
    bases = loading.load_bases(spec, storage, CPU)
    return migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )


def test_search_objectives_score_the_same_anchor_differently(toy: Any, tmp_path: Path) -> None:
    values = {}
    for objective in ("loss", "choice-loss", "lookahead"):
        report = _migrate(
            toy, tmp_path, objective, objective=objective, lookaheadSteps=3, validationSamples=24
        )
        anchor = report.trials[0]
        assert anchor["params"] == {"alpha": 1.0, "beta": 0.0}
        values[objective] = anchor["value"]
    assert values["choice-loss"] < values["loss"], "choices are fewer than the vocabulary"
    assert values["lookahead"] != pytest.approx(values["choice-loss"]), "it trained first"
    again = _migrate(
        toy, tmp_path, "again", objective="lookahead", lookaheadSteps=3, validationSamples=24
    )
    assert again.trials[0]["value"] == pytest.approx(values["lookahead"], rel=1e-5)
