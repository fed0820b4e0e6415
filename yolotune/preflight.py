"""What only Ultralytics and the machine can check before Ray starts (``preflight``): every value a trial
may pass Ultralytics, the weights, the dataset and its label caches, the resource plan with its GPU memory
estimate; the job every trial gets; ``dry_run=true``, which runs these checks and prints the plan."""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

from yolotune import console, train_args
from yolotune.config import ExperimentConfig
from yolotune.data import build_label_caches
from yolotune.model import resolve_weights
from yolotune.resources import Node, TrialResources, check_autobatch, local_cpus, local_memory_mb, plan, trial_gpu_mb
from yolotune.storage import Location, cache_root, is_uri, node_dataset, node_file


@contextlib.contextmanager
def ultralytics_quiet(exp: ExperimentConfig):
    """Ultralytics' info lines and progress bars in the driver (label scans, weight stripping) stay off
    the console; its warnings still show."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    if exp.verbose != "ray":
        LOGGER.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def dry_run(exp: ExperimentConfig, exp_dir: Path) -> None:
    """Every check a run makes before Ray starts, and its plan; starts nothing (``dry_run=true``)."""
    with console.LibraryNotices(exp.verbose), ultralytics_quiet(exp):
        _, resources = preflight(exp, exp_dir)
    where = f"resume {exp_dir}" if exp.resume else f"a new experiment {exp_dir}"
    print(resources.summary() if resources else f"Plan: made once Ray connects to the cluster at {exp.ray.address}")
    print(f"Checked: the data, the model, every value a trial may train with, the storage and the plan for {where}; "
          "nothing was run. Drop dry_run=true to start it.")


def preflight(exp: ExperimentConfig, exp_dir: Path) -> Tuple[Dict[str, Any], Optional[TrialResources]]:
    """What only Ultralytics and the machine can check, before Ray starts: every value a trial may pass
    Ultralytics, the weights, the dataset, and the resources of this machine (a cluster's are known
    once Ray connects: None). Returns everything a trial needs besides its sampled values (plain,
    resolved, absolute) and the planned resources."""
    train_args.check_values(exp)
    task = exp.model.task
    weights, data = exp.model.resolve(), exp.data.resolve(task)
    tuned_models = exp.dists["model"].values if "model" in exp.dists else []
    models = {str(m): resolve_weights(f"space.model.values[{i}]", m) for i, m in enumerate(tuned_models)}
    gpus = local_gpus() if exp.ray.address is None else 0
    # The driver's GPUs (a cluster's are not known here): trials per GPU by memory
    gpu_mb = (gpu_memory_estimate(exp, [weights, *models.values()])
              if (gpus or exp.ray.address is not None) and exp.resources.gpu_mb_per_trial is None
              and exp.resources.gpu_per_trial != 0 else None)
    resources = None
    if exp.ray.address is None:
        node = Node(local_cpus(), gpus, local_memory_mb(), local_gpu_memory_mb())
        resources = plan(exp.resources, [node], exp.iterations, gpu_mb)
        check_autobatch(exp, resources.gpu)
    build_label_caches(str(node_dataset(data)) if is_uri(data) else data, task)  # the copy trials on this node share
    train = {**exp.train, "epochs": exp.epochs}  # explicit: trials and resumes compare against it
    train.setdefault("plots", False)  # per-epoch plots cost seconds per trial; ask with train.plots=true
    if exp.seed is not None and "seed" not in exp.space:
        train.setdefault("seed", exp.seed)
    # Ultralytics' default, deterministic algorithms, slows GPU training: a seed alone keeps the sampling
    # and the trials' seeds reproducible; train.deterministic=true asks for bit-exact GPU training too.
    train.setdefault("deterministic", False)
    experiment = Location(exp.storage).child(exp_dir.name).uri if is_uri(exp.storage) else str(exp_dir)
    job = {"weights": weights, "models": models, "data": data, "train": train, "experiment_dir": experiment,
           "threads": 1, "metric": exp.metric, "mode": exp.mode, "measure_model": bool(exp.objectives),
           "checkpoint_every": exp.checkpoint.every, "validate_epochs": exp.validation_epochs(), "gpu_mb": gpu_mb}
    return job, resources


def gpu_memory_estimate(exp: ExperimentConfig, weights: List[str]) -> Optional[float]:
    """resources.trial_gpu_mb for the largest of the models, batches and image sizes a trial may train
    with; None where AutoBatch sizes the batch (from the card's free memory)."""
    from ultralytics import YOLO
    from ultralytics.cfg import DEFAULT_CFG_DICT
    from ultralytics.utils.torch_utils import get_flops

    values = {"batch": [], "imgsz": []}
    for _, name, value in train_args.candidate_values(exp):
        if name in values:
            values[name].append(value)
    batch = max(values["batch"] or [DEFAULT_CFG_DICT["batch"]])
    imgsz = max(max(v) if isinstance(v, (list, tuple)) else v for v in values["imgsz"] or [DEFAULT_CFG_DICT["imgsz"]])
    if not isinstance(batch, int) or batch < 1:
        return None
    estimates = []
    for path in weights:
        model = YOLO(node_file(path) if is_uri(path) else path).model
        params = sum(p.numel() for p in model.parameters())
        estimates.append(trial_gpu_mb(params, get_flops(model, 640), batch, int(imgsz)))
    return max(estimates)


def amp_check_weights() -> Optional[str]:
    """The absolute folder holding the model of Ultralytics' AMP check, for all trials (each would
    fetch it into its own working dir): Ultralytics' weights dir where it is absolute and holds it,
    else yolotune's cache, fetched into it here once when online. Never the working dir (Ultralytics'
    weights dir is relative for a pip install). None if it cannot be had (offline): each trial's check
    is then skipped with AMP on, as in Ultralytics (worker_setup.node_amp_check)."""
    from ultralytics.utils import ONLINE, WEIGHTS_DIR
    from ultralytics.utils.downloads import attempt_download_asset

    from yolotune.worker_setup import AMP_CHECK_MODEL

    if WEIGHTS_DIR.is_absolute() and (WEIGHTS_DIR / AMP_CHECK_MODEL).is_file():
        return str(WEIGHTS_DIR)
    path = cache_root() / "weights" / AMP_CHECK_MODEL
    if not path.is_file() and ONLINE:
        try:
            attempt_download_asset(path)
        except Exception:  # noqa: BLE001 - the download failed
            pass
    return str(path.parent) if path.is_file() else None


def local_gpus() -> int:
    import torch

    return torch.cuda.device_count()


def local_gpu_memory_mb() -> float:
    """The memory of this machine's smallest GPU, in MiB (0: none)."""
    import torch

    return min((torch.cuda.get_device_properties(i).total_memory / 2**20 for i in range(torch.cuda.device_count())),
               default=0)
