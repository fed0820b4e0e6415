"""validate=decisions: a real sweep's trials validate exactly at their scheduler's decision epochs and
at their last, report every epoch, and the results rank over the validated epochs; validate=every
validates each epoch, and the trials train exactly as they do then."""

from __future__ import annotations

import json
import math

import pandas as pd
import pytest
import yaml

from conftest import run_cli, small_sweep_overrides
from yolotune import layout

pytestmark = pytest.mark.slow
EPOCHS = 4
DECISIONS = {1, 2, 4}  # ASHA grace 1, reduction factor 2, 4 epochs: rungs 1 and 2, and the last epoch
VAL_KEYS = ("fitness", "val/box_loss", "metrics/mAP50-95(B)")


def _rows(trial_dir, name):
    rows, skipped = layout.read_jsonl(trial_dir / name)
    assert skipped == 0
    return rows


def _check_trials(exp_dir, validated_epochs):
    """Every epoch of every trial is reported; exactly ``validated_epochs`` (None: all) carry metrics."""
    trial_dirs = sorted(exp_dir.glob("trial_*"))
    assert trial_dirs
    reached = set()
    for trial_dir in trial_dirs:
        history, reports = _rows(trial_dir, layout.HISTORY), _rows(trial_dir, "result.json")
        epochs = [row["epoch"] for row in history]
        assert epochs == list(range(1, len(epochs) + 1)) == [r["epoch"] for r in reports], trial_dir
        reached |= set(epochs)
        for row, report in zip(history, reports):
            want = validated_epochs is None or row["epoch"] in validated_epochs
            for what in (row, report):  # the trial's own history and what Ray (and its scheduler) got
                assert what["validated"] == int(want), (trial_dir.name, row["epoch"])
                assert all((key in what) == want for key in VAL_KEYS), (trial_dir.name, row["epoch"], what)
                assert math.isfinite(what["train/box_loss"]) and "lr/pg0" in what  # training values every epoch
            if want:
                assert all(math.isfinite(row[key]) for key in VAL_KEYS)
        assert epochs[-1] in (validated_epochs or epochs)  # a trial ends at a decision: its last result has metrics
    return reached


def _check_best(exp_dir):
    """trials.csv and best_hyperparameters.yaml agree with the validated epochs of the histories."""
    trials = pd.read_csv(exp_dir / "trials.csv").set_index("trial_id")
    best = {}
    for trial_dir in exp_dir.glob("trial_*"):
        scored = [r for r in _rows(trial_dir, layout.HISTORY) if r["validated"]]
        trial_id = trial_dir.name.removeprefix("trial_")
        top = min(scored, key=lambda r: r["val/box_loss"])
        best[trial_id] = top["val/box_loss"]
        assert trials.at[trial_id, "best_val/box_loss"] == pytest.approx(top["val/box_loss"])
        assert trials.at[trial_id, "best_epoch"] == top["epoch"]
        assert trials.at[trial_id, "last_val/box_loss"] == pytest.approx(scored[-1]["val/box_loss"])
    winner = min(best, key=best.get)
    params = json.loads((exp_dir / f"trial_{winner}" / "params.json").read_text())
    chosen = yaml.safe_load((exp_dir / "best_hyperparameters.yaml").read_text())
    assert all(chosen[k] == pytest.approx(v) for k, v in params.items())
    assert (exp_dir / "best.pt").is_file() and (exp_dir / layout.DONE_MARKER).exists()


def _by_params(exp_dir):
    """Each trial's history, keyed by its sampled values (trial ids differ between experiments)."""
    return {(trial_dir / "params.json").read_text(): _rows(trial_dir, layout.HISTORY)
            for trial_dir in exp_dir.glob("trial_*")}


def test_trials_validate_at_the_decision_epochs_only_and_train_as_with_every_epoch(tmp_path, shapes_cache):
    overrides = small_sweep_overrides(tmp_path, shapes_cache, "decisions", iterations=3, epochs=EPOCHS)
    proc = run_cli(*overrides, "resources=cpu")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    reached = _check_trials(tmp_path / "decisions", DECISIONS)
    assert 3 in reached  # a trial trained the epoch between the rungs without validating it
    _check_best(tmp_path / "decisions")

    # The same trials (seed=0) under FIFO, validating every epoch: every trial runs all epochs.
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "every", iterations=3, epochs=EPOCHS)
                 if not o.startswith("scheduler")]
    proc = run_cli(*overrides, "resources=cpu", "validate=every", "scheduler=fifo")
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert _check_trials(tmp_path / "every", None) == set(range(1, EPOCHS + 1))
    _check_best(tmp_path / "every")

    # The same training: a skipped validation leaves the next epochs' random augmentations as they are
    # after a validation. Epoch 4 follows the unvalidated epoch 3 (ASHA's trials stop at different
    # epochs from run to run, but the first trial at each rung goes on: one reaches epoch 4).
    decisions, every = _by_params(tmp_path / "decisions"), _by_params(tmp_path / "every")
    assert decisions.keys() == every.keys() and EPOCHS in reached
    for params, history in decisions.items():
        for row, full in zip(history, every[params]):
            assert {k: v for k, v in row.items() if k.startswith("train/")} == {
                k: v for k, v in full.items() if k.startswith("train/")}, (params, row["epoch"])
            if row["validated"]:
                assert all(row[key] == full[key] for key in VAL_KEYS), (params, row["epoch"])
