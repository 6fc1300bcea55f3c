"""`relora bench` end to end on the toy world: runs through migrate_adapter, report written."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml

from relora_lab import settings
from relora_lab.bench import commands, running, session, variants
from relora_lab.testbed import layout, world
from relora_lab.testbed.config import BuildConfig
from relora_trainer.errors import BadInput
from tests.conftest import toy_manifest

CPU = torch.device("cpu")
TINY_BUDGET = {"maxSteps": 4, "evalEvery": 2, "batchSize": 8, "checkpointEvery": 100}


def _testbed(toy: Any, folder: Path) -> layout.TestbedPaths:
    """A testbed folder whose two manifests migrate the toy world's adapter."""
    folder.mkdir(parents=True, exist_ok=True)
    paths = layout.TestbedPaths(folder)
    for severity in paths.severities:
        manifest = toy_manifest(toy)
        manifest["spec"]["method"] = {"initialization": {"trials": 3, "validationSamples": 32}}
        paths.manifest(severity).write_text(yaml.safe_dump(manifest))
    paths.summary.write_text(json.dumps({"figures": {"adapter": {"v1/adapter/test": 0.9}}}))
    return paths


def test_run_matrix_measures_every_run_through_migrate(toy: Any, tmp_path: Path) -> None:
    paths = _testbed(toy, tmp_path / "testbed")
    chosen = variants.by_name(["warm-start", "relora-search", "reuse"], quick=True)
    common = {**TINY_BUDGET, "stopWhenReady": False}
    started: list[tuple[str, str, int]] = []

    def on_run(severity: str, variant: variants.Variant, seed: int) -> Any:
        started.append((severity, variant.name, seed))
        return running.StageSink(lambda stage, done, of, detail: None)

    records = running.run_matrix(
        manifests_by_severity={"mild": paths.manifest("mild")},
        variants=chosen,
        seeds=[0, 1],
        out=tmp_path / "bench",
        device=CPU,
        common=common,
        on_run=on_run,
    )
    assert len(records) == 6 == len(started)
    assert [s[1] for s in started[:3]] == ["warm-start", "relora-search", "reuse"]
    assert [s[1] for s in started[3:]] == ["relora-search", "reuse", "warm-start"], "rotated"
    for record in records:
        folder = tmp_path / "bench" / "runs" / "mild" / record.variant / f"seed-{record.seed}"
        report = json.loads((folder / "report.json").read_text())
        assert report["strategy"] == record.strategy
        assert record.steps == (0 if record.variant == "reuse" else 4), "the whole budget"
        assert record.accuracy("after", "test") is not None
        assert record.accuracy("source", "validation") is not None
    relora = [r for r in records if r.variant == "relora-search"]
    # the variant's, not the manifest's
    trials = settings.RELORA_SEARCH["trials"]
    assert all(len(r.trials) == trials and r.search_seconds > 0 for r in relora)
    assert all(
        r.time_to_readiness is None or r.time_to_readiness >= r.search_seconds for r in relora
    )


def test_a_bench_session_writes_the_report(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _testbed(toy, tmp_path / "testbed")
    built: list[BuildConfig] = []

    def fake_build(out: Path, config: BuildConfig, **kwargs: Any) -> layout.TestbedPaths:
        built.append(config)
        assert out == paths.root
        return paths

    monkeypatch.setattr(world, "build", fake_build)
    monkeypatch.setattr(variants, "COMMON_FINETUNE", TINY_BUDGET)
    monkeypatch.chdir(tmp_path)
    written = session.run(
        session.Options(
            quick=True,
            seeds=2,
            out="bench",  # relative to the working directory, not to the testbed's manifests
            testbed=str(paths.root),
            variants=["scratch", "relora"],
            severities=["severe"],
            threads=0,
            command="relora bench --quick --seeds 2",
        )
    )
    assert len(built) == 1 and built[0].model is None
    text = written["markdown"].read_text()
    assert "`relora bench --quick --seeds 2`" in text
    assert "## v1 -> v2-severe" in text and "v2-mild" not in text
    assert "scratch/relora time to readiness" in text
    document = json.loads(written["json"].read_text())
    assert {r["variant"] for r in document["runs"]} == {"scratch", "relora"}
    assert len(document["runs"]) == 4
    assert document["context"]["budget"]["maxSteps"] == 4
    assert (tmp_path / "bench" / "curves-severe.png").is_file()
    assert len(list((tmp_path / "bench" / "runs" / "severe").glob("*/seed-*/report.json"))) == 4
    assert not (paths.root / "bench").exists()


def test_a_bench_that_stops_when_ready_says_so(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--stop-when-ready: each run stops at its first evaluation that meets the target (an easy
    one here: 0.1 x the source's accuracy), and the report says its accuracy is there."""
    paths = _testbed(toy, tmp_path / "testbed")
    monkeypatch.setattr(world, "build", lambda out, config, **kwargs: paths)
    monkeypatch.setattr(variants, "COMMON_FINETUNE", TINY_BUDGET)
    written = session.run(
        session.Options(
            seeds=1,
            out=str(tmp_path / "bench"),
            testbed=str(paths.root),
            variants=["warm-start"],
            severities=["severe"],
            threads=0,
            stop_when_ready=True,
            target_fraction=0.1,
        )
    )
    document = json.loads(written["json"].read_text())
    assert document["context"]["budget"]["stopWhenReady"] is True
    (run,) = document["runs"]
    assert run["ready"] and run["steps"] == run["ready_step"] < TINY_BUDGET["maxSteps"]
    text = written["markdown"].read_text()
    assert "Runs stop at readiness" in text and "test accuracy at readiness (%)" in text
    assert "after the whole budget (`stopWhenReady: false`)" not in text


def test_the_bench_command_registers_with_its_options() -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench", "--quick", "--seeds", "4", "--variant", "relora"])
    assert args.quick and args.seeds == 4 and args.variant == ["relora"]
    assert args.handler is commands._cmd_bench
    defaults = parser.parse_args(["bench"])
    assert defaults.out == commands.DEFAULT_OUT and defaults.testbed is None
    assert defaults.world is None and defaults.builds == 1
    suite = parser.parse_args(["bench", "--world", "qwen2-phrases", "--world", "llama-cpt"])
    assert suite.world == ["qwen2-phrases", "llama-cpt"]
    assert parser.parse_args(["bench", "--builds", "3"]).builds == 3
    assert parser.parse_args(["bench", "--first-build", "1"]).first_build == 1
    assert parser.parse_args(["bench", "--stop-when-ready"]).stop_when_ready
    assert not defaults.stop_when_ready


def test_registering_the_commands_imports_no_ml_stack() -> None:
    import subprocess
    import sys

    probe = """
import argparse, sys
for name in ("torch", "transformers", "peft", "optuna", "matplotlib"):
    sys.modules[name] = None
from relora_lab.bench import commands as bench
from relora_lab.testbed import commands as testbed
parser = argparse.ArgumentParser(prog="relora")
sub = parser.add_subparsers(dest="command")
bench.register(sub)
kinds = sub.add_parser("testbed").add_subparsers(dest="kind")
testbed.register_build(kinds)
assert parser.parse_args(["testbed", "build", "--quick"]).quick
assert parser.parse_args(["bench", "--quick"]).quick
print("ok")
"""
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


def test_the_command_defaults_are_the_benchmark_settings() -> None:
    parser = argparse.ArgumentParser()
    commands.register(parser.add_subparsers(dest="command"))
    args = parser.parse_args(["bench"])
    assert args.target_fraction == settings.TARGET_FRACTION
    assert args.steps is None and not args.tune
    assert session.Options().target_fraction == settings.TARGET_FRACTION


def test_a_suite_session_labels_rows_by_world_and_build(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    paths = _testbed(toy, tmp_path / "testbed")
    built: list[tuple[Path, BuildConfig]] = []

    def fake_build(out: Path, config: BuildConfig, **kwargs: Any) -> layout.TestbedPaths:
        built.append((out, config))
        return paths

    monkeypatch.setattr(world, "build", fake_build)
    monkeypatch.setattr(variants, "COMMON_FINETUNE", TINY_BUDGET)
    monkeypatch.chdir(tmp_path)
    options = session.Options(
        seeds=2,
        out="bench",
        worlds=["llama-cpt", "qwen2-phrases"],
        build_seeds=2,
        variants=["warm-start", "relora"],
        severities=["severe"],
        threads=0,
    )
    written = session.run(options)
    assert [(str(out), c.world, c.seed) for out, c in built] == [
        ("examples/testbed", "llama-cpt", 0),
        ("examples/testbed-llama-cpt-seed1", "llama-cpt", 1),
        ("examples/testbed-qwen2-phrases", "qwen2-phrases", 0),
        ("examples/testbed-qwen2-phrases-seed1", "qwen2-phrases", 1),
    ]
    document = json.loads(written["json"].read_text())
    labels = {r["severity"] for r in document["runs"]}
    assert labels == {f"{w}/severe/b{b}" for w in ("llama-cpt", "qwen2-phrases") for b in (0, 1)}
    text = written["markdown"].read_text()
    assert "## qwen2-phrases (build 1): v1 -> v2-severe" in text
    assert "## All pairs" in text and "| qwen2-phrases/severe/b1 |" in text
    assert (tmp_path / "bench" / "curves-qwen2-phrases_severe_b1.png").is_file()
    ratio = document["comparisons"]["llama-cpt/severe/b0"]["ratios"]["warm-start"]
    low, high = ratio["interval"]
    assert 0 < low <= high, "two seeds give an interval"

    # Another build alone: its folder and seed, its rows labelled by world and build.
    built.clear()
    alone = replace(options, worlds=["qwen2-phrases"], build_seeds=1, first_build=1, out="b1")
    document = json.loads(session.run(alone)["json"].read_text())
    assert [(str(out), c.seed) for out, c in built] == [("examples/testbed-qwen2-phrases-seed1", 1)]
    assert {r["severity"] for r in document["runs"]} == {"qwen2-phrases/severe/b1"}

    with pytest.raises(BadInput, match="--world \\['gpt9'\\]: known worlds are llama-cpt"):
        session.run(replace(options, worlds=["gpt9"]))
    with pytest.raises(BadInput, match="--testbed names one folder"):
        session.run(replace(options, testbed="somewhere"))
    with pytest.raises(BadInput, match="--first-build -1: a build seed is 0 or more"):
        session.run(replace(options, first_build=-1))
    with pytest.raises(BadInput, match="--severity \\['extreme'\\]"):
        session.run(replace(options, worlds=None, build_seeds=1, severities=["extreme"]))


def test_another_kind_of_adapter_runs_as_rows_of_its_own(
    toy: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--adapter-kind dora: the same pair, target, budget and seeds on the DoRA adapter."""
    from relora_lab import toyworld

    paths = _testbed(toy, tmp_path / "testbed")
    dora = toyworld.train_adapter(toy, toy.variant("dora"), steps=120, use_dora=True)
    manifest = yaml.safe_load(paths.manifest("severe").read_text())
    manifest["spec"]["adapters"][0]["uri"] = str(dora)
    paths.manifest("severe", "dora").write_text(yaml.safe_dump(manifest))
    built: list[BuildConfig] = []

    def fake_build(out: Path, config: BuildConfig, **kwargs: Any) -> layout.TestbedPaths:
        built.append(config)
        return paths

    monkeypatch.setattr(world, "build", fake_build)
    monkeypatch.setattr(variants, "COMMON_FINETUNE", TINY_BUDGET)
    monkeypatch.chdir(tmp_path)
    options = session.Options(
        seeds=1,
        out="bench",
        adapter_kinds=["dora"],
        variants=["reuse", "warm-start"],
        severities=["severe"],
        threads=0,
    )
    written = session.run(options)
    assert [c.adapter_kinds for c in built] == [("dora",)]
    document = json.loads(written["json"].read_text())
    assert {r["severity"] for r in document["runs"]} == {"severe", "severe+dora"}
    text = written["markdown"].read_text()
    assert "v1 -> v2-severe (dora adapter)" in text
    runs = {(r["severity"], r["variant"]): r for r in document["runs"]}
    dora_reuse, lora_reuse = runs[("severe+dora", "reuse")], runs[("severe", "reuse")]
    assert dora_reuse["quality"]["before"] != lora_reuse["quality"]["before"], (
        "the DoRA rows migrate the DoRA adapter"
    )
