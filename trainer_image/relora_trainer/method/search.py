"""Bayesian optimization of the fusion coefficients with Optuna.

The study lives in a journal file next to the outputs, so a retried pod resumes it: completed
trials are kept, a trial cut short by the crash is marked failed, and only the rest of the budget
runs. Two anchor trials go first: (alpha=1, beta=0), the old adapter as is, and (alpha=1,
beta=-1), the old adapter with the base evolution undone in its subspace (both clipped to the
ranges); the search can therefore only improve on reusing the old adapter.

Early stopping (``patience``): the search stops once ``patience`` completed trials in a row,
counted after the best trial so far, have not improved on its value (strictly lower). The
anchors count as trials: with the first anchor best, ``1 + patience`` trials run. The count
comes from the stored trials, so a resumed study that already meets it runs no further trial.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.storages import JournalStorage
from optuna.storages.journal import JournalFileBackend
from optuna.trial import TrialState

from relora_trainer.method.config import Bounds, SearchConfig

Coefficients = dict[str, tuple[float, float]]
STUDY_NAME = "relora-initialization"


@dataclass(frozen=True)
class TrialRecord:
    number: int
    params: dict[str, float]
    value: float | None
    state: str


@dataclass
class SearchResult:
    coefficients: Coefficients
    best_value: float | None
    trials: list[TrialRecord] = field(default_factory=list)
    seconds: float = 0.0
    # The searched start was worse than the old adapter's on the readiness metric, so the
    # fine-tuning started from the old adapter (spec.method.initialization.fallback).
    fell_back: bool = False
    # Fewer than `trials` trials ran: `patience` trials in a row did not improve on the best.
    stopped_early: bool = False
    # No trial ran: the old adapter already met the readiness target on the target base, so
    # the start is the old adapter (spec.method.initialization.skipWhenReady).
    skipped: bool = False


def _names(group: str, groups: Sequence[str]) -> tuple[str, str]:
    if len(groups) == 1:
        return "alpha", "beta"
    return f"alpha.{group}", f"beta.{group}"


def _clip(value: float, bounds: Bounds) -> float:
    return min(max(value, bounds.min), bounds.max)


def _sampler(config: SearchConfig, seed: int) -> optuna.samplers.BaseSampler:
    startup = max(2, min(10, config.trials // 3))
    if config.sampler == "gp":
        with warnings.catch_warnings():  # deterministic_objective is marked experimental
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.samplers.GPSampler(
                seed=seed, n_startup_trials=startup, deterministic_objective=True
            )
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=startup)
    return optuna.samplers.RandomSampler(seed=seed)


def _without_improvement(study: optuna.Study) -> int:
    """Completed trials after the best one (the first to reach the lowest value): the trials in
    a row that did not improve on it. Failed trials are not counted."""
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    best: float | None = None
    since = 0
    for trial in sorted(complete, key=lambda t: t.number):
        value = trial.value
        if value is not None and math.isfinite(value) and (best is None or value < best):
            best, since = value, 0
        else:
            since += 1
    return since if best is not None else 0


def _patience_met(study: optuna.Study, patience: int | None) -> bool:
    return patience is not None and _without_improvement(study) >= patience


def coefficients_of(params: dict[str, float], groups: Sequence[str]) -> Coefficients:
    result = {}
    for group in groups:
        alpha, beta = _names(group, groups)
        result[group] = (float(params[alpha]), float(params[beta]))
    return result


def run_search(
    *,
    groups: Sequence[str],
    config: SearchConfig,
    seed: int,
    objective: Callable[[Coefficients], float],
    journal: Path | None = None,
    on_trial: Callable[[int, int, float | None], None] | None = None,
    study_name: str = STUDY_NAME,
) -> SearchResult:
    """Minimize ``objective`` over per-group (alpha, beta); resume from ``journal`` if present."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage: JournalStorage | None = None
    if journal is not None:
        journal.parent.mkdir(parents=True, exist_ok=True)
        _drop_torn_tail(journal)
        storage = JournalStorage(JournalFileBackend(str(journal)))
    study = optuna.create_study(
        study_name=study_name,
        storage=storage,
        direction="minimize",
        sampler=_sampler(config, seed),
        load_if_exists=True,
    )
    for trial in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        study.tell(trial.number, state=TrialState.FAIL)  # cut short by a crash
    if not study.trials:
        for beta in (0.0, -1.0):
            anchor = {}
            for group in groups:
                alpha_name, beta_name = _names(group, groups)
                anchor[alpha_name] = _clip(1.0, config.alpha)
                anchor[beta_name] = _clip(beta, config.beta)
            study.enqueue_trial(anchor, skip_if_exists=True)

    done = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))
    previous_seconds = _spent(study)
    remaining = max(config.trials - done, 0)

    def run_trial(trial: optuna.Trial) -> float:
        params = {}
        for group in groups:
            alpha_name, beta_name = _names(group, groups)
            params[alpha_name] = trial.suggest_float(alpha_name, config.alpha.min, config.alpha.max)
            params[beta_name] = trial.suggest_float(beta_name, config.beta.min, config.beta.max)
        value = objective(coefficients_of(params, groups))
        return value if math.isfinite(value) else float("nan")

    def report(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if on_trial is not None:
            on_trial(trial.number + 1, config.trials, trial.value)

    def stop_early(study: optuna.Study, trial: optuna.trial.FrozenTrial) -> None:
        if _patience_met(study, config.patience):
            study.stop()

    time_left = config.timeout_seconds - previous_seconds
    if remaining and time_left > 0 and not _patience_met(study, config.patience):
        study.optimize(
            run_trial,
            n_trials=remaining,
            timeout=time_left,
            callbacks=[report, stop_early],
            catch=(),
        )
    ran = len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.FAIL)))
    stopped_early = ran < config.trials and _patience_met(study, config.patience)
    records = [
        TrialRecord(t.number, dict(t.params), t.value, t.state.name)
        for t in study.get_trials(deepcopy=False)
    ]
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if complete:
        best = min(complete, key=lambda t: float(t.value if t.value is not None else math.inf))
        coefficients, best_value = coefficients_of(best.params, groups), best.value
    else:  # nothing finished: fall back to the old adapter as is
        coefficients = {g: (_clip(1.0, config.alpha), _clip(0.0, config.beta)) for g in groups}
        best_value = None
    return SearchResult(
        coefficients, best_value, records, _spent(study), stopped_early=stopped_early
    )


def _drop_torn_tail(journal: Path) -> None:
    """Cut a last line a crash left half-written: the journal is one JSON record per line, and
    the next record appended to a torn line would make the whole file unreadable."""
    if not journal.is_file():
        return
    data = journal.read_bytes()
    if data and not data.endswith(b"\n"):
        journal.write_bytes(data[: data.rfind(b"\n") + 1])


def _spent(study: optuna.Study) -> float:
    """Seconds spent in finished trials, across every attempt that worked on this study."""
    total = 0.0
    for trial in study.get_trials(deepcopy=False):
        if trial.datetime_start is not None and trial.datetime_complete is not None:
            total += (trial.datetime_complete - trial.datetime_start).total_seconds()
    return total
