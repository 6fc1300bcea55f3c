"""The two images: the Dockerfile's stages, users and entrypoints, the build context, and an
operator image whose whole dependency closure has no ML stack. (No Docker daemon here: the
images themselves are not built by the tests.)"""

from __future__ import annotations

import fnmatch
import importlib.metadata
import json
import re
import tomllib
from dataclasses import dataclass, field

import yaml
from packaging.requirements import Requirement

from relora_operator import __main__ as operator_main
from relora_operator import settings
from tests.conftest import ROOT

ML_STACK = {"torch", "transformers", "peft", "optuna", "accelerate", "safetensors", "triton"}
BASE_IMAGE = "${PYTHON_IMAGE}${PYTHON_DIGEST:+@}${PYTHON_DIGEST}"


@dataclass
class Stage:
    name: str
    base: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for kw, args in self.instructions if kw == keyword]


def parse_dockerfile() -> tuple[dict[str, str], dict[str, Stage]]:
    """Global ARG defaults and the stages, by name (continuations joined, comments dropped)."""
    text = (ROOT / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    global_args: dict[str, str] = {}
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in joined.splitlines():
        if not line.strip():
            continue
        keyword, _, args = line.strip().partition(" ")
        keyword, args = keyword.upper(), args.strip()
        if keyword == "FROM":
            match = re.fullmatch(r"(\S+) AS (\S+)", args, re.IGNORECASE)
            assert match, f"every stage is named: FROM {args}"
            current = Stage(match.group(2), match.group(1))
            assert current.name not in stages, f"stage {current.name} twice"
            stages[current.name] = current
        elif current is None:
            assert keyword == "ARG", f"only ARG before the first FROM, not {keyword}"
            name, _, default = args.partition("=")
            global_args[name] = default
        else:
            current.instructions.append((keyword, args))
    return global_args, stages


def ancestry(stages: dict[str, Stage], name: str) -> set[str]:
    """The stage and every stage it is built FROM or COPYs --from, transitively."""
    seen: set[str] = set()
    todo = [name]
    while todo:
        stage = stages[todo.pop()]
        if stage.name in seen:
            continue
        seen.add(stage.name)
        parents = [stage.base] + [
            m.group(1) for c in stage.all("COPY") if (m := re.match(r"--from=(\S+)", c))
        ]
        todo += [p for p in parents if p in stages]
    return seen


def _pyproject() -> dict[str, object]:
    project: dict[str, object] = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    return project


def test_stages_and_pinned_base_images() -> None:
    global_args, stages = parse_dockerfile()
    assert {"operator", "trainer"} <= set(stages)
    image = global_args["PYTHON_IMAGE"]
    version = re.fullmatch(r"docker\.io/library/python:(\d+)\.(\d+)\.(\d+)-slim-bookworm", image)
    assert version, f"PYTHON_IMAGE must pin a full version: {image}"
    requires = str(_pyproject()["requires-python"])
    assert requires == f">={version.group(1)}.{version.group(2)}"
    assert "PYTHON_DIGEST" in global_args, "a digest slot: --build-arg PYTHON_DIGEST=sha256:..."
    for stage in stages.values():
        assert stage.base == BASE_IMAGE or stage.base in stages, stage.base


def test_operator_image_has_only_the_operator_extra() -> None:
    _, stages = parse_dockerfile()
    chain = ancestry(stages, "operator")
    assert not chain & {"trainer", "trainer-venv"}
    installs = [run for name in chain for run in stages[name].all("RUN") if "pip install" in run]
    assert installs, "the operator image installs the project"
    extras = {e for run in installs for e in re.findall(r"\.whl\)?\[([a-z0-9,]+)\]", run)}
    assert extras == {"operator"}
    for name in chain:
        for run in stages[name].all("RUN"):
            assert not any(package in run for package in ML_STACK), run


def test_trainer_image_has_cuda_torch_at_the_pinned_version() -> None:
    global_args, stages = parse_dockerfile()
    trainer_extra = _pyproject()["optional-dependencies"]["trainer"]  # type: ignore[index]
    [pin] = [d for d in trainer_extra if d.startswith("torch==")]
    assert pin == f"torch=={global_args['TORCH_VERSION']}"
    assert re.fullmatch(r"https://download\.pytorch\.org/whl/cu\d+", global_args["TORCH_INDEX_URL"])
    runs = [r for name in ancestry(stages, "trainer") for r in stages[name].all("RUN")]
    assert any('--index-url "${TORCH_INDEX_URL}" "torch==${TORCH_VERSION}"' in run for run in runs)
    extras = {e for run in runs for e in re.findall(r"\.whl\)?\[([a-z0-9,]+)\]", run)}
    assert extras == {"trainer,s3"}


def test_final_stages_run_as_a_non_root_user() -> None:
    _, stages = parse_dockerfile()
    for name in ("operator", "trainer"):
        stage = stages[name]
        keywords = [kw for kw, _ in stage.instructions]
        last_user = len(keywords) - 1 - keywords[::-1].index("USER")
        assert "RUN" not in keywords[last_user:], f"{name}: RUN after USER runs as root"
        user, _, group = stage.instructions[last_user][1].partition(":")
        assert user.isdigit() and int(user) > 0 and group.isdigit() and int(group) > 0
        [useradd] = [r for r in stage.all("RUN") if "useradd" in r]
        assert f"--uid {user}" in useradd and "--no-create-home" in useradd
        env = " ".join(stage.all("ENV"))
        # A read-only root filesystem: no .pyc writes, $HOME (caches) on the /tmp emptyDir.
        assert "PYTHONDONTWRITEBYTECODE=1" in env and "HOME=/tmp" in env


def test_entrypoints_are_the_operator_and_the_trainer_job() -> None:
    _, stages = parse_dockerfile()
    [operator_entry] = stages["operator"].all("ENTRYPOINT")
    assert json.loads(operator_entry) == ["relora-operator"]
    scripts = _pyproject()["scripts"]
    assert scripts["relora-operator"] == "relora_operator.__main__:main"  # type: ignore[index]
    [trainer_entry] = stages["trainer"].all("ENTRYPOINT")
    command = json.loads(trainer_entry)
    # The Jobs' command (settings default and the chart's value) is the image's entrypoint.
    assert command == settings.Settings().trainer_command
    chart = yaml.safe_load((ROOT / "helm" / "relora-operator" / "values.yaml").read_text())
    assert chart["trainer"]["command"] == command
    assert (ROOT / "trainer_image" / "relora_trainer" / "job.py").is_file()
    exposed = {int(p) for e in stages["operator"].all("EXPOSE") for p in e.split()}
    liveness_port = int(operator_main.LIVENESS.rsplit(":", 1)[1].split("/")[0])
    assert exposed == {settings.Settings().metrics_port, liveness_port}


def test_dockerignore_lets_through_exactly_what_the_build_copies() -> None:
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    assert patterns[0] == "*", "a whitelist: everything out, then what the build needs"
    allowed = {p[1:].rstrip("/") for p in patterns if p.startswith("!")}
    _, stages = parse_dockerfile()
    sources = set()
    for stage in stages.values():
        for copy in stage.all("COPY"):
            if not copy.startswith("--from"):
                sources |= {s.rstrip("/") for s in copy.split()[:-1]}
    assert sources == allowed
    for excluded in (".venv", ".git", ".tools", "tests", "examples", ".relora"):
        assert not any(fnmatch.fnmatch(excluded, p) for p in allowed), excluded


def _closure(roots: list[str]) -> set[str]:
    """Distribution names needed by ``roots`` (requirement strings), through installed metadata."""

    def normal(name: str) -> str:
        return re.sub(r"[-_.]+", "-", name).lower()

    seen: set[str] = set()
    todo = [(Requirement(r), "") for r in roots]
    while todo:
        requirement, extra = todo.pop()
        marker = requirement.marker
        if marker is not None and not marker.evaluate({"extra": extra}):
            continue
        name = normal(requirement.name)
        key = name + "[" + ",".join(sorted(requirement.extras)) + "]"
        if key in seen:
            continue
        seen.add(key)
        try:
            requires = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            raise AssertionError(f"{requirement.name} is needed but not installed") from None
        for text in requires:
            for wanted in ("", *requirement.extras):
                todo.append((Requirement(text), wanted))
    return {key.split("[")[0] for key in seen}


def test_operator_dependency_closure_has_no_ml_stack() -> None:
    project = _pyproject()
    roots = list(project["dependencies"]) + list(  # type: ignore[call-overload]
        project["optional-dependencies"]["operator"]  # type: ignore[index]
    )
    closure = _closure(roots)
    assert {"kopf", "kubernetes", "prometheus-client", "pydantic", "aiohttp"} <= closure
    assert not closure & ML_STACK, sorted(closure & ML_STACK)
    # The check itself sees through extras: the trainer extra does pull torch in.
    assert "torch" in _closure(list(project["optional-dependencies"]["trainer"]))  # type: ignore[index]
