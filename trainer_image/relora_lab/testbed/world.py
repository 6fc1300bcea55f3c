"""`relora testbed build`: a real pair of model versions, a task and a trained adapter.

v1 is a tiny Llama pretrained on Jane Austen's novels; v2 is v1 continued on the King James
Bible with Austen replay (a vendor-style update), at two severities. The task (WordNet gloss ->
category) is learnt by a LoRA adapter on v1 with the project's own ``finetune()``. With
``model`` a real model is v1 instead (a Hugging Face folder or a GGUF, see
``relora_lab.pretrained``; its tokenizer is used): the ``smollm2`` world is one.

Layout under ``out`` (what the written manifests point at, relative to their folder)::

    models/v1  models/v2-mild  models/v2-severe     Hugging Face folders with the tokenizer
    adapters/wordnet-category                      PEFT LoRA adapter trained on v1
    data/wordnet-category/{train,validation,test}.jsonl
    migration-mild.yaml  migration-severe.yaml     AdapterMigration examples (`relora run -f`)
    testbed.json                                   parameters and measured figures
    .stages/<stage>.json                           cache markers

Every stage is a pure function of its parameters (and the seed); a stage whose marker holds the
same parameters is skipped, so a second build returns at once and a changed parameter redoes
exactly the stages downstream of it. The pieces: parameters in ``config``, the layout in
``layout``, the markers in ``cache``, the shared state in ``builder``, the stages in ``stages``,
the manifests in ``manifests``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from relora_lab.testbed import corpora, task
from relora_lab.testbed.builder import WorldBuilder
from relora_lab.testbed.cache import jsonable
from relora_lab.testbed.config import BuildConfig
from relora_lab.testbed.layout import TestbedPaths
from relora_lab.testbed.manifests import write_manifests
from relora_lab.testbed.stages.adapter import adapter_figures, adapter_stage
from relora_lab.testbed.stages.bases import v1_stage, v2_stage
from relora_lab.testbed.stages.splits import task_stage
from relora_lab.testbed.stages.tokenizer import tokenizer_stage
from relora_trainer import models


def build(
    out: Path,
    config: BuildConfig | None = None,
    *,
    cache: Path | None = None,
    device: torch.device | None = None,
    console: Console | None = None,
) -> TestbedPaths:
    """Build (or reuse) the testbed under ``out``; return its paths. ``console=None``: silent."""
    world = WorldBuilder.open(
        out,
        config or BuildConfig(),
        corpora_cache=cache or corpora.data_dir(),
        device=device or models.pick_device("auto"),
        console=console,
    )
    with world.bars:
        figures = _build_stages(world)
    write_manifests(world.paths)
    _write_summary(world, figures)
    return world.paths


def _build_stages(world: WorldBuilder) -> dict[str, Any]:
    """Every stage in order (each skipped if cached); the figures of testbed.json."""
    done = world.cache.done
    figures: dict[str, Any] = {}
    tokenizer, tokenizer_key = tokenizer_stage(world)
    v1_key = v1_stage(world, tokenizer, tokenizer_key)
    figures["v1"] = done("v1", v1_key) or {}
    v2_keys = {}
    for severity in world.config.severities:
        v2_keys[severity.name] = v2_stage(world, severity, tokenizer, v1_key)
        figures[f"v2-{severity.name}"] = done(f"v2-{severity.name}", v2_keys[severity.name])
    task_key = task_stage(world, tokenizer, tokenizer_key)
    figures["task"] = done("task", task_key) or {}
    adapter_key = adapter_stage(world, tokenizer, v1_key, task_key)
    figures["adapter"] = adapter_figures(world, tokenizer, adapter_key, v2_keys)
    for kind in world.config.adapter_kinds:
        adapter_stage(world, tokenizer, v1_key, task_key, kind)
    return figures


def _write_summary(world: WorldBuilder, figures: dict[str, Any]) -> None:
    """testbed.json: the build's parameters, figures and layout."""
    config, paths = world.config, world.paths
    summary = {
        "parameters": jsonable(asdict(config)),
        # Builds are bit-reproducible for a seed at one thread; at several, float sums may run
        # in another order and the models come out (slightly) different.
        "torch_threads": torch.get_num_threads(),
        "figures": figures,
        "layout": {
            "v1": "models/v1",
            **{f"v2-{s.name}": f"models/v2-{s.name}" for s in config.severities},
            "adapter": f"adapters/{task.NAME}",
            **{
                f"adapter-{k}": world.paths.adapter_of(k).relative_to(world.paths.root).as_posix()
                for k in config.adapter_kinds
            },
            "data": f"data/{task.NAME}",
            "manifests": [
                paths.manifest(s.name, k).name
                for s in config.severities
                for k in (None, *config.adapter_kinds)
            ],
        },
    }
    paths.summary.write_text(json.dumps(summary, indent=2) + "\n")
