"""The resources group: per-trial CPUs and GPUs, and how many trials run at once.

Each trial trains on the GPU share Ray assigns it and nothing else (trainable.py picks the device):
a fraction of one GPU, or one whole GPU. Several GPUs per trial would make Ultralytics start DDP
subprocesses outside Ray, which it cannot place or account for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional

from yolotune.errors import ConfigError, check_range

TRIALS_PER_GPU = 4  # small YOLO trials leave most of a GPU idle; four side by side fill it (ANCHORS.md)
NO_DDP = ("at most 1 (a fraction such as 0.25, or 1): a trial trains on one GPU; several GPUs per trial "
          "would start Ultralytics' DDP subprocesses, which Ray neither places nor hears from")


@dataclass
class ResourcesConfig:
    cpu_per_trial: Optional[float] = None  # null: chosen for the machine (see plan)
    gpu_per_trial: Optional[float] = None  # fractions such as 0.25 pack trials on one GPU; at most 1
    max_concurrent_trials: Optional[int] = None  # null: as many as the resources allow
    image_cache_mb: int = 1024  # per worker: decoded images kept for the trials it runs next; 0: off

    def check(self, exp) -> None:
        for key in ("cpu_per_trial", "gpu_per_trial"):
            value = getattr(self, key)
            if value is not None:
                check_range(f"resources.{key}", value, 0, None, "a number >= 0 (null: chosen for the machine)")
        if self.cpu_per_trial == 0 and not self.gpu_per_trial:
            raise ConfigError("resources.cpu_per_trial", 0, "a trial without a GPU needs at least 1 CPU")
        if self.gpu_per_trial is not None and self.gpu_per_trial > 1:
            raise ConfigError("resources.gpu_per_trial", self.gpu_per_trial, NO_DDP)
        if self.max_concurrent_trials is not None:
            check_range("resources.max_concurrent_trials", self.max_concurrent_trials, 1, None,
                        "an integer >= 1 (null: no limit)", integer=True)
        check_range("resources.image_cache_mb", self.image_cache_mb, 0, None,
                    "an integer >= 0 (MiB of decoded images a worker keeps for its next trials; 0: off)", integer=True)
        check_autobatch(exp, self.gpu_per_trial)


def check_autobatch(exp, gpu: Optional[float]) -> None:
    """AutoBatch (batch -1 or a fraction) sizes the batch from the whole card's free memory, which
    trials sharing the card also use: refused with fractional GPUs."""
    from yolotune.train_args import candidate_values

    if gpu is None or not 0 < gpu < 1:
        return
    for key, name, value in candidate_values(exp):
        if name == "batch" and (value == -1 or (isinstance(value, float) and 0 < value < 1)):
            raise ConfigError(key, value, f"a fixed batch size: AutoBatch sizes it from the whole GPU's free memory, "
                                          f"but gpu_per_trial={gpu:g} shares the GPU with other trials")


@dataclass(frozen=True)
class TrialResources:
    cpu: float
    gpu: float
    max_concurrent_trials: Optional[int]
    at_once: int  # trials that can really run side by side

    @property
    def threads(self) -> int:
        """torch threads inside a trial: its CPUs."""
        return max(1, int(self.cpu))

    @property
    def loader_workers(self) -> int:
        """Data loader processes per trial. Ultralytics' validation loader starts twice as many, and
        the training loop and the pin-memory thread run beside them: 2 * workers + 2 <= CPUs."""
        return max(0, (int(self.cpu) - 2) // 2)


def local_cpus() -> int:
    """The CPUs this process may run on (a container or taskset can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan(res, total_cpus: float, total_gpus: float, iterations: int) -> TrialResources:
    """Fill the nulls of ``res`` for a machine (or cluster) with these totals, sharing it among the
    trials that can really run at once: no more than ``iterations`` or ``max_concurrent_trials``."""
    gpu, cpu = res.gpu_per_trial, res.cpu_per_trial
    if gpu and total_gpus == 0:
        raise ConfigError("resources.gpu_per_trial", gpu,
                          "this machine has no GPU; use resources=cpu (or resources.gpu_per_trial=0)")
    if gpu is not None and gpu > total_gpus:
        raise ConfigError("resources.gpu_per_trial", gpu, f"at most the {total_gpus:g} GPUs available")
    if cpu is not None and cpu > total_cpus:
        raise ConfigError("resources.cpu_per_trial", cpu, f"at most the {total_cpus:g} CPUs available")
    at_once = min(iterations, res.max_concurrent_trials or iterations)
    # Each trial needs its CPUs (at least one when they are chosen here) ...
    at_once = min(at_once, _fits(total_cpus, cpu or 1) if cpu != 0 else at_once)
    if gpu is None:  # as few trials per GPU as the trials at once allow, up to TRIALS_PER_GPU
        gpu = 1 / min(TRIALS_PER_GPU, math.ceil(at_once / total_gpus)) if total_gpus else 0.0
    # ... and its GPU share (whole shares only: 0.4 of a GPU fits twice on one, not 2.5 times).
    if gpu:
        at_once = min(at_once, math.floor(total_gpus) * _fits(1, gpu))
    if cpu is None:
        cpu = max(1, int(total_cpus // at_once))
    return TrialResources(cpu=float(cpu), gpu=float(gpu), max_concurrent_trials=res.max_concurrent_trials,
                          at_once=at_once)


def _fits(total: float, share: float) -> int:
    return math.floor(total / share + 1e-9)  # 1e-9: 3 * (1/3) is one GPU, despite rounding
