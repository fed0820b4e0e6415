"""Sweep engine: real Ray Tune sweeps of real Ultralytics training, on the CPU."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import ray_temp_dir
from yolotune.train_args import ultralytics_args

pytestmark = pytest.mark.slow


def _results(exp_dir):
    """trial dir -> list of reported results, in order."""
    return {d: [json.loads(line) for line in (d / "result.json").read_text().splitlines()]
            for d in sorted(exp_dir.glob("trial_*"))}


def test_one_trial_per_iteration_each_reporting_every_epoch_with_a_checkpoint(small_sweep):
    results = _results(small_sweep)
    assert len(results) == 6
    for trial_dir, rows in results.items():
        assert [r["epoch"] for r in rows] == list(range(1, len(rows) + 1))
        assert all("fitness" in r and "metrics/mAP50-95(B)" in r for r in rows)
        assert all(r["checkpoint_dir_name"] for r in rows)
        assert list(trial_dir.glob("checkpoint_*/last.pt")), trial_dir
        assert (trial_dir / "train" / "args.yaml").is_file()  # Ultralytics' output lives in the trial dir


def test_asha_stops_some_trials_early(small_sweep):
    trials = pd.read_csv(small_sweep / "trials.csv")
    assert len(trials) == 6
    assert (trials["epochs"] < 3).any(), trials[["trial_id", "epochs"]]
    assert (trials["epochs"] == 3).any()


def test_best_hyperparameters_are_train_args_of_the_best_trial(small_sweep):
    best = yaml.safe_load((small_sweep / "best_hyperparameters.yaml").read_text())
    assert set(best) <= ultralytics_args()
    trials = pd.read_csv(small_sweep / "trials.csv")
    winner = trials.loc[trials["best_val/box_loss"].idxmin()]
    params = json.loads((small_sweep / f"trial_{winner.trial_id}" / "params.json").read_text())
    assert params and all(best[k] == pytest.approx(v) for k, v in params.items())
    assert best["epochs"] == 3 and best["imgsz"] == 64 and best["warmup_epochs"] == 0


def test_bare_train_arguments_land_in_the_saved_configs_train(small_sweep):
    """small_sweep_overrides gives epochs=3 imgsz=64 batch=16 nbs=16 warmup_epochs=0 bare."""
    train = yaml.safe_load((small_sweep / ".hydra" / "config.yaml").read_text())["train"]
    assert {k: train[k] for k in ("epochs", "imgsz", "batch", "nbs", "warmup_epochs")} == \
        {"epochs": 3, "imgsz": 64, "batch": 16, "nbs": 16, "warmup_epochs": 0}


def test_best_weights_load(small_sweep):
    from ultralytics import YOLO

    model = YOLO(str(small_sweep / "best.pt"))
    assert model.task == "detect"


def _saved_epoch(weights):
    """The metric values and the epoch that a checkpoint Ultralytics saved holds (its results.csv rows so far)."""
    import torch

    ckpt = torch.load(weights, map_location="cpu", weights_only=False)
    return ckpt["train_metrics"]["val/box_loss"], len(ckpt["train_results"]["epoch"])


def test_best_weights_are_the_best_trials_at_its_best_epoch_by_the_metric(small_sweep):
    """The sweep ranks by val/box_loss (min), which Ultralytics' own best.pt does not follow."""
    from yolotune.layout import TRIAL_BEST_WEIGHTS, read_jsonl

    trials = pd.read_csv(small_sweep / "trials.csv").set_index("trial_id")
    for trial_id, trial in trials.iterrows():
        rows = [r for r in read_jsonl(small_sweep / f"trial_{trial_id}" / "history.jsonl")[0] if r["validated"]]
        best = min(rows, key=lambda r: r["val/box_loss"])  # from the raw history; first of ties
        saved = _saved_epoch(small_sweep / f"trial_{trial_id}" / "train" / "weights" / TRIAL_BEST_WEIGHTS)
        assert saved == (pytest.approx(best["val/box_loss"]), best["epoch"]), trial_id
    winner = trials["best_val/box_loss"].idxmin()
    assert _saved_epoch(small_sweep / "best.pt") == (pytest.approx(trials.at[winner, "best_val/box_loss"]),
                                                      trials.at[winner, "best_epoch"])


def test_reused_workers_train_each_trials_own_config(small_sweep):
    """With reuse_actors one process runs several trials; each must train with its own sampled values."""
    pids = set()
    for trial_dir, rows in _results(small_sweep).items():
        pids.add(rows[0]["pid"])
        params = json.loads((trial_dir / "params.json").read_text())
        args = yaml.safe_load((trial_dir / "train" / "args.yaml").read_text())
        assert {k: args[k] for k in params} == pytest.approx(params)
    assert len(pids) < 6  # at least one worker process ran more than one trial


def test_python_api_returns_a_result_grid(tmp_path, coco8):
    from ray import tune as ray_tune
    from ray.tune import ResultGrid

    import yolotune

    grid = yolotune.tune(model="yolo11n.yaml", data=str(coco8), space={"lr0": ray_tune.uniform(1e-3, 1e-1)},
                         iterations=2, storage=str(tmp_path), name="api", overrides=["scheduler=fifo"],
                         epochs=1, imgsz=64)
    assert isinstance(grid, ResultGrid)
    assert len(grid) == 2 and not grid.errors
    assert all(1e-3 <= r.config["lr0"] <= 1e-1 for r in grid)
    saved = yaml.safe_load((tmp_path / "api" / ".hydra" / "config.yaml").read_text())
    assert saved["space"] == {"lr0": {"dist": "uniform", "low": 1e-3, "high": 1e-1}}
    assert (tmp_path / "api" / "trials.csv").is_file()


def test_python_api_grace_period_gpu_per_trial_and_resume(tmp_path, shapes_cache, monkeypatch):
    """The API's own arguments land in the saved config; resume=True of the finished experiment returns its
    results, as the guide's model.tune(..., resume=True) does, and runs nothing."""
    from ray.tune import ResultGrid

    import yolotune

    shapes = ["data.train_images=16", "data.val_images=8", "data.imgsz=64", f"data.cache_dir={shapes_cache}"]
    where = dict(storage=str(tmp_path), name="api", gpu_per_trial=0)
    with ray_temp_dir() as ray_tmp:
        monkeypatch.setenv("RAY_TMPDIR", str(ray_tmp))  # the in-process Ray is this test's own
        grid = yolotune.tune(model="yolo11n.yaml", data="shapes", space={"lr0": "uniform(0.001, 0.01)"},
                             grace_period=2, iterations=2, overrides=["seed=0", *shapes], epochs=2, imgsz=64,
                             batch=8, **where)
        assert len(grid) == 2 and not grid.errors
        saved_path = tmp_path / "api" / ".hydra" / "config.yaml"
        saved = yaml.safe_load(saved_path.read_text())
        assert saved["scheduler"]["type"] == "asha" and saved["scheduler"]["grace_period"] == 2
        assert saved["resources"]["gpu_per_trial"] == 0 and saved["iterations"] == 2
        assert saved["train"]["epochs"] == 2 and saved["data"]["train_images"] == 16
        trials = pd.read_csv(tmp_path / "api" / "trials.csv")
        record = (tmp_path / "api" / "trials.jsonl").read_text()

        again = yolotune.tune(resume=True, grace_period=1, iterations=5, epochs=9, **where)
    assert isinstance(again, ResultGrid) and len(again) == 2 and not again.errors
    assert {(r.config["lr0"], r.metrics["fitness"], r.metrics["epoch"]) for r in again} == \
        {(r.config["lr0"], r.metrics["fitness"], r.metrics["epoch"]) for r in grid}
    best = max(again, key=lambda r: r.metrics["fitness"])
    assert again.get_best_result().config == best.config  # ranked by the experiment's metric and mode
    assert yaml.safe_load(saved_path.read_text()) == saved
    assert pd.read_csv(tmp_path / "api" / "trials.csv")["epochs"].tolist() == trials["epochs"].tolist()
    assert (tmp_path / "api" / "trials.jsonl").read_text() == record  # no trial started, resumed or ended


# (overrides, the epochs its trials validate under validate=decisions: where the scheduler decides)
OTHERS = [
    (["scheduler=pbt", "scheduler.perturbation_interval=2", "scheduler.quantile_fraction=0.5"], {2, 3}),
    (["search=optuna", "search.n_startup_trials=1", "scheduler=median", "scheduler.grace_period=1"], {1, 2, 3}),
    (["search=optuna", "search.n_startup_trials=1", "scheduler=fifo"], {3}),  # Optuna gets metric-less results
    (["search=hyperopt", "search.n_initial_points=1", "scheduler=hyperband"], {1, 3}),  # max_t 3, eta 3
]


@pytest.mark.parametrize("overrides,decisions", OTHERS, ids=["pbt", "optuna+median", "optuna+fifo",
                                                             "hyperopt+hyperband"])
def test_other_schedulers_and_searchers_run(tmp_path, shapes_cache, overrides, decisions):
    from conftest import run_cli, small_sweep_overrides

    base = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "x", iterations=3, epochs=3)
            if not o.startswith("scheduler")]
    proc = run_cli(*base, *overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "x" / "trials.csv")
    # synchronous HyperBand leaves the trials it did not promote PAUSED when the sweep ends
    assert len(trials) == 3 and trials["status"].isin(["TERMINATED", "PAUSED"]).all() and (trials["epochs"] >= 1).all()
    history = [json.loads(line) for path in (tmp_path / "x").glob("trial_*/history.jsonl")
               for line in path.read_text().splitlines()]
    assert all(row["validated"] == (row["epoch"] in decisions) for row in history), history
    assert all(("val/box_loss" in row) == (row["epoch"] in decisions) for row in history)
    if "scheduler=pbt" in overrides:  # PBT continued trials from checkpoints: every trial still reached the end
        assert (trials["epochs"] == 3).all()
        assert {row["epoch"] for row in history} == {1, 2, 3}
