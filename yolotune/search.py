"""The search group: the Ray Tune search algorithm."""

from __future__ import annotations

from typing import Optional


def build_search(search, seed: Optional[int]):
    if search.type == "optuna":
        import optuna
        from ray.tune.search.optuna import OptunaSearch

        return OptunaSearch(sampler=optuna.samplers.TPESampler(seed=seed, n_startup_trials=search.n_startup_trials))
    if search.type == "hyperopt":
        from ray.tune.search.hyperopt import HyperOptSearch

        return HyperOptSearch(n_initial_points=search.n_initial_points, random_state_seed=seed)
    if search.type == "bohb":
        from ray.tune.search.bohb import TuneBOHB

        return TuneBOHB(seed=seed)
    from ray.tune.search import BasicVariantGenerator

    return BasicVariantGenerator(random_state=seed)
