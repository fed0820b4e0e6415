"""Every user mistake is one ConfigError naming the key, before Ray or torch start, and nothing is
written. The table runs in-process through the CLI's own steps (normalize, compose, prepare,
preflight): fast, nothing trains. A few cases also run as a user types them, in a subprocess.
"""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_module
from omegaconf import OmegaConf

from conftest import REPO, run_cli
from yolotune import layout, train_args
from yolotune.cli import prepare
from yolotune.config import register_configs
from yolotune.errors import ConfigError
from yolotune.overrides import composition_error, normalize, replace_space_entries

register_configs()

# A valid small experiment: every case changes one thing.
BASE = ["model=yolo11n-scratch", "space=minimal", "train.epochs=10", "train.imgsz=64", "train.batch=2", "iterations=2"]
OBJECTIVES = ["objectives=[fitness:max,latency_ms:min]", "scheduler=fifo"]  # a valid multi-objective setting


def attempt(storage: Path, cache: Path, *overrides: str, preflight: bool = True):
    """The CLI's path up to the first trial, in-process; returns the prepared experiment."""
    own_data = any(o.startswith("data=") for o in overrides)
    shapes = [] if own_data else ["data=shapes", "data.train_images=4", "data.val_images=2", "data.imgsz=64",
                                  f"data.cache_dir={cache}"]
    argv = normalize([f"storage={storage}", "name=bad", *shapes, *overrides])
    try:
        with initialize_config_module("yolotune.conf", version_base="1.3"):
            cfg = compose("config", overrides=argv)
    except Exception as e:  # noqa: BLE001
        error = composition_error(e, argv)
        if error is None:
            raise
        raise error from None
    replace_space_entries(cfg, argv)
    exp, exp_dir, _ = prepare(cfg, argv)
    if preflight:
        from yolotune.preflight import preflight as heavy_checks

        heavy_checks(exp, exp_dir)
    return exp


@pytest.fixture(scope="module")
def data_files(tmp_path_factory):
    """Data YAMLs broken in each way, and model files that do not load."""
    root = tmp_path_factory.mktemp("bad-data")
    (root / "images").mkdir()
    (root / "images.pt").mkdir()  # weights named like a file, but a directory
    files = {
        "empty.yaml": "",
        "list.yaml": "- a\n- b\n",
        "notyaml.yaml": "train: [unclosed\n",
        "no_train.yaml": "val: images\nnames: {0: a}\n",
        "no_val.yaml": "train: images\nnames: {0: a}\n",
        "no_names.yaml": "train: images\nval: images\n",
        "missing_dirs.yaml": f"path: {root}\ntrain: nowhere/train\nval: nowhere/val\nnames: {{0: a}}\n",
        "broken.pt": "not a checkpoint",
        "broken_model.yaml": "backbone: 3\n",
    }
    for name, text in files.items():
        (root / name).write_text(text)
    (root / "binary.yaml").write_bytes(bytes(range(256)) * 4)
    (root / "a_file").write_text("x")
    return root


# (case id, overrides, key named by the error)
CASES = [
    # 1. Hydra composition: unknown or misspelt keys, groups and options, wrong types, syntax
    ("typo-group-key", ["scheduler.grace_periood=3"], "scheduler.grace_periood"),
    ("unknown-top-key", ["iteration=3"], "iteration"),
    ("unknown-add", ["+foo=1"], "foo"),
    ("unknown-add-nested", ["+scheduler.foo=1"], "scheduler.foo"),
    ("unknown-nested", ["resources.gpus=1"], "resources.gpus"),
    ("unknown-model-key", ["model.weight=x.pt"], "model.weight"),
    ("unknown-wandb-key", ["wandb.projekt=x"], "wandb.projekt"),
    ("unknown-failure-key", ["failure.retries=2"], "failure.retries"),
    ("unknown-ray-key", ["ray.adress=auto"], "ray.adress"),
    ("unknown-group-option", ["scheduler=foo"], "scheduler"),
    ("typo-group-option", ["scheduler=ashaa"], "scheduler"),
    ("unknown-search", ["search=grid"], "search"),
    ("unknown-space-option", ["space=big"], "space"),
    ("unknown-data-option", ["data=coco"], "data"),
    ("unknown-model-option", ["model=yolo8n"], "model"),
    ("unknown-resources-option", ["resources=tpu"], "resources"),
    ("unknown-wandb-option", ["wandb=on"], "wandb"),
    ("unknown-preset", ["experiment=fast"], "experiment"),
    ("schema-option", ["scheduler=schema_asha"], "scheduler"),
    ("schema-group", ["schema/scheduler=asha"], "schema/scheduler"),
    ("iterations-word", ["iterations=ten"], "iterations"),
    ("iterations-float", ["iterations=2.5"], "iterations"),
    ("iterations-null", ["iterations=null"], "iterations"),
    ("resume-word", ["resume=maybe"], "resume"),
    ("seed-word", ["seed=abc"], "seed"),
    ("grace-word", ["scheduler.grace_period=soon"], "scheduler.grace_period"),
    ("rf-word", ["scheduler.reduction_factor=x"], "scheduler.reduction_factor"),
    ("cpu-word", ["resources.cpu_per_trial=abc"], "resources.cpu_per_trial"),
    ("gpu-word", ["resources.gpu_per_trial=half"], "resources.gpu_per_trial"),
    ("concurrency-float", ["resources.max_concurrent_trials=1.5"], "resources.max_concurrent_trials"),
    ("shapes-word", ["data.train_images=many"], "data.train_images"),
    ("max-failures-word", ["failure.max_failures=x"], "failure.max_failures"),
    ("syntax-open-bracket", ["iterations=["], "iterations"),
    ("syntax-open-brace", ["train.lr0={"], "train.lr0"),
    ("data-yaml-on-shapes", ["data.yaml=my.yaml"], "data.yaml"),
    ("wandb-tags-not-list", ["wandb.tags=5"], "wandb.tags"),
    # 4. values that Ray or Ultralytics would reject later
    ("iterations-zero", ["iterations=0"], "iterations"),
    ("iterations-negative", ["iterations=-3"], "iterations"),
    ("epochs-zero", ["train.epochs=0"], "train.epochs"),
    ("epochs-float", ["train.epochs=2.5"], "train.epochs"),
    ("grace-zero", ["scheduler.grace_period=0"], "scheduler.grace_period"),
    ("grace-past-epochs", ["scheduler.grace_period=11"], "scheduler.grace_period"),
    ("max-t-zero", ["scheduler.max_t=0"], "scheduler.max_t"),
    ("max-t-past-epochs", ["scheduler.max_t=11"], "scheduler.max_t"),
    ("grace-past-max-t", ["train.epochs=5", "scheduler.grace_period=3", "scheduler.max_t=2"], "scheduler.grace_period"),
    ("rf-one", ["scheduler.reduction_factor=1"], "scheduler.reduction_factor"),
    ("rf-below-one", ["scheduler.reduction_factor=0.5"], "scheduler.reduction_factor"),
    ("rf-nan", ["scheduler.reduction_factor=nan"], "scheduler.reduction_factor"),
    ("rf-inf", ["scheduler.reduction_factor=inf"], "scheduler.reduction_factor"),
    ("brackets-zero", ["scheduler.brackets=0"], "scheduler.brackets"),
    ("brackets-eleven", ["scheduler.brackets=11"], "scheduler.brackets"),
    ("hyperband-rf", ["scheduler=hyperband", "scheduler.reduction_factor=1"], "scheduler.reduction_factor"),
    ("hyperband-max-t", ["scheduler=hyperband", "scheduler.max_t=11"], "scheduler.max_t"),
    ("median-grace", ["scheduler=median", "scheduler.grace_period=0"], "scheduler.grace_period"),
    ("median-grace-past-epochs", ["scheduler=median", "scheduler.grace_period=11"], "scheduler.grace_period"),
    ("median-val-false", ["scheduler=median", "scheduler.grace_period=1", "+train.val=false"], "train.val"),
    ("median-samples", ["scheduler=median", "scheduler.grace_period=1", "scheduler.min_samples_required=0"],
     "scheduler.min_samples_required"),
    ("pbt-interval-zero", ["scheduler=pbt", "scheduler.perturbation_interval=0"], "scheduler.perturbation_interval"),
    ("pbt-interval-past", ["scheduler=pbt", "scheduler.perturbation_interval=11"], "scheduler.perturbation_interval"),
    ("pbt-quantile", ["scheduler=pbt", "scheduler.perturbation_interval=1", "scheduler.quantile_fraction=0.51"],
     "scheduler.quantile_fraction"),
    ("pbt-quantile-negative", ["scheduler=pbt", "scheduler.perturbation_interval=1",
                               "scheduler.quantile_fraction=-0.1"], "scheduler.quantile_fraction"),
    ("pbt-resample", ["scheduler=pbt", "scheduler.perturbation_interval=1", "scheduler.resample_probability=1.01"],
     "scheduler.resample_probability"),
    ("pbt-resample-negative", ["scheduler=pbt", "scheduler.perturbation_interval=1",
                               "scheduler.resample_probability=-0.01"], "scheduler.resample_probability"),
    ("pbt-grid", ["scheduler=pbt", "scheduler.perturbation_interval=1", "space.lr0='grid([0.01, 0.1])'"],
     "space.lr0.dist"),
    ("optuna-startup", ["search=optuna", "search.n_startup_trials=-1"], "search.n_startup_trials"),
    ("optuna-grid", ["search=optuna", "space.lr0='grid([0.01, 0.1])'"], "space.lr0.dist"),
    ("hyperopt-points", ["search=hyperopt", "search.n_initial_points=-2"], "search.n_initial_points"),
    ("hyperopt-grid", ["search=hyperopt", "space.lr0='grid([0.01, 0.1])'"], "space.lr0.dist"),
    ("bohb-rf", ["search=bohb", "search.reduction_factor=1"], "search.reduction_factor"),
    ("bohb-max-t-zero", ["search=bohb", "search.max_t=0"], "search.max_t"),
    ("bohb-max-t-past-epochs", ["search=bohb", "search.max_t=11"], "search.max_t"),
    ("bohb-grid", ["search=bohb", "space.lr0='grid([0.01, 0.1])'"], "space.lr0.dist"),
    ("bohb-val-false", ["search=bohb", "scheduler=fifo", "+train.val=false"], "train.val"),
    ("cpu-negative", ["resources.cpu_per_trial=-1"], "resources.cpu_per_trial"),
    ("cpu-zero-no-gpu", ["resources.cpu_per_trial=0", "resources.gpu_per_trial=0"], "resources.cpu_per_trial"),
    ("cpu-nan", ["resources.cpu_per_trial=nan"], "resources.cpu_per_trial"),
    ("gpu-negative", ["resources.gpu_per_trial=-0.5"], "resources.gpu_per_trial"),
    ("gpu-nan", ["resources.gpu_per_trial=nan"], "resources.gpu_per_trial"),
    ("gpu-odd-fraction", ["resources.gpu_per_trial=1.5"], "resources.gpu_per_trial"),
    ("gpu-none-here", ["resources=gpu"], "resources.gpu_per_trial"),
    ("gpu-ddp", ["resources.gpu_per_trial=2"], "resources.gpu_per_trial"),
    ("autobatch-shared-gpu", ["resources.gpu_per_trial=0.25", "train.batch=-1"], "train.batch"),
    ("autobatch-fraction-shared-gpu", ["resources.gpu_per_trial=0.5", "train.batch=0.7"], "train.batch"),
    ("autobatch-tuned-shared-gpu",
     ["resources.gpu_per_trial=0.25", "~train.batch", "+space.batch='choice([16, -1])'"], "space.batch.values[1]"),
    ("checkpoint-zero", ["checkpoint.every=0"], "checkpoint.every"),
    ("checkpoint-beyond-epochs", ["checkpoint.every=11"], "checkpoint.every"),
    ("checkpoint-float", ["checkpoint.every=1.5"], "checkpoint.every"),
    ("keep-zero", ["checkpoint.keep=0"], "checkpoint.keep"),
    ("keep-float", ["checkpoint.keep=2.5"], "checkpoint.keep"),
    ("pbt-between-checkpoints", ["scheduler=pbt", "scheduler.perturbation_interval=3", "checkpoint.every=2"],
     "scheduler.perturbation_interval"),
    ("cpu-beyond-machine", ["resources.cpu_per_trial=512"], "resources.cpu_per_trial"),
    ("concurrency-zero", ["resources.max_concurrent_trials=0"], "resources.max_concurrent_trials"),
    ("image-cache-negative", ["resources.image_cache_mb=-1"], "resources.image_cache_mb"),
    ("gpu-mb-zero", ["resources.gpu_mb_per_trial=0"], "resources.gpu_mb_per_trial"),
    ("gpu-mb-float", ["resources.gpu_mb_per_trial=1.5"], "resources.gpu_mb_per_trial"),
    ("max-failures-negative", ["failure.max_failures=-1"], "failure.max_failures"),
    ("metric-unknown", ["metric=mAP"], "metric"),
    ("metric-empty", ["metric=''"], "metric"),
    ("metric-prefixed", ["metric=my_fitness"], "metric"),
    ("metric-suffixed", ["metric=fitness2"], "metric"),
    ("metric-loss-suffixed", ["metric=val/box_loss2"], "metric"),
    ("metric-unknown-task", ["metric='metrics/mAP50(X)'"], "metric"),
    ("mode-word", ["mode=maximum"], "mode"),
    ("verbose-word", ["verbose=loud"], "verbose"),
    ("validate-word", ["validate=always"], "validate"),
    ("validate-bool", ["validate=true"], "validate"),
    ("seed-negative", ["seed=-1"], "seed"),
    ("seed-huge", ["seed=99999999999"], "seed"),
    ("seed-2-to-the-32", ["seed=4294967296"], "seed"),
    ("wandb-mode", ["wandb.mode=sometimes"], "wandb.mode"),
    ("wandb-project-slash", ["wandb=offline", "wandb.project=a/b"], "wandb.project"),
    ("wandb-project-empty", ["wandb.project=''"], "wandb.project"),
    ("momentum-negative", ["~space.momentum", "+train.momentum=-0.1"], "train.momentum"),
    ("momentum-above-one", ["~space.momentum", "+train.momentum=1.5"], "train.momentum"),
    ("space-momentum-high", ["space.momentum.high=1.5"], "space.momentum.high"),
    ("space-lr0-high", ["space.lr0.high=2.0"], "space.lr0.high"),
    ("space-lrf-low", ["space.lrf.low=-0.5"], "space.lrf.low"),
    ("space-wd-high", ["space.weight_decay.high=3"], "space.weight_decay.high"),
    ("space-choice-bad-value", ["+space.mosaic='choice([0.5, 2.0])'"], "space.mosaic.values[1]"),
    ("space-choice-bad-type", ["+space.cos_lr={dist:choice,values:[true,3]}"], "space.cos_lr.values[1]"),
    ("space-warmup-word", ["space.warmup_epochs='choice([1, \"two\"])'"], "space.warmup_epochs.values[1]"),
    ("imgsz-word", ["train.imgsz=big"], "train.imgsz"),
    ("imgsz-zero", ["train.imgsz=0"], "train.imgsz"),
    ("imgsz-float", ["train.imgsz=64.5"], "train.imgsz"),
    ("imgsz-huge", ["train.imgsz=100000"], "train.imgsz"),
    ("imgsz-31", ["train.imgsz=31"], "train.imgsz"),
    ("imgsz-8193", ["train.imgsz=8193"], "train.imgsz"),
    ("imgsz-three-sizes", ["train.imgsz=[64,64,64]"], "train.imgsz"),
    ("imgsz-empty-list", ["train.imgsz=[]"], "train.imgsz"),
    ("space-imgsz-low", ["+space.imgsz='choice([16, 64])'", "~train.imgsz"], "space.imgsz.values[0]"),
    ("batch-word", ["train.batch=abc"], "train.batch"),
    ("batch-zero", ["train.batch=0"], "train.batch"),
    ("batch-negative", ["train.batch=-2"], "train.batch"),
    ("batch-one-as-float", ["train.batch=1.0"], "train.batch"),
    ("batch-fraction-zero", ["train.batch=0.0"], "train.batch"),
    ("fraction-big", ["+train.fraction=3.5"], "train.fraction"),
    ("fraction-zero", ["+train.fraction=0"], "train.fraction"),
    ("patience-negative", ["+train.patience=-1"], "train.patience"),
    ("workers-float", ["+train.workers=1.5"], "train.workers"),
    ("cos-lr-word", ["+train.cos_lr=sometimes"], "train.cos_lr"),
    ("optimizer-number", ["train.optimizer=3"], "train.optimizer"),
    ("amp-word", ["+train.amp=maybe"], "train.amp"),
    ("dropout-above-one", ["+train.dropout=2"], "train.dropout"),
    ("nbs-zero", ["+train.nbs=0"], "train.nbs"),
    ("close-mosaic-word", ["+train.close_mosaic=x"], "train.close_mosaic"),
    ("box-nan", ["+train.box=nan"], "train.box"),
    ("degrees-inf", ["+train.degrees=inf"], "train.degrees"),
    ("optimizer-auto-tuning-lr0", ["train.optimizer=auto"], "train.optimizer"),
    ("optimizer-auto-tuning-momentum", ["~space.lr0", "train.optimizer=auto"], "train.optimizer"),
    ("optimizer-unset-is-auto", ["~train.optimizer"], "train.optimizer"),
    ("train-unknown", ["+train.epoch=3"], "train.epoch"),
    ("train-unknown-no-plus", ["train.momentun=0.9"], "train.momentun"),
    ("train-unknown-nothing-close", ["+train.zzzz=3"], "train.zzzz"),
    ("bare-unknown", ["momentun=0.9"], "momentun"),
    ("train-owned-data", ["+train.data=coco8.yaml"], "train.data"),
    ("train-owned-model", ["+train.model=x.pt"], "train.model"),
    ("train-owned-project", ["+train.project=x"], "train.project"),
    ("train-owned-name", ["+train.name=x"], "train.name"),
    ("train-owned-exist-ok", ["+train.exist_ok=true"], "train.exist_ok"),
    ("train-owned-task", ["+train.task=segment"], "train.task"),
    ("train-owned-resume", ["+train.resume=true"], "train.resume"),
    ("train-owned-mode", ["+train.mode=val"], "train.mode"),
    ("train-owned-device", ["+train.device=0"], "train.device"),
    ("space-owned-device", ["+space.device='choice([0, 1])'"], "space.device"),
    ("train-val-false", ["+train.val=false"], "train.val"),
    ("train-save-false", ["+train.save=false"], "train.save"),
    ("train-and-space", ["+train.lr0=0.01"], "train.lr0"),
    ("model-no-suffix", ["model.weights=yolo11n"], "model.weights"),
    ("model-other-suffix", ["model.weights=yolo11n.onnx"], "model.weights"),
    ("model-newline", ["model.weights='a\nb.pt'"], "model.weights"),
    ("model-missing-pt", ["model.weights=/no/such/model.pt"], "model.weights"),
    ("model-unknown-yaml", ["model.weights=nosuchmodel.yaml"], "model.weights"),
    ("model-offline-pt", ["model.weights=yolo11n.pt"], "model.weights"),
    # 5. data
    ("data-missing-file", ["data=coco8", "data.yaml=/no/such/data.yaml"], "data.yaml"),
    ("data-yaml-empty", ["data=coco8", "data.yaml=''"], "data.yaml"),
    ("data-yaml-newline", ["data=coco8", "data.yaml='a\nb.yaml'"], "data.yaml"),
    ("data-relative-missing", ["data=coco8", "data.yaml=./nothing.yaml"], "data.yaml"),
    ("data-unknown-name", ["data=coco8", "data.yaml=nosuchdataset.yaml"], "data.yaml"),
    ("shapes-zero-images", ["data.train_images=0"], "data.train_images"),
    ("shapes-zero-val", ["data.val_images=0"], "data.val_images"),
    ("shapes-too-many-images", ["data.train_images=100001"], "data.train_images"),
    ("shapes-too-many-val", ["data.val_images=100001"], "data.val_images"),
    ("shapes-classes", ["data.classes=4"], "data.classes"),
    ("shapes-classes-zero", ["data.classes=0"], "data.classes"),
    ("shapes-imgsz", ["data.imgsz=31"], "data.imgsz"),
    ("shapes-imgsz-huge", ["data.imgsz=4097"], "data.imgsz"),
    ("shapes-seed", ["data.seed=-1"], "data.seed"),
    # 6. storage and names
    ("name-parent", ["name=../../x"], "name"),
    ("name-absolute", ["name=/abs"], "name"),
    ("name-dot", ["name=."], "name"),
    ("name-dotdot", ["name=.."], "name"),
    ("name-slash", ["name=a/b"], "name"),
    ("name-hidden", ["name=.x"], "name"),
    ("name-newline", ["name='a\nb'"], "name"),
    ("name-space", ["name='a b'"], "name"),
    ("name-empty", ["name=''"], "name"),
    ("name-leading-dash", ["name=-x"], "name"),
    ("name-129-chars", ["name=" + "a" * 129], "name"),
    ("storage-newline", ["storage='runs\nx'"], "storage"),
    ("storage-unknown-scheme", ["storage=nosuchfs://bucket/x"], "storage"),
    ("storage-credentials-in-uri", ["storage=s3://AKIAX:secret@bucket/x"], "storage"),
    ("storage-credentials-in-query", ["storage='s3://bucket/x?secret_key=abc'"], "storage"),  # quoted: '=' in a value
    ("storage-empty", ["storage=''"], "storage"),
    ("storage-under-proc", ["storage=/proc/yolotune"], "storage"),  # no folder can be made there
    ("storage-proc", ["storage=/proc"], "storage"),
    ("storage-under-sys", ["storage=/sys/yolotune"], "storage"),
    ("ray-address-garbage", ["ray.address=not an address"], "ray.address"),
    ("ray-address-no-port", ["ray.address=somehost"], "ray.address"),
    ("ray-address-long-port", ["ray.address=somehost:123456"], "ray.address"),
    ("ray-address-other-scheme", ["ray.address=http://somehost:6379"], "ray.address"),
    # 7. keys yolotune owns or forbids, in the space too
    ("space-val", ["+space.val='choice([true, false])'"], "space.val"),
    ("space-save", ["+space.save='choice([true, false])'"], "space.save"),
    ("space-resume", ["+space.resume='choice([true, false])'"], "space.resume"),
    ("space-data", ["+space.data='choice([\"a.yaml\"])'"], "space.data"),
    ("space-model", ["+space.model='uniform(0, 1)'"], "space.model"),
    ("space-model-missing", ["+space.model='choice([\"a.pt\"])'"], "space.model.values[0]"),
    ("space-model-suffix", ["+space.model={dist:choice,values:[yolo11n.yaml,yolo11s]}"], "space.model.values[1]"),
    # 9. several objectives and the select rule
    ("objectives-one", ["objectives=[fitness:max]", "scheduler=fifo"], "objectives"),
    ("objectives-word", ["objectives=fitness"], "objectives"),
    ("objectives-no-mode", ["objectives=[fitness,latency_ms]", "scheduler=fifo"], "objectives"),
    ("objectives-mode-word", ["objectives=[fitness:max,latency_ms:fast]", "scheduler=fifo"], "objectives"),
    ("objectives-unknown", ["objectives=[fitness:max,latency:min]", "scheduler=fifo"], "objectives"),
    ("objectives-twice", ["objectives=[fitness:max,fitness:min]", "scheduler=fifo"], "objectives"),
    ("objectives-cost-first", ["objectives=[latency_ms:min,fitness:max]", "scheduler=fifo"], "objectives"),
    ("objectives-first-not-metric", ["objectives=['metrics/mAP50(B):max',latency_ms:min]", "scheduler=fifo"],
     "objectives"),
    ("objectives-asha", ["objectives=[fitness:max,latency_ms:min]"], "scheduler"),
    ("objectives-hyperband", ["objectives=[fitness:max,latency_ms:min]", "scheduler=hyperband"], "scheduler"),
    ("objectives-median", ["objectives=[fitness:max,latency_ms:min]", "scheduler=median",
                           "scheduler.grace_period=1"], "scheduler"),
    ("objectives-pbt", ["objectives=[fitness:max,latency_ms:min]", "scheduler=pbt",
                        "scheduler.perturbation_interval=1"], "scheduler"),
    ("objectives-hyperopt", [*OBJECTIVES, "search=hyperopt"], "search"),
    ("objectives-bohb", [*OBJECTIVES, "search=bohb"], "search"),
    ("select-without-objectives", ["select='latency_ms<=5'"], "select"),
    ("select-not-an-objective", [*OBJECTIVES, "select='params<=5'"], "select"),
    ("select-equals", [*OBJECTIVES, "select='latency_ms=5'"], "select"),
    ("select-word", [*OBJECTIVES, "select='latency_ms<=fast'"], "select"),
    ("select-nan", [*OBJECTIVES, "select='latency_ms<=nan'"], "select"),
    ("select-comma", [*OBJECTIVES, "select='latency_ms<=5, fitness>=0.1'"], "select"),
    ("select-bare", [*OBJECTIVES, "select=latency_ms"], "select"),
    ("space-epochs", ["+space.epochs='randint(1, 3)'"], "space.epochs"),
    ("space-unknown", ["+space.lr00={dist:uniform,low:0,high:1}"], "space.lr00"),
    ("space-unknown-compact", ["+space.lr00='uniform(0, 1)'"], "space.lr00"),
    # 8. space entries: no silent coercion
    ("qrandint-fractional-q", ["+space.close_mosaic='qrandint(0, 10, 2.5)'"], "space.close_mosaic.q"),
    ("quniform-off-grid-high", ["space.lrf='quniform(0.2, 0.95, 0.2)'"], "space.lrf.high"),
    ("quniform-off-grid-low", ["space.lrf='quniform(0.15, 0.95, 0.2)'"], "space.lrf.low"),
    ("quniform-zero-q", ["space.lrf='quniform(0.2, 0.8, 0)'"], "space.lrf.q"),
    ("replace-keeps-nothing", ["space.lr0={dist:uniform,low:0.001}"], "space.lr0.high"),
    ("replace-choice-empty", ["space.lr0={dist:choice,values:[]}"], "space.lr0.values"),
    ("low-above-high", ["space.lr0.low=0.5", "space.lr0.high=0.1"], "space.lr0.low"),
    ("low-equals-high", ["space.lr0.low=0.1", "space.lr0.high=0.1"], "space.lr0.low"),
    ("low-nan", ["space.lrf.low=nan"], "space.lrf.low"),
    ("high-inf", ["space.lrf.high=inf"], "space.lrf.high"),
    ("low-word", ["space.lr0.low=abc"], "space.lr0.low"),
    ("loguniform-zero", ["space.lr0.low=0"], "space.lr0.low"),
    ("dist-unknown", ["space.lr0.dist=normal"], "space.lr0.dist"),
    ("dist-field-unknown", ["+space.lr0.mean=3"], "space.lr0.mean"),
    ("randint-float-bounds", ["+space.close_mosaic='randint(0.5, 3)'"], "space.close_mosaic.low"),
    ("sugar-arity", ["space.lr0='uniform(0.1)'"], "space.lr0"),
    ("sugar-code", ["space.lr0='__import__(\"os\").system(\"true\")'"], "space.lr0.dist"),
    ("sugar-code-known-name", ["space.lr0='uniform(__import__(\"os\").system(\"true\"), 1)'"], "space.lr0"),
    ("sugar-unknown-dist", ["space.lr0='gauss(0, 1)'"], "space.lr0.dist"),
    ("space-entry-number", ["space.lr0=0.01"], "space.lr0"),
    ("budget-words", ["budget.time='2 hours'"], "budget.time"),
    ("budget-negative", ["budget.time=-5m"], "budget.time"),
    ("budget-zero", ["budget.time=0"], "budget.time"),
    # tasks: the model's task decides the data, the metrics and what the space may tune
    ("classify-given-a-data-yaml", ["model=yolo11n-cls-scratch", "data=coco8"], "data.yaml"),
    ("classify-given-no-folder", ["model=yolo11n-cls-scratch", "data=coco8", "data.yaml=./no/such/folder"],
     "data.yaml"),
    ("classify-unknown-dataset-name", ["model=yolo11n-cls-scratch", "data=coco8", "data.yaml=nosuchcls"], "data.yaml"),
    ("metric-of-another-task", ["metric=metrics/accuracy_top1"], "metric"),
    ("metric-of-classify", ["model=yolo11n-cls-scratch", "metric='metrics/mAP50-95(B)'"], "metric"),
    ("metric-of-segment", ["model=yolo11n-seg-scratch", "metric='metrics/mAP50(P)'"], "metric"),
    ("space-key-classify-ignores", ["model=yolo11n-cls-scratch", "+space.mosaic='uniform(0, 1)'"], "space.mosaic"),
    ("space-key-of-pose", ["+space.kobj='uniform(0.5, 2)'"], "space.kobj"),
    ("space-models-of-two-tasks", ["+space.model={dist:choice,values:[yolo11n.yaml,yolo11n-seg.yaml]}"],
     "space.model.values[1]"),
    ("budget-zero-minutes", ["budget.time=0m"], "budget.time"),
    ("budget-unit", ["budget.time=2d"], "budget.time"),
]


# What each case's error says, as users read it (temp paths as <tmp>). After changing a message on
# purpose: YOLOTUNE_UPDATE_MESSAGES=1 python -m pytest tests/test_bad_input.py -k naming_the_key
# Messages that quote Ultralytics' text change with its version: update them the same way.
MESSAGES = Path(__file__).with_name("bad_input_messages.json")
MACHINE_DEPENDENT = {"cpu-beyond-machine", "gpu-none-here"}  # the machine's CPU and GPU counts


def _check_message(case: str, message: str) -> None:
    if case in MACHINE_DEPENDENT:
        return
    known = json.loads(MESSAGES.read_text()) if MESSAGES.is_file() else {}
    if os.environ.get("YOLOTUNE_UPDATE_MESSAGES"):
        MESSAGES.write_text(json.dumps({**known, case: message}, indent=1, sort_keys=True) + "\n")
    else:
        assert message == known.get(case), f"{case}: the message changed; if on purpose, YOLOTUNE_UPDATE_MESSAGES=1"


# Ultralytics' check_cfg message -> what follows "key=value: ": its first sentence (which repeats key and value)
# and final period dropped; a message of another form (another Ultralytics version) is kept, first line only.
ULTRALYTICS_MESSAGES = [
    ("'momentum=1.5' is an invalid value. Valid 'momentum' values are between 0.0 and 1.0.",
     "Valid 'momentum' values are between 0.0 and 1.0"),
    ("'workers=1.5' is of invalid type float. 'workers' must be an int (i.e. 'workers=8')",
     "'workers' must be an int (i.e. 'workers=8')"),
    ("'nbs=0' is an invalid value\n'nbs' must be >= 1.", "'nbs=0' is an invalid value"),
    ("could not convert 'x'. Expected a number.", "could not convert 'x'. Expected a number."),
    ("'optimizer=X' is invalid. Valid 'optimizer' values are SGD or MuonX.", "Valid 'optimizer' values are SGD or MuonX"),
]


@pytest.mark.parametrize("message,allowed", ULTRALYTICS_MESSAGES)
def test_ultralytics_messages_keep_what_is_allowed(message, allowed):
    assert train_args._allowed(message) == allowed


@pytest.mark.parametrize("case,overrides,key", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_error_naming_the_key(case, overrides, key, tmp_path, shapes_cache):
    storage = tmp_path / "runs"
    with pytest.raises(ConfigError) as err:
        attempt(storage, shapes_cache, *BASE, *overrides)
    assert err.value.key == key, str(err.value)
    assert "\n" not in str(err.value) and str(err.value).startswith(f"{key}=")
    assert not storage.exists()  # nothing written
    _check_message(case, str(err.value).replace(str(tmp_path), "<tmp>").replace(str(shapes_cache), "<cache>"))


@pytest.mark.parametrize("name,key", [
    ("empty.yaml", "data.yaml"), ("list.yaml", "data.yaml"), ("notyaml.yaml", "data.yaml"),
    ("binary.yaml", "data.yaml"), ("no_train.yaml", "data.yaml"), ("no_val.yaml", "data.yaml"),
    ("no_names.yaml", "data.yaml"), ("missing_dirs.yaml", "data.yaml"), ("images", "data.yaml"),
])
def test_broken_data_yaml(name, key, data_files, tmp_path, shapes_cache):
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, "data=coco8", f"data.yaml={data_files / name}")
    assert err.value.key == key
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["broken.pt", "broken_model.yaml", "images"])
def test_model_that_does_not_load(name, data_files, tmp_path, shapes_cache):
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, f"model.weights={data_files / name}")
    assert err.value.key == "model.weights"


def test_storage_that_is_a_file(data_files, tmp_path, shapes_cache):
    with pytest.raises(ConfigError) as err:
        attempt(data_files / "a_file" / "runs", shapes_cache, *BASE)
    assert err.value.key == "storage"


@pytest.mark.subprocess
def test_storage_not_writable(tmp_path):
    """As a user types it. Root writes into any directory it can reach, so as root (CI) the directory
    is made unwritable the one way that holds for root too: a read-only mount, in a mount namespace
    of the command's own."""
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o500)
    command = [f"storage={locked / 'runs'}", "name=bad"]
    if os.geteuid() == 0:
        command = ["sh", "-c", f'mount --bind -o ro "{locked}" "{locked}" && exec "$0" -m yolotune "$@"',
                   sys.executable, *command]
        proc = subprocess.run(["unshare", "--mount", *command], cwd=REPO, capture_output=True, text=True,
                              timeout=120)
    else:
        proc = run_cli(*command)
    assert proc.returncode == 2, proc.stderr
    reason = "Read-only file system" if os.geteuid() == 0 else "Permission denied"
    assert proc.stderr == (f"yolotune: error: storage={locked / 'runs'}: a writable directory; cannot create a folder "
                           f"in {locked}: {reason}\n")
    assert not list(locked.iterdir())


def test_existing_name_is_refused(tmp_path, shapes_cache):
    (tmp_path / "runs" / "bad").mkdir(parents=True)
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE)
    assert err.value.key == "name"


# The boundaries, the other way: the last valid values pass every check (nothing trains).
VALID = [
    ["scheduler.grace_period=3"], ["scheduler.grace_period=1"], ["scheduler.max_t=3", "scheduler.grace_period=3"],
    ["scheduler.reduction_factor=1.01"], ["scheduler.brackets=1"], ["iterations=1"], ["scheduler.grace_period=10"],
    ["scheduler=fifo", "+train.val=false"], ["scheduler=pbt", "scheduler.perturbation_interval=3",
                                             "scheduler.quantile_fraction=0.5", "scheduler.resample_probability=1"],
    ["scheduler=pbt", "scheduler.perturbation_interval=1", "scheduler.quantile_fraction=0",
     "scheduler.resample_probability=0"],
    ["scheduler=median", "scheduler.grace_period=3", "scheduler.min_samples_required=1"],
    ["search=optuna", "search.n_startup_trials=0"], ["search=hyperopt", "search.n_initial_points=0"],
    ["resources.cpu_per_trial=1", "resources.gpu_per_trial=0"], ["resources.max_concurrent_trials=1"],
    ["resources.image_cache_mb=0"], ["resources.image_cache_mb=null"], ["resources.gpu_mb_per_trial=1"],
    ["failure.max_failures=0"], ["seed=0"], ["seed=4294967295"], ["mode=min", "metric=val/box_loss"],
    ["metric='metrics/mAP50-95(B)'"], ["space.momentum.high=1.0"], ["space.lrf.low=0.0"],
    ["~space.lr0", "~space.momentum", "train.optimizer=auto"], ["+space.mosaic='choice([0.0, 1.0])'"],
    ["+space.close_mosaic='qrandint(0, 10, 2)'"], ["space.lrf='quniform(0.2, 0.8, 0.2)'"],
    ["space.lr0={dist:choice,values:[0.001,0.01]}"], ["space.lr0='loguniform(1e-4, 1e-2)'"],
    ["train.imgsz=32"], ["train.batch=1"], ["+train.fraction=1.0"], ["+train.fraction=0.5"],
    ["+train.patience=0"], ["name=my-exp_1.2"], ["data.train_images=1", "data.val_images=1"], ["data.classes=1"],
    ["epochs=12"], ["imgsz=64"], ["verbose=quiet"], ["verbose=ray"], ["train.cos_lr=true"], ["+train.cos_lr=true"],
    ["resources.gpu_per_trial=1"], ["resources.gpu_per_trial=1", "train.batch=-1"],
    ["resources.gpu_per_trial=0.25", "train.batch=1"], ["checkpoint.every=1"], ["checkpoint.every=10"],
    ["checkpoint.keep=1"], ["checkpoint.keep=null"],
    ["scheduler=pbt", "scheduler.perturbation_interval=4", "checkpoint.every=2"], ["+train.deterministic=true"],
    # each rule's last valid value
    ["train.epochs=1", "scheduler.grace_period=1"], ["scheduler.max_t=10"], ["scheduler.brackets=10"],
    ["scheduler=hyperband", "scheduler.max_t=10", "scheduler.reduction_factor=1.01"],
    ["scheduler=median", "scheduler.grace_period=10"], ["scheduler=pbt", "scheduler.perturbation_interval=10"],
    ["search=bohb", "search.max_t=10", "search.reduction_factor=1.01"], ["search=bohb", "search.max_t=1"],
    ["space.lr0='grid([0.01, 0.1])'"],  # random search grids
    ["resources.cpu_per_trial=0", "resources.gpu_per_trial=1"],  # the machine's GPUs are preflight's to check
    ["resources.gpu_per_trial=0.25"], ["resources.gpu_per_trial=1.0"],
    ["resources.cpu_per_trial=0.5", "resources.gpu_per_trial=0"],
    ["name=" + "a" * 128], ["name=_x"], ["name='a=b+c'"],
    ["ray.address=auto"], ["ray.address=127.0.0.1:6379"], ["ray.address=ray://head-1.example.org:10001"],
    ["metric=epoch"], ["metric=lr/pg0"], ["metric=metrics/accuracy_top5", "model=yolo11n-cls-scratch"],
    ["metric='metrics/mAP50(M)'", "model=yolo11n-seg-scratch"], ["metric='metrics/mAP50-95(P)'", "model=yolo11n-pose-scratch"],
    ["metric=val/angle_loss", "model=yolo11n-obb-scratch", "mode=min"], ["metric=val/loss", "model=yolo11n-cls-scratch"],
    # each task's data (shapes draws its labels) and a space key of its own
    ["model=yolo11n-seg-scratch"], ["model=yolo11n-cls-scratch"], ["model=yolo11n-pose-scratch"],
    ["model=yolo11n-obb-scratch"], ["model=yolo11n-cls-scratch", "+space.dropout='uniform(0, 0.5)'"],
    ["model=yolo11n-pose-scratch", "+space.kobj='uniform(0.5, 2)'"],
    ["+space.model={dist:choice,values:[yolo11n-cls.yaml,yolo11s-cls.yaml]}", "model=yolo11n-cls-scratch"],
    ["metric=train/cls_loss", "mode=min"], ["failure.max_failures=3"],
    ["data.train_images=100000", "data.val_images=100000"], ["data.imgsz=32"], ["data.imgsz=4096"],
    ["data.classes=3"], ["model.weights=yolo11n.yml"], ["wandb=offline"], ["+train.save=true"], ["+train.val=true"],
    ["~space.lr0", "~space.momentum", "~train.optimizer"],  # auto with nothing it ignores tuned
    # Ultralytics' value rules (check_values)
    ["train.imgsz=8192"], ["train.imgsz=[64,96]"], ["train.batch=-1"], ["train.batch=0.5"],
    ["+space.imgsz='choice([32, 64])'", "~train.imgsz"], ["~space.momentum", "+train.momentum=0.0"],
    ["budget.time=2h"], ["budget.time=90m"], ["budget.time=3600s"], ["budget.time=3600"], ["budget.time=0.5"],
    ["budget.time=1.5h"], ["budget.time=null"], ["experiment=recommended"],
    ["validate=every"], ["validate=decisions"], ["validate=every", "scheduler=fifo", "+train.val=false"],
    ["experiment=recommended", "scheduler=fifo", "search=random", "space=default"],
    OBJECTIVES, [*OBJECTIVES, "search=optuna"], ["objectives=[fitness:max,latency_ms:min,params:min,gflops:min]",
                                                  "scheduler=fifo"],
    ["objectives=['metrics/mAP50-95(B):max',params:min]", "metric='metrics/mAP50-95(B)'", "scheduler=fifo"],
    ["objectives=[val/box_loss:min,gflops:min]", "metric=val/box_loss", "mode=min", "scheduler=fifo"],
    [*OBJECTIVES, "select=latency_ms<=0"], [*OBJECTIVES, "select='latency_ms < 5 and fitness>=0.5'"],
    [*OBJECTIVES, "select='latency_ms>1e-3'"], ["experiment=speed_accuracy", "~train.imgsz"],
    ["+space.model={dist:choice,values:[yolo11n.yaml,yolo11s.yaml]}"],
]


@pytest.mark.parametrize("overrides", VALID, ids=[" ".join(v) for v in VALID])
def test_valid_boundaries_are_accepted(overrides, tmp_path, shapes_cache):
    """validate() and Ultralytics' value rules pass; preflight's machine and file checks are not run."""
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, *overrides, preflight=False)
    train_args.check_values(exp)
    assert not (tmp_path / "runs").exists()


def test_file_uri_storage_is_accepted(tmp_path, shapes_cache):
    exp = attempt(tmp_path, shapes_cache, *BASE, f"storage=file://{tmp_path}/runs", preflight=False)
    assert exp.storage == f"file://{tmp_path}/runs"
    assert not (tmp_path / "runs").exists()


def test_shapes_cache_dir_that_is_a_file(data_files, tmp_path, shapes_cache):
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, f"data.cache_dir={data_files / 'a_file'}", preflight=False)
    assert err.value.key == "data.cache_dir"


def test_model_weights_that_is_a_directory(data_files, tmp_path, shapes_cache):
    """check() refuses it before preflight tries to load it."""
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, f"model.weights={data_files}/images.pt", preflight=False)
    assert err.value.key == "model.weights" and "directory" in err.value.allowed


def test_replacing_a_space_entry_replaces_it(tmp_path, shapes_cache):
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, "space.lr0={dist:choice,values:[0.001,0.01]}",
                  preflight=False)
    assert exp.space["lr0"] == {"dist": "choice", "values": [0.001, 0.01]}


def test_bare_train_arguments_go_to_train(tmp_path, shapes_cache):
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, "epochs=12", "imgsz=64", "cos_lr=true", preflight=False)
    assert (exp.train["epochs"], exp.train["imgsz"], exp.train["cos_lr"]) == (12, 64, True)


@pytest.fixture(scope="module")
def task_data(tmp_path_factory, shapes_cache):
    """A folder of datasets, named relative to it as users name them in the current directory: a
    classification dataset (shapes' class folders), one without train/ or val/, a detection data YAML."""
    from yolotune.data import ShapesDataConfig, make_shapes

    root = tmp_path_factory.mktemp("task-data")
    shapes = ShapesDataConfig(train_images=6, val_images=3, imgsz=64, cache_dir=str(shapes_cache))
    shutil.copytree(make_shapes(shapes, "classify"), root / "cls")
    shutil.copytree(root / "cls" / "train", root / "cls_no_val" / "train")
    (root / "cls_no_train" / "val").mkdir(parents=True)
    shutil.copytree(make_shapes(shapes), root / "det")
    (root / "det" / "data.yaml").write_text(f"path: {root / 'det'}\ntrain: images/train\nval: images/val\n"
                                            "names: {0: circle, 1: rectangle, 2: triangle}\n")
    return root


TASK_DATA_CASES = [  # (case id, model, data.yaml relative to task_data)
    ("classify-folder-without-train", "yolo11n-cls-scratch", "cls_no_train"),
    ("classify-folder-without-val", "yolo11n-cls-scratch", "cls_no_val"),
    ("classify-folder-for-a-detect-model", "yolo11n-scratch", "cls"),
    ("pose-data-yaml-without-kpt-shape", "yolo11n-pose-scratch", "det/data.yaml"),
]


@pytest.mark.parametrize("case,model,data", TASK_DATA_CASES, ids=[c[0] for c in TASK_DATA_CASES])
def test_each_tasks_data_is_refused_in_one_line_before_ray(case, model, data, task_data, tmp_path, shapes_cache,
                                                           monkeypatch):
    monkeypatch.chdir(task_data)
    before = sorted(task_data.rglob("*"))
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, f"model={model}", "data=coco8", f"data.yaml={data}")
    assert err.value.key == "data.yaml" and "\n" not in str(err.value)
    assert sorted(task_data.rglob("*")) == before and not (tmp_path / "runs").exists()  # nothing written
    _check_message(case, str(err.value))


def test_a_classify_folder_in_the_current_directory_is_its_data(task_data, tmp_path, shapes_cache, monkeypatch):
    """A bare name of a folder here, as Ultralytics takes it; resolved to its absolute path for the trials."""
    from yolotune.preflight import preflight

    monkeypatch.chdir(task_data)
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, "model=yolo11n-cls-scratch", "data=coco8", "data.yaml=cls",
                  preflight=False)
    job, _ = preflight(exp, tmp_path / "runs" / "bad")
    assert job["data"] == str(task_data / "cls")


def test_preflight_passes_a_valid_experiment(tmp_path, shapes_cache):
    attempt(tmp_path / "runs", shapes_cache, *BASE)
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("overrides,seed,deterministic", [
    ([], None, False), (["seed=3"], 3, False), (["seed=3", "+train.deterministic=true"], 3, True),
    (["+train.deterministic=true"], None, True), (["+train.seed=5"], 5, False),
])
def test_a_seed_leaves_deterministic_gpu_training_off_unless_asked(overrides, seed, deterministic, tmp_path,
                                                                    shapes_cache):
    """Ultralytics trains deterministically by default (slow on GPUs); a seed fixes the sampling and the
    trials' seeds, deterministic algorithms only with train.deterministic=true."""
    from yolotune.preflight import preflight

    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, *overrides, preflight=False)
    job, _ = preflight(exp, tmp_path / "runs" / "bad")
    assert (job["train"].get("seed"), job["train"]["deterministic"]) == (seed, deterministic)


# As a user types them: one line on stderr, exit 2, no traceback, nothing written.
CLI_CASES = [
    (["iterations=ten"], "iterations"),
    (["+foo=1"], "foo"),
    (["scheduler=foo"], "scheduler"),
    (["train.imgsz=big"], "train.imgsz"),
    (["name=../../x"], "name"),
    (["space.lr0.low=0.5", "space.lr0.high=0.1"], "space.lr0.low"),
    (["ray.address=127.0.0.1:1", "resources.cpu_per_trial=1"], "ray.address"),
    (["storage=/proc/yolotune"], "storage"),
    (["objectives=[fitness:max,latency_ms:min]"], "scheduler"),
    ([*OBJECTIVES, "select=latency<=5"], "select"),
]


@pytest.mark.subprocess
@pytest.mark.parametrize("overrides,key", CLI_CASES, ids=[c[0][0] for c in CLI_CASES])
def test_cli_prints_one_line_and_exits_2(overrides, key, tmp_path, shapes_cache):
    proc = run_cli(f"storage={tmp_path}/runs", "name=bad", "data=shapes", f"data.cache_dir={shapes_cache}", *BASE, *overrides,
                   timeout=120)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"yolotune: error: {key}="), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("recorded", ["127.0.0.1:1", None], ids=["dead-cluster", "none"])
def test_ray_address_auto_reads_the_cluster_recorded_in_rays_temp_dir(recorded, tmp_path, monkeypatch):
    from yolotune.runner import check_reachable

    monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    if recorded:
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(recorded + "\n")
    with pytest.raises(ConfigError) as err:
        check_reachable("auto", timeout_s=2)
    assert err.value.key == "ray.address"
    assert str(err.value).startswith(f"ray.address={recorded}: no Ray cluster answers there" if recorded else
                                     "ray.address=auto: no running Ray cluster found on this machine")


@pytest.mark.subprocess
def test_multirun_runs_the_valid_jobs_and_lists_the_bad_one(tmp_path, shapes_cache):
    """iterations=ten does not compose and train.imgsz=big fails validation: both are failed rows, while
    the valid job's config is composed and reaches its run (here refused at preflight by cpu_per_trial)."""
    proc = run_cli("-m", f"storage={tmp_path}/runs", "data=shapes", f"data.cache_dir={shapes_cache}", *BASE,
                   "iterations=ten,2", "resources.cpu_per_trial=512", timeout=300)
    summary = next((tmp_path / "runs" / "multirun").glob("*/multirun_summary.csv")).read_text().splitlines()
    assert len(summary) == 3, summary  # header + both jobs
    assert "iterations=ten: an integer" in summary[1]
    assert "resources.cpu_per_trial=512" in summary[2]
    assert [line.split(",")[2] for line in summary[1:]] == ["refused", "refused"]
    assert proc.returncode == 2  # every job refused: as a single refused run
    assert "Traceback" not in proc.stderr


@pytest.mark.subprocess
def test_multirun_into_a_storage_that_cannot_be_made_is_one_line(shapes_cache):
    """Refused before Hydra makes the sweep dir (<storage>/multirun/...) in it: no job runs."""
    proc = run_cli("-m", "storage=/proc/yolotune", "data=shapes", f"data.cache_dir={shapes_cache}", *BASE,
                   "iterations=1,2", timeout=120)
    assert (proc.returncode, proc.stderr) == (2, "yolotune: error: storage=/proc/yolotune: a writable directory; "
                                                 "cannot create a folder in /proc: No such file or directory\n")



@pytest.mark.subprocess
def test_multirun_over_storages_refuses_the_one_that_cannot_be_made_and_keeps_one_summary(tmp_path, shapes_cache):
    """Each job's storage is checked before Hydra makes folders in it; every job's row goes to the
    summary under the multirun's own storage (here the default, runs/tune in the current directory)."""
    proc = run_cli("-m", f"storage=/proc/a,{tmp_path}/b", "data=shapes", f"data.cache_dir={shapes_cache}", *BASE,
                   "resources.cpu_per_trial=512", cwd=tmp_path, timeout=120)
    summary = pd.read_csv(next((tmp_path / "runs" / "tune" / "multirun").glob("*/multirun_summary.csv")))
    assert list(summary["status"]) == ["refused", "refused"]
    assert summary["error"][0] == ("storage=/proc/a: a writable directory; cannot create a folder in /proc: "
                                   "No such file or directory")
    assert summary["error"][1].startswith("resources.cpu_per_trial=512")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr
    assert not (tmp_path / "b").exists()


# A damaged experiment to resume: one line naming it, before Ray starts, nothing written.
GOOD_STATE = pickle.dumps({"tuner": "state"})
DAMAGED = [
    ("tuner-cut", {layout.TUNER_STATE: GOOD_STATE[:-3]}, "its Ray state tuner.pkl is damaged (pickle exhausted before "
                                                        "seeing STOP); results still read it (yolotune results), but it "
                                                        "cannot resume"),
    ("tuner-empty", {layout.TUNER_STATE: b""}, "its Ray state tuner.pkl is damaged (pickle exhausted before seeing "
                                               "STOP)"),
    ("tuner-garbage", {layout.TUNER_STATE: b"<html>"}, "its Ray state tuner.pkl is damaged ("),
    ("config-list", {layout.SAVED_CONFIG: b"- a\n"}, "its saved config .hydra/config.yaml is not a mapping"),
    ("config-cut", {layout.SAVED_CONFIG: b"space: {lr0: [\n"}, "its saved config .hydra/config.yaml is unreadable: "),
    ("intact", {}, None),
]


@pytest.fixture
def saved_experiment(tmp_path, shapes_cache) -> Path:
    """An unfinished experiment as a run leaves it once Ray started: its saved config and Ray's state."""
    from yolotune.experiment import save_config

    register_configs()
    with initialize_config_module("yolotune.conf", version_base="1.3"):
        cfg = compose("config", overrides=["data=shapes", f"data.cache_dir={shapes_cache}", "space=minimal",
                                           "model=yolo11n-scratch"])
    exp_dir = tmp_path / "runs" / "exp"
    save_config(exp_dir, cfg, [])
    (exp_dir / layout.TUNER_STATE).write_bytes(GOOD_STATE)
    return exp_dir


@pytest.mark.parametrize("files,problem", [c[1:] for c in DAMAGED], ids=[c[0] for c in DAMAGED])
def test_resuming_a_damaged_experiment_names_the_file(saved_experiment, files, problem):
    from yolotune.experiment import resume_config

    for name, data in files.items():
        (saved_experiment / name).write_bytes(data)
    before = {p: p.read_bytes() for p in saved_experiment.rglob("*") if p.is_file()}
    cfg = OmegaConf.create({"storage": str(saved_experiment.parent), "name": "exp", "resume": True,
                            "resume_errored": False})
    if problem is None:
        assert resume_config(cfg, [])[1] == saved_experiment
        return
    with pytest.raises(ConfigError) as err:
        resume_config(cfg, [])
    assert str(err.value).startswith(f"name=exp: {problem}"), str(err.value)
    assert {p: p.read_bytes() for p in saved_experiment.rglob("*") if p.is_file()} == before


@pytest.mark.subprocess
def test_resuming_a_damaged_experiment_from_the_command_line_is_one_line(saved_experiment):
    (saved_experiment / layout.TUNER_STATE).write_bytes(GOOD_STATE[:-3])
    proc = run_cli("resume=true", "name=exp", f"storage={saved_experiment.parent}", timeout=120)
    assert (proc.returncode, proc.stderr) == (2, f"yolotune: error: name=exp: {DAMAGED[0][2]}\n")


# The Python API: the same ConfigError, before Ray starts.
@pytest.mark.parametrize("kwargs,key", [
    ({"space": "lr0"}, "space"),
    ({"overrides": "scheduler=fifo"}, "overrides"),
    ({"overrides": ["iterations=ten"]}, "iterations"),
    ({"use_ray": False}, "use_ray"),
    ({"iterations": "ten"}, "iterations"),
    ({"iterations": 0}, "iterations"),
    ({"momentun": 0.9}, "train.momentun"),
    ({"space": {"lr0": "uniform(0.5, 0.1)"}}, "space.lr0.low"),
    ({"data": "/no/such/data.yaml"}, "data.yaml"),
    ({"name": "../x"}, "name"),
    ({"storage": "/sys/yolotune"}, "storage"),
    ({"objectives": ["fitness:max", "latency_ms:min"]}, "scheduler"),
    ({"objectives": ["fitness:max"], "overrides": ["scheduler=fifo"]}, "objectives"),
    ({"select": "latency_ms<=5"}, "select"),
], ids=lambda v: str(v)[:30])
def test_python_api_raises_config_error(kwargs, key, tmp_path):
    import yolotune

    args = {"model": "yolo11n.yaml", "data": "shapes", "storage": str(tmp_path / "runs"), "epochs": 10, **kwargs}
    with pytest.raises(ConfigError) as err:
        yolotune.tune(**args)
    assert err.value.key == key, str(err.value)
    assert not (tmp_path / "runs").exists()


def test_python_api_takes_paths_literally(tmp_path):
    """A data path with a comma, brackets and ${...} reaches the data check as typed."""
    import yolotune

    path = str(tmp_path / "a,b [x] ${y}.yaml")
    with pytest.raises(ConfigError) as err:
        yolotune.tune(model="yolo11n.yaml", data=path, storage=str(tmp_path / "runs"), epochs=10)
    assert (err.value.key, err.value.value) == ("data.yaml", path)


DRY_RUNS = [  # (overrides, the refused key, or the start of the plan printed: checked)
    ([], "Plan: 2 trials at once, each 1 CPU"),
    (["resume=false", "iterations=1"], "Plan: 1 trial at once, each 2 CPUs"),
    (["+train.fliplr=2"], "train.fliplr"),  # Ultralytics' value rules: preflight's, not validate's
    (["data=coco8", "data.yaml=/nonexistent/data.yaml"], "data.yaml"),
    (["resources.cpu_per_trial=512"], "resources.cpu_per_trial"),  # the plan for this machine
]


@pytest.mark.subprocess
@pytest.mark.parametrize("overrides,key", DRY_RUNS, ids=[" ".join(o) or "quickstart" for o, _ in DRY_RUNS])
def test_dry_run_checks_everything_and_starts_nothing(overrides, key, tmp_path, shapes_cache):
    """dry_run=true: every check a run makes before Ray, then the plan and exit 0; or the one-line refusal."""
    cache = [] if "data=coco8" in overrides else [f"data.cache_dir={shapes_cache}"]
    proc = run_cli("experiment=quickstart", "dry_run=true", f"storage={tmp_path}/runs", *cache, *overrides, timeout=120)
    if key.startswith("Plan: "):
        assert proc.returncode == 0, proc.stderr[-2000:]
        assert any(line.startswith(key) for line in proc.stdout.splitlines()), proc.stdout
        assert "nothing was run. Drop dry_run=true to start it." in proc.stdout
    else:
        assert proc.returncode == 2 and proc.stderr.startswith(f"yolotune: error: {key}="), proc.stderr[-2000:]
        assert len(proc.stderr.splitlines()) == 1 and "Plan" not in proc.stdout
    assert "Traceback" not in proc.stderr and not (tmp_path / "runs").exists()


@pytest.mark.subprocess
def test_a_dry_run_multirun_checks_each_job_and_makes_no_experiment(tmp_path, shapes_cache):
    """dry_run=true through -m: each valid job is `checked` (not a failure to load an experiment that a dry
    run never makes), the bad one `refused`, the others still checked; exit 1 as for any refused job."""
    proc = run_cli("-m", "experiment=quickstart", "dry_run=true", f"data.cache_dir={shapes_cache}",
                   f"storage={tmp_path}/runs", "iterations=1,ten,2", timeout=300)
    summary = pd.read_csv(next((tmp_path / "runs" / "multirun").glob("*/multirun_summary.csv")))
    assert list(summary["status"]) == ["checked", "refused", "checked"], summary.to_string()
    assert summary["experiment"].isna().all() and proc.returncode == 1 and "Traceback" not in proc.stderr
    assert sorted(p.name for p in (tmp_path / "runs").iterdir()) == ["multirun"]  # no experiment made
