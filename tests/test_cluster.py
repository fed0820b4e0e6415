"""Scale out: a real 2-node Ray cluster on this machine (loopback), started and stopped by the test,
and a private Ray that never joins a cluster recorded on the machine.

The cluster lives in a Ray temp dir of its own; the tests end its processes and no other Ray.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path

import pandas as pd
import pytest

from conftest import processes_under, ray_temp_dir, run_cli, small_sweep_overrides
from yolotune.data import ShapesDataConfig, make_shapes

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True).returncode == 0


@pytest.fixture(scope="module")
def two_node_cluster():
    """A head and a worker node, 1 CPU each. The worker node runs in a mount namespace of its own where
    ``hidden/`` under the cluster's temp dir is an empty tmpfs: files there exist on the head node only."""
    if not _can_unshare():
        pytest.skip("needs `unshare --mount` (root) to hide a folder from the worker node")
    port = _free_port()
    with ray_temp_dir() as temp_dir:
        hidden = temp_dir / "hidden"
        hidden.mkdir()
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(temp_dir)}
        common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        head = subprocess.run(["ray", "start", "--head", "--port", str(port), "--include-dashboard", "false",
                               "--temp-dir", str(temp_dir / "ray"), *common],
                              env=env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stderr
        worker_start = f"mount -t tmpfs none {hidden} && exec ray start --address 127.0.0.1:{port} {' '.join(common)}"
        worker = subprocess.run(["unshare", "--mount", "sh", "-c", worker_start],
                                env=env, capture_output=True, text=True, timeout=180)
        assert worker.returncode == 0, worker.stderr
        yield f"127.0.0.1:{port}", temp_dir
        # leaving ray_temp_dir kills the cluster's processes (only those) even when a test failed


def _cluster_overrides(storage, shapes_cache, name, address, iterations, data_yaml=None):
    overrides = small_sweep_overrides(storage, shapes_cache, name, iterations=iterations, epochs=1)
    overrides = [o for o in overrides if not o.startswith("scheduler")] + [
        "scheduler=fifo", f"ray.address={address}", "resources.cpu_per_trial=1"]
    if data_yaml:
        overrides = [o for o in overrides if not o.startswith("data")] + ["data=coco8", f"data.yaml={data_yaml}"]
    return overrides


def _cluster_processes(temp_dir, name: str) -> int:
    """How many of the cluster's processes run the executable ``name``."""
    count = 0
    for pid in processes_under(temp_dir):
        try:
            count += Path(Path(f"/proc/{pid}/cmdline").read_text().split("\0")[0]).name == name
        except OSError:
            continue
    return count


def test_sweep_runs_on_both_nodes_of_an_existing_cluster(two_node_cluster, tmp_path, shapes_cache):
    address, temp_dir = two_node_cluster
    proc = run_cli(*_cluster_overrides(tmp_path / "storage", shapes_cache, "cluster", address, iterations=4))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp_dir = tmp_path / "storage" / "cluster"
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 4 and (trials["status"] == "TERMINATED").all()
    assert trials["node_id"].nunique() == 2  # each node ran trials
    assert len(list(exp_dir.glob("trial_*/result.json"))) == 4 and (exp_dir / "best.pt").is_file()
    # yolotune connected to the cluster; it neither started nor stopped it
    assert _cluster_processes(temp_dir, "raylet") == 2 and _cluster_processes(temp_dir, "gcs_server") == 1


def test_data_missing_on_a_node_is_refused_before_any_trial(two_node_cluster, tmp_path, shapes_cache):
    """The driver (on the head node) reads the dataset; the worker node cannot: one line naming the path."""
    address, temp_dir = two_node_cluster
    data_yaml = make_shapes(ShapesDataConfig(train_images=4, val_images=2, imgsz=64,
                                             cache_dir=str(temp_dir / "hidden"))) / "data.yaml"
    proc = run_cli(*_cluster_overrides(tmp_path, shapes_cache, "hidden", address, iterations=1, data_yaml=data_yaml))
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    last = proc.stderr.strip().splitlines()[-1]  # after Ray's lines about connecting to the cluster
    assert last.startswith(f"yolotune: error: data.yaml={data_yaml}: not readable on node "), proc.stderr
    assert not (tmp_path / "hidden").exists()  # nothing started, nothing written


def test_a_private_ray_never_joins_a_recorded_cluster(tmp_path, shapes_cache):
    """`ray start` records its cluster's address in the Ray temp dir, and users export RAY_ADDRESS;
    ray.address=null must start a private Ray anyway, at once, instead of trying a cluster that is gone."""
    dead = f"127.0.0.1:{_free_port()}"  # nobody listens
    with ray_temp_dir() as ray_tmp:
        (ray_tmp / "ray").mkdir()
        (ray_tmp / "ray" / "ray_current_cluster").write_text(dead + "\n")
        overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "private", iterations=1, epochs=1)
                     if not o.startswith("scheduler")] + ["scheduler=fifo"]
        proc = run_cli(*overrides, env={"RAY_TMPDIR": str(ray_tmp), "RAY_ADDRESS": dead}, timeout=600)
    # joining the dead address would have failed the run (after Ray's connection retries)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert list(pd.read_csv(tmp_path / "private" / "trials.csv")["status"]) == ["TERMINATED"]
