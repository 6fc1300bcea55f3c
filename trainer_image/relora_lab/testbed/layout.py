"""Where a built testbed keeps what (the manifests point at these, relative to their folder)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from relora_lab.testbed import task

SUMMARY_FILE = "testbed.json"
TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class TestbedPaths:
    root: Path
    severities: tuple[str, ...] = ("mild", "severe")
    kinds: tuple[str, ...] = ()  # other kinds of task adapter (testbed.config.ADAPTER_KINDS)

    @property
    def tokenizer(self) -> Path:
        return self.root / TOKENIZER_DIR

    @property
    def v1(self) -> Path:
        return self.root / "models" / "v1"

    def v2(self, severity: str) -> Path:
        return self.root / "models" / f"v2-{severity}"

    @property
    def adapter(self) -> Path:
        return self.root / "adapters" / task.NAME

    def adapter_of(self, kind: str | None) -> Path:
        """The task adapter of a kind (None: the plain LoRA one)."""
        return self.adapter if kind is None else self.root / "adapters" / f"{task.NAME}-{kind}"

    def split(self, name: str) -> Path:
        return self.root / "data" / task.NAME / f"{name}.jsonl"

    def manifest(self, severity: str, kind: str | None = None) -> Path:
        return self.root / f"migration-{severity}{f'-{kind}' if kind else ''}.yaml"

    @property
    def summary(self) -> Path:
        return self.root / SUMMARY_FILE
