"""The model group: the weights every trial starts from, loaded once in the driver so that a
missing download or a broken file fails before Ray starts, in one line. A space may tune the model
too (``space.model: choice([yolo11n.yaml, yolo11s.yaml])``): each choice is checked and loaded the same way.

The model also says what the experiment is: its task (detect, segment, classify, pose or obb) decides
the data the trials need, the metrics they report and the default space. It is read without importing
Ultralytics (``model_task``: a model YAML's head, else the name, as Ultralytics guesses it) and
confirmed when the weights are loaded (``resolve_weights``)."""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from pathlib import Path
from typing import List

import yaml
from omegaconf import MISSING

from yolotune.errors import ConfigError
from yolotune.layout import first_line
from yolotune.storage import fetch_checked, is_uri, node_file
from yolotune.train_args import shown

SUFFIXES = (".pt", ".yaml", ".yml")
TASKS = ("detect", "segment", "classify", "pose", "obb")
# The validation metrics each task's validator reports (Ultralytics' utils/metrics.py: DetMetrics, SegmentMetrics,
# ClassifyMetrics, PoseMetrics, OBBMetrics keys), and its loss items (each trainer's loss_names), besides fitness.
_BOX = ["metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", "metrics/mAP50-95(B)"]
METRICS = {
    "detect": _BOX,
    "segment": [*_BOX, *(m.replace("(B)", "(M)") for m in _BOX)],
    "classify": ["metrics/accuracy_top1", "metrics/accuracy_top5"],
    "pose": [*_BOX, *(m.replace("(B)", "(P)") for m in _BOX)],
    "obb": _BOX,
}
LOSSES = {
    "detect": ["box_loss", "cls_loss", "dfl_loss"],
    "segment": ["box_loss", "seg_loss", "cls_loss", "dfl_loss", "sem_loss"],
    "classify": ["loss"],
    "pose": ["box_loss", "pose_loss", "kobj_loss", "cls_loss", "dfl_loss"],
    "obb": ["box_loss", "cls_loss", "dfl_loss", "angle_loss"],
}
# Train arguments only some tasks train with (Ultralytics' cfg/default.yaml says which), and those classify
# ignores (its loss is cross-entropy, its augmentations torchvision's): a space that tunes one for another
# task's model spends its trials on nothing.
TASK_ONLY = {"pose": "pose", "kobj": "pose", "angle": "obb", "dropout": "classify", "erasing": "classify",
             "auto_augment": "classify", "overlap_mask": "segment", "mask_ratio": "segment"}
NOT_CLASSIFY = {"box", "cls", "cls_pw", "dfl", "degrees", "translate", "shear", "perspective", "bgr", "mosaic", "mixup",
                "cutmix", "copy_paste", "copy_paste_mode", "close_mosaic"}
# Each task's default space (conf/space/): what it trains with, and its own gains.
DEFAULT_SPACES = {"detect": "default", "segment": "default", "classify": "classify", "pose": "pose", "obb": "obb"}
# A model's task from its name (yolo11n-seg.pt), as Ultralytics' guess_model_task reads file names.
_NAME_TASKS = {"-seg": "segment", "-cls": "classify", "-pose": "pose", "-obb": "obb"}


@dataclass
class ModelConfig:
    weights: str = MISSING  # a .pt file (pretrained) or a model YAML (from scratch); each option names one

    @property
    def task(self) -> str:
        return model_task(self.weights)

    def check(self, exp) -> None:
        check_weights("model.weights", self.weights)
        task = self.task
        for name in exp.dists:
            if TASK_ONLY.get(name, task) != task or (task == "classify" and name in NOT_CLASSIFY):
                raise ConfigError(f"space.{name}", shown(exp.space[name]),
                                  f"a {task} model ({self.weights}) trains without {name}: tune what it trains "
                                  f"with (its default space: space={DEFAULT_SPACES[task]})")
        tuned = exp.dists.get("model")
        for i, weights in enumerate(tuned.values if tuned is not None and tuned.values is not None else []):
            check_weights(f"space.model.values[{i}]", weights)
            if model_task(weights) != self.task:
                raise ConfigError(f"space.model.values[{i}]", weights,
                                  f"a {self.task} model, as model.weights={self.weights}: the trials of one "
                                  "experiment share its data and metric")

    def resolve(self) -> str:
        """A local file's absolute path, or an Ultralytics model YAML or asset name, after loading it once.
        Weights in a store stay a URI: each node loads its own copy (storage.node_file)."""
        return resolve_weights("model.weights", self.weights)


def check_weights(key: str, weights: str) -> None:
    """``model.weights`` or a tuned model (``space.model``): a .pt file or a model YAML."""
    if not isinstance(weights, str) or not weights.split("?")[0].endswith(SUFFIXES) or "\n" in weights:
        raise ConfigError(key, weights, "a .pt file or a model YAML such as yolo11n.yaml")
    if is_uri(weights):
        return  # fetched in resolve_weights()
    local = Path(weights).expanduser()
    if local.exists() and not local.is_file():
        raise ConfigError(key, weights, "a file (this is a directory)")


def reported_metrics(task: str) -> List[str]:
    """The metrics a trial of a ``task`` model reports, as a refusal lists them: fitness (Ultralytics' own
    for the task), each validation metric (mAP50-95 first), the validation losses."""
    order = ("mAP50-95", "mAP50", "precision", "recall", "accuracy")
    own = {"segment": "(M)", "pose": "(P)"}.get(task, "(B)")  # masks' and keypoints' before the boxes'

    def rank(metric: str):
        return own not in metric, next(i for i, kind in enumerate(order) if f"/{kind}" in metric)

    return ["fitness", *sorted(METRICS[task], key=rank), *(f"val/{loss}" for loss in LOSSES[task])]


def is_reported(name: str, task: str) -> bool:
    """Whether a trial of a ``task`` model reports ``name`` (trainable.py: fitness, epoch, Ultralytics' metrics,
    its training and validation losses and learning rates)."""
    losses = "|".join(LOSSES[task])
    return name in ("fitness", "epoch") or name in METRICS[task] or bool(
        re.fullmatch(rf"(train|val)/({losses})|lr/pg\d", name))


def model_task(weights: str) -> str:
    """The task of a model, without importing Ultralytics: a local model YAML's output module (its head's
    last), else the name's suffix (yolo11n-cls.yaml, yolo11n-pose.pt) or a folder named as the task, else detect."""
    local = Path(str(weights)).expanduser()
    if local.suffix in (".yaml", ".yml") and local.is_file():
        try:
            head = yaml.safe_load(local.read_text())["head"][-1][-2].lower()
        except Exception:  # noqa: BLE001 - not a model YAML: Ultralytics refuses it when it is loaded
            head = ""
        for module, task in (("classify", "classify"), ("segment", "segment"), ("pose", "pose"), ("obb", "obb"),
                             ("detect", "detect")):
            if module in head:
                return task
    path = Path(str(weights).split("?")[0])
    return next((task for suffix, task in _NAME_TASKS.items() if suffix in path.stem or task in path.parts[:-1]),
                "detect")  # Ultralytics' runs/<task>/train/weights/best.pt too


def resolve_weights(key: str, weights: str) -> str:
    """``weights`` as trials load it (see ModelConfig.resolve), loaded once here."""
    local = Path(weights).expanduser()
    if is_uri(weights):
        resolved = str(fetch_checked(key, weights, node_file, "it"))
    elif local.is_file():
        resolved = str(local.resolve())
    elif weights.endswith(".pt"):
        resolved = _download(key, weights)
    else:
        resolved = weights  # a model YAML of Ultralytics' (yolo11n.yaml): built from its package
    try:
        from ultralytics import YOLO

        task = YOLO(resolved).task
    except Exception as e:  # noqa: BLE001 - whatever makes Ultralytics refuse the file
        raise ConfigError(key, weights, f"Ultralytics cannot load it: {first_line(str(e))}") from None
    if task != model_task(weights):  # a name that says one task for a model of another
        raise ConfigError(key, weights, f"a {task} model named like a {model_task(weights)} one; name it as its "
                                        f"task (-seg, -cls, -pose, -obb, or none for detect) so that yolotune "
                                        "checks the right data and metrics")
    return weights if is_uri(weights) else resolved


def _download(key: str, weights: str) -> str:
    from ultralytics.utils import LOGGER
    from ultralytics.utils.downloads import attempt_download_asset

    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)  # its offline warnings would bury the one line that says what to do
    try:
        path = Path(attempt_download_asset(weights))
    except Exception:  # noqa: BLE001 - offline or unknown asset
        path = None
    finally:
        LOGGER.setLevel(level)
    if path is None or not path.is_file():
        raise ConfigError(key, weights, "not on disk and cannot be downloaded; use model=yolo11n-scratch (no "
                                        "download) or a local .pt path")
    return str(path.resolve())
