"""The search group: how trial configurations are chosen (Ray Tune search algorithms).

One dataclass per option (``conf/search/<type>.yaml`` extends it); each checks its own values and
builds its searcher.
"""

from __future__ import annotations

import functools
import importlib.util
from dataclasses import dataclass
from typing import Optional, Sequence

from omegaconf import MISSING

from yolotune.errors import ConfigError, check_range
from yolotune.schedulers import check_reduction_factor


@dataclass
class SearchConfig:
    type: str = MISSING
    extras = ()  # the modules the option needs: pip install 'yolotune[<type>]'
    replaces_scheduler = False  # True: build_scheduler() replaces the scheduler group's
    # Runs with several objectives: random search reads no metric, Ray's OptunaSearch takes a list of them;
    # HyperOpt and BOHB optimise one.
    multi_objective = False

    def check(self, exp) -> None:
        for module in self.extras:
            if importlib.util.find_spec(module) is None:
                raise ConfigError("search", self.type, f"needs {module}: pip install 'yolotune[{self.type}]'")
        grids = [name for name, d in exp.dists.items() if d.dist == "grid"]
        if grids and self.type != "random":
            raise ConfigError(f"space.{grids[0]}.dist", "grid", f"search={self.type} cannot grid; use choice or "
                                                                "search=random")

    def build(self, exp, max_concurrent: Optional[int] = None):
        """The Ray Tune searcher; ``max_concurrent``: the trials that may run at once (None: no limit)."""
        raise NotImplementedError


@dataclass
class RandomSearchConfig(SearchConfig):
    """Random sampling (and grid) from the space; reproducible with seed."""
    type: str = "random"
    multi_objective = True

    def build(self, exp, max_concurrent: Optional[int] = None):
        from ray.tune.search import BasicVariantGenerator

        # Ray applies TuneConfig.max_concurrent_trials to Searchers only, not to this generator: set it here.
        return BasicVariantGenerator(random_state=exp.seed, max_concurrent=max_concurrent or 0)


@dataclass
class OptunaSearchConfig(SearchConfig):
    """Optuna's TPE (multi-objective TPE with objectives)."""
    type: str = "optuna"
    n_startup_trials: int = 5  # random trials before TPE takes over

    extras = ("optuna",)
    multi_objective = True

    def check(self, exp) -> None:
        check_range("search.n_startup_trials", self.n_startup_trials, 0, None, "an integer >= 0", integer=True)
        super().check(exp)

    def build(self, exp, max_concurrent: Optional[int] = None):
        return optuna_search(exp.seed, self.n_startup_trials, list(exp.objectives))


def optuna_search(seed: Optional[int], n_startup_trials: int, objectives: Sequence[str] = ()):
    """Ray's OptunaSearch with TPE, skipping the results of epochs without validation (no metric, see
    trainable.py), on which Ray's would raise; with ``objectives`` (NAME:MODE), TPE on all of them (Optuna's
    multi-objective TPE), told each trial's last result (Ray's OptunaSearch reads no intermediate results
    then; the runner gives Tune no metric, which would replace the list). Not NSGA-II: Ray saves the
    searcher's state by pickling its sampler (Searcher.save), and Optuna's NSGA-II samplers hold a lock.
    A pickled searcher (tuner.pkl) is built again from its settings."""
    import optuna

    sampler = optuna.samplers.TPESampler(seed=seed, n_startup_trials=n_startup_trials)
    names, modes = zip(*(o.rsplit(":", 1) for o in objectives)) if objectives else (None, None)
    searcher = _validated_optuna_search()(sampler=sampler, metric=names and list(names), mode=modes and list(modes))
    searcher.rebuild = (seed, n_startup_trials, list(objectives))
    return searcher


@functools.lru_cache(maxsize=None)
def _validated_optuna_search():
    from ray.tune.search.optuna import OptunaSearch

    class ValidatedOptunaSearch(OptunaSearch):
        def on_trial_result(self, trial_id, result):
            if isinstance(self.metric, list) or self.metric in result:  # a list: Ray's skips every result
                super().on_trial_result(trial_id, result)

        def __reduce__(self):
            return optuna_search, self.rebuild

    return ValidatedOptunaSearch


@dataclass
class HyperoptSearchConfig(SearchConfig):
    """HyperOpt's TPE."""
    type: str = "hyperopt"
    n_initial_points: int = 5  # random trials before TPE takes over

    extras = ("hyperopt",)

    def check(self, exp) -> None:
        check_range("search.n_initial_points", self.n_initial_points, 0, None, "an integer >= 0", integer=True)
        super().check(exp)

    def build(self, exp, max_concurrent: Optional[int] = None):
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(n_initial_points=self.n_initial_points, random_state_seed=exp.seed)


@dataclass
class BohbSearchConfig(SearchConfig):
    """BOHB: TuneBOHB with its own HyperBand scheduler, which replaces the scheduler group's."""
    type: str = "bohb"
    reduction_factor: float = 3
    max_t: Optional[int] = None  # null: train.epochs

    extras = ("hpbandster", "ConfigSpace")
    replaces_scheduler = True

    def check(self, exp) -> None:
        if self.max_t is not None:
            check_range("search.max_t", self.max_t, 1, exp.epochs, f"between 1 and train.epochs ({exp.epochs})",
                        integer=True)
        check_reduction_factor("search.reduction_factor", self.reduction_factor)
        super().check(exp)

    def build(self, exp, max_concurrent: Optional[int] = None):
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(seed=exp.seed)

    def build_scheduler(self, exp):
        from ray.tune.schedulers import HyperBandForBOHB

        return HyperBandForBOHB(time_attr="epoch", max_t=self.max_t or exp.epochs,
                                reduction_factor=self.reduction_factor)
