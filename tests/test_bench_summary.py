"""The benchmark's arithmetic and report, on hand-made run records (no model involved)."""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from typing import Any

import pytest
from rich.console import Console

from relora_lab.bench import session, summary, variants, writing
from relora_lab.bench.running import RunRecord, order_for
from relora_trainer.errors import BadInput


def record(
    variant: str,
    seed: int,
    *,
    ttr: float | None,
    ready_step: int | None,
    test: float,
    severity: str = "mild",
    spent: float = 100.0,
    steps: int = 200,
    search: float = 0.0,
) -> RunRecord:
    quality: dict[str, Any] = {
        "source": {"validation": {"accuracy": 0.6, "loss": 5.0}, "test": {"accuracy": 0.61}},
        "before": {"validation": {"accuracy": 0.5, "loss": 5.5}, "test": {"accuracy": 0.49}},
        "after": {"validation": {"accuracy": test, "loss": 5.0}, "test": {"accuracy": test}},
    }
    history = [
        {"step": 0, "seconds": search + 1.0, "quality": 0.5, "loss": 5.5, "accuracy": 0.5},
        {"step": 10, "seconds": (ttr or spent), "quality": 0.6, "loss": 5.0, "accuracy": 0.6},
    ]
    trials = (
        [
            {"number": 0, "params": {"alpha": 1.0, "beta": 0.0}, "value": 1.2, "state": "COMPLETE"},
            {
                "number": 1,
                "params": {"alpha": 1.5, "beta": -0.5},
                "value": 1.1,
                "state": "COMPLETE",
            },
        ]
        if variant == "relora"
        else []
    )
    return RunRecord(
        severity=severity,
        variant=variant,
        strategy=variant,
        seed=seed,
        ready=ttr is not None,
        ready_step=ready_step,
        time_to_readiness=ttr,
        spent_seconds=spent,
        search_seconds=search,
        steps=steps,
        target=0.6,
        quality=quality,
        history=history,
        trials=trials,
        coefficients={"all": {"alpha": 1.5, "beta": -0.5}} if variant == "relora" else None,
    )


RECORDS = [
    record("relora", 0, ttr=10.0, ready_step=40, test=0.66, search=2.0),
    record("relora", 1, ttr=14.0, ready_step=60, test=0.64, search=2.0),
    record("warm-start", 0, ttr=20.0, ready_step=100, test=0.65),
    record("warm-start", 1, ttr=24.0, ready_step=120, test=0.63),
    record("scratch", 0, ttr=None, ready_step=None, test=0.55, spent=60.0),
    record("scratch", 1, ttr=50.0, ready_step=190, test=0.60),
    record("reuse", 0, ttr=None, ready_step=None, test=0.49, spent=1.0, steps=0),
    record("reuse", 1, ttr=None, ready_step=None, test=0.49, spent=1.0, steps=0),
]


def test_stat_is_mean_and_sample_std_ignoring_unknowns() -> None:
    stat = summary.Stat.of([1.0, 3.0, None])
    assert stat.mean == 2.0 and stat.std == pytest.approx(2**0.5) and stat.n == 2
    assert summary.Stat.of([None]).text() == "-"
    assert summary.Stat.of([0.5]).std == 0.0


def test_cells_count_censored_runs_at_what_they_spent() -> None:
    table = summary.cells(RECORDS)
    scratch = table["mild"]["scratch"]
    assert scratch.runs == 2 and scratch.ready == 1 and scratch.censored
    assert scratch.time_to_readiness.mean == pytest.approx((60.0 + 50.0) / 2)
    assert scratch.ready_step.mean == pytest.approx((200 + 190) / 2)
    relora = table["mild"]["relora"]
    assert not relora.censored and relora.time_to_readiness.mean == pytest.approx(12.0)
    assert relora.test_accuracy.mean == pytest.approx(0.65)
    assert relora.source_test == 0.61 and relora.before_test == 0.49


def test_ratios_accuracy_delta_and_verdict() -> None:
    table = summary.cells(RECORDS)
    comparison = summary.compare(table, RECORDS, baselines=variants.BASELINES)["mild"]
    warm = comparison.ratios["warm-start"]
    assert warm.seconds == pytest.approx(22.0 / 12.0) and warm.bound == ""
    assert warm.steps == pytest.approx(110.0 / 50.0)
    assert warm.per_seed.mean == pytest.approx((20 / 10 + 24 / 14) / 2)
    scratch = comparison.ratios["scratch"]
    assert scratch.bound == ">=", "a censored baseline gives a lower bound"
    assert comparison.best_baseline == "warm-start"
    assert comparison.accuracy_delta == pytest.approx(0.65 - 0.64)
    assert comparison.wins_time and comparison.no_accuracy_loss


def test_both_ready_at_step_zero_is_a_tie_not_zero() -> None:
    """A start ready at step 0 costs (almost) no seconds: warm-start's 0 s against relora's
    skipped search's thousandth of a second is a tie (both under the timer's resolution), not
    0x; a real difference above it stays one."""
    records = [
        record("relora", seed, ttr=0.001, ready_step=0, test=0.6, search=0.001) for seed in (0, 1)
    ]
    records += [record("warm-start", seed, ttr=0.0, ready_step=0, test=0.6) for seed in (0, 1)]
    tie = summary.compare(summary.cells(records), records, baselines=["warm-start"])["mild"]
    assert tie.ratios["warm-start"].seconds == pytest.approx(1.0)
    assert tie.ratios["warm-start"].per_seed.mean == pytest.approx(1.0)
    assert not tie.wins_time, "a tie is not a win"
    slower = [
        *records[:2],
        *(record("warm-start", s, ttr=2.0, ready_step=10, test=0.6) for s in (0, 1)),
    ]
    found = summary.compare(summary.cells(slower), slower, baselines=["warm-start"])["mild"]
    assert found.ratios["warm-start"].seconds == pytest.approx(2.0 / summary.RESOLUTION)


def test_a_slower_or_less_accurate_method_is_reported_as_such() -> None:
    slow = [
        record("relora", 0, ttr=30.0, ready_step=150, test=0.60, search=5.0),
        record("warm-start", 0, ttr=20.0, ready_step=100, test=0.65),
    ]
    table = summary.cells(slow)
    comparison = summary.compare(table, slow, baselines=variants.BASELINES)["mild"]
    assert comparison.ratios["warm-start"].seconds == pytest.approx(20 / 30)
    assert not comparison.wins_time and not comparison.no_accuracy_loss
    lines = writing.claims(table["mild"], comparison)
    assert any("NOT faster" in line for line in lines)
    assert any("LOSES" in line for line in lines)
    assert any("-5.0 points" in line for line in lines)


def test_a_method_that_never_gets_ready_does_not_win() -> None:
    never = [
        record("relora", 0, ttr=None, ready_step=None, test=0.6, spent=40.0),
        record("warm-start", 0, ttr=None, ready_step=None, test=0.6, spent=80.0),
    ]
    table = summary.cells(never)
    comparison = summary.compare(table, never, baselines=variants.BASELINES)["mild"]
    assert comparison.ratios["warm-start"].bound == "?"
    assert not comparison.wins_time


def test_the_report_has_tables_plots_and_every_run(tmp_path: Path) -> None:
    table = summary.cells(RECORDS)
    comparisons = summary.compare(table, RECORDS, baselines=variants.BASELINES)
    context = writing.Context(
        command="relora bench --quick",
        mode="quick",
        seeds=[0, 1],
        wall_seconds=90.0,
        device="cpu",
        threads=2,
        testbed="examples/testbed",
        testbed_figures={"adapter": {"v1/adapter/test": 0.61, "v2-mild/adapter/test": 0.49}},
        budget=dict(variants.COMMON_FINETUNE),
        variants=[v for v in variants.VARIANTS if v.name in {"relora", "scratch"}],
    )
    written = writing.write(tmp_path, context, table, comparisons, RECORDS)
    text = written["markdown"].read_text()
    assert "| **relora** | 2/2 |" in text
    assert "warm-start/relora time to readiness: **1.83x**" in text
    assert "scratch/relora time to readiness: **>=" in text
    assert "v1 61.0%" in text
    for image in ("curves-mild.png", "trials-mild.png", "readiness.png"):
        assert (tmp_path / image).stat().st_size > 1000, image
        assert f"]({image})" in text
    document = json.loads(written["json"].read_text())
    assert len(document["runs"]) == len(RECORDS)
    assert document["comparisons"]["mild"]["best_baseline"] == "warm-start"
    assert document["context"]["variants"][0]["name"] in {"relora", "scratch"}


def test_every_variant_is_tried_first_by_some_seed() -> None:
    chosen = list(variants.VARIANTS[:4])
    firsts = {order_for(chosen, seed)[0].name for seed in range(4)}
    assert firsts == {v.name for v in chosen}
    assert sorted(v.name for v in order_for(chosen, 5)) == sorted(v.name for v in chosen)


def test_tuning_gives_every_strategy_six_candidates_and_one_rule(tmp_path: Path) -> None:
    from relora_lab.bench import tuning

    names = [v.name for v in tuning.grid()]
    counts = {
        s: sum(tuning.strategy_of(n) == s for n in names)
        for s in {"scratch", "warm-start", "relora"}
    }
    assert counts == {"scratch": 6, "warm-start": 6, "relora": 6}
    picked = ["warm-start@lr=0.006", "relora@lr=0.001"]
    assert [v.name for v in tuning.grid(picked)] == picked
    with pytest.raises(BadInput, match="unknown"):
        tuning.grid(["warm-start@lr=0.5"])
    assert len(set(names)) == len(names)
    assert not set(tuning.TUNING_SEEDS) & set(range(10)), "tuning seeds are not benchmark seeds"
    runs = [
        record("warm-start@lr=0.002", 100, ttr=20.0, ready_step=80, test=0.6),
        record("warm-start@lr=0.002", 101, ttr=22.0, ready_step=90, test=0.6),
        record("warm-start@lr=0.004", 100, ttr=15.0, ready_step=60, test=0.1),
        record("warm-start@lr=0.004", 101, ttr=None, ready_step=None, test=0.1, spent=40.0),
        record("relora@lr=0.002", 100, ttr=12.0, ready_step=40, test=0.6),
    ]
    best = tuning.select(runs)
    assert best["warm-start"].name == "warm-start@lr=0.002", "a censored run counts what it spent"
    assert best["relora"].name == "relora@lr=0.002"
    text = tuning.write(tmp_path, runs, command="relora bench --tune").read_text()
    assert "| **warm-start@lr=0.002** | 2/2 |" in text
    assert "| warm-start@lr=0.004 | 1/2 |" in text


def test_the_ratio_interval_is_students_t_on_the_logarithms() -> None:
    interval = summary.interval95([1.0, 2.0, 4.0])
    assert interval is not None
    low, high = interval
    # logs 0, ln 2, ln 4: mean ln 2, std ln 2; t(0.975, 2 df) = 4.3027
    half = 4.302653 * math.log(2) / math.sqrt(3)
    assert low == pytest.approx(2 * math.exp(-half), rel=1e-5)
    assert high == pytest.approx(2 * math.exp(half), rel=1e-5)
    assert summary.interval95([1.5, 1.5, 1.5]) == pytest.approx((1.5, 1.5))
    assert summary.interval95([2.0]) is None and summary.interval95([]) is None


def test_retargeting_rereads_readiness_from_the_history() -> None:
    run = record("warm-start", 0, ttr=20.0, ready_step=10, test=0.65)
    # source validation accuracy 0.6; history: step 0 at 0.5 (1.0 s), step 10 at 0.6 (20.0 s)
    lower = summary.retarget(run, 0.8)  # target 0.48: met at step 0
    assert (lower.ready, lower.ready_step, lower.time_to_readiness) == (True, 0, 1.0)
    assert lower.target == pytest.approx(0.48)
    strict = summary.retarget(run, 1.1)  # target 0.66: never met, censored at what it spent
    assert (strict.ready, strict.ready_step, strict.time_to_readiness) == (False, None, None)
    assert strict.spent_seconds == run.spent_seconds
    assert summary.retarget(run, 1.0).ready_step == 10


def test_a_report_is_resummarized_at_another_target_without_running(tmp_path: Path) -> None:
    context = writing.Context(
        command="relora bench",
        mode="full",
        seeds=[0, 1],
        wall_seconds=60.0,
        device="cpu",
        threads=2,
        testbed="examples/testbed",
        testbed_figures={},
        budget={"maxSteps": 200},
        variants=[v for v in variants.VARIANTS if v.name in ("relora", "warm-start")],
    )
    records = [r for r in RECORDS if r.variant in ("relora", "warm-start")]
    table = summary.cells(records)
    comparisons = summary.compare(table, records, baselines=variants.BASELINES)
    written = writing.write(tmp_path / "first", context, table, comparisons, records)
    again = session.resummarize(
        session.Options(
            from_reports=[str(written["json"])], target_fraction=0.8, out=str(tmp_path / "again")
        ),
        console=Console(file=io.StringIO()),
    )
    document = json.loads(again["json"].read_text())
    assert {r["ready_step"] for r in document["runs"]} == {0}, "every run met 0.48 at step 0"
    assert "0.8 x the old adapter" in again["markdown"].read_text()
    with pytest.raises(BadInput, match=r"--from-report .*: not a bench-report\.json"):
        session.resummarize(
            session.Options(from_reports=[str(tmp_path / "none.json")]),
            console=Console(file=io.StringIO()),
        )
