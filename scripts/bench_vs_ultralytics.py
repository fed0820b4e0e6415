"""Side by side: Ultralytics' ``model.tune(use_ray=True)`` against yolotune, on the same work.

Same dataset (yolotune's synthetic ``shapes``), same space and train arguments (the quickstart's
AdamW recipe), same iterations, epochs, ASHA settings
(grace_period, reduction_factor 3, max_t = epochs), random search, and 1 CPU per trial. Each run is
a fresh process, alternating A B A B. A Ray Tune callback added to both (the only instrumentation)
times every trial from the driver.

    python scripts/bench_vs_ultralytics.py                  # defaults below, 2 rounds
    python scripts/bench_vs_ultralytics.py --rounds 3 --iterations 12 --epochs 8
    python scripts/bench_vs_ultralytics.py --validate every  # yolotune validates every epoch, as Ultralytics

Printed per run and as means: wall time, trials finished, trial-epochs, trial start -> first
training step (estimated as the first result's delay minus a steady epoch), last epoch -> trial
end, best mAP50-95; then the ratios yolotune / Ultralytics.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOOLS = ("ultralytics", "yolotune")
METRIC = "metrics/mAP50-95(B)"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="round r samples with seed + r, the same for both tools")
    parser.add_argument("--validate", choices=("decisions", "every"), default="decisions",
                        help="yolotune's validate=: decisions (at ASHA's rungs and the last epoch) or every epoch, "
                             "as Ultralytics does; measures what validating only at decisions saves")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"work dir: {workdir}; {os.cpu_count()} CPUs; {args.iterations} trials x {args.epochs} epochs, "
          f"ASHA grace {args.grace_period} rf 3, shapes {args.train_images} images at {args.imgsz} px; "
          f"yolotune validate={args.validate}")
    runs = {tool: [] for tool in TOOLS}
    for round_ in range(args.rounds):
        for tool in TOOLS:
            run_dir = workdir / f"{tool}-{round_}"
            run_dir.mkdir()
            cmd = [sys.executable, __file__, "--child", tool, "--workdir", str(run_dir), *_passthrough(args),
                   f"--seed={args.seed + round_}"]
            start = time.perf_counter()
            subprocess.run(cmd, check=True, cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            stats = summarise(json.loads((run_dir / "trials.json").read_text()), time.perf_counter() - start)
            runs[tool].append(stats)
            print(f"round {round_ + 1} {tool:11s} " + "  ".join(f"{k} {v:.3g}" for k, v in stats.items()), flush=True)

    means = {tool: {k: statistics.mean(s[k] for s in runs[tool]) for k in runs[tool][0]} for tool in TOOLS}
    print("\nmeans:")
    for key in means["yolotune"]:
        print(f"  {key:28s} ultralytics {means['ultralytics'][key]:9.3f}   yolotune {means['yolotune'][key]:9.3f}")
    u, y = means["ultralytics"], means["yolotune"]
    print("\nratios yolotune / Ultralytics:")
    print(f"  wall time                  {y['wall_s'] / u['wall_s']:.2f}  (target <= 0.70)")
    print(f"  trial-epochs per minute    {y['epochs_per_min'] / u['epochs_per_min']:.2f}")
    print(f"  best {METRIC:22s}{y['best_map'] - u['best_map']:+.4f} (difference)")


def _passthrough(args) -> list:
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "workdir", "rounds", "seed") and v is not None]


def summarise(trials: list, wall: float) -> dict:
    """Per-run figures from the driver-side trial timings."""
    epochs = sum(len({r["epoch"] for r in t["results"]}) for t in trials)
    start_overheads, end_overheads = [], []
    for t in trials:
        if not t["results"]:
            continue
        steps = [r["time_this_iter_s"] for r in t["results"][1:]] or [t["results"][0]["time_this_iter_s"]]
        start_overheads.append(t["results"][0]["at"] - t["start"] - statistics.median(steps))
        if t.get("end"):
            end_overheads.append(t["end"] - t["results"][-1]["at"])
    warm = [o for t, o in zip(trials, start_overheads) if t.get("warm")]
    best = max((r.get(METRIC, 0.0) for t in trials for r in t["results"]), default=0.0)
    return {
        "wall_s": wall, "trials": len(trials), "trial_epochs": epochs, "epochs_per_min": epochs / wall * 60,
        "start_overhead_s": statistics.mean(start_overheads),
        "warm_start_overhead_s": statistics.mean(warm) if warm else float("nan"),
        "end_overhead_s": statistics.mean(end_overheads) if end_overheads else float("nan"),
        "best_map": best,
    }


def run_child(args) -> None:
    """One tuning run of one tool, in this fresh process; writes trials.json."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import numpy as np
    from ray import tune

    from yolotune.config import ShapesDataConfig
    from yolotune.data import make_shapes

    data = str(make_shapes(ShapesDataConfig(train_images=args.train_images, val_images=args.train_images // 4,
                                            imgsz=args.imgsz, cache_dir=str(args.workdir.parent / "datasets")))
               / "data.yaml")
    space = {"lr0": tune.loguniform(1e-4, 1e-2), "lrf": tune.uniform(0.01, 1.0), "momentum": tune.uniform(0.6, 0.98),
             "weight_decay": tune.uniform(0.0, 0.001), "warmup_epochs": tune.uniform(0.0, 5.0)}
    # The quickstart's recipe, so that trials learn within a few epochs and ASHA has scores to rank
    # (with Ultralytics' SGD, nbs=64 and mosaic at 128 px, every trial scores 0 for many epochs).
    train = {"epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch, "nbs": args.batch,
             "optimizer": "AdamW", "mosaic": 0.0}
    # Neither tool is given a search seed: both sample from NumPy's global generator, seeded alike,
    # so in a round both train the same configurations.
    np.random.seed(args.seed)
    timer = _TrialTimer()
    _add_callback_to_every_tuner(timer)
    if args.child == "ultralytics":
        from ultralytics import YOLO

        YOLO("yolo11n.yaml").tune(data=data, space=space, grace_period=args.grace_period, iterations=args.iterations,
                                  use_ray=True, search_alg="random", project=str(args.workdir), **train)
    else:
        import yolotune

        yolotune.tune(model="yolo11n.yaml", data=data, space=space, grace_period=args.grace_period,
                      iterations=args.iterations, storage=str(args.workdir), name="yolotune",
                      overrides=[f"metric='{METRIC}'", "resources=cpu", f"validate={args.validate}"], **train)
    (args.workdir / "trials.json").write_text(json.dumps(list(timer.trials.values())))


class _TrialTimer:
    """Driver-side wall times of each trial's start, results and end."""

    def __init__(self):
        from ray.tune import Callback

        timer = self

        class Hook(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                timer.trials[trial.trial_id] = {"start": time.time(), "results": []}

            def on_trial_result(self, iteration, trials, trial, result, **info):
                t = timer.trials[trial.trial_id]
                t["results"].append({"at": time.time(), "time_this_iter_s": result["time_this_iter_s"],
                                     "epoch": result.get("epoch"), METRIC: result.get(METRIC, 0.0)})
                pid = result.get("pid")  # yolotune reports its worker's pid: trials after a worker's first are warm
                if pid is not None and len(t["results"]) == 1:
                    t["warm"] = pid in timer.pids
                    timer.pids.add(pid)

            def on_trial_complete(self, iteration, trials, trial, **info):
                timer.trials[trial.trial_id]["end"] = time.time()

        self.trials, self.pids, self.callback = {}, set(), Hook()


def _add_callback_to_every_tuner(timer: _TrialTimer) -> None:
    """Both tools build their own Tuner; add the timer to its RunConfig's callbacks."""
    from ray import tune

    original = tune.Tuner.__init__

    def init(self, *args, run_config=None, **kwargs):
        run_config = run_config or tune.RunConfig()
        run_config.callbacks = [*(run_config.callbacks or []), timer.callback]
        original(self, *args, run_config=run_config, **kwargs)

    tune.Tuner.__init__ = init


if __name__ == "__main__":
    main()
