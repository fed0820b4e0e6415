"""Which GPU of its node a trial trains on, and how much of its memory it may take (runs in Ray workers).

Ray packs fractional GPU shares best-fit: 8 trials at 0.5 GPU on an 8-GPU node go on 4 GPUs, two
each, and 4 GPUs stay idle. Ray still decides how many trials a node runs (its GPU shares and CPUs),
but each trial picks its card here, from slots on the node: ``per_gpu`` lock files per GPU, taken in
the order slot 0 of every GPU, then slot 1 of every GPU, ... so that the trials on a node hold
floor(T/G) or ceil(T/G) each of its G GPUs, whatever Ray's own assignment. A slot is an exclusive
``flock`` that its worker process holds while it lives (a reused worker keeps its card and its CUDA
context from trial to trial); the kernel frees it when the process ends, however it ends, and the
next trial to start takes the freed slot first.
"""

from __future__ import annotations

import fcntl
import os
import re
import tempfile
from pathlib import Path
from typing import IO, Optional, Sequence, Tuple

from yolotune.resources import CUDA_CONTEXT_MB

_HELD: Optional[Tuple[str, IO]] = None  # this process's slot: its GPU and the open, locked file


def claim_slot(directory: Path, gpus: Sequence[str], per_gpu: int) -> Optional[Tuple[str, IO]]:
    """Lock the first free slot (slot 0 of each GPU, then slot 1, ...); returns its GPU and the locked
    file (the slot is this process's while the file stays open), or None when every slot is taken."""
    directory.mkdir(parents=True, exist_ok=True)
    for slot in range(per_gpu):
        for gpu in gpus:
            file = open(directory / f"gpu{gpu}-slot{slot}", "a")
            try:
                fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except OSError:  # another process holds it
                file.close()
                continue
            return gpu, file
    return None


def spread(gpu_share: float) -> Optional[str]:
    """Point this trial (CUDA_VISIBLE_DEVICES) at the GPU of the slot its process holds or takes now, among
    the slots of its Ray cluster on this node (apart from other Rays' on the machine, by the cluster's
    GCS address); None (Ray's own choice stands) for whole GPUs, which Ray never packs, or when no slot
    is free (trials of another experiment on the same cluster hold them). Before torch sees the GPUs."""
    import ray

    global _HELD
    if not 0 < gpu_share < 1:
        return None
    if _HELD is None:
        cluster = ray.get_runtime_context().gcs_address
        directory = Path(tempfile.gettempdir()) / "yolotune-gpu-slots" / re.sub(r"[^A-Za-z0-9.-]+", "_", cluster)
        _HELD = claim_slot(directory, node_gpus(), int(1 / gpu_share + 1e-9))
        if _HELD is None:
            return None
    os.environ["CUDA_VISIBLE_DEVICES"] = _HELD[0]
    return _HELD[0]


def node_gpus() -> list:
    """The physical ids of this node's GPUs, as Ray numbers them (under a CUDA_VISIBLE_DEVICES that the
    node was started with, the ids it names)."""
    import ray
    from ray._private.worker import global_worker

    original = global_worker.original_visible_accelerator_ids.get("GPU")
    if original is not None:
        return [str(i) for i in original]
    me = ray.get_runtime_context().get_node_id()
    count = next(int(n["Resources"].get("GPU", 0)) for n in ray.nodes() if n["NodeID"] == me)
    return [str(i) for i in range(count)]


def memory_fraction(gpu_share: float, total_mb: float) -> float:
    """The part of the card's memory torch's allocator may take for a trial with this share: the share,
    less the CUDA context every process keeps outside the allocator, so that the trials sharing the card
    fit it together."""
    return max(0.05, gpu_share - CUDA_CONTEXT_MB / total_mb)


def cap_memory(gpu_share: float) -> None:
    """Keep a trial with a share of a GPU within it (torch raises out-of-memory at its cap), so that one
    trial cannot take memory its neighbours need."""
    import torch

    if 0 < gpu_share < 1 and torch.cuda.is_available():
        total_mb = torch.cuda.get_device_properties(0).total_memory / 2**20
        torch.cuda.set_per_process_memory_fraction(memory_fraction(gpu_share, total_mb), 0)


def pushed_out(reserved_mb: float, free_mb: float, total_mb: float, gpu_share: float) -> bool:
    """Whether a trial out of memory was short of its own share of the card: what it holds and what is
    free together are less than its share (less its context), so other processes hold part of it."""
    return 0 < gpu_share < 1 and reserved_mb + free_mb < 0.9 * memory_fraction(gpu_share, total_mb) * total_mb


def neighbour_took_memory(gpu_share: float) -> bool:
    """``pushed_out`` for this process's card, now (after its out-of-memory error)."""
    import torch

    if not torch.cuda.is_available():
        return False
    free, total = torch.cuda.mem_get_info(0)
    return pushed_out(torch.cuda.memory_reserved(0) / 2**20, free / 2**20, total / 2**20, gpu_share)


class GpuMemoryTaken(RuntimeError):
    """A trial out of GPU memory because other processes hold part of its share: the runner retries it
    (failure.max_failures) instead of counting it as the trial's own error."""
