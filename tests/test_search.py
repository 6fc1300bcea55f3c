"""The Optuna search: anchors first, budgets honoured, a retried run resumes the study."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import optuna

from relora_api.spec import Initialization, Range
from relora_trainer.method import search
from relora_trainer.method.config import SearchConfig


def _init(**fields: Any) -> SearchConfig:
    return SearchConfig.of(Initialization(**fields))


def _bowl(coefficients: search.Coefficients) -> float:
    """A smooth objective with its minimum at alpha=0.7, beta=-0.4 in every group."""
    return sum((a - 0.7) ** 2 + (b + 0.4) ** 2 for a, b in coefficients.values())


def test_anchor_trials_come_first_and_the_best_is_returned() -> None:
    config = _init(trials=12, sampler="gp")
    result = search.run_search(groups=["all"], config=config, seed=0, objective=_bowl)
    assert [t.params for t in result.trials[:2]] == [
        {"alpha": 1.0, "beta": 0.0},
        {"alpha": 1.0, "beta": -1.0},
    ]
    assert len(result.trials) == 12
    best = min(t.value for t in result.trials if t.value is not None)
    assert result.best_value == best
    assert _bowl(result.coefficients) == best
    assert best < _bowl({"all": (1.0, 0.0)}), "the search must improve on the anchors"


def test_anchors_are_clipped_to_the_ranges() -> None:
    config = _init(trials=2, alpha=Range(min=0, max=0.5), beta=Range(min=0.1, max=0.2))
    result = search.run_search(groups=["all"], config=config, seed=0, objective=_bowl)
    assert result.trials[0].params == {"alpha": 0.5, "beta": 0.1}


def test_groups_get_their_own_coefficients() -> None:
    config = _init(trials=4, sampler="random")
    result = search.run_search(groups=["q_proj", "v_proj"], config=config, seed=0, objective=_bowl)
    assert set(result.trials[0].params) == {
        "alpha.q_proj",
        "beta.q_proj",
        "alpha.v_proj",
        "beta.v_proj",
    }
    assert set(result.coefficients) == {"q_proj", "v_proj"}


def test_a_retry_resumes_the_study_from_its_journal(tmp_path: Path) -> None:
    journal = tmp_path / "search.journal"
    calls: list[search.Coefficients] = []

    def objective(coefficients: search.Coefficients) -> float:
        calls.append(coefficients)
        return _bowl(coefficients)

    first = _init(trials=3, sampler="tpe")
    search.run_search(groups=["all"], config=first, seed=0, objective=objective, journal=journal)
    assert len(calls) == 3
    # A trial left RUNNING by a crash is marked failed, not re-run forever.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    study = optuna.load_study(study_name=search.STUDY_NAME, storage=storage)
    study.ask()
    again = _init(trials=6, sampler="tpe")
    result = search.run_search(
        groups=["all"], config=again, seed=0, objective=objective, journal=journal
    )
    assert len(calls) == 5, "3 done + 1 failed count toward 6: only 2 more run"
    assert [t.state for t in result.trials].count("FAIL") == 1
    assert result.seconds > 0


def test_non_finite_objective_fails_the_trial_and_falls_back() -> None:
    config = _init(trials=2, sampler="random")
    result = search.run_search(
        groups=["all"], config=config, seed=0, objective=lambda c: float("nan")
    )
    assert {t.state for t in result.trials} == {"FAIL"}
    assert result.coefficients == {"all": (1.0, 0.0)} and result.best_value is None


def test_a_journal_torn_by_a_crash_loses_only_its_last_record(tmp_path: Path) -> None:
    journal = tmp_path / "search.journal"
    first = _init(trials=3, sampler="tpe")
    search.run_search(groups=["all"], config=first, seed=0, objective=_bowl, journal=journal)
    lines = journal.read_bytes().splitlines(keepends=True)
    journal.write_bytes(b"".join(lines[:-1]) + lines[-1][: len(lines[-1]) // 2])  # torn write
    again = _init(trials=5, sampler="tpe")
    result = search.run_search(
        groups=["all"], config=again, seed=0, objective=_bowl, journal=journal
    )
    assert len([t for t in result.trials if t.state == "COMPLETE"]) >= 4
    # The journal stays readable for the next retry too.
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    assert len(optuna.load_study(study_name=search.STUDY_NAME, storage=storage).trials) >= 5
