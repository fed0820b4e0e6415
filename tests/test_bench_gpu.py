"""The GPU benchmark's figures, from driver-side epoch times made up here, and its answer without a GPU."""

from __future__ import annotations

import importlib.util
import math
import sys

from conftest import REPO

spec = importlib.util.spec_from_file_location("bench_gpu", REPO / "scripts" / "bench_gpu.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _epoch(trial, at, seconds, pid=1, gpu=None):
    return {"trial": trial, "at": at, "seconds": seconds, "pid": pid, "gpu": gpu}


# 4 trials started together at 100: set-up and epoch 1 end at 130, epoch 2 takes each of them 10 s.
WAVE = [_epoch(t, 130.0, 30.0) for t in "abcd"] + [_epoch(t, 140.0, 10.0) for t in "abcd"]


def test_a_wave_of_trials_counts_its_steady_epochs_over_the_time_they_ran():
    assert bench.steady_rate(WAVE) == 4 / 10 * 60  # not 7 epoch ends over 10 s
    assert bench.steady_window(WAVE) == (130.0, 140.0)
    assert bench.end_to_end_rate(WAVE, started=80.0) == 8 / 60 * 60
    assert bench.most_at_once(WAVE) == 4


def test_trials_one_after_another_leave_out_their_starts_and_the_gaps_between_them():
    # Trial b starts as a ends; each steady epoch takes 5 s, the gap between them (b's start-up) is not counted.
    epochs = [_epoch("a", 20.0, 10.0), _epoch("a", 25.0, 5.0), _epoch("b", 40.0, 15.0), _epoch("b", 45.0, 5.0)]
    assert bench.steady_rate(epochs) == 2 / 10 * 60
    assert bench.steady_window(epochs) == (20.0, 45.0)
    assert bench.most_at_once(epochs) == 1  # a ends at 25, b's first epoch starts there


def test_overlapping_steady_epochs_count_their_union_once():
    epochs = [_epoch("a", 10.0, 10.0), _epoch("a", 20.0, 10.0), _epoch("b", 15.0, 10.0), _epoch("b", 25.0, 10.0)]
    assert bench.steady_rate(epochs) == 2 / 15 * 60  # [10, 20] and [15, 25]: 15 s
    assert bench.most_at_once(epochs) == 2


def test_a_run_without_epochs_has_no_rates():
    assert math.isnan(bench.steady_rate([])) and math.isnan(bench.end_to_end_rate([], 0.0))
    assert bench.most_at_once([]) == 0 and all(math.isnan(t) for t in bench.steady_window([]))


def test_a_measurement_is_one_row_under_its_header():
    measurement = {"tool": "ultralytics", "per GPU": 8, "trials": 8, "at once": 8, "t-e/min steady": 31.25,
                   "t-e/min e2e": math.nan, "GPU util %": "97", "peak GPU GB": 55.0, "GB/process": 6.5,
                   "CPU %": 80.0, "wall s": 62.4, "errored": 0}
    header, row = bench.header(), bench.row(measurement)
    assert len(row) == len(header)
    assert row.split() == ["ultralytics", "8", "8", "8", "31.2", "nan", "97", "55.0", "6.50", "80", "62", "0"]


def test_without_a_gpu_it_says_so_and_exits_0(monkeypatch, capsys):
    monkeypatch.setattr(bench, "_gpus", lambda: [])
    monkeypatch.setattr(sys, "argv", ["bench_gpu.py", "--quick"])
    assert bench.main() == 0
    assert "No GPU found" in capsys.readouterr().out


def test_quick_covers_1_2_4_and_8_trials_per_gpu_in_one_wave_each():
    assert sorted(bench.QUICK["per_gpu"]) == [1, 2, 4, 8] and bench.QUICK["trials"] == 0
    assert bench.QUICK["budget_min"] < 8


def test_a_run_stopped_by_its_time_budget_is_no_failure():
    assert not bench.run_failed("exit 0") and not bench.run_failed(bench.BUDGET_STOP)
    assert bench.run_failed("exit 1") and bench.run_failed("exit -9")
