"""The testbed's AdapterMigration manifests, one per severity (``relora run -f`` takes them)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from relora_lab.settings import METHODS, TARGET_FRACTION, merge
from relora_lab.testbed import task
from relora_lab.testbed.layout import TestbedPaths


def manifest(
    paths: TestbedPaths, severity: str, *, strategy: str = "relora", kind: str | None = None
) -> dict[str, Any]:
    """The AdapterMigration for one severity (and kind of adapter), with paths relative to the
    testbed folder."""

    def rel(path: Path) -> str:
        return path.relative_to(paths.root).as_posix()

    return {
        "apiVersion": "relora.dev/v1alpha1",
        "kind": "AdapterMigration",
        "metadata": {"name": f"testbed-v1-to-v2-{severity}{f'-{kind}' if kind else ''}"},
        "spec": {
            "sourceModel": {"uri": rel(paths.v1)},
            "targetModel": {"uri": rel(paths.v2(severity))},
            "adapters": [
                {
                    "name": task.NAME,
                    "uri": rel(paths.adapter_of(kind)),
                    "data": {
                        "train": rel(paths.split("train")),
                        "validation": rel(paths.split("validation")),
                        "test": rel(paths.split("test")),
                    },
                    "readiness": {"metric": "accuracy", "relativeToSource": TARGET_FRACTION},
                }
            ],
            "output": {"uri": f"output/{severity}"},
            "method": merge(METHODS[strategy], {"finetune": {"maxSteps": 300, "evalEvery": 10}}),
        },
    }


_MANIFEST_HEADER = """\
# Written by `relora testbed build`: migrate the testbed's task adapter from v1 to v2-{severity}.
#   relora run -f {path}
# Relative paths resolve against this file's folder. The target (85% of the old adapter's
# validation accuracy on v1) and the method settings are those `relora bench` uses (see
# docs/benchmark.md); the rest of spec.method is defaults.
"""


def write_manifests(paths: TestbedPaths) -> None:
    """``migration-<severity>.yaml`` for each of the testbed's severities, and
    ``migration-<severity>-<kind>.yaml`` for each other kind of adapter it has."""
    for severity in paths.severities:
        for kind in (None, *paths.kinds):
            path = paths.manifest(severity, kind)
            header = _MANIFEST_HEADER.format(severity=severity, path=path)
            content = manifest(paths, severity, kind=kind)
            path.write_text(header + yaml.safe_dump(content, sort_keys=False))
