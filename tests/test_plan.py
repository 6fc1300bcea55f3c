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
from relora_api.spec import Finetune
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


LLAMA_3_1_405B = {
    **LLAMA_3_1_8B,
    "hidden_size": 16384,
    "intermediate_size": 53248,
    "num_hidden_layers": 126,
    "num_attention_heads": 128,
}


def _big_manifest(tmp_path: Path, config: dict[str, Any], **spec: Any) -> dict[str, Any]:
    """A manifest over two bases with ``config`` (config.json only: no weight files), a LoRA
    r16 on q_proj and v_proj and batches of 4; ``spec`` updates its spec."""
    for version in ("v1", "v2"):
        model = tmp_path / "models" / version
        model.mkdir(parents=True)
        (model / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(
        json.dumps({"r": 16, "target_modules": ["q_proj", "v_proj"]})
    )
    (tmp_path / "train.jsonl").write_text('{"prompt": "a", "completion": " b"}\n')
    return {
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
            **spec,
        },
    }


def _big_estimate(tmp_path: Path, manifest: dict[str, Any]) -> tuple[Any, plan.Estimate]:
    migration, problems = validation.validate_manifest(manifest)
    assert migration is not None, problems
    spec = migration.spec
    found = plan.estimate(
        spec, spec.adapters[0], Storage(base_dir=tmp_path), device="cuda", sequence=2048
    )
    return spec, found


def test_an_8b_migration_needs_a_big_gpu_without_checkpointing(tmp_path: Path) -> None:
    """Llama-3.1-8B in bf16, batch 4 x 2048 tokens (torchtune's reference run: 21.3 GB peak
    with checkpointing and a chunked loss): the weights are 15 GiB, the activations without
    checkpointing about 45 GiB (an 80 GiB card); with it the fp32 logits dominate (this trainer
    does not chunk the loss) and a 40 GiB card holds it."""
    manifest = _big_manifest(tmp_path, LLAMA_3_1_8B)
    spec, found = _big_estimate(tmp_path, manifest)
    assert found.precision == "bf16" and found.weights == pytest.approx(14.96, abs=0.05)
    assert found.smallest_gpu() == 80 and found.smallest_gpu(checkpointing=True) == 40
    assert 21.3 / 0.93 < found.peak(checkpointing=True) < 35
    [warning] = plan.warnings_for(spec, found)
    assert "spec.resources.limits.memory 8Gi is below" in warning

    path = tmp_path / "big.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert cli.main(["plan", "-f", str(path), "--seq-len", "2048"]) == 0


def test_workers_share_the_batch_and_its_activations_not_the_base(tmp_path: Path) -> None:
    """Two workers of two GPUs: four processes, each with one of the 4 examples of a step (the
    batch stays batchSize): the activations are a quarter of one process's, the weights, LoRA
    + AdamW, overhead and rank 0's source phase the same."""
    alone = _big_estimate(tmp_path / "alone", _big_manifest(tmp_path / "alone", LLAMA_3_1_8B))[1]
    manifest = _big_manifest(
        tmp_path / "group",
        LLAMA_3_1_8B,
        distributed={"workers": 2},
        output={"uri": "s3://adapters/out"},
    )
    manifest["spec"]["resources"]["limits"]["nvidia.com/gpu"] = 2
    _, group = _big_estimate(tmp_path / "group", manifest)
    assert (alone.processes, alone.batch, alone.share) == (1, 4, 4)
    assert (group.workers, group.processes, group.batch_size, group.share) == (2, 4, 4, 1)
    assert group.batch == 1
    assert group.activations == pytest.approx(alone.activations / 4)
    assert group.checkpointed == pytest.approx(alone.checkpointed / 4)
    for field in ("weights", "lora", "overhead", "source_phase"):
        assert getattr(group, field) == getattr(alone, field), field
    assert alone.source_phase > 0 and group.peak() < alone.peak()
    # A forward pass: the largest share (World.shard), microBatchSize at a time when fewer.
    assert plan.per_pass(Finetune(batch_size=5), 2) == 3
    assert plan.per_pass(Finetune(batch_size=8, micro_batch_size=3), 2) == 3
    assert plan.per_pass(Finetune(batch_size=8, micro_batch_size=3), 4) == 2
    assert plan.per_pass(Finetune(batch_size=2), 4) == 1


def test_the_plan_recommends_one_gpu_per_worker_of_the_smallest_size(tmp_path: Path) -> None:
    """The recommendation is the smallest common GPU that holds one replica (checkpointing
    as the spec lets it turn on), one per worker, the spec's workers; not more workers."""
    manifest = _big_manifest(tmp_path, LLAMA_3_1_8B)
    spec, found = _big_estimate(tmp_path, manifest)
    auto = plan.recommend(spec, found)
    assert (auto.gpu, auto.checkpointing, auto.workers) == (40, True, 1)
    assert auto.peak == found.peak(checkpointing=True)
    assert auto.line().startswith(
        f"task: recommended 1 GPU of 40 GiB per worker, 1 worker (peak {auto.peak:.1f} GiB per "
        "GPU, with gradient checkpointing)"
    )
    tune = spec.method.finetune.model_copy(update={"gradient_checkpointing": "off"})
    off = spec.model_copy(update={"method": spec.method.model_copy(update={"finetune": tune})})
    assert (plan.recommend(off, found).gpu, plan.recommend(off, found).checkpointing) == (
        80,
        False,
    )
    # 64k tokens an example: the activations, not the base, make it fit no GPU; said so.
    storage = Storage(base_dir=tmp_path)
    long = plan.estimate(spec, spec.adapters[0], storage, device="cuda", sequence=65536)
    advice = plan.recommend(spec, long)
    assert advice.gpu is None and advice.replica < 24
    assert "the activations of 4 examples per pass make the gap: lower " in advice.line()


def test_a_base_no_gpu_holds_is_said_plainly_not_spread_over_workers(
    tmp_path: Path, capsys: Any
) -> None:
    """Llama-3.1-405B in bf16 (755 GiB of weights): no common GPU holds a replica, and workers
    would each hold one too: the plan says so, with the largest GPU and the gap."""
    manifest = _big_manifest(
        tmp_path, LLAMA_3_1_405B, distributed={"workers": 8}, output={"uri": "s3://adapters/out"}
    )
    spec, found = _big_estimate(tmp_path, manifest)
    advice = plan.recommend(spec, found)
    assert advice.gpu is None and advice.checkpointing and advice.workers == 8
    assert advice.gap == pytest.approx(found.peak(checkpointing=True) - 141 * 0.95)
    assert advice.gap > 600
    line = advice.line()
    assert line.startswith(
        f"task: does not fit any single GPU today: {advice.peak:.1f} GiB per GPU even with "
        f"gradient checkpointing, {advice.gap:.1f} GiB more than the largest common GPU holds "
        "(141 GiB, 134 usable)"
    )
    assert f"the base's replica alone takes {advice.replica:.1f} GiB" in line
    assert "recommended" not in line
    # Sharded (FSDP2), it fits: the fewest 80 GiB GPUs whose shares of the weights, two layers
    # whole, LoRA + AdamW, checkpointed activations and overhead fit each one.
    assert advice.shards is not None
    assert advice.shards > found.weights / (80 * 0.95), "at least the weights' shares must fit"
    assert f"set spec.distributed.shardBase: true over at least {advice.shards} GPUs" in line
    sharded = dict(manifest, spec={**manifest["spec"], "distributed": {"workers": advice.shards}})
    sharded["spec"]["distributed"]["shardBase"] = True
    # A batch the processes divide, passes of the original batch's 4 examples at most.
    sharded["spec"]["method"] = {"finetune": {"batchSize": advice.shards, "microBatchSize": 4}}
    _, fits = _big_estimate(tmp_path, sharded)
    assert fits.sharded and fits.whole == pytest.approx(found.weights)
    assert fits.smallest_gpu(checkpointing=True) == 80, fits.peak(checkpointing=True)
    fewer = dict(sharded, spec={**sharded["spec"], "distributed": {"workers": advice.shards - 1}})
    fewer["spec"]["distributed"]["shardBase"] = True
    fewer["spec"]["method"] = {"finetune": {"batchSize": advice.shards - 1, "microBatchSize": 4}}
    _, short = _big_estimate(tmp_path, fewer)
    assert short.peak(checkpointing=True) > 80 * 0.95, "one GPU fewer does not fit"

    path = tmp_path / "huge.yaml"
    path.write_text(yaml.safe_dump(manifest))
    assert cli.main(["plan", "-f", str(path), "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert line in out.splitlines()
    assert "task: 8 worker(s) x 1 process(es) (one per GPU) = 8 processes" in out
    # The sharded spec: its world's line, and a GPU recommended for it.
    path.write_text(yaml.safe_dump(sharded))
    assert cli.main(["plan", "-f", str(path), "--seq-len", "2048"]) == 0
    out = capsys.readouterr().out
    assert (
        f"task: {advice.shards} worker(s) x 1 process(es) = {advice.shards} processes sharing "
        f"the base (shardBase): each holds {fits.weights:.1f} of its {fits.whole:.1f} GiB"
    ) in out, out
    assert "task: recommended 1 GPU of 80 GiB per process" in out, out
    assert "with the bases sharded (shardBase)" in out and "whole replica" not in out, out


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
