"""The scheduler group: the Ray Tune trial scheduler. Time is counted in epochs."""

from __future__ import annotations

from typing import Any, Dict


def build_scheduler(sched, search, epochs: int, ray_space: Dict[str, Any]):
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
            hyperparam_mutations=ray_space, quantile_fraction=sched.quantile_fraction,
            resample_probability=sched.resample_probability)
    return schedulers.FIFOScheduler()
