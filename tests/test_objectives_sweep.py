"""A real multi-objective sweep (fitness and latency_ms, imgsz and model tuned as choices): its front and
its best files follow the rule, computed here from the trials' raw files, with each trial's latency as the
driver measured it alone after the trials (latency.jsonl), by the method recorded beside it; trials.csv, the
JSON output and the report carry every objective's value."""

from __future__ import annotations

import json

import pandas as pd
import pytest
import yaml

from conftest import run_cli, small_sweep_overrides
from test_objectives_fast import html_table
from yolotune.model_costs import CPU_THREADS, describe, latency_alone
from yolotune.results import load
from yolotune.results_cli import main as results_main

pytestmark = pytest.mark.slow

SELECT = "latency_ms<=1000"  # a second per 64 px image: every trial meets it, unless the measuring is wrong


def test_a_sweep_ranks_its_trials_by_pareto_front_and_keeps_the_selected_one(tmp_path, shapes_cache, capsys):
    ours = ("iterations=", "data.train_images=", "data.val_images=", "imgsz=", "metric=", "mode=", "scheduler")
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "pareto", epochs=1) if not o.startswith(ours)]
    proc = run_cli(*overrides, "iterations=1", "data.train_images=8", "data.val_images=8", "~train.imgsz",
                   "space.imgsz='grid([32, 64])'", "space.model={dist:choice,values:[yolo11n.yaml]}",
                   "scheduler=fifo", "objectives=[fitness:max,latency_ms:min]", f"select={SELECT}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp = tmp_path / "pareto"

    # the raw values: each trial's best fitness over its validated epochs, its params and GFLOPs measured in its
    # last report, its latency measured alone by the driver after the trials (the trial's own timing, on the
    # device it shared, stays in its history and trials.jsonl: what the searcher was told)
    events = [json.loads(line) for line in (exp / "trials.jsonl").read_text().splitlines()]
    order = list(dict.fromkeys(e["trial_id"] for e in events))
    completed = {e["trial_id"]: e for e in events if e["event"] == "completed"}
    alone = {}
    for line in (exp / "latency.jsonl").read_text().splitlines():
        record = json.loads(line)
        assert record["trial_id"] not in alone  # each trial measured once
        alone[record["trial_id"]] = record
    values, sampled = {}, {e["trial_id"]: e["config"] for e in events if e["event"] == "started"}
    for trial_id in order:
        rows = [json.loads(line) for line in (exp / f"trial_{trial_id}" / "history.jsonl").read_text().splitlines()]
        assert all(("latency_ms" in row) == (row is rows[-1]) for row in rows)  # measured once, after training
        assert completed[trial_id]["latency_ms"] == rows[-1]["latency_ms"] > 0  # recorded in trials.jsonl too
        values[trial_id] = (max(r["fitness"] for r in rows if r["validated"]), alone[trial_id]["latency_ms"],
                            rows[-1]["gflops"])
        imgsz = sampled[trial_id]["imgsz"]
        assert {k: alone[trial_id][k] for k in ("method", "device", "threads", "imgsz", "batch", "warmup",
                                                "repeats")} == {
            "method": "alone", "device": "cpu", "threads": CPU_THREADS, "imgsz": [imgsz, imgsz], "batch": 1,
            "warmup": 3, "repeats": 15}
    # the same model measured again here by the stated method: within the spread of the two measurements
    weights = (exp / f"trial_{order[0]}" / "train" / "weights" / "best_by_metric.pt").read_bytes()
    again, first = latency_alone(weights, gpu=False), alone[order[0]]
    assert again["imgsz"] == first["imgsz"]
    assert abs(again["latency_ms"] - first["latency_ms"]) <= 2 * (again["latency_iqr_ms"] + first["latency_iqr_ms"])
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
    report_text = (exp / "report.html").read_text()
    assert "pareto.png" in report_text

    # every objective's value, where results are read: trials.csv, the JSON output, the report's table
    csv = pd.read_csv(exp / "trials.csv").set_index("trial_id")
    assert results_main([str(exp), "--format", "json"]) == 0
    ranked = {r["trial_id"]: r for r in json.loads(capsys.readouterr().out)["ranked"]}
    html = {r["trial_id"]: r for r in html_table(report_text)}
    for trial_id in order:
        fitness, latency, _ = values[trial_id]
        method = describe(alone[trial_id])
        assert (csv.loc[trial_id, "fitness"], csv.loc[trial_id, "latency_ms"]) == (fitness, latency)
        assert csv.loc[trial_id, "latency_method"] == method and method in report_text
        assert (ranked[trial_id]["best_fitness"], ranked[trial_id]["latency_ms"]) == (fitness, latency)
        assert ranked[trial_id]["latency_method"] == method
        assert float(html[trial_id]["latency_ms"]) == pytest.approx(latency, rel=1e-3)  # shown to 4 digits

    # a run killed while it measured (one trial measured, not yet finished): the resumed run trains nothing
    # and measures the other one only
    (exp / "latency.jsonl").write_text(json.dumps(alone[order[0]]) + "\n")
    (exp / ".finished").unlink()
    proc = run_cli(f"storage={tmp_path}", "name=pareto", "resume=true")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "Measuring the latency of 1 trial alone, one at a time, on the CPU (1 thread)" in proc.stdout
    remeasured = [json.loads(line) for line in (exp / "latency.jsonl").read_text().splitlines()]
    assert [r["trial_id"] for r in remeasured] == order and remeasured[0] == alone[order[0]]
    assert {k: remeasured[1][k] for k in ("imgsz", "threads")} == {k: alone[order[1]][k] for k in ("imgsz", "threads")}
    assert (exp / ".finished").is_file() and len(load(exp).pareto().pareto_rank.dropna()) == 2
