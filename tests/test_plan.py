"""`relora plan`: parameter counts exact where they can be, the memory model, the warnings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM

import relora_cli as cli
from relora_api import validation
from relora_trainer import plan
from relora_trainer.storage import Storage
from tests.conftest import toy_manifest

LLAMA_3_1_8B = {
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_parameters_of_a_known_model_from_its_config() -> None:
    parameters, dims, layers = plan._count(LLAMA_3_1_8B)
    assert parameters == pytest.approx(8.03e9, rel=0.002)  # Llama-3.1-8B: 8,030,261,248
    assert dims["k_proj"] == (4096, 1024) and layers == 32
    lora = plan._lora_parameters({}, dims, layers, targets=["q_proj", "v_proj"], rank=16)
    assert lora == 32 * 16 * ((4096 + 4096) + (4096 + 1024))


def test_the_toy_world_counts_equal_the_models(toy: Any, tmp_path: Path) -> None:
    """From the safetensors headers: the model's own parameter count and PEFT's LoRA count."""
    manifest = toy_manifest(toy)
    migration, _ = validation.validate_manifest(manifest)
    assert migration is not None
    spec = migration.spec
    found = plan.estimate(spec, spec.adapters[0], Storage(base_dir=tmp_path), device="cpu")
    model = AutoModelForCausalLM.from_pretrained(toy.v2)
    assert found.parameters == sum(p.numel() for p in model.parameters())
    old = json.loads((toy.adapter / "adapter_config.json").read_text())
    peft_model = get_peft_model(model, LoraConfig(r=old["r"], target_modules=old["target_modules"]))
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert found.lora_parameters == trainable
    assert found.precision == "fp32" and found.sequence > 3
    assert found.peak() >= found.weights + found.lora + found.overhead
    assert found.peak(checkpointing=True) <= found.peak()


def test_an_8b_migration_needs_a_big_gpu_without_checkpointing(tmp_path: Path) -> None:
    """Llama-3.1-8B in bf16, batch 4 x 2048 tokens (torchtune's reference run: 21.3 GB peak
    with checkpointing and a chunked loss): the weights are 15 GiB, the activations without
    checkpointing about 45 GiB (an 80 GiB card); with it the fp32 logits dominate (this trainer
    does not chunk the loss) and a 40 GiB card holds it."""
    model = tmp_path / "models" / "v2"
    model.mkdir(parents=True)
    (model / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    (tmp_path / "models" / "v1").mkdir()
    (tmp_path / "models" / "v1" / "config.json").write_text(json.dumps(LLAMA_3_1_8B))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"]})
    )
    manifest = {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": "big"},
        "spec": {
            "sourceModel": {"uri": "models/v1"},
            "targetModel": {"uri": "models/v2"},
            "adapters": [
                {
                    "name": "task",
                    "uri": "adapter",
                    "data": {"train": "train.jsonl", "validation": "validation.jsonl"},
                }
            ],
            "output": {"uri": "out"},
            "resources": {"limits": {"memory": "8Gi", "nvidia.com/gpu": 1}},
            "method": {"finetune": {"batchSize": 4}},
        },
    }
    migration, problems = validation.validate_manifest(manifest)
    assert migration is not None, problems
    spec = migration.spec
    found = plan.estimate(
        spec, spec.adapters[0], Storage(base_dir=tmp_path), device="cuda", sequence=2048
    )
    assert found.precision == "bf16" and found.weights == pytest.approx(14.96, abs=0.05)
    assert found.smallest_gpu() == 80 and found.smallest_gpu(checkpointing=True) == 40
    assert 21.3 / 0.93 < found.peak(checkpointing=True) < 35
    [warning] = plan.warnings_for(spec, found)
    assert "spec.resources.limits.memory 8Gi is below" in warning

    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(manifest))
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    assert cli.main(["plan", "-f", str(path), "--seq-len", "2048"]) == 0


def test_plan_on_a_missing_model_is_bad_input(tmp_path: Path, capsys: Any) -> None:
    manifest = {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": "gone"},
        "spec": {
            "sourceModel": {"uri": "v1"},
            "targetModel": {"uri": "v2"},
            "adapters": [
                {"name": "t", "uri": "a", "data": {"train": "t.jsonl", "validation": "v.jsonl"}}
            ],
            "output": {"uri": "out"},
        },
    }
    path = tmp_path / "gone.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert cli.main(["plan", "-f", str(path)]) == 3
    assert "MissingInput: spec.targetModel" in capsys.readouterr().err


def test_running_out_of_memory_is_a_clear_reason_not_a_retry(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: Any
) -> None:
    """An OOM in the fine-tuning: exit 3 (the same pod would run out again) with the reason
    OutOfMemory, the plan's estimate and what to change, in one line."""
    import torch

    from relora_trainer import local_run, migrate

    def out_of_memory(**kwargs: Any) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(migrate, "finetune", out_of_memory)
    manifest = toy_manifest(toy, strategy="warm-start")
    manifest["spec"]["output"]["uri"] = str(tmp_path / "out")
    path = tmp_path / "m.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert local_run.run(str(path), quiet=True, device="cpu") == 3
    [line] = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
    assert line.startswith(
        "error: OutOfMemory: toy-category: ran out of cpu memory (CUDA out of memory. Tried to "
        "allocate 2.00 GiB); relora plan estimates "
    )
    assert "set spec.method.finetune.microBatchSize (or lower batchSize)" in line


def test_logits_follow_the_completion_and_activations_the_micro_batch(
    toy: Any, tmp_path: Path
) -> None:
    """Only the columns that predict a completion token get logits (the loss computes no
    others), and a micro-batch holds the activations of its own examples only."""
    migration, _ = validation.validate_manifest(toy_manifest(toy))
    assert migration is not None
    spec, storage = migration.spec, Storage(base_dir=tmp_path)
    adapter = spec.adapters[0]

    def found(**kw: Any) -> plan.Estimate:
        return plan.estimate(spec, adapter, storage, device="cpu", sequence=512, **kw)

    short, everything = found(completion=2), found()
    assert everything.sequence == short.sequence == 512
    assert short.activations < everything.activations
    vocabulary = json.loads((toy.v2 / "config.json").read_text())["vocab_size"]
    batch = spec.method.finetune.batch_size
    saved = 3 * batch * (512 - batch * 2) * vocabulary * 4 / plan.GIB
    assert everything.activations - short.activations == pytest.approx(saved)

    tune = spec.method.finetune.model_copy(update={"micro_batch_size": 2})
    spec_micro = spec.model_copy(
        update={"method": spec.method.model_copy(update={"finetune": tune})}
    )
    micro = plan.estimate(spec_micro, adapter, storage, device="cpu", sequence=512)
    assert micro.batch == 2 and micro.activations == pytest.approx(
        everything.activations * 2 / batch
    )
    from_data = plan.estimate(spec, adapter, storage, device="cpu")
    assert from_data.sequence < 512 and from_data.activations < short.activations


def test_the_plan_says_what_several_gpus_change(toy: Any, tmp_path: Path, capsys: Any) -> None:
    """relora plan prints the table and that workers share the batches, not the base."""
    path = tmp_path / "migration.yaml"
    path.write_text(yaml.safe_dump(toy_manifest(toy)))
    assert plan.run(str(path), device="cpu") == 0
    out = capsys.readouterr().out
    assert "Memory plan on cpu" in out and "toy-category" in out
    assert "each worker holds the whole base" in out
