"""One build's shared state: the ``WorldBuilder`` every stage takes instead of a long list."""

from __future__ import annotations

import shutil
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from torch import Tensor
from transformers import PreTrainedTokenizerBase

from relora_lab.testbed import corpora, instructions, pretraining
from relora_lab.testbed.bars import StageBars
from relora_lab.testbed.cache import StageCache
from relora_lab.testbed.config import BuildConfig
from relora_lab.testbed.layout import TestbedPaths
from relora_trainer import models

HELD_OUT = 0.02  # the last 2% of each corpus: held-out language-model loss


@dataclass
class Texts:
    """The corpora, loaded only if a stage needs them."""

    cache: Path
    _austen: str | None = None
    _bible: str | None = None
    _nouns: list[corpora.NounSense] | None = None
    _streams: dict[str, tuple[Tensor, Tensor]] = field(default_factory=dict)

    @property
    def austen(self) -> str:
        if self._austen is None:
            self._austen = "\n\n".join(corpora.austen_novels(cache=self.cache).values())
        return self._austen

    @property
    def bible(self) -> str:
        if self._bible is None:
            self._bible = corpora.bible_text(cache=self.cache)
        return self._bible

    @property
    def nouns(self) -> list[corpora.NounSense]:
        if self._nouns is None:
            self._nouns = corpora.wordnet_nouns(cache=self.cache)
        return self._nouns

    def text(self, corpus: str) -> str:
        """One corpus by name: ``austen``, ``bible`` or ``instruct`` (both as instructions)."""
        if corpus == "instruct":
            return instructions.instruction_text(self.bible, self.austen)
        if corpus in ("austen", "bible"):
            return str(getattr(self, corpus))
        raise ValueError(f"unknown corpus {corpus!r}: austen, bible or instruct")

    def streams(
        self, tokenizer: PreTrainedTokenizerBase, corpora: tuple[str, ...] = ("austen", "bible")
    ) -> dict[str, tuple[Tensor, Tensor]]:
        """(train, held-out) token streams of ``corpora``, each tokenized once."""
        for name in corpora:
            if name not in self._streams:
                self._streams[name] = pretraining.split_stream(
                    pretraining.tokenize(tokenizer, self.text(name)), held_out=HELD_OUT
                )
        return {name: self._streams[name] for name in corpora}


@dataclass
class WorldBuilder:
    """What every stage reads (parameters, layout, device) and shares (cache, texts, bars)."""

    config: BuildConfig
    paths: TestbedPaths
    device: torch.device
    cache: StageCache
    texts: Texts
    bars: StageBars

    @classmethod
    def open(
        cls,
        out: Path,
        config: BuildConfig,
        *,
        corpora_cache: Path,
        device: torch.device,
        console: Console | None,
    ) -> WorldBuilder:
        """A build under ``out`` (created) reading the corpora cached in ``corpora_cache``."""
        out.mkdir(parents=True, exist_ok=True)
        return cls(
            config=config,
            paths=TestbedPaths(out, tuple(s.name for s in config.severities), config.adapter_kinds),
            device=device,
            cache=StageCache(out),
            texts=Texts(corpora_cache),
            bars=StageBars(console),
        )

    def load_model(self, folder: Path) -> torch.nn.Module:
        return models.load_model(folder, what=str(folder), device=self.device)

    @staticmethod
    def save_model(
        model: torch.nn.Module, tokenizer: PreTrainedTokenizerBase, folder: Path
    ) -> None:
        """``model`` and ``tokenizer`` in ``folder`` as a Hugging Face folder (replacing it)."""
        if folder.exists():
            shutil.rmtree(folder)
        model.save_pretrained(folder)  # type: ignore[operator]
        tokenizer.save_pretrained(folder)
