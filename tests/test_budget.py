"""budget.time: the time budget ends an experiment gracefully, and resume=true finishes it."""

from __future__ import annotations

import json

import pandas as pd
import pytest

import yolotune
from conftest import run_cli, small_sweep_overrides
from yolotune import layout

pytestmark = pytest.mark.slow
EPOCHS = 100  # far more than the 15 s budget can train after start-up (an epoch takes 0.25-1.5 s here), yet quick to resume


def test_budget_stops_the_experiment_and_resume_finishes_it(tmp_path, shapes_cache):
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "b", iterations=2, epochs=EPOCHS)
                 if not o.startswith("scheduler")] + ["scheduler=fifo", "resources=cpu"]
    # A checkpoint only at the last epoch: the run must checkpoint the epoch it stops after.
    stopped = run_cli(*overrides, "budget.time=15s", f"checkpoint.every={EPOCHS}")
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0, out[-3000:]
    exp_dir = tmp_path / "b"
    results = yolotune.load(exp_dir)
    assert results.status == "stopped by budget" and layout.stopped_by_budget(exp_dir)
    assert "(stopped by budget)" in stopped.stdout and "The time budget (15s) ended the experiment" in stopped.stdout
    epochs_before = results.history().groupby("trial_id").epoch.max()
    assert 0 < epochs_before.max() < EPOCHS  # some epochs done, none of the trials complete
    for trial_dir in exp_dir.glob("trial_*"):  # each stopped at an epoch end, which was checkpointed
        reports = [json.loads(line) for line in (trial_dir / "result.json").read_text().splitlines()]
        assert reports[-1]["epoch"] == epochs_before[reports[-1]["trial_id"]] and reports[-1]["checkpoint_dir_name"]
        assert reports[-1]["validated"] == 1 and "val/box_loss" in reports[-1]  # FIFO: only the stop's epoch
        assert not any(r["validated"] or "val/box_loss" in r for r in reports[:-1])
        assert not any(r["checkpoint_dir_name"] for r in reports[:-1])
    for name in ("trials.csv", "best_hyperparameters.yaml", "best.pt", "report.html"):
        assert (exp_dir / name).is_file(), name

    resumed = run_cli("resume=true", f"storage={tmp_path}", "budget.time=20m")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    results = yolotune.load(exp_dir)
    assert results.status == "finished" and not layout.stopped_by_budget(exp_dir)
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 2 and (trials["epochs"] == EPOCHS).all() and (trials["status"] == "TERMINATED").all()
    history = results.history()
    for trial_id in epochs_before.index:  # continued after its last epoch, no epoch trained twice
        assert sorted(history[history.trial_id == trial_id].epoch) == list(range(1, EPOCHS + 1))
        raw, _ = layout.read_jsonl(exp_dir / layout.trial_dirname(trial_id) / layout.HISTORY)
        assert [row["epoch"] for row in raw] == list(range(1, EPOCHS + 1))
