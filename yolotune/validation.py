"""Checks an experiment before anything imports torch, Ray or Ultralytics.

Each check raises ConfigError naming the key, the value and what is allowed; the CLI prints
that one line and exits 2.
"""

from __future__ import annotations

import difflib
import importlib.util
import re
from functools import lru_cache
from pathlib import Path
from typing import Set

import yaml

from yolotune.config import ExperimentConfig
from yolotune.errors import ConfigError
from yolotune.space import parse_space

# Ultralytics arguments that yolotune sets itself, and where to set them instead.
OWNED_TRAIN_ARGS = {
    "model": "set model.weights",
    "data": "set data.yaml",
    "project": "yolotune writes each trial's output in its trial directory",
    "name": "yolotune writes each trial's output in its trial directory",
    "exist_ok": "yolotune writes each trial's output in its trial directory",
    "resume": "set the top-level resume=true",
    "mode": "yolotune only trains",
}
PRUNING_SCHEDULERS = {"asha", "hyperband", "median", "pbt"}
SEARCH_EXTRAS = {"optuna": ["optuna"], "hyperopt": ["hyperopt"], "bohb": ["hpbandster", "ConfigSpace"]}
WANDB_MODES = ("disabled", "offline", "online")
# What the trainable reports every epoch (trainable.py): fitness, epoch and Ultralytics' metrics.
REPORTED_METRIC = re.compile(
    r"^(fitness|epoch|metrics/(precision|recall|mAP50|mAP50-95)\([BMP]\)|metrics/accuracy_top[15]"
    r"|(train|val)/\w+_loss|lr/pg\d)$"
)


@lru_cache(maxsize=1)
def ultralytics_args() -> Set[str]:
    """Keys of the installed Ultralytics cfg/default.yaml, read as a file (no import)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        raise ConfigError("ultralytics", None, "not installed: pip install ultralytics")
    with open(Path(spec.origin).parent / "cfg" / "default.yaml") as f:
        return set(yaml.safe_load(f))


def _check_train_arg(key: str, name: str) -> None:
    args = ultralytics_args()
    if name not in args:
        close = difflib.get_close_matches(name, sorted(args), n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see Ultralytics' cfg/default.yaml"
        raise ConfigError(key, name, f"not an Ultralytics train argument; {hint}")


def validate(exp: ExperimentConfig) -> None:
    space = parse_space(exp.space)
    for name in space:
        _check_train_arg(f"space.{name}", name)
    for name in exp.train:
        _check_train_arg(f"train.{name}", name)
        if name in OWNED_TRAIN_ARGS:
            raise ConfigError(f"train.{name}", exp.train[name], OWNED_TRAIN_ARGS[name])
        if name in space:
            raise ConfigError(f"train.{name}", exp.train[name], f"{name} is tuned in space.{name}; fix it or tune it, not both")

    ignored = sorted({"lr0", "momentum"} & set(space))
    if ignored and exp.train.get("optimizer", "auto") == "auto":
        raise ConfigError("train.optimizer", "auto", f"Ultralytics' auto optimizer ignores {' and '.join(ignored)}, "
                                                     "which space tunes; set train.optimizer=SGD (or AdamW, ...)")

    epochs = exp.train.get("epochs", 100)
    if not isinstance(epochs, int) or epochs < 1:
        raise ConfigError("train.epochs", epochs, "an integer >= 1")
    if exp.iterations < 1:
        raise ConfigError("iterations", exp.iterations, "at least 1 trial")
    if exp.mode not in ("max", "min"):
        raise ConfigError("mode", exp.mode, "max or min")
    if not REPORTED_METRIC.match(exp.metric):
        raise ConfigError("metric", exp.metric, "a reported metric: fitness, metrics/mAP50-95(B), metrics/mAP50(B), "
                                                "metrics/precision(B), metrics/recall(B), val/box_loss, ...")

    _check_scheduler(exp, epochs, space)
    _check_search(exp, space)
    _check_resources(exp)
    _check_data(exp)
    if "://" in exp.storage and not exp.storage.startswith("file://"):
        raise ConfigError("storage", exp.storage, "a local or shared file system path (or file://...); cloud "
                                                  "storage URIs are not supported yet")
    if exp.failure.max_failures < 0:
        raise ConfigError("failure.max_failures", exp.failure.max_failures, "0 or more")
    if exp.wandb.mode not in WANDB_MODES:
        raise ConfigError("wandb.mode", exp.wandb.mode, f"one of {', '.join(WANDB_MODES)}")
    if exp.wandb.mode != "disabled":
        from yolotune.wandb_logging import check_wandb

        check_wandb(exp.wandb)


def _check_scheduler(exp: ExperimentConfig, epochs: int, space) -> None:
    sched = exp.scheduler
    grace = getattr(sched, "grace_period", None)
    if grace is not None and not 1 <= grace <= epochs:
        raise ConfigError("scheduler.grace_period", grace, f"between 1 and train.epochs ({epochs})")
    max_t = getattr(sched, "max_t", None)
    if max_t is not None and not 1 <= max_t <= epochs:
        raise ConfigError("scheduler.max_t", max_t, f"between 1 and train.epochs ({epochs})")
    rf = getattr(sched, "reduction_factor", None)
    if rf is not None and rf <= 1:
        raise ConfigError("scheduler.reduction_factor", rf, "greater than 1")
    if sched.type == "pbt":
        if not 1 <= sched.perturbation_interval <= epochs:
            raise ConfigError("scheduler.perturbation_interval", sched.perturbation_interval,
                              f"between 1 and train.epochs ({epochs})")
        grids = [name for name, d in space.items() if d.dist == "grid"]
        if grids:
            raise ConfigError(f"space.{grids[0]}.dist", "grid", "pbt mutates sampled values; use choice")
    pruning = sched.type in PRUNING_SCHEDULERS or exp.search.type == "bohb"
    if pruning and exp.train.get("val", True) is False:
        raise ConfigError("train.val", False, f"scheduler={sched.type} stops trials on per-epoch validation "
                                              "metrics; keep val=true or use scheduler=fifo")
    if exp.train.get("save", True) is False:
        raise ConfigError("train.save", False, "trials report last.pt as their checkpoint every epoch; keep save=true")


def _check_search(exp: ExperimentConfig, space) -> None:
    kind = exp.search.type
    for module in SEARCH_EXTRAS.get(kind, []):
        if importlib.util.find_spec(module) is None:
            raise ConfigError("search", kind, f"needs {module}: pip install 'yolotune[{kind}]'")
    grids = [name for name, d in space.items() if d.dist == "grid"]
    if kind != "random" and grids:
        raise ConfigError(f"space.{grids[0]}.dist", "grid", f"search={kind} cannot grid; use choice or search=random")


def _check_resources(exp: ExperimentConfig) -> None:
    res = exp.resources
    for key in ("cpu_per_trial", "gpu_per_trial"):
        value = getattr(res, key)
        if value is not None and value < 0:
            raise ConfigError(f"resources.{key}", value, "0 or more")
    if res.cpu_per_trial is not None and res.cpu_per_trial == 0 and not res.gpu_per_trial:
        raise ConfigError("resources.cpu_per_trial", 0, "a trial without a GPU needs at least 1 CPU")
    if res.gpu_per_trial is not None and res.gpu_per_trial > 1 and not float(res.gpu_per_trial).is_integer():
        raise ConfigError("resources.gpu_per_trial", res.gpu_per_trial, "a fraction <= 1 or a whole number of GPUs")
    if res.max_concurrent_trials is not None and res.max_concurrent_trials < 1:
        raise ConfigError("resources.max_concurrent_trials", res.max_concurrent_trials, "1 or more (null: no limit)")


def _check_data(exp: ExperimentConfig) -> None:
    data = exp.data
    if data.yaml == "shapes":
        for key in ("train_images", "val_images", "imgsz", "classes"):
            if getattr(data, key) < 1:
                raise ConfigError(f"data.{key}", getattr(data, key), "1 or more")
        if data.classes > 3:
            raise ConfigError("data.classes", data.classes, "1 to 3 (circle, rectangle, triangle)")
        return
    if _is_path(data.yaml) and not Path(data.yaml).expanduser().is_file():
        raise ConfigError("data.yaml", data.yaml, "no such file; give an existing data YAML or a dataset name "
                                                  "such as coco8.yaml")


def _is_path(text: str) -> bool:
    """A bare dataset name (coco8.yaml) is Ultralytics' to resolve; anything with a folder is a path."""
    return "/" in text or "\\" in text or text.startswith(("~", "."))
