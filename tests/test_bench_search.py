"""scripts/bench_search.py --quick: every setup runs, and the CSV agrees with the runs' own histories."""

from __future__ import annotations

import subprocess
import sys

import pandas as pd
import pytest

import yolotune
from conftest import REPO

pytestmark = pytest.mark.slow
# The baseline, a searcher with ASHA, BOHB (its own scheduler) and Ultralytics' tuner: the script's every kind of
# run. random+asha, hyperopt+asha and pbt run as yolotune runs like tpe+asha (test_sweep runs those options).
SETUPS = ("full-random", "tpe+asha", "bohb", "ultralytics")


def test_quick_benchmark_writes_a_consistent_csv_and_a_plot(tmp_path):
    proc = subprocess.run([sys.executable, "scripts/bench_search.py", "--quick", "--out", str(tmp_path), "--setups", *SETUPS], cwd=REPO,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-3000:]
    assert (tmp_path / "search.png").stat().st_size > 0
    frame = pd.read_csv(tmp_path / "search.csv")
    assert set(frame.setup) == set(SETUPS), proc.stdout[-3000:]
    for (setup, run_dir), run in frame.groupby(["setup", "run_dir"]):
        history = (pd.read_json(f"{run_dir}/history.jsonl", lines=True) if setup == "ultralytics"
                   else yolotune.load(run_dir).history())
        assert list(run.trial_epochs) == list(range(1, len(history) + 1))  # one row per trial-epoch run
        assert run.best_fitness.is_monotonic_increasing
        assert run.best_fitness.iloc[-1] == pytest.approx(history.fitness.max())
        assert sorted(run.fitness) == pytest.approx(sorted(history.fitness))
    for setup in SETUPS:
        assert setup in proc.stdout  # the table has a row for each
