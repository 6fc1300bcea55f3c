"""warm-start: the old adapter as the starting point (as reuse sets it), then fine-tuned
without regularization (the PortLLM-style baseline: patch the old update onto the new base,
then train)."""

from __future__ import annotations

from relora_trainer.method.strategies.reuse import Reuse


class WarmStart(Reuse):
    name = "warm-start"
    trains = True
