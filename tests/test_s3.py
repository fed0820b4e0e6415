"""Experiments in an S3-compatible object store: a real S3 API (moto's server on loopback,
started and stopped here), the storage abstraction, refusals, and (slow) a sweep on a 2-node Ray
cluster whose nodes share no directory, killed, resumed and read from fresh processes."""

from __future__ import annotations

import csv
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml
from ray.tune import Checkpoint

import yolotune
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
    exp.delete("trials.jsonl")  # e.g. a budget marker that a resumed run drops
    exp.delete("never-there")
    assert not (exp.local / "trials.jsonl").exists()
    if remote:
        # ("": pyarrow keeps the folder's marker object after a delete)
        assert _keys(f"rt-{tmp_path.name}/exp/") - {""} == set(files) - {"trials.jsonl"}


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


def _upload_shapes(prefix: str, cache: Path) -> str:
    """The shapes dataset into the bucket under ``prefix``, its data YAML's paths relative to its
    folder (as in a store); returns the YAML's URI."""
    from yolotune.data import ShapesDataConfig, make_shapes

    root = make_shapes(ShapesDataConfig(train_images=4, val_images=2, imgsz=64, cache_dir=str(cache)))
    client = boto3.client("s3")
    for path in root.rglob("*"):
        if path.is_file() and path.name != "data.yaml" and path.suffix != ".cache":
            client.upload_file(str(path), "yolotune", f"{prefix}/{path.relative_to(root).as_posix()}")
    relative = "\n".join(line for line in (root / "data.yaml").read_text().splitlines() if not line.startswith("path:"))
    client.put_object(Bucket="yolotune", Key=f"{prefix}/data.yaml", Body=relative.encode())
    return f"s3://yolotune/{prefix}/data.yaml"


def test_node_copy_fetches_once_and_again_when_the_store_changes(s3, tmp_path):
    client = boto3.client("s3")
    prefix = f"nc-{tmp_path.name}"
    for name, body in {"a.txt": b"a", "sub/b.txt": b"b", "sub/c.txt": b"c"}.items():
        client.put_object(Bucket="yolotune", Key=f"{prefix}/{name}", Body=body)
    folder = Location(f"s3://yolotune/{prefix}")
    copy = folder.node_copy()
    assert copy.is_relative_to(s3["YOLOTUNE_CACHE"])
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == \
        {"a.txt": b"a", "sub/b.txt": b"b", "sub/c.txt": b"c"}
    (copy / "a.txt").write_bytes(b"changed here")  # a second call takes the copy as it is ...
    assert folder.node_copy() == copy and (copy / "a.txt").read_bytes() == b"changed here"
    client.delete_object(Bucket="yolotune", Key=f"{prefix}/sub/c.txt")  # ... until the store changes
    client.put_object(Bucket="yolotune", Key=f"{prefix}/a.txt", Body=b"new")
    assert folder.node_copy() == copy
    assert {p.relative_to(copy).as_posix(): p.read_bytes() for p in copy.rglob("*") if p.is_file()} == \
        {"a.txt": b"new", "sub/b.txt": b"b"}
    single = folder.child("sub").child("b.txt").node_copy()
    assert single.read_bytes() == b"b"
    with pytest.raises(FileNotFoundError):
        folder.child("nothing").node_copy()


def test_a_location_on_rays_file_system_keeps_it(s3, tmp_path):
    """Ray hands the driver's callbacks a trial's storage as (pyarrow file system, path)."""
    from pyarrow.fs import LocalFileSystem

    remote = Location(f"s3://yolotune/on-{tmp_path.name}")
    on = Location.on(remote.fs, remote.fs_path)
    assert (on.uri, on.fs, on.fs_path, on.remote) == (f"s3://yolotune/on-{tmp_path.name}", remote.fs,
                                                       remote.fs_path, True)
    assert on.fs is remote.fs  # Ray's own, with settings its URI may not carry (an endpoint override)
    local = LocalFileSystem()
    on = Location.on(local, str(tmp_path / "exp"))
    assert (on.uri, on.fs, on.fs_path, on.remote) == (str(tmp_path / "exp"), local, str(tmp_path / "exp"), False)


# (relative path under an experiment, whether download copies it: results and resume read it)
SMALL = [
    ("trials.jsonl", True),
    ("trial_a/history.jsonl", True),
    ("trial_a/train/weights/best.pt", False),
    ("trial_a/checkpoint_000003/.metadata.json", False),  # anything in a checkpoint folder
    ("checkpoint_000000/notes.txt", False),
    ("trial_a/my_checkpoint_notes.txt", True),
    ("trial_a/train/results.csv", True),
]


@pytest.mark.parametrize("relative, small", SMALL)
def test_download_copies_what_results_read_and_no_checkpoint(relative, small):
    from yolotune.storage import _small

    assert _small(relative) is small


def test_node_copy_of_a_local_path_is_the_path(tmp_path):
    assert Location(str(tmp_path / "data")).node_copy() == tmp_path / "data"


def test_node_copy_of_nothing_names_it(s3, tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^s3://yolotune/none-{tmp_path.name}: not found$"):
        Location(f"s3://yolotune/none-{tmp_path.name}").node_copy()


def test_node_copy_of_a_file_that_became_a_folder(s3, tmp_path):
    client = boto3.client("s3")
    key = f"became-{tmp_path.name}/weights"
    client.put_object(Bucket="yolotune", Key=key, Body=b"one file")
    where = Location(f"s3://yolotune/{key}")
    assert where.node_copy().read_bytes() == b"one file"
    client.delete_object(Bucket="yolotune", Key=key)
    client.put_object(Bucket="yolotune", Key=f"{key}/a.pt", Body=b"a")
    copy = where.node_copy()
    assert [(p.relative_to(copy).as_posix(), p.read_bytes()) for p in copy.rglob("*")] == [("a.pt", b"a")]


@pytest.mark.parametrize("slash", ["", "/"])
def test_a_data_yaml_in_the_store_gets_its_folder_as_path_and_keeps_its_key_order(s3, tmp_path, slash):
    from yolotune.storage import node_dataset

    prefix = f"dy-{tmp_path.name}"
    body = "val: images/val\ntrain: images/train\npath: sub\nnames: {0: circle}\n"
    boto3.client("s3").put_object(Bucket="yolotune", Key=f"{prefix}/data.yaml", Body=body.encode())
    boto3.client("s3").put_object(Bucket="yolotune", Key=f"{prefix}/sub/images/val/x.jpg", Body=b"x")
    folder = Path(s3["YOLOTUNE_CACHE"], "fetched", "s3", "yolotune", prefix)
    local = node_dataset(f"s3://yolotune/{prefix}/data.yaml{slash}")
    assert local == Path(f"{folder}.data.yaml")
    assert local.read_text() == f"val: images/val\ntrain: images/train\npath: {folder / 'sub'}\nnames:\n  0: circle\n"
    assert (folder / "sub" / "images" / "val" / "x.jpg").read_bytes() == b"x"


def test_download_keeps_the_stores_times_and_copies_a_local_experiment_elsewhere(s3, tmp_path):
    prefix = f"dl-{tmp_path.name}"
    boto3.client("s3").put_object(Bucket="yolotune", Key=f"{prefix}/trials.jsonl", Body=b"{}\n")
    store = Location(f"s3://yolotune/{prefix}")
    mirror = store.download(tmp_path / "mirror")
    stored = store.fs.get_file_info(f"{store.fs_path}/trials.jsonl").mtime.timestamp()
    assert (mirror / "trials.jsonl").stat().st_mtime == stored  # "the newest experiment" compares these
    assert Location(f"s3://yolotune/none-{tmp_path.name}").download(tmp_path / "none") == tmp_path / "none"
    assert not (tmp_path / "none").exists()
    local = Location(str(mirror))
    assert local.download() == mirror  # a local experiment is its own mirror
    assert local.download(tmp_path / "copy") == tmp_path / "copy" and (tmp_path / "copy" / "trials.jsonl").is_file()


def test_a_second_download_moves_only_the_files_new_or_changed_in_the_store(s3, tmp_path):
    """The live view downloads a large experiment's small files at each refresh: only what changed."""
    client, prefix = boto3.client("s3"), f"again-{tmp_path.name}"
    for name, body in (("trials.jsonl", b"{}\n"), ("trial_a/history.jsonl", b"{}\n")):
        client.put_object(Bucket="yolotune", Key=f"{prefix}/{name}", Body=body)
    store = Location(f"s3://yolotune/{prefix}")
    mirror = store.download(tmp_path / "mirror")
    unchanged = mirror / "trials.jsonl"
    stat = unchanged.stat()
    unchanged.write_bytes(b"XY\n")  # the same size and time: a copy that was not moved again keeps this
    os.utime(unchanged, (stat.st_atime, stat.st_mtime))
    client.put_object(Bucket="yolotune", Key=f"{prefix}/trial_a/history.jsonl", Body=b"{}\n{}\n")
    client.put_object(Bucket="yolotune", Key=f"{prefix}/trial_b/history.jsonl", Body=b"{}\n")
    store.download(tmp_path / "mirror")
    assert unchanged.read_bytes() == b"XY\n"
    assert (mirror / "trial_a" / "history.jsonl").read_bytes() == b"{}\n{}\n"
    assert (mirror / "trial_b" / "history.jsonl").read_bytes() == b"{}\n"


def test_the_cache_is_under_home_unless_set(monkeypatch, tmp_path):
    from yolotune.storage import cache_root

    monkeypatch.delenv("YOLOTUNE_CACHE", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "yolotune"
    monkeypatch.setenv("YOLOTUNE_CACHE", "~/elsewhere")
    assert cache_root() == tmp_path / "elsewhere"


class _SlowStore:
    """A store's file system that answers after ``delay_s``, or fails."""

    type_name = "s3"

    def __init__(self, delay_s=0.0, error=None):
        self.delay_s, self.error = delay_s, error

    def get_file_info(self, path):
        from pyarrow.fs import FileType

        time.sleep(self.delay_s)
        if self.error:
            raise self.error
        return SimpleNamespace(type=FileType.Directory)


def test_a_store_that_does_not_answer_is_given_up_on_time():
    store = Location("s3://bucket/runs", _SlowStore(delay_s=3), "bucket/runs")
    started = time.monotonic()
    assert store.check_reachable(timeout_s=0.3) == "no answer within 0.3 s"
    assert time.monotonic() - started < 2  # neither the probe nor its thread is waited for
    assert Location("s3://bucket/runs", _SlowStore(), "bucket/runs").check_reachable() is None
    failing = Location("s3://bucket/runs", _SlowStore(error=OSError("Access Denied\nrequest id 1")), "bucket/runs")
    assert failing.check_reachable() == "Access Denied"


def test_node_copy_fetches_a_same_size_replacement(s3, tmp_path):
    """A dataset or weights file replaced by one of the same size: the store's time tells them apart
    (S3 keeps it to the second: a replacement within the same second as the copy goes unseen)."""
    client = boto3.client("s3")
    key = f"same-{tmp_path.name}/weights.pt"
    client.put_object(Bucket="yolotune", Key=key, Body=b"old weights")
    single = Location(f"s3://yolotune/{key}")
    assert single.node_copy().read_bytes() == b"old weights"
    time.sleep(1.1)
    client.put_object(Bucket="yolotune", Key=key, Body=b"new weights")
    assert single.node_copy().read_bytes() == b"new weights"


@pytest.mark.parametrize("continues", [False, True])
def test_a_trial_on_a_fresh_node_gets_its_files_back_only_when_it_continues(s3, tmp_path, monkeypatch, continues):
    """With an object store a trial works in Ray's local trial dir (its cwd): a trial that continues
    from a checkpoint, possibly on another node, first gets its uploaded history and Ultralytics output
    back; a fresh trial starts empty, even where the store holds an earlier trial's files."""
    from yolotune.trainable import _trial_dir

    trial = Location(f"s3://yolotune/fresh-node-{tmp_path.name}").child("trial_a")
    files = {layout.HISTORY: b'{"epoch": 1}\n', "train/results.csv": b"epoch\n1\n"}
    for name, body in files.items():
        boto3.client("s3").put_object(Bucket="yolotune", Key=f"{trial.fs_path.split('/', 1)[1]}/{name}", Body=body)
    node_cwd = tmp_path / "node"  # nothing of an earlier run on this node
    node_cwd.mkdir()
    monkeypatch.chdir(node_cwd)
    checkpoint = None
    if continues:
        (tmp_path / "ckpt").mkdir()
        checkpoint = Checkpoint.from_directory(tmp_path / "ckpt")
    assert _trial_dir(trial, checkpoint) == node_cwd
    found = {p.relative_to(node_cwd).as_posix(): p.read_bytes() for p in node_cwd.rglob("*") if p.is_file()}
    assert found == (files if continues else {})


def test_data_and_weights_in_the_store_are_checked_and_fetched_before_ray(s3, tmp_path, shapes_cache):
    from test_bad_input import BASE, attempt
    from ultralytics.cfg import ROOT

    from yolotune.preflight import preflight

    data = _upload_shapes(f"ds-{tmp_path.name}", shapes_cache)
    boto3.client("s3").upload_file(str(ROOT / "cfg/models/11/yolo11.yaml"), "yolotune", f"m-{tmp_path.name}/yolo11n.yaml")
    weights = f"s3://yolotune/m-{tmp_path.name}/yolo11n.yaml"
    exp = attempt(tmp_path / "runs", shapes_cache, *BASE, "data=coco8", f"data.yaml={data}",
                  f"model.weights={weights}", preflight=False)
    job, _ = preflight(exp, tmp_path / "runs" / "bad")
    assert job["data"] == data and job["weights"] == weights  # trials fetch them on their nodes
    fetched = Path(s3["YOLOTUNE_CACHE"], "fetched", "s3", "yolotune", f"ds-{tmp_path.name}")
    assert len(list((fetched / "images" / "train").iterdir())) == 4
    assert list((fetched / "labels").glob("*.cache"))  # the label caches, built once in this node's copy
    local_yaml = yaml.safe_load(Path(f"{fetched}.data.yaml").read_text())
    assert local_yaml["path"] == str(fetched) and local_yaml["train"] == "images/train"


@pytest.mark.parametrize("case,message", [
    ("missing", "cannot fetch the dataset: s3://yolotune/nothing/data.yaml: not found"),
    ("absolute", "cannot fetch the dataset: its path: /data/shapes is absolute; in a store, paths in a data YAML "
                 "are relative to its folder"),
    ("incomplete", "the data YAML lacks val, names; it needs train, val and names"),
    ("not-yaml", "a data YAML (.yaml) in the store, in its dataset's folder"),
])
def test_bad_data_in_the_store_is_one_line(case, message, s3, tmp_path, shapes_cache):
    from test_bad_input import BASE, attempt

    uri = {"missing": "s3://yolotune/nothing/data.yaml", "not-yaml": "s3://yolotune/x/data.txt"}.get(
        case, f"s3://yolotune/{case}-{tmp_path.name}/data.yaml")
    body = {"absolute": "path: /data/shapes\ntrain: images/train\nval: images/val\nnames: {0: circle}\n",
            "incomplete": "train: images/train\n"}.get(case)
    if body:
        boto3.client("s3").put_object(Bucket="yolotune", Key=uri[len("s3://yolotune/"):], Body=body.encode())
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, "data=coco8", f"data.yaml={uri}")
    assert str(err.value) == f"data.yaml={uri}: {message}"
    assert not (tmp_path / "runs").exists()


def test_weights_in_an_unreachable_store_are_one_line(s3, tmp_path, shapes_cache, monkeypatch):
    from test_bad_input import BASE, attempt

    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    with pytest.raises(ConfigError) as err:
        attempt(tmp_path / "runs", shapes_cache, *BASE, "model.weights=s3://yolotune/m/best.pt")
    assert (err.value.key, err.value.value) == ("model.weights", "s3://yolotune/m/best.pt")
    assert "cannot reach the store" in str(err.value)


def test_the_report_refreshes_from_and_into_the_store(s3, tmp_path):
    """What the live view does as trials end: the trials' files are in the store, not on the driver;
    the ended trials' weights past checkpoint.keep are deleted there."""
    from test_results_fast import build

    from yolotune import report

    local = build(tmp_path / "exp")
    experiment = Location(f"s3://yolotune/live-{tmp_path.name}").child("exp")
    config = local / ".hydra" / "config.yaml"  # checkpoint.keep=2: t_paused and t_done, by val/box_loss
    config.write_text(config.read_text() + "checkpoint: {every: 1, keep: 2}\n")
    for trial_id in ("t_done", "t_early"):
        layout.write_atomic(local / f"trial_{trial_id}" / "checkpoint_000001" / "last.pt", b"weights")
    for path in local.rglob("*"):
        if path.is_file():
            boto3.client("s3").upload_file(str(path), "yolotune", f"live-{tmp_path.name}/exp/"
                                           f"{path.relative_to(local).as_posix()}")
    report.live_refresh(experiment.uri)
    keys = _keys(f"live-{tmp_path.name}/exp/")
    assert {"trials.csv", "report.html", "plots/history.png"} <= keys
    assert "trial_t_done/checkpoint_000001/last.pt" in keys and "trial_t_early/checkpoint_000001/last.pt" not in keys
    uploaded = boto3.client("s3").get_object(Bucket="yolotune", Key=f"live-{tmp_path.name}/exp/trials.csv")
    assert uploaded["Body"].read() == (experiment.local / "trials.csv").read_bytes() == \
        report.write_trials_csv(yolotune.load(local)).read_bytes()


@pytest.mark.slow
def test_multirun_into_the_store(s3, tmp_path, shapes_cache):
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "x", iterations=1, epochs=1)[2:]
                 if not o.startswith("scheduler")]
    (tmp_path / "cwd").mkdir()
    proc = run_cli("-m", f"storage=s3://yolotune/mr-{tmp_path.name}", *overrides, "scheduler=asha_fast,fifo",
                   cwd=tmp_path / "cwd")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    keys = _keys(f"mr-{tmp_path.name}/")
    experiments = {k.split("/")[0] for k in keys if k.endswith("/trials.csv")}
    assert len(experiments) == 2, sorted(keys)
    summaries = [k for k in keys if k.startswith("multirun/") and k.endswith("/multirun_summary.csv")]
    assert len(summaries) == 1, sorted(keys)
    body = boto3.client("s3").get_object(Bucket="yolotune", Key=f"mr-{tmp_path.name}/{summaries[0]}")["Body"]
    rows = list(csv.DictReader(body.read().decode().splitlines()))
    assert [r["status"] for r in rows] == ["ok", "ok"] and all(float(r["best_metric"]) > 0 for r in rows)
    assert not list((tmp_path / "cwd").iterdir())  # no "s3:" folder beside the user


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
            node_env = {**env, "YOLOTUNE_CACHE": str(tmp_path / cwd / "cache")}  # what each node fetches
            nodes.append(subprocess.Popen(["ray", "start", *args, *common], cwd=tmp_path / cwd, env=node_env,
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
    data = _upload_shapes("datasets/shapes", shapes_cache)  # the nodes read the dataset from the store too
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "c", iterations=3, epochs=3)[2:]
                 if not o.startswith(("scheduler", "data"))]
    overrides = [f"storage={storage}", "name=c", *overrides, "data=coco8", f"data.yaml={data}", "scheduler=fifo",
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
    for node in ("head", "worker"):  # each node fetched the dataset into its own cache
        fetched = tmp_path / node / "cache" / "fetched" / "s3" / "yolotune" / "datasets" / "shapes"
        assert len(list((fetched / "images" / "train").iterdir())) == 4, node


@pytest.mark.slow
def test_a_finished_experiment_moved_into_the_store_and_back_reads_and_says_it_is_finished(small_sweep, s3, tmp_path):
    """Copied local -> bucket, then bucket -> local: read from each place (its saved config names the storage it
    started in, which neither is) and resume=true there shows its results and runs nothing."""
    prefix = f"moved-{tmp_path.name}"
    for path in small_sweep.rglob("*"):
        if path.is_file():
            boto3.client("s3").upload_file(str(path), "yolotune", f"{prefix}/small/{path.relative_to(small_sweep)}")
    local = tmp_path / "local"
    Location(f"s3://yolotune/{prefix}/small").download(into=local / "small", select=lambda relative: True)
    for storage in (f"s3://yolotune/{prefix}", str(local)):
        experiment = f"{storage}/small"
        assert yolotune.load(experiment).finished
        shown = run_cli("results", experiment, "--format", "json", timeout=120)
        assert shown.returncode == 0 and json.loads(shown.stdout)["finished"], shown.stderr
        assert len(json.loads(shown.stdout)["ranked"]) == 6
        resumed = run_cli("resume=true", "name=small", f"storage={storage}", timeout=120)
        assert (resumed.returncode, resumed.stderr) == (0, ""), resumed.stderr
        assert "  (finished)\nTrials: 6 (6 TERMINATED)\n" in resumed.stdout and \
            resumed.stdout.endswith("nothing was run again (resume_errored=true re-runs errored ones).\n"), resumed.stdout
