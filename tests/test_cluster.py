"""Scale out: a real 2-node Ray cluster on this machine (loopback), started and stopped by the test."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile

import pandas as pd
import pytest

from conftest import run_cli, small_sweep_overrides

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ray(*args, env):
    return subprocess.run(["ray", *args], env=env, capture_output=True, text=True, timeout=180)


def _ray_processes() -> str:
    return subprocess.run(["pgrep", "-af", "raylet|gcs_server"], capture_output=True, text=True).stdout


@pytest.fixture
def two_node_cluster():
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
    try:
        head = _ray("start", "--head", "--port", str(port), "--include-dashboard", "false",
                    "--temp-dir", temp_dir, *common, env=env)
        assert head.returncode == 0, head.stderr
        worker = _ray("start", "--address", f"127.0.0.1:{port}", *common, env=env)
        assert worker.returncode == 0, worker.stderr
        yield f"127.0.0.1:{port}"
    finally:
        _ray("stop", "--force", env=env)  # even when the test fails
        shutil.rmtree(temp_dir, ignore_errors=True)


def test_sweep_runs_on_both_nodes_of_an_existing_cluster(two_node_cluster, tmp_path, shapes_cache):
    overrides = small_sweep_overrides(tmp_path / "storage", shapes_cache, "cluster", iterations=4, epochs=1)
    overrides = [o for o in overrides if not o.startswith("scheduler")] + [
        "scheduler=fifo", f"ray.address={two_node_cluster}", "resources.cpu_per_trial=1"]
    proc = run_cli(*overrides)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp_dir = tmp_path / "storage" / "cluster"
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "TERMINATED").all()
    assert trials["node_id"].nunique() == 2  # each node ran trials
    assert len(list(exp_dir.glob("trial_*/result.json"))) == 4 and (exp_dir / "best.pt").is_file()
    # yolotune connected to the cluster; it neither started nor stopped it
    assert "raylet" in _ray_processes()


def test_no_ray_processes_left():
    assert "raylet" not in _ray_processes() and "gcs_server" not in _ray_processes()
