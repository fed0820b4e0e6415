"""The data group: resolves the dataset to an absolute data YAML in the driver, generates the
synthetic ``shapes`` dataset, and builds Ultralytics' label caches once before trials start."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

import numpy as np

from yolotune.errors import ConfigError

SHAPE_NAMES = ("circle", "rectangle", "triangle")


def resolve_data(data) -> str:
    """Absolute path of the data YAML that trials train on (Ray runs trials in other directories)."""
    if data.yaml == "shapes":
        return str(make_shapes(data) / "data.yaml")
    local = Path(data.yaml).expanduser()
    if local.is_file():
        return str(local.resolve())
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils.checks import check_file

    try:  # a bare dataset name: Ultralytics finds it in its package and downloads the images if needed
        check_det_dataset(data.yaml)
        return str(Path(check_file(data.yaml)).resolve())
    except Exception as e:  # noqa: BLE001 - any failure here is a bad or unreachable dataset
        raise ConfigError("data.yaml", data.yaml, f"cannot be loaded ({_first_line(e)}); give a local data YAML path"
                                                  " or use data=shapes offline") from None


def build_label_caches(data_yaml: str) -> None:
    """Scan labels once in the driver so concurrent trials read the cache instead of racing to write it."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset

    data = check_det_dataset(data_yaml)
    hyp = get_cfg()
    for split in ("train", "val"):
        for path in data[split] if isinstance(data[split], list) else [data[split]]:
            YOLODataset(img_path=path, data=data, hyp=hyp, augment=False, task="detect", prefix=f"{split}: ")


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


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [type(e).__name__])[0]
