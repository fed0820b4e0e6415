"""The code that runs inside Ray workers: one trial = one Ultralytics training run.

Ray calls ``train_trial(config, job)`` with the sampled hyperparameters in ``config`` and the
experiment's fixed settings in ``job`` (plain, resolved values; see runner.py). With
``reuse_actors`` one warm worker process runs many trials, so nothing here may keep state from
one trial to the next except the caches Ultralytics itself keeps.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import time
from pathlib import Path
from typing import Any, Dict

import ray
from ray import tune

from yolotune.layout import HISTORY, append_jsonl, trial_dirname
from yolotune.storage import Location


def train_trial(config: Dict[str, Any], job: Dict[str, Any]) -> None:
    import torch
    from ultralytics import YOLO

    _disable_ultralytics_reporting()
    torch.set_num_threads(job["threads"])
    ctx = tune.get_context()
    trial_dir = _trial_dir(Location(job["experiment_dir"]).child(trial_dirname(ctx.get_trial_id())),
                           restore=tune.get_checkpoint() is not None)
    save_dir = trial_dir / "train"
    args = {**job["train"], **config, "data": job["data"], "project": str(trial_dir), "name": "train",
            "exist_ok": True}

    checkpoint = tune.get_checkpoint()
    if checkpoint is None:
        model = YOLO(job["weights"])
    else:
        with checkpoint.as_directory() as ckpt_dir:
            candidates = [Path(ckpt_dir) / "last.pt"]
            if Path(ckpt_dir).resolve().is_relative_to(trial_dir.resolve()):
                # This trial's own checkpoint (not a PBT donor's): its last.pt on disk can be one epoch
                # newer, when the driver died before registering the newest checkpoint.
                candidates.append(save_dir / "weights" / "last.pt")
            resume_from = _prepare_resume(candidates, save_dir, args)
        if resume_from is None:
            return  # every epoch was already reported: the trial is complete
        model = YOLO(str(resume_from))
        args = {"resume": str(resume_from), "data": job["data"]}

    reporter = _EpochReporter(trial_dir / HISTORY)
    model.add_callback("on_model_save", reporter.on_model_save)
    model.train(**args)


def _trial_dir(location: Location, restore: bool) -> Path:
    """The trial's own dir on a shared file system; with an object store, Ray's local working dir
    (the trial runs in it), which Ray uploads with every checkpoint. A trial that continues there
    gets its uploaded files back first (history.jsonl, Ultralytics' output): the next upload
    replaces them."""
    if not location.remote:
        return location.local
    return location.download(into=Path.cwd()) if restore else Path.cwd()


class _EpochReporter:
    """Reports each finished epoch to Ray with the trial's last.pt as its checkpoint.

    ``on_model_save`` fires once per epoch, right after last.pt is written, and (unlike
    ``on_fit_epoch_end``) not again for the final validation of best.pt.
    """

    def __init__(self, history: Path):
        # Where the trial ran: the node, and the worker process (shared by trials when actors are reused).
        self.node = {"hostname": socket.gethostname(), "node_id": ray.get_runtime_context().get_node_id(),
                     "pid": os.getpid()}
        self.history, self.last_report = history, time.time()

    def on_model_save(self, trainer) -> None:
        metrics = {
            **trainer.label_loss_items(trainer.tloss, prefix="train"),
            **trainer.metrics,
            **trainer.lr,
        }
        metrics = {k: float(v) for k, v in metrics.items()}
        metrics.update(fitness=float(trainer.fitness or 0.0), epoch=trainer.epoch + 1, **self.node)
        now = time.time()
        append_jsonl(self.history, {**metrics, "timestamp": now, "time_this_iter_s": now - self.last_report})
        self.last_report = now
        with tempfile.TemporaryDirectory(prefix="yolotune-ckpt-") as tmp:
            _link_or_copy(trainer.last, Path(tmp) / "last.pt")
            # Ray copies the checkpoint into the trial directory before report returns.
            tune.report(metrics, checkpoint=tune.Checkpoint.from_directory(tmp))


def _prepare_resume(candidates, save_dir: Path, args: Dict[str, Any]):
    """Copy the newest readable checkpoint into this trial and point it at this trial's config and folder.

    The checkpoint may come from another trial (PBT exploits a better trial's weights with new
    hyperparameters), so its saved train args are replaced by this trial's before Ultralytics
    resumes from it. Returns None if the checkpoint already holds the last epoch.
    """
    import torch

    loaded = []
    for path in candidates:
        try:
            loaded.append(torch.load(path, map_location="cpu", weights_only=False))
        except Exception:  # noqa: BLE001 - missing, or cut short by a kill: use another
            continue
    ckpt = max(loaded, key=lambda c: c.get("epoch", -1))
    if ckpt.get("epoch", -1) + 1 >= args["epochs"]:
        return None
    ckpt["train_args"] = {**ckpt["train_args"], **args, "save_dir": str(save_dir)}
    save_dir.joinpath("weights").mkdir(parents=True, exist_ok=True)
    target = save_dir / "weights" / "resume.pt"
    torch.save(ckpt, target)
    return target


def _link_or_copy(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
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
