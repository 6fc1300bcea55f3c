"""One base resident at a time, the base evolution read from files, and the precision switch."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from relora_api import validation
from relora_api.spec import AdapterMigrationSpec
from relora_trainer import loading, migrate, models
from relora_trainer.distributed import World
from relora_trainer.storage import Storage
from tests.conftest import toy_manifest

CPU = torch.device("cpu")


def _spec(toy: Any, tmp_path: Path, **changes: Any) -> AdapterMigrationSpec:
    manifest = toy_manifest(toy, strategy="relora")
    manifest["spec"]["output"]["uri"] = str(tmp_path / "out")
    manifest["spec"]["method"]["initialization"] = {"trials": 2, "validationSamples": 8}
    manifest["spec"]["method"]["finetune"]["maxSteps"] = 4
    for key, value in changes.items():
        if key == "readiness":
            manifest["spec"]["adapters"][0]["readiness"] = value
        else:
            manifest["spec"]["method"][key] = value
    migration, problems = validation.validate_manifest(manifest)
    assert migration is not None, problems
    return migration.spec


class Loads:
    """Which base folders models.load_model was asked for, and whether two were alive at once."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.folders: list[str] = []
        self.alive: list[Any] = []
        self.most = 0
        real = models.load_model

        def load(folder: Path, **kwargs: Any) -> Any:
            import weakref

            model = real(folder, **kwargs)
            self.folders.append(Path(folder).name)
            self.alive = [r for r in self.alive if r() is not None] + [weakref.ref(model)]
            self.most = max(self.most, len(self.alive))
            return model

        monkeypatch.setattr(models, "load_model", load)


def test_the_source_base_is_measured_then_freed_before_the_target_loads(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = Loads(monkeypatch)
    spec = _spec(toy, tmp_path)
    bases = loading.load_bases(spec, Storage(base_dir=tmp_path), CPU)
    assert loads.folders == ["v1", "v2-mild"] and loads.most == 1, "one base resident at a time"
    assert len(bases.on_source) == 1 and bases._source is None

    def no_source() -> None:
        raise AssertionError("the source base was loaded again")

    monkeypatch.setattr(bases, "source", no_source)
    report = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=Storage(base_dir=tmp_path)
    )
    assert report.quality["source"]["validation"]["accuracy"] is not None
    reference = report.seconds["reference"]
    assert reference is not None and reference >= bases.source_seconds > 0


def test_a_retry_reuses_the_saved_source_measurement(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The source phase's measurement is saved in the adapter's state: an attempt that comes
    after one interrupted later (here: the result removed, as if the pod died while saving)
    does not load the old base at all, and reports the same reference. Another spec (other
    work) measures again."""
    storage = Storage(base_dir=tmp_path)
    spec = _spec(toy, tmp_path)
    first = migrate.migrate_adapter(
        spec=spec,
        adapter=spec.adapters[0],
        bases=loading.load_bases(spec, storage, CPU),
        storage=storage,
    )
    out = tmp_path / "out" / "toy-category"
    assert (out / "state" / loading.REFERENCE_FILE).is_file()
    (out / "report.json").unlink()

    loads = Loads(monkeypatch)
    bases = loading.load_bases(spec, storage, CPU)
    assert loads.folders == ["v2-mild"], "the old base is not loaded again"
    second = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    assert second.quality["source"] == first.quality["source"]
    assert second.target == first.target

    other = _spec(toy, tmp_path, seed=1)
    loading.load_bases(other, storage, CPU)
    assert loads.folders == ["v2-mild", "v1", "v2-mild"], "other work: measured again"


def test_an_absolute_target_never_loads_the_source_base(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    loads = Loads(monkeypatch)
    spec = _spec(toy, tmp_path, readiness={"target": 0.5})
    bases = loading.load_bases(spec, Storage(base_dir=tmp_path), CPU)
    report = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=Storage(base_dir=tmp_path)
    )
    assert loads.folders == ["v2-mild"]
    assert "source" not in report.quality and report.quality_of("source") is None
    assert report.coefficients, "the search ran on the evolution read from the files"


class _Fetches(Storage):
    """A Storage that records which bases were fetched."""

    def __init__(self, base_dir: Path) -> None:
        super().__init__(base_dir=base_dir)
        self.fetched: list[str] = []

    def fetch(self, uri: str, *, what: str, revision: str | None = None) -> Path:
        if what.endswith("Model"):  # the bases (adapters and data are fetched too)
            self.fetched.append(what)
        return super().fetch(uri, what=what, revision=revision)


def test_a_worker_other_than_rank_0_never_fetches_the_source_base(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rank 1 of 2 fetches and loads the target alone (a remote source of many GB is not
    downloaded by every worker); rank 0 fetches both. A target without a tokenizer makes the
    follower fetch the source for its tokenizer, nothing more."""
    loads = Loads(monkeypatch)
    spec = _spec(toy, tmp_path)
    follower = _Fetches(tmp_path)
    bases = loading.load_bases(spec, follower, CPU, world=World(rank=1, size=2))
    assert follower.fetched == ["spec.targetModel"] and loads.folders == ["v2-mild"]
    assert bases.source_dir is None and bases.on_source == {}
    with pytest.raises(RuntimeError, match="not fetched by this worker"):
        bases.source_files.get("anything")
    leader = _Fetches(tmp_path)
    loading.load_bases(spec, leader, CPU, world=World(rank=0, size=2))
    assert leader.fetched == ["spec.sourceModel", "spec.targetModel"]

    bare = tmp_path / "v2-no-tokenizer"
    AutoModelForCausalLM.from_pretrained(toy.v2, dtype=torch.float32).save_pretrained(bare)
    target = spec.target_model.model_copy(update={"uri": str(bare)})
    spec = spec.model_copy(update={"target_model": target})
    follower = _Fetches(tmp_path)
    bases = loading.load_bases(spec, follower, CPU, world=World(rank=1, size=2))
    assert follower.fetched == ["spec.targetModel", "spec.sourceModel"]
    assert bases.tokenizer.vocab_size == models.load_tokenizer(toy.v1).vocab_size


def test_the_evolution_from_files_equals_the_one_from_the_models(toy: Any, tmp_path: Path) -> None:
    """Sharded files too (an index and several shards): the same tensors as the model's."""
    source = AutoModelForCausalLM.from_pretrained(toy.v1, dtype=torch.float32)
    sharded = tmp_path / "sharded"
    source.save_pretrained(sharded, max_shard_size="20KB")
    assert (sharded / "model.safetensors.index.json").is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) > 2
    for folder in (toy.v1, sharded):
        files = models.WeightFiles(folder, what="spec.sourceModel")
        for name, parameter in source.named_parameters():
            stored = files.get(name)
            if stored is not None:
                assert torch.equal(stored, parameter.detach()), name
        assert files.get("model.layers.0.self_attn.q_proj.weight") is not None
        assert files.get("no.such.weight") is None
    shape = models.Shape.of_files(sharded, what="spec.sourceModel")
    assert shape.kind == "LlamaForCausalLM" and shape.partial
    models.check_compatible(shape, source)


def test_a_torn_source_file_is_invalid_weights(toy: Any, tmp_path: Path) -> None:
    from relora_trainer.errors import InvalidWeights

    torn = tmp_path / "torn"
    torn.mkdir()
    for file in toy.v1.iterdir():
        (torn / file.name).write_bytes(file.read_bytes())
    weights = torn / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:500])
    with pytest.raises(InvalidWeights, match=r"spec\.sourceModel: a weights file in"):
        models.Shape.of_files(torn, what="spec.sourceModel")


def test_bf16_on_the_cpu_migrates_like_fp32(toy: Any, tmp_path: Path) -> None:
    """The bases in bf16 (as on a GPU), the LoRA weights and the optimizer in fp32: the same
    migration as fp32 within bf16's precision."""
    results = {}
    for precision in ("fp32", "bf16"):
        spec = _spec(toy, tmp_path / precision, precision=precision)
        storage = Storage(base_dir=tmp_path)
        bases = loading.load_bases(spec, storage, CPU)
        assert bases.dtype == models.PRECISIONS[precision]
        assert next(bases.target.parameters()).dtype == models.PRECISIONS[precision]
        results[precision] = migrate.migrate_adapter(
            spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
        )
        out = tmp_path / precision / "out" / "toy-category" / "adapter_model.safetensors"
        with safe_open(str(out), framework="pt") as handle:
            assert {handle.get_tensor(k).dtype for k in handle.keys()} == {torch.float32}  # noqa: SIM118
    fp32, bf16 = results["fp32"].quality, results["bf16"].quality
    for stage in ("source", "before", "after"):
        a, b = fp32[stage]["validation"], bf16[stage]["validation"]
        assert b["loss"] == pytest.approx(a["loss"], rel=0.05), stage
        assert b["accuracy"] == pytest.approx(a["accuracy"], abs=0.06), stage
    assert models.dtype_for("auto", CPU) == torch.float32, "a CPU has no bf16 units"


def test_gradient_checkpointing_trains_the_same_and_is_switched_back(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`gradientCheckpointing: on` recomputes activations (transformers' own switch, spied on)
    and gives the same fine-tuning as off, step for step; the base is left as it was."""
    from transformers import PreTrainedModel

    calls: list[str] = []
    # transformers 5 renamed the switch (the old name warns); older releases have the old one.
    prefix = (
        "activation" if hasattr(PreTrainedModel, "activation_checkpointing_enable") else "gradient"
    )
    enable = getattr(PreTrainedModel, f"{prefix}_checkpointing_enable")
    disable = getattr(PreTrainedModel, f"{prefix}_checkpointing_disable")

    def spy_enable(self: Any, *args: Any, **kwargs: Any) -> None:
        calls.append("on")
        enable(self, *args, **kwargs)

    def spy_disable(self: Any) -> None:
        calls.append("off")
        disable(self)

    monkeypatch.setattr(PreTrainedModel, f"{prefix}_checkpointing_enable", spy_enable)
    monkeypatch.setattr(PreTrainedModel, f"{prefix}_checkpointing_disable", spy_disable)
    histories = {}
    for setting in ("off", "on"):
        manifest_spec = _spec(toy, tmp_path / setting)
        finetune = manifest_spec.method.finetune.model_copy(
            update={"gradient_checkpointing": setting}
        )
        spec = manifest_spec.model_copy(
            update={"method": manifest_spec.method.model_copy(update={"finetune": finetune})}
        )
        storage = Storage(base_dir=tmp_path)
        bases = loading.load_bases(spec, storage, CPU)
        report = migrate.migrate_adapter(
            spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
        )
        histories[setting] = [(h["step"], h["loss"]) for h in report.history]
        assert report.checkpointing is (setting == "on") and report.device_peak_gib is None
        assert not getattr(bases.target, "is_gradient_checkpointing", False)
    assert calls == ["on", "off"]
    assert [s for s, _ in histories["on"]] == [s for s, _ in histories["off"]]
    for (_, on), (_, off) in zip(histories["on"], histories["off"], strict=True):
        assert on == pytest.approx(off, rel=1e-5)


def test_an_old_adapter_already_ready_is_the_start_without_a_search(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """relora when the old adapter on the target base meets the target: no trial, no source
    read for the evolution; ready at step 0 as warm-start would be."""
    loads = Loads(monkeypatch)
    spec = _spec(toy, tmp_path, readiness={"target": 0.01})

    def no_evolution(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("read the base evolution")

    monkeypatch.setattr(migrate, "_terms", no_evolution)
    storage = Storage(base_dir=tmp_path)
    bases = loading.load_bases(spec, storage, CPU)
    report = migrate.migrate_adapter(
        spec=spec, adapter=spec.adapters[0], bases=bases, storage=storage
    )
    assert loads.folders == ["v2-mild"]
    assert report.search_skipped and report.trials == [] and report.ready_step == 0
    assert report.coefficients == {"all": {"alpha": 1.0, "beta": 0.0}}
    summary = (tmp_path / "out" / "toy-category" / "summary.md").read_text()
    assert "No search: the old adapter" in summary
