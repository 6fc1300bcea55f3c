"""`relora plan -f manifest.yaml`: what each adapter's migration needs in memory, before it runs.

From each base's config.json and safetensors headers (no weight is read), the old adapter's
config and the task data's longest example and completion, per adapter:

- ``weights``: the parameters of one base in the load dtype (one base is resident at a time);
- ``lora``: the LoRA parameters with their gradients and AdamW moments, all fp32 (16 bytes each);
- ``activations``: what the backward pass keeps, per layer ``34 * s * b * h`` bytes in 16-bit
  (Korthikanti et al., 2022, without the attention-score term: PyTorch's SDPA does not store
  them), scaled to the activation dtype, for one forward pass of one process (``b``: its
  share of the batch, ``microBatchSize`` examples at a time when that is fewer), plus the fp32
  logits of the columns that predict a completion token (the loss computes no others); with
  gradient checkpointing only each layer's input is kept, and one layer is recomputed at a time;
- ``overhead``: the runtime. On a CPU 1.15 GiB (Python, torch 2.13's CPU build alone is 0.85
  GiB of RSS, transformers, PEFT) plus 18% of the weights (copies while they load): fitted to
  benchmarks/trainer_memory.py's relora runs at two sizes (``tiny``: 1.16 GiB with no weights to
  speak of; ``1b``: 5.30 GiB with 3.47 GiB of weights), then checked on a third, real model
  (``smollm2``: estimated 1.9 GiB, measured 1.68). On a GPU 1 GiB (CUDA context) plus 5% of the
  weights (allocator slack): not measured yet (no GPU was lent).

The peak is the larger of the source phase (weights + inference activations, when a relative
readiness target needs the old base) and the target phase (weights + LoRA + training
activations). The smallest common GPU that holds it is named with and without checkpointing.

Several GPUs (``spec.distributed``: workers x GPUs per worker, one process per GPU) are
data-parallel: every process holds a whole replica of the base (unless ``shardBase``), so the
weights, LoRA + AdamW and the overhead are the same on every GPU; only the activations shrink,
since each process takes its share of every batch (the batch stays ``batchSize`` examples a
step; the shares differ by at most one, so the largest, ``ceil(batchSize / processes)``,
counts). The source phase is rank 0's alone and unchanged. Hence :func:`recommend`: the smallest
common GPU that holds one replica, one per worker, and no worker count that would not help.

With ``spec.distributed.shardBase`` (FSDP2) each of the P processes holds 1/P of the weights at
rest, plus one decoder layer whole while it computes and the next one gathered ahead: weights /
P + 2 layers' worth (and its overhead share on that); the source phase is sharded alike and every
process evaluates whole batches (all run every forward pass together). A base no single GPU
holds gets the number of processes that makes it fit (:func:`shards_needed`).
"""

from __future__ import annotations

import json
import math
import re
import sys
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from relora_api.spec import Adapter, AdapterMigrationSpec, Finetune
from relora_trainer import adapters, models
from relora_trainer.errors import MissingInput, OutOfMemory
from relora_trainer.storage import Storage

GIB = 2**30
GPUS_GIB = (24, 40, 48, 80, 141)
"""Common GPU memory sizes: RTX 4090 / A6000-class, A100 40 and 80 GB, L40S, H100, H200."""
OVERHEAD = {"cuda": (1.0, 0.05), "cpu": (1.15, 0.18)}
"""Runtime overhead by device: (GiB, share of the weights); see the module's docstring."""
_BYTES = {"bf16": 2, "fp16": 2, "fp32": 4}
USABLE = 0.95
"""The share of a GPU's memory a plan may fill (the rest: fragmentation, other allocations)."""


@dataclass(frozen=True)
class Estimate:
    adapter: str
    device: str
    precision: str
    parameters: int
    lora_parameters: int
    batch: int  # examples per forward pass of one process
    sequence: int
    weights: float  # GiB
    lora: float
    activations: float
    checkpointed: float
    overhead: float
    source_phase: float
    workers: int = 1  # worker pods (spec.distributed.workers)
    processes: int = 1  # data-parallel processes in all: workers x GPUs per worker
    batch_size: int = 1  # examples per step, over all processes (spec's batchSize)
    sharded: bool = False  # spec.distributed.shardBase: ``weights`` is one process's share
    whole: float = 0.0  # GiB: the whole base's weights (``weights`` when not sharded)
    layers: int = 1

    @property
    def share(self) -> int:
        """Examples of a step on one process: the largest of the shares (World.shard)."""
        return -(-self.batch_size // self.processes)

    def peak(self, *, checkpointing: bool = False) -> float:
        training = self.activations if not checkpointing else self.checkpointed
        target = self.weights + self.lora + training + self.overhead
        return max(self.source_phase, target)

    def smallest_gpu(self, *, checkpointing: bool = False) -> int | None:
        need = self.peak(checkpointing=checkpointing)
        return next((size for size in GPUS_GIB if need <= size * USABLE), None)


def _config(folder: Path, what: str) -> dict[str, Any]:
    path = folder / "config.json"
    if not path.is_file():
        raise MissingInput(f"{what}: {folder} has no config.json")
    loaded: dict[str, Any] = json.loads(path.read_text())
    text: dict[str, Any] = loaded.get("text_config", loaded)
    return text


def _count(config: dict[str, Any]) -> tuple[int, dict[str, tuple[int, int]], int]:
    """Parameters of a decoder-only transformer from its config (Llama, Mistral, Qwen2...), the
    (in, out) of each projection, and the number of layers."""
    h = int(config["hidden_size"])
    layers = int(config["num_hidden_layers"])
    heads = int(config["num_attention_heads"])
    kv = int(config.get("num_key_value_heads") or heads)
    head_dim = int(config.get("head_dim") or h // heads)
    inter = int(config["intermediate_size"])
    vocab = int(config["vocab_size"])
    dims = {
        "q_proj": (h, heads * head_dim),
        "k_proj": (h, kv * head_dim),
        "v_proj": (h, kv * head_dim),
        "o_proj": (heads * head_dim, h),
        "gate_proj": (h, inter),
        "up_proj": (h, inter),
        "down_proj": (inter, h),
    }
    per_layer = sum(i * o for i, o in dims.values()) + 2 * h
    embeddings = vocab * h * (1 if config.get("tie_word_embeddings") else 2)
    return layers * per_layer + embeddings + h, dims, layers


def _targeted(module: str, targets: list[str] | str) -> bool:
    """PEFT's rule: a list matches a module by its name's tail, a string as a full regex."""
    if targets == "all-linear":
        return True
    if isinstance(targets, str):
        return re.fullmatch(targets, module) is not None
    return any(module == t or module.endswith(f".{t}") for t in targets)


def _lora_parameters(
    shapes: dict[str, tuple[int, ...]],
    dims: dict[str, tuple[int, int]],
    layers: int,
    *,
    targets: list[str] | str,
    rank: int,
    rank_pattern: dict[str, int] | None = None,
    dora: bool = False,
    saved: list[str] | None = None,
    vocab: int = 0,
    hidden: int = 0,
) -> int:
    """The adapter's trainable parameters: r * (in + out) for every adapted weight at its own
    rank (rank_pattern), out more for DoRA's magnitude, and the whole of every modules_to_save
    module (from the file headers when there are some; a tied lm_head from the config)."""

    def one(module: str, out_features: int, in_features: int) -> int:
        r = int(adapters.pattern_value(rank_pattern, module, rank))
        return r * (in_features + out_features) + (out_features if dora else 0)

    if shapes:
        lora = sum(
            one(key.removesuffix(".weight"), shape[0], shape[1])
            for key, shape in shapes.items()
            if len(shape) == 2
            and key.endswith(".weight")
            and "embed" not in key
            and not key.startswith("lm_head")
            and _targeted(key.removesuffix(".weight"), targets)
        )
        lora += sum(
            math.prod(shape)
            for key, shape in shapes.items()
            if any(adapters.part_of(key, m) for m in saved or [])
        )
        if "lm_head" in (saved or []) and "lm_head.weight" not in shapes:
            lora += vocab * hidden  # tied to the embeddings: not in the files
        return lora
    chosen = {k: v for k, v in dims.items() if _targeted(k, targets)}
    lora = layers * sum(one(k, o, i) for k, (i, o) in chosen.items())
    return lora + (vocab * hidden if "lm_head" in (saved or []) else 0)


def _lengths(adapter: Adapter, storage: Storage, tokenizer: Any) -> tuple[int, int]:
    """The longest prompt + completion of the training data, and the longest completion, in
    tokens."""
    where = f"spec.adapters[{adapter.name}].data.train"
    path = storage.fetch(adapter.data.train, what=where)
    longest, completion = 1, 1
    with path.open(encoding="utf-8") as handle:
        for line in handle:
            if line.strip():
                row = json.loads(line)
                ids = tokenizer(str(row.get("completion", "")))["input_ids"]
                prompt = tokenizer(str(row.get("prompt", "")))["input_ids"]
                longest = max(longest, len(prompt) + len(ids) + 1)
                completion = max(completion, len(ids))
    return longest, completion


def estimate(
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    storage: Storage,
    *,
    device: str,
    sequence: int | None = None,
    completion: int | None = None,
) -> Estimate:
    """The memory estimate of one adapter's migration on ``device`` (``cpu`` or ``cuda``).
    ``sequence`` and ``completion`` (tokens) default to the training data's longest; a given
    ``sequence`` without ``completion`` counts every token as completion (the worst case)."""
    target_dir = storage.fetch(
        spec.target_model.uri, what="spec.targetModel", revision=spec.target_model.revision
    )
    config = _config(target_dir, "spec.targetModel")
    shapes = models.Shape.of_files(target_dir, what="spec.targetModel").shapes
    counted, dims, layers = _count(config)
    parameters = sum(math.prod(s) for s in shapes.values()) if shapes else counted
    if shapes and not config.get("tie_word_embeddings") and "lm_head.weight" not in shapes:
        parameters += int(config["vocab_size"]) * int(config["hidden_size"])
    where = f"spec.adapters[{adapter.name}].uri"
    adapter_config = json.loads(
        (storage.fetch(adapter.uri, what=where) / "adapter_config.json").read_text()
    )
    rank = spec.method.rank or int(adapter_config["r"])
    lora = _lora_parameters(
        shapes,
        dims,
        layers,
        targets=adapter_config.get("target_modules") or [],
        rank=rank,
        rank_pattern=None if spec.method.rank else adapter_config.get("rank_pattern"),
        dora=bool(adapter_config.get("use_dora")),
        saved=adapter_config.get("modules_to_save"),
        vocab=int(config["vocab_size"]),
        hidden=int(config["hidden_size"]),
    )
    if spec.method.precision == "auto":
        precision = "bf16" if device == "cuda" else "fp32"
    else:
        precision = spec.method.precision
    size = _BYTES[precision]
    if sequence is None:
        sequence, longest = _lengths(adapter, storage, models.load_tokenizer(target_dir))
        completion = completion or longest
    completion = min(completion or sequence, sequence)
    tune = spec.method.finetune
    processes = spec.workers * spec.processes_per_worker
    batch = per_pass(tune, processes)
    h, vocab = int(config["hidden_size"]), int(config["vocab_size"])
    tokens = batch * sequence
    per_layer = 34 * tokens * h * size / 2
    # Logits only where a completion token is predicted (the union of the right-padded rows'
    # columns), in fp32 with their softmax and gradient.
    columns = min(sequence, batch * completion)
    logits = 3 * batch * columns * vocab * 4
    activations = (layers * per_layer + logits) / GIB
    checkpointed = (layers * tokens * h * size + per_layer + logits) / GIB
    whole = parameters * size / GIB
    sharded = spec.shards_base
    weights = sharded_weights(whole, processes, layers) if sharded else whole
    # Rank 0 measures the references alone, on whole (micro-)batches: not a share.
    alone = per_pass(tune, 1)
    alone_columns = min(sequence, alone * completion)
    evaluation = (4 * alone * sequence * h * size + alone * alone_columns * vocab * 4) / GIB
    fixed, share = OVERHEAD["cuda" if device == "cuda" else "cpu"]
    overhead = fixed + share * weights
    return Estimate(
        adapter=adapter.name,
        device=device,
        precision=precision,
        parameters=parameters,
        lora_parameters=lora,
        batch=batch,
        sequence=sequence,
        weights=weights,
        lora=lora * 16 / GIB,
        activations=activations,
        checkpointed=checkpointed,
        overhead=overhead,
        source_phase=(weights + evaluation + overhead) if adapter.readiness.needs_source else 0.0,
        workers=spec.workers,
        processes=processes,
        batch_size=tune.batch_size,
        sharded=sharded,
        whole=whole,
        layers=max(layers, 1),
    )


def sharded_weights(whole: float, processes: int, layers: int) -> float:
    """GiB of a base's weights on one of ``processes`` that shard it (FSDP2): its share, plus
    the layer computing and the next gathered ahead, whole."""
    return whole / processes + 2 * whole / max(layers, 1)


def shards_needed(found: Estimate, gpu: int) -> int | None:
    """The fewest processes (at most 64) over which the base, sharded, fits GPUs of ``gpu``
    GiB with checkpointing (None: none does)."""
    fixed, share = OVERHEAD["cuda"]
    evaluation = found.source_phase - found.weights - found.overhead  # of the source phase
    for processes in range(2, 65):
        weights = sharded_weights(found.whole or found.weights, processes, found.layers)
        overhead = fixed + share * weights
        source = weights + evaluation + overhead if found.source_phase else 0.0
        sharded = replace(found, weights=weights, overhead=overhead, source_phase=source)
        if sharded.peak(checkpointing=True) <= gpu * USABLE:
            return processes
    return None


def per_pass(tune: Finetune, processes: int) -> int:
    """Examples in one forward pass of one of ``processes`` data-parallel processes: its share
    of the batch (the largest: ``ceil(batchSize / processes)``), ``microBatchSize`` at a time
    when that is fewer (finetune.train_step shards the batch, then MicroBatch splits the share)."""
    share = -(-tune.batch_size // processes)
    return min(tune.micro_batch_size or tune.batch_size, share)


@dataclass(frozen=True)
class Recommendation:
    """The GPUs relora plan recommends for one adapter: ``workers`` workers of one ``gpu`` GiB
    GPU each (None: no common GPU holds one replica, ``gap`` GiB beyond the largest's usable
    memory). Workers do not lower the weights' memory per GPU (data-parallel replicas), so the
    recommendation is the smallest GPU that holds one replica, never more workers to fit."""

    adapter: str
    gpu: int | None
    peak: float  # GiB per GPU
    checkpointing: bool  # the peak is the one with gradient checkpointing
    workers: int
    gap: float = 0.0
    replica: float = 0.0  # GiB without training activations: weights, LoRA + AdamW, overhead
    batch: int = 1  # examples per forward pass of one process
    shards: int | None = None  # processes that fit it on 80 GiB GPUs with shardBase (not set)
    sharded: bool = False  # the spec shards the base: each GPU holds a share of the weights

    def line(self) -> str:
        ckpt = ", with gradient checkpointing" if self.checkpointing else ""
        if self.gpu is None:
            largest = GPUS_GIB[-1]
            text = (
                f"{self.adapter}: does not fit any single GPU today: {self.peak:.1f} GiB per GPU"
                f"{' even with gradient checkpointing' if self.checkpointing else ''}, "
                f"{self.gap:.1f} GiB more than the largest common GPU holds ({largest} GiB, "
                f"{largest * USABLE:.0f} usable); "
            )
            if self.replica > largest * USABLE:
                return text + (
                    f"the base's replica alone takes {self.replica:.1f} GiB; "
                    + _sharding_advice(self.shards)
                )
            return text + (
                f"the activations of {self.batch} examples per pass make the gap: lower "
                "spec.method.finetune.microBatchSize (more workers also split each batch; each "
                "holds a whole replica of the base)"
            )
        plural = "s" if self.workers > 1 else ""
        if self.sharded:
            return (
                f"{self.adapter}: recommended 1 GPU of {self.gpu} GiB per process, "
                f"{self.workers} worker{plural} (peak {self.peak:.1f} GiB per GPU{ckpt}) with "
                "the bases sharded (shardBase): each GPU holds its share of the weights, so "
                "fewer processes raise the peak"
            )
        return (
            f"{self.adapter}: recommended 1 GPU of {self.gpu} GiB per worker, {self.workers} "
            f"worker{plural} (peak {self.peak:.1f} GiB per GPU{ckpt}); more workers shorten the "
            "fine-tuning and shrink only the activations per GPU (as microBatchSize does on one "
            "GPU): each holds a whole replica of the base"
        )


def recommend(spec: AdapterMigrationSpec, found: Estimate) -> Recommendation:
    """Workers and GPUs for ``found`` (an estimate for the spec's world): the smallest common GPU
    that holds one replica's peak, with gradient checkpointing where the spec lets it turn on
    (``auto`` turns it on where the peak without it does not fit), one per worker, as many
    workers as the spec asks (memory needs no more than one)."""
    mode = spec.method.finetune.gradient_checkpointing
    without, with_it = found.smallest_gpu(), found.smallest_gpu(checkpointing=True)
    if mode == "off":
        checkpointing, gpu = False, without
    elif mode == "on":
        checkpointing, gpu = True, with_it
    else:
        checkpointing, gpu = with_it != without or with_it is None, with_it
    peak = found.peak(checkpointing=checkpointing)
    gap = 0.0 if gpu is not None else peak - GPUS_GIB[-1] * USABLE
    replica = found.weights + found.lora + found.overhead
    shards = shards_needed(found, SHARDED_GPU) if gpu is None and not found.sharded else None
    return Recommendation(
        found.adapter,
        gpu,
        peak,
        checkpointing,
        found.workers,
        gap,
        replica,
        found.batch,
        shards,
        found.sharded,
    )


SHARDED_GPU = 80
"""The GPU (GiB) a base too large for any one is planned over when sharded (the common one)."""


def _sharding_advice(shards: int | None) -> str:
    if shards is None:
        return (
            "more workers or GPUs do not help as replicas, and even sharded over 64 processes "
            f"(spec.distributed.shardBase) it does not fit {SHARDED_GPU} GiB GPUs"
        )
    return (
        f"set spec.distributed.shardBase: true over at least {shards} GPUs of {SHARDED_GPU} GiB "
        "(workers x GPUs per worker; batchSize a multiple of their number): each holds its "
        "share of the weights"
    )


def world_line(found: Estimate) -> str | None:
    """What several processes change for ``found`` (None: one process)."""
    if found.processes == 1:
        return None
    each = found.processes // found.workers
    if found.sharded:
        return (
            f"{found.adapter}: {found.workers} worker(s) x {each} process(es) = "
            f"{found.processes} processes sharing the base (shardBase): each holds "
            f"{found.weights:.1f} of its {found.whole:.1f} GiB of weights (its share plus two "
            f"layers whole while they compute) and takes {found.share} of the {found.batch_size} "
            "examples of a step; every process runs each evaluation whole, in step"
        )
    return (
        f"{found.adapter}: {found.workers} worker(s) x {each} process(es) (one per GPU) = "
        f"{found.processes} processes: the batch stays {found.batch_size} examples a step "
        f"(spec batchSize), each process takes at most {found.share} of them, {found.batch} per "
        "forward pass, and keeps their activations only; the weights, LoRA + AdamW and overhead "
        "are the same on every GPU (a whole replica each), so the peak is each GPU's"
    )


def warnings_for(spec: AdapterMigrationSpec, found: Estimate) -> list[str]:
    """What the spec's resources cannot hold (host memory: a base is loaded through it)."""
    problems = []
    limits = (spec.resources.limits or {}) if spec.resources else {}
    memory = limits.get("memory")
    if memory is not None:
        from kubernetes.utils import parse_quantity

        host = float(parse_quantity(memory)) / GIB
        need = found.weights + found.overhead
        if found.device == "cpu":
            need = found.peak()
        if host < need:
            problems.append(
                f"{found.adapter}: spec.resources.limits.memory {memory} is below the "
                f"{need:.1f} GiB a base takes while it loads; raise it"
            )
    if found.device == "cuda" and found.smallest_gpu(checkpointing=True) is None:
        problems.append(
            f"{found.adapter}: {found.peak(checkpointing=True):.0f} GiB does not fit one "
            f"{GPUS_GIB[-1]} GiB GPU even with checkpointing: set "
            "spec.method.finetune.microBatchSize (or lower batchSize), or "
            + _sharding_advice(None if found.sharded else shards_needed(found, SHARDED_GPU))
        )
    return problems


def run(
    path: str, *, device: str, sequence: int | None = None, completion: int | None = None
) -> int:
    """`relora plan`: print each adapter's estimate; the exit code of the other commands."""
    from rich.console import Console
    from rich.table import Table

    from relora_api import manifests
    from relora_trainer import errors, local_run
    from relora_trainer.local_run import quiet_libraries

    quiet_libraries()
    try:
        migration = local_run.load_manifest(path)
        storage = Storage.for_manifest(path)
        found = [
            estimate(
                migration.spec, a, storage, device=device, sequence=sequence, completion=completion
            )
            for a in migration.spec.adapters
        ]
    except (manifests.ManifestError, errors.BadInput) as error:
        return errors.refuse(error)
    table = Table(title=f"Memory plan on {device} (GiB per process; one base resident at a time)")
    for column in ("adapter", "precision", "parameters", "LoRA", "pass x seq", "weights"):
        table.add_column(column)
    for column in ("LoRA+AdamW", "activations", "peak", "GPU", "peak (ckpt)", "GPU (ckpt)"):
        table.add_column(column, justify="right")
    problems = []
    for e in found:
        gpu, gpu_ckpt = e.smallest_gpu(), e.smallest_gpu(checkpointing=True)
        table.add_row(
            e.adapter,
            e.precision,
            f"{e.parameters / 1e9:.2f}B",
            f"{e.lora_parameters / 1e6:.1f}M",
            f"{e.batch} x {e.sequence}",
            f"{e.weights:.1f}",
            f"{e.lora:.2f}",
            f"{e.activations:.1f}",
            f"{e.peak():.1f}",
            f"{gpu} GiB" if gpu else "none",
            f"{e.peak(checkpointing=True):.1f}",
            f"{gpu_ckpt} GiB" if gpu_ckpt else "none",
        )
        problems += warnings_for(migration.spec, e)
    Console(width=160).print(table)
    for e in found:
        lines = [world_line(e), recommend(migration.spec, e).line() if device == "cuda" else None]
        for line in lines:
            if line is not None:
                print(line)
    print(
        "Several GPUs (spec.distributed) do not lower the weights' memory per GPU unless "
        "shardBase is set: each worker holds the whole base and fine-tunes its share of every "
        "batch, so only the activations shrink; more GPUs shorten the fine-tuning. With "
        "shardBase each GPU holds its share of the weights (FSDP2)."
    )
    for problem in problems:
        print(f"warning: {problem}", file=sys.stderr)
    return errors.EXIT_OK


def out_of_memory(
    error: BaseException,
    spec: AdapterMigrationSpec,
    adapter: Adapter,
    storage: Storage,
    device: str,
) -> OutOfMemory:
    """The OutOfMemory a migration that ran out of memory reports: what ran out, the plan's
    estimate and what to change (a retry on the same machine would run out again)."""
    first = (str(error).strip().splitlines() or [type(error).__name__])[0][:200]
    try:
        found = estimate(spec, adapter, storage, device="cuda" if device == "cuda" else "cpu")
    except Exception:  # the estimate is a courtesy: the reason stands without it
        return OutOfMemory(
            f"{adapter.name}: ran out of {device} memory ({first}); set "
            "spec.method.finetune.microBatchSize (or lower batchSize) or give the trainer more "
            "memory"
        )
    fits = found.smallest_gpu(checkpointing=False)
    where = f"a {fits} GiB GPU holds it" if fits else "no single common GPU holds it"
    return OutOfMemory(
        f"{adapter.name}: ran out of {device} memory ({first}); relora plan estimates "
        f"{found.peak():.1f} GiB ({found.weights:.1f} GiB of weights in {found.precision}, "
        f"{found.activations:.1f} GiB of activations at {found.batch} examples per pass x "
        f"{found.sequence} tokens; {where}): set spec.method.finetune.microBatchSize (or lower "
        "batchSize), set spec.method.precision to bf16 on a GPU, or schedule the trainer on a "
        "larger device"
    )
