"""Stage ``tokenizer``: a byte-level BPE on the three corpora (or a real model's own)."""

from __future__ import annotations

import shutil
import time
from typing import Any

from transformers import AutoTokenizer, PreTrainedTokenizerBase

from relora_lab import pretrained
from relora_lab.testbed import tokenizer as bpe
from relora_lab.testbed.builder import WorldBuilder


def tokenizer_stage(world: WorldBuilder) -> tuple[PreTrainedTokenizerBase, dict[str, Any]]:
    """The tokenizer (trained, or loaded from the cache) and the stage's key."""
    config, texts = world.config, world.texts
    folder = world.paths.tokenizer
    params: dict[str, Any] = (
        {"model": config.model}
        if config.model is not None
        else {"vocab_size": config.vocab_size, "corpora": ["austen", "bible", "wordnet-glosses"]}
    )
    if world.cache.done("tokenizer", params) is not None and folder.is_dir():
        loaded: PreTrainedTokenizerBase = AutoTokenizer.from_pretrained(folder)
        return loaded, params
    started = time.perf_counter()
    if config.model is not None:
        made: PreTrainedTokenizerBase = pretrained.load_tokenizer(config.model)
    else:
        with world.bars.stage("tokenizer", "byte-level BPE", 1) as tick:
            glosses = "\n".join(sense.gloss for sense in texts.nouns)
            made = bpe.train_tokenizer(
                [texts.austen, texts.bible, glosses], vocab_size=config.vocab_size
            )
            tick(1, f"{len(made)} tokens")
    if folder.exists():
        shutil.rmtree(folder)
    made.save_pretrained(folder)
    seconds = time.perf_counter() - started
    world.cache.mark("tokenizer", params, {"vocab": len(made), "seconds": seconds})
    return made, params
