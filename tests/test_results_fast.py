"""Results on experiment directories built by hand: no Ray cluster, no training, seconds.

Every expected value is computed here from the raw rows the fixture wrote, never by yolotune.
"""

from __future__ import annotations

import io
import json
import pickle
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from pyarrow.fs import LocalFileSystem
import yaml

from yolotune import layout, plots, records, report
from yolotune.errors import ConfigError
from yolotune.results import UnreadableExperiment, better, load, measured
from yolotune.results_cli import main as results_main

REPO = Path(__file__).resolve().parents[1]

LOSS, FITNESS = "val/box_loss", "fitness"  # the experiment's metric (min), and a max metric
EPOCHS = 5
# Non-monotonic curves: neither the first, the last nor the worst epoch is the best.
TRIALS = {
    "t_done": dict(events=["started", "completed"], lr0=0.01, momentum=0.90,
                   loss=[1.50, 1.20, 1.35, 1.10, 1.30], fitness=[0.10, 0.30, 0.20, 0.25, 0.15]),
    "t_early": dict(events=["started", "completed"], lr0=0.001, momentum=0.80,
                    loss=[1.40, 1.15], fitness=[0.22, 0.35]),
    "t_paused": dict(events=["started", "paused"], lr0=0.05, momentum=0.70,
                     loss=[1.60, 1.05, 1.25], fitness=[0.05, 0.12, 0.40]),
    "t_error": dict(events=["started", "errored"], lr0=0.002, momentum=0.95,
                    loss=[1.45, 1.12], fitness=[0.20, 0.18]),
    "t_running": dict(events=["started"], lr0=0.0005, momentum=0.60,
                      loss=[1.70, 1.55, 1.60], fitness=[0.02, 0.08, 0.07]),
}
ITERATIONS = 6  # one trial not started yet
STATUS = {"started": "RUNNING", "completed": "TERMINATED", "paused": "PAUSED", "errored": "ERROR"}
ERROR = "ValueError: NotAnOptimizer is not an optimizer"


def saved_config(iterations=ITERATIONS) -> dict:
    """.hydra/config.yaml as the runner writes it (see experiment.save_config)."""
    return {
        "defaults": [{"hydra": "yolotune"}, "_self_"], "hydra": {"searchpath": ["pkg://yolotune.conf"]},
        "name": "exp", "storage": "runs/tune", "iterations": iterations, "seed": 0, "metric": LOSS, "mode": "min",
        "resume": False, "resume_errored": False,
        "space": {"lr0": {"dist": "loguniform", "low": 1e-4, "high": 0.1}, "momentum": "uniform(0.6, 0.98)"},
        "train": {"epochs": EPOCHS, "imgsz": 64, "batch": 16},
        "model": {"weights": "yolo11n.yaml"},
        "scheduler": {"type": "asha", "grace_period": 1}, "search": {"type": "random"},
        "data": {"yaml": "/data/shapes.yaml"},
    }


def history_rows(trial_id: str) -> list:
    spec = TRIALS[trial_id]
    return [{"epoch": i + 1, LOSS: loss, FITNESS: fit, "train/box_loss": 2.0 - i / 10,
             "timestamp": 1000.0 + 100 * list(TRIALS).index(trial_id) + 10 * i, "time_this_iter_s": 10.0,
             "hostname": "node-a", "node_id": "abc123", "pid": 42}
            for i, (loss, fit) in enumerate(zip(spec["loss"], spec["fitness"]))]


def write_lines(path: Path, rows) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))


def build(exp_dir: Path, trials=TRIALS, iterations=ITERATIONS, rows=None) -> Path:
    (exp_dir / ".hydra").mkdir(parents=True)
    (exp_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(saved_config(iterations), sort_keys=False))
    events = []
    for n, (trial_id, spec) in enumerate(trials.items()):
        trial_dir = exp_dir / f"trial_{trial_id}"
        for event in spec["events"]:
            line = {"trial_id": trial_id, "event": event, "status": STATUS[event], "time": 1000.0 + n}
            if event == "started":
                line["config"] = {"lr0": spec["lr0"], "momentum": spec["momentum"]}
            if event == "errored":
                line.update(error=ERROR, error_file=str(trial_dir / "error.txt"))
            events.append(line)
        write_lines(trial_dir / "history.jsonl", (rows or history_rows)(trial_id))
        (trial_dir / "train").mkdir()
        (trial_dir / "train" / "args.yaml").write_text(yaml.safe_dump({"data": "/abs/shapes/data.yaml"}))
        if "errored" in spec["events"]:
            (trial_dir / "error.txt").write_text(f"Failure # 1 (occurred at 2025-01-01)\nTraceback\n  x\n{ERROR}\n")
    write_lines(exp_dir / "trials.jsonl", events)
    return exp_dir


@pytest.fixture
def exp(tmp_path) -> Path:
    return build(tmp_path / "storage" / "exp")


def expected(metric: str, mode: str) -> pd.DataFrame:
    """Per trial, from the raw rows: epochs, best value and its epoch, last value."""
    rows = []
    for trial_id in TRIALS:
        values = [row[metric] for row in history_rows(trial_id)]
        best = min(values) if mode == "min" else max(values)
        rows.append({"trial_id": trial_id, "epochs": len(values), "best": best, "best_epoch": values.index(best) + 1,
                     "last": values[-1], "status": STATUS[TRIALS[trial_id]["events"][-1]]})
    return pd.DataFrame(rows).set_index("trial_id")


def ranked_ids(metric: str, mode: str) -> list:
    return expected(metric, mode)["best"].sort_values(ascending=mode == "min").index.tolist()


def run_results(capsys, *args) -> tuple:
    code = results_main([str(a) for a in args])
    out, err = capsys.readouterr()
    return code, out, err


# --- reading and ranking ---------------------------------------------------------------------

@pytest.mark.parametrize("metric, mode", [(LOSS, "min"), (FITNESS, "max")])
def test_dataframe_holds_each_trials_best_epoch_and_last_value(exp, metric, mode):
    frame = load(exp).dataframe(metric).set_index("trial_id")
    want = expected(metric, mode)
    assert frame["epochs"].to_dict() == want["epochs"].to_dict()
    assert frame[f"best_{metric}"].to_dict() == pytest.approx(want["best"].to_dict())
    assert frame["best_epoch"].astype(int).to_dict() == want["best_epoch"].to_dict()
    assert frame[f"last_{metric}"].to_dict() == pytest.approx(want["last"].to_dict())
    assert frame["status"].to_dict() == want["status"].to_dict()
    assert frame["lr0"].to_dict() == {t: spec["lr0"] for t, spec in TRIALS.items()}


def test_ranking_uses_the_mode_lower_for_losses_higher_for_the_rest(exp):
    results = load(exp)
    assert (results.metric, results.mode) == (LOSS, "min")
    assert results.ranked()["trial_id"].tolist() == ranked_ids(LOSS, "min")
    by_fitness = load(exp, metric=FITNESS)
    assert by_fitness.mode == "max"
    assert by_fitness.ranked()["trial_id"].tolist() == ranked_ids(FITNESS, "max")
    assert load(exp, metric=FITNESS, mode="min").ranked()["trial_id"].tolist() == ranked_ids(FITNESS, "min")
    assert results.ranked(metric="train/box_loss")["trial_id"].tolist() == ranked_ids("train/box_loss", "min")
    assert results.ranked()["rank"].tolist() == list(range(1, len(TRIALS) + 1))


def test_best_trial_and_best_hyperparameters(exp):
    results = load(exp)
    winner = ranked_ids(LOSS, "min")[0]
    best = results.best()
    assert best["trial_id"] == winner
    assert best[f"best_{LOSS}"] == pytest.approx(expected(LOSS, "min").at[winner, "best"])
    assert results.best(FITNESS)["trial_id"] == ranked_ids(FITNESS, "max")[0]
    spec = TRIALS[winner]
    assert results.best_hyperparameters() == {"model": "yolo11n.yaml", "data": "/abs/shapes/data.yaml",
                                              **saved_config()["train"], "lr0": spec["lr0"],
                                              "momentum": spec["momentum"]}


def test_statuses_errors_and_unstarted_trials(exp):
    results = load(exp)
    assert results.status_counts() == {"ERROR": 1, "PAUSED": 1, "PENDING": 1, "RUNNING": 1, "TERMINATED": 2}
    assert results.errors == {"t_error": ERROR}
    assert results.trial_count == len(TRIALS) and results.unstarted == 1
    assert not results.finished
    assert results.problems == []


def test_a_trial_left_paused_by_its_scheduler_has_ended(tmp_path):
    ended = {t: s for t, s in TRIALS.items() if t != "t_running"}
    results = load(build(tmp_path / "e", ended, iterations=len(ended)))
    assert results.finished and results.unstarted == 0
    assert not load(build(tmp_path / "more", ended, iterations=len(ended) + 1)).finished


def test_history_is_every_row_the_trials_wrote(exp):
    history = load(exp).history()
    for trial_id in TRIALS:
        rows = history[history.trial_id == trial_id]
        raw = history_rows(trial_id)
        assert rows["epoch"].tolist() == [r["epoch"] for r in raw]
        assert rows[LOSS].tolist() == [r[LOSS] for r in raw]


def rewrite_config(exp_dir: Path, iterations=ITERATIONS, **changes) -> None:
    """The saved config with top-level ``changes``; iterations None: not in the file (an earlier yolotune's)."""
    config = {**saved_config(iterations), **changes}
    if iterations is None:
        del config["iterations"]
    (exp_dir / ".hydra" / "config.yaml").write_text(yaml.safe_dump(config, sort_keys=False))


GRID3, GRID2 = "grid([0.001, 0.01, 0.1])", "grid([0.9, 0.95])"
# (space, iterations (None: not saved), the trials the sweep plans): Ray runs every grid point `iterations` times.
PLANNED = [
    ({"lr0": GRID3, "momentum": "uniform(0.6, 0.98)"}, 2, 2 * 3),
    ({"lr0": GRID3, "momentum": GRID2}, 1, 3 * 2),
    ({"lr0": GRID3, "momentum": GRID2}, None, 3 * 2),  # iterations defaults to 1
    ({"lr0": "choice([0.001, 0.01, 0.1])", "momentum": GRID2}, 4, 4 * 2),  # a choice is sampled, not a grid
]


@pytest.mark.parametrize("space, iterations, planned", PLANNED, ids=["grid", "two-grids", "no-iterations", "choice"])
def test_unstarted_trials_of_a_grid_count_as_pending(exp, space, iterations, planned):
    rewrite_config(exp, iterations, space=space)
    results = load(exp)
    unstarted = planned - len(TRIALS)  # 5 recorded, one of them still running
    assert results.unstarted == unstarted and not results.finished
    recorded = [STATUS[spec["events"][-1]] for spec in TRIALS.values()]
    want = {s: recorded.count(s) for s in recorded}
    assert results.status_counts() == dict(sorted({**want, "PENDING": unstarted}.items()))


def moved_rows(trial_id: str) -> list:
    """history_rows of a trial resumed on another node at every epoch."""
    return [{**row, "hostname": f"node-{row['epoch']}", "node_id": f"id-{row['epoch']}", "gpu": str(row["epoch"])}
            for row in history_rows(trial_id)]


def test_trials_are_rows_in_record_order_on_the_node_of_their_last_epoch(tmp_path):
    frame = load(build(tmp_path / "moved", rows=moved_rows)).dataframe()
    assert frame["trial_id"].tolist() == list(TRIALS)  # trials.jsonl's order, not sorted by id
    last = [moved_rows(t)[-1] for t in TRIALS]
    assert frame[["hostname", "node_id", "gpu"]].to_dict("records") == [
        {"hostname": r["hostname"], "node_id": r["node_id"], "gpu": r["gpu"]} for r in last]


def test_trials_are_rows_with_the_batch_their_last_epoch_trained_with(tmp_path):
    """t_paused's batch went from 16 to 8 after its first epoch; t_early's history is from before the column."""
    def rows(trial_id):
        batches = {"t_paused": [16, 8, 8], "t_early": [None, None]}.get(trial_id, [16] * EPOCHS)
        return [{**row, "trained_batch": batch} if batch else row
                for row, batch in zip(history_rows(trial_id), batches)]

    batches = load(build(tmp_path / "cut", rows=rows)).dataframe().set_index("trial_id")["trained_batch"]
    assert batches.dtype == "Int64" and batches.to_dict() == {"t_done": 16, "t_early": None, "t_paused": 8,
                                                              "t_error": 16, "t_running": 16}


@pytest.mark.parametrize("metric, mode", [(None, "max"), (LOSS, "max"), (FITNESS, "min")])
def test_a_mode_given_to_ranked_and_best_ranks_by_it(exp, metric, mode):
    results = load(exp)  # its own ranking: LOSS, min
    name = metric or LOSS
    want, order = expected(name, mode), ranked_ids(name, mode)
    ranked = results.ranked(metric, mode)
    assert ranked["trial_id"].tolist() == order
    assert ranked[f"best_{name}"].tolist() == pytest.approx(want.loc[order, "best"].tolist())
    best = results.best(metric, mode)
    assert (best["trial_id"], best[f"best_{name}"]) == (order[0], pytest.approx(want.at[order[0], "best"]))


def test_table_holds_the_top_ranked_trials_in_the_columns_shown(exp):
    results = load(exp)
    columns = ["rank", "trial_id", "status", "lr0", "momentum", "epochs", f"best_{LOSS}", "best_epoch", f"last_{LOSS}"]
    assert list(results.table().columns) == columns and results.table()["trial_id"].tolist() == ranked_ids(LOSS, "min")
    assert results.table(top=2)["trial_id"].tolist() == ranked_ids(LOSS, "min")[:2]


# 40 trials: more than numpy sorts by insertion (where any sort keeps ties in order); best values tied in
# three groups (None: no value), ids not in record order.
TIED = {f"t{(7 * n) % 40:02d}": [1.0, 2.0, None][n % 3] for n in range(40)}


def tied_rows(trial_id: str) -> list:
    return [] if TIED[trial_id] is None else [{"epoch": 1, LOSS: TIED[trial_id]}]


@pytest.mark.parametrize("mode, order", [("min", [1.0, 2.0]), ("max", [2.0, 1.0])])
def test_tied_trials_keep_their_record_order_and_those_without_a_value_come_last(tmp_path, mode, order):
    trials = {t: dict(events=["started", "completed"], lr0=0.01, momentum=0.9) for t in TIED}
    results = load(build(tmp_path / "tied", trials, iterations=len(trials), rows=tied_rows), mode=mode)
    assert results.ranked()["trial_id"].tolist() == [t for value in (*order, None) for t in TIED if TIED[t] == value]


@pytest.mark.parametrize("damage, data", [
    ({"t_done": "data: [unclosed\n"}, "/abs/shapes/data.yaml"),  # the first args.yaml is not YAML: the next one's
    ({"t_done": "- a list\n"}, "/abs/shapes/data.yaml"),
    ({t: None for t in TRIALS}, None),  # no trial wrote one (None: removed): no data argument
])
def test_best_hyperparameters_name_the_data_of_the_first_readable_args_yaml(exp, damage, data):
    for trial_id, text in damage.items():
        args = exp / f"trial_{trial_id}" / "train" / "args.yaml"
        args.unlink() if text is None else args.write_text(text)
    hyperparameters = load(exp).best_hyperparameters()
    assert ("data" in hyperparameters, hyperparameters.get("data")) == (data is not None, data)


@pytest.mark.parametrize("mode, reading", [("min", "lower is better"), ("max", "higher is better")])
def test_how_a_mode_reads(mode, reading):
    assert better(mode) == reading


def test_a_mode_other_than_min_or_max_is_refused(exp):
    with pytest.raises(ValueError) as err:
        load(exp, mode="best")
    assert str(err.value) == "mode='best': min or max"


# --- files: trials.csv, plots, report ---------------------------------------------------------

def test_write_all_writes_trials_csv_plots_and_report(exp):
    written = report.write_all(exp)
    assert set(written) == {"trials_csv", *plots.KINDS, "report"}
    assert all(Path(p).is_file() for p in written.values())
    trials = pd.read_csv(exp / "trials.csv").set_index("trial_id")
    want = expected(LOSS, "min")
    assert trials["epochs"].to_dict() == want["epochs"].to_dict()
    assert trials[f"best_{LOSS}"].to_dict() == pytest.approx(want["best"].to_dict())
    assert trials["best_epoch"].to_dict() == want["best_epoch"].to_dict()
    page = (exp / "report.html").read_text()
    assert page.count("data:image/png;base64,") == len(plots.KINDS)
    assert all(f"<td>{t}</td>" in page for t in TRIALS) and ERROR in page


def test_report_writes_the_page_with_the_top_trials_and_fresh_plots(exp):
    path = report.write_all(load(exp), top=2)["report"]
    assert path == exp.resolve() / "report.html" and (exp / "plots" / "history.png").is_file()
    page = path.read_text()
    assert [t for t in TRIALS if f"<td>{t}</td>" in page] == [t for t in TRIALS if t in ranked_ids(LOSS, "min")[:2]]
    assert page.count("data:image/png;base64,") == len(plots.KINDS)


def test_a_running_experiments_page_says_how_fresh_it_is(exp):
    from datetime import datetime

    newest = max(row["timestamp"] for t in TRIALS for row in history_rows(t))
    page = report.write_all(exp)["report"].read_text()
    assert f"from the trials' epochs up to {datetime.fromtimestamp(newest):%Y-%m-%d %H:%M:%S}" in page
    assert report.REFRESH_NOTE in page
    layout.mark_finished(exp)  # a finished experiment's page is its last: no freshness to tell
    assert "from the trials' epochs up to" not in report.write_all(exp)["report"].read_text()


def test_the_live_refresh_runs_in_a_process_of_its_own_and_names_its_failure(exp, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where no yolotune is: the child imports the one this process did
    monkeypatch.delenv("PYTHONPATH", raising=False)
    report.refresh_in_process(str(exp))
    assert (exp / "report.html").is_file() and (exp / "trials.csv").is_file()
    with pytest.raises(RuntimeError, match=r"^FileNotFoundError: .*nowhere is not a yolotune experiment"):
        report.refresh_in_process(str(tmp_path / "nowhere"))


def test_figures_and_written_plots_follow_the_metric_and_mode_asked_for(exp, tmp_path):
    results = load(exp)
    assert plots.figure(results, "history", mode="max").axes[0].get_ylabel() == f"{LOSS} (higher is better)"
    written = plots.save(results, ["params"], FITNESS, "min", directory=tmp_path / "out")
    assert written == {"params": tmp_path / "out" / "params.png"} and not (exp / "plots").exists()
    png = io.BytesIO()
    plots.figure(results, "params", FITNESS, "min").savefig(png, format="png", dpi=plots.DPI)
    assert written["params"].read_bytes() == png.getvalue()


def test_trials_csv_keeps_the_experiments_metric_when_ranking_by_another(exp):
    report.write_all(load(exp, metric=FITNESS))
    assert f"best_{LOSS}" in pd.read_csv(exp / "trials.csv")


def test_history_plot_draws_every_trials_raw_values_and_stars_the_best(exp):
    fig = plots.figure(load(exp), "history")
    ax = fig.axes[0]
    lines = {line.get_label().split()[0]: line for line in ax.get_lines() if line.get_label().startswith("t_")}
    assert set(lines) == set(TRIALS)
    for trial_id, line in lines.items():
        assert list(line.get_xdata()) == [r["epoch"] for r in history_rows(trial_id)]
        assert list(line.get_ydata()) == pytest.approx([r[LOSS] for r in history_rows(trial_id)])
    want = expected(LOSS, "min").loc[ranked_ids(LOSS, "min")[0]]
    (star,) = [c for c in ax.collections if c.get_label().startswith("best:")]
    assert star.get_offsets().tolist() == [[want["best_epoch"], pytest.approx(want["best"])]]


def test_params_plot_places_each_trial_at_its_sampled_value_and_best_metric(exp):
    fig = plots.figure(load(exp, metric=FITNESS), "params")
    lr0_ax = next(ax for ax in fig.axes if ax.get_xlabel().startswith("lr0"))
    assert lr0_ax.get_xscale() == "log"
    points = sorted(map(tuple, lr0_ax.collections[0].get_offsets().tolist()))
    want = expected(FITNESS, "max")
    # As arrays: pytest.approx takes no list of tuples (pytest >= 9.2 raises TypeError).
    assert np.array(points) == pytest.approx(np.array(sorted((TRIALS[t]["lr0"], want.at[t, "best"]) for t in TRIALS)))


# --- the command line ---------------------------------------------------------------------------

def test_cli_table(exp, capsys):
    code, out, err = run_results(capsys, exp, "--top", "3")
    assert code == 0 and err == ""
    assert "Trials: 6 (1 ERROR, 1 PAUSED, 1 PENDING, 1 RUNNING, 2 TERMINATED)" in out
    assert f"ERROR t_error: {ERROR}" in out and "(unfinished)" in out
    ranked = ranked_ids(LOSS, "min")
    assert "lower is better), top 3 of 5" in out
    positions = [out.index(f" {t} ") for t in ranked[:3]]
    assert positions == sorted(positions) and f" {ranked[3]} " not in out
    want = expected(LOSS, "min").loc[ranked[0]]
    assert f"Best trial: {ranked[0]}: {LOSS} {want['best']:.6g} at epoch {want['best_epoch']}," in out
    assert "Wrote " not in out and "--report those and report.html" in out


WRITTEN = ("trials.csv", "plots", "report.html")


@pytest.mark.parametrize("shown", [[], ["--format", "json"], ["--format", "csv"], ["--top", "2"],
                                   ["--metric", FITNESS]])
def test_a_results_command_that_is_not_asked_to_write_writes_nothing(exp, capsys, shown):
    """Reading a 2,000-trial experiment stays interactive: no plots nor report unless asked for."""
    before = sorted(p.relative_to(exp) for p in exp.rglob("*"))
    code, out, _ = run_results(capsys, exp, *shown)
    assert code == 0 and out
    assert sorted(p.relative_to(exp) for p in exp.rglob("*")) == before
    assert not any((exp / name).exists() for name in WRITTEN)


@pytest.mark.parametrize("flag, files", [("--plots", {"trials.csv", "plots"}), ("--report", set(WRITTEN))])
def test_plots_writes_the_table_and_plots_and_report_writes_the_page_too(exp, capsys, flag, files):
    code, out, _ = run_results(capsys, exp, flag)
    assert code == 0 and {name for name in WRITTEN if (exp / name).exists()} == files
    assert sorted(p.name for p in (exp / "plots").iterdir()) == sorted(f"{kind}.png" for kind in plots.KINDS)
    assert [line for line in out.splitlines() if line.startswith("Wrote ")] == \
        [f"Wrote {exp.resolve() / 'trials.csv'}", *(f"Wrote {exp.resolve() / 'plots' / kind}.png" for kind in plots.KINDS),
         *([f"Wrote {exp.resolve() / 'report.html'}"] if flag == "--report" else [])]


def test_cli_json_ranks_by_another_metric_with_its_mode(exp, capsys):
    code, out, _ = run_results(capsys, exp, "--format", "json", "--metric", FITNESS, "--top", "2")
    assert code == 0
    data = json.loads(out)
    assert (data["metric"], data["mode"]) == (FITNESS, "max")
    want = expected(FITNESS, "max")
    ranked = ranked_ids(FITNESS, "max")
    assert [row["trial_id"] for row in data["ranked"]] == ranked[:2]
    assert [row[f"best_{FITNESS}"] for row in data["ranked"]] == [want.at[t, "best"] for t in ranked[:2]]
    assert data["best"]["trial_id"] == ranked[0] and data["best"]["epoch"] == want.at[ranked[0], "best_epoch"]
    assert data["trials"] == ITERATIONS and data["status"]["PENDING"] == 1
    assert data["files"] == {}  # nothing asked for, nothing written (--report: see below)


def test_cli_mode_overrides_and_csv_format(exp, capsys):
    code, out, _ = run_results(capsys, exp, "--format", "csv", "--metric", FITNESS, "--mode", "min")
    assert code == 0
    table = pd.read_csv(pd.io.common.StringIO(out))
    assert table["trial_id"].tolist() == ranked_ids(FITNESS, "min")
    assert table["epochs"].tolist() == [expected(FITNESS, "min").at[t, "epochs"] for t in table["trial_id"]]


def test_cli_lists_a_storage_dirs_experiments_even_with_a_broken_one(tmp_path, capsys):
    storage = tmp_path / "storage"
    build(storage / "a")
    ended = {t: s for t, s in TRIALS.items() if t != "t_running"}
    build(storage / "b", ended, iterations=len(ended))
    (storage / "c" / ".hydra").mkdir(parents=True)
    (storage / "c" / ".hydra" / "config.yaml").write_text("- just\n- a list\n")
    code, out, err = run_results(capsys, storage, "--format", "json")
    assert code == 0 and err == ""
    rows = {row["experiment"]: row for row in json.loads(out)}
    assert rows["a"]["status"] == "unfinished" and rows["b"]["status"] == "finished"
    assert rows["a"]["trials"] == ITERATIONS and rows["a"]["pending"] == 1 and rows["b"]["paused"] == 1
    assert rows["b"]["best"] == pytest.approx(min(expected(LOSS, "min").loc[list(ended), "best"]))
    assert rows["c"]["status"].startswith("unreadable: ") and "\n" not in rows["c"]["status"]
    code, out, _ = run_results(capsys, storage)
    assert code == 0 and "3 experiments in" in out


@pytest.mark.parametrize("case", ["missing", "file", "empty_dir", "unknown_metric"])
def test_bad_path_or_metric_is_one_line_and_exit_2(exp, tmp_path, capsys, case):
    args = {"missing": [tmp_path / "nope"], "file": [exp / ".hydra" / "config.yaml"], "empty_dir": [exp / "trial_t_done" / "train"],
            "unknown_metric": [exp, "--metric", "no/such_metric"]}[case]
    code, out, err = run_results(capsys, *args)
    assert (code, out) == (2, "")
    assert err.startswith("yolotune results: error: ") and len(err.strip().splitlines()) == 1


@pytest.mark.subprocess
def test_the_command_forms(exp, tmp_path):
    command = ["-m", "yolotune", "results"]
    proc = subprocess.run([sys.executable, *command, str(exp), "--format", "json"], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and json.loads(proc.stdout)["best"]["trial_id"] == ranked_ids(LOSS, "min")[0]
    proc = subprocess.run([sys.executable, *command, str(tmp_path / "nope")], cwd=REPO, capture_output=True,
                          text=True, timeout=120)
    assert (proc.returncode, proc.stdout) == (2, "")
    assert proc.stderr == f"yolotune results: error: {tmp_path / 'nope'}: no such directory\n"


# --- damaged experiment directories --------------------------------------------------------------

def one_warning(err: str) -> str:
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("yolotune results: warning: "), err
    return lines[0]


def test_history_cut_short_by_a_kill(exp, capsys):
    history = exp / "trial_t_done" / "history.jsonl"
    with open(history, "a") as f:
        f.write('{"epoch": 6, "val/box_lo')  # the kill came mid-line
    results = load(exp)
    assert results.problems == ["trial_t_done/history.jsonl: skipped 1 damaged line"]
    assert results.dataframe().set_index("trial_id").at["t_done", "epochs"] == EPOCHS
    code, _, err = run_results(capsys, exp, "--plots")
    assert code == 0 and "trial_t_done/history.jsonl: skipped 1 damaged line" in one_warning(err)
    assert pd.read_csv(exp / "trials.csv").set_index("trial_id").at["t_done", "epochs"] == EPOCHS


def test_a_resumed_writer_repairs_the_cut_line_before_appending(exp):
    history = exp / "trial_t_early" / "history.jsonl"
    with open(history, "a") as f:
        f.write('{"epoch": 3, "val/box_lo')
    layout.append_jsonl(history, {"epoch": 3, LOSS: 1.0, FITNESS: 0.5, "timestamp": 2000.0, "time_this_iter_s": 1.0})
    results = load(exp)
    assert results.problems == []
    row = results.dataframe().set_index("trial_id").loc["t_early"]
    assert row["epochs"] == 3 and row[f"best_{LOSS}"] == 1.0 and row["best_epoch"] == 3


def test_a_record_glued_onto_a_cut_line_is_still_counted(exp):
    """An earlier writer appended without repairing: the next epoch sits at the end of the cut line."""
    history = exp / "trial_t_early" / "history.jsonl"
    with open(history, "a") as f:
        f.write('{"epoch": 3, "val/bo' + json.dumps({"epoch": 3, LOSS: 1.0, FITNESS: 0.5}) + "\n")
    results = load(exp)
    assert results.problems == ["trial_t_early/history.jsonl: skipped 1 damaged line"]
    assert results.dataframe().set_index("trial_id").at["t_early", "epochs"] == 3  # not under-counted
    report.write_all(results)
    assert pd.read_csv(exp / "trials.csv").set_index("trial_id").at["t_early", "epochs"] == 3


def test_malformed_line_in_the_middle_of_a_history(exp, capsys):
    history = exp / "trial_t_paused" / "history.jsonl"
    lines = history.read_text().splitlines()
    history.write_text("\n".join([lines[0], "not json at all", '{"no_epoch": 1}', *lines[1:]]) + "\n")
    frame = load(exp).dataframe().set_index("trial_id")
    assert frame.at["t_paused", "epochs"] == 3
    assert frame.at["t_paused", f"best_{LOSS}"] == min(TRIALS["t_paused"]["loss"])
    code, _, err = run_results(capsys, exp)
    assert code == 0 and "trial_t_paused/history.jsonl: skipped 2 damaged lines" in one_warning(err)


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_damaged_trial_record(exp, capsys, damage):
    record = exp / "trials.jsonl"
    if damage == "truncated":
        record.write_text(record.read_text() + '{"trial_id": "t_new", "ev')
    else:
        record.write_bytes(b"\x00\xff garbage\n" + record.read_bytes() + b"[1, 2]\n{}\n")
    results = load(exp)
    assert len(results.problems) == 1 and results.problems[0].startswith("trials.jsonl: skipped")
    assert set(results.dataframe()["trial_id"]) == set(TRIALS)
    code, _, err = run_results(capsys, exp)
    assert code == 0 and "trials.jsonl: skipped" in one_warning(err)


def test_missing_trial_dir(exp, capsys):
    import shutil

    shutil.rmtree(exp / "trial_t_early")
    results = load(exp)
    assert results.dataframe().set_index("trial_id").at["t_early", "epochs"] == 0
    assert results.best()["trial_id"] == ranked_ids(LOSS, "min")[0]
    code, _, err = run_results(capsys, exp)
    assert code == 0 and "trial_t_early: missing" in one_warning(err)


@pytest.mark.parametrize("text", ["", "- a\n- list\n", "metric: [unclosed\n", "metric: fitness\nmode: min\n",
                                  "space: {lr0: {dist: nope}}\nmetric: x\nmode: min\ntrain: {}\nmodel: {}\n"])
def test_unreadable_saved_config_is_one_error_line_and_exit_2(exp, capsys, text):
    (exp / ".hydra" / "config.yaml").write_text(text)
    with pytest.raises(UnreadableExperiment):
        load(exp)
    code, out, err = run_results(capsys, exp)
    assert (code, out) == (2, "")
    assert err.startswith("yolotune results: error: ") and len(err.strip().splitlines()) == 1


# --- the trial record: experiments of an earlier yolotune, and the callback -------------------------

def test_an_experiment_without_trial_record_says_how_to_convert_and_converts(exp, capsys):
    (exp / "trials.jsonl").unlink()
    statuses = {"t_done": "TERMINATED", "t_early": "TERMINATED", "t_paused": "PAUSED", "t_error": "ERROR",
                "t_running": "RUNNING"}
    trial_data = [[json.dumps({"trial_id": t, "status": s, "config": {"lr0": TRIALS[t]["lr0"],
                                                                        "momentum": TRIALS[t]["momentum"],
                                                                        "__trial_index__": 0}}), "{}"]
                  for t, s in statuses.items()]
    (exp / "experiment_state-2025-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    with pytest.raises(UnreadableExperiment, match="--convert"):
        load(exp)
    code, out, err = run_results(capsys, exp)
    assert (code, out) == (2, "") and "yolotune results --convert" in err and len(err.strip().splitlines()) == 1

    code, out, err = run_results(capsys, "--convert", exp, "--format", "json")
    assert code == 0, err
    results = load(exp)
    assert results.dataframe().set_index("trial_id")["status"].to_dict() == statuses
    assert results.errors == {"t_error": ERROR}
    assert results.dataframe().set_index("trial_id")["lr0"].to_dict() == {t: s["lr0"] for t, s in TRIALS.items()}


def test_the_recorder_appends_each_status_change_and_goes_on_after_a_resume(tmp_path):
    exp_dir = tmp_path / "exp"
    (exp_dir / "trial_a").mkdir(parents=True)
    error_file = tmp_path / "staging" / "error.txt"
    error_file.parent.mkdir()
    error_file.write_text(f"Failure # 1 (occurred at now)\nray::ImplicitFunc.train()\n  File x\n{ERROR}\n")
    storage = SimpleNamespace(storage_filesystem=LocalFileSystem(), experiment_fs_path=str(exp_dir))  # Ray's
    a = SimpleNamespace(trial_id="a", path=str(exp_dir / "trial_a"), status="PENDING", error_file=str(error_file),
                        config={"lr0": 0.1, "__trial_index__": 0}, storage=storage,
                        last_result={"fitness": 0.5, "latency_ms": 3.0})  # measured after training (objectives)
    b = SimpleNamespace(trial_id="b", path=str(exp_dir / "trial_b"), status="PENDING", error_file=None,
                        config={"lr0": 0.2}, storage=storage, last_result={})
    recorder = records.trial_recorder()
    recorder.on_trial_start(iteration=1, trials=[a, b], trial=a)
    a.status = "RUNNING"
    recorder.on_trial_start(iteration=1, trials=[a, b], trial=b)
    a.status = "PAUSED"
    recorder.on_step_end(iteration=2, trials=[a, b])
    recorder.on_step_end(iteration=3, trials=[a, b])  # still paused: recorded once
    recorder = pickle.loads(pickle.dumps(recorder))  # as Tuner.restore brings it back from tuner.pkl
    recorder.on_trial_start(iteration=4, trials=[a, b], trial=a)
    recorder.on_trial_complete(iteration=5, trials=[a, b], trial=a)
    recorder.on_trial_error(iteration=6, trials=[a, b], trial=b)

    events, skipped = layout.read_jsonl(exp_dir / "trials.jsonl")
    assert skipped == 0
    assert [(e["trial_id"], e["event"]) for e in events] == [
        ("a", "started"), ("b", "started"), ("a", "paused"), ("a", "resumed"), ("a", "completed"), ("b", "errored")]
    assert events[0]["config"] == {"lr0": 0.1}
    assert {k: events[-2][k] for k in ("fitness", "latency_ms") if k in events[-2]} == {"latency_ms": 3.0}
    assert events[-1]["error_file"] == str(exp_dir / "trial_b" / "error.txt") and events[-1]["error"] is None
    trials, _ = records.read_trials(exp_dir)
    assert [(t.trial_id, t.status) for t in trials] == [("a", "TERMINATED"), ("b", "ERROR")]

    b.error_file = str(error_file)
    recorder.on_trial_error(iteration=7, trials=[a, b], trial=b)
    assert records.read_trials(exp_dir)[0][1].error == ERROR


def test_the_recorder_names_the_node_a_retried_trial_lost_and_the_one_it_went_on_on(tmp_path):
    exp_dir = tmp_path / "exp"
    exp_dir.mkdir()
    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1 (occurred at now)\nThe actor died because its node has died.\n")
    storage = SimpleNamespace(storage_filesystem=LocalFileSystem(), experiment_fs_path=str(exp_dir))
    a = SimpleNamespace(trial_id="a", path=str(exp_dir / "trial_a"), status="RUNNING", error_file=str(error_file),
                        config={}, storage=storage, num_failures=1, max_failures=2,
                        last_result={"epoch": 2, "hostname": "w", "node_id": "lost"})
    recorder = records.trial_recorder()
    recorder.on_trial_recover(iteration=1, trials=[a], trial=a)
    recorder.on_trial_start(iteration=2, trials=[a], trial=a)
    for epoch in (3, 4):
        recorder.on_trial_result(iteration=3, trials=[a], trial=a, result={"epoch": epoch, "hostname": "h",
                                                                           "node_id": "head"})
    events = [{k: v for k, v in e.items() if k not in ("time", "config")} for e in layout.read_jsonl(
        exp_dir / "trials.jsonl")[0]]
    assert events == [
        {"trial_id": "a", "event": "retried", "status": "PENDING", "error": "The actor died because its node has died.",
         "node": {"hostname": "w", "node_id": "lost"}, "retry": 1, "max_failures": 2},
        {"trial_id": "a", "event": "resumed", "status": "RUNNING"},
        {"trial_id": "a", "event": "went_on", "status": "RUNNING", "node": {"hostname": "h", "node_id": "head"},
         "epoch": 3}]  # once, at its first epoch after the retry
    assert [(t.trial_id, t.status) for t in records.read_trials(exp_dir)[0]] == [("a", "RUNNING")]


def test_load_with_a_metric_that_was_never_reported_says_so(exp):
    with pytest.raises(ConfigError) as err:
        load(exp, metric="bogus").best()
    assert err.value.key == "metric" and "fitness" in err.value.allowed
    assert str(err.value) == f"metric=bogus: not reported by this experiment; reported: {', '.join(numeric_values())}"


def numeric_values() -> list:
    """The numeric values history_rows reports besides the epoch, in the order written."""
    return [k for k, v in history_rows("t_done")[0].items() if k != "epoch" and isinstance(v, (int, float))]


def test_reported_metrics_are_the_numeric_values_the_trials_wrote(exp):
    assert load(exp).reported_metrics() == numeric_values()


def test_the_dataframe_holds_each_errored_trials_error(exp):
    frame = load(exp).dataframe().set_index("trial_id")
    assert frame["error"].dropna().to_dict() == {t: ERROR for t, s in TRIALS.items() if "errored" in s["events"]}


def test_an_experiment_with_no_trial_started_yet_has_empty_frames_with_their_columns(tmp_path):
    results = load(build(tmp_path / "empty", {}, iterations=3))
    assert list(results.history().columns) == ["trial_id", "epoch"] and results.reported_metrics() == []
    assert list(results.dataframe().columns) == ["trial_id", "status", "lr0", "momentum", "epochs", f"last_{LOSS}",
                                                 f"best_{LOSS}", "best_epoch", "trained_batch", "hostname", "node_id",
                                                 "gpu", "error"]
    assert results.dataframe().empty and results.best() is None and results.status_counts() == {"PENDING": 3}


# Per trial, (epoch, val/box_loss) in the order written: a resume re-ran epochs 2 and 3 of "t_b" with other
# values; "t_a" (after "t_b" in the record, before it by id) wrote its epochs as floats.
RERUN = {"t_b": [(1, 1.5), (2, 1.4), (3, 1.3), (2, 1.2), (3, 1.1), (4, 1.0)], "t_a": [(1.0, 0.9), (2.0, 0.8)]}


def rerun_rows(trial_id: str) -> list:
    return [{"epoch": epoch, LOSS: loss} for epoch, loss in RERUN[trial_id]]


def test_history_keeps_the_latest_run_of_each_epoch_by_trial_and_integer_epoch(tmp_path):
    trials = {t: dict(events=["started", "completed"], lr0=0.01, momentum=0.9) for t in RERUN}
    history = load(build(tmp_path / "rerun", trials, iterations=len(trials), rows=rerun_rows)).history()
    want = []
    for trial_id in sorted(RERUN):
        latest = {int(epoch): loss for epoch, loss in RERUN[trial_id]}  # a later run overwrites an earlier
        want += [{"trial_id": trial_id, "epoch": epoch, LOSS: latest[epoch]} for epoch in sorted(latest)]
    pd.testing.assert_frame_equal(history, pd.DataFrame(want))  # columns, int64 epochs, a 0..n-1 index


@pytest.mark.parametrize("metric, mode", [(LOSS, "max"), (FITNESS, "min")])
def test_the_saved_metric_ranks_by_the_saved_mode_even_against_its_name(exp, metric, mode):
    rewrite_config(exp, metric=metric, mode=mode)
    results = load(exp)
    assert (results.metric, results.mode) == (metric, mode)
    assert results.ranked()["trial_id"].tolist() == ranked_ids(metric, mode)
    assert load(exp, metric=metric).mode == mode


def test_a_directory_without_saved_config_is_not_an_experiment(tmp_path):
    with pytest.raises(FileNotFoundError) as err:
        load(tmp_path)
    assert str(err.value) == f"{tmp_path} is not a yolotune experiment (no .hydra/config.yaml)"


def test_the_saved_config_is_read_without_hydras_keys_and_despite_bytes_not_utf8(exp):
    config_file = exp / ".hydra" / "config.yaml"
    config_file.write_bytes(config_file.read_bytes() + b"# caf\xe9, written by another locale\n")
    config = load(exp).config
    assert sorted(config) == sorted(set(saved_config()) - {"defaults", "hydra"})
    assert config.metric == LOSS and config.train.epochs == EPOCHS


def yaml_problem(text: str) -> str:
    try:
        yaml.safe_load(text)
    except yaml.YAMLError as e:
        return "not YAML: " + " ".join(str(e).split())
    raise AssertionError(f"{text!r} is YAML")


CONFIG_PROBLEMS = [
    ("", "empty"),
    ("# nothing\n", "empty"),
    ("- a\n- list\n", "not a mapping but list"),
    ("42\n", "not a mapping but int"),
    ("metric: [unclosed\n", yaml_problem("metric: [unclosed\n")),
    (yaml.safe_dump({**saved_config(), "mode": "best"}), "no metric, or mode not min/max"),
    (yaml.safe_dump({**saved_config(), "metric": 3}), "no metric, or mode not min/max"),
    (yaml.safe_dump({**saved_config(), "train": None}), "no train mapping"),
    (yaml.safe_dump({**saved_config(), "iterations": "many"}), "iterations='many': not a number"),
    (yaml.safe_dump({**saved_config(), "space": {"lr0": "gauss(0, 1)"}}),
     "space.lr0.dist=gauss: allowed: uniform, loguniform, quniform, randint, qrandint, choice, grid"),
]


@pytest.mark.parametrize("text, problem", CONFIG_PROBLEMS, ids=[p for _, p in CONFIG_PROBLEMS])
def test_an_unreadable_saved_config_is_named_with_its_problem(exp, text, problem):
    config_file = exp / ".hydra" / "config.yaml"
    config_file.write_text(text)
    with pytest.raises(UnreadableExperiment) as err:
        load(exp)
    assert str(err.value) == f"{config_file}: {problem}"


# --- epochs without validation (validate=decisions) --------------------------------------------

# Per trial, epoch -> val/box_loss where validated; None: not validated (training values only). The
# unvalidated rows of "t_stale" carry a value anyway, better than every validated one, as a writer that
# kept Ultralytics' stale metrics would: it must never count. Each trial's best sits next to an
# unvalidated epoch on one side, so a best taken one row off lands on a wrong epoch or value.
PARTIAL = {
    "t_first": {1: 0.90, 2: None, 3: 1.10, 4: None, 5: 1.00},   # best at the first validated epoch
    "t_last": {1: 1.20, 2: None, 3: 1.05, 4: None, 5: 0.95},    # best at the last epoch
    "t_stale": {1: 1.30, 2: 0.10, 3: 1.25, 4: 0.20, 5: 1.40},   # 2 and 4 not validated, yet with a value
    "t_none": {1: None, 2: None},                               # stopped before any validation
}
STALE = {("t_stale", 2), ("t_stale", 4)}


def partial_rows(trial_id: str) -> list:
    rows = []
    for epoch, loss in PARTIAL[trial_id].items():
        done = loss is not None and (trial_id, epoch) not in STALE
        row = {"epoch": epoch, "validated": int(done), "train/box_loss": 3.0 - epoch / 10 - len(rows) / 100,
               "timestamp": 2000.0 + 10 * epoch, "time_this_iter_s": 10.0}
        if loss is not None:
            row[LOSS] = loss
        rows.append(row)
    return rows


@pytest.fixture
def partial(tmp_path) -> Path:
    trials = {t: dict(events=["started", "completed"], lr0=0.01 * (n + 1), momentum=0.9, loss=[], fitness=[])
              for n, t in enumerate(PARTIAL)}
    return build(tmp_path / "partial", trials, iterations=len(trials), rows=partial_rows)


def test_a_trials_best_and_last_are_over_its_validated_epochs_only(partial):
    frame = load(partial).dataframe().set_index("trial_id")
    assert frame[f"best_{LOSS}"].to_dict() == pytest.approx({"t_first": 0.90, "t_last": 0.95, "t_stale": 1.25,
                                                              "t_none": float("nan")}, nan_ok=True)
    assert frame["best_epoch"].astype("float").to_dict() == pytest.approx(
        {"t_first": 1, "t_last": 5, "t_stale": 3, "t_none": float("nan")}, nan_ok=True)
    assert frame[f"last_{LOSS}"].to_dict() == pytest.approx({"t_first": 1.00, "t_last": 0.95, "t_stale": 1.40,
                                                              "t_none": float("nan")}, nan_ok=True)
    assert frame["epochs"].to_dict() == {"t_first": 5, "t_last": 5, "t_stale": 5, "t_none": 2}


def test_trials_are_ranked_and_the_best_chosen_over_validated_epochs_only(partial):
    results = load(partial)
    assert results.ranked()["trial_id"].tolist() == ["t_first", "t_last", "t_stale", "t_none"]
    assert results.ranked()["rank"].tolist()[:3] == [1, 2, 3] and pd.isna(results.ranked()["rank"].iloc[3])
    assert results.best()["trial_id"] == "t_first"
    assert results.best(mode="max")["trial_id"] == "t_stale"  # 1.40 at its validated epoch 5
    # a training loss has a value at every epoch; a trial's best is still over its validated epochs
    by_train = results.dataframe("train/box_loss").set_index("trial_id")
    want = {t: min(r["train/box_loss"] for r in partial_rows(t) if r["validated"]) for t in ("t_first", "t_last")}
    assert by_train.loc[["t_first", "t_last"], "best_train/box_loss"].to_dict() == pytest.approx(want)
    assert "validated" not in results.reported_metrics()


def test_ranked_is_the_dataframe_with_a_leading_integer_rank_and_a_fresh_index(partial):
    results = load(partial)
    ranked = results.ranked()
    assert list(ranked.columns) == ["rank", *results.dataframe().columns]
    assert ranked.index.tolist() == list(range(len(PARTIAL)))
    assert str(ranked["rank"].dtype) == "Int64" and ranked["rank"].iloc[-1] is pd.NA  # shown as 1, 2, 3, not 1.0


@pytest.mark.parametrize("metric", [LOSS, "train/box_loss", FITNESS])
def test_measured_rows_are_the_epochs_with_a_value_that_counts(partial, metric):
    """A validation metric: validated epochs with a value; a training value: every epoch; never reported: none."""
    history = load(partial).history()
    counts = {LOSS: lambda t, e, v: v is not None and (t, e) not in STALE, "train/box_loss": lambda t, e, v: True,
              FITNESS: lambda t, e, v: False}[metric]
    want = {t: [e for e, v in PARTIAL[t].items() if counts(t, e, v)] for t in PARTIAL}
    rows = measured(history, metric)
    assert list(rows.columns) == list(history.columns)
    assert {t: g["epoch"].tolist() for t, g in rows.groupby("trial_id")} == {t: e for t, e in want.items() if e}


def test_plots_draw_metrics_at_validated_epochs_and_the_progress_of_each_trials_best(partial):
    results = load(partial)
    ax = plots.figure(results, "history").axes[0]
    lines = {line.get_label().split()[0]: line for line in ax.get_lines() if line.get_label().startswith("t_")}
    assert {t: list(line.get_xdata()) for t, line in lines.items()} == {
        "t_first": [1, 3, 5], "t_last": [1, 3, 5], "t_stale": [1, 3, 5]}
    ax = plots.figure(results, "history", metric="train/box_loss").axes[0]
    lines = {line.get_label().split()[0]: line for line in ax.get_lines() if line.get_label().startswith("t_")}
    assert list(lines["t_first"].get_xdata()) == [1, 2, 3, 4, 5]  # training values: every epoch
    progress = plots.figure(results, "progress").axes[0]
    (points,) = [c for c in progress.collections if c.get_label() == "a trial's best"]
    assert sorted(y for _, y in points.get_offsets().tolist()) == pytest.approx([0.90, 0.95, 1.25])
    written = report.write_all(partial)
    assert all(Path(p).is_file() for p in written.values())


def test_an_experiment_with_no_validated_epoch_yet_has_no_best_and_writes_its_files(tmp_path):
    """FIFO validates the last epoch only: a sweep interrupted (or errored) before has no metric at all."""
    trials = {t: dict(events=["started", "errored"], lr0=0.01, momentum=0.9, loss=[], fitness=[])
              for t in ("t_none",)}
    exp_dir = build(tmp_path / "none", trials, iterations=1, rows=partial_rows)
    results = load(exp_dir)
    assert LOSS not in results.history() and results.best() is None and results.best_hyperparameters() is None
    assert results.dataframe()["epochs"].tolist() == [2] and results.dataframe()[f"best_{LOSS}"].isna().all()
    assert all(Path(p).is_file() for p in report.write_all(exp_dir).values())
    with pytest.raises(ConfigError):  # another metric is still checked
        results.dataframe("metrics/mAP50(B)")


def test_results_before_any_validated_epoch_show_the_trials_and_say_the_metric_is_not_measured_yet(tmp_path, capsys):
    """Early in a sweep (validate=decisions, killed or still running): the experiment's own metric, reported
    by no epoch yet, is no mistake of the user's, typed or not; another metric that none reported is."""
    trials = {t: dict(events=["started"], lr0=0.01 * (n + 1), momentum=0.9, loss=[], fitness=[])
              for n, t in enumerate(("t_none", "t_first"))}
    exp_dir = build(tmp_path / "early", trials, iterations=4,
                    rows=lambda t: [{k: v for k, v in r.items() if k != LOSS} | {"validated": 0}
                                    for r in partial_rows(t) if r["epoch"] <= 2])  # training values only
    unmeasured = (f"{LOSS}: not measured yet: no trial has validated an epoch (trials validate at the epochs their "
                  "scheduler decides on, and at the last: validate=decisions)")
    for typed in ([], ["--metric", LOSS]):
        code, out, err = run_results(capsys, exp_dir, *typed)
        assert (code, err) == (0, ""), err
        lines = out.splitlines()
        assert lines[lines.index(f"Trials ranked by best {LOSS} (lower is better):") + 4] == unmeasured
        assert [line.split()[1] for line in lines[lines.index(unmeasured) - 2:lines.index(unmeasured)]] == \
            ["t_none", "t_first"]  # both trials shown, in record order, with 2 epochs each
    code, out, err = run_results(capsys, exp_dir, "--format", "json")
    assert code == 0 and [r["epochs"] for r in json.loads(out)["ranked"]] == [2, 2] and json.loads(out)["best"] is None
    code, out, err = run_results(capsys, exp_dir, "--metric", "metrics/mAP50(B)")
    assert (code, out) == (2, "") and err.startswith("yolotune results: error: --metric metrics/mAP50(B): not reported")
    with_value = build(tmp_path / "measured", trials, iterations=4, rows=partial_rows)  # t_first validated epoch 1
    assert unmeasured not in run_results(capsys, with_value)[1]


def test_an_interrupted_atomic_write_leaves_the_file_as_it_was_and_no_temp_file(tmp_path):
    """A second Ctrl-C (or a full disk) mid-write: the old content stays, nothing half-written beside it."""
    layout.write_atomic(tmp_path / "trials.csv", "old")
    with pytest.raises(TypeError):
        layout.write_atomic(tmp_path / "trials.csv", 5)  # fails inside the write, as an interrupt there would
    assert [p.name for p in tmp_path.iterdir()] == ["trials.csv"] and (tmp_path / "trials.csv").read_text() == "old"
