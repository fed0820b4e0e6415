"""GPU packing: trial-epochs per minute, GPU and CPU use, against ``gpu_per_trial``.

The reference workload of ANCHORS.md: YOLO11n from scratch, 640 px, batch 32, 1024 synthetic train
images, 3 epochs per trial, 16 trials (FIFO: every trial runs all its epochs). Each configuration
runs as one yolotune experiment in a fresh process, after a warm-up experiment (dataset cache, CUDA
and cuDNN set-up) that is not timed. Throughput comes from the trials' own epoch timestamps
(history.jsonl): trial-epochs between the first and the last epoch end, so Ray's start-up and shut-
down are not counted. Every GPU is sampled by nvidia-smi each second (utilisation, memory, and each
process's memory); CPU use of the whole machine by psutil. An errored trial fails the run (exit 1).

``--quick`` (about 5 minutes on one GPU): 8 trials x 2 epochs at 320 px, gpu_per_trial 1 and 0.25,
placement (which GPU each trial used) and the reused workers' memory per trial.

Without a GPU it says so and exits 0.

    python scripts/bench_gpu.py
    python scripts/bench_gpu.py --quick
    python scripts/bench_gpu.py --fractions 0.25 --trials 8
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import psutil

QUICK = {"fractions": [1, 0.25], "trials": 8, "epochs": 2, "images": 256, "imgsz": 320}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="about 5 minutes on one GPU")
    parser.add_argument("--fractions", type=float, nargs="+", default=[1, 0.5, 0.25, 0.125])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    if args.quick:
        vars(args).update(QUICK)
    gpus = _gpus()
    if not gpus:
        print("No GPU found (nvidia-smi lists none): nothing to measure; exiting.")
        return 0
    print(f"GPUs: {', '.join(gpus)}; {args.trials} trials x {args.epochs} epochs, {args.images} images at "
          f"{args.imgsz} px, batch {args.batch}")
    storage = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    failed = False
    try:
        _experiment(storage, "warmup", args, fraction=1, trials=1, epochs=1)  # not timed
        print(f"{'gpu_per_trial':>13} {'trial-epochs/min':>16} {'GPU util % (each)':>24} {'peak GPU mem GB':>15}"
              f" {'peak mem/process GB':>19} {'CPU util %':>10} {'errored':>7}")
        for fraction in args.fractions:
            sampler = _Sampler(len(gpus))
            exp_dir, returncode = _experiment(storage, f"gpu{fraction:g}", args, fraction, args.trials, args.epochs)
            sampler.stop()
            rows = _history(exp_dir)
            errored = len(list(exp_dir.glob("trial_*/error.txt")))
            failed |= returncode != 0 or errored > 0
            times = [r["timestamp"] for r in rows]
            rate = (len(rows) - 1) / (max(times) - min(times)) * 60 if len(rows) > 1 else float("nan")
            utils = " ".join(f"{u:.0f}" for u in sampler.mean_util())
            print(f"{fraction:>13g} {rate:>16.1f} {utils:>24} {sampler.peak_mem_gb():>15.1f}"
                  f" {sampler.peak_process_mem_gb():>19.2f} {sampler.mean_cpu():>10.0f} {errored:>7}", flush=True)
            _placement_and_memory(rows, sampler)
    finally:
        shutil.rmtree(storage, ignore_errors=True)
    if failed:
        print("FAILED: a run exited non-zero or a trial errored.")
    return 1 if failed else 0


def _experiment(storage: Path, name: str, args, fraction: float, trials: int, epochs: int):
    proc = subprocess.run([
        sys.executable, "-m", "yolotune", f"storage={storage}", f"name={name}", f"iterations={trials}",
        "data=shapes", f"data.train_images={args.images}", f"data.val_images={max(1, args.images // 8)}",
        f"data.imgsz={args.imgsz}", f"data.cache_dir={storage / 'datasets'}", "model=yolo11n-scratch",
        "space=minimal", "scheduler=fifo", f"train.epochs={epochs}", f"train.imgsz={args.imgsz}",
        f"train.batch={args.batch}", f"resources.gpu_per_trial={fraction}"], capture_output=True, text=True)
    if proc.returncode != 0:
        print(f"{name}: exit {proc.returncode}\n{proc.stderr[-2000:]}")
    return storage / name, proc.returncode


def _history(exp_dir: Path) -> list:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from yolotune.layout import read_jsonl

    return [{**row, "trial": d.name} for d in exp_dir.glob("trial_*") for row in read_jsonl(d / "history.jsonl")[0]]


def _placement_and_memory(rows: list, sampler) -> None:
    """Trials per physical GPU, and each reused worker's peak GPU memory in each of its trials, in
    order (a worker whose memory grows trial after trial keeps something of its old trials)."""
    per_gpu = defaultdict(set)
    for row in rows:
        per_gpu[row.get("gpu", "?")].add(row["trial"])
    print("    trials per GPU:", {gpu or "cpu": len(t) for gpu, t in sorted(per_gpu.items())})
    windows = defaultdict(lambda: [float("inf"), 0.0])  # (pid, trial) -> first and last epoch end
    for row in rows:
        w = windows[row["pid"], row["trial"]]
        w[0], w[1] = min(w[0], row["timestamp"] - row["time_this_iter_s"]), max(w[1], row["timestamp"])
    for pid in sorted({pid for pid, _ in windows}):
        peaks = [max((m for t, p, m in sampler.process_mem if p == pid and start <= t <= end), default=0) / 1024
                 for (p, _), (start, end) in sorted(windows.items(), key=lambda kv: kv[1][0]) if p == pid]
        print(f"    worker {pid}: peak GPU GB per trial", [round(m, 2) for m in peaks])


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
            self.gpu.append([[float(v) for v in line.split(",")] for line in _smi(
                "--query-gpu=utilization.gpu,memory.used").splitlines() if line.strip()])
            now = time.time()
            self.process_mem += [(now, int(pid), float(mem)) for pid, mem in (line.split(",") for line in _smi(
                "--query-compute-apps=pid,used_memory").splitlines() if line.strip())]
            self.cpu.append(psutil.cpu_percent())

    def stop(self):
        self._done.set()
        self._thread.join()

    def mean_util(self) -> list:
        return [statistics.mean(s[i][0] for s in self.gpu) if self.gpu else float("nan") for i in range(self.n_gpus)]

    def peak_mem_gb(self) -> float:
        return max((sum(m for _, m in s) for s in self.gpu), default=float("nan")) / 1024

    def peak_process_mem_gb(self) -> float:
        return max((m for _, _, m in self.process_mem), default=float("nan")) / 1024

    def mean_cpu(self) -> float:
        return statistics.mean(self.cpu) if self.cpu else float("nan")


def _smi(query: str) -> str:
    return subprocess.run(["nvidia-smi", query, "--format=csv,noheader,nounits"], capture_output=True,
                          text=True).stdout


if __name__ == "__main__":
    sys.exit(main())
