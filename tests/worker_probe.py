"""Installed in every Ray worker of a test sweep (ray.runtime_env.worker_process_setup_hook): records
the worker's memory and child processes at each trial's start and during its training.

Ultralytics trains on the CPU without data loader processes (it sets workers=0 there); the probe
gives CPU trials 2 loader processes, as a GPU trial has, so their clean-up can be checked here.
"""

from __future__ import annotations

import gc
import json
import os
import time

import psutil
import torch
from ultralytics.engine.trainer import BaseTrainer

LOADER_WORKERS = 2


def install() -> None:
    from ultralytics.utils.callbacks.base import default_callbacks

    default_callbacks["on_pretrain_routine_start"].append(_trial_start)
    default_callbacks["on_train_epoch_end"].append(_training)


def _trial_start(trainer) -> None:
    _record(trainer, "start")
    trainer.args.workers = LOADER_WORKERS


def _training(trainer) -> None:
    _record(trainer, "training")


def _record(trainer, when: str) -> None:
    me = psutil.Process()
    objects = gc.get_objects()
    record = {"trainers": sum(isinstance(o, BaseTrainer) for o in objects),
              "tensor_mib": sum(o.nelement() * o.element_size() for o in objects if torch.is_tensor(o)) / 2**20,
              "when": when, "time": time.time(), "pid": os.getpid(), "rss": me.memory_info().rss,
              "children": len(me.children(recursive=True))}
    with open(trainer.save_dir.parent / "probe.jsonl", "a") as f:
        f.write(json.dumps(record) + "\n")
