"""Which tuned parameters mattered: each one's share of the ranking metric's variance across trials.

Optuna's fANOVA evaluator (a random forest fitted to the trials, its variance decomposed per
parameter) judges an in-memory Optuna study built from the trials: each trial's sampled parameters
in distributions taken from the experiment's space (a choice as categories, a loguniform on its log
scale), and its best validated value of the metric as the study's value. A trial stopped early
counts at the best of the epochs it reached, as in the ranking; so does a trial still running (its
best so far); an errored trial is left out. Optuna and scikit-learn are imported here only, when
importance is computed (``pip install 'yolotune[importance]'``).
"""

from __future__ import annotations

import importlib.util
import math
import random
import weakref
from dataclasses import dataclass, field
from typing import Dict, Optional

from yolotune.layout import count
from yolotune.results import ExperimentResults
from yolotune.space import Dist

METHOD = "Optuna's fANOVA"
MIN_TRIALS = 5  # fewer trials than this: a forest fitted to them says nothing
TREES, SEED = 64, 0  # Optuna's default forest, seeded: the same experiment gets the same importances
MAX_FITTED, BEST_FITTED = 256, 64  # past MAX_FITTED trials: the best BEST_FITTED and a random sample of the rest
COUNTED = "each trial's best validated value; trials stopped early or still running at the epochs they reached; " \
          "errored trials left out"


@dataclass(frozen=True)
class Importance:
    """Each tuned parameter's importance for ``metric`` (summing to 1, largest first), or ``reason``,
    a phrase such as "cannot be judged yet: ...", why there is none (then ``values`` is empty)."""
    metric: str
    mode: str
    trials: int  # the trials it was judged on
    values: Dict[str, float] = field(default_factory=dict)
    reason: Optional[str] = None
    method: str = METHOD
    fitted: int = 0  # of ``trials``, those the forest was fitted on (all, up to MAX_FITTED)

    @property
    def sampled(self) -> Optional[str]:
        """Which trials the forest was fitted on when not all of them; None when all were."""
        if self.fitted >= self.trials or not self.values:
            return None
        return (f"fitted on {self.fitted} of {self.trials} trials: the best {BEST_FITTED} and "
                f"{self.fitted - BEST_FITTED} drawn at random from the rest")

    def as_json(self) -> dict:
        return {"metric": self.metric, "mode": self.mode, "method": self.method, "trials": self.trials,
                "fitted": self.fitted, "trees": TREES if self.values else 0, "sampled": self.sampled,
                "counted": COUNTED, "importance": dict(self.values), "reason": self.reason}


# A results object is a snapshot: its plot, its report and the command line ask for the same importance.
_judged: "weakref.WeakKeyDictionary[ExperimentResults, Dict[tuple, Importance]]" = weakref.WeakKeyDictionary()


def importance(results: ExperimentResults, metric: Optional[str] = None, mode: Optional[str] = None) -> Importance:
    """The parameters' importance for ``metric`` (default: the results' ranking metric)."""
    metric, mode = results.resolve(metric, mode)
    judged = _judged.setdefault(results, {})
    if (metric, mode) not in judged:
        judged[metric, mode] = _judge(results, metric, mode)
    return judged[metric, mode]


def _judge(results: ExperimentResults, metric: str, mode: str) -> Importance:
    trials = results.dataframe(metric, mode)
    space = results.space
    used = trials[(trials["status"] != "ERROR") & trials[f"best_{metric}"].map(_finite)]
    used = used.dropna(subset=[name for name, dist in space.items() if dist.values is None])  # never sampled

    def cannot(reason: str) -> Importance:
        return Importance(metric, mode, len(used), reason=reason)

    if not space:
        return cannot("cannot be judged: no tuned parameters")
    if len(used) < MIN_TRIALS:
        return cannot(f"cannot be judged yet: {count(len(used), 'trial')} with a value of {metric} (errored ones left out); "
                      f"it needs at least {MIN_TRIALS}")
    if used[f"best_{metric}"].nunique() < 2:
        return cannot(f"cannot be judged yet: every trial has the same {metric}")
    missing = [name for name in ("optuna", "sklearn") if importlib.util.find_spec(name) is None]
    if missing:
        return cannot(f"needs {' and '.join(missing)}: pip install 'yolotune[importance]'")
    fitted = _fitted(used, f"best_{metric}", mode)
    values = _fanova(space, fitted, f"best_{metric}")
    return Importance(metric, mode, len(used), {name: float(v) for name, v in values.items()}, fitted=len(fitted))


def _fitted(trials, key: str, mode: str):
    """The trials the forest is fitted on: all of them up to MAX_FITTED; past it the best BEST_FITTED
    and MAX_FITTED - BEST_FITTED of the rest drawn at random (seeded), in their record order."""
    if len(trials) <= MAX_FITTED:
        return trials
    ranked = trials[key].sort_values(ascending=mode == "min", kind="stable")
    best = list(ranked.index[:BEST_FITTED])
    drawn = random.Random(SEED).sample(list(ranked.index[BEST_FITTED:]), MAX_FITTED - BEST_FITTED)
    return trials.loc[sorted(best + drawn, key=trials.index.get_loc)]


def _fanova(space: Dict[str, Dist], trials, key: str) -> Dict[str, float]:
    import optuna
    from optuna.importance import FanovaImportanceEvaluator, get_param_importances

    distributions = {name: _distribution(dist, trials[name]) for name, dist in space.items()}
    study_trials = [
        optuna.trial.create_trial(params={name: _param(space[name], row[name]) for name in space},
                                  distributions=distributions, value=float(row[key]))
        for _, row in trials.iterrows()]
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # not "A new study created in memory" on every report
    try:
        study = optuna.create_study()  # fANOVA decomposes the values' variance: no direction matters
    finally:
        optuna.logging.set_verbosity(verbosity)
    study.add_trials(study_trials)
    return get_param_importances(study, evaluator=FanovaImportanceEvaluator(n_trees=TREES, seed=SEED))


def _distribution(dist: Dist, sampled):
    """The Optuna distribution of a space entry covering every sampled value. Choices are their values'
    text, as the plots show them; a loguniform is its values' log10: Optuna's fANOVA measures a range on
    its linear scale, where the top decade of loguniform(1e-5, 1e-1) would be 90 % of it, though the
    search sampled it a quarter of the time."""
    from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

    dist = dist.covering(sampled)
    if dist.values is not None:
        return CategoricalDistribution([str(v) for v in dist.values])
    low, high = _param(dist, dist.low), _param(dist, dist.high)
    if dist.dist in ("randint", "qrandint"):
        return IntDistribution(low, high)
    return FloatDistribution(low, high)


def _param(dist: Dist, value):
    if dist.values is not None:
        return str(value)
    if dist.dist == "loguniform":
        return math.log10(value)
    return int(value) if dist.dist in ("randint", "qrandint") else float(value)


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)
