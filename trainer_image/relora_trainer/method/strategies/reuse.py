"""reuse: the old adapter as is on the new base (at the new rank), not trained."""

from __future__ import annotations

from relora_trainer.method.search import SearchResult
from relora_trainer.method.strategies.base import Context, old_update


class Reuse:
    name = "reuse"
    trains = False
    regularized = False

    def initialize(self, context: Context) -> SearchResult | None:
        old_update(context)
        return None

    def starts_as_old(self, result: SearchResult | None) -> bool:
        return True
