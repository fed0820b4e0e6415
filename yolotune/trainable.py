"""The code that runs inside Ray workers: one trial = one Ultralytics training run.

Ray calls ``train_trial(config, job)`` with the sampled hyperparameters in ``config`` and the
experiment's fixed settings in ``job`` (plain, resolved values; see runner.py). Here: the trial's
device, its training from start or from its newest checkpoint, and what it frees when it ends; what it
reports each epoch is in epoch_report.py, its train.log in trial_log.py, the changes a worker makes to
Ultralytics and Ray once in worker_setup.py, the shared decoded images in decoded_images.py. With
``reuse_actors`` one warm worker process runs many trials, so nothing here may keep state from
one trial to the next except the caches Ultralytics itself keeps and the decoded images
(``DecodedImages``), which are the same for every trial.
"""

from __future__ import annotations

import ctypes
import gc
import os
import traceback
from contextlib import nullcontext
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import ray
from ray import tune

from yolotune import gpu_slots
from yolotune.decoded_images import DECODED_IMAGES
from yolotune.epoch_report import BestEpoch, EpochReporter
from yolotune.layout import HISTORY, STAGED, TRAIN_LOG, trial_dirname
from yolotune.storage import Location, is_uri, node_dataset, node_file
from yolotune.trial_log import trial_log
from yolotune.worker_setup import (check_amp_once_per_node, disable_ultralytics_reporting,
                                   disable_ultralytics_update_check, move_staged_checkpoints)


def train_trial(config: Dict[str, Any], job: Dict[str, Any]) -> None:
    # before torch can see the GPUs: the card of this process's slot on the node, then the device
    gpu_slots.spread(job.get("gpu_per_trial", 0))
    device, gpu = claim_device(ray.get_gpu_ids())
    location = Location(job["experiment_dir"]).child(trial_dirname(tune.get_context().get_trial_id()))
    checkpoint = tune.get_checkpoint()
    trial_dir = _trial_dir(location, checkpoint)
    try:
        with trial_log(trial_dir / TRAIN_LOG):
            _train(config, job, trial_dir, checkpoint, device, gpu)
    except BaseException as e:
        # A stop (Ray raises SystemExit in report) or an error: the frames it went through, _train's
        # included, hold the model and the trainer's batches on the GPU for as long as Ray keeps the error.
        _clear_frames(e)
        raise
    finally:
        # Here, not in _train: the model's last reference went with _train's frame, so the memory it
        # held is free to be given back before the next trial in this worker.
        _free_memory()


def _train(config: Dict[str, Any], job: Dict[str, Any], trial_dir: Path, checkpoint, device: str, gpu: str) -> None:
    from ultralytics import YOLO

    disable_ultralytics_reporting()
    disable_ultralytics_update_check()
    check_amp_once_per_node(job.get("amp_weights_dir"))
    gpu_slots.cap_memory(job.get("gpu_per_trial", 0))
    DECODED_IMAGES.use(job.get("image_cache_mb", 0) * 2**20, job["threads"])
    save_dir = trial_dir / "train"
    data = str(node_dataset(job["data"])) if is_uri(job["data"]) else job["data"]  # a store's: this node's copy
    # A tuned model (space.model) is a choice of weights, not an Ultralytics train argument.
    weights = job["models"][str(config["model"])] if "model" in config else job["weights"]
    args = {**job["train"], **{k: v for k, v in config.items() if k != "model"}, "data": data,
            "project": str(trial_dir), "name": "train", "exist_ok": True, "device": device}

    ckpt = _resume_point(trial_dir, save_dir, checkpoint)
    if ckpt is None:
        model = YOLO(node_file(weights))
    elif ckpt.get("epoch", -1) + 1 >= args["epochs"]:
        return  # every epoch was already reported: the trial is complete
    else:
        resume_from = _prepare_resume(ckpt, save_dir, args)
        model = YOLO(str(resume_from))
        args = {"resume": str(resume_from), "data": data, "device": device}

    move_staged_checkpoints()
    reporter = EpochReporter(trial_dir, gpu, job.get("checkpoint_every", 1), Location(job["experiment_dir"]).remote,
                              job.get("deadline"), job.get("validate_epochs"), job["train"].get("val", True) is not False,
                              BestEpoch.of_history(trial_dir / HISTORY, job["metric"], job["mode"]),
                              job.get("measure_model", False))
    keep_threads(model, job["threads"])
    model.add_callback("on_train_epoch_end", reporter.on_train_epoch_end)
    model.add_callback("on_model_save", reporter.on_model_save)
    try:
        model.train(**args)
    except RuntimeError as e:
        # Ultralytics retries an OOM of the first epoch with half the batch (up to 3 times); this one it gave up on.
        if "out of memory" not in str(e).lower():
            raise
        raise out_of_memory_error(model, args, job["gpu_per_trial"]) from e
    finally:
        _release(model)


def out_of_memory_error(model, args: Dict[str, Any], gpu_share: float) -> RuntimeError:
    """The one-line error of a trial out of GPU memory (the console shows it), wherever it happened: while
    the trainer was built (there is no trainer yet) or training; retried (GpuMemoryTaken) when other
    processes held part of the trial's share of the card."""
    trainer = getattr(model, "trainer", None)
    batch = getattr(trainer, "batch_size", None) or args.get("batch")
    where = f"training batch {batch}" if trainer is not None else f"setting up training (batch {batch})"
    if gpu_slots.neighbour_took_memory(gpu_share):
        return gpu_slots.GpuMemoryTaken(f"CUDA out of memory {where} on {gpu_share:g} GPU: other processes on the "
                                        "card held part of this trial's share; retried (failure.max_failures)")
    return RuntimeError(out_of_memory_message(where, gpu_share))


def out_of_memory_message(where: str, gpu_share: float) -> str:
    """The one line a trial that ran out of GPU memory fails with."""
    return (f"CUDA out of memory {where} on {gpu_share:g} GPU: lower batch or space.batch, "
            "or give trials more GPU (resources.gpu_per_trial)")


def claim_device(gpu_ids) -> Tuple[str, str]:
    """The device a trial trains on, and the physical GPUs it uses ("" on the CPU).

    Ray shows a trial only its own GPUs (CUDA_VISIBLE_DEVICES), numbered from 0 inside it. A trial
    without GPUs gets none at all: Ray leaves CUDA_VISIBLE_DEVICES unset there, and Ultralytics
    would pick GPU 0 for it, unaccounted for.
    """
    if not gpu_ids:
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
        return "cpu", ""
    return ",".join(str(i) for i in range(len(gpu_ids))), os.environ.get("CUDA_VISIBLE_DEVICES", "")


def keep_threads(model, threads: int) -> None:
    """Torch threads of the trial: its CPUs. Ultralytics' select_device sets them to min(8, cores - 1)
    on the CPU, in the trainer's set-up and in the final validation's; on_pretrain_routine_start and
    on_val_start are the first callbacks after each, and set them back."""
    import torch

    def use_threads(_):
        torch.set_num_threads(threads)

    model.add_callback("on_pretrain_routine_start", use_threads)
    model.add_callback("on_val_start", use_threads)


def _release(model) -> None:
    """Stop what the trial's trainer runs and drop what it holds: a reused worker runs the next trial in
    this process.

    When a scheduler stops a trial (from inside the epoch callback) or training fails, Ultralytics'
    clean-up never runs: its data loader processes, pinned batches, model, EMA and optimizer would
    live on. Ray waits for this before reusing the worker (TUNE_FUNCTION_THREAD_TIMEOUT_S, see runner.py).
    """
    trainer = getattr(model, "trainer", None)
    if trainer is not None:
        for loader in (getattr(trainer, "train_loader", None), getattr(trainer, "test_loader", None)):
            if hasattr(loader, "close"):
                loader.close()  # joins the loader's worker processes, drops their prefetched batches
        trainer.__dict__.clear()  # its model, EMA, optimizer, loaders and metrics go with it
    model.trainer = None


def _clear_frames(error: BaseException) -> None:
    """Drop the locals of the finished frames an error (and the errors it came from) went through."""
    while error is not None:
        traceback.clear_frames(error.__traceback__)
        error = error.__cause__ or error.__context__


def _free_memory() -> None:
    """Give what the ended trial held back: its objects (the model may sit in reference cycles), the heap
    and the GPU memory torch keeps cached, which the next trial on the card, in this worker or another,
    could not use otherwise."""
    import torch

    gc.collect()
    _trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _trim_heap() -> None:
    """Hand the freed heap back to the system: glibc keeps it otherwise, and the worker's memory would
    grow trial after trial even with nothing of the old trials left."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _trial_dir(location: Location, checkpoint) -> Path:
    """The trial's own dir on a shared file system; with an object store, Ray's local working dir
    (the trial runs in it), which Ray uploads with every checkpoint. A trial that continues (it has a
    checkpoint) gets its uploaded files back first (history.jsonl, Ultralytics' output), on whichever
    node it now runs: the next upload replaces them."""
    if not location.remote:
        return location.local
    return location.download(into=Path.cwd()) if checkpoint is not None else Path.cwd()


def _resume_point(trial_dir: Path, save_dir: Path, checkpoint) -> Optional[Dict[str, Any]]:
    """The checkpoint the trial continues from, loaded; None for a fresh start.

    The newest of the trial's registered checkpoint and its own last.pt from an earlier run of it
    (newer when the driver died before registering it: a SIGKILL right after an epoch), except that
    a checkpoint from outside this trial (a PBT donor's) wins: the trial continues from its weights.
    """
    # A checkpoint folder of this trial's that the driver died before registering holds a moved last.pt,
    # and so does the folder it was staged in when its worker died before Ray moved it (a lost node).
    candidates = [save_dir / "weights" / "last.pt", *trial_dir.glob("checkpoint_*/last.pt"),
                  *trial_dir.glob(f"{STAGED}*/last.pt")]
    with checkpoint.as_directory() if checkpoint else nullcontext() as ckpt_dir:
        if ckpt_dir is not None:
            if not Path(ckpt_dir).resolve().is_relative_to(trial_dir.resolve()):
                candidates = []  # a PBT donor's checkpoint
            candidates.append(Path(ckpt_dir) / "last.pt")
        return _newest(candidates)


def _newest(candidates):
    """The newest readable checkpoint of ``candidates``, loaded; None if none can be read."""
    import torch

    loaded = []
    for path in candidates:
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=False))
        except Exception:  # noqa: BLE001 - missing, or cut short by a kill: use another
            continue
    return max(loaded, key=lambda c: c.get("epoch", -1), default=None)


def _prepare_resume(ckpt: Dict[str, Any], save_dir: Path, args: Dict[str, Any]) -> Path:
    """Write the checkpoint into this trial, pointed at this trial's config and folder.

    The checkpoint may come from another trial (PBT exploits a better trial's weights with new
    hyperparameters), so its saved train args are replaced by this trial's before Ultralytics
    resumes from it.
    """
    import torch

    ckpt["train_args"] = {**ckpt["train_args"], **args, "save_dir": str(save_dir)}
    save_dir.joinpath("weights").mkdir(parents=True, exist_ok=True)
    target = save_dir / "weights" / "resume.pt"
    torch.save(ckpt, target)
    return target
