"""Experiments in an S3-compatible object store: a real S3 API (moto's server on loopback,
started and stopped here), the storage abstraction, refusals, and (slow) a sweep on a 2-node Ray
cluster whose nodes share no directory, killed, resumed and read from fresh processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from conftest import REPO, run_cli, small_sweep_overrides
from yolotune import layout
from yolotune.errors import ConfigError
from yolotune.storage import Location

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """An S3 endpoint with bucket ``yolotune``; the environment every process reads it from."""
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(REPO / "tests" / "moto_s3.py"), str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    env = {"AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{port}",
           "YOLOTUNE_CACHE": str(tmp_path_factory.mktemp("cache"))}
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        deadline = time.time() + 30
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                assert time.time() < deadline and server.poll() is None, "moto server did not start"
                time.sleep(0.2)
        boto3.client("s3").create_bucket(Bucket="yolotune")
        yield env
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        server.wait(timeout=30)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def _keys(prefix: str):
    found = boto3.client("s3").list_objects_v2(Bucket="yolotune", Prefix=prefix).get("Contents", [])
    return {o["Key"][len(prefix):] for o in found}


@pytest.mark.parametrize("remote", [False, True], ids=["local", "s3"])
def test_location_round_trip(remote, s3, tmp_path):
    storage = Location(f"s3://yolotune/rt-{tmp_path.name}" if remote else str(tmp_path / "runs"))
    exp = storage.child("exp")
    assert not exp.exists()
    files = {"trials.jsonl": b"{}\n", "trial_a/history.jsonl": b"{}\n", "trial_a/train/weights/best.pt": b"w" * 10,
             "trial_a/checkpoint_000000/last.pt": b"c"}
    for name, data in files.items():
        layout.write_atomic(exp.local / name, data)
    exp.upload(*(exp.local / name for name in files))
    assert exp.exists() and storage.exists()
    if remote:
        assert _keys(f"rt-{tmp_path.name}/exp/") == set(files)
        for name in files:
            (exp.local / name).unlink()
    copy = exp.download()
    assert copy == exp.local
    small = {p.relative_to(copy).as_posix() for p in copy.rglob("*") if p.is_file()}
    assert small == (set(files) if not remote else {"trials.jsonl", "trial_a/history.jsonl"})  # no weights
    assert exp.fetch("trial_a/train/weights/best.pt").read_bytes() == b"w" * 10
    assert exp.fetch("trial_a/nothing.pt") is None


def test_uri_with_a_query_keeps_it_and_names_the_child_in_the_path(s3):
    exp = Location("s3://yolotune/q?region=us-east-1").child("exp")
    assert exp.uri == "s3://yolotune/q/exp?region=us-east-1" and exp.fs_path == "yolotune/q/exp"


@pytest.mark.parametrize("env,storage", [
    ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, "s3://yolotune/runs"),  # nothing listens there
    ({}, "s3://no-such-bucket/runs"),
], ids=["bad-endpoint", "no-bucket"])
def test_unusable_store_is_one_error_before_anything_is_written(env, storage, s3, tmp_path, shapes_cache,
                                                               monkeypatch):
    from test_bad_input import BASE, attempt

    for key, value in env.items():
        monkeypatch.setenv(key, value)
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path, shapes_cache, *BASE, f"storage={storage}")
    assert err.value.key == "storage" and "\n" not in str(err.value)
    assert not Path(s3["YOLOTUNE_CACHE"], "s3", storage[5:]).exists()


def test_unusable_store_from_the_command_line(s3, tmp_path, shapes_cache):
    proc = run_cli("storage=s3://yolotune/runs", "name=x", *small_sweep_overrides(tmp_path, shapes_cache, "x")[2:],
                   env={"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, timeout=120)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "storage=" in proc.stderr, proc.stderr


# Distinctive credentials (moto takes any): the test looks for them in what the experiment saved.
SECRET = {"AWS_ACCESS_KEY_ID": "AKIAYOLOTUNETEST0001", "AWS_SECRET_ACCESS_KEY": "yolotune-s3-secret-do-not-save"}


@pytest.fixture
def cluster_without_shared_dir(s3, tmp_path):
    """Two Ray nodes on loopback, each started (--block, its own process group) in its own working
    dir; the object store is the only place they share. Stopped by their process groups, never
    with `ray stop` (which would stop every Ray on the machine)."""
    port = _free_port()
    temp_dir = tempfile.mkdtemp(prefix="rs3", dir="/tmp")  # short: Ray's socket paths must fit 107 bytes
    env = {**os.environ, **SECRET, "RAY_USAGE_STATS_ENABLED": "0"}
    common = ["--num-cpus", "1", "--node-ip-address", "127.0.0.1", "--disable-usage-stats", "--block"]
    nodes = []
    try:
        for cwd, args in (("head", ["--head", "--port", str(port), "--include-dashboard", "false",
                                    "--temp-dir", temp_dir]), ("worker", ["--address", f"127.0.0.1:{port}"])):
            (tmp_path / cwd).mkdir()
            nodes.append(subprocess.Popen(["ray", "start", *args, *common], cwd=tmp_path / cwd, env=env,
                                          stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                          start_new_session=True))
            time.sleep(8)
        deadline = time.time() + 120
        while True:  # both nodes registered
            out = subprocess.run([sys.executable, "-c", f"import ray; ray.init('127.0.0.1:{port}', logging_level=40); "
                                  "print(sum(n['Alive'] for n in ray.nodes()))"], env=env, capture_output=True,
                                 text=True, timeout=120).stdout.strip()
            if out == "2":
                break
            assert time.time() < deadline and all(n.poll() is None for n in nodes), out
            time.sleep(2)
        yield f"127.0.0.1:{port}"
    finally:
        for node in reversed(nodes):
            os.killpg(node.pid, signal.SIGTERM)
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(node.pid, signal.SIGKILL)
        subprocess.run(["rm", "-rf", temp_dir])


@pytest.mark.slow
def test_sweep_killed_resumed_and_read_through_the_store(cluster_without_shared_dir, s3, tmp_path, shapes_cache):
    storage = "s3://yolotune/runs"
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "c", iterations=3, epochs=3)[2:]
                 if not o.startswith("scheduler")]
    overrides = [f"storage={storage}", "name=c", *overrides, "scheduler=fifo",
                 f"ray.address={cluster_without_shared_dir}", "resources.cpu_per_trial=1"]
    env = {**os.environ, **SECRET}
    for machine in ("driver1", "driver2", "reader"):
        (tmp_path / machine).mkdir()
    driver = subprocess.Popen([sys.executable, "-m", "yolotune", *overrides], cwd=tmp_path / "driver1",
                              env={**env, "YOLOTUNE_CACHE": str(tmp_path / "driver1" / "cache")},
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    deadline = time.time() + 600
    while not any(k.endswith(layout.HISTORY) for k in _keys("runs/c/")):  # a trial's first epoch reached the store
        assert time.time() < deadline and driver.poll() is None, driver.stdout.read()[-3000:]
        time.sleep(1)
    os.killpg(driver.pid, signal.SIGKILL)
    driver.communicate(timeout=60)

    resumed = run_cli("resume=true", f"storage={storage}", "name=c", f"ray.address={cluster_without_shared_dir}",
                      cwd=tmp_path / "driver2", env={**SECRET, "YOLOTUNE_CACHE": str(tmp_path / "driver2" / "cache")})
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]

    shown = run_cli("results", f"{storage}/c", "--format", "json", cwd=tmp_path / "reader",
                    env={"YOLOTUNE_CACHE": str(tmp_path / "reader" / "cache")})
    assert shown.returncode == 0, shown.stderr[-3000:]
    summary = json.loads(shown.stdout)
    assert summary["finished"] and summary["status"] == {"TERMINATED": 3}
    assert [row["epochs"] for row in summary["ranked"]] == [3, 3, 3]

    keys = _keys("runs/c/")
    for name in (".hydra/config.yaml", "provenance.yaml", "tuner.pkl", "trials.jsonl", "trials.csv", "best.pt",
                 "best_hyperparameters.yaml", "report.html", "plots/history.png", layout.DONE_MARKER):
        assert name in keys, sorted(keys)
    trials = {k.split("/")[0] for k in keys if k.startswith("trial_")}
    assert len(trials) == 3
    nodes = set()
    for trial in trials:
        assert {f"{trial}/{layout.HISTORY}", f"{trial}/train/weights/last.pt"} <= keys
        assert any(k.startswith(f"{trial}/checkpoint_") for k in keys)
        body = boto3.client("s3").get_object(Bucket="yolotune", Key=f"runs/c/{trial}/{layout.HISTORY}")["Body"]
        rows = [json.loads(line) for line in body.read().decode().splitlines()]
        assert sorted({r["epoch"] for r in rows}) == [1, 2, 3]
        nodes |= {r["node_id"] for r in rows}
    assert len(nodes) == 2  # trials ran on both nodes
    for name in (".hydra/config.yaml", "provenance.yaml", "tuner.pkl"):  # no credential saved anywhere
        data = boto3.client("s3").get_object(Bucket="yolotune", Key=f"runs/c/{name}")["Body"].read()
        assert not any(secret.encode() in data for secret in SECRET.values()), name
    for place in ("driver1", "driver2", "reader", "head", "worker"):  # nothing written beside the caches
        assert {p.name for p in (tmp_path / place).iterdir()} <= {"cache"}, place
