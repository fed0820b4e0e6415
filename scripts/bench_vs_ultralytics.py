"""Side by side: Ultralytics' ``model.tune(use_ray=True)`` against yolotune, on the same work.

Same dataset (yolotune's synthetic ``shapes``), same space and train arguments (the quickstart's
AdamW recipe), same iterations, epochs, ASHA settings
(grace_period, reduction_factor 3, max_t = epochs), random search, and 1 CPU per trial. Each run is
a fresh process; in each round Ultralytics runs first and yolotune's variants follow, in an order
reversed every other round. A Ray Tune callback added to both (the only instrumentation) times
every trial from the driver.

    python scripts/bench_vs_ultralytics.py                  # defaults below, 2 rounds
    python scripts/bench_vs_ultralytics.py --iterations 6 --epochs 4 --grace-period 1 --train-images 64 --imgsz 96
    python scripts/bench_vs_ultralytics.py --variants yolotune,validate-every,no-image-cache,refresh-at-end

yolotune's variants, each with one of its savings turned off, to measure that saving on its own:
``validate-every`` (validate=every: every epoch, as Ultralytics; default validate=decisions),
``no-image-cache`` (resources.image_cache_mb=0: each trial decodes its images again),
``refresh-at-end`` (the live report is also rewritten as the last trial ends, just before the
final report, as it was before that was cut).

Printed per run and as means: wall time, trials, trial-epochs, the fixed costs (process start ->
first trial start, -> first training step, last epoch -> process end), the efficiency (the trials'
training and validation time over wall time x trial slots), best mAP50-95, MiB the trial workers
wrote per trial-epoch (checkpoints, weights, logs); then each variant's
wall-time ratio to Ultralytics and its saving's share of yolotune's gain. A trial's first epoch is
timed as a steady epoch of its kind (validated or not): the rest of its first result's delay is
start-up.
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

from yolotune.data import ShapesDataConfig, make_shapes

METRIC = "metrics/mAP50-95(B)"
VARIANTS = {  # yolotune's overrides per variant
    "yolotune": [],
    "validate-every": ["validate=every"],
    "no-image-cache": ["resources.image_cache_mb=0"],
    "refresh-at-end": [],
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--iterations", type=int, default=12)
    parser.add_argument("--epochs", type=int, default=6)
    parser.add_argument("--grace-period", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=256)
    parser.add_argument("--imgsz", type=int, default=128)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--seed", type=int, default=0, help="round r samples with seed + r, the same for all runs")
    parser.add_argument("--variants", default="yolotune",
                        help=f"comma-separated yolotune variants to run besides Ultralytics: {', '.join(VARIANTS)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--workdir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    variants = args.variants.split(",")
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        parser.error(f"--variants: unknown {', '.join(unknown)}; one of {', '.join(VARIANTS)}")
    tools = ["ultralytics", *variants]
    slots = os.cpu_count()  # 1 CPU per trial

    workdir = Path(tempfile.mkdtemp(prefix="bench-"))
    print(f"work dir: {workdir}; {slots} CPUs; {args.iterations} trials x {args.epochs} epochs, "
          f"ASHA grace {args.grace_period} rf 3, shapes {args.train_images} images at {args.imgsz} px; "
          f"runs: {', '.join(tools)}")
    runs = {tool: [] for tool in tools}
    for round_ in range(args.rounds):
        order = ["ultralytics", *(variants if round_ % 2 == 0 else variants[::-1])]
        for tool in order:
            run_dir = workdir / f"{tool}-{round_}"
            run_dir.mkdir()
            cmd = [sys.executable, __file__, "--child", tool, "--workdir", str(run_dir), *_passthrough(args),
                   f"--seed={args.seed + round_}"]
            start = time.time()
            child = subprocess.Popen(cmd, cwd=run_dir, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            written = trial_workers_written(child)
            if child.returncode:
                raise subprocess.CalledProcessError(child.returncode, cmd)
            stats = summarise(json.loads((run_dir / "trials.json").read_text()), start, time.time(), slots, written)
            runs[tool].append(stats)
            print(f"round {round_ + 1} {tool:15s} " + "  ".join(f"{k} {v:.3g}" for k, v in stats.items()), flush=True)

    means = {tool: {k: statistics.mean(s[k] for s in runs[tool]) for k in runs[tool][0]} for tool in tools}
    print("\nmeans:")
    print(f"  {'':24s}" + "".join(f"{tool:>16s}" for tool in tools))
    for key in means["ultralytics"]:
        print(f"  {key:24s}" + "".join(f"{means[tool][key]:16.3f}" for tool in tools))
    u = means["ultralytics"]["wall_s"]
    print("\nwall time / Ultralytics' (per round), and the saving's share of yolotune's gain:")
    for tool in variants:
        per_round = " ".join(f"{mine['wall_s'] / theirs['wall_s']:.2f}" for theirs, mine in zip(runs["ultralytics"], runs[tool]))
        line = f"  {tool:16s} {means[tool]['wall_s'] / u:.2f}  ({per_round})"
        if tool != "yolotune" and "yolotune" in means:
            y = means["yolotune"]["wall_s"]
            line += f"  turning it off costs {means[tool]['wall_s'] - y:+.1f} s, {(means[tool]['wall_s'] - y) / (u - y):.0%} of the gain"
        print(line)


def _passthrough(args) -> list:
    return [f"--{k.replace('_', '-')}={v}" for k, v in vars(args).items()
            if k not in ("child", "workdir", "rounds", "seed", "variants") and v is not None]


def trial_workers_written(child: subprocess.Popen, every_s: float = 0.2) -> int:
    """Bytes that the run's trial workers (Ray's ``ray::`` worker processes under ``child``, not its
    agents) handed to write() (/proc's wchar: checkpoints, weights, logs), sampled until ``child``
    ends; a worker's writes after its last sample are missed."""
    import psutil

    written = {}
    while child.poll() is None:
        try:
            processes = psutil.Process(child.pid).children(recursive=True)
        except psutil.NoSuchProcess:
            break
        for process in processes:
            try:
                name = process.cmdline()[0]
                if name.startswith("ray::") and not name.endswith("Agent"):
                    written[process.pid] = process.io_counters().write_chars
            except (psutil.Error, IndexError):  # ended meanwhile
                continue
        time.sleep(every_s)
    child.wait()
    return sum(written.values())


def summarise(trials: list, started: float, ended: float, slots: int, written: int) -> dict:
    """One run's figures from the driver-side trial timings (``trials``: _TrialTimer's records), the
    wall-clock times its process started and ended, and the bytes its trial workers wrote."""
    steady = {}  # validated (1) or not (0) -> the median of the epochs after trials' first
    for kind in (0, 1):
        times = [r["time_this_iter_s"] for t in trials for r in t["results"][1:] if r["validated"] == kind]
        if times:
            steady[kind] = statistics.median(times)
    first_steps, busy = [], 0.0
    for t in trials:
        if not t["results"]:
            continue
        first = t["results"][0]
        first_epoch = steady.get(first["validated"], steady.get(1 - first["validated"], first["time_this_iter_s"]))
        first_epoch = min(first_epoch, first["time_this_iter_s"])
        first_steps.append(first["at"] - first_epoch)
        busy += first_epoch + sum(r["time_this_iter_s"] for r in t["results"][1:])
    results = [r for t in trials for r in t["results"]]
    wall = ended - started
    return {
        "wall_s": wall, "trials": len(trials), "trial_epochs": len(results),
        "to_first_trial_s": min(t["start"] for t in trials) - started,
        "to_first_step_s": min(first_steps) - started,
        "after_last_epoch_s": ended - max(r["at"] for r in results),
        "efficiency": busy / (wall * slots),
        "best_map": max(r[METRIC] for r in results),
        "written_mb_per_epoch": written / 2**20 / len(results),
    }


def run_child(args) -> None:
    """One tuning run of one tool, in this fresh process; writes trials.json."""
    os.environ.setdefault("YOLO_OFFLINE", "1")
    import numpy as np
    from ray import tune

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

        if args.child == "refresh-at-end":
            _refresh_at_the_last_trial_end()
        yolotune.tune(model="yolo11n.yaml", data=data, space=space, grace_period=args.grace_period,
                      iterations=args.iterations, storage=str(args.workdir), name="yolotune",
                      overrides=[f"metric='{METRIC}'", "resources=cpu", *VARIANTS[args.child]], **train)
    (args.workdir / "trials.json").write_text(json.dumps(list(timer.trials.values())))


class _TrialTimer:
    """Driver-side wall times of each trial's start and results."""

    def __init__(self):
        from ray.tune import Callback

        timer = self

        class Hook(Callback):
            def on_trial_start(self, iteration, trials, trial, **info):
                timer.trials[trial.trial_id] = {"start": time.time(), "results": []}

            def on_trial_result(self, iteration, trials, trial, result, **info):
                t = timer.trials[trial.trial_id]
                t["results"].append({"at": time.time(), "time_this_iter_s": result["time_this_iter_s"],
                                     "epoch": result.get("epoch"), METRIC: result.get(METRIC, 0.0),
                                     "validated": int(result.get("validated", 1))})  # Ultralytics: every epoch

        self.trials, self.callback = {}, Hook()


def _refresh_at_the_last_trial_end() -> None:
    """The live view without the trial count (a display-only figure otherwise) refreshes the report
    as every trial ends, the last one too: as before that refresh was cut."""
    from yolotune import console

    init = console.Progress.__init__

    def without_total(self, *args, **kwargs):
        init(self, *args, **kwargs)
        self.total = 0

    console.Progress.__init__ = without_total


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
