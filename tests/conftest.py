"""Shared fixtures: paths and a valid manifest to mutate."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"


@pytest.fixture
def manifest() -> dict[str, Any]:
    """A fresh copy of the cluster example, safe to mutate."""
    loaded: dict[str, Any] = yaml.safe_load((EXAMPLES / "cluster-migration.yaml").read_text())
    return copy.deepcopy(loaded)
