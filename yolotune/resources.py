"""The resources group: per-trial CPUs and GPUs, and how many trials run at once.

Each trial trains on the GPU share Ray assigns it and nothing else (trainable.py picks the device):
a fraction of one GPU, or one whole GPU. Several GPUs per trial would make Ultralytics start DDP
subprocesses outside Ray, which it cannot place or account for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import Optional, Sequence, Tuple

from yolotune.errors import ConfigError, check_range

TRIALS_PER_GPU = 4  # small YOLO trials leave most of a GPU idle; four side by side fill it (ANCHORS.md)
NO_DDP = ("at most 1 (a fraction such as 0.25, or 1): a trial trains on one GPU; several GPUs per trial "
          "would start Ultralytics' DDP subprocesses, which Ray neither places nor hears from")


@dataclass
class ResourcesConfig:
    cpu_per_trial: Optional[float] = None  # null: a node's CPUs shared among the trials on it (see plan)
    gpu_per_trial: Optional[float] = None  # fractions such as 0.25 pack trials on one GPU; at most 1
    max_concurrent_trials: Optional[int] = None  # null: as many as the resources allow
    # per node, split among the trials it runs at once: decoded images each trial's worker keeps for the
    # trials it runs next; 0: off
    image_cache_mb: int = 1024

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
                    "an integer >= 0 (MiB of decoded images per node, shared by its trials; 0: off)", integer=True)
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
    """One trial's share of a node, and what the plan says at the start of a run (``summary``, plan.yaml)."""

    cpu: float
    gpu: float
    max_concurrent_trials: Optional[int]
    at_once: int  # trials that can really run side by side
    image_cache_mb: int  # this trial's share of its node's image_cache_mb
    nodes: Tuple[Tuple[float, float], ...]  # (CPUs, GPUs) of each node planned for
    hosts: int  # the nodes that can hold a trial of this shape

    @property
    def threads(self) -> int:
        """torch threads inside a trial: its CPUs."""
        return max(1, int(self.cpu))

    @property
    def loader_workers(self) -> int:
        """Data loader processes of a GPU trial's training: its CPUs but one, which runs the training
        loop. Validation's loader runs while training waits for it, so it needs no CPUs of its own.
        A CPU trial has none (Ultralytics trains on the CPU without loader processes anyway)."""
        return max(0, int(self.cpu) - 1) if self.gpu else 0

    def summary(self) -> str:
        gpu = f" + {self.gpu:.3g} GPU" if self.gpu else ""
        cache = f"image cache {self.image_cache_mb} MiB per trial" if self.image_cache_mb else "image cache off"
        cpus, gpus = sum(c for c, _ in self.nodes), sum(g for _, g in self.nodes)
        hosts = f", trials on {self.hosts}" if self.hosts < len(self.nodes) else ""
        return (f"Plan: {_count(self.at_once, 'trial')} at once, each {_count(self.cpu, 'CPU')}{gpu}, "
                f"{_count(self.loader_workers, 'loader worker')}, {_count(self.threads, 'thread')}, {cache} "
                f"({_count(gpus, 'GPU')}, {_count(cpus, 'CPU')} on {_count(len(self.nodes), 'node')}{hosts})")

    def record(self) -> dict:
        """The plan as plan.yaml keeps it: plain numbers."""
        return {"trials_at_once": self.at_once, "cpu_per_trial": self.cpu, "gpu_per_trial": self.gpu,
                "loader_workers": self.loader_workers, "threads": self.threads,
                "image_cache_mb_per_trial": self.image_cache_mb, "max_concurrent_trials": self.max_concurrent_trials,
                "nodes": [{"cpus": c, "gpus": g} for c, g in self.nodes]}


def _count(n: float, word: str) -> str:
    return f"{n:g} {word}{'' if n == 1 else 's'}"


def local_cpus() -> int:
    """The CPUs this process may run on (a container or taskset can allow fewer than the machine has)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def plan(res, nodes: Sequence[Tuple[float, float]], iterations: int) -> TrialResources:
    """Fill the nulls of ``res`` for these nodes ((CPUs, GPUs) of each; one for a machine), sharing
    them among the trials that can really run at once: no more than ``iterations`` or
    ``max_concurrent_trials``.

    Ray places a trial's CPUs and GPU share on one node, and Tune asks the same of every trial: one
    shape, chosen so that the trials at once fit the nodes that can hold it. GPU trials run on the
    nodes with GPUs only: a cluster's CPU-only nodes run none of them (resources.gpu_per_trial=0
    runs CPU trials on every node instead).
    """
    gpu, cpu = res.gpu_per_trial, res.cpu_per_trial
    most_gpus = max(g for _, g in nodes)
    if gpu and most_gpus == 0:
        raise ConfigError("resources.gpu_per_trial", gpu,
                          "this machine (or cluster) has no GPU; use resources=cpu (or resources.gpu_per_trial=0)")
    if gpu is not None and gpu > most_gpus:
        raise ConfigError("resources.gpu_per_trial", gpu, f"at most the {most_gpus:g} GPUs of one node")
    on_gpus = bool(gpu) if gpu is not None else most_gpus >= 1
    hosts = [(c, g) for c, g in nodes if g] if on_gpus else list(nodes)
    most_cpus = max(c for c, _ in hosts)
    if cpu is not None and cpu > most_cpus:
        raise ConfigError("resources.cpu_per_trial", cpu,
                          f"at most the {most_cpus:g} CPUs of one {'GPU ' if on_gpus else ''}node")
    want = min(iterations, res.max_concurrent_trials or iterations)
    least = 1 if cpu is None else cpu  # CPUs a trial needs: at least one when they are chosen here
    if gpu is None:  # as few trials per GPU as the trials the CPUs allow, up to TRIALS_PER_GPU
        by_cpus = min(want, sum(_fits(c, least) for c, _ in hosts))
        gpu = 1 / min(TRIALS_PER_GPU, math.ceil(by_cpus / sum(math.floor(g) for _, g in hosts))) if on_gpus else 0.0

    def held(node, cpu_each: float) -> int:
        """Trials of this shape that a node holds side by side: each needs its CPUs (none: no limit)
        and its GPU share, whole shares only (0.4 of a GPU fits twice on one, not 2.5 times)."""
        cpus, gpus = node
        return min(_fits(cpus, cpu_each) if cpu_each else want, math.floor(gpus) * _fits(1, gpu) if gpu else want)

    at_once = min(want, sum(held(node, least) for node in hosts))
    if cpu is None:  # the most CPUs each that still let those trials run: a node's CPUs all go to its trials
        cpu = max(n for n in range(1, max(1, int(most_cpus)) + 1) if sum(held(node, n) for node in hosts) >= at_once)
    busiest = max(min(held(node, cpu), at_once) for node in hosts)  # trials on the node that runs the most
    return TrialResources(cpu=float(cpu), gpu=float(gpu), max_concurrent_trials=res.max_concurrent_trials,
                          at_once=at_once, image_cache_mb=res.image_cache_mb // max(1, busiest),
                          nodes=tuple((float(c), float(g)) for c, g in nodes),
                          hosts=sum(held(node, cpu) > 0 for node in hosts))


def _fits(total: float, share: float) -> int:
    return math.floor(total / share + 1e-9)  # 1e-9: 3 * (1/3) is one GPU, despite rounding
