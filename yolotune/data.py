"""The data group: which dataset trials train on.

Each option checks itself (without importing Ultralytics) and resolves, in the driver before Ray
starts, to the absolute path of a data YAML that Ultralytics has accepted; the driver also builds
the label caches once. ``shapes`` is a synthetic dataset that yolotune draws itself.
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


@dataclass
class DataConfig:
    type: str = MISSING

    def check(self, exp) -> None:
        """Raise ConfigError for a dataset that cannot work (no Ultralytics import)."""

    def resolve(self) -> str:
        """The absolute path of the data YAML that trials train on (Ray runs trials in other directories)."""
        raise NotImplementedError


@dataclass
class YamlDataConfig(DataConfig):
    """An Ultralytics data YAML: a dataset name it knows (coco8.yaml) or a path to a file."""
    type: str = "yaml"
    yaml: str = MISSING  # each option names its file

    def check(self, exp) -> None:
        if not self.yaml or "\n" in self.yaml:
            raise ConfigError("data.yaml", self.yaml, "a data YAML path or an Ultralytics dataset name")
        if is_uri(self.yaml):  # fetched in resolve(): a network check, not one for composition
            if not self.yaml.split("?")[0].endswith((".yaml", ".yml")):
                raise ConfigError("data.yaml", self.yaml, "a data YAML (.yaml) in the store, in its dataset's folder")
            return
        local = Path(self.yaml).expanduser()
        if local.is_file():
            _check_data_yaml(self.yaml, local)
        elif _is_path(self.yaml) or local.exists():
            raise ConfigError("data.yaml", self.yaml, "no such file; give an existing data YAML or a dataset name "
                                                      "such as coco8.yaml")

    def resolve(self) -> str:
        """A data YAML in a store stays a URI: each node trains on its own copy (storage.node_dataset);
        this node's copy is checked here."""
        if is_uri(self.yaml):
            local_yaml = fetch_checked("data.yaml", self.yaml, node_dataset, "the dataset")
            _check_data_yaml(self.yaml, local_yaml)
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

    def resolve(self) -> str:
        try:
            return str(make_shapes(self) / "data.yaml")
        except OSError as e:
            raise ConfigError("data.cache_dir", self.cache_dir, f"cannot write the dataset there: {e.strerror}") \
                from None


def _check_data_yaml(key_value: str, path: Path) -> None:
    """What Ultralytics needs of a detection data YAML, checked without importing it."""
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


def build_label_caches(data_yaml: str) -> None:
    """Scan labels once in the driver so concurrent trials read the cache instead of racing to write it."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    try:
        data = check_det_dataset(data_yaml)
        hyp = get_cfg()
        for split in ("train", "val"):
            for path in data[split] if isinstance(data[split], list) else [data[split]]:
                YOLODataset(img_path=path, data=data, hyp=hyp, augment=False, task="detect", prefix=f"{split}: ")
    except Exception as e:  # noqa: BLE001 - images or labels that Ultralytics cannot read
        raise ConfigError("data.yaml", data_yaml, f"Ultralytics cannot read the dataset: {first_line(str(e))}") \
            from None


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


def make_shapes(cfg) -> Path:
    """Generate (once) the shapes dataset for these settings; returns its folder."""
    params = {k: getattr(cfg, k) for k in ("train_images", "val_images", "imgsz", "classes", "seed")}
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    root = Path(os.path.expanduser(cfg.cache_dir)).resolve() / f"shapes-{digest}"
    if (root / "data.yaml").is_file():
        return root
    root.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".shapes-", dir=root.parent))
    rng = np.random.default_rng(cfg.seed)
    for split, count in (("train", cfg.train_images), ("val", cfg.val_images)):
        _draw_split(tmp, split, count, cfg.imgsz, cfg.classes, rng)
    names = "\n".join(f"  {i}: {SHAPE_NAMES[i]}" for i in range(cfg.classes))
    (tmp / "data.yaml").write_text(f"path: {root}\ntrain: images/train\nval: images/val\nnames:\n{names}\n")
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
        background = rng.integers(0, 256, 3)
        img = np.empty((size, size, 3), np.uint8)
        img[:] = background
        noise = rng.normal(0, 8, img.shape)
        img = np.clip(img + noise, 0, 255).astype(np.uint8)
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


def _is_path(text: str) -> bool:
    """A bare dataset name (coco8.yaml) is Ultralytics' to resolve; anything with a folder is a path."""
    return "/" in text or "\\" in text or text.startswith(("~", "."))
