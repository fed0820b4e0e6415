"""What a trial does for GPU training, checked with real CPU trials: it trains on the device it was
given, leaves nothing behind in a reused worker, fetches nothing, and checkpoints as often as asked."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from conftest import REPO, run_cli, small_sweep_overrides
from yolotune.layout import read_jsonl
from yolotune.resources import local_cpus
from yolotune.results import load

TRIALS = 4


@pytest.fixture(scope="module")
def one_worker_sweep(tmp_path_factory, shapes_cache):
    """4 trials one after another in one reused worker (all CPUs: 1 slot), ASHA stopping some of them early,
    each with data loader processes (worker_probe.py), and a checkpoint every 2 epochs."""
    storage = tmp_path_factory.mktemp("storage")
    overrides = small_sweep_overrides(storage, shapes_cache, "one-worker", iterations=TRIALS, epochs=3)
    proc = run_cli(*overrides, f"resources.cpu_per_trial={local_cpus()}", "resources.gpu_per_trial=0",
                   "resources.max_concurrent_trials=1", "checkpoint.every=2", "seed=null",
                   "+ray.runtime_env.worker_process_setup_hook=worker_probe.install",
                   env={"PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")])})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "one-worker"


@pytest.mark.slow
def test_a_reused_worker_keeps_nothing_of_its_previous_trials(one_worker_sweep):
    results = load(one_worker_sweep)
    assert results.status_counts().get("ERROR", 0) == 0
    assert results.status_counts().get("TERMINATED", 0) == TRIALS
    history = results.history()
    assert history["pid"].nunique() == 1  # one worker ran every trial
    assert (history.groupby("trial_id")["epoch"].max() < 3).any()  # ASHA stopped some trials early
    probes = sorted((read_jsonl(d / "probe.jsonl")[0] for d in one_worker_sweep.glob("trial_*")),
                    key=lambda records: records[0]["time"])  # in the order the trials ran
    starts = [next(r for r in records if r["when"] == "start") for records in probes]
    training = [r for records in probes for r in records if r["when"] == "training"]
    assert min(r["children"] for r in training) >= 1  # loader processes existed while training ...
    assert [r["children"] for r in starts] == [0] * TRIALS  # ... and none outlived its trial
    assert [r["trainers"] for r in starts] == [1] * TRIALS  # only the new trial's trainer is alive
    assert max(r["tensor_mib"] for r in starts) - min(r["tensor_mib"] for r in starts) < 1  # no old tensors
    rss = [r["rss"] / 2**20 for r in starts]
    print("worker RSS at each trial's start (MiB):", [round(m) for m in rss])
    # A kept trainer would add at least the tensors it trains with (model, EMA, optimizer, gradients);
    # smaller growth is the allocator and library caches settling (the first trial warms them up).
    trainer_mib = min(r["tensor_mib"] for r in training) - max(r["tensor_mib"] for r in starts)
    growth = [b - a for a, b in zip(rss[1:], rss[2:])]
    assert trainer_mib > 20 and max(growth) < trainer_mib, (rss, trainer_mib)


@pytest.mark.slow
def test_trials_train_on_the_cpu_and_fetch_nothing(one_worker_sweep):
    for trial_dir in one_worker_sweep.glob("trial_*"):
        args = yaml.safe_load((trial_dir / "train" / "args.yaml").read_text())
        assert args["device"] == "cpu" and args["deterministic"] is False and args["workers"] == 0
        assert not (trial_dir / "weights").exists()  # no AMP check model fetched into the trial's cwd
        rows = read_jsonl(trial_dir / "history.jsonl")[0]
        assert rows and all(row["gpu"] == "" for row in rows)
    assert set(load(one_worker_sweep).dataframe()["gpu"]) == {""}


@pytest.mark.slow
def test_checkpoints_every_two_epochs_and_at_the_end(one_worker_sweep):
    for trial_dir in one_worker_sweep.glob("trial_*"):
        epochs = len(read_jsonl(trial_dir / "history.jsonl")[0])
        checkpoints = sorted(trial_dir.glob("checkpoint_*"))
        result_rows = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        with_checkpoint = [r["epoch"] for r in result_rows if r.get("checkpoint_dir_name")]
        # Epoch 2, and epoch 3 as the last; a trial ASHA stopped after epoch 1 has none (never resumed).
        assert with_checkpoint == {1: [], 2: [2], 3: [2, 3]}[epochs]
        assert len(checkpoints) == min(len(with_checkpoint), 1)  # the newest is kept
        assert not list(trial_dir.glob(".ckpt-*"))  # the temp dirs in the trial dir are gone


def test_amp_check_uses_the_drivers_weights_dir(tmp_path, monkeypatch):
    """check_amp loads WEIGHTS_DIR/yolo26n.pt, read at each call: a trial points it at the driver's
    absolute copy instead of a relative `weights` dir in its own working dir. Offline, the driver
    has none to give (the check is then skipped with AMP on, as Ultralytics does)."""
    import ultralytics.utils

    from yolotune.runner import amp_check_weights
    from yolotune.trainable import _use_amp_check_weights

    monkeypatch.setattr(ultralytics.utils, "WEIGHTS_DIR", ultralytics.utils.WEIGHTS_DIR)  # restored afterwards
    monkeypatch.chdir(tmp_path)
    assert amp_check_weights() is None  # YOLO_OFFLINE: nothing fetched
    _use_amp_check_weights(str(tmp_path / "amp"))
    assert ultralytics.utils.WEIGHTS_DIR == tmp_path / "amp"
    assert not (tmp_path / "weights").exists()
