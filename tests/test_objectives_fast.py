"""Several objectives on recorded experiments (no training, seconds): Pareto ranks against fronts worked
out by hand (ties, missing values, three objectives), the select rule on both sides of its bound, the
files it decides, the Pareto plot's points, and the results command's Pareto rank column.

Experiments are written here as a sweep leaves them (saved config, trials.jsonl, histories).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pandas as pd
import pytest
import yaml

from yolotune import plots, report
from yolotune.layout import BEST_HYPERPARAMETERS
from yolotune.model_costs import describe
from yolotune.objectives import Objective, pareto_ranks
from yolotune.results import load
from yolotune.results_cli import main as results_main
from yolotune.storage import Location

NAN = float("nan")
# name: (fitness, latency_ms); NaN: not measured. The front by hand (fitness max, latency min):
# A and D tie (neither dominates the other), B and E are beaten by nobody: rank 1; C is dominated by B
# (as fast, less accurate): rank 2; F by C among the rest: rank 3; G errored, H has no latency: no rank.
TRIALS = {"A": (0.9, 10.0), "B": (0.8, 5.0), "C": (0.7, 5.0), "D": (0.9, 10.0), "E": (0.5, 2.0), "F": (0.6, 12.0),
          "G": (NAN, NAN), "H": (0.8, NAN)}
RANKS = {"A": 1, "B": 1, "C": 2, "D": 1, "E": 1, "F": 3, "G": None, "H": None}
OBJECTIVES = ["fitness:max", "latency_ms:min"]


# How the driver measured each trial's latency alone (model_costs.latency_alone's record, less the value)
METHOD = {"method": "alone", "device": "cpu", "threads": 1, "imgsz": [64, 64], "batch": 1,
          "precision": "fp32, Conv+BN fused", "warmup": 3, "repeats": 15, "latency_iqr_ms": 0.1}


def recorded(exp_dir: Path, trials: dict, objectives=OBJECTIVES, select=None) -> Path:
    """trials: name -> {objective name: value}; each trial validates twice (its best fitness at epoch 2)
    and measures the model costs in its last report; all-NaN: errored before reporting. A latency is
    measured alone after the trials (latency.jsonl); the trial's own timing on the shared device, in its
    history, is another (100 minus it: the opposite order), which must not count."""
    (exp_dir / ".hydra").mkdir(parents=True)
    config = {"name": exp_dir.name, "iterations": len(trials), "metric": "fitness", "mode": "max",
              "objectives": objectives, "select": select, "space": {"lr0": "uniform(0.001, 0.1)"},
              "train": {"epochs": 2, "imgsz": None}, "model": {"weights": "yolo11n.yaml"}}
    (exp_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    events, alone = [], []
    for n, (name, values) in enumerate(trials.items()):
        failed = all(math.isnan(v) for v in values.values())
        events.append({"trial_id": name, "event": "started", "status": "RUNNING", "time": n,
                       "config": {"lr0": 0.001 * (n + 1)}})
        events.append({"trial_id": name, "event": "errored" if failed else "completed",
                       "status": "ERROR" if failed else "TERMINATED", "time": n + 0.5})
        costs = {k: v for k, v in values.items() if k != "fitness" and not math.isnan(v)}
        if "latency_ms" in costs:
            alone.append({"trial_id": name, "latency_ms": costs["latency_ms"], **METHOD, "time": n + 0.7})
            costs["latency_ms"] = 100 - costs["latency_ms"]
        rows = [] if failed else [{"epoch": e, "validated": 1, "fitness": values["fitness"] - 0.1 * (2 - e),
                                   "timestamp": 10.0 * n + e, "time_this_iter_s": 1.0, **(costs if e == 2 else {})}
                                  for e in (1, 2)]
        (exp_dir / f"trial_{name}").mkdir()
        (exp_dir / f"trial_{name}" / "history.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (exp_dir / "trials.jsonl").write_text("".join(json.dumps(e) + "\n" for e in events))
    (exp_dir / "latency.jsonl").write_text("".join(json.dumps(r) + "\n" for r in alone))
    return exp_dir


def two_objectives(exp_dir: Path, select=None) -> Path:
    return recorded(exp_dir, {k: {"fitness": f, "latency_ms": t} for k, (f, t) in TRIALS.items()}, select=select)


def test_pareto_ranks_of_two_objectives_with_ties_and_missing_values(tmp_path):
    results = load(two_objectives(tmp_path / "exp"))
    pareto = results.pareto().set_index("trial_id")
    assert {t: None if pd.isna(r) else int(r) for t, r in pareto["pareto_rank"].items()} == RANKS
    assert pareto.loc["A", "fitness"] == 0.9  # the trial's best over its validated epochs, not its first
    ranked = results.ranked()
    # by rank, then fitness, then trial order; without a rank last (H has a fitness, G none)
    assert list(ranked.trial_id) == ["A", "D", "B", "E", "C", "F", "H", "G"]
    assert list(ranked["rank"].astype("float").fillna(0)) == [1, 2, 3, 4, 5, 6, 0, 0]


def test_pareto_ranks_of_three_objectives():
    # (fitness max, latency min, params min): R beats Q in params alone; P is the most accurate, S the
    # smallest; T is beaten by S (params), Q by R: rank 2.
    values = pd.DataFrame({"fitness": [0.9, 0.8, 0.8, 0.7, 0.7], "latency_ms": [10, 5, 5, 20, 20],
                           "params": [9, 9, 3, 1, 2]}, index=list("PQRST"))
    ranks = pareto_ranks(values, [Objective("fitness", "max"), Objective("latency_ms", "min"),
                                  Objective("params", "min")])
    assert ranks.to_dict() == {"P": 1, "Q": 2, "R": 1, "S": 1, "T": 2}


def test_pareto_ranks_of_minimised_objectives_and_all_missing():
    objectives = [Objective("a", "min"), Objective("b", "min")]
    values = pd.DataFrame({"a": [1.0, 2.0, 3.0], "b": [3.0, 2.0, 3.0]})
    assert pareto_ranks(values, objectives).tolist() == [1, 1, 2]
    assert pareto_ranks(values * NAN, objectives).isna().all()


@pytest.mark.parametrize("select,best", [
    (None, "A"),                 # the most accurate; A and D tie, the earlier trial wins
    ("latency_ms<=5", "B"),      # B is at the bound: it counts
    ("latency_ms<5", "E"),       # B and C are at the bound: out
    ("latency_ms<=5 and fitness>=0.8", "B"),
    ("fitness>0.8", "A"),
    ("latency_ms<=1", None),     # nobody
    ("fitness<0.7", "F"),        # E and F meet it: F is the more accurate, though on the third front and E on the first
    ("latency_ms>=11", "F"),     # F alone meets it, on the third front
])
def test_select_picks_the_most_accurate_trial_that_meets_it_and_the_best_files_follow(select, best, tmp_path):
    from yolotune.runner import export_best

    results = load(two_objectives(tmp_path / "exp", select))
    chosen = results.best()
    assert (chosen["trial_id"] if chosen is not None else None) == best
    written = export_best(results, Location(str(results.path)))
    target = results.path / BEST_HYPERPARAMETERS
    if best is None:
        assert written == [] and not target.exists()
        assert report.rule_line(results) == [f"Best trial: {results.select_rule}: no trial met it, so no best weights "
                                             "or hyperparameters"]
        more_to_come = yaml.safe_load((results.path / ".hydra" / "config.yaml").read_text())
        (results.path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({**more_to_come, "iterations": 99}))
        assert report.rule_line(load(results.path)) == [f"Best trial: {results.select_rule}: no trial meets it yet"]
        return
    lr0 = 0.001 * (list(TRIALS).index(best) + 1)
    assert yaml.safe_load(target.read_text())["lr0"] == pytest.approx(lr0)
    assert "imgsz" not in yaml.safe_load(target.read_text())  # train.imgsz: null is unset


def test_pareto_plot_draws_the_front_and_the_rest(tmp_path):
    results = load(two_objectives(tmp_path / "exp", "latency_ms<=5"))
    fig = plots.figure(results, "pareto")
    drawn = {c.get_gid(): sorted(map(tuple, c.get_offsets().tolist())) for ax in fig.axes for c in ax.collections}
    point = {k: (TRIALS[k][1], TRIALS[k][0]) for k in TRIALS}  # (latency on x, fitness on y)
    assert drawn["front"] == sorted(point[k] for k in "ABDE")
    assert drawn["dominated"] == sorted(point[k] for k in "CF")
    written = report.write_all(results)
    assert written["pareto"] == results.path / "plots" / "pareto.png" and written["pareto"].stat().st_size > 0
    assert (results.path / "report.html").read_text().count("data:image/png;base64,") == len(plots.KINDS) + 1


def test_pareto_plot_of_three_objectives_has_a_panel_per_other_objective(tmp_path):
    trials = {"P": (0.9, 10, 9), "Q": (0.8, 5, 9), "R": (0.8, 5, 3)}
    results = load(recorded(tmp_path / "exp", {k: dict(zip(("fitness", "latency_ms", "params"), v))
                                               for k, v in trials.items()},
                            objectives=[*OBJECTIVES, "params:min"]))
    fig = plots.figure(results, "pareto")
    panels = [ax for ax in fig.axes if ax.collections]
    assert [ax.get_xlabel().split()[0] for ax in panels] == ["latency_ms", "params"]
    front = {c.get_gid(): len(c.get_offsets()) for c in panels[1].collections}
    assert (front["front"], front["dominated"]) == (2, 1)  # Q is dominated by R


def test_results_command_shows_the_pareto_rank(tmp_path, capsys):
    path = two_objectives(tmp_path / "exp", "latency_ms<=5")
    assert results_main([str(path)]) == 0
    out = capsys.readouterr().out
    header = next(line for line in out.splitlines() if "pareto_rank" in line)
    assert header.split()[:3] == ["rank", "pareto_rank", "trial_id"] and "latency_ms" in header
    assert "Best trial: the highest fitness among trials with latency_ms<=5" in out
    assert results_main([str(path), "--format", "json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert [(r["trial_id"], r["pareto_rank"]) for r in data["ranked"]][:5] == [
        ("A", 1), ("D", 1), ("B", 1), ("E", 1), ("C", 2)]
    assert data["best"]["trial_id"] == "B" and data["objectives"] == OBJECTIVES


def test_latency_alone_times_the_checkpoint_at_its_image_size_by_the_method_it_records():
    """Every forward pass seen from outside (a global torch hook): warm-up plus timed passes, each of one
    image at the checkpoint's imgsz, at CPU_THREADS threads, as the record says. Two measurements of the
    same model agree within the spread of their own passes (no bound on the time itself)."""
    import io

    import torch
    from ultralytics import YOLO

    from yolotune.model_costs import CPU_THREADS, latency_alone

    buffer = io.BytesIO()
    torch.save({"model": YOLO("yolo11n.yaml").model, "ema": None, "train_args": {"imgsz": 64}}, buffer)
    passes = []

    def seen(module, args):
        if type(module).__name__ == "DetectionModel":
            passes.append((tuple(args[0].shape), torch.get_num_threads()))

    threads = torch.get_num_threads()
    hook = torch.nn.modules.module.register_module_forward_pre_hook(seen)
    try:
        first, second = (latency_alone(buffer.getvalue(), gpu=False) for _ in range(2))
    finally:
        hook.remove()
        torch.set_num_threads(threads)
    assert {k: first[k] for k in ("method", "device", "threads", "imgsz", "batch", "warmup", "repeats")} == {
        "method": "alone", "device": "cpu", "threads": CPU_THREADS, "imgsz": [64, 64], "batch": 1, "warmup": 3,
        "repeats": 15}
    assert passes == [((1, 3, 64, 64), CPU_THREADS)] * 2 * (3 + 15)
    assert abs(first["latency_ms"] - second["latency_ms"]) <= 2 * (first["latency_iqr_ms"] + second["latency_iqr_ms"])
    assert describe(first) == ("alone on cpu, 1 thread, 64x64, batch 1, fp32, Conv+BN fused, median of 15 after "
                               "3 warm-up")


def test_trials_csv_json_and_report_carry_every_objective_and_how_latency_was_measured(tmp_path, capsys):
    trials = {"P": (0.9, 10.0, 9.0), "Q": (0.8, 5.0, 9.0), "R": (0.8, 5.0, 3.0)}
    path = recorded(tmp_path / "exp", {k: dict(zip(("fitness", "latency_ms", "params"), v)) for k, v in trials.items()},
                    objectives=[*OBJECTIVES, "params:min"], select="latency_ms<=5")
    # read back independently: latency from the driver's record, params and the best fitness from the histories
    alone = {r["trial_id"]: r["latency_ms"] for r in map(json.loads, (path / "latency.jsonl").read_text().splitlines())}
    histories = {t: [json.loads(line) for line in (path / f"trial_{t}" / "history.jsonl").read_text().splitlines()]
                 for t in trials}
    expected = {t: {"fitness": max(r["fitness"] for r in rows), "latency_ms": alone[t], "params": rows[-1]["params"]}
                for t, rows in histories.items()}
    method = describe({**METHOD, "latency_ms": 0})
    assert results_main([str(path), "--format", "json", "--report"]) == 0
    data = json.loads(capsys.readouterr().out)
    csv = pd.read_csv(path / "trials.csv").set_index("trial_id")
    for t, values in expected.items():
        assert {k: csv.loc[t, k] for k in values} == values
        assert (csv.loc[t, "latency_method"], csv.loc[t, "pareto_rank"]) == (method, 2 if t == "Q" else 1)
        row = next(r for r in data["ranked"] if r["trial_id"] == t)
        assert {k: row[f"best_{k}" if k == "fitness" else k] for k in values} == values
        assert row["latency_method"] == method
    report_text = (path / "report.html").read_text()
    table = html_table(report_text)  # the report's trials: its first table
    assert {r["trial_id"]: (float(r["best_fitness"]), float(r["latency_ms"]), float(r["params"])) for r in table} == {
        t: (v["fitness"], v["latency_ms"], v["params"]) for t, v in expected.items()}
    line = f"latency_ms measured {method}"
    assert line in report_text and line in report.summary(load(path)).splitlines()


def html_table(page: str) -> list:
    """The first table of an HTML page: one dict per row, by its header cells."""
    from html.parser import HTMLParser

    rows = []

    class Cells(HTMLParser):
        cell = None

        def handle_starttag(self, tag, attrs):
            if tag == "tr":
                rows.append([])
            elif tag in ("td", "th"):
                self.cell = ""

        def handle_data(self, data):
            if self.cell is not None:
                self.cell += data

        def handle_endtag(self, tag):
            if tag in ("td", "th"):
                rows[-1].append(self.cell.strip())
                self.cell = None
            elif tag == "table":
                raise StopIteration

    try:
        Cells().feed(page)
    except StopIteration:
        pass
    return [dict(zip(rows[0], row)) for row in rows[1:]]


def test_trials_not_measured_alone_have_no_latency_and_the_summary_says_who_waits(tmp_path):
    path = two_objectives(tmp_path / "exp", "latency_ms<=5")
    kept = [line for line in (path / "latency.jsonl").read_text().splitlines() if json.loads(line)["trial_id"] != "B"]
    (path / "latency.jsonl").write_text("\n".join(kept) + "\n")
    results = load(path)
    pareto = results.pareto().set_index("trial_id")
    assert math.isnan(pareto.loc["B", "latency_ms"]) and pd.isna(pareto.loc["B", "pareto_rank"])  # its in-trial 95 ms
    assert pd.isna(pareto.loc["B", "latency_method"]) and pareto.loc["A", "latency_method"] == describe(
        {**METHOD, "latency_ms": 0})
    assert results.latency_unmeasured == ["B", "H"]  # G errored: never measured
    assert results.best()["trial_id"] == "C"  # B met latency_ms<=5 but is not measured: C is the next that does
    assert report.latency_lines(results)[-1] == (
        "latency_ms not measured yet for 2 ended trials (B, H), without a Pareto rank till then: measured alone "
        "once the run's trials have ended (after an interrupted run, by the next resume=true)")
