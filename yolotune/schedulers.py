"""The scheduler group: when trials stop early. Time is counted in epochs.

One dataclass per option (``conf/scheduler/<type>.yaml`` extends it); each checks its own values
against the experiment and builds its Ray Tune scheduler. Adding a scheduler = one class here and
one YAML file.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Dict, Optional, Set

from omegaconf import MISSING

from yolotune.errors import ConfigError, check_range
from yolotune.space import RANGE_DISTS, Dist, to_ray_space


@dataclass
class SchedulerConfig:
    type: str = MISSING
    # Decides on each epoch's validation metrics (val=true needed); FIFO only ranks trials at the end.
    needs_validation = True
    # Stops poor trials before train.epochs (what the live view calls "stopped early").
    stops_early = True
    # A trial resumes from its newest checkpoint; PBT also clones other trials' checkpoints.
    checkpoints_to_keep = 1
    # PBT: a trial may go on from a checkpoint of a trial that has ended since, so checkpoint.keep
    # prunes only when the experiment ends (retention.py)
    clones_checkpoints = False
    # Runs with several objectives: Ray's ASHA, HyperBand, median stopping and PBT compare one metric;
    # FIFO compares none.
    multi_objective = False

    def trial_epochs(self, exp) -> int:
        """The most epochs a trial trains."""
        return getattr(self, "max_t", None) or exp.epochs

    def decision_epochs(self, exp) -> Optional[Set[int]]:
        """The epochs at which the scheduler may read the metric (trials validate only there, see
        ``validate``), the last included; None: any epoch (every epoch validates)."""
        return None

    def check(self, exp) -> None:
        """Raise ConfigError for values Ray would reject (or that make no sense for ``exp``)."""

    def build(self, exp, space: Dict[str, Dist]):
        raise NotImplementedError


def _check_epochs(key: str, value: Optional[int], epochs: int) -> None:
    if value is not None:
        check_range(key, value, 1, epochs, f"between 1 and train.epochs ({epochs})", integer=True)


def check_reduction_factor(key: str, value: float) -> None:
    check_range(key, value, 1, None, "a number greater than 1")
    if value == 1:
        raise ConfigError(key, value, "a number greater than 1")


@dataclass
class AshaConfig(SchedulerConfig):
    """Asynchronous successive halving: stops poor trials at rungs grace_period * reduction_factor^k."""
    type: str = "asha"
    grace_period: int = 10
    reduction_factor: float = 3
    max_t: Optional[int] = None  # null: train.epochs
    brackets: int = 1

    def check(self, exp) -> None:
        _check_epochs("scheduler.grace_period", self.grace_period, exp.epochs)
        _check_epochs("scheduler.max_t", self.max_t, exp.epochs)
        if self.max_t is not None and self.grace_period > self.max_t:
            raise ConfigError("scheduler.grace_period", self.grace_period, f"at most scheduler.max_t ({self.max_t})")
        check_reduction_factor("scheduler.reduction_factor", self.reduction_factor)
        check_range("scheduler.brackets", self.brackets, 1, 10, "an integer from 1 to 10", integer=True)

    def decision_epochs(self, exp) -> Set[int]:
        # Ray's rungs (async_hyperband._Bracket), bracket s: grace * rf^(k+s); a trial's result counts
        # at a rung from the first epoch >= it, which is its ceiling.
        import numpy as np  # Ray's arithmetic, to the last bit

        max_t, rf = self.trial_epochs(exp), self.reduction_factor
        rungs = {math.ceil(self.grace_period * rf ** (k + s)) for s in range(self.brackets)
                 for k in range(int(np.log(max_t / self.grace_period) / np.log(rf) - s + 1))}
        return rungs | {max_t}

    def build(self, exp, space):
        from ray.tune.schedulers import ASHAScheduler

        return ASHAScheduler(time_attr="epoch", max_t=self.max_t or exp.epochs, grace_period=self.grace_period,
                             reduction_factor=self.reduction_factor, brackets=self.brackets)


@dataclass
class FifoConfig(SchedulerConfig):
    """No early stopping: every trial trains train.epochs."""
    type: str = "fifo"
    needs_validation = False
    stops_early = False
    multi_objective = True

    def decision_epochs(self, exp) -> Set[int]:
        return {exp.epochs}  # the final result ranks the trial

    def build(self, exp, space):
        from ray.tune.schedulers import FIFOScheduler

        return FIFOScheduler()


@dataclass
class HyperbandConfig(SchedulerConfig):
    """Synchronous HyperBand."""
    type: str = "hyperband"
    reduction_factor: float = 3
    max_t: Optional[int] = None  # null: train.epochs

    def check(self, exp) -> None:
        _check_epochs("scheduler.max_t", self.max_t, exp.epochs)
        check_reduction_factor("scheduler.reduction_factor", self.reduction_factor)

    def decision_epochs(self, exp) -> Set[int]:
        # Ray's brackets (hyperband.HyperBandScheduler / _Bracket): bracket s starts at r0 = int(max_t * rf^-s)
        # and pauses its trials at r0, then r = int(min(r * rf, max_t)) for s halvings; a trial trains
        # epoch after epoch from its last checkpoint, so it reports each milestone itself.
        import numpy as np  # Ray's arithmetic, to the last bit

        max_t, rf = self.trial_epochs(exp), self.reduction_factor
        milestones = {max_t}
        for s in range(int(np.round(np.log(max_t) / np.log(rf))) + 1):
            r = int(max_t * rf ** (-s))
            if r == 0:  # Ray skips such a bracket
                continue
            milestones.add(r)
            for _ in range(s):
                r = int(min(r * rf, max_t))
                milestones.add(r)
        return milestones

    def build(self, exp, space):
        from ray.tune.schedulers import HyperBandScheduler

        return HyperBandScheduler(time_attr="epoch", max_t=self.max_t or exp.epochs,
                                  reduction_factor=self.reduction_factor)


@dataclass
class MedianConfig(SchedulerConfig):
    """Median stopping rule: stop a trial whose best result is below the median of the others'."""
    type: str = "median"
    grace_period: int = 10
    min_samples_required: int = 3

    def check(self, exp) -> None:
        _check_epochs("scheduler.grace_period", self.grace_period, exp.epochs)
        check_range("scheduler.min_samples_required", self.min_samples_required, 1, None, "an integer >= 1",
                    integer=True)

    def build(self, exp, space):
        from ray.tune.schedulers import MedianStoppingRule

        return MedianStoppingRule(time_attr="epoch", grace_period=self.grace_period,
                                  min_samples_required=self.min_samples_required)


@dataclass
class PbtConfig(SchedulerConfig):
    """Population based training: every perturbation_interval epochs, poor trials continue from a good
    trial's checkpoint with mutated hyperparameters (mutations come from the space)."""
    type: str = "pbt"
    perturbation_interval: int = 5
    quantile_fraction: float = 0.25
    resample_probability: float = 0.25
    stops_early = False  # poor trials continue from better ones' checkpoints instead
    checkpoints_to_keep = 4
    clones_checkpoints = True

    def check(self, exp) -> None:
        _check_epochs("scheduler.perturbation_interval", self.perturbation_interval, exp.epochs)
        if self.perturbation_interval % exp.checkpoint.every:  # a perturbation clones the newest checkpoint
            raise ConfigError("scheduler.perturbation_interval", self.perturbation_interval,
                              f"a multiple of checkpoint.every ({exp.checkpoint.every}), so each perturbation "
                              "finds a checkpoint of that epoch")
        check_range("scheduler.quantile_fraction", self.quantile_fraction, 0, 0.5, "between 0 and 0.5")
        check_range("scheduler.resample_probability", self.resample_probability, 0, 1, "between 0 and 1")
        grids = [name for name, d in exp.dists.items() if d.dist == "grid"]
        if grids:
            raise ConfigError(f"space.{grids[0]}.dist", "grid", "pbt mutates sampled values; use choice")

    def decision_epochs(self, exp) -> Set[int]:
        # PBT decides at the first result with the metric once perturbation_interval epochs have passed
        # since its last decision: from epoch 0, the multiples of the interval.
        return set(range(self.perturbation_interval, exp.epochs + 1, self.perturbation_interval)) | {exp.epochs}

    def build(self, exp, space):
        from ray.tune.schedulers import PopulationBasedTraining

        # require_attrs=False: epochs without validation report no metric, which PBT then skips.
        return PopulationBasedTraining(
            time_attr="epoch", perturbation_interval=self.perturbation_interval, require_attrs=False,
            hyperparam_mutations=to_ray_space(space), custom_explore_fn=ClipToSpace(space).clip,
            quantile_fraction=self.quantile_fraction, resample_probability=self.resample_probability)


class ClipToSpace:
    """PBT's explore step multiplies values by 0.8 or 1.2, which can leave the space (lrf 1.1 makes
    Ultralytics raise): bring each mutated value back inside its distribution's bounds."""

    def __init__(self, space: Dict[str, Dist]):
        self.bounds = {name: d for name, d in space.items() if d.dist in RANGE_DISTS}

    def clip(self, config: Dict[str, Any]) -> Dict[str, Any]:
        for name, d in self.bounds.items():
            if name in config:
                value = min(max(config[name], d.low), d.high)
                config[name] = int(round(value)) if d.dist in ("randint", "qrandint") else value
        return config
