"""Adapters beyond plain LoRA: DoRA, per-module ranks and alphas, modules_to_save; and the
refusal of every other PEFT type before any model is loaded."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from peft import PeftModel
from safetensors.torch import load_file

from relora_trainer import (
    adapter_config,
    adapters,
    loading,
    local_run,
    models,
    teaching,
)
from relora_trainer.data import Encoder, TaskData, read_jsonl
from relora_trainer.errors import EXIT_BAD_INPUT, EXIT_NOT_READY, EXIT_OK, InvalidAdapter
from relora_trainer.method import fusion, strategies
from relora_trainer.method.quality import measure
from tests.conftest import toy_manifest

CPU = torch.device("cpu")
KINDS: dict[str, dict[str, Any]] = {
    "dora": {"use_dora": True},
    "ranks": {"rank_pattern": {"up_proj": 2, "down_proj": 6}, "alpha_pattern": {"v_proj": 16}},
    "saved": {"modules_to_save": ["lm_head"]},
}
STRATEGIES = ["scratch", "reuse", "warm-start", "relora"]


@pytest.fixture(scope="session")
def kinds(toy: Any) -> dict[str, Path]:
    """The toy task's adapter trained on v1 once per kind (seconds each)."""
    from relora_lab import toyworld

    return {
        kind: toyworld.train_adapter(toy, toy.variant(kind), steps=120, **lora)
        for kind, lora in KINDS.items()
    }


def _run(toy: Any, folder: Path, tmp_path: Path, **method: Any) -> tuple[int, Path]:
    manifest = toy_manifest(toy, **method)
    manifest["spec"]["adapters"][0]["uri"] = str(folder)
    manifest["spec"]["method"]["initialization"]["trials"] = 3
    manifest["spec"]["method"]["finetune"]["maxSteps"] = 20
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return local_run.run(str(path), quiet=True), tmp_path / "output" / "toy-category"


def _quality_with_peft(toy: Any, out: Path, split: str) -> float | None:
    """The output loaded by plain PEFT on the new base, measured like the migration does."""
    base = models.load_model(toy.v2, what="v2", device=CPU)
    model = PeftModel.from_pretrained(base, str(out))
    task = TaskData(
        train=read_jsonl(toy.split("train"), what="train"),
        validation=read_jsonl(toy.split("validation"), what="validation"),
        test=None,
    )
    examples = read_jsonl(toy.split(split), what=split)
    encoder = Encoder(models.load_tokenizer(toy.v2))
    return measure(model, encoder, examples, task.choices, device=CPU).accuracy


@pytest.mark.parametrize("strategy", STRATEGIES)
@pytest.mark.parametrize("kind", list(KINDS))
def test_each_kind_migrates_with_each_strategy_and_peft_reloads_it(
    kind: str, strategy: str, kinds: dict[str, Path], toy: Any, tmp_path: Path
) -> None:
    code, out = _run(toy, kinds[kind], tmp_path, strategy=strategy)
    assert code in (EXIT_OK, EXIT_NOT_READY)
    config = json.loads((out / "adapter_config.json").read_text())
    for key, value in KINDS[kind].items():
        assert config[key] == value, key
    weights = load_file(str(out / "adapter_model.safetensors"))
    magnitudes = [k for k in weights if k.endswith("lora_magnitude_vector")]
    assert bool(magnitudes) is (kind == "dora")
    assert ("base_model.model.lm_head.weight" in weights) is (kind == "saved")
    if kind == "ranks":
        assert weights["base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"].shape[0] == 2
        assert weights["base_model.model.model.layers.1.mlp.down_proj.lora_B.weight"].shape[1] == 6
    report = json.loads((out / "report.json").read_text())
    for split in ("validation", "test"):
        reported = report["quality"]["after"][split]["accuracy"]
        assert _quality_with_peft(toy, out, split) == pytest.approx(reported, abs=1e-6), split


def test_reuse_keeps_the_old_adapter_whole(
    kinds: dict[str, Path], toy: Any, tmp_path: Path
) -> None:
    """reuse writes what PEFT would load: the same factors, magnitudes and saved modules."""
    for kind, folder in kinds.items():
        code, out = _run(toy, folder, tmp_path / kind, strategy="reuse")
        assert code in (EXIT_OK, EXIT_NOT_READY)
        old, new = (load_file(str(f / "adapter_model.safetensors")) for f in (folder, out))
        assert set(old) == set(new), kind
        for key, tensor in old.items():
            if "lora_A" in key or "lora_B" in key:  # re-split: the same product only
                continue
            assert torch.allclose(new[key], tensor, atol=1e-6), key
        for key in (k for k in old if "lora_A" in k):
            b_key = key.replace("lora_A", "lora_B")
            assert torch.allclose(new[b_key] @ new[key], old[b_key] @ old[key], atol=1e-5), key


def test_an_output_rank_replaces_the_rank_pattern(
    kinds: dict[str, Path], toy: Any, tmp_path: Path
) -> None:
    code, out = _run(toy, kinds["ranks"], tmp_path, strategy="warm-start", rank=3)
    assert code in (EXIT_OK, EXIT_NOT_READY)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 3 and config["rank_pattern"] == {}
    assert config["alpha_pattern"] == {"v_proj": 16}
    weights = load_file(str(out / "adapter_model.safetensors"))
    assert {t.shape[0] for k, t in weights.items() if "lora_A" in k} == {3}


def _context(toy: Any, folder: Path, tmp_path: Path) -> strategies.Context:
    base = models.load_model(toy.v2, what="v2", device=CPU)
    old = adapters.read_adapter(folder, what="adapter")
    model = adapters.attach(base, adapters.new_config(old.config, rank=None, base="v2"))
    return strategies.Context(
        model=model,
        old=old,
        layout=adapters.layout(model),
        device=CPU,
        evolution=lambda projection: fusion.Terms(modules={}),
        measure=lambda with_accuracy: pytest.fail("not measured"),
        look_ahead=lambda: None,
        metric="accuracy",
        ready_before=False,
        search=None,  # type: ignore[arg-type]
        seed=0,
        journal=tmp_path / "journal",
        study_name="s",
        on_trial=lambda k, n, v: None,
    )


def test_a_rescaled_magnitude_keeps_the_old_ratio_on_the_new_base(
    kinds: dict[str, Path], toy: Any, tmp_path: Path
) -> None:
    """rescaled: magnitude / ||W_target + start|| equals the old magnitude / ||W_source + old||
    per output feature; kept: the old magnitude itself."""
    context = _context(toy, kinds["dora"], tmp_path)
    old = context.old
    module = "model.layers.0.self_attn.q_proj"
    pair = old.factors[module]
    assert pair.magnitude is not None
    source = models.load_model(toy.v1, what="v1", device=CPU)
    w_source = adapters.base_weight(source, module, fan_in_fan_out=False).detach()
    ratio = pair.magnitude / torch.linalg.vector_norm(
        w_source + old.scale(module) * pair.b @ pair.a, dim=1
    )
    terms = fusion.Terms(
        modules={
            module: fusion.ModuleTerms(
                None, None, old.scale(module) * pair.b @ pair.a, None, ratio=ratio
            )
        }
    )
    layout = {module: context.layout[module]}
    for rule in ("rescaled", "kept"):
        start = fusion.fuse_all(terms, {"all": (0.5, 0.0)}, granularity="global", layout=layout)
        start = strategies.base.with_magnitudes(context, start, terms, rule)
        got = start.factors[module]
        assert got.magnitude is not None
        if rule == "kept":
            assert torch.equal(got.magnitude, pair.magnitude)
            continue
        norm = adapters.dora_norm(context.model, module, got, layout[module][1])
        assert torch.allclose(got.magnitude / norm, ratio, atol=1e-5)
        assert not torch.allclose(got.magnitude, pair.magnitude, atol=1e-3)


def test_a_saved_module_fuses_in_full() -> None:
    """(1, 0) patches the old module's task delta onto the new base; (1, -1) is the old module
    as trained (what PEFT loads); beta scales the base's own change."""
    torch.manual_seed(0)
    w_source, w_target = torch.randn(6, 4), torch.randn(6, 4)
    saved = w_source + 0.1 * torch.randn(6, 4)
    terms = fusion.Terms(
        modules={},
        saved={
            "lm_head.weight": fusion.SavedTerms(
                target=w_target, task=saved - w_source, evolution=w_target - w_source
            )
        },
    )
    assert terms.groups("module-type") == ["lm_head"]

    def start(alpha: float, beta: float) -> torch.Tensor:
        fused = fusion.fuse_all(terms, {"all": (alpha, beta)}, granularity="global", layout={})
        return fused.saved["lm_head.weight"]

    assert torch.allclose(start(1.0, 0.0), w_target + saved - w_source)
    assert torch.allclose(start(1.0, -1.0), saved, atol=1e-6)
    assert torch.allclose(start(0.0, 0.0), w_target)


def test_a_rank_pattern_gives_each_module_its_rank_and_scale(toy: Any, tmp_path: Path) -> None:
    from peft import LoraConfig

    config = LoraConfig(
        r=4,
        lora_alpha=8,
        rank_pattern={"up_proj": 2},
        alpha_pattern={"v_proj": 16},
        use_rslora=False,
    )
    assert adapters.rank_of(config, "model.layers.1.mlp.up_proj") == 2
    assert adapters.rank_of(config, "model.layers.1.mlp.down_proj") == 4
    assert adapters.lora_scale(config, 4, "model.layers.0.self_attn.v_proj") == 4.0
    assert adapters.lora_scale(config, 2, "model.layers.0.mlp.up_proj") == 4.0
    assert adapters.lora_scale(config, 4, "model.layers.0.self_attn.q_proj") == 2.0


def _config_only(tmp_path: Path, config: dict[str, Any]) -> Path:
    folder = tmp_path / "adapter"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / adapter_config.CONFIG_FILE).write_text(json.dumps(config))
    (folder / adapter_config.WEIGHTS_FILE).write_bytes(b"")
    return folder


OTHER_TYPES: list[dict[str, Any]] = [
    {"peft_type": "IA3", "target_modules": ["k_proj", "v_proj", "down_proj"]},
    {"peft_type": "PREFIX_TUNING", "num_virtual_tokens": 20},
    {"peft_type": "PROMPT_TUNING", "num_virtual_tokens": 8},
    {"peft_type": "LOHA", "r": 8, "target_modules": ["q_proj"]},
    {"peft_type": "LOKR", "r": 8, "target_modules": ["q_proj"]},
    {"peft_type": "ADALORA", "r": 8, "target_modules": ["q_proj"]},
    {"r": 8, "target_modules": ["q_proj"]},
]


@pytest.mark.parametrize("config", OTHER_TYPES, ids=lambda c: c.get("peft_type", "none"))
def test_every_other_peft_type_is_refused_naming_it_and_what_works(
    config: dict[str, Any], tmp_path: Path
) -> None:
    folder = _config_only(tmp_path, config)
    with pytest.raises(InvalidAdapter) as raised:
        adapter_config.check_folder(folder, what="spec.adapters[a].uri")
    message = str(raised.value)
    named = config.get("peft_type")
    assert message.startswith("spec.adapters[a].uri: ")
    assert (f"peft_type '{named}'" if named else "no peft_type") in message
    assert "supported: LORA adapters" in message and "DoRA (use_dora)" in message


@pytest.mark.parametrize("config", OTHER_TYPES[:2], ids=lambda c: c["peft_type"])
def test_relora_run_refuses_another_type_before_loading_a_model(
    config: dict[str, Any], toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = _config_only(tmp_path, config)

    def no_loading(*args: Any, **kwargs: Any) -> Any:
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(models, "load_model", no_loading)
    code, _ = _run(toy, folder, tmp_path)
    assert code == EXIT_BAD_INPUT


def test_relora_validate_refuses_an_adapter_it_can_read(toy: Any, tmp_path: Path) -> None:
    manifest = toy_manifest(toy)
    manifest["spec"]["adapters"][0]["uri"] = str(_config_only(tmp_path, OTHER_TYPES[0]))
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(manifest))
    result = subprocess.run(
        [sys.executable, "-m", "relora_cli", "validate", "-f", str(path)],
        capture_output=True,
        text=True,
    )
    assert result.returncode == EXIT_BAD_INPUT, result.stdout
    assert "spec.adapters[toy-category].uri: " in result.stderr
    assert "peft_type 'IA3' cannot be migrated; supported: LORA adapters" in result.stderr
    # The same manifest with the real adapter is valid; a folder this machine lacks is not
    # checked here (the trainer checks it where the folder is).
    for uri in (str(toy.adapter), "/nowhere/adapter"):
        manifest["spec"]["adapters"][0]["uri"] = uri
        path.write_text(yaml.safe_dump(manifest))
        ok = subprocess.run(
            [sys.executable, "-m", "relora_cli", "validate", "-f", str(path)],
            capture_output=True,
            text=True,
        )
        assert ok.returncode == EXIT_OK, ok.stderr


def test_a_tied_saved_module_is_read_from_the_source_files(
    kinds: dict[str, Path], toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The toy's lm_head is tied to its embeddings: its source weight is stored under the
    embeddings' name, read from the files, without loading the source model a second time."""

    def no_reload(self: Any) -> Any:
        raise AssertionError("the source model was loaded again")

    monkeypatch.setattr(loading.Bases, "source", no_reload)
    manifest_method = {"initialization": {"trials": 2, "skipWhenReady": False}}
    code, out = _run(toy, kinds["saved"], tmp_path, strategy="relora", **manifest_method)
    assert code in (EXIT_OK, EXIT_NOT_READY)
    report = json.loads((out / "report.json").read_text())
    assert len(report["trials"]) >= 2


def test_detaching_an_adapter_gives_back_the_base_as_it_was(
    kinds: dict[str, Path], toy: Any
) -> None:
    """PEFT's unload() alone would leave the trained lm_head copy in the base, untied."""
    base = models.load_model(toy.v2, what="v2", device=CPU)
    before = {n: p.detach().clone() for n, p in base.named_parameters()}
    for kind, folder in kinds.items():
        old = adapters.read_adapter(folder, what=kind)
        model = adapters.attach(base, old.config)
        adapters.load_factors(model, old.factors, old.saved)
        assert adapters.detach(model) is base
        after = dict(base.named_parameters())
        assert set(after) == set(before), kind
        for name, tensor in before.items():
            assert torch.equal(after[name], tensor), (kind, name)
        assert base.get_parameter("lm_head.weight") is base.get_parameter(
            "model.embed_tokens.weight"
        ), kind


@pytest.mark.parametrize("kind", list(KINDS))
def test_the_memory_plan_counts_what_peft_trains(
    kind: str, kinds: dict[str, Path], toy: Any, tmp_path: Path
) -> None:
    """relora plan: DoRA's magnitudes, each module's own rank and the saved modules' weights
    are trainable parameters (optimizer state, gradients) like the LoRA factors."""
    from relora_api import validation
    from relora_trainer import plan
    from relora_trainer.storage import Storage

    manifest = toy_manifest(toy)
    manifest["spec"]["adapters"][0]["uri"] = str(kinds[kind])
    migration, _ = validation.validate_manifest(manifest)
    assert migration is not None
    spec = migration.spec
    found = plan.estimate(spec, spec.adapters[0], Storage(base_dir=tmp_path), device="cpu")
    old = adapters.read_adapter(kinds[kind], what=kind)
    config = adapters.new_config(old.config, rank=None, base="v2")  # trainable, as migrated
    model = adapters.attach(models.load_model(toy.v2, what="v2", device=CPU), config)
    assert found.lora_parameters == sum(p.numel() for p in adapters.trainable(model).values())


@pytest.mark.parametrize("kind", list(KINDS))
def test_a_teacher_in_stages_trains_as_the_whole_one_for_each_kind(
    kind: str,
    kinds: dict[str, Path],
    toy: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    teacher_passes: list[int],
) -> None:
    """The teacher's later stages add the old adapter beside the new one in the middle of
    fine-tuning: with DoRA magnitudes, per-module ranks or a saved module too, the run trains
    as one whose teacher was computed whole up front."""
    stages = teacher_passes
    weights = {}
    for name, evaluations in (("whole", 100), ("staged", 2)):
        monkeypatch.setattr(teaching, "FIRST_STAGE_EVALUATIONS", evaluations)
        manifest = toy_manifest(toy, strategy="warm-start")
        manifest["spec"]["adapters"][0]["uri"] = str(kinds[kind])
        manifest["spec"]["adapters"][0]["readiness"] = {"target": 0.999}
        manifest["spec"]["method"]["finetune"].update(
            {"maxSteps": 6, "evalEvery": 1, "batchSize": 4, "distillation": {"emphasis": 2}}
        )
        folder = tmp_path / name
        folder.mkdir()
        (folder / "migration.yaml").write_text(yaml.safe_dump(manifest))
        stages.clear()
        assert local_run.run(str(folder / "migration.yaml"), quiet=True) == EXIT_NOT_READY
        assert len(stages) == (1 if name == "whole" else 3), stages  # steps 2, 4, 6
        weights[name] = load_file(
            str(folder / "output" / "toy-category" / "adapter_model.safetensors")
        )
    assert set(weights["staged"]) == set(weights["whole"])
    for key, value in weights["whole"].items():
        assert torch.allclose(weights["staged"][key], value, atol=1e-5), key
