"""A real multi-objective sweep (fitness and latency_ms, imgsz and model tuned as choices): its front and
its best files follow the rule, computed here from the trials' raw files."""

from __future__ import annotations

import json

import pytest
import yaml

from conftest import run_cli, small_sweep_overrides
from yolotune.results import load

pytestmark = pytest.mark.slow

SELECT = "latency_ms<=1000"  # a second per 64 px image: every trial meets it, unless the measuring is wrong


def test_a_sweep_ranks_its_trials_by_pareto_front_and_keeps_the_selected_one(tmp_path, shapes_cache):
    ours = ("iterations=", "data.train_images=", "data.val_images=", "imgsz=", "metric=", "mode=", "scheduler")
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "pareto", epochs=1) if not o.startswith(ours)]
    proc = run_cli(*overrides, "iterations=1", "data.train_images=8", "data.val_images=8", "~train.imgsz",
                   "space.imgsz='grid([32, 64])'", "space.model={dist:choice,values:[yolo11n.yaml]}",
                   "scheduler=fifo", "objectives=[fitness:max,latency_ms:min]", f"select={SELECT}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "pareto"

    # the raw values: each trial's best fitness over its validated epochs, its model measured in its last report
    events = [json.loads(line) for line in (exp / "trials.jsonl").read_text().splitlines()]
    order = list(dict.fromkeys(e["trial_id"] for e in events))
    completed = {e["trial_id"]: e for e in events if e["event"] == "completed"}
    values, sampled = {}, {e["trial_id"]: e["config"] for e in events if e["event"] == "started"}
    for trial_id in order:
        rows = [json.loads(line) for line in (exp / f"trial_{trial_id}" / "history.jsonl").read_text().splitlines()]
        assert all(("latency_ms" in row) == (row is rows[-1]) for row in rows)  # measured once, after training
        assert completed[trial_id]["latency_ms"] == rows[-1]["latency_ms"] > 0  # recorded in trials.jsonl too
        values[trial_id] = (max(r["fitness"] for r in rows if r["validated"]), rows[-1]["latency_ms"],
                            rows[-1]["gflops"])
    assert sorted(sampled[t]["imgsz"] for t in order) == [32, 64]
    gflops = {sampled[t]["imgsz"]: values[t][2] for t in order}
    assert gflops[64] == pytest.approx(4 * gflops[32], rel=0.01)  # the same model at twice the side

    def dominated(t):
        (f, lat, _), others = values[t], [values[o] for o in order if o != t]
        return any(of >= f and ol <= lat and (of > f or ol < lat) for of, ol, _ in others)

    front = {t for t in order if not dominated(t)}
    meets = [t for t in order if values[t][1] <= 1000]
    chosen = max(meets, key=lambda t: (values[t][0], t in front, -order.index(t)))

    results = load(exp)
    pareto = results.pareto().set_index("trial_id")
    assert set(pareto.index[pareto.pareto_rank == 1]) == front
    assert results.best()["trial_id"] == chosen
    best = yaml.safe_load((exp / "best_hyperparameters.yaml").read_text())
    assert (best["imgsz"], best["model"], best["lr0"]) == (sampled[chosen]["imgsz"], "yolo11n.yaml",
                                                           pytest.approx(sampled[chosen]["lr0"]))
    assert (exp / "best.pt").is_file() and (exp / "plots" / "pareto.png").is_file()
    assert "pareto.png" in (exp / "report.html").read_text()
