"""The side-by-side benchmark's figures, from driver-side trial timings made up here."""

from __future__ import annotations

import importlib.util

import pytest

from compose import REPO, experiment
from yolotune.config import validate

spec = importlib.util.spec_from_file_location("bench_vs_ultralytics", REPO / "scripts" / "bench_vs_ultralytics.py")
bench = importlib.util.module_from_spec(spec)
spec.loader.exec_module(bench)


def _result(at, seconds, validated=1, score=0.0):
    return {"at": at, "time_this_iter_s": seconds, "validated": validated, bench.METRIC: score}


def test_fixed_costs_efficiency_and_best_from_trial_timings():
    # Process 100 -> 140. Two slots. Validated epochs take 4 s, unvalidated 2 s once steady.
    trials = [
        {"start": 105.0, "results": [_result(113.0, 8.0), _result(115.0, 2.0, 0), _result(119.0, 4.0, 1, 0.3)]},
        {"start": 106.0, "results": [_result(111.0, 5.0, 0), _result(115.0, 4.0, 1, 0.2)]},
        {"start": 120.0, "results": [_result(123.0, 3.0, 1, 0.1)]},  # a first epoch shorter than a steady one
    ]
    stats = bench.summarise(trials, started=100.0, ended=140.0, slots=2, written=12 * 2**20)
    assert stats["wall_s"] == 40.0 and stats["trials"] == 3 and stats["trial_epochs"] == 6
    assert stats["to_first_trial_s"] == 5.0
    # First steps: 113 - 4 (a validated epoch), 111 - 2 (unvalidated), 123 - 3 (its whole delay)
    assert stats["to_first_step_s"] == 9.0
    assert stats["after_last_epoch_s"] == 17.0
    busy = (4 + 2 + 4) + (2 + 4) + 3
    assert stats["efficiency"] == pytest.approx(busy / (40 * 2))
    assert stats["best_map"] == 0.3
    assert stats["written_mb_per_epoch"] == 2.0  # 12 MiB over 6 trial-epochs


@pytest.mark.parametrize("variant", list(bench.VARIANTS))
def test_every_variant_composes_and_validates(variant):
    validate(experiment("resources=cpu", *bench.VARIANTS[variant]))
