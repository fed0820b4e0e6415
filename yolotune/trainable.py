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
from multiprocessing.pool import ThreadPool
from pathlib import Path
from typing import Any, Dict, Optional, Tuple

import ray
from ray import tune

from yolotune.layout import HISTORY, PAST_DEADLINE, TRAIN_LOG, append_jsonl, trial_dirname
from yolotune.storage import Location, is_uri, node_dataset, node_file


def train_trial(config: Dict[str, Any], job: Dict[str, Any]) -> None:
    device, gpu = claim_device(ray.get_gpu_ids())  # before torch can see the GPUs
    location = Location(job["experiment_dir"]).child(trial_dirname(tune.get_context().get_trial_id()))
    trial_dir = _trial_dir(location, restore=tune.get_checkpoint() is not None)
    with _trial_log(trial_dir / TRAIN_LOG):
        _train(config, job, trial_dir, device, gpu)


def _train(config: Dict[str, Any], job: Dict[str, Any], trial_dir: Path, device: str, gpu: str) -> None:
    import torch
    from ultralytics import YOLO

    _disable_ultralytics_reporting()
    _use_amp_check_weights(job.get("amp_weights_dir"))
    torch.set_num_threads(job["threads"])
    DECODED_IMAGES.use(job.get("image_cache_mb", 0) * 2**20, job["threads"])
    save_dir = trial_dir / "train"
    data = str(node_dataset(job["data"])) if is_uri(job["data"]) else job["data"]  # a store's: this node's copy
    args = {**job["train"], **config, "data": data, "project": str(trial_dir), "name": "train",
            "exist_ok": True, "device": device}

    # This trial's own last.pt, from an earlier run of it: newer than its registered checkpoint, or the
    # only one, when the driver died before registering the newest (a SIGKILL right after an epoch).
    candidates = [save_dir / "weights" / "last.pt"]
    checkpoint = tune.get_checkpoint()
    with checkpoint.as_directory() if checkpoint else nullcontext() as ckpt_dir:
        if ckpt_dir is not None:
            if not Path(ckpt_dir).resolve().is_relative_to(trial_dir.resolve()):
                candidates = []  # a PBT donor's checkpoint: continue from its weights, not this trial's
            candidates.append(Path(ckpt_dir) / "last.pt")
        ckpt = _newest(candidates)
    if ckpt is None:
        model = YOLO(node_file(job["weights"]))
    elif ckpt.get("epoch", -1) + 1 >= args["epochs"]:
        return  # every epoch was already reported: the trial is complete
    else:
        resume_from = _prepare_resume(ckpt, save_dir, args)
        model = YOLO(str(resume_from))
        args = {"resume": str(resume_from), "data": data, "device": device}

    # Ray uploads the whole trial dir when it is in an object store: checkpoints are staged beside it.
    scratch = trial_dir.parent if Location(job["experiment_dir"]).remote else trial_dir
    reporter = _EpochReporter(trial_dir, gpu, job.get("checkpoint_every", 1), scratch, job.get("deadline"),
                              job.get("validate_epochs"), job["train"].get("val", True) is not False)
    model.add_callback("on_train_epoch_end", reporter.on_train_epoch_end)
    model.add_callback("on_model_save", reporter.on_model_save)
    try:
        model.train(**args)
    except BaseException as e:
        # A stop (Ray raises SystemExit in report) or an error: the finished frames' locals hold the trainer.
        traceback.clear_frames(e.__traceback__)
        raise
    finally:
        _release(model)


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


def _release(model) -> None:
    """Free what the trial's trainer holds: a reused worker runs the next trial in this process.

    When a scheduler stops a trial (from inside the epoch callback) or training fails, Ultralytics'
    clean-up never runs: its data loader processes, pinned batches, model, EMA and optimizer would
    live on. Ray waits for this before reusing the worker (TUNE_FUNCTION_THREAD_TIMEOUT_S, see runner.py).
    """
    import torch

    trainer = getattr(model, "trainer", None)
    if trainer is not None:
        for loader in (getattr(trainer, "train_loader", None), getattr(trainer, "test_loader", None)):
            if hasattr(loader, "close"):
                loader.close()  # joins the loader's worker processes, drops their prefetched batches
        trainer.__dict__.clear()  # its model, EMA, optimizer, loaders and metrics go with it
    model.trainer = None
    gc.collect()
    _trim_heap()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()  # return the freed memory to the GPU, for the next trial on the card


def _trim_heap() -> None:
    """Hand the freed heap back to the system: glibc keeps it otherwise, and the worker's memory would
    grow trial after trial even with nothing of the old trials left."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc
        pass


def _use_amp_check_weights(weights_dir) -> None:
    """Ultralytics' AMP check loads a small model from its weights dir, which is relative (``weights``)
    unless set otherwise: from a trial's working directory it would download it again in every
    trial. The driver fetched it once (runner.amp_check_weights); point the check at that copy."""
    if weights_dir:
        import ultralytics.utils

        ultralytics.utils.WEIGHTS_DIR = Path(weights_dir)  # check_amp reads it at each call


def _trial_dir(location: Location, restore: bool) -> Path:
    """The trial's own dir on a shared file system; with an object store, Ray's local working dir
    (the trial runs in it), which Ray uploads with every checkpoint. A trial that continues there
    gets its uploaded files back first (history.jsonl, Ultralytics' output): the next upload
    replaces them."""
    if not location.remote:
        return location.local
    return location.download(into=Path.cwd()) if restore else Path.cwd()


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

    def __init__(self, trial_dir: Path, gpu: str, every: int, scratch: Path, deadline: Optional[float],
                 validate_epochs: Optional[list] = None, val: bool = True):
        # Where the trial ran: the node, the worker process (shared by trials when actors are reused)
        # and the physical GPUs (CUDA_VISIBLE_DEVICES as Ray set it; "" on the CPU).
        self.node = {"hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                     "pid": os.getpid(), "gpu": gpu}
        self.trial_dir, self.every, self.scratch, self.last_report = trial_dir, every, scratch, time.time()
        self.deadline = deadline  # the time budget's end: the run stops after this epoch, keep it
        self.validate_epochs = None if validate_epochs is None else set(validate_epochs)
        self.val = val  # train.val=false: only Ultralytics' final validation
        self.ended_at = time.time()  # when this epoch's training ended: before or after the deadline

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
        metrics.update(epoch=trainer.epoch + 1, validated=int(validated), **self.node)
        now = time.time()
        append_jsonl(self.trial_dir / HISTORY,
                     {**metrics, "timestamp": now, "time_this_iter_s": now - self.last_report})
        self.last_report = now
        out_of_time = self._out_of_time()
        if out_of_time:  # this trial stops here (validated): the time budget's driver waits for this report
            metrics[PAST_DEADLINE] = self.deadline
        if (trainer.epoch + 1) % self.every and not trainer.stop and not out_of_time:
            tune.report(metrics)
            return
        # On the trial dir's file system, so last.pt is linked, not copied; Ray copies it into the
        # trial's checkpoint folder before report returns.
        with tempfile.TemporaryDirectory(prefix=".ckpt-", dir=self.scratch) as tmp:
            _link_or_copy(trainer.last, Path(tmp) / "last.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if out_of_time and not trainer.stop and trainer.epoch + 1 < trainer.epochs:
            _wait_for_the_stop()  # the time budget's driver ends the run once every trial got here (runner.TimeBudget)


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
