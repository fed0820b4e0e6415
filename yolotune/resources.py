"""The resources group: per-trial CPUs and GPUs, and how many trials run at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from yolotune.errors import ConfigError, check_range

TRIALS_PER_GPU = 4  # small YOLO trials leave most of a GPU idle; four side by side fill it (ANCHORS.md)


@dataclass
class ResourcesConfig:
    cpu_per_trial: Optional[float] = None  # null: chosen for the machine (see plan)
    gpu_per_trial: Optional[float] = None  # fractions such as 0.25 pack trials on one GPU
    max_concurrent_trials: Optional[int] = None  # null: as many as the resources allow

    def check(self, exp) -> None:
        for key in ("cpu_per_trial", "gpu_per_trial"):
            value = getattr(self, key)
            if value is not None:
                check_range(f"resources.{key}", value, 0, None, "a number >= 0 (null: chosen for the machine)")
        if self.cpu_per_trial == 0 and not self.gpu_per_trial:
            raise ConfigError("resources.cpu_per_trial", 0, "a trial without a GPU needs at least 1 CPU")
        if self.gpu_per_trial is not None and self.gpu_per_trial > 1 and not float(self.gpu_per_trial).is_integer():
            raise ConfigError("resources.gpu_per_trial", self.gpu_per_trial,
                              "a fraction <= 1 or a whole number of GPUs")
        if self.max_concurrent_trials is not None:
            check_range("resources.max_concurrent_trials", self.max_concurrent_trials, 1, None,
                        "an integer >= 1 (null: no limit)", integer=True)


@dataclass(frozen=True)
class TrialResources:
    cpu: float
    gpu: float
    max_concurrent_trials: Optional[int]

    @property
    def threads(self) -> int:
        """torch threads inside a trial: its CPUs."""
        return max(1, int(self.cpu))


def plan(res, total_cpus: float, total_gpus: float) -> TrialResources:
    """Fill the nulls of ``res`` for a machine (or cluster) with these totals."""
    gpu = res.gpu_per_trial
    if gpu is None:
        gpu = 1 / TRIALS_PER_GPU if total_gpus else 0.0
    if gpu > 0 and total_gpus == 0:
        raise ConfigError("resources.gpu_per_trial", res.gpu_per_trial,
                          "this machine has no GPU; use resources=cpu (or resources.gpu_per_trial=0)")
    if gpu > total_gpus:
        raise ConfigError("resources.gpu_per_trial", gpu, f"at most the {total_gpus:g} GPUs available")
    cpu = res.cpu_per_trial
    if cpu is None:
        trials = max(1, round(total_gpus / gpu)) if gpu else total_cpus
        cpu = max(1, int(total_cpus // trials))
    if cpu > total_cpus:
        raise ConfigError("resources.cpu_per_trial", cpu, f"at most the {total_cpus:g} CPUs available")
    return TrialResources(cpu=float(cpu), gpu=float(gpu), max_concurrent_trials=res.max_concurrent_trials)
