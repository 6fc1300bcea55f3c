"""Stage ``task``: the task's train / validation / test splits as JSONL."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from transformers import PreTrainedTokenizerBase

from relora_lab.testbed import task
from relora_lab.testbed.builder import WorldBuilder
from relora_lab.testbed.cache import digest
from relora_trainer.data import Example


def task_stage(
    world: WorldBuilder, tokenizer: PreTrainedTokenizerBase, tokenizer_key: dict[str, Any]
) -> dict[str, Any]:
    """The splits under ``data/<task>`` (label words chosen for ``tokenizer``); the stage's key."""
    config, paths = world.config, world.paths
    labels = task.label_words(tokenizer, config.labels)
    params = {
        "tokenizer": digest(tokenizer_key),
        "labels": labels,
        "sizes": asdict(config.sizes),
        "seed": config.seed,
    }
    if world.cache.done("task", params) is not None and all(
        paths.split(s).is_file() for s in ("train", "validation", "test")
    ):
        return params
    splits = task.build_splits(
        world.texts.nouns, labels=labels, seed=config.seed, sizes=config.sizes
    )
    for split, examples in splits.items():
        _write_jsonl(paths.split(split), examples)
    stats = {split: len(examples) for split, examples in splits.items()}
    world.cache.mark("task", params, {"examples": stats, "labels": labels})
    world.bars.note(f"task {task.NAME}", f"{stats} examples, labels {sorted(labels.values())}")
    return params


def _write_jsonl(path: Path, examples: list[Example]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"prompt": e.prompt, "completion": e.completion}) for e in examples]
    path.write_text("\n".join(lines) + "\n")
