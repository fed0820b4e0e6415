"""The resources group: per-trial CPUs and GPUs, and how many trials run at once.

Each trial trains on the GPU share Ray assigns it and nothing else (trainable.py picks the device):
a fraction of one GPU, or one whole GPU. Several GPUs per trial would make Ultralytics start DDP
subprocesses outside Ray, which it cannot place or account for.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple, Optional, Sequence, Tuple

from yolotune.errors import ConfigError, check_range
from yolotune.layout import count

TRIALS_PER_GPU = 4  # small YOLO trials leave most of a GPU idle; four side by side fill it (ANCHORS.md)
# Loader processes a GPU trial gets where the node's CPUs allow (fewer trials per GPU otherwise): one
# decodes and augments (mosaic) far fewer images per second than a GPU trains on; plus the training loop's.
LOADER_WORKERS = 3
GPU_TRIAL_CPUS = LOADER_WORKERS + 1
IMAGE_CACHE_OF_MEMORY = 8  # image_cache_mb null: an eighth of a node's memory, split among its trials
IMAGE_CACHE_UNKNOWN_MB = 1024  # ... where the node's memory is not known
# The GPU memory estimate of one trial (trial_gpu_mb; its basis: docs/gpus.md, "Memory"):
CUDA_CONTEXT_MB = 1024  # a process's CUDA context, cuDNN and cuBLAS workspaces: outside torch's allocator
STATE_BYTES_PER_PARAM = 20  # fp32 weights, gradients, two optimizer moments (AdamW; SGD keeps one) and the EMA
# Activations of one 640 px image in training (AMP), in MiB: ACTIVATION_MB * GFLOPs ** ACTIVATION_POWER,
# fitted to Ultralytics' logged GPU_mem of the n to x models at batch 16 (2.4 to 13 GB).
ACTIVATION_MB, ACTIVATION_POWER = 41.0, 0.53
NO_DDP = ("at most 1 (a fraction such as 0.25, or 1): a trial trains on one GPU; several GPUs per trial "
          "would start Ultralytics' DDP subprocesses, which Ray neither places nor hears from")


@dataclass
class ResourcesConfig:
    cpu_per_trial: Optional[float] = None  # null: a node's CPUs shared among the trials on it (see plan)
    gpu_per_trial: Optional[float] = None  # fractions such as 0.25 pack trials on one GPU; at most 1
    max_concurrent_trials: Optional[int] = None  # null: as many as the resources allow
    # per node, split among the trials it runs at once: decoded images each trial's worker keeps for the
    # trials it runs next; 0: off; null: an eighth of the node's memory
    image_cache_mb: Optional[int] = None
    gpu_mb_per_trial: Optional[int] = None  # null: estimated from the model, batch and imgsz (trial_gpu_mb)

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
        if self.image_cache_mb is not None:
            check_range("resources.image_cache_mb", self.image_cache_mb, 0, None,
                        "an integer >= 0 (MiB of decoded images per node, shared by its trials; 0: off; null: "
                        "an eighth of the node's memory)", integer=True)
        if self.gpu_mb_per_trial is not None:
            check_range("resources.gpu_mb_per_trial", self.gpu_mb_per_trial, 1, None,
                        "an integer >= 1 (MiB of GPU memory a trial needs; null: estimated from the model, batch "
                        "and imgsz)", integer=True)
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


class Node(NamedTuple):
    """What the plan knows of a node: its CPUs and GPUs, and where known (0: not) its memory and the
    memory of one of its GPUs, in MiB."""

    cpus: float
    gpus: float
    memory_mb: float = 0
    gpu_memory_mb: float = 0


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
    gpu_mb: Optional[float] = None  # GPU memory a trial needs (resources.gpu_mb_per_trial, or the estimate)
    gpu_memory_mb: Optional[float] = None  # one GPU's memory (the least of the GPU nodes'); None: not known

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

    @property
    def gpus(self) -> int:
        """The whole GPUs of the nodes that run GPU trials (0 for CPU trials)."""
        return sum(math.floor(g) for _, g in self.nodes) if self.gpu else 0

    def summary(self) -> str:
        gpu = f" + {self.gpu:.3g} GPU" if self.gpu else ""
        if self.gpu and self.gpu_mb:
            of = f" of {self.gpu_memory_mb / 1024:.0f}" if self.gpu_memory_mb else ""
            gpu += f" (~{self.gpu_mb / 1024:.1f}{of} GiB)"
        cache = f"image cache {self.image_cache_mb} MiB per trial" if self.image_cache_mb else "image cache off"
        cpus, gpus = sum(c for c, _ in self.nodes), sum(g for _, g in self.nodes)
        hosts = f", trials on {self.hosts}" if self.hosts < len(self.nodes) else ""
        idle = f"; {self.gpus - self.at_once} of {self.gpus} GPUs idle" if self.at_once < self.gpus else ""
        return (f"Plan: {count(self.at_once, 'trial')} at once, each {count(self.cpu, 'CPU')}{gpu}, "
                f"{count(self.loader_workers, 'loader worker')}, {count(self.threads, 'thread')}, {cache} "
                f"({count(gpus, 'GPU')}, {count(cpus, 'CPU')} on {count(len(self.nodes), 'node')}{hosts}){idle}")

    def record(self) -> dict:
        """The plan as plan.yaml keeps it: plain numbers."""
        return {"trials_at_once": self.at_once, "cpu_per_trial": self.cpu, "gpu_per_trial": self.gpu,
                "loader_workers": self.loader_workers, "threads": self.threads,
                "image_cache_mb_per_trial": self.image_cache_mb, "max_concurrent_trials": self.max_concurrent_trials,
                "gpu_mb_per_trial": self.gpu_mb, "gpu_memory_mb": self.gpu_memory_mb,
                "nodes": [{"cpus": c, "gpus": g} for c, g in self.nodes]}


def local_cpus(cgroup_root: Path = Path("/sys/fs/cgroup"), own_cgroup: Path = Path("/proc/self/cgroup")) -> int:
    """The CPUs this process may use: those it may run on (a taskset can allow fewer than the machine
    has), and no more than its cgroup's CPU limit (a container's: cgroup v2 cpu.max, v1 CFS quota)."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    limit = cgroup_cpu_limit(cgroup_root, own_cgroup)
    return max(1, min(cpus, math.floor(limit))) if limit is not None else cpus


def local_memory_mb(cgroup_root: Path = Path("/sys/fs/cgroup")) -> float:
    """The memory this process may use, in MiB: the machine's, and no more than its container's limit
    (cgroup v2 memory.max, v1 memory.limit_in_bytes, of the cgroup mounted at the root)."""
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    for limit_file in (cgroup_root / "memory.max", cgroup_root / "memory" / "memory.limit_in_bytes"):
        try:
            memory = min(memory, int(limit_file.read_text()))
        except (OSError, ValueError):  # absent, or "max": no limit
            continue
    return memory / 2**20


def cgroup_cpu_limit(root: Path, own_cgroup: Path) -> Optional[float]:
    """The CPUs the cgroups of this process allow (quota / period, the least of its cgroup and those
    above it that are visible here); None without a limit."""
    try:
        lines = own_cgroup.read_text().splitlines()
    except OSError:
        return None
    limits = []
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # v2: one hierarchy, cpu.max holds "quota period" or "max period"
            files = ("cpu.max", None)
            mount = root
        elif "cpu" in controllers.split(","):  # v1: the cpu controller's own hierarchy
            files = ("cpu.cfs_quota_us", "cpu.cfs_period_us")
            mount = next((root / d for d in (controllers, "cpu", "cpu,cpuacct") if (root / d).is_dir()), None)
            if mount is None:
                continue
        else:
            continue
        # Its folder and those above it, up to the mount: in a container the path names a host folder
        # that is not there, and the container's own cgroup is mounted at the root.
        folder = mount / path.lstrip("/")
        for directory in [folder, *folder.parents]:
            if not directory.is_relative_to(mount):
                break
            limit = _cpu_quota(directory, *files)
            if limit is not None:
                limits.append(limit)
    return min(limits, default=None)


def _cpu_quota(directory: Path, quota_file: str, period_file: Optional[str]) -> Optional[float]:
    try:
        if period_file is None:
            quota, period = (directory / quota_file).read_text().split()
        else:
            quota, period = ((directory / f).read_text().strip() for f in (quota_file, period_file))
    except (OSError, ValueError):
        return None
    if quota in ("max", "-1") or int(period) <= 0:
        return None
    return int(quota) / int(period)


def trial_gpu_mb(params: float, gflops: float, batch: int, imgsz: int) -> float:
    """GPU memory one training trial needs, in MiB, estimated from its model (parameters; GFLOPs of one
    640 px image), batch and image size: the CUDA context, the model's training state and the
    activations of a batch (docs/gpus.md, "Memory", says where the figures come from)."""
    state = params * STATE_BYTES_PER_PARAM / 2**20
    activations = batch * (imgsz / 640) ** 2 * ACTIVATION_MB * gflops ** ACTIVATION_POWER
    return CUDA_CONTEXT_MB + state + activations


def plan(res, nodes: Sequence[Tuple[float, ...]], iterations: int, gpu_mb: Optional[float] = None) -> TrialResources:
    """Fill the nulls of ``res`` for these nodes (each a ``Node``, or (CPUs, GPUs); one for a machine),
    sharing them among the trials that can really run at once: no more than ``iterations`` or
    ``max_concurrent_trials``. ``gpu_mb``: the GPU memory a trial needs (estimated; resources.gpu_mb_per_trial
    overrides it).

    Ray places a trial's CPUs and GPU share on one node, and Tune asks the same of every trial: one
    shape, chosen so that the trials at once fit the nodes that can hold it. GPU trials run on the
    nodes with GPUs only: a cluster's CPU-only nodes run none of them (resources.gpu_per_trial=0
    runs CPU trials on every node instead). Trials per GPU: no more than TRIALS_PER_GPU, than the
    trials at once need to use every GPU, than give each GPU_TRIAL_CPUS CPUs where a node has them,
    and than fit one GPU's memory (where it is known). Which GPU of its node a trial trains on is
    decided in the trial (gpu_slots.py), so that every GPU is used before any is shared.
    """
    nodes = [Node(*node) for node in nodes]
    gpu, cpu = res.gpu_per_trial, res.cpu_per_trial
    most_gpus = max(n.gpus for n in nodes)
    if gpu and most_gpus == 0:
        raise ConfigError("resources.gpu_per_trial", gpu,
                          "this machine (or cluster) has no GPU; use resources=cpu (or resources.gpu_per_trial=0)")
    if gpu is not None and gpu > most_gpus:
        raise ConfigError("resources.gpu_per_trial", gpu, f"at most the {most_gpus:g} GPUs of one node")
    on_gpus = bool(gpu) if gpu is not None else most_gpus >= 1
    hosts = [n for n in nodes if n.gpus] if on_gpus else list(nodes)
    most_cpus = max(n.cpus for n in hosts)
    if cpu is not None and cpu > most_cpus:
        raise ConfigError("resources.cpu_per_trial", cpu,
                          f"at most the {most_cpus:g} CPUs of one {'GPU ' if on_gpus else ''}node")
    want = min(iterations, res.max_concurrent_trials or iterations)
    gpu_mb = (res.gpu_mb_per_trial or gpu_mb) if on_gpus else None
    card_mb = min((n.gpu_memory_mb for n in hosts if n.gpu_memory_mb), default=None) if on_gpus else None
    by_memory = _fits(card_mb, gpu_mb) if card_mb and gpu_mb else TRIALS_PER_GPU  # trials one GPU's memory holds
    if by_memory == 0:
        raise ConfigError("resources.gpu_mb_per_trial", res.gpu_mb_per_trial or round(gpu_mb),
                          f"at most the {card_mb:.0f} MiB of one GPU (null: estimated from the model, batch and "
                          f"imgsz, here {gpu_mb:.0f}); lower train.batch or train.imgsz")
    # CPUs a trial needs: GPU_TRIAL_CPUS for its loader where every GPU still gets a trial, at least one
    least = cpu if cpu is not None else (
        max(1, min(GPU_TRIAL_CPUS, min(math.floor(n.cpus / max(1, math.floor(n.gpus))) for n in hosts)))
        if on_gpus else 1)
    if gpu is None:  # trials per GPU: as few as use every GPU, no more than CPUs and memory allow
        whole = sum(math.floor(n.gpus) for n in hosts)
        by_cpus = min(max(1, _fits(n.cpus, least) // max(1, math.floor(n.gpus))) if least else want for n in hosts)
        gpu = 1 / max(1, min(TRIALS_PER_GPU, math.ceil(want / whole), by_cpus, by_memory)) if on_gpus else 0.0
    elif gpu and _fits(1, gpu) > by_memory:
        raise ConfigError("resources.gpu_per_trial", gpu,
                          f"at least {1 / by_memory:.3g}: {_fits(1, gpu)} trials of ~{gpu_mb:.0f} MiB do not fit "
                          f"the {card_mb:.0f} MiB of one GPU (resources.gpu_mb_per_trial overrides the estimate)")

    def held(node: Node, cpu_each: float) -> int:
        """Trials of this shape that a node holds side by side: each needs its CPUs (none: no limit)
        and its GPU share, whole shares only (0.4 of a GPU fits twice on one, not 2.5 times)."""
        return min(_fits(node.cpus, cpu_each) if cpu_each else want,
                   math.floor(node.gpus) * _fits(1, gpu) if gpu else want)

    at_once = min(want, sum(held(node, least) for node in hosts))
    if cpu is None:  # the most CPUs each that still let those trials run: a node's CPUs all go to its trials
        cpu = max(n for n in range(1, max(1, int(most_cpus)) + 1) if sum(held(node, n) for node in hosts) >= at_once)

    def cache_share(node: Node) -> int:
        budget = res.image_cache_mb if res.image_cache_mb is not None else (
            int(node.memory_mb // IMAGE_CACHE_OF_MEMORY) if node.memory_mb else IMAGE_CACHE_UNKNOWN_MB)
        return budget // max(1, min(held(node, cpu), at_once))

    return TrialResources(cpu=float(cpu), gpu=float(gpu), max_concurrent_trials=res.max_concurrent_trials,
                          at_once=at_once, image_cache_mb=min(cache_share(node) for node in hosts if held(node, cpu)),
                          nodes=tuple((float(n.cpus), float(n.gpus)) for n in nodes),
                          hosts=sum(held(node, cpu) > 0 for node in hosts), gpu_mb=gpu_mb, gpu_memory_mb=card_mb)


def _fits(total: float, share: float) -> int:
    return math.floor(total / share + 1e-9)  # 1e-9: 3 * (1/3) is one GPU, despite rounding
