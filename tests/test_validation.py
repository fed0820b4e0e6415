"""Each user mistake: exit code 2, one line on stderr naming the key, no traceback, nothing written."""

from __future__ import annotations

import pytest

from conftest import run_cli

CASES = [
    # (overrides, key named in the message)
    (["+space.lr00={dist:uniform,low:0,high:1}"], "space.lr00"),
    (["+train.epoch=3"], "train.epoch"),
    (["space.lr0.low=0.5", "space.lr0.high=0.1"], "space.lr0.low"),
    (["space.lr0.low=0.1", "space.lr0.high=0.1"], "space.lr0.low"),
    (["+space.lr0.q=0", "space.lr0.dist=quniform"], "space.lr0.q"),
    (["space.lr0.dist=choice", "+space.lr0.values=[]", "~space.lr0.low", "~space.lr0.high"], "space.lr0.values"),
    (["space.lr0.dist=loguniform", "space.lr0.low=0"], "space.lr0.low"),
    (["space.lr0.dist=normal"], "space.lr0.dist"),
    (["space=minimal", "+train.lr0=0.01"], "train.lr0"),
    (["iterations=0"], "iterations"),
    (["train.epochs=5", "scheduler.grace_period=10"], "scheduler.grace_period"),
    (["resources.cpu_per_trial=-1"], "resources.cpu_per_trial"),
    (["resources.gpu_per_trial=-0.5"], "resources.gpu_per_trial"),
    (["resources.max_concurrent_trials=0"], "resources.max_concurrent_trials"),
    (["data.yaml=/no/such/data.yaml"], "data.yaml"),
    (["metric=mAP"], "metric"),
    (["+train.val=false"], "train.val"),
    (["train.optimizer=auto"], "train.optimizer"),
    (["+train.data=coco8.yaml"], "train.data"),
    (["space.lr0='uniform(0.1)'"], "space.lr0"),
    (["space.lr0='__import__(\"os\").system(\"true\")'"], "space.lr0"),
    (["mode=maximum"], "mode"),
]


@pytest.mark.parametrize("overrides,key", CASES, ids=[c[1] + ":" + c[0][0] for c in CASES])
def test_invalid_input_is_one_clear_line(overrides, key, tmp_path):
    proc = run_cli(f"storage={tmp_path}/runs", "name=bad", *overrides)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith(f"yolotune: error: {key}="), lines[0]
    assert "Traceback" not in proc.stdout + proc.stderr
    assert not (tmp_path / "runs").exists()  # nothing half-written


def test_typo_suggests_the_closest_name(tmp_path):
    proc = run_cli(f"storage={tmp_path}", "+train.momentun=0.9")
    assert proc.returncode == 2 and "did you mean 'momentum'?" in proc.stderr


def test_missing_weights_offline_say_what_to_use(tmp_path, coco8):
    proc = run_cli(f"storage={tmp_path}", f"data.yaml={coco8}", "model.weights=yolo11n.pt", "iterations=1",
                   "train.epochs=1", "scheduler=fifo")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("yolotune: error: model.weights=")
    assert "model=yolo11n-scratch" in proc.stderr
    assert not list(tmp_path.iterdir())


def test_gpu_asked_on_a_machine_without_one(tmp_path, coco8):
    proc = run_cli(f"storage={tmp_path}", f"data.yaml={coco8}", "model=yolo11n-scratch", "resources=gpu",
                   "iterations=1", "train.epochs=1", "scheduler=fifo")
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert proc.stderr.strip().splitlines()[-1].startswith("yolotune: error: resources.gpu_per_trial=")
    assert not list(tmp_path.iterdir())  # the experiment directory is only created once the run can start
