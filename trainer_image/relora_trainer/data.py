"""Task data: JSONL files of {"prompt": str, "completion": str}, tokenized for causal LMs.

Only completion tokens carry loss; prompts are truncated from the left to fit ``max_length``.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import PreTrainedTokenizerBase

from relora_trainer.errors import InvalidData, MissingInput

MAX_LINE_BYTES = 1_000_000
IGNORE_INDEX = -100
MAX_CHOICES = 64
"""Distinct completions an accuracy score chooses among (each example is scored against every
one of them): a classification task has a few; free-form completions need the loss metric."""


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def read_jsonl(path: Path, *, what: str) -> list[Example]:
    """Read examples; raise InvalidData naming the file and line of the first problem.

    Lines are read at most MAX_LINE_BYTES at a time (a file without newlines is not loaded
    whole); any JSON the parser refuses (bad syntax, invalid UTF-8, nesting too deep for it,
    integers too long to convert) and any string that is not valid Unicode are InvalidData.
    """
    if not path.is_file():
        raise MissingInput(f"{what}: {path} is not a file")
    examples = []
    try:
        with path.open("rb") as handle:
            number = 0
            while raw := handle.readline(MAX_LINE_BYTES + 1):
                number += 1
                if len(raw) > MAX_LINE_BYTES:
                    raise InvalidData(
                        f"{what}: {path}:{number}: line longer than {MAX_LINE_BYTES} bytes"
                    )
                example = _parse_line(raw, where=f"{what}: {path}:{number}")
                if example is not None:
                    examples.append(example)
    except OSError as error:
        raise MissingInput(f"{what}: {path}: cannot read: {error.strerror or error}") from error
    if not examples:
        raise InvalidData(f"{what}: {path} has no examples")
    return examples


def _parse_line(raw: bytes, *, where: str) -> Example | None:
    line = raw.strip()
    if not line:
        return None
    try:
        record = json.loads(line)
    except RecursionError:
        raise InvalidData(f"{where}: JSON nested too deeply") from None
    except (ValueError, UnicodeDecodeError) as error:  # JSONDecodeError is a ValueError
        reason = " ".join(str(error).split())[:200]
        raise InvalidData(f"{where}: not valid JSON ({reason})") from error
    if not isinstance(record, dict):
        raise InvalidData(f"{where}: expected a JSON object per line")
    for key in ("prompt", "completion"):
        value = record.get(key)
        if not isinstance(value, str):
            raise InvalidData(
                f"{where}: field '{key}' must be a string, got {type(value).__name__}"
            )
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise InvalidData(
                f"{where}: field '{key}' holds an unpaired surrogate escape (\\ud800-\\udfff); "
                "not valid Unicode text"
            ) from None
    if not record["completion"]:
        raise InvalidData(f"{where}: 'completion' is empty")
    return Example(record["prompt"], record["completion"])


@dataclass
class Encoded:
    """Token ids of prompt and completion, kept apart so the loss covers the completion only."""

    prompt_ids: list[int]
    completion_ids: list[int]


class Encoder:
    """Tokenizes examples and pads them into batches."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, max_length: int = 512) -> None:
        self.tokenizer = tokenizer
        self.max_length = max_length
        pad = tokenizer.pad_token_id
        if pad is None:
            pad = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
        self.pad_id: int = int(pad)
        self._cache: dict[str, list[int]] = {}

    def _ids(self, text: str) -> list[int]:
        cached = self._cache.get(text)
        if cached is None:
            cached = list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
            self._cache[text] = cached
        return cached

    def encode(self, prompt: str, completion: str) -> Encoded:
        completion_ids = self._ids(completion)[: self.max_length - 1]
        if not completion_ids:
            raise InvalidData(f"completion {completion!r} tokenizes to nothing")
        bos = [self.tokenizer.bos_token_id] if self.tokenizer.bos_token_id is not None else []
        prompt_ids = bos + self._ids(prompt)
        room = self.max_length - len(completion_ids)
        return Encoded(prompt_ids[-room:], completion_ids)

    def batch(self, items: Sequence[Encoded], device: torch.device) -> dict[str, torch.Tensor]:
        """Right-padded input_ids, attention_mask and labels (IGNORE_INDEX off the completion)."""
        width = max(len(i.prompt_ids) + len(i.completion_ids) for i in items)
        ids = torch.full((len(items), width), self.pad_id, dtype=torch.long)
        labels = torch.full((len(items), width), IGNORE_INDEX, dtype=torch.long)
        mask = torch.zeros((len(items), width), dtype=torch.long)
        for row, item in enumerate(items):
            sequence = item.prompt_ids + item.completion_ids
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
            labels[row, len(item.prompt_ids) : len(sequence)] = torch.tensor(item.completion_ids)
        return {
            "input_ids": ids.to(device),
            "attention_mask": mask.to(device),
            "labels": labels.to(device),
        }


@dataclass
class TaskData:
    """The splits of one adapter's task, with its candidate completions."""

    train: list[Example]
    validation: list[Example]
    test: list[Example] | None

    @property
    def choices(self) -> list[str]:
        """The distinct completions: the classes an accuracy score chooses among."""
        seen = dict.fromkeys(e.completion for e in self.train + self.validation)
        return list(seen)
