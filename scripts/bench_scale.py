"""How yolotune scales to thousands of trials: reading, importance, the live refresh and disk.

Builds experiments of 100, 500 and 2,000 trials in yolotune's own format (.hydra/config.yaml,
trials.jsonl, each trial's history.jsonl, train/args.yaml and weights) from a real small one (``--from``:
its saved config, its history rows' keys and fixed values, its trials' args.yaml), shaped like a day's sweep:
the default space's 22 parameters, ASHA deciding at 10, 30 and 90 of 100 epochs (reduction 3),
validation at those epochs only, about 2 % errored trials, the metric decided mostly by lr0. Then
times, each in a fresh process pinned to one core (wall and CPU seconds):

- ``yolotune results EXP`` (table), ``--format json``, ``--format csv``, ``--top 10``
- importance alone, ``load()`` + ``dataframe()``
- one live refresh (what the driver's report thread runs after a trial ends: ``report.live_refresh``,
  which prunes weights by ``checkpoint.keep`` and rewrites the report; before it, ``write_all_at``)

and prints the experiment's size, report.html's size and the weights a stopped trial keeps.

    python -m yolotune experiment=quickstart name=small   # the real small experiment, about a minute
    python scripts/bench_scale.py --from runs/tune/small    # 100, 500, 2000 trials; about 10 minutes
    python scripts/bench_scale.py --sizes 100 --code /work/main   # another checkout's yolotune ("before")

``--code`` times that checkout's yolotune on the same experiments (its PYTHONPATH); the
experiments are built once per size under ``--out`` and reused.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import yaml

REPO = Path(__file__).resolve().parents[1]
METRIC = "metrics/mAP50-95(B)"
EPOCHS, RUNGS, REDUCTION = 100, (10, 30, 90), 3
ERRORED = 0.02
WEIGHTS_MB = 1.0  # each weights file the builder writes (a YOLO11n last.pt with its optimizer is ~10 MiB)
LOSSES = ("train/box_loss", "train/cls_loss", "train/dfl_loss")
VAL = ("metrics/precision(B)", "metrics/recall(B)", "metrics/mAP50(B)", METRIC,
       "val/box_loss", "val/cls_loss", "val/dfl_loss", "fitness")


def space() -> dict:
    return yaml.safe_load((REPO / "conf" / "space" / "default.yaml").read_text())


def saved_config(trials: int, real: Optional[dict] = None) -> dict:
    """.hydra/config.yaml as the runner writes it (experiment.save_config): the real experiment's (or a
    minimal one), with the day's sweep's size, space, epochs and ASHA rungs."""
    config = real or {"defaults": [{"hydra": "yolotune"}, "_self_"], "hydra": {"searchpath": ["pkg://yolotune.conf"]},
                      "storage": "runs/tune", "seed": 0, "resume": False, "resume_errored": False,
                      "model": {"weights": "yolo11n.yaml"}, "search": {"type": "random"},
                      "data": {"yaml": "/data/coco128.yaml"}, "train": {"imgsz": 640, "batch": 16}}
    return {**config, "name": "scale", "iterations": trials, "metric": METRIC, "mode": "max", "space": space(),
            "train": {**config["train"], "epochs": EPOCHS},
            "scheduler": {"type": "asha", "grace_period": RUNGS[0], "reduction_factor": REDUCTION}}


def real_experiment(path: Optional[Path]) -> dict:
    """What a real experiment gives the built ones: its saved config, the fixed values of its history rows
    (where the trial ran, its learning rates, batch: all but the losses, metrics, epoch and times), a
    trial's train/args.yaml, and the size of a trial's weights files."""
    if path is None:
        return {"config": None, "row": {"lr/pg0": 0.01, "lr/pg1": 0.01, "lr/pg2": 0.01, "trained_batch": 16,
                                        "hostname": "node-a", "node_id": "abc123", "pid": 42},
                "args": {"data": "/data/coco128.yaml"}, "weights_mb": None}
    trial = max(path.glob("trial_*"), key=lambda d: len((d / "history.jsonl").read_text().splitlines()))
    row = json.loads((trial / "history.jsonl").read_text().splitlines()[-1])
    varying = {"epoch", "validated", "gpu", "timestamp", "time_this_iter_s", *LOSSES, *VAL}
    last = max(trial.glob("checkpoint_*/last.pt"))
    return {"config": yaml.safe_load((path / ".hydra" / "config.yaml").read_text()),
            "row": {k: v for k, v in row.items() if k not in varying and not k.startswith(("metrics/", "val/"))},
            "args": yaml.safe_load((trial / "train" / "args.yaml").read_text()),
            "weights_mb": last.stat().st_size / 2**20}


def sample(dist: dict, rng: random.Random) -> float:
    return rng.uniform(dist["low"], dist["high"])


def build(exp_dir: Path, trials: int, seed: int = 0, weights_mb: float = WEIGHTS_MB,
          real: Optional[Path] = None) -> Path:
    """An experiment of ``trials`` ended trials in the format of ``real`` (a real experiment: see
    ``real_experiment``; None: a minimal one), and weights files as yolotune kept them before
    checkpoint.keep: the checkpoint's last.pt, Ultralytics' best.pt and best_by_metric.pt, each
    ``weights_mb``."""
    rng = random.Random(seed)
    dists, template = space(), real_experiment(real)
    (exp_dir / ".hydra").mkdir(parents=True)
    (exp_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved_config(trials, template["config"]),
                                                                  sort_keys=False))
    configs = [{name: sample(d, rng) for name, d in dists.items()} for _ in range(trials)]
    # ASHA: the top third by the metric at each rung goes on; the score is mostly lr0's (near 0.01 best).
    score = [-(math.log10(c["lr0"]) + 2) ** 2 + 0.3 * c["mosaic"] + rng.gauss(0, 0.1) for c in configs]
    order = sorted(range(trials), key=lambda i: -score[i])
    reached = [RUNGS[0]] * trials
    for rung, nxt in zip(RUNGS, (*RUNGS[1:], EPOCHS)):
        keep = max(1, len([i for i in order if reached[i] >= rung]) // REDUCTION)
        for i in [i for i in order if reached[i] >= rung][:keep]:
            reached[i] = nxt
    events, blob = [], os.urandom(int(weights_mb * 2**20))
    for n, config in enumerate(configs):
        trial_id = f"{n:05d}"
        trial_dir = exp_dir / f"trial_{trial_id}"
        errored = rng.random() < ERRORED
        epochs = rng.randint(1, reached[n]) if errored else reached[n]
        events.append({"trial_id": trial_id, "event": "started", "status": "RUNNING", "time": 1000.0 + n,
                       "config": config})
        rows, t = [], 1000.0 + 60 * n
        for epoch in range(1, epochs + 1):
            t += 60
            row = {"epoch": epoch, **{k: 2.0 - epoch / 100 + rng.gauss(0, 0.05) for k in LOSSES}, **template["row"]}
            validated = epoch in (*RUNGS, EPOCHS)
            if validated:
                m = max(0.0, 0.5 + 0.08 * score[n] + 0.1 * math.log(epoch) / math.log(EPOCHS) + rng.gauss(0, 0.01))
                row.update({k: m * 1.3 if "50(" in k else m for k in VAL if k not in ("val/box_loss", "val/cls_loss",
                                                                                   "val/dfl_loss")})
                row.update({k: 1.5 - m for k in ("val/box_loss", "val/cls_loss", "val/dfl_loss")})
            row.update(validated=int(validated), gpu=str(n % 8), timestamp=t, time_this_iter_s=60.0)
            rows.append(row)
        (trial_dir / "train" / "weights").mkdir(parents=True)
        (trial_dir / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        own = {"project": str(trial_dir), "save_dir": str(trial_dir / "train")}  # where this trial ran
        (trial_dir / "train" / "args.yaml").write_text(yaml.safe_dump(
            {**template["args"], **config, **{k: v for k, v in own.items() if k in template["args"]}}))
        checkpoint = trial_dir / f"checkpoint_{epochs - 1:06d}"
        checkpoint.mkdir()
        for weights in (checkpoint / "last.pt", trial_dir / "train" / "weights" / "best.pt",
                        trial_dir / "train" / "weights" / "best_by_metric.pt"):
            weights.write_bytes(blob)
        if errored:
            error = "RuntimeError: CUDA error: an illegal memory access was encountered"
            (trial_dir / "error.txt").write_text(f"Failure # 1\nTraceback\n  x\n{error}\n")
            events.append({"trial_id": trial_id, "event": "errored", "status": "ERROR", "time": t,
                           "error": error, "error_file": str(trial_dir / "error.txt")})
        else:
            events.append({"trial_id": trial_id, "event": "completed", "status": "TERMINATED", "time": t})
    (exp_dir / "trials.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    return exp_dir


# What each measurement runs, in a fresh process: (name, argv after python).
def commands(exp: Path) -> list:
    python = ["-c"]
    return [
        ("results (table)", ["-m", "yolotune", "results", str(exp)]),
        ("results --format json", ["-m", "yolotune", "results", str(exp), "--format", "json"]),
        ("results --format csv", ["-m", "yolotune", "results", str(exp), "--format", "csv"]),
        ("results --top 10", ["-m", "yolotune", "results", str(exp), "--top", "10"]),
        ("importance alone", python + [
            "import time; from yolotune.results import load; from yolotune.importance import importance; "
            f"r = load({str(exp)!r}); r.dataframe(); t = time.process_time(); importance(r); "
            "print('CPU', time.process_time() - t)"]),
        ("load() + dataframe()", python + [
            "import time; t = time.process_time(); from yolotune.results import load; "
            f"load({str(exp)!r}).dataframe(); print('CPU', time.process_time() - t)"]),
        ("live refresh", python + [
            "import time, yolotune.report as r; t = time.process_time(); "  # write_all_at: a checkout from before
            f"(r.live_refresh if hasattr(r, 'live_refresh') else r.write_all_at)({str(exp)!r}); "
            "print('CPU', time.process_time() - t)"]),
    ]


def measure(argv: list, code: Path) -> tuple:
    """(wall s, CPU s of the process, CPU s of the timed part if it printed one) on one core."""
    env = {**os.environ, "PYTHONPATH": str(code), "YOLO_OFFLINE": "1", "MPLBACKEND": "Agg"}
    pin = ["taskset", "-c", "0"] if shutil.which("taskset") else []
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([*pin, sys.executable, *argv], env=env, capture_output=True, text=True, cwd=code)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode:
        raise SystemExit(f"{' '.join(argv)}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    part = [float(line.split()[1]) for line in proc.stdout.splitlines() if line.startswith("CPU ")]
    cpu = after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime
    return wall, cpu, part[0] if part else None


def size_of(path: Path, suffix: str = "") -> int:
    return sum(p.stat().st_size for p in path.rglob(f"*{suffix}") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[100, 500, 2000])
    parser.add_argument("--from", dest="real", type=Path, help="a real small experiment to build them from")
    parser.add_argument("--code", type=Path, default=REPO, help="the checkout whose yolotune is timed")
    parser.add_argument("--out", type=Path, default=Path("runs/bench_scale"))
    args = parser.parse_args()
    print(f"code: {args.code} ({subprocess.run(['git', 'log', '-1', '--format=%h %s'], cwd=args.code, capture_output=True, text=True).stdout.strip()[:70]})")
    print(f"load average: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")
    real_mb = real_experiment(args.real)["weights_mb"]
    if real_mb:
        print(f"built from {args.real}: a trial's last.pt is {real_mb:.1f} MiB there (the built ones: {WEIGHTS_MB} MiB)")
    for trials in args.sizes:
        pristine = args.out / f"built_{trials}"
        if not pristine.is_dir():
            build(pristine / "scale", trials, real=args.real)
        exp = args.out / f"timed_{trials}" / "scale"
        shutil.rmtree(exp.parent, ignore_errors=True)
        shutil.copytree(pristine, exp.parent)
        small = size_of(exp) - size_of(exp, ".pt")
        print(f"\n{trials} trials: {small / 2**20:.1f} MiB without weights "
              f"({small / trials / 1024:.1f} KiB a trial), weights {size_of(exp, '.pt') / trials / 2**20:.1f} "
              f"x WEIGHTS_MB={WEIGHTS_MB} per trial as built")
        print(f"  {'what':<24} {'wall s':>8} {'CPU s':>8} {'timed part CPU s':>17}")
        for name, argv in commands(exp):
            wall, cpu, part = measure(argv, args.code)
            print(f"  {name:<24} {wall:8.1f} {cpu:8.1f} {'' if part is None else f'{part:17.1f}'}", flush=True)
        report = exp / "report.html"
        print(f"  report.html: {report.stat().st_size / 2**20:.1f} MiB" if report.is_file() else "  report.html: none")
        if (args.code / "yolotune" / "retention.py").is_file():
            disk(exp, size_of(pristine, ".pt"), args.code)


def disk(exp: Path, before: int, code: Path) -> None:
    """The weights the experiment keeps after checkpoint.keep's pruning (the default, 10; the live
    refresh timed above pruned already, so this one finds nothing left to delete), against ``before``."""
    wall, cpu, _ = measure(["-c", "from yolotune import retention; from yolotune.results import load; "
                            "from yolotune.storage import Location; "
                            f"r = load({str(exp)!r}); retention.prune(r, Location({str(exp)!r}), 10)"], code)
    kept = [d for d in exp.glob("trial_*") if any(d.rglob("*.pt"))]
    stopped = [d for d in exp.glob("trial_*") if d not in kept]
    per_stopped = sum(size_of(d) for d in stopped) / max(len(stopped), 1)
    print(f"  checkpoint.keep=10 ({cpu:.1f} s CPU): weights {before / 2**20:.0f} -> {size_of(exp, '.pt') / 2**20:.0f} "
          f"MiB as built; {len(kept)} trials keep weights (10 best ended + errored); a pruned trial keeps "
          f"{per_stopped / 1024:.1f} KiB (history, config)")


if __name__ == "__main__":
    main()
