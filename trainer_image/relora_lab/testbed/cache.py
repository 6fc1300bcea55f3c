"""The build's stage cache: ``.stages/<name>.json`` holds a stage's parameters and its figures.

A stage whose marker holds the same parameters is skipped. Stages chain by key: a stage's
parameters include the digest of the keys it builds on, so a changed parameter redoes exactly
the stages downstream of it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

STAGES_DIR = ".stages"


def digest(value: Any) -> str:
    """A short, stable digest of a stage's key (what the stages after it record)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True).encode()).hexdigest()[:16]


def jsonable(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists, the rest ``str``)."""
    return json.loads(json.dumps(value, default=str))


class StageCache:
    """Cache markers under ``root/.stages``."""

    def __init__(self, root: Path) -> None:
        self.folder = root / STAGES_DIR

    def done(self, name: str, params: dict[str, Any]) -> dict[str, Any] | None:
        """The figures of stage ``name`` if it was built with ``params``, else None."""
        path = self.folder / f"{name}.json"
        if not path.is_file():
            return None
        try:
            saved: dict[str, Any] = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            return None
        if saved.get("params") != jsonable(params):  # tuples come back as lists
            return None
        stats: dict[str, Any] = saved.get("stats", {})
        return stats

    def mark(self, name: str, params: dict[str, Any], stats: dict[str, Any]) -> None:
        """Record stage ``name`` as built with ``params`` (atomically)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        partial = self.folder / f"{name}.json.partial"
        partial.write_text(json.dumps({"params": params, "stats": stats}, indent=2) + "\n")
        partial.replace(self.folder / f"{name}.json")
