"""relora: adaptive initialization (a Bayesian search over the fusion coefficients of the old
update and the base evolution), then fine-tuning pulled toward that start by the scheduled
regularizer."""

from __future__ import annotations

import time
from dataclasses import replace

from relora_trainer import adapters
from relora_trainer.method import fusion, search
from relora_trainer.method.quality import Quality
from relora_trainer.method.search import Coefficients, SearchResult
from relora_trainer.method.strategies.base import Context, old_update, with_magnitudes


class Relora:
    name = "relora"
    trains = True
    regularized = True

    def initialize(self, context: Context) -> SearchResult | None:
        """Search the fusion coefficients, then load the best fused adapter into the model;
        without a search (no trials, or the old adapter already meets the readiness target),
        the old adapter."""
        config = context.search
        if config.trials == 0 or (config.skip_when_ready and context.ready_before):
            old_update(context)  # neither the evolution nor a trial: nothing to gain
            # No search ran: loading the old adapter is warm-start's own start, which no
            # strategy counts in its time to readiness (on SmolLM2-135M it took 40 ms, and
            # made a tie at step 0 read as 0.26x).
            return SearchResult(
                coefficients=_anchor(["all"]), best_value=None, seconds=0.0, skipped=True
            )
        terms = context.evolution(config.projection)
        groups = terms.groups(config.granularity)
        by_choice = config.objective == "choice-loss" or (
            config.objective == "lookahead" and context.metric == "accuracy"
        )

        def fused(coefficients: Coefficients) -> fusion.Start:
            start = fusion.fuse_all(
                terms, coefficients, granularity=config.granularity, layout=context.layout
            )
            return with_magnitudes(context, start, terms, config.magnitude)

        def load(coefficients: Coefficients) -> None:
            start = fused(coefficients)
            adapters.load_factors(context.model, start.factors, start.saved)

        starts: dict[tuple[tuple[str, tuple[float, float]], ...], Quality] = {}

        def objective(coefficients: Coefficients) -> float:
            load(coefficients)
            if config.objective == "lookahead":
                context.look_ahead()
            measured = context.measure(by_choice)
            if config.objective != "lookahead":  # the start itself was measured: keep it
                starts[_key(coefficients)] = measured
            if by_choice and measured.choice_loss is not None:
                return measured.choice_loss
            return measured.loss

        result = search.run_search(
            groups=groups,
            config=config,
            seed=context.seed,
            objective=objective,
            journal=context.journal,
            study_name=context.study_name,
            on_trial=context.on_trial,
        )
        load(result.coefficients)
        if config.fallback and result.coefficients != _anchor(groups):
            started = time.perf_counter()

            def quality_of(coefficients: Coefficients) -> float:
                """The start's readiness metric: from its trial when that measured it (the
                trials of choice-loss score accuracy too), else measured now."""
                known = starts.get(_key(coefficients))
                if known is not None and (context.metric == "loss" or known.accuracy is not None):
                    return known.value(context.metric)
                load(coefficients)
                return context.measure(True).value(context.metric)

            searched = quality_of(result.coefficients)
            anchor = quality_of(_anchor(groups))
            worse = searched > anchor if context.metric == "loss" else searched < anchor
            if worse:
                result = replace(result, coefficients=_anchor(groups), fell_back=True)
            load(result.coefficients)
            result.seconds += time.perf_counter() - started  # the check is part of the search
        return result

    def starts_as_old(self, result: SearchResult | None) -> bool:
        """Without a search (``skipped``): a start searched, even the anchor, is fused."""
        return result is not None and result.skipped


def _key(coefficients: Coefficients) -> tuple[tuple[str, tuple[float, float]], ...]:
    return tuple(sorted(coefficients.items()))


def _anchor(groups: list[str]) -> Coefficients:
    """The old adapter as it is: alpha 1, beta 0 in every group."""
    return {group: (1.0, 0.0) for group in groups}
