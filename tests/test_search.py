"""The Optuna search: anchors first, budgets honoured, a retried run resumes the study."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path
from typing import Any

import optuna
import pytest

from relora_api import validation
from relora_api.spec import Initialization, Range
from relora_trainer.method import search
from relora_trainer.method.config import SearchConfig


def _init(**fields: Any) -> SearchConfig:
    return SearchConfig.of(Initialization(**fields))


def _bowl(coefficients: search.Coefficients) -> float:
    """A smooth objective with its minimum at alpha=0.7, beta=-0.4 in every group."""
    return sum((a - 0.7) ** 2 + (b + 0.4) ** 2 for a, b in coefficients.values())


def test_anchor_trials_come_first_and_the_best_is_returned() -> None:
    config = _init(trials=12, sampler="gp", patience=500)  # every trial: no early stop
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


def _patient(trials: int, patience: int | None) -> SearchConfig:
    return replace(_init(trials=trials, sampler="random"), patience=patience)


def test_the_search_stops_after_patience_trials_without_improvement() -> None:
    """The first anchor (the old adapter as is) is the best start: after it, ``patience``
    trials in a row do not improve on it and the search stops, the anchors counted."""

    def anchor_best(coefficients: search.Coefficients) -> float:
        (alpha, beta), *_ = coefficients.values()
        return 0.0 if (alpha, beta) == (1.0, 0.0) else 1.0 + abs(alpha) + abs(beta)

    for patience in (1, 3):
        result = search.run_search(
            groups=["all"], config=_patient(10, patience), seed=0, objective=anchor_best
        )
        assert len(result.trials) == 1 + patience, patience
        assert result.stopped_early
        assert result.coefficients == {"all": (1.0, 0.0)} and result.best_value == 0.0


def test_ties_do_not_count_as_improvements_and_failures_do_not_count() -> None:
    values = iter([2.0, 1.0, 1.0, float("nan"), 3.0, 0.5, 9.0, 9.0, 9.0])
    result = search.run_search(
        groups=["all"], config=_patient(9, 2), seed=0, objective=lambda c: next(values)
    )
    # Best 1.0 at trial 1; the tie and 3.0 make two in a row (the failure between them not
    # counted), so the 0.5 never runs.
    assert [t.value for t in result.trials] == [2.0, 1.0, 1.0, None, 3.0]
    assert result.stopped_early


def test_a_search_that_keeps_improving_runs_every_trial() -> None:
    values = iter([10.0 - i for i in range(8)])
    result = search.run_search(
        groups=["all"], config=_patient(8, 1), seed=0, objective=lambda c: next(values)
    )
    assert len(result.trials) == 8 and not result.stopped_early


def test_stopping_on_the_last_trial_is_not_early() -> None:
    result = search.run_search(
        groups=["all"], config=_patient(3, 2), seed=0, objective=lambda c: 1.0
    )
    assert len(result.trials) == 3 and not result.stopped_early


def test_without_patience_every_trial_runs() -> None:
    for config in (_patient(8, None), _init(trials=8, sampler="random", patience=500)):
        result = search.run_search(groups=["all"], config=config, seed=0, objective=lambda c: 1.0)
        assert len(result.trials) == 8 and not result.stopped_early


def test_a_resumed_search_counts_the_patience_from_the_journal(tmp_path: Path) -> None:
    journal = tmp_path / "search.journal"
    calls: list[search.Coefficients] = []

    def flat(coefficients: search.Coefficients) -> float:
        calls.append(coefficients)
        return 1.0

    first = search.run_search(
        groups=["all"], config=_patient(10, 2), seed=0, objective=flat, journal=journal
    )
    assert len(calls) == 3 and first.stopped_early
    # A retry (here with a larger budget) already meets the stop condition: no new trial.
    again = search.run_search(
        groups=["all"], config=_patient(16, 2), seed=0, objective=flat, journal=journal
    )
    assert len(calls) == 3 and len(again.trials) == 3 and again.stopped_early
    storage = optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))
    )
    assert len(optuna.load_study(study_name=search.STUDY_NAME, storage=storage).trials) == 3
    # A retry that stopped one trial short of the condition runs just one more.
    other = tmp_path / "other.journal"
    search.run_search(groups=["all"], config=_patient(2, 2), seed=0, objective=flat, journal=other)
    assert len(calls) == 5
    resumed = search.run_search(
        groups=["all"], config=_patient(10, 2), seed=0, objective=flat, journal=other
    )
    assert len(calls) == 6 and len(resumed.trials) == 3 and resumed.stopped_early


@pytest.mark.parametrize("patience", [0, 501])
def test_the_api_refuses_a_patience_out_of_range_naming_the_field(
    patience: int, manifest: dict[str, Any]
) -> None:
    manifest["spec"].setdefault("method", {}).setdefault("initialization", {})
    manifest["spec"]["method"]["initialization"]["patience"] = patience
    migration, problems = validation.validate_manifest(manifest)
    assert migration is None
    assert [p.path for p in problems] == ["spec.method.initialization.patience"], problems


def test_the_api_default_patience_reaches_the_search_config() -> None:
    assert SearchConfig.of(Initialization()).patience == 4
    assert SearchConfig.of(Initialization(patience=7)).patience == 7
    # null is unset, as for every field: the default, not "no patience".
    assert Initialization.model_validate({"patience": None}).patience == 4
