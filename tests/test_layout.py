"""Packaging rules: no package shadows `operator`, and the operator side needs no torch."""

from __future__ import annotations

import ast
import subprocess
import sys
import tomllib
from pathlib import Path

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
import relora_cli as cli
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


# Which of our packages each package may import (lazily inside functions too): layers that only
# import downward. The CLI is the top: it dispatches to every package's commands.
ALLOWED = {
    "relora_api": set(),
    "relora_sandbox": set(),
    "relora_operator": {"relora_api"},
    "relora_trainer": {"relora_api"},
    "relora_lab": {"relora_api", "relora_trainer"},
    "relora_cli": {
        "relora_api",
        "relora_operator",
        "relora_sandbox",
        "relora_trainer",
        "relora_lab",
    },
}
# The pure method: no API models, no storage, manifests, reports or entry points.
METHOD_MAY_NOT = {
    "relora_api",
    *(f"relora_trainer.{m}" for m in ("storage", "migrate", "job", "local_run", "ownership")),
    *(f"relora_trainer.{m}" for m in ("report", "plan", "progress", "errors")),
}


def _imports(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), filename=str(path))
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found |= {f"{node.module}.{alias.name}" for alias in node.names}
    return {name for name in found if name.startswith("relora_")}


def _modules() -> dict[str, list[Path]]:
    packages: dict[str, list[Path]] = {}
    for folder in ("operator", "trainer_image"):
        for package in sorted((ROOT / folder).iterdir()):
            if (package / "__init__.py").is_file():
                packages[package.name] = sorted(package.rglob("*.py"))
    return packages


def test_packages_import_only_downward() -> None:
    packages = _modules()
    assert set(packages) == set(ALLOWED), "a new package needs its place in the layers"
    wrong = []
    for package, paths in packages.items():
        for path in paths:
            for name in _imports(path):
                top = name.split(".")[0]
                if top != package and top not in ALLOWED[package]:
                    wrong.append(f"{path.relative_to(ROOT)} imports {name}")
    assert not wrong, "\n".join(wrong)


def test_the_method_is_pure() -> None:
    method = ROOT / "trainer_image" / "relora_trainer" / "method"
    wrong = [
        f"{path.relative_to(ROOT)} imports {name}"
        for path in sorted(method.rglob("*.py"))
        for name in _imports(path)
        if any(name == bad or name.startswith(f"{bad}.") for bad in METHOD_MAY_NOT)
    ]
    assert not wrong, "\n".join(wrong)
