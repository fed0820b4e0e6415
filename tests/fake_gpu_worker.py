"""Installed in every Ray worker of the GPU rehearsal (ray.runtime_env.worker_process_setup_hook): Ray
declares GPUs that this machine does not have, so a trial trains on the CPU here, while everything
yolotune does with its GPU share (claim_device, the device string it passes Ultralytics, the loader
workers and threads it plans) runs as on a GPU machine and is recorded.

Each record is a line of the JSON lines file named by $FAKE_GPU_PROBE, with the trial's id:
``device``: every device Ultralytics' select_device was asked for (training, and the final
validation of best.pt), with CUDA_VISIBLE_DEVICES as Ray set it; ``training``: the torch threads
and data loader processes while an epoch trains.
"""

from __future__ import annotations

import json
import os
import time

import torch
from ray import tune


def install() -> None:
    from ultralytics.engine import trainer, validator
    from ultralytics.utils import YAML
    from ultralytics.utils.callbacks.base import default_callbacks

    def select_device(device="", newline=False, verbose=True):
        # A real card's select_device returns cuda:N and leaves torch's threads alone: so does this.
        _record("device", requested=str(device), visible=os.environ.get("CUDA_VISIBLE_DEVICES"))
        return torch.device("cpu")

    def loader_workers_as_on_a_gpu(trainer):
        # Ultralytics zeroes the loader workers for a CPU device, after args.yaml kept the trial's.
        trainer.args.workers = YAML.load(trainer.save_dir / "args.yaml")["workers"]

    trainer.select_device = validator.select_device = select_device  # the names they call
    default_callbacks["on_pretrain_routine_start"].append(loader_workers_as_on_a_gpu)
    default_callbacks["on_train_epoch_end"].append(
        lambda trainer: _record("training", threads=torch.get_num_threads(),
                                loader_workers=trainer.train_loader.num_workers))


def _record(kind: str, **values) -> None:
    record = {"kind": kind, "trial_id": tune.get_context().get_trial_id(), "pid": os.getpid(), "time": time.time(),
              **values}
    with open(os.environ["FAKE_GPU_PROBE"], "a") as f:
        f.write(json.dumps(record) + "\n")
