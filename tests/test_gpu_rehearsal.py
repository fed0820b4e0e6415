"""A GPU rehearsal on the CPU: real sweeps on a Ray head that declares 4 GPUs (none exist here) and 8
CPUs, as a GPU machine's would. A worker hook (fake_gpu_worker.py) lets each trial train on the CPU
while recording what it asked of the GPU; every trial's device, physical GPU, loader workers and
threads are checked against the resource plan. And Ray actors with fractional GPUs on Rays declaring
4 and 8 GPUs, each taking its card as a trial does (gpu_slots.spread): every GPU used, none with more
than ceil(T / G), where Ray's own assignment packs them onto as few cards as it can.

The cluster lives in a Ray temp dir of the test's own and is stopped by its process group and that
dir (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import time
from collections import Counter

import pytest
import yaml

from conftest import REPO, ray_temp_dir, run_cli, small_sweep_overrides
from test_cluster import _free_port
from yolotune import gpu_slots
from yolotune.resources import CUDA_CONTEXT_MB
from yolotune.layout import read_jsonl, trial_dirname
from yolotune.results import load

pytestmark = pytest.mark.slow

GPUS, CPUS, TRIALS, MEMORY_MB = 4, 8, 4, 8192


@pytest.fixture(scope="module")
def fake_gpu_head(tmp_path_factory):
    """A Ray head with GPUS fake GPUs and CPUS CPUs on the loopback, its workers running the hook's
    module from tests/; yields its address and the probe file its workers write."""
    tmp = tmp_path_factory.mktemp("fake-gpus")
    port, probe, log = _free_port(), tmp / "probe.jsonl", tmp / "ray-start.log"
    # OMP_WAIT_POLICY: 8 CPUs' threads on this machine's few cores; torch's OpenMP threads would spin
    # waiting for each other's cores (a trial's epoch took over 50 times as long).
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "FAKE_GPU_PROBE": str(probe), "OMP_WAIT_POLICY": "PASSIVE",
           "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])}
    with ray_temp_dir() as temp_dir:
        head = subprocess.Popen(
            ["ray", "start", "--head", "--port", str(port), "--num-gpus", str(GPUS), "--num-cpus", str(CPUS),
             "--memory", str(MEMORY_MB * 2**20),  # the image cache's budget: an eighth of it
             "--node-ip-address", "127.0.0.1", "--include-dashboard", "false", "--temp-dir", str(temp_dir / "ray"),
             "--disable-usage-stats", "--block"],
            env={**env, "RAY_TMPDIR": str(temp_dir)}, stdout=log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True)
        try:
            deadline = time.time() + 180
            while "Ray runtime started" not in log.read_text():
                assert head.poll() is None and time.time() < deadline, log.read_text()[-3000:]
                time.sleep(1)
            yield f"127.0.0.1:{port}", probe
        finally:
            # Not SIGTERM: the head would wait 30 s to drain through its GCS, which the same signal stops.
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        # leaving ray_temp_dir kills what is left of the cluster (its workers), and nothing else


def _sweep(fake_gpu_head, tmp_path, shapes_cache, gpu_per_trial: float):
    """TRIALS trials of 1 epoch, all at once; returns the experiment dir and each trial's probe records."""
    address, probe = fake_gpu_head
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "rehearsal", iterations=TRIALS, epochs=1)
                 if not o.startswith("scheduler")]
    proc = run_cli(*overrides, "scheduler=fifo", f"ray.address={address}", f"resources.gpu_per_trial={gpu_per_trial}",
                   "+ray.runtime_env.worker_process_setup_hook=fake_gpu_worker.install")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp_dir = tmp_path / "rehearsal"
    records = {}
    for record in map(json.loads, probe.read_text().splitlines()):
        records.setdefault(trial_dirname(record["trial_id"]), []).append(record)
    return exp_dir, {name: records.pop(name, []) for name in (d.name for d in exp_dir.glob("trial_*"))}


def _check_plan_and_trials(exp_dir, probes, gpu_per_trial: float) -> dict:
    """What every rehearsal checks; returns each trial's physical GPU, as its history records it."""
    plan = yaml.safe_load((exp_dir / "plan.yaml").read_text())
    # 8 CPUs among 4 trials at once: 2 each, one of them for the training loop, one for a loader; the
    # estimate of a trial's GPU memory (yolo11n, batch 16, 64 px): the context and a little more
    estimate = plan.pop("gpu_mb_per_trial")
    assert CUDA_CONTEXT_MB < estimate < CUDA_CONTEXT_MB + 200
    assert plan == {"trials_at_once": TRIALS, "cpu_per_trial": 2, "gpu_per_trial": gpu_per_trial, "loader_workers": 1,
                    "threads": 2, "image_cache_mb_per_trial": MEMORY_MB // 8 // TRIALS, "max_concurrent_trials": None,
                    "gpu_memory_mb": None, "nodes": [{"cpus": CPUS, "gpus": GPUS}]}
    results = load(exp_dir)
    assert results.status_counts() == {"TERMINATED": TRIALS}
    assert len(probes) == TRIALS
    gpus, windows = {}, []
    for name, records in probes.items():
        trial_dir = exp_dir / name
        args = yaml.safe_load((trial_dir / "train" / "args.yaml").read_text())
        assert args["device"] == "0" and args["workers"] == plan["loader_workers"]
        (row,) = read_jsonl(trial_dir / "history.jsonl")[0]
        devices = [r for r in records if r["kind"] == "device"]
        # Training, then the final validation of best.pt: each asked for the trial's GPU, device 0 inside it
        assert [r["requested"] for r in devices] == ["0", "0"]
        assert {r["visible"] for r in devices} == {row["gpu"]} and row["gpu"] in {str(i) for i in range(GPUS)}
        training = [r for r in records if r["kind"] == "training"]
        assert training and all(r["threads"] == plan["threads"] and r["loader_workers"] == plan["loader_workers"]
                                for r in training)
        gpus[name] = row["gpu"]
        windows.append((row["timestamp"] - row["time_this_iter_s"], row["timestamp"]))  # set-up and epoch
    assert max(start for start, _ in windows) < min(end for _, end in windows)  # all trials ran at once
    assert dict(zip(results.dataframe()["trial_id"].map(trial_dirname), results.dataframe()["gpu"])) == gpus
    return gpus


def test_four_trials_at_a_quarter_each_use_all_four_gpus(fake_gpu_head, tmp_path, shapes_cache):
    exp_dir, probes = _sweep(fake_gpu_head, tmp_path, shapes_cache, 0.25)
    gpus = _check_plan_and_trials(exp_dir, probes, 0.25)
    assert sorted(gpus.values()) == ["0", "1", "2", "3"]  # Ray alone packs the quarters onto one card


def _cards(num_gpus: int, actors: int, share: float) -> tuple:
    """The card each of ``actors`` actors at ``share`` of a GPU got from Ray, and the one it trains on
    after gpu_slots.spread, all alive at once on a Ray declaring ``num_gpus`` GPUs."""
    import ray

    @ray.remote(num_cpus=0, num_gpus=share)
    class Trial:
        def card(self):
            ray_gave = os.environ["CUDA_VISIBLE_DEVICES"]
            gpu_slots.spread(share)
            return ray_gave, os.environ["CUDA_VISIBLE_DEVICES"]

    ray.init(address="local", num_cpus=1, num_gpus=num_gpus, include_dashboard=False, log_to_driver=False)
    try:
        trials = [Trial.remote() for _ in range(actors)]
        cards = ray.get([t.card.remote() for t in trials])
    finally:
        ray.shutdown()
    return Counter(ray_gave for ray_gave, _ in cards), Counter(ours for _, ours in cards)


@pytest.mark.parametrize("num_gpus,actors,share", [(4, 6, 0.5), (8, 12, 0.5), (8, 8, 0.25)])
def test_trials_take_every_gpu_before_sharing_one(num_gpus, actors, share):
    ray_alone, spread = _cards(num_gpus, actors, share)
    assert len(ray_alone) < num_gpus  # what Ray's best fit does on its own: idle cards, others shared
    assert sorted(spread) == [str(i) for i in range(num_gpus)]  # every GPU used
    assert max(spread.values()) == math.ceil(actors / num_gpus) and min(spread.values()) == actors // num_gpus
