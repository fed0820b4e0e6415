"""GPU packing: trial-epochs per minute and GPU utilisation against ``gpu_per_trial``.

The reference workload of ANCHORS.md: YOLO11n from scratch, 640 px, batch 32, 1024 synthetic
train images, 3 epochs per trial, 16 trials (FIFO: every trial runs all its epochs). For each
``gpu_per_trial`` in {1, 0.5, 0.25, 0.125} it runs one yolotune experiment in a fresh process and
samples ``nvidia-smi`` every second. Target on an H100: >= 30 trial-epochs/min at > 85 % mean
utilisation. Without a GPU it says so and exits 0.

    python scripts/bench_gpu.py
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
from pathlib import Path


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--fractions", type=float, nargs="+", default=[1, 0.5, 0.25, 0.125])
    parser.add_argument("--trials", type=int, default=16)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--images", type=int, default=1024)
    parser.add_argument("--imgsz", type=int, default=640)
    parser.add_argument("--batch", type=int, default=32)
    args = parser.parse_args()
    gpus = _gpus()
    if not gpus:
        print("No GPU found (nvidia-smi lists none): nothing to measure.")
        return 0
    print(f"GPU: {gpus[0]}; {args.trials} trials x {args.epochs} epochs, {args.images} images at {args.imgsz} px, "
          f"batch {args.batch}")
    storage = Path(tempfile.mkdtemp(prefix="bench-gpu-"))
    print(f"{'gpu_per_trial':>13} {'trials at once':>14} {'wall s':>8} {'trial-epochs/min':>17} {'mean GPU util %':>16}"
          f" {'peak GPU mem GB':>16}")
    for fraction in args.fractions:
        sampler = _Sampler()
        start = time.perf_counter()
        proc = subprocess.run([
            sys.executable, "-m", "yolotune", f"storage={storage}", f"name=gpu{fraction}", f"iterations={args.trials}",
            "data=shapes", f"data.train_images={args.images}", f"data.val_images={args.images // 8}",
            f"data.imgsz={args.imgsz}", f"data.cache_dir={storage / 'datasets'}", "model=yolo11n-scratch",
            "space=minimal", "scheduler=fifo", f"train.epochs={args.epochs}", f"train.imgsz={args.imgsz}",
            f"train.batch={args.batch}", f"resources.gpu_per_trial={fraction}"], capture_output=True, text=True)
        wall = time.perf_counter() - start
        sampler.stop()
        if proc.returncode != 0:
            print(f"gpu_per_trial={fraction}: run failed\n{proc.stderr[-2000:]}")
            continue
        epochs = sum(len(p.read_text().splitlines()) for p in (storage / f"gpu{fraction}").glob("trial_*/result.json"))
        print(f"{fraction:>13g} {int(1 / fraction) if fraction <= 1 else 1:>14} {wall:>8.1f} {epochs / wall * 60:>17.1f}"
              f" {sampler.mean_util():>16.1f} {sampler.peak_mem_gb():>16.1f}", flush=True)
    shutil.rmtree(storage, ignore_errors=True)
    return 0


def _gpus() -> list:
    if shutil.which("nvidia-smi") is None:
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=name", "--format=csv,noheader"], capture_output=True, text=True)
    return [line for line in out.stdout.splitlines() if line.strip()] if out.returncode == 0 else []


class _Sampler:
    """Samples GPU 0's utilisation and memory once a second in a background thread."""

    def __init__(self):
        self.samples, self._done = [], threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._done.wait(1.0):
            out = subprocess.run(["nvidia-smi", "-i", "0", "--query-gpu=utilization.gpu,memory.used",
                                  "--format=csv,noheader,nounits"], capture_output=True, text=True).stdout
            util, mem = (float(v) for v in out.strip().split(","))
            self.samples.append((util, mem))

    def stop(self):
        self._done.set()
        self._thread.join()

    def mean_util(self) -> float:
        return statistics.mean(u for u, _ in self.samples) if self.samples else float("nan")

    def peak_mem_gb(self) -> float:
        return max((m for _, m in self.samples), default=float("nan")) / 1024


if __name__ == "__main__":
    sys.exit(main())
