"""Which search finds the best YOLO fastest? Anytime curves of search setups at one trial-epoch budget.

Every setup tunes YOLO11n from scratch on the synthetic ``shapes`` dataset with the quickstart's
recipe (AdamW, nbs = batch, no mosaic) at 64 px, over the quickstart's 5-parameter space, with the
same budget of trial-epochs; ``full-random`` (random search, FIFO: every trial at full budget) sets
the bar. Ultralytics' own genetic tuner (``model.tune(use_ray=False)``) runs the same budget as
budget / epochs iterations. Each run's best fitness so far is recorded after every trial-epoch,
from the trials' own per-epoch histories (their timestamps give the wall-time axis).

    python scripts/bench_search.py                 # 3 seeds, about an hour on 2 CPU cores
    python scripts/bench_search.py --quick         # 1 seed, tiny: a smoke test (minutes)

Writes <out>/search.csv (one row per trial-epoch: setup, space, seed, run_dir, trial_epochs,
wall_s, fitness, best_fitness) and <out>/search.png, and prints for each setup the trial-epochs it
needed to reach full-random's best fitness (median over seeds of its final best).
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd

BASELINE = "full-random"
# setup -> the yolotune overrides that make it (None: Ultralytics' own tuner). ASHA and BOHB cut at
# epoch 1 and keep the top third; PBT perturbs every 2 epochs.
SETUPS = {
    BASELINE: ["scheduler=fifo", "search=random"],
    "random+asha": ["scheduler=asha", "search=random"],
    "tpe+asha": ["scheduler=asha", "search=optuna"],
    "hyperopt+asha": ["scheduler=asha", "search=hyperopt"],
    "bohb": ["search=bohb"],
    "pbt": ["scheduler=pbt", "search=random", "scheduler.perturbation_interval=2"],
    "ultralytics": None,
}
# The quickstart's space (conf/experiment/quickstart.yaml), as yolotune specs and as Ultralytics' ranges.
SPACE = {"lr0": (1e-4, 1e-2), "lrf": (0.01, 1.0), "momentum": (0.6, 0.98), "weight_decay": (0.0, 0.001),
         "warmup_epochs": (0.0, 5.0)}
SPECS = {k: {"dist": "loguniform" if k == "lr0" else "uniform", "low": lo, "high": hi} for k, (lo, hi) in SPACE.items()}
COLUMNS = ["setup", "space", "seed", "run_dir", "trial_epochs", "wall_s", "fitness", "best_fitness"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="1 seed, 2 trials x 2 epochs at 32 px: a smoke test")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--trials", type=int, default=4, help="full-random's trials; the budget is trials x epochs")
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--setups", nargs="+", choices=SETUPS, default=list(SETUPS))
    parser.add_argument("--out", type=Path, default=Path("runs/bench_search"))
    parser.add_argument("--child", nargs=3, metavar=("SETUP", "SPACE", "SEED"), help=argparse.SUPPRESS)
    parser.add_argument("--report", action="store_true", help="only the plot and the table, from <out>/search.csv")
    args = parser.parse_args()
    if args.report:
        return report(pd.read_csv(args.out / "search.csv"), args.out)
    if args.quick:
        args.seeds, args.trials, args.epochs = 1, 2, 2
    args.out.mkdir(parents=True, exist_ok=True)
    if args.child:
        return run_child(args, *args.child)
    runs = [(setup, "minimal", seed) for seed in range(args.seeds) for setup in args.setups]
    if not args.quick:  # the 22-parameter space once (after 2 seeds): does the ranking hold with a bigger space?
        runs[2 * len(args.setups):2 * len(args.setups)] = [(BASELINE, "default", 0), ("tpe+asha", "default", 0)]
    print(f"budget per run: {args.trials * args.epochs} trial-epochs ({args.trials} full-budget trials x "
          f"{args.epochs} epochs)", flush=True)
    frames = []
    for setup, space, seed in runs:
        name = f"{setup}-{space}-{seed}"
        print(f"{time.strftime('%H:%M:%S')} {name} ...", flush=True)
        # A fresh process per run. Ray killed under a run (another user's `ray stop`) fails it: the next
        # attempt resumes it (yolotune keeps every finished epoch).
        for _ in range(3):
            cmd = [sys.executable, __file__, "--child", setup, space, str(seed), *_passthrough(args)]
            with (args.out / f"{name}.log").open("a") as log:
                if subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode == 0:
                    frames.append(pd.read_csv(args.out / f"{name}.csv"))
                    break
            print(f"  failed: see {args.out / name}.log", flush=True)
        pd.concat(frames).to_csv(args.out / "search.csv", index=False)  # after every run
    report(pd.concat(frames), args.out)


def _passthrough(args) -> list:
    return [f"--{k}={getattr(args, k)}" for k in ("seeds", "trials", "epochs", "out")] + ["--quick"] * args.quick


def run_child(args, setup: str, space: str, seed: str) -> None:
    """One run, in this fresh process: writes <out>/<setup>-<space>-<seed>.csv, its anytime rows."""
    from yolotune.data import ShapesDataConfig, make_shapes

    images, imgsz = (32, 32) if args.quick else (256, 64)  # 256 images: fitness rises from about epoch 5
    shapes = ShapesDataConfig(train_images=images, val_images=images // 4, imgsz=imgsz,
                              cache_dir=str(args.out / "datasets"))
    data = str(make_shapes(shapes) / "data.yaml")
    train = {"epochs": args.epochs, "imgsz": imgsz, "batch": 8, "nbs": 8, "optimizer": "AdamW", "mosaic": 0.0}
    run_dir, seed = args.out / f"{setup}-{space}-{seed}", int(seed)
    start_file = run_dir.with_suffix(".start")  # a resumed run's wall time counts from its first attempt
    if not start_file.is_file():
        start_file.write_text(str(time.time()))
    start = float(start_file.read_text())
    if SETUPS[setup] is None:
        history = run_ultralytics(run_dir, data, train, args.trials, seed)
    else:
        history = run_yolotune(run_dir, data, train, setup, space, seed, args)
    rows = anytime(history, setup, space, seed, run_dir, start)
    pd.DataFrame(rows, columns=COLUMNS).to_csv(run_dir.with_suffix(".csv"), index=False)


def report(frame: pd.DataFrame, out: Path) -> None:
    plot(frame, out / "search.png")
    print(f"\nCSV {out / 'search.csv'}; plot {out / 'search.png'}\n")
    print(summary(frame).to_string(index=False))


def run_yolotune(run_dir: Path, data: str, train: dict, setup: str, space: str, seed: int, args) -> pd.DataFrame:
    import yolotune

    resume = (run_dir / "tuner.pkl").is_file()
    if not resume:
        shutil.rmtree(run_dir, ignore_errors=True)
    pruned = setup != BASELINE and setup != "pbt"
    # Pruning setups get 3x the trials (most stop after one epoch), so they spend about the same budget.
    iterations = args.trials * 3 if pruned else args.trials
    if space == "default":  # it tunes mosaic
        train = {k: v for k, v in train.items() if k != "mosaic"}
    yolotune.tune(model="yolo11n.yaml", data=data, space=SPECS if space == "minimal" else None, grace_period=1,
                  iterations=iterations, storage=str(run_dir.parent), name=run_dir.name, resume=resume,
                  overrides=[] if resume else [*SETUPS[setup], f"seed={seed}", "resources=cpu", f"space={space}",
                                                "validate=every"],  # anytime curves: fitness at every epoch
                  **train)
    return yolotune.load(run_dir).history()


def run_ultralytics(run_dir: Path, data: str, train: dict, iterations: int, seed: int) -> pd.DataFrame:
    """Ultralytics' genetic tuner, without Ray: one training at a time, each in a ``yolo train`` subprocess
    that reuses one folder. After each iteration its results.csv gives the per-epoch rows that
    yolotune's trials write (fitness = mAP50-95, timestamps from its elapsed ``time`` column)."""
    import numpy as np
    from ultralytics import YOLO
    from ultralytics.engine.tuner import Tuner

    rows, save_result = [], Tuner._save_local_result

    def record(tuner, result):
        now = time.time()
        for save_dir in result["save_dirs"].values():
            epochs = pd.read_csv(Path(save_dir) / "results.csv")
            rows.extend({"trial_id": f"iteration-{result['iteration']}", "epoch": int(row.epoch),
                         "fitness": float(row["metrics/mAP50-95(B)"]),
                         "timestamp": now - (epochs.time.iloc[-1] - row.time)} for _, row in epochs.iterrows())
        save_result(tuner, result)

    shutil.rmtree(run_dir, ignore_errors=True)  # no resume: start again
    random.seed(seed)  # its mutations draw from random and NumPy
    np.random.seed(seed)
    Tuner._save_local_result = record
    try:
        YOLO("yolo11n.yaml").tune(data=data, space=SPACE, iterations=iterations, use_ray=False, project=str(run_dir),
                                  name="tune", seed=seed, plots=False, **train)
    finally:
        Tuner._save_local_result = save_result
    history = pd.DataFrame(rows)
    history.to_json(run_dir / "history.jsonl", orient="records", lines=True)
    return history


def anytime(history: pd.DataFrame, setup: str, space: str, seed: int, run_dir: Path, start: float) -> list:
    """One row per trial-epoch, in the order they finished: the best fitness found so far."""
    history = history.sort_values("timestamp").reset_index(drop=True)
    best = history["fitness"].cummax()
    return [[setup, space, seed, str(run_dir), i + 1, round(row.timestamp - start, 2), row.fitness, best[i]]
            for i, row in history.iterrows()]


def target(frame: pd.DataFrame) -> float:
    """The bar: full-budget random search's best fitness, median over seeds."""
    base = frame[(frame.setup == BASELINE) & (frame.space == "minimal")]
    return statistics.median(base.groupby("seed").best_fitness.max())


def summary(frame: pd.DataFrame) -> pd.DataFrame:
    """Per setup: trial-epochs and wall seconds to reach the bar (median and range over seeds), and the best found."""
    bar = target(frame)
    out = []
    for (setup, space), runs in frame.groupby(["setup", "space"], sort=False):
        reached, walls, seeds = [], [], runs.seed.nunique()
        for _, run in runs.groupby("seed"):
            hit = run[run.best_fitness >= bar]
            if len(hit):
                reached.append(int(hit.trial_epochs.iloc[0]))
                walls.append(float(hit.wall_s.iloc[0]))
        out.append({"setup": setup, "space": space, "seeds": seeds, "reached": f"{len(reached)}/{seeds}",
                    "trial_epochs_median": statistics.median(reached) if reached else None,
                    "trial_epochs_range": f"{min(reached)}-{max(reached)}" if reached else "-",
                    "wall_s_median": round(statistics.median(walls)) if walls else None,
                    "budget_spent_median": statistics.median(runs.groupby("seed").trial_epochs.max()),
                    "best_fitness_median": round(statistics.median(runs.groupby("seed").best_fitness.max()), 4)})
    return pd.DataFrame(out).assign(bar=round(bar, 4))


def plot(frame: pd.DataFrame, path: Path) -> None:
    """Best fitness so far against trial-epochs and against wall time: one thin line per run, one colour per setup."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(13, 5), sharey=True)
    colours = dict(zip(SETUPS, plt.get_cmap("tab10").colors))
    for (setup, space, seed), run in frame.groupby(["setup", "space", "seed"], sort=False):
        label = f"{setup}" + ("" if space == "minimal" else f" ({space} space)") if seed == 0 else None
        style = dict(color=colours[setup], where="post", alpha=0.8, label=label,
                     linestyle="-" if space == "minimal" else ":")
        axes[0].step(run.trial_epochs, run.best_fitness, **style)
        axes[1].step(run.wall_s, run.best_fitness, **style)
    for ax, xlabel in zip(axes, ("trial-epochs spent", "wall time (s, shared 2-core machine: noisy)")):
        ax.axhline(target(frame), color="grey", linewidth=0.8, linestyle="--")
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("best fitness so far")
    axes[0].legend(fontsize=8)
    fig.suptitle("Anytime best fitness (dashed: full-budget random search's best, median over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


if __name__ == "__main__":
    main()
