"""GPU packing, yolotune against Ultralytics' ``model.tune(use_ray=True)``: trial-epochs per minute,
GPU utilisation and memory at 1, 2, 4 and 8 trials per GPU.

Both tools get the same call on the same work, each run in a fresh process: YOLO11n from scratch
(yolo11n.yaml), the synthetic shapes dataset written here once (label caches built before any run),
batch 32, the same 5-parameter space (conf/space/minimal.yaml's), ``gpu_per_trial`` = 1 / trials per
GPU, ``grace_period`` = epochs (ASHA stops no trial: every trial runs every epoch), random search,
offline (nothing to download; the AMP check, whose weights are absent, is skipped as Ultralytics does
offline). Each tool then does what it does: yolotune plans the CPUs (a node's CPUs shared among the
trials at once, loader workers from them) and validates at the last epoch only; Ultralytics asks
min(8, cores - 1) CPUs per trial and has no setting for it nor for concurrency, so on 16 cores Ray
would run only 2 of its trials at once: its Ray is told of enough CPUs for the GPU shares alone to
decide (the trials at once are printed, measured).

Figures, from each result as the driver received it (a Ray Tune callback in both tools' Tuner):

- trial-epochs/min, steady: the epochs after each trial's first (whose time includes the trial's
  start-up), over the time during which at least one of them ran;
- trial-epochs/min, end to end: every epoch, over the time from the run's start to its last epoch;
- GPU utilisation (each GPU) while trials train steadily, and peak memory (all GPUs; one process),
  sampled by nvidia-smi each second; the machine's CPU use by psutil.

An errored trial or a failed run makes it exit 1 (a run that ``--budget-min`` stopped is measured as far
as it got, not a failure). Without a GPU it says so and exits 0. yolotune gets the packing asked for
(``cpu_per_trial`` = the machine's CPUs // trials at once), which its own plan would lower where a
trial gets fewer than 4 CPUs.

``--quick`` (about 7 minutes on one H100/H200-class GPU, estimated, not yet measured): one wave of
trials (8, 4, 2, 1 per GPU, the most packed first), 2 epochs, 512 images at 640 px: about
10 s of start-up per process, 20-30 s to the trials' first step, 2-10 s per epoch, 40-70 s a run, 8
runs; ``--budget-min`` (7.5 with --quick) stops a run still going then and skips the rest. Target (YOLO11n,
640 px, 1,024 images): at least 30 trial-epochs per minute; 512 images take half as long an epoch.

    python scripts/bench_gpu.py --quick
    python scripts/bench_gpu.py                       # 16 trials x 3 epochs, 1024 images
    python scripts/bench_gpu.py --per-gpu 4 --trials 8 --tools yolotune
"""

from __future__ import annotations

import argparse
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # this working tree's yolotune, here and (PYTHONPATH) in the runs

from yolotune.layout import read_jsonl  # noqa: E402 - from this working tree

TOOLS = ("yolotune", "ultralytics")
BUDGET_STOP = "stopped at --budget-min"
EVENTS = "epochs.jsonl"  # a run's trial-epochs and errored trials, as its driver saw them
QUICK = {"per_gpu": [8, 4, 2, 1], "trials": 0, "epochs": 2, "images": 512, "imgsz": 640, "budget_min": 7.5}
COLUMNS = [("tool", 11, "s"), ("per GPU", 7, "g"), ("trials", 6, "d"), ("at once", 7, "d"),
           ("t-e/min steady", 14, ".1f"), ("t-e/min e2e", 11, ".1f"), ("GPU util %", 14, "s"),
           ("peak GPU GB", 11, ".1f"), ("GB/process", 10, ".2f"), ("CPU %", 5, ".0f"), ("wall s", 6, ".0f"),
           ("errored", 7, "d")]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 7 minutes on one GPU (see above)")
    parser.add_argument("--per-gpu", type=int, nargs="+", default=[1, 2, 4, 8], help="trials per GPU")
    parser.add_argument("--trials", type=int, default=16, help="trials per run (0: one wave, per GPU x GPUs)")
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1024, help="train images (val: an eighth)")
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--tools", nargs="+", choices=TOOLS, default=list(TOOLS))
    parser.add_argument("--budget-min", type=float, help="minutes: a run still going then is stopped, the rest skipped")
    parser.add_argument("--child", choices=TOOLS, help=argparse.SUPPRESS)
    parser.add_argument("--data", help=argparse.SUPPRESS)
    parser.add_argument("--out", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return run_child(args)
    if args.quick:
        vars(args).update(QUICK)
    gpus = _gpus()
    if not gpus:
        print("No GPU found (nvidia-smi lists none): nothing to measure; exiting.")
        return 0
    started = time.time()
    deadline = started + args.budget_min * 60 if args.budget_min else math.inf
    work = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    failed = False
    try:
        data = _dataset(work, args)
        print(f"GPUs: {', '.join(gpus)}; {args.epochs} epochs, {args.images} images at {args.imgsz} px, batch "
              f"{args.batch}; dataset ready after {time.time() - started:.0f} s")
        print(header(), flush=True)
        for per_gpu in args.per_gpu:
            trials = args.trials or per_gpu * len(gpus)
            for tool in args.tools:
                if time.time() >= deadline:
                    print(f"{tool} at {per_gpu} per GPU: skipped, past --budget-min", flush=True)
                    continue
                m = _measure(tool, per_gpu, trials, len(gpus), data, work, args, deadline)
                failed |= m["failed"] or m["errored"] > 0
                print(row(m), flush=True)
                _placement_and_memory(m["epochs"], m["sampler"])
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.time() - started:.0f} s")
    if failed:
        print("FAILED: a run exited non-zero or timed out, or a trial errored.")
    return 1 if failed else 0


def _dataset(work: Path, args) -> str:
    """The shapes dataset and its label caches, once for every run (trials of a run would race to write them)."""
    from yolotune.data import ShapesDataConfig, build_label_caches, make_shapes

    data = str(make_shapes(ShapesDataConfig(train_images=args.images, val_images=max(1, args.images // 8),
                                            imgsz=args.imgsz, cache_dir=str(work / "datasets"))) / "data.yaml")
    build_label_caches(data)
    return data


def _measure(tool: str, per_gpu: int, trials: int, gpus: int, data: str, work: Path, args, deadline: float) -> dict:
    """One run of ``tool`` in a fresh process, sampled while it runs; its figures."""
    out = work / f"{tool}-{per_gpu}"
    out.mkdir()
    cmd = [sys.executable, __file__, "--child", tool, "--data", data, "--out", str(out), "--per-gpu", str(per_gpu),
           "--trials", str(trials), "--epochs", str(args.epochs), "--imgsz", str(args.imgsz),
           "--batch", str(args.batch)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "YOLO_OFFLINE": "1"}
    sampler = _Sampler(gpus)
    started = time.time()
    with open(out / "run.log", "w") as log:  # its own session: a run past the budget is killed with its Ray
        proc = subprocess.Popen(cmd, cwd=out, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            ending = "exit %d" % proc.wait(timeout=None if deadline == math.inf else max(1.0, deadline - started))
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            ending = BUDGET_STOP
    wall = time.time() - started
    sampler.stop()
    events = read_jsonl(out / EVENTS)[0]
    epochs = [e for e in events if not e.get("errored")]
    if run_failed(ending):
        print(f"{tool} at {per_gpu} per GPU: {ending} after {wall:.0f} s\n"
              f"{(out / 'run.log').read_text()[-2000:]}")
    window = steady_window(epochs)
    return {"tool": tool, "per GPU": per_gpu, "trials": trials, "at once": most_at_once(epochs),
            "t-e/min steady": steady_rate(epochs), "t-e/min e2e": end_to_end_rate(epochs, started),
            "GPU util %": " ".join(f"{u:.0f}" for u in sampler.mean_util(*window)),
            "peak GPU GB": sampler.peak_mem_gb(), "GB/process": sampler.peak_process_mem_gb(),
            "CPU %": sampler.mean_cpu(), "wall s": wall, "errored": len(events) - len(epochs),
            "failed": run_failed(ending),
            "epochs": epochs, "sampler": sampler}


def run_failed(ending: str) -> bool:
    """A run failed when it exited non-zero; one that --budget-min stopped did what it was asked (its
    epochs so far are measured)."""
    return ending not in ("exit 0", BUDGET_STOP)


def _epoch_intervals(epochs: list, steady: bool) -> list:
    """(trial, start, end) of each trial-epoch, from when the driver received it and the trial's time
    for it; ``steady``: without each trial's first epoch, whose time includes the trial's start-up."""
    firsts = {}
    for e in epochs:
        if e["trial"] not in firsts or e["at"] < firsts[e["trial"]]["at"]:
            firsts[e["trial"]] = e
    return [(e["trial"], e["at"] - e["seconds"], e["at"]) for e in epochs
            if not steady or e is not firsts[e["trial"]]]


def steady_rate(epochs: list) -> float:
    """Trial-epochs per minute after each trial's first epoch: their number over the time during
    which at least one of them ran (trials started together end their epochs together: the time
    from the first epoch end to the last would count a whole wave as done in an instant)."""
    intervals = sorted((start, end) for _, start, end in _epoch_intervals(epochs, steady=True))
    covered, reach = 0.0, -math.inf
    for start, end in intervals:
        covered += max(0.0, end - max(start, reach))
        reach = max(reach, end)
    return len(intervals) / covered * 60 if covered else math.nan


def steady_window(epochs: list) -> tuple:
    """From the start of the first steady epoch to the end of the last: when trials train."""
    intervals = _epoch_intervals(epochs, steady=True)
    return (min(s for _, s, _ in intervals), max(e for _, _, e in intervals)) if intervals else (math.nan, math.nan)


def end_to_end_rate(epochs: list, started: float) -> float:
    """Every trial-epoch, over the time from the run's start to its last epoch (start-up included)."""
    return len(epochs) / (max(e["at"] for e in epochs) - started) * 60 if epochs else math.nan


def most_at_once(epochs: list) -> int:
    """The most trials that ran at one moment, each from its first epoch's start to its last epoch's end."""
    spans = defaultdict(lambda: [math.inf, -math.inf])
    for trial, start, end in _epoch_intervals(epochs, steady=False):
        spans[trial] = [min(spans[trial][0], start), max(spans[trial][1], end)]
    # an end before a start at the same moment: trials that only touch did not overlap
    events = sorted([(start, 1) for start, _ in spans.values()] + [(end, -1) for _, end in spans.values()])
    running = most = 0
    for _, change in events:
        running += change
        most = max(most, running)
    return most


def header() -> str:
    return " ".join(f"{name:>{width}}" for name, width, _ in COLUMNS)


def row(measurement: dict) -> str:
    return " ".join(f"{measurement[name]:>{width}{kind}}" for name, width, kind in COLUMNS)


def _placement_and_memory(epochs: list, sampler) -> None:
    """Trials per physical GPU (yolotune records it), and each worker process's peak GPU memory in
    each of its trials, in order (a reused worker whose memory grows trial after trial keeps
    something of its old trials)."""
    per_gpu = defaultdict(set)
    for e in epochs:
        if e["gpu"] is not None:
            per_gpu[e["gpu"]].add(e["trial"])
    if per_gpu:
        print("    trials per GPU:", {gpu or "cpu": len(t) for gpu, t in sorted(per_gpu.items())})
    windows = defaultdict(lambda: [math.inf, -math.inf])  # (pid, trial) -> its first epoch's start, last end
    for e in epochs:
        w = windows[e["pid"], e["trial"]]
        w[0], w[1] = min(w[0], e["at"] - e["seconds"]), max(w[1], e["at"])
    for pid in sorted({pid for pid, _ in windows}):
        peaks = [max((m for t, p, m in sampler.process_mem if p == pid and start <= t <= end), default=0) / 1024
                 for (p, _), (start, end) in sorted(windows.items(), key=lambda kv: kv[1][0]) if p == pid]
        print(f"    worker {pid}: peak GPU GB per trial", [round(m, 2) for m in peaks])


def run_child(args) -> int:
    """One run of one tool (--child TOOL) in this fresh process, the same call for both, its
    trial-epochs and errored trials written as they come (``_EpochTimer``)."""
    import ray
    from bench_vs_ultralytics import _add_callback_to_every_tuner  # a child runs as a script: scripts/ is on its path
    from ray import tune

    space = {"lr0": tune.loguniform(1e-4, 1e-1), "lrf": tune.uniform(0.01, 1.0), "momentum": tune.uniform(0.6, 0.98),
             "weight_decay": tune.uniform(0.0, 0.001), "warmup_epochs": tune.uniform(0.0, 5.0)}
    call = {"data": args.data, "space": space, "gpu_per_trial": 1 / args.per_gpu[0], "iterations": args.trials,
            "grace_period": args.epochs, "epochs": args.epochs, "imgsz": args.imgsz, "batch": args.batch}
    timer = _EpochTimer(args.epochs, args.out / EVENTS)
    _add_callback_to_every_tuner(timer)
    if args.child == "ultralytics":
        from ultralytics import YOLO
        from ultralytics.utils import NUM_THREADS

        # Ultralytics asks NUM_THREADS CPUs per trial: declared for every trial, the GPU shares decide
        ray.init(address="local", num_cpus=max(os.cpu_count(), args.trials * NUM_THREADS), include_dashboard=False,
                 log_to_driver=False)
        YOLO("yolo11n.yaml").tune(use_ray=True, search_alg="random", project=str(args.out), **call)
    else:
        import torch

        import yolotune
        from yolotune.resources import local_cpus

        # The packing asked for, its CPUs shared: yolotune alone would run fewer trials per GPU, to give
        # each trial 4 CPUs (3 loader workers) where the machine has fewer than that for all of them.
        at_once = min(args.trials, args.per_gpu[0] * max(1, torch.cuda.device_count()))
        yolotune.tune(model="yolo11n.yaml", storage=str(args.out), name="yolotune",
                      overrides=[f"resources.cpu_per_trial={max(1, local_cpus() // at_once)}"], **call)
    return 0


class _EpochTimer:
    """Driver-side, appended to ``events`` as they come (a run stopped by the budget keeps its
    figures so far): each trial-epoch (up to ``epochs``; Ultralytics reports its final validation as
    one more) when its result arrived, with the trial's time for it, its process and (yolotune) GPU;
    each trial that errored."""

    def __init__(self, epochs: int, events: Path):
        from ray.tune import Callback

        from yolotune.layout import append_jsonl

        class Hook(Callback):
            def on_trial_result(self, iteration, trials, trial, result, **info):
                if result.get("epoch", 0) <= epochs:
                    append_jsonl(events, {"trial": trial.trial_id, "at": time.time(),
                                          "seconds": result["time_this_iter_s"], "pid": result.get("pid"),
                                          "gpu": result.get("gpu")})

            def on_trial_error(self, iteration, trials, trial, **info):
                append_jsonl(events, {"trial": trial.trial_id, "errored": True})

        self.callback = Hook()


def _gpus() -> list:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


class _Sampler:
    """Samples every GPU's utilisation and memory, each GPU process's memory, and the machine's CPU
    use once a second in a background thread."""

    def __init__(self, n_gpus: int):
        self.n_gpus, self.gpu, self.process_mem, self.cpu = n_gpus, [], [], []
        self._done = threading.Event()
        psutil.cpu_percent()  # starts the interval
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(1.0):
            now = time.time()
            self.gpu.append((now, [[float(v) for v in line.split(",")] for line in _smi(
                "--query-gpu=utilization.gpu,memory.used").splitlines() if line.strip()]))
            self.process_mem += [(now, int(pid), float(mem)) for pid, mem in (line.split(",") for line in _smi(
                "--query-compute-apps=pid,used_memory").splitlines() if line.strip())]
            self.cpu.append(psutil.cpu_percent())

    def stop(self):
        self._done.set()
        self._thread.join()

    def mean_util(self, since: float, until: float) -> list:
        samples = [s for t, s in self.gpu if since <= t <= until]
        return [statistics.mean(s[i][0] for s in samples) if samples else math.nan for i in range(self.n_gpus)]

    def peak_mem_gb(self) -> float:
        return max((sum(m for _, m in s) for _, s in self.gpu), default=math.nan) / 1024

    def peak_process_mem_gb(self) -> float:
        return max((m for _, _, m in self.process_mem), default=math.nan) / 1024

    def mean_cpu(self) -> float:
        return statistics.mean(self.cpu) if self.cpu else math.nan


def _smi(query: str) -> str:
    return subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                          text=True).stdout


if __name__ == "__main__":
    sys.exit(main())
