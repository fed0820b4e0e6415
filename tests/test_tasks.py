"""Every YOLO task tuned alike: detect, segment, classify, pose and obb.

Fast: the task read from the model, each task's shapes labels as Ultralytics reads them, its default
space, the label caches the driver builds for the trials' task (pose: no rebuild), and a read-only
dataset left as it was. Slow: one real sweep per task on its shapes data, all in one Ray started
once for the module (``sweeps``), read back with ``yolotune.load``.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import logging
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from conftest import REPO, ray_temp_dir
from yolotune.config import task_space
from yolotune.data import SHAPE_NAMES, ShapesDataConfig, build_label_caches, make_shapes
from yolotune.layout import read_jsonl
from yolotune.model import METRICS, NOT_CLASSIFY, TASK_ONLY, TASKS, model_task, reported_metrics

# task -> (model YAML, its model class, the metric its sweep ranks by, Ultralytics' fitness from a history row)
TASK_MODELS = {
    "detect": ("yolo11n.yaml", "DetectionModel", "metrics/mAP50-95(B)", lambda r: r["metrics/mAP50-95(B)"]),
    "segment": ("yolo11n-seg.yaml", "SegmentationModel", "metrics/mAP50-95(M)",
                lambda r: r["metrics/mAP50-95(B)"] + r["metrics/mAP50-95(M)"]),
    "classify": ("yolo11n-cls.yaml", "ClassificationModel", "metrics/accuracy_top1",
                 lambda r: (r["metrics/accuracy_top1"] + r["metrics/accuracy_top5"]) / 2),
    "pose": ("yolo11n-pose.yaml", "PoseModel", "metrics/mAP50-95(P)",
             lambda r: r["metrics/mAP50-95(B)"] + r["metrics/mAP50-95(P)"]),
    "obb": ("yolo11n-obb.yaml", "OBBModel", "metrics/mAP50-95(B)", lambda r: r["metrics/mAP50-95(B)"]),
}
TINY = dict(train_images=8, val_images=4, imgsz=64)
# classify's sweep has two objectives and a select rule: its trials measure their model, the rule picks the best
OBJECTIVES = {"classify": ["objectives=[metrics/accuracy_top1:max,latency_ms:min]", "select=latency_ms<=10000"]}


def _shapes(cache: Path, task: str, **changes) -> Path:
    return make_shapes(ShapesDataConfig(**{**TINY, **changes}, cache_dir=str(cache)), task)


def _digest(root: Path) -> dict:
    """Each file's content hash (data.yaml's without the dataset's own path in it)."""
    return {str(p.relative_to(root)): hashlib.sha1(p.read_bytes().replace(str(root).encode(), b"ROOT")).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


@pytest.mark.parametrize("weights,task", [
    ("yolo11n.yaml", "detect"), ("yolo11n.pt", "detect"), ("yolo11s-seg.pt", "segment"),
    ("yolo11n-cls.yaml", "classify"), ("/models/yolo11x-pose.yaml", "pose"), ("yolo11n-obb.pt", "obb"),
    ("s3://bucket/w/yolo11n-cls.pt?region=x", "classify"), ("runs/pose/train/weights/best.pt", "pose"),
    ("runs/detect/train/weights/best.pt", "detect"), ("pose.pt", "detect"),
])
def test_the_task_is_read_from_the_models_name(weights, task):
    assert model_task(weights) == task


@pytest.mark.parametrize("module,task", [("Classify", "classify"), ("Segment", "segment"), ("Pose", "pose"),
                                         ("OBB", "obb"), ("Detect", "detect")])
def test_a_local_model_yaml_says_its_task_by_its_head_whatever_its_name(module, task, tmp_path):
    """As Ultralytics' guess_model_task reads a model YAML: the head's last module."""
    path = tmp_path / "my-model-seg.yaml"  # a name that says segment
    path.write_text(yaml.safe_dump({"nc": 3, "backbone": [[-1, 1, "Conv", [16, 3, 2]]],
                                    "head": [[-1, 1, "Conv", [16, 3, 1]], [[0], 1, module, ["nc"]]]}))
    assert model_task(str(path)) == task


def test_weights_of_another_task_than_their_name_says_are_refused_when_loaded(tmp_path):
    """A name is all composing reads; loading the weights (preflight) confirms it."""
    from ultralytics import YOLO

    from yolotune.errors import ConfigError
    from yolotune.model import resolve_weights

    YOLO("yolo11n-seg.yaml").save(tmp_path / "best.pt")
    with pytest.raises(ConfigError) as err:
        resolve_weights("model.weights", str(tmp_path / "best.pt"))
    assert err.value.allowed.startswith("a segment model named like a detect one")
    (tmp_path / "segment").mkdir()
    (tmp_path / "best.pt").rename(tmp_path / "segment" / "best.pt")
    assert resolve_weights("model.weights", str(tmp_path / "segment" / "best.pt")) == str(tmp_path / "segment" / "best.pt")


def test_every_task_has_its_metrics_and_losses():
    for task in TASKS:
        metrics = reported_metrics(task)
        assert metrics[0] == "fitness" and set(METRICS[task]) <= set(metrics)
    assert "metrics/accuracy_top1" in reported_metrics("classify") and "val/kobj_loss" in reported_metrics("pose")
    assert not any("(B)" in m for m in reported_metrics("classify"))


@pytest.mark.parametrize("task", TASKS)
def test_the_default_space_is_the_tasks_own_and_tunes_only_what_it_trains_with(task):
    default = yaml.safe_load((REPO / "conf" / "space" / "default.yaml").read_text())
    space = task_space(default, task)
    assert all(TASK_ONLY.get(name, task) == task for name in space)
    if task == "classify":
        assert not NOT_CLASSIFY & set(space) and {"dropout", "erasing", "lr0"} <= set(space)
    own = {"pose": {"pose", "kobj"}, "obb": {"angle"}, "classify": {"dropout"}}.get(task, set())
    assert own <= set(space) and (space == default) == (task in ("detect", "segment"))
    changed = {k: v for k, v in default.items() if k != "mosaic"}  # a space the user changed stays theirs
    assert task_space(changed, task) == changed


def test_the_saved_config_holds_the_space_the_trials_tune(tmp_path):
    """What results, plots and resume read: the classify space, not the detection default it replaced."""
    from compose import compose_config

    from yolotune.cli import prepare

    _, _, cfg = prepare(compose_config("model=yolo11n-cls-scratch", "data=shapes", f"storage={tmp_path}"), [])
    assert set(cfg.space) == set(yaml.safe_load((REPO / "conf" / "space" / "classify.yaml").read_text()))


@pytest.mark.parametrize("task", TASKS)
def test_shapes_are_deterministic_from_the_seed_for_every_task(task, tmp_path):
    first, again, other = (_shapes(tmp_path / name, task, seed=seed) for name, seed in (("a", 0), ("b", 0), ("c", 1)))
    assert _digest(first) == _digest(again) != _digest(other)


def test_shapes_draw_each_tasks_labels_as_ultralytics_reads_them(tmp_path):
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_cls_dataset, check_det_dataset

    for task in ("detect", "segment", "pose", "obb"):
        data = check_det_dataset(str(_shapes(tmp_path, task) / "data.yaml"))
        labels = YOLODataset(img_path=data["train"], data=data, hyp=get_cfg(), augment=False, task=task).labels
        assert len(labels) == TINY["train_images"] and all(1 <= len(label["cls"]) <= 3 for label in labels)
        for label in labels:
            boxes, segments, keypoints = label["bboxes"], label["segments"], label.get("keypoints")
            assert ((boxes[:, 2:] > 0.1) & (boxes[:, 2:] < 1)).all()  # a shape's size: 20-45 % of the image
            if task == "segment":
                assert all(len(polygon) in (3, 4, 24) for polygon in segments)  # triangle, rectangle, circle
            elif task == "obb":
                assert all(len(polygon) == 4 for polygon in segments)
            elif task == "pose":
                assert keypoints.shape == (len(boxes), 3, 3) and (keypoints[..., 2] == 2).all()
                assert data["kpt_shape"] == [3, 3] and data["flip_idx"] == [0, 2, 1]
            else:
                assert not segments and keypoints is None
    classify = check_cls_dataset(str(_shapes(tmp_path, "classify")))
    assert classify["names"] == dict(enumerate(sorted(SHAPE_NAMES))) and classify["val"].name == "val"
    counts = [len(list((classify["train"] / name).glob("*.jpg"))) for name in SHAPE_NAMES]
    assert sum(counts) == TINY["train_images"] and min(counts) >= 2  # every class in train


def _scans(data: str, task: str) -> str:
    """What Ultralytics logs while a trial's dataset is built, as the trainer builds it for ``task``."""
    from ultralytics.cfg import get_cfg
    from ultralytics.data.dataset import YOLODataset
    from ultralytics.data.utils import check_det_dataset
    from ultralytics.utils import LOGGER

    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    LOGGER.addHandler(handler)
    level = LOGGER.level
    LOGGER.setLevel(logging.INFO)
    try:
        found = check_det_dataset(data)
        YOLODataset(img_path=found["train"], data=found, hyp=get_cfg(), augment=True, task=task)
    finally:
        LOGGER.removeHandler(handler)
        LOGGER.setLevel(level)
    return stream.getvalue()


@pytest.mark.parametrize("task", ["pose", "segment", "obb"])
def test_the_drivers_label_cache_is_the_one_the_trials_task_reads(task, tmp_path):
    """A pose cache's hash holds the keypoint shape: one built as detection would be rebuilt by every trial."""
    data = str(_shapes(tmp_path, task) / "data.yaml")
    build_label_caches(data, "detect")  # as before there were tasks
    if task == "pose":
        assert "New cache created" in _scans(data, task)  # the trial threw the driver's away
    build_label_caches(data, task)
    assert "New cache created" not in _scans(data, task)


def test_a_classify_folder_gets_only_the_caches_ultralytics_training_writes(tmp_path):
    data = tmp_path / "cls"
    shutil.copytree(_shapes(tmp_path / "cache", "classify"), data)
    before = set(_digest(data))
    build_label_caches(str(data), "classify")
    assert set(_digest(data)) - before == {"train.cache", "val.cache"}  # ClassificationDataset's, beside each split
    assert not any(p.suffix == ".cache" for p in data.rglob("*/*"))  # none in the image folders


READ_ONLY = """mount --bind "$1" "$1" && mount -o remount,ro,bind "$1" && shift && exec "$@" """


@pytest.mark.subprocess
@pytest.mark.parametrize("task,model", [("classify", "yolo11n-cls-scratch"), ("pose", "yolo11n-pose-scratch")])
def test_a_read_only_dataset_is_checked_and_left_as_it_was(task, model, tmp_path):
    """Every check of a run (dry_run=true), on a dataset mounted read-only: it passes, and nothing is written."""
    data = tmp_path / "data"
    shutil.copytree(_shapes(tmp_path / "cache", task), data)
    before = _digest(data)
    target = str(data) if task == "classify" else str(data / "data.yaml")
    args = [sys.executable, "-m", "yolotune", f"model={model}", "data=coco8", f"data.yaml={target}",
            "dry_run=true", f"storage={tmp_path / 'runs'}", "imgsz=64"]
    probe = subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY, "sh", str(data), "true"], capture_output=True)
    if probe.returncode:
        pytest.skip(f"cannot mount read-only here: {probe.stderr.decode().strip()}")
    proc = subprocess.run(["unshare", "-m", "sh", "-c", READ_ONLY, "sh", str(data), *args], cwd=REPO,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "nothing was run" in proc.stdout
    assert _digest(data) == before


@pytest.fixture(scope="module")
def sweeps(tmp_path_factory, shapes_cache):
    """One real sweep per task (2 trials x 2 epochs, 64 px, 8 images) through ``yolotune.tune``, each ranked
    by its task's headline metric, in one Ray started once: task -> its experiment dir. Prints each one's
    duration."""
    import ray

    import yolotune

    storage = tmp_path_factory.mktemp("tasks")
    took = {}
    with ray_temp_dir() as ray_tmp:
        ray.init(address="local", num_cpus=2, num_gpus=0, include_dashboard=False, log_to_driver=False,
                 _temp_dir=str(ray_tmp), _node_ip_address="127.0.0.1", logging_level=logging.WARNING)
        try:
            for task, (model, _, metric, _) in TASK_MODELS.items():
                start = time.time()
                with contextlib.redirect_stdout(io.StringIO()):
                    yolotune.tune(model=model, data="shapes", iterations=2, name=task, storage=str(storage),
                                  overrides=["seed=0", "scheduler=fifo", f"metric='{metric}'", "verbose=quiet",
                                             *(f"data.{k}={v}" for k, v in TINY.items()),
                                             f"data.cache_dir={shapes_cache}", *OBJECTIVES.get(task, [])],
                                  epochs=2, imgsz=64, batch=4)
                took[task] = time.time() - start
        finally:
            ray.shutdown()
    print("task sweeps (s):", {task: round(s, 1) for task, s in took.items()}, f"total {sum(took.values()):.1f}")
    for task, (model, _, metric, _) in TASK_MODELS.items():  # what the trials reported, for the record
        best = yolotune.load(storage / task).best()
        print(f"{task}: tune(model={model!r}, data='shapes', metric={metric!r}): best trial {best['trial_id']} "
              f"{metric} {best[f'best_{metric}']:.4g}")
    return {task: storage / task for task in TASK_MODELS}


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_MODELS)
def test_each_task_is_tuned_end_to_end(task, sweeps):
    import pandas as pd
    from ultralytics import YOLO

    import yolotune

    exp_dir = sweeps[task]
    _, model_class, metric, fitness = TASK_MODELS[task]
    results = yolotune.load(exp_dir)
    assert results.finished and results.trial_count == 2 and results.status_counts() == {"TERMINATED": 2}
    assert set(METRICS[task]) <= set(results.reported_metrics())
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 2 and trials[f"best_{metric}"].notna().all() and trials["epochs"].eq(2).all()
    if task in OBJECTIVES:  # the highest metric, ties to the lower latency (a better Pareto rank)
        pareto = results.pareto()
        top = pareto[pareto[metric] == pareto[metric].max()]
        assert results.best()["trial_id"] == top.loc[top["latency_ms"].idxmin(), "trial_id"]
        assert (pareto["latency_ms"] > 0).all() and "no trial met it" not in results.select_rule
    else:
        assert results.best()["trial_id"] == trials.loc[trials[f"best_{metric}"].idxmax(), "trial_id"]
    for trial_id in trials["trial_id"]:
        rows = [r for r in read_jsonl(exp_dir / f"trial_{trial_id}" / "history.jsonl")[0] if r["validated"]]
        assert rows and all(r["fitness"] == pytest.approx(fitness(r)) for r in rows)  # Ultralytics' for the task
    params = set(yaml.safe_load((exp_dir / "best_hyperparameters.yaml").read_text()))
    default = yaml.safe_load((REPO / "conf" / "space" / "default.yaml").read_text())
    assert set(task_space(default, task)) <= params  # the task's default space was tuned
    best = YOLO(str(exp_dir / "best.pt"))
    assert best.task == task and type(best.model).__name__ == model_class
    assert (exp_dir / "report.html").is_file() and (exp_dir / "plots" / "history.png").is_file()


@pytest.mark.slow
@pytest.mark.parametrize("task", TASK_MODELS)
def test_trials_read_the_caches_the_driver_built_for_their_task(task, sweeps):
    """Pose above all: its cache's hash holds the keypoint shape, so a cache built as detection is rebuilt."""
    logs = [p.read_text() for p in sweeps[task].glob("trial_*/train.log")]
    assert len(logs) == 2 and all("Scanning" in log for log in logs)  # Ultralytics read a cache or scanned
    assert not any("New cache created" in log for log in logs)
