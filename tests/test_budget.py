"""budget.time: the time budget ends an experiment gracefully, and resume=true finishes it."""

from __future__ import annotations

import pandas as pd
import pytest

import yolotune
from conftest import run_cli, small_sweep_overrides
from yolotune import layout

pytestmark = pytest.mark.slow
EPOCHS = 150  # far more than the 30 s budget can train (an epoch takes 0.5-1.5 s here), yet quick to resume


def test_budget_stops_the_experiment_and_resume_finishes_it(tmp_path, shapes_cache):
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "b", iterations=2, epochs=EPOCHS)
                 if not o.startswith("scheduler")] + ["scheduler=fifo", "resources=cpu"]
    stopped = run_cli(*overrides, "budget.time=30s")
    out = stopped.stdout + stopped.stderr
    assert stopped.returncode == 0, out[-3000:]
    exp_dir = tmp_path / "b"
    results = yolotune.load(exp_dir)
    assert results.status == "stopped by budget" and layout.stopped_by_budget(exp_dir)
    assert "(stopped by budget)" in stopped.stdout and "The time budget (30s) ended the experiment" in stopped.stdout
    epochs_before = results.history().groupby("trial_id").epoch.max()
    assert 0 < epochs_before.max() < EPOCHS  # some epochs done, none of the trials complete
    for name in ("trials.csv", "best_hyperparameters.yaml", "best.pt", "report.html"):
        assert (exp_dir / name).is_file(), name

    resumed = run_cli("resume=true", f"storage={tmp_path}", "budget.time=20m")
    assert resumed.returncode == 0, (resumed.stdout + resumed.stderr)[-3000:]
    results = yolotune.load(exp_dir)
    assert results.status == "finished" and not layout.stopped_by_budget(exp_dir)
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 2 and (trials["epochs"] == EPOCHS).all() and (trials["status"] == "TERMINATED").all()
    history = results.history()
    for trial_id in epochs_before.index:  # continued from its checkpoint, no epoch trained twice
        assert sorted(history[history.trial_id == trial_id].epoch) == list(range(1, EPOCHS + 1))
