"""What a trial reports to Ray at each epoch's end (``EpochReporter``, Ultralytics callbacks): its metrics
and where it ran, its history row, its best epoch's weights by the experiment's metric (``BestEpoch``)
and, every ``checkpoint.every`` epochs, its last.pt as Ray's checkpoint; which epochs validate."""

from __future__ import annotations

import os
import random
import shutil
import socket
import tempfile
import time
from contextlib import suppress
from pathlib import Path
from typing import Any, Dict, Optional

import ray
from ray import tune

from yolotune.layout import (HISTORY, PAST_DEADLINE, STAGED, TRAINED_BATCH, TRIAL_BEST_WEIGHTS, append_jsonl,
                             measured_value, read_jsonl, write_atomic)
from yolotune.model_costs import model_costs


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


class EpochReporter:
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
        out_of_time = self._out_of_time()
        checkpointed = not (trainer.epoch + 1) % self.every or trainer.stop or out_of_time
        if self.best.improves(metrics):  # before its history row: a kill between them never leaves a row without weights
            # A link when last.pt moves into this epoch's checkpoint (its name is gone before Ultralytics
            # rewrites it in place): one copy of the weights. Otherwise, and in a store, a copy.
            keep_best(trainer.last, trainer.wdir / TRIAL_BEST_WEIGHTS, link=checkpointed and not self.remote)
        if self.measure_model and (trainer.stop or out_of_time):  # the trial's last report (of this run)
            best = trainer.wdir / TRIAL_BEST_WEIGHTS
            metrics.update(model_costs(best if best.is_file() else trainer.last, trainer.args.imgsz, trainer.device))
        now = time.time()
        append_jsonl(self.trial_dir / HISTORY,
                     {**metrics, "timestamp": now, "time_this_iter_s": now - self.last_report})
        self.last_report = now
        if out_of_time:  # this trial stops here (validated): the time budget's driver waits for this report
            metrics[PAST_DEADLINE] = self.deadline
        if not checkpointed:
            tune.report(metrics)
            return
        # In an object store Ray uploads the staged last.pt, and the trial dir (uploaded too) keeps its own,
        # so it is staged beside the trial dir. Elsewhere last.pt moves into the checkpoint folder
        # (move_staged_checkpoints) and the next epoch writes a new one.
        staging, stage = (self.trial_dir.parent, _link_or_copy) if self.remote else (self.trial_dir, os.replace)
        with tempfile.TemporaryDirectory(prefix=STAGED, dir=staging) as tmp:
            stage(trainer.last, Path(tmp) / "last.pt")
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))
        if out_of_time and not trainer.stop and trainer.epoch + 1 < trainer.epochs:
            _wait_for_the_stop()  # the time budget's driver ends the run once every trial got here (runner.TimeBudget)


def _wait_for_the_stop(timeout_s: float = 600) -> None:
    """Train no further epoch (Ray would not record it): Ray ends this worker when the run stops.
    Bounded, so that a stop that never comes cannot hold the trial's slot for ever."""
    deadline = time.time() + timeout_s
    while time.time() < deadline:
        time.sleep(1)


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


def keep_best(last: Path, best: Path, link: bool) -> None:
    """``best`` replaced atomically by ``last``: a hard link if ``link`` and the file system has them, else a copy."""
    if link:
        tmp = best.with_name(f".{best.name}.link")
        with suppress(FileNotFoundError):
            tmp.unlink()
        try:
            os.link(last, tmp)
            os.replace(tmp, best)
            return
        except OSError:  # a file system without hard links
            pass
    write_atomic(best, last.read_bytes())


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:  # a file system without hard links
        shutil.copy2(src, dst)
