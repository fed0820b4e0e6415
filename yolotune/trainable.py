"""The code that runs inside Ray workers: one trial = one Ultralytics training run.

Ray calls ``train_trial(config, job)`` with the sampled hyperparameters in ``config`` and the
experiment's fixed settings in ``job`` (plain, resolved values; see runner.py). With
``reuse_actors`` one warm worker process runs many trials, so nothing here may keep state from
one trial to the next except the caches Ultralytics itself keeps and the decoded images
(``DecodedImages``), which are the same for every trial.
"""

from __future__ import annotations

import ctypes
import gc
import json
import logging
import os
import random
import re
import shutil
import socket
import tempfile
import time
import traceback
from contextlib import contextmanager, nullcontext, redirect_stderr, redirect_stdout
from functools import partial
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import ray
from ray import tune

from yolotune import gpu_slots
from yolotune.layout import (HISTORY, PAST_DEADLINE, TRAIN_LOG, TRAINED_BATCH, TRIAL_BEST_WEIGHTS, append_jsonl,
                             measured_value, read_jsonl, trial_dirname, write_atomic)
from yolotune.storage import Location, cache_root, is_uri, node_dataset, node_file

AMP_CHECK_MODEL = "yolo26n.pt"  # what ultralytics.utils.checks.check_amp loads from its weights dir


def train_trial(config: Dict[str, Any], job: Dict[str, Any]) -> None:
    # before torch can see the GPUs: the card of this process's slot on the node, then the device
    gpu_slots.spread(job.get("gpu_per_trial", 0))
    device, gpu = claim_device(ray.get_gpu_ids())
    location = Location(job["experiment_dir"]).child(trial_dirname(tune.get_context().get_trial_id()))
    checkpoint = tune.get_checkpoint()
    trial_dir = _trial_dir(location, checkpoint)
    try:
        with _trial_log(trial_dir / TRAIN_LOG):
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

    _disable_ultralytics_reporting()
    _disable_ultralytics_update_check()
    _check_amp_once_per_node(job.get("amp_weights_dir"))
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

    _move_staged_checkpoints()
    reporter = _EpochReporter(trial_dir, gpu, job.get("checkpoint_every", 1), Location(job["experiment_dir"]).remote,
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


class DecodedImages:
    """Images decoded and resized once per worker process, for all the trials it runs.

    Every trial of an experiment reads the same images at the same size, and Ultralytics decodes
    them again in each trial (and each epoch, unless ``cache=ram``). A dataset built in this process
    first adds its images to this cache, up to ``limit`` bytes (beyond it, images are read from disk
    as Ultralytics reads them), and its ``load_image`` takes them from here; loader processes forked
    afterwards (GPU trials) inherit them. Ultralytics' own RAM cache hands out its arrays the same way
    (its transforms copy before they change an image), and the mosaic buffer is kept as
    Ultralytics keeps it, so a trial's batches, and its results, are the same with or without it.
    """

    def __init__(self):
        self.images: Dict[tuple, tuple] = {}
        self.bytes = self.limit = 0
        self.threads, self.full = 1, False

    def use(self, limit: int, threads: int) -> None:
        from ultralytics.data.base import BaseDataset

        self.limit, self.threads = limit, threads
        if not hasattr(BaseDataset, "_load_image_uncached"):  # once per process
            BaseDataset._load_image_uncached = BaseDataset.load_image
            init = BaseDataset.__init__

            def __init__(dataset, *args, **kwargs):
                init(dataset, *args, **kwargs)
                self.add(dataset)

            def load_image(dataset, i, rect_mode=True, resize_short=False):
                return self.load_image(dataset, i, rect_mode, resize_short)

            BaseDataset.__init__, BaseDataset.load_image = __init__, load_image

    @staticmethod
    def key(dataset, i: int, rect_mode: bool = True, resize_short: bool = False) -> tuple:
        return dataset.im_files[i], str(dataset.imgsz), rect_mode, resize_short, dataset.cv2_flag

    def add(self, dataset) -> None:
        """Decode the dataset's images that are not here yet, while the limit allows."""
        if dataset.cache == "ram" or not self.limit:
            return  # Ultralytics keeps its own copy of every image for this trial, or the cache is off
        new = [] if self.full else [i for i in range(dataset.ni) if self.key(dataset, i) not in self.images]
        if new:
            self._decode(dataset, new)
        print(f"yolotune: {dataset.ni - len(new)} of {dataset.ni} images decoded by an earlier trial of this worker, "
              f"{len(self.images)} held ({self.bytes / 2**20:.1f} of {self.limit / 2**20:.0f} MiB)")

    def _decode(self, dataset, indices) -> None:
        augment, dataset.augment = dataset.augment, False  # decode only, no mosaic buffer bookkeeping
        try:
            with ThreadPool(self.threads) as pool:
                for i, decoded in zip(indices, pool.imap(dataset._load_image_uncached, indices)):
                    if self.bytes + decoded[0].nbytes > self.limit:
                        self.full = True  # later datasets are not decoded twice just to find that out
                        break
                    self.images[self.key(dataset, i)] = decoded
                    self.bytes += decoded[0].nbytes
        finally:
            dataset.augment = augment

    def load_image(self, dataset, i: int, rect_mode: bool = True, resize_short: bool = False):
        decoded = None if dataset.ims[i] is not None else self.images.get(self.key(dataset, i, rect_mode, resize_short))
        if decoded is None:  # in Ultralytics' RAM cache or mosaic buffer, or not held here
            return dataset._load_image_uncached(i, rect_mode, resize_short)
        if dataset.augment and dataset.cache != "ram":  # Ultralytics' mosaic buffer, as load_image keeps it
            dataset.ims[i], dataset.im_hw0[i], dataset.im_hw[i] = decoded
            dataset.buffer.append(i)
            if 1 < len(dataset.buffer) >= dataset.max_buffer_length:
                j = dataset.buffer.pop(0)
                dataset.ims[j], dataset.im_hw0[j], dataset.im_hw[j] = None, None, None
        return decoded


DECODED_IMAGES = DecodedImages()


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


def _check_amp_once_per_node(weights_dir: Optional[str]) -> None:
    """Ultralytics' trainer runs its AMP check (``check_amp``) in every trial's set-up; in this worker
    process it runs ``node_amp_check`` instead (the trainer calls the name it imported)."""
    import ultralytics.engine.trainer

    ultralytics.engine.trainer.check_amp = partial(node_amp_check, weights_dir=weights_dir)


def node_amp_check(model, weights_dir: Optional[str]) -> bool:
    """Ultralytics' AMP check, run at most once per node and GPU model: later trials read its result
    from yolotune's cache (keyed by the GPU's name and torch's version; a lock makes trials that start
    together wait for the first one's).

    The check loads its model (``yolo26n.pt``) from ``weights_dir``, the driver's copy
    (runner.amp_check_weights), and downloads nothing: where that folder is not on this node (a
    cluster node), or the driver had none (offline), the check is skipped at once with AMP on, as
    Ultralytics does offline, and the next trial tries again.
    """
    import torch
    from filelock import FileLock
    from ultralytics.utils import checks

    device = next(model.parameters()).device
    if device.type != "cuda":
        return checks.check_amp(model)  # AMP off at once on the CPU, without a model
    gpu = torch.cuda.get_device_name(device)
    record = cache_root() / "amp-check" / f"{re.sub(r'[^A-Za-z0-9.+-]+', '_', gpu)}-torch-{torch.__version__}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{record}.lock"):
        if record.is_file():
            amp = json.loads(record.read_text())["amp"]
            print(f"yolotune: AMP {'on' if amp else 'off'}, as an earlier trial's AMP check on this node's {gpu} found")
            return amp
        with _no_downloads(weights_dir) as downloads:
            amp = checks.check_amp(model)
        if downloads:
            where = f"in {weights_dir} on this node" if weights_dir else "here: the driver could not fetch it (offline)"
            print(f"yolotune: AMP check skipped, AMP on: its model {AMP_CHECK_MODEL} is not {where}, and trials "
                  "download nothing")
        else:
            write_atomic(record, json.dumps({"amp": bool(amp)}))
        return amp


@contextmanager
def _no_downloads(weights_dir: Optional[str]):
    """Ultralytics with its weights dir at ``weights_dir`` (check_amp reads it at each call) and a model
    that is not there failing at once, as offline (check_amp then skips its check), instead of being
    downloaded; yields the models asked for that were not there."""
    import ultralytics.utils
    from ultralytics.utils import downloads

    asked = []

    def local_only(file, *args, **kwargs):  # Ultralytics asks it for every model it loads, present or not
        if Path(file).is_file():
            return str(file)
        asked.append(file)
        raise ConnectionError("yolotune: trials download nothing")

    saved = ultralytics.utils.WEIGHTS_DIR, downloads.attempt_download_asset
    if weights_dir:
        ultralytics.utils.WEIGHTS_DIR = Path(weights_dir)
    downloads.attempt_download_asset = local_only
    try:
        yield asked
    finally:
        ultralytics.utils.WEIGHTS_DIR, downloads.attempt_download_asset = saved


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


class BestEpoch:
    """A trial's best value of the experiment's metric so far, over the epochs that measured it
    (layout.measured_value, as results rank trials); ties keep the first, as results do."""

    def __init__(self, metric: str, mode: str, best: Optional[float] = None):
        self.metric, self.lower, self.best = metric, mode == "min", best

    @classmethod
    def of_history(cls, history: Path, metric: str, mode: str) -> "BestEpoch":
        """Where a resumed trial left off (a fresh trial has no history)."""
        best = cls(metric, mode)
        for row in read_jsonl(history)[0]:
            best.improves(row)
        return best

    def improves(self, row: Dict[str, Any]) -> bool:
        """Whether this epoch's row beats every earlier one (and is now the best)."""
        value = measured_value(row, self.metric)
        if value is None or (self.best is not None and (value >= self.best if self.lower else value <= self.best)):
            return False
        self.best = value
        return True


class _EpochReporter:
    """Reports each finished epoch to Ray, with the trial's last.pt as its checkpoint every
    ``every`` epochs, at the trial's last epoch and at the first epoch end past the time budget.

    Validation runs only at the epochs in ``validate_epochs`` (None: every epoch), at the epoch that
    ends past the time budget (the trial stops there) and, as Ultralytics always does, at the final
    one. Decided from the epoch number alone, so a resumed trial validates where a fresh one would.
    An epoch without validation reports its training losses and ``validated: 0``, without the
    validation metrics (nor ``fitness``): schedulers and searchers skip a result without the metric.

    ``on_train_epoch_end`` fires after training, before Ultralytics decides whether to validate;
    ``on_model_save`` fires once per epoch, right after last.pt is written, and (unlike
    ``on_fit_epoch_end``) not again for the final validation of best.pt.
    """

    def __init__(self, trial_dir: Path, gpu: str, every: int, remote: bool, deadline: Optional[float],
                 validate_epochs: Optional[list], val: bool, best: BestEpoch, measure_model: bool):
        # Where the trial ran: the node, the worker process (shared by trials when actors are reused)
        # and the physical GPUs (CUDA_VISIBLE_DEVICES as Ray set it; "" on the CPU).
        self.node = {"hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                     "pid": os.getpid(), "gpu": gpu}
        self.trial_dir, self.every, self.remote, self.last_report = trial_dir, every, remote, time.time()
        self.deadline = deadline  # the time budget's end: the run stops after this epoch, keep it
        self.validate_epochs = None if validate_epochs is None else set(validate_epochs)
        self.val = val  # train.val=false: only Ultralytics' final validation
        self.ended_at = time.time()  # when this epoch's training ended: before or after the deadline
        self.best = best
        self.measure_model = measure_model  # the experiment has objectives: its last report has MODEL_COSTS

    def on_train_epoch_end(self, trainer) -> None:
        self.ended_at = time.time()
        wanted = self.validate_epochs is None or trainer.epoch + 1 in self.validate_epochs or self._out_of_time()
        trainer.args.val = self.val and wanted
        if self.val and not _validates(trainer):
            _draw_as_validation_would(trainer)
        # Ultralytics keeps the last validation's values when it skips one: mark them stale. Validation,
        # if it runs, sets both; an unvalidated epoch then neither counts as the best (best.pt) nor
        # feeds Ultralytics' early stopping.
        trainer.fitness = None
        trainer.metrics = {k: float("nan") for k in trainer.metrics or {}}

    def _out_of_time(self) -> bool:
        return self.deadline is not None and self.ended_at >= self.deadline

    def on_model_save(self, trainer) -> None:
        validated = trainer.fitness is not None
        metrics = {
            **trainer.label_loss_items(trainer.tloss, prefix="train"),
            **(trainer.metrics if validated else {}),
            **trainer.lr,
        }
        metrics = {k: float(v) for k, v in metrics.items()}
        if validated:
            metrics["fitness"] = float(trainer.fitness)
        # trainer.batch_size: what the loaders were built with, cut when Ultralytics ran out of GPU memory
        metrics.update(epoch=trainer.epoch + 1, validated=int(validated), **{TRAINED_BATCH: trainer.batch_size},
                       **self.node)
        if self.best.improves(metrics):  # before its history row: a kill between them never leaves a row without weights
            write_atomic(trainer.wdir / TRIAL_BEST_WEIGHTS, trainer.last.read_bytes())
        out_of_time = self._out_of_time()
        if self.measure_model and (trainer.stop or out_of_time):  # the trial's last report (of this run)
            best = trainer.wdir / TRIAL_BEST_WEIGHTS
            metrics.update(model_costs(best if best.is_file() else trainer.last, trainer.args.imgsz, trainer.device))
        now = time.time()
        append_jsonl(self.trial_dir / HISTORY,
                     {**metrics, "timestamp": now, "time_this_iter_s": now - self.last_report})
        self.last_report = now
        if out_of_time:  # this trial stops here (validated): the time budget's driver waits for this report
            metrics[PAST_DEADLINE] = self.deadline
        if (trainer.epoch + 1) % self.every and not trainer.stop and not out_of_time:
            tune.report(metrics)
            return
        # In an object store Ray uploads the staged last.pt, and the trial dir (uploaded too) keeps its own,
        # so it is staged beside the trial dir. Elsewhere last.pt moves into the checkpoint folder
        # (_move_staged_checkpoints) and the next epoch writes a new one.
        staging, stage = (self.trial_dir.parent, _link_or_copy) if self.remote else (self.trial_dir, os.replace)
        with tempfile.TemporaryDirectory(prefix=STAGED, dir=staging) as tmp:
            stage(trainer.last, Path(tmp) / "last.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if out_of_time and not trainer.stop and trainer.epoch + 1 < trainer.epochs:
            _wait_for_the_stop()  # the time budget's driver ends the run once every trial got here (runner.TimeBudget)


WARMUP_PASSES, TIMED_PASSES = 3, 15


def model_costs(weights: Path, imgsz, device) -> Dict[str, float]:
    """MODEL_COSTS of the model in ``weights`` on ``device``, the same way for every trial: its EMA (what
    Ultralytics saves as the model) in fp32 with Conv and BatchNorm fused (as Ultralytics predicts), one
    image of ``imgsz``: the median time of TIMED_PASSES forward passes after WARMUP_PASSES, its parameters
    (millions) and GFLOPs (Ultralytics' get_flops)."""
    import statistics

    import torch
    from ultralytics.utils.torch_utils import get_flops

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    model = (ckpt.get("ema") or ckpt["model"]).float().fuse(verbose=False).eval().to(device)
    height, width = (imgsz, imgsz) if isinstance(imgsz, int) else imgsz
    image = torch.zeros(1, 3, height, width, device=device)
    sync = torch.cuda.synchronize if image.is_cuda else (lambda: None)
    times = []
    with torch.inference_mode():
        for n in range(WARMUP_PASSES + TIMED_PASSES):
            sync()
            start = time.perf_counter()
            model(image)
            sync()
            if n >= WARMUP_PASSES:
                times.append(time.perf_counter() - start)
    return {"latency_ms": 1000 * statistics.median(times), "params": sum(p.numel() for p in model.parameters()) / 1e6,
            "gflops": get_flops(model, [height, width])}


STAGED = ".ckpt-"  # the prefix of the folders a trial stages its checkpoints in


def _move_staged_checkpoints() -> None:
    """Ray copies each reported checkpoint into the trial's checkpoint folder before report returns,
    while the GPU waits: ~10 MB (YOLO11n) to ~350 MB (YOLO11x, AdamW) per trial-epoch. A checkpoint that
    a trial staged on the local file system of that folder is moved into it instead (a rename); Ray's
    checks and bookkeeping around the copy stay as they are, and anything else (an object store, a
    PBT clone) is copied as before. Once per worker process."""
    from pyarrow.fs import LocalFileSystem
    from ray.train._internal import storage

    copy = storage._pyarrow_fs_copy_files
    if getattr(copy, "moves_staged", False):
        return

    def copy_or_move(source, destination, source_filesystem=None, destination_filesystem=None, **kwargs):
        if (Path(source).name.startswith(STAGED) and isinstance(source_filesystem, LocalFileSystem)
                and isinstance(destination_filesystem, LocalFileSystem)):
            try:
                for path in Path(source).iterdir():
                    os.replace(path, Path(destination) / path.name)
                return None
            except OSError:  # another device: what is left is copied
                pass
        return copy(source, destination, source_filesystem=source_filesystem,
                    destination_filesystem=destination_filesystem, **kwargs)

    copy_or_move.moves_staged, copy_or_move.ray_copy = True, copy
    storage._pyarrow_fs_copy_files = copy_or_move


def _wait_for_the_stop(timeout_s: float = 600) -> None:
    """Train no further epoch (Ray would not record it): Ray ends this worker when the run stops.
    Bounded, so that a stop that never comes cannot hold the trial's slot for ever."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(1)


@contextmanager
def _trial_log(path: Path):
    """Send everything the trial prints to its train.log (appended on resume): stdout, stderr (so
    warnings too), Ultralytics' LOGGER, and the traceback if it raises. The worker process runs
    trial after trial, so all of it is undone when the trial ends, however it ends (a trial stopped
    by the scheduler ends with SystemExit inside ``tune.report``)."""
    from ultralytics.utils import LOGGER

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1, encoding="utf-8") as raw:
        log = _FinishedLines(raw)
        # LOGGER's handler holds the sys.stdout of import time: point it at the log for this trial.
        handlers = [h for h in LOGGER.handlers if type(h) is logging.StreamHandler]
        streams = [h.setStream(log) for h in handlers]
        try:
            with redirect_stdout(log), redirect_stderr(log):
                yield
        except Exception:
            log.write(traceback.format_exc())
            raise
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)
            log.close()


class _FinishedLines:
    """Writes whole lines only: a progress bar redrawn in place (``\\r``) leaves its final state, and
    terminal control sequences are dropped, so train.log reads as plain text."""

    def __init__(self, file):
        self.file, self.line = file, ""

    def write(self, text: str) -> int:
        for part in re.split(r"(\r|\n)", _ANSI.sub("", text)):
            if part == "\n":
                self.file.write(self.line + "\n")
                self.line = ""
            elif part == "\r":
                self.line = ""
            else:
                self.line += part
        return len(text)

    def flush(self) -> None:  # a line in progress waits for its end
        self.file.flush()

    def close(self) -> None:
        if self.line:
            self.file.write(self.line + "\n")
        self.file.flush()

    def isatty(self) -> bool:
        return False


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


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


def _validates(trainer) -> bool:
    """Whether Ultralytics validates after this epoch (its own condition, in BaseTrainer._do_train)."""
    return bool(trainer.args.val or trainer.epoch + 1 >= trainer.epochs or trainer.stopper.possible_stop
                or trainer.stop)


def _draw_as_validation_would(trainer) -> None:
    """Ultralytics' Format transform draws ``random.uniform`` for every image it formats, validation
    images included: without loader processes, a validation advances the random state that the next
    epoch's augmentations draw from. A skipped validation draws as many, so that training goes on
    exactly as it would with every epoch validated (validate=every, and Ultralytics' own tuner)."""
    from ultralytics.data.augment import Format

    loader = trainer.test_loader
    if loader is None or loader.num_workers:
        return  # no validation loader, or one whose processes do the drawing
    transforms = getattr(getattr(loader.dataset, "transforms", None), "transforms", [])
    for _ in range(len(loader.dataset) * sum(isinstance(t, Format) for t in transforms)):
        random.uniform(0, 1)


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)


def _disable_ultralytics_reporting() -> None:
    """yolotune reports every epoch itself; Ultralytics' Ray Tune and W&B callbacks would report twice.

    Ultralytics adds the callbacks of each enabled integration module to every trainer; emptying
    those modules' callback tables turns them off in this worker process only (its settings file,
    shared with the user, is left alone).
    """
    from ultralytics.utils.callbacks import raytune, wb

    raytune.callbacks.clear()
    wb.callbacks.clear()


def _disable_ultralytics_update_check() -> None:
    """YOLO.train asks the package index whether a newer Ultralytics exists (a request of up to 3 s in
    every trial, only to print a line); in this worker process it asks nothing."""
    from ultralytics.utils import checks

    checks.check_pip_update_available = lambda: False
