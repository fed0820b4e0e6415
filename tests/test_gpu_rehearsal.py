"""A GPU rehearsal on the CPU: real sweeps on a Ray head that declares 4 GPUs (none exist here) and 8
CPUs, as a GPU machine's would. A worker hook (fake_gpu_worker.py) lets each trial train on the CPU
while recording what it asked of the GPU; every trial's device, physical GPU, loader workers and
threads are checked against the resource plan.

The cluster lives in a Ray temp dir of the test's own and is stopped by its process group and that
dir (never `ray stop`, which would stop every Ray on the machine).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import time

import pytest
import yaml

from conftest import REPO, ray_temp_dir, run_cli, small_sweep_overrides
from test_cluster import _free_port
from yolotune.layout import read_jsonl, trial_dirname
from yolotune.results import load

pytestmark = pytest.mark.slow

GPUS, CPUS, TRIALS = 4, 8, 4


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
    # 8 CPUs among 4 trials at once: 2 each, one of them for the training loop, one for a loader
    assert plan == {"trials_at_once": TRIALS, "cpu_per_trial": 2, "gpu_per_trial": gpu_per_trial, "loader_workers": 1,
                    "threads": 2, "image_cache_mb_per_trial": 1024 // TRIALS, "max_concurrent_trials": None,
                    "nodes": [{"cpus": CPUS, "gpus": GPUS}]}
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


def test_four_trials_share_one_gpu_a_quarter_each(fake_gpu_head, tmp_path, shapes_cache):
    exp_dir, probes = _sweep(fake_gpu_head, tmp_path, shapes_cache, 0.25)
    gpus = _check_plan_and_trials(exp_dir, probes, 0.25)
    assert len(set(gpus.values())) == 1  # Ray packs the quarters onto one card
