"""The scheduler group: the Ray Tune trial scheduler. Time is counted in epochs."""

from __future__ import annotations

from typing import Any, Dict

from yolotune.space import RANGE_DISTS, Dist, to_ray_space


def build_scheduler(sched, search, epochs: int, space: Dict[str, Dist]):
    from ray.tune import schedulers

    max_t = getattr(sched, "max_t", None) or epochs
    if search.type == "bohb":  # BOHB's searcher needs its own HyperBand variant
        return schedulers.HyperBandForBOHB(time_attr="epoch", max_t=max_t,
                                           reduction_factor=getattr(sched, "reduction_factor", 3))
    if sched.type == "asha":
        return schedulers.ASHAScheduler(time_attr="epoch", max_t=max_t, grace_period=sched.grace_period,
                                        reduction_factor=sched.reduction_factor, brackets=sched.brackets)
    if sched.type == "hyperband":
        return schedulers.HyperBandScheduler(time_attr="epoch", max_t=max_t, reduction_factor=sched.reduction_factor)
    if sched.type == "median":
        return schedulers.MedianStoppingRule(time_attr="epoch", grace_period=sched.grace_period,
                                             min_samples_required=sched.min_samples_required)
    if sched.type == "pbt":
        return schedulers.PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=sched.perturbation_interval,
            hyperparam_mutations=to_ray_space(space), custom_explore_fn=ClipToSpace(space),
            quantile_fraction=sched.quantile_fraction, resample_probability=sched.resample_probability)
    return schedulers.FIFOScheduler()


class ClipToSpace:
    """PBT's explore step multiplies values by 0.8 or 1.2, which can leave the space (lrf 1.1 makes
    Ultralytics raise): bring each mutated value back inside its distribution's bounds."""

    def __init__(self, space: Dict[str, Dist]):
        self.bounds = {name: d for name, d in space.items() if d.dist in RANGE_DISTS}

    def __call__(self, config: Dict[str, Any]) -> Dict[str, Any]:
        for name, d in self.bounds.items():
            if name in config:
                value = min(max(config[name], d.low), d.high)
                config[name] = int(round(value)) if d.dist in ("randint", "qrandint") else value
        return config
