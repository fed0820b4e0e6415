"""The resources group: per-trial CPUs and GPUs, and how many trials run at once."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from yolotune.errors import ConfigError

TRIALS_PER_GPU = 4  # small YOLO trials leave most of a GPU idle; four side by side fill it (ANCHORS.md)


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
