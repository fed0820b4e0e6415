"""The data group: which dataset trials train on.

Each option checks itself (without importing Ultralytics) and resolves, in the driver before Ray
starts, to what Ultralytics' ``data=`` takes for the model's task, as Ultralytics has accepted it: the
absolute path of a data YAML (detect, segment, pose, obb), or of a folder of class folders (classify);
the driver also builds the label caches once, for that task. ``shapes`` is a synthetic dataset that
yolotune draws itself, with each task's labels.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import yaml

from omegaconf import MISSING

from yolotune.errors import ConfigError, check_range
from yolotune.layout import first_line
from yolotune.storage import fetch_checked, is_uri, node_dataset

SHAPE_NAMES = ("circle", "rectangle", "triangle")
# A classification dataset's splits, as Ultralytics' check_cls_dataset looks for them (train, and val or test).
CLASSIFY_VAL = ("val", "validation", "valid", "test")
CLASSIFY_LAYOUT = ("a classification dataset (a folder with train/<class>/ and val/<class>/ or test/<class>/ image "
                   "folders, or a dataset name)")


@dataclass
class DataConfig:
    type: str = MISSING

    def check(self, exp) -> None:
        """Raise ConfigError for a dataset that cannot work (no Ultralytics import)."""

    def resolve(self, task: str = "detect") -> str:
        """What trials pass as ``data=`` for the model's ``task``: the absolute path of the data YAML (a folder
        for classify) they train on (Ray runs trials in other directories)."""
        raise NotImplementedError


@dataclass
class YamlDataConfig(DataConfig):
    """The dataset as Ultralytics' ``data=`` takes it: a data YAML, a dataset name it knows (coco8.yaml) or a
    path to a file; for a classify model, a folder of class folders or a dataset name (imagenet10)."""
    type: str = "yaml"
    yaml: str = MISSING  # each option names its file

    def check(self, exp) -> None:
        if not self.yaml or "\n" in self.yaml:
            raise ConfigError("data.yaml", self.yaml, "a data YAML path or an Ultralytics dataset name")
        if exp.model.task == "classify":
            _check_classify_data(self.yaml, exp.model.weights)
            return
        if Path(self.yaml).expanduser().is_dir():
            raise ConfigError("data.yaml", self.yaml, f"a data YAML for the {exp.model.task} model "
                                                      f"{exp.model.weights}; a folder of class folders is a "
                                                      "classification dataset, for a -cls model (yolo11n-cls.yaml)")
        if is_uri(self.yaml):  # fetched in resolve(): a network check, not one for composition
            if not self.yaml.split("?")[0].endswith((".yaml", ".yml")):
                raise ConfigError("data.yaml", self.yaml, "a data YAML (.yaml) in the store, in its dataset's folder")
            return
        local = Path(self.yaml).expanduser()
        if local.is_file():
            _check_data_yaml(self.yaml, local, exp.model.task)
        elif _is_path(self.yaml) or local.exists():
            raise ConfigError("data.yaml", self.yaml, "no such file; give an existing data YAML or a dataset name "
                                                      "such as coco8.yaml")

    def resolve(self, task: str = "detect") -> str:
        """A data YAML in a store stays a URI: each node trains on its own copy (storage.node_dataset);
        this node's copy is checked here."""
        if task == "classify":
            return _load_classify(self.yaml)
        if is_uri(self.yaml):
            local_yaml = fetch_checked("data.yaml", self.yaml, node_dataset, "the dataset")
            _check_data_yaml(self.yaml, local_yaml, task)
            self._load(str(local_yaml), local_yaml)
            return self.yaml
        local = Path(self.yaml).expanduser()
        return self._load(str(local.resolve()) if local.is_file() else self.yaml, local)

    def _load(self, data_yaml: str, local: Path) -> str:
        from ultralytics.data.utils import check_det_dataset
        from ultralytics.utils.checks import check_file

        try:  # a bare name: Ultralytics finds it in its package and downloads the images if needed
            check_det_dataset(data_yaml)
            return str(Path(check_file(data_yaml)).resolve())
        except Exception as e:  # noqa: BLE001 - any failure here is a bad or unreachable dataset
            hint = "" if local.is_file() else "; give a local data YAML path or use data=shapes offline"
            raise ConfigError("data.yaml", self.yaml, f"Ultralytics cannot load it: {first_line(str(e))}{hint}") \
                from None


@dataclass
class ShapesDataConfig(DataConfig):
    """Synthetic shapes drawn by yolotune: offline, deterministic from seed, cached under cache_dir."""
    type: str = "shapes"
    train_images: int = 256
    val_images: int = 64
    imgsz: int = 128
    classes: int = 3
    seed: int = 0
    cache_dir: str = "~/.cache/yolotune/datasets"

    def check(self, exp) -> None:
        check_range("data.train_images", self.train_images, 1, 100_000, "an integer from 1 to 100000", integer=True)
        check_range("data.val_images", self.val_images, 1, 100_000, "an integer from 1 to 100000", integer=True)
        check_range("data.imgsz", self.imgsz, 32, 4096, "an integer from 32 to 4096", integer=True)
        check_range("data.classes", self.classes, 1, 3, "1 to 3 (circle, rectangle, triangle)", integer=True)
        check_range("data.seed", self.seed, 0, None, "an integer >= 0", integer=True)
        cache = Path(os.path.expanduser(self.cache_dir))
        if cache.exists() and not cache.is_dir():
            raise ConfigError("data.cache_dir", self.cache_dir, "a directory (this is a file)")

    def resolve(self, task: str = "detect") -> str:
        try:
            root = make_shapes(self, task)
            return str(root if task == "classify" else root / "data.yaml")
        except OSError as e:
            raise ConfigError("data.cache_dir", self.cache_dir, f"cannot write the dataset there: {e.strerror}") \
                from None


def _check_classify_data(value: str, weights: str) -> None:
    """A classify model's data, as Ultralytics' check_cls_dataset takes it: a folder with train/ and val/ (or
    test/) class folders, or a dataset name it fetches (checked in resolve); never a data YAML."""
    local = Path(value).expanduser()
    if value.split("?")[0].endswith((".yaml", ".yml")):
        raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT}, not a data YAML: {weights} is a classify model")
    if is_uri(value):
        raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT} on this machine (a classify dataset in a store "
                                              "is not fetched)")
    if local.is_file():
        raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT}; this is a file")
    if local.is_dir():
        if not (local / "train").is_dir():
            raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT}; it has no train/ folder")
        if not any((local / split).is_dir() for split in CLASSIFY_VAL):
            raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT}; it has no val/ (or test/) folder")
        if not any(p.is_dir() for p in (local / "train").iterdir()):
            raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT}; train/ has no class folders")
    elif _is_path(value):
        raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT}; no such folder")


def _load_classify(value: str) -> str:
    """The classification dataset's folder, absolute, as Ultralytics' check_cls_dataset finds it (a dataset
    name: fetched into its datasets folder)."""
    from ultralytics.data.utils import check_cls_dataset

    try:
        data = check_cls_dataset(value)
    except Exception as e:  # noqa: BLE001 - a name Ultralytics cannot fetch, or a folder without images
        hint = "" if Path(value).expanduser().is_dir() else "; give a local folder or use data=shapes offline"
        raise ConfigError("data.yaml", value, f"Ultralytics cannot load it: {first_line(str(e))}{hint}") from None
    if data["val"] is None and data["test"] is None:
        raise ConfigError("data.yaml", value, f"{CLASSIFY_LAYOUT}; it has no val/ (or test/) folder")
    return str(Path(data["train"]).parent.resolve())


def _check_data_yaml(key_value: str, path: Path, task: str = "detect") -> None:
    """What Ultralytics needs of a data YAML for ``task``, checked without importing it."""
    try:
        content = yaml.safe_load(path.read_text())
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as e:
        raise ConfigError("data.yaml", key_value, f"not a readable YAML file ({first_line(str(e))})") from None
    if not isinstance(content, dict):
        raise ConfigError("data.yaml", key_value, "a data YAML mapping with train, val and names")
    missing = [key for key in ("train", "val") if not content.get(key)]
    if "names" not in content and "nc" not in content:
        missing.append("names")
    if missing:
        raise ConfigError("data.yaml", key_value, f"the data YAML lacks {', '.join(missing)}; it needs train, val "
                                                  "and names")
    if task == "pose" and "kpt_shape" not in content:
        raise ConfigError("data.yaml", key_value, "the data YAML lacks kpt_shape; a pose model trains on keypoints: "
                                                  "kpt_shape: [number of keypoints, 2 or 3]")


def build_label_caches(data: str, task: str = "detect") -> None:
    """Scan labels once in the driver, as the trials' task scans them (a pose cache's hash holds the keypoint
    shape), so concurrent trials read the cache instead of racing to write it. A classification dataset's
    cache is Ultralytics' ``<split>.cache`` beside each split folder, which its training writes too."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import ClassificationDataset, YOLODataset
    from ultralytics.data.utils import check_cls_dataset, check_det_dataset

    try:
        hyp = get_cfg()
        if task == "classify":
            found = check_cls_dataset(data, split="val")  # the trainer's: val/, else test/
            for split in ("train", "val"):
                ClassificationDataset(root=found[split], args=hyp, augment=False, prefix=split)
            return
        found = check_det_dataset(data)
        for split in ("train", "val"):
            for path in found[split] if isinstance(found[split], list) else [found[split]]:
                YOLODataset(img_path=path, data=found, hyp=hyp, augment=False, task=task, prefix=f"{split}: ")
    except Exception as e:  # noqa: BLE001 - images or labels that Ultralytics cannot read
        raise ConfigError("data.yaml", data, f"Ultralytics cannot read the dataset: {first_line(str(e))}") from None


def check_readable_on_every_node(paths) -> None:
    """On a cluster, each node must see the dataset (and local weights) at the same path."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    @ray.remote(num_cpus=0)
    def missing(candidates):
        return [p for p in candidates if not os.path.exists(p)]

    nodes = [n for n in ray.nodes() if n["Alive"]]
    found = ray.get([missing.options(scheduling_strategy=NodeAffinitySchedulingStrategy(n["NodeID"], soft=False))
                     .remote(list(paths)) for n in nodes])
    for node, absent in zip(nodes, found):
        if absent:
            raise ConfigError("data.yaml", absent[0], f"not readable on node {node['NodeManagerHostname']} "
                                                      f"({node['NodeID'][:12]}); put datasets on a file system "
                                                      "every node mounts at the same path")


def make_shapes(cfg, task: str = "detect") -> Path:
    """Generate (once) the shapes dataset for these settings and the model's ``task``; returns its folder
    (data.yaml in it; for classify, the train/ and val/ class folders)."""
    params = {k: getattr(cfg, k) for k in ("train_images", "val_images", "imgsz", "classes", "seed")}
    if task != "detect":  # detect's folders keep the names they had before there were other tasks
        params["task"] = task
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(os.path.expanduser(cfg.cache_dir)).resolve() / f"shapes-{digest}"
    if root.is_dir():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=root.parent))
    rng = np.random.default_rng(cfg.seed)
    for split, count in (("train", cfg.train_images), ("val", cfg.val_images)):
        if task == "detect":
            _draw_split(tmp, split, count, cfg.imgsz, cfg.classes, rng)
        else:
            _draw_task_split(tmp, split, count, cfg.imgsz, cfg.classes, rng, task)
    if task != "classify":
        names = "\n".join(f"  {i}: {SHAPE_NAMES[i]}" for i in range(cfg.classes))
        keypoints = f"kpt_shape: [{len(KEYPOINTS)}, 3]\nflip_idx: [0, 2, 1]\n" if task == "pose" else ""
        (tmp / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\n{keypoints}"
                                       f"names:\n{names}\n")
    try:
        tmp.rename(root)  # atomic: a concurrent generator either wins or finds the finished folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return root


def _draw_split(root: Path, split: str, count: int, size: int, classes: int, rng: np.random.Generator) -> None:
    import cv2

    (root / "images" / split).mkdir(parents=True)
    (root / "labels" / split).mkdir(parents=True)
    for i in range(count):
        img, background = _background(size, rng)
        labels = []
        for _ in range(rng.integers(1, 4)):
            cls = int(rng.integers(0, classes))
            w, h = (rng.uniform(0.2, 0.45, 2) * size).astype(int)
            x0, y0 = int(rng.integers(0, size - w)), int(rng.integers(0, size - h))
            color = tuple(int(c) for c in (background + rng.integers(80, 176, 3)) % 256)  # contrasts the background
            if cls == 0:
                cv2.ellipse(img, (x0 + w // 2, y0 + h // 2), (w // 2, h // 2), 0, 0, 360, color, -1)
            elif cls == 1:
                cv2.rectangle(img, (x0, y0), (x0 + w, y0 + h), color, -1)
            else:
                pts = np.array([[x0 + w // 2, y0], [x0, y0 + h], [x0 + w, y0 + h]], np.int32)
                cv2.fillPoly(img, [pts], color)
            labels.append(f"{cls} {(x0 + w / 2) / size:.6f} {(y0 + h / 2) / size:.6f} {w / size:.6f} {h / size:.6f}")
        cv2.imwrite(str(root / "images" / split / f"{i:05d}.jpg"), img)
        (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(labels) + "\n")


def _background(size: int, rng: np.random.Generator):
    background = rng.integers(0, 256, 3)
    img = np.empty((size, size, 3), np.uint8)
    img[:] = background
    noise = rng.normal(0, 8, img.shape)
    return np.clip(img + noise, 0, 255).astype(np.uint8), background


# A pose shape's keypoints, in its box (-0.5..0.5 of its width and height): its top, bottom left and
# bottom right (a triangle's corners); a horizontal flip swaps the last two (flip_idx [0, 2, 1]).
KEYPOINTS = np.array([[0.0, -0.5], [-0.5, 0.5], [0.5, 0.5]])
_CORNERS = np.array([[-0.5, -0.5], [0.5, -0.5], [0.5, 0.5], [-0.5, 0.5]])


def _outline(cls: int) -> np.ndarray:
    """A shape's outline in its box (-0.5..0.5): a circle (24 points), a rectangle or a triangle."""
    if cls == 0:
        t = np.linspace(0, 2 * np.pi, 24, endpoint=False)
        return 0.5 * np.stack([np.cos(t), np.sin(t)], 1)
    return _CORNERS if cls == 1 else KEYPOINTS


def _draw_task_split(root: Path, split: str, count: int, size: int, classes: int, rng: np.random.Generator,
                     task: str) -> None:
    """Shapes labelled for ``task``: segment, a polygon of each; pose, its three keypoints; obb, rotated shapes
    and their rotated boxes; classify, one large shape per image, in its class's folder."""
    import cv2

    for folder in ((f"{split}/{SHAPE_NAMES[c]}" for c in range(classes)) if task == "classify"
                   else (f"images/{split}", f"labels/{split}")):
        (root / folder).mkdir(parents=True)
    for i in range(count):
        img, background = _background(size, rng)
        labels = []
        shapes = 1 if task == "classify" else int(rng.integers(1, 4))
        for _ in range(shapes):
            cls = i % classes if task == "classify" else int(rng.integers(0, classes))
            wh = rng.uniform(*((0.4, 0.8) if task == "classify" else (0.2, 0.45)), 2) * size
            angle = rng.uniform(0, np.pi) if task == "obb" else 0.0
            rotation = np.array([[np.cos(angle), -np.sin(angle)], [np.sin(angle), np.cos(angle)]])
            reach = np.abs((_CORNERS * wh) @ rotation.T).max(0)  # half the rotated box's extent
            center = rng.uniform(reach, size - reach)
            place = lambda points: (points * wh) @ rotation.T + center  # noqa: E731 - box coordinates -> pixels
            color = tuple(int(c) for c in (background + rng.integers(80, 176, 3)) % 256)  # contrasts the background
            cv2.fillPoly(img, [np.round(place(_outline(cls))).astype(np.int32)], color)
            labels.append(_label(task, cls, place, size))
        if task == "classify":
            cv2.imwrite(str(root / split / SHAPE_NAMES[i % classes] / f"{i:05d}.jpg"), img)
            continue
        cv2.imwrite(str(root / "images" / split / f"{i:05d}.jpg"), img)
        (root / "labels" / split / f"{i:05d}.txt").write_text("\n".join(labels) + "\n")


def _label(task: str, cls: int, place, size: int) -> str:
    """One label line in Ultralytics' format for ``task`` (coordinates normalized to the image)."""
    def coords(points):
        return " ".join(f"{v / size:.6f}" for v in np.clip(points, 0, size).ravel())

    if task == "segment":
        return f"{cls} {coords(place(_outline(cls)))}"
    if task == "obb":
        return f"{cls} {coords(place(_CORNERS))}"
    if task == "pose":
        (x0, y0), (x1, y1) = place(_CORNERS).min(0), place(_CORNERS).max(0)
        keypoints = " ".join(f"{x / size:.6f} {y / size:.6f} 2" for x, y in place(KEYPOINTS))
        return f"{cls} {(x0 + x1) / 2 / size:.6f} {(y0 + y1) / 2 / size:.6f} {(x1 - x0) / size:.6f} " \
               f"{(y1 - y0) / size:.6f} {keypoints}"
    return ""


def _is_path(text: str) -> bool:
    """A bare dataset name (coco8.yaml) is Ultralytics' to resolve; anything with a folder is a path."""
    return "/" in text or "\\" in text or text.startswith(("~", "."))
