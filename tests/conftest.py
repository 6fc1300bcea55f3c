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


@pytest.fixture(scope="session")
def toy(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """A tiny model pair, trained adapter and task (built once per session, ~7 s)."""
    from relora_trainer import local_run, toyworld

    local_run.quiet_libraries()
    return toyworld.build(tmp_path_factory.mktemp("toy"))


def toy_manifest(toy: Any, **method: Any) -> dict[str, Any]:
    """An AdapterMigration over the toy world with absolute paths; ``method`` overrides."""
    return {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": "toy"},
        "spec": {
            "sourceModel": {"uri": str(toy.v1)},
            "targetModel": {"uri": str(toy.v2)},
            "adapters": [
                {
                    "name": "toy-category",
                    "uri": str(toy.adapter),
                    "readiness": {"relativeToSource": 0.97},
                    "data": {
                        "train": str(toy.split("train")),
                        "validation": str(toy.split("validation")),
                        "test": str(toy.split("test")),
                    },
                }
            ],
            "output": {"uri": "output"},
            "method": {
                "initialization": {"trials": 6},
                "finetune": {"maxSteps": 60, "evalEvery": 10, "learningRate": 0.01},
                **method,
            },
        },
    }
