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


@dataclass(frozen=True)
class Example:
    prompt: str
    completion: str


def read_jsonl(path: Path, *, what: str) -> list[Example]:
    """Read examples; raise InvalidData naming the file and line of the first problem."""
    if not path.is_file():
        raise MissingInput(f"{what}: {path} is not a file")
    examples = []
    with path.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            if len(raw) > MAX_LINE_BYTES:
                raise InvalidData(
                    f"{what}: {path}:{number}: line longer than {MAX_LINE_BYTES} bytes"
                )
            line = raw.strip()
            if not line:
                continue
            try:
                record = json.loads(line)
            except (json.JSONDecodeError, UnicodeDecodeError) as error:
                raise InvalidData(f"{what}: {path}:{number}: not valid JSON ({error})") from error
            if not isinstance(record, dict):
                raise InvalidData(f"{what}: {path}:{number}: expected a JSON object per line")
            for key in ("prompt", "completion"):
                if not isinstance(record.get(key), str):
                    raise InvalidData(
                        f"{what}: {path}:{number}: field '{key}' must be a string, "
                        f"got {type(record.get(key)).__name__}"
                    )
            if not record["completion"]:
                raise InvalidData(f"{what}: {path}:{number}: 'completion' is empty")
            examples.append(Example(record["prompt"], record["completion"]))
    if not examples:
        raise InvalidData(f"{what}: {path} has no examples")
    return examples


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
