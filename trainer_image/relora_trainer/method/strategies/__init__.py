"""One module per migration strategy, behind one interface (:class:`Strategy`).

A strategy sets the starting adapter of the fine-tuning (``initialize``) and says whether the
fine-tuning runs (``trains``) and whether it is pulled toward that start (``regularized``). Each
computes only what it needs: scratch nothing, reuse and warm-start the old update at rank r,
relora the base evolution too (read by the caller, see :class:`Context`) and its search.
"""

from __future__ import annotations

from relora_trainer.method.strategies.base import Context, Strategy, keeps_update
from relora_trainer.method.strategies.relora import Relora
from relora_trainer.method.strategies.reuse import Reuse
from relora_trainer.method.strategies.scratch import Scratch
from relora_trainer.method.strategies.warm_start import WarmStart

STRATEGIES: dict[str, Strategy] = {s.name: s for s in (Scratch(), Reuse(), WarmStart(), Relora())}


def strategy(name: str) -> Strategy:
    """The strategy named ``name`` (the API's spec.method.strategy values)."""
    return STRATEGIES[name]


__all__ = ["STRATEGIES", "Context", "Strategy", "keeps_update", "strategy"]
