"""scratch: a fresh LoRA on the new base (PEFT's initialization: A random, B zero), trained."""

from __future__ import annotations

from relora_trainer.method.search import SearchResult
from relora_trainer.method.strategies.base import Context


class Scratch:
    name = "scratch"
    trains = True
    regularized = False

    def initialize(self, context: Context) -> SearchResult | None:
        return None  # nothing to compute: the model already holds PEFT's initialization

    def starts_as_old(self, result: SearchResult | None) -> bool:
        return False
