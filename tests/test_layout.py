"""Packaging rules: no package shadows `operator`, and the operator side needs no torch."""

from __future__ import annotations

import subprocess
import sys
import tomllib

from tests.conftest import EXAMPLES, ROOT


def test_operator_folder_is_not_a_package_named_operator() -> None:
    assert not (ROOT / "operator" / "__init__.py").exists()
    probe = "import operator, sys; print(operator.__file__); assert operator.itemgetter"
    result = subprocess.run(
        [sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert str(ROOT) not in result.stdout, "the standard library's operator module is shadowed"


def test_operator_side_imports_and_validates_without_torch() -> None:
    # `sys.modules[name] = None` makes any import of it fail, as in the torch-free operator image.
    probe = f"""
import sys
for name in ("torch", "transformers", "peft", "optuna"):
    sys.modules[name] = None
import relora_operator, relora_api.crd, relora_api.validation
from relora_trainer import cli
code = cli.main(["validate", "-f", {str(EXAMPLES / "cluster-migration.yaml")!r}])
assert code == 0, code
assert "torch" not in [m for m in sys.modules if sys.modules[m] is not None]
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().endswith("ok")


def test_operator_extra_has_no_ml_stack() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    operator_deps = project["dependencies"] + project["optional-dependencies"]["operator"]
    names = {
        dep.split("[")[0].split("=")[0].split(">")[0].split("<")[0].strip().lower()
        for dep in operator_deps
    }
    assert names.isdisjoint({"torch", "transformers", "peft", "optuna", "accelerate"}), names
    assert {"kopf", "kubernetes", "prometheus-client", "pydantic"} <= names
    assert "torch==2.13.0" in project["optional-dependencies"]["trainer"]


def test_top_level_layout() -> None:
    for name in ["operator", "trainer_image", "crds", "helm", "tests", "examples"]:
        assert (ROOT / name).is_dir(), name
    for name in ["Dockerfile", "pyproject.toml", "README.md", ".ci/run", "Makefile"]:
        assert (ROOT / name).is_file(), name
