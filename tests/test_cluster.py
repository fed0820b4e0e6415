"""Scale out: a real 2-node Ray cluster on this machine (loopback), started and stopped by the test,
and a private Ray that never joins a cluster recorded on the machine.

The cluster lives in a Ray temp dir of its own; the tests end its processes and no other Ray.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from conftest import REPO, processes_under, ray_temp_dir, run_cli, small_sweep_overrides
from yolotune.data import ShapesDataConfig, make_shapes
from yolotune.layout import HISTORY, read_jsonl

pytestmark = pytest.mark.slow


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _can_unshare() -> bool:
    return shutil.which("unshare") is not None and subprocess.run(
        ["unshare", "--mount", "true"], capture_output=True).returncode == 0


class Cluster:
    """A head and a worker node, 1 CPU each. The worker node runs in a mount namespace of its own where
    ``hidden/`` under the cluster's temp dir is an empty tmpfs: files there exist on the head node only."""

    def __init__(self, temp_dir: Path):
        self.temp_dir, self.port = temp_dir, _free_port()
        self.address = f"127.0.0.1:{self.port}"
        # A node that stops answering is declared dead after ~2 s instead of Ray's ~30 s (the node-loss test)
        self.env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "RAY_TMPDIR": str(temp_dir),
                    "RAY_health_check_initial_delay_ms": "1000", "RAY_health_check_period_ms": "500",
                    "RAY_health_check_timeout_ms": "500", "RAY_health_check_failure_threshold": "3"}
        self.common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats"]
        (temp_dir / "hidden").mkdir()
        head = subprocess.run(["ray", "start", "--head", "--port", str(self.port), "--include-dashboard", "false",
                               "--temp-dir", str(temp_dir / "ray"), *self.common],
                              env=self.env, capture_output=True, text=True, timeout=180)
        assert head.returncode == 0, head.stderr
        self.start_worker()

    def start_worker(self) -> None:
        start = (f"mount -t tmpfs none {self.temp_dir / 'hidden'} && "
                 f"exec ray start --address {self.address} {' '.join(self.common)}")
        worker = subprocess.run(["unshare", "--mount", "sh", "-c", start],
                                env=self.env, capture_output=True, text=True, timeout=180)
        assert worker.returncode == 0, worker.stderr

    def worker_processes(self) -> set:
        """The worker node's processes (raylet, its Ray workers, agents): those in another mount namespace."""
        ours = os.readlink("/proc/self/ns/mnt")
        found = set()
        for pid in processes_under(self.temp_dir):
            with contextlib.suppress(OSError):
                if os.readlink(f"/proc/{pid}/ns/mnt") != ours:
                    found.add(pid)
        return found

    def lose_worker_node(self) -> None:
        """The worker node crashes: every process of it SIGKILLed at once."""
        for pid in self.worker_processes():
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


@pytest.fixture(scope="module")
def two_node_cluster():
    if not _can_unshare():
        pytest.skip("needs `unshare --mount` (root) to hide a folder from the worker node")
    with ray_temp_dir() as temp_dir:
        yield Cluster(temp_dir)
        # leaving ray_temp_dir kills the cluster's processes (only those) even when a test failed


def _cluster_overrides(storage, shapes_cache, name, address, iterations, epochs=1, data_yaml=None):
    overrides = small_sweep_overrides(storage, shapes_cache, name, iterations=iterations, epochs=epochs)
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


def _history(trial_dir: Path) -> list:
    return read_jsonl(trial_dir / HISTORY)[0]


def test_a_sweep_on_both_nodes_goes_on_when_one_is_lost(two_node_cluster, tmp_path, shapes_cache):
    """Two 3-epoch trials on an existing 2-node cluster, one on each node. The worker node crashes (all its
    processes SIGKILLed) after its trial's second epoch: that trial is retried from its checkpoint on the head
    node (failure.max_failures) and finishes there; the console and trials.jsonl say which node was lost
    and where the trial went on."""
    cluster = two_node_cluster
    exp_dir = tmp_path / "storage" / "cluster"
    overrides = _cluster_overrides(tmp_path / "storage", shapes_cache, "cluster", cluster.address, iterations=2,
                                   epochs=3)
    with ray_temp_dir() as ray_tmp:
        proc = subprocess.Popen([sys.executable, "-m", "yolotune", *overrides], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})
        try:
            deadline, lost = time.time() + 300, None
            while lost is None:  # the trial whose second epoch ran on the worker node
                assert time.time() < deadline and proc.poll() is None, proc.stdout.read()[-3000:]
                on_worker = cluster.worker_processes()
                lost = next((d for d in exp_dir.glob("trial_*")
                             if [r["pid"] in on_worker for r in _history(d)] == [True, True]), None)
                time.sleep(0.2)
            lost_at = time.time()
            cluster.lose_worker_node()
            out, _ = proc.communicate(timeout=600)
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            if not cluster.worker_processes():
                cluster.start_worker()  # the other tests' worker node
    assert proc.returncode == 0, out[-5000:]
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 2 and (trials["status"] == "TERMINATED").all()
    assert len(list(exp_dir.glob("trial_*/result.json"))) == 2 and (exp_dir / "best.pt").is_file()

    rows = _history(lost)
    epochs = [r["epoch"] for r in rows]
    # continuous: epochs 1-3 in order (not from scratch), none skipped, at most the one in progress trained again
    assert sorted(set(epochs)) == [1, 2, 3] and len(epochs) <= 4, epochs
    assert all(earlier <= later <= earlier + 1 for earlier, later in zip(epochs, epochs[1:])), epochs
    lost_node, head_node = rows[0]["node_id"], rows[-1]["node_id"]
    assert lost_node != head_node  # it finished on the head node, as the other trial did
    assert {r["node_id"] for d in exp_dir.glob("trial_*") for r in _history(d)} == {lost_node, head_node}

    events = [e for e in read_jsonl(exp_dir / "trials.jsonl")[0] if e["trial_id"] == lost.name.removeprefix("trial_")]
    retried, went_on = [e for e in events if e["event"] in ("retried", "went_on")]
    assert retried["node"]["node_id"] == lost_node and retried["retry"] == 1, retried
    assert went_on["node"]["node_id"] == head_node, went_on
    assert f"lost its worker on {retried['node']['hostname']} (node {lost_node[:8]})" in out, out[-5000:]
    assert f"goes on on {went_on['node']['hostname']} (node {head_node[:8]})" in out, out[-5000:]
    print(f"node lost after epoch 2, retried {retried['time'] - lost_at:.1f}s later, "
          f"went on {went_on['time'] - lost_at:.1f}s later, epochs {epochs}")
    # yolotune connected to the cluster; it neither started nor stopped it (the head's processes still run)
    assert _cluster_processes(cluster.temp_dir, "gcs_server") == 1


def test_data_missing_on_a_node_is_refused_before_any_trial(two_node_cluster, tmp_path, shapes_cache):
    """The driver (on the head node) reads the dataset; the worker node cannot: one line naming the path."""
    cluster = two_node_cluster
    data_yaml = make_shapes(ShapesDataConfig(train_images=4, val_images=2, imgsz=64,
                                             cache_dir=str(cluster.temp_dir / "hidden"))) / "data.yaml"
    proc = run_cli(*_cluster_overrides(tmp_path, shapes_cache, "hidden", cluster.address, iterations=1,
                                       data_yaml=data_yaml))
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


def test_workers_on_every_node_get_the_settings_yolotune_relies_on(two_node_cluster, monkeypatch):
    """The actor-reuse timeout (runner.WORKER_ENV) is set in the driver's environment, which workers of
    other nodes do not inherit: the job's runtime_env brings it to a trial's actor on the worker node."""
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    from compose import experiment
    from yolotune.runner import WORKER_ENV, _ray_init_args

    cluster = two_node_cluster
    monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "31")  # not what the nodes were started with
    ray.init(**_ray_init_args(experiment(f"ray.address={cluster.address}")))
    try:
        head = ray.get_runtime_context().get_node_id()
        (worker_node,) = [n["NodeID"] for n in ray.nodes() if n["Alive"] and n["NodeID"] != head]

        @ray.remote(num_cpus=1)
        class Trial:  # as Ray Tune's trial actors: a job's actor, placed on the worker node
            def settings(self):
                return ray.get_runtime_context().get_node_id(), {name: os.environ.get(name) for name in WORKER_ENV}

        trial = Trial.options(scheduling_strategy=NodeAffinitySchedulingStrategy(worker_node, soft=False)).remote()
        node, settings = ray.get(trial.settings.remote(), timeout=120)
    finally:
        ray.shutdown()
    assert node == worker_node and settings == {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "31"}
