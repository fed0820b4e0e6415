"""Results: `yolotune results` and `yolotune.load` on real sweeps, finished and killed mid-sweep."""

from __future__ import annotations

import base64
import html.parser
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from matplotlib.image import imread
from PIL import Image

from conftest import REPO, run_cli, small_sweep_overrides
from yolotune import layout, plots
from yolotune.results import load

pytestmark = pytest.mark.slow

PLOTS = plots.KINDS
METRIC = "val/box_loss"  # the small sweep's metric (mode min)


@pytest.fixture(scope="module")
def experiment(small_sweep, tmp_path_factory) -> Path:
    """A copy of the small sweep that the CLI may write into (other tests read the original's files).

    Weights are left out: nothing here reads them. trials.csv and the outputs the CLI writes are
    removed, so that finding them proves the CLI wrote them.
    """
    target = tmp_path_factory.mktemp("results") / "storage" / small_sweep.name
    shutil.copytree(small_sweep, target, ignore=shutil.ignore_patterns("*.pt", "trials.csv", "plots", "report.html"))
    return target


@pytest.fixture(scope="module")
def cli_run(experiment) -> subprocess.CompletedProcess:
    """`yolotune results EXP_DIR --report`, run once, as a user runs it to get the plots and the page."""
    return run_cli("results", str(experiment), "--report", timeout=300)


def _results_cli(*args: str) -> subprocess.CompletedProcess:
    """`python -m yolotune results ARGS` (the module form of the command)."""
    return subprocess.run([sys.executable, "-m", "yolotune", "results", *args], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_cli_table_lists_every_trial_ranked_and_counts_match_trials_csv(experiment, cli_run):
    assert cli_run.returncode == 0, cli_run.stderr[-3000:]
    out = cli_run.stdout
    trials = pd.read_csv(experiment / "trials.csv")  # written by this command (the fixture removed the old one)
    assert len(trials) == 6
    counts = ", ".join(f"{n} {s}" for s, n in sorted(trials["status"].value_counts().items()))
    assert f"Trials: {len(trials)} ({counts})" in out
    ranked = trials.sort_values(f"best_{METRIC}", kind="stable")["trial_id"].tolist()
    positions = [out.index(f" {trial_id} ") for trial_id in ranked]  # each in the table, best first
    assert positions == sorted(positions), out
    assert f"Best trial: {ranked[0]}:" in out
    best_config = yaml.safe_load(out.split("Best config (Ultralytics train arguments):\n", 1)[1].split("\n\n")[0])
    assert "Parameter importance for best" in out
    assert best_config["lr0"] == pytest.approx(trials.set_index("trial_id").at[ranked[0], "lr0"])
    assert "Traceback" not in cli_run.stderr


def test_cli_writes_valid_non_blank_plots_and_a_self_contained_report(experiment, cli_run):
    assert cli_run.returncode == 0, cli_run.stderr[-3000:]
    for name in PLOTS:
        png = experiment / "plots" / f"{name}.png"
        assert f"Wrote {png}" in cli_run.stdout
        pixels = imread(png)
        assert pixels.ndim == 3 and pixels.shape[0] > 300 and pixels.shape[1] > 500
        assert pixels[..., :3].var() > 0, f"{png} is blank"

    report = (experiment / "report.html").read_text()
    parser = _Images()
    parser.feed(report)
    parser.close()
    assert len(parser.images) == len(PLOTS)
    for src in parser.images:
        assert src.startswith("data:image/png;base64,")  # embedded: nothing to fetch
        image = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
        assert np.asarray(image.convert("L")).var() > 0
    assert "http://" not in report and "https://" not in report
    for trial_id in pd.read_csv(experiment / "trials.csv")["trial_id"]:
        assert f"<td>{trial_id}</td>" in report


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.images = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.images.append(dict(attrs)["src"])


def test_history_has_one_row_per_reported_epoch(small_sweep):
    results = load(small_sweep)
    history = results.history()
    for trial_dir in small_sweep.glob("trial_*"):
        lines = [line for line in (trial_dir / "result.json").read_text().splitlines() if line.strip()]
        trial_id = trial_dir.name.removeprefix("trial_")
        rows = history[history.trial_id == trial_id]
        assert rows["epoch"].tolist() == list(range(1, len(lines) + 1)), trial_id
        assert rows[METRIC].tolist() == [json.loads(line)[METRIC] for line in lines]
    frame = results.dataframe()
    assert frame.set_index("trial_id")["epochs"].to_dict() == history.groupby("trial_id")["epoch"].max().to_dict()


def test_history_plot_marks_trials_the_scheduler_stopped_early(small_sweep):
    results = load(small_sweep)
    frame = results.dataframe()
    fig = plots.figure(results, "history")
    ax = fig.axes[0]
    assert ax.get_xlim()[1] >= 3  # the planned epochs, so that stopped trials end short of the right edge
    legend = [text.get_text() for text in fig.legends[0].get_texts()]
    best = results.best()
    assert f"{best['trial_id']} (best)" in legend
    assert ("stopped early by the scheduler" in legend) == bool((frame["epochs"] < 3).any())


@pytest.mark.parametrize("spec", [{"dist": "loguniform", "low": 1e-5, "high": 0.2}, "loguniform(1e-5, 0.2)"])
def test_params_plot_uses_a_log_axis_for_loguniform_params(experiment, tmp_path, spec):
    copy = tmp_path / experiment.name
    shutil.copytree(experiment, copy)
    config_file = copy / ".hydra" / "config.yaml"
    config = yaml.safe_load(config_file.read_text())
    config["space"]["lr0"] = spec  # a saved config may hold either form
    config_file.write_text(yaml.safe_dump(config))
    fig = plots.figure(load(copy), "params")
    scales = {ax.get_xlabel().split()[0]: ax.get_xscale() for ax in fig.axes if ax.get_visible()}
    assert scales == {"lr0": "log", "lrf": "linear", "momentum": "linear", "weight_decay": "linear"}


def test_json_format_and_ranking_by_another_metric(experiment):
    proc = _results_cli(str(experiment), "--format", "json", "--metric", "metrics/mAP50-95(B)", "--top", "2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads(proc.stdout)
    assert report["metric"] == "metrics/mAP50-95(B)" and report["mode"] == "max"  # mAP: higher is better
    assert report["trials"] == 6 and sum(report["status"].values()) == 6
    values = [row["best_metrics/mAP50-95(B)"] for row in report["ranked"]]
    assert len(values) == 2 and values == sorted(values, reverse=True)
    assert report["best"]["trial_id"] == report["ranked"][0]["trial_id"]
    assert f"best_{METRIC}" in pd.read_csv(experiment / "trials.csv")  # keeps the experiment's own metric


def test_storage_dir_lists_its_experiments(experiment):
    proc = run_cli("results", str(experiment.parent), "--format", "json", timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (row,) = json.loads(proc.stdout)
    trials = pd.read_csv(experiment / "trials.csv")
    assert row["experiment"] == experiment.name and row["status"] == "finished"
    assert row["trials"] == len(trials) == row["terminated"]
    assert row["best"] == pytest.approx(trials[f"best_{METRIC}"].min())


def test_import_stays_light():
    """Importing the results modules must not pull in Ray, torch, Ultralytics, matplotlib or Optuna."""
    code = ("import sys, yolotune.results, yolotune.records, yolotune.report, yolotune.results_cli; "
            "print([m for m in ('ray', 'torch', 'ultralytics', 'matplotlib', 'optuna', 'sklearn') if m in sys.modules])")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.stdout.strip() == "[]", proc.stdout + proc.stderr


def test_load_works_on_an_experiment_whose_driver_was_killed(tmp_path, shapes_cache):
    storage, name = tmp_path / "storage", "killed"
    proc = subprocess.Popen([sys.executable, "-m", "yolotune", *small_sweep_overrides(storage, shapes_cache, name)],
                            cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        deadline = time.time() + 300
        while not [f for f in storage.glob(f"{name}/trial_*/result.json") if f.stat().st_size]:
            assert proc.poll() is None, "the sweep ended before it could be killed"
            assert time.time() < deadline, "no trial reported an epoch in time"
            time.sleep(0.2)
    finally:
        _kill_session(proc)

    results = load(storage / name)
    assert not results.finished
    frame = results.dataframe()
    assert "RUNNING" in set(frame["status"])  # the trial record: trials the kill left running
    history = results.history()
    reported = {d.name.removeprefix("trial_"): len(layout.read_jsonl(d / "history.jsonl")[0])
                for d in (storage / name).glob("trial_*")}
    assert len(history) == sum(reported.values()) > 0
    assert set(frame["trial_id"]) >= {t for t, n in reported.items() if n}
    assert results.best() is not None
    # Ray's own view, with no Ray running, holds the trials not started yet too: here PENDING
    assert len(results.result_grid) == sum(results.status_counts().values()) == len(frame) + results.unstarted
    assert set(plots.save(results)) == set(PLOTS)
    cli = run_cli("results", str(storage / name), timeout=300)
    assert cli.returncode == 0, cli.stderr[-3000:]
    assert "(unfinished)" in cli.stdout


def _kill_session(proc: subprocess.Popen) -> None:
    """SIGKILL the sweep and every process it started, and wait until none is left.

    Ray's trial workers run in process groups of their own (in the sweep's session), so killing the
    sweep's process group alone would leave them running for a while.
    """
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.time() + 30
    while (left := _session_members(proc.pid)) and time.time() < deadline:
        for pid in left:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.2)
    assert not _session_members(proc.pid), "processes of the killed sweep are still running"


def _session_members(sid: int) -> list:
    """Live (not zombie) processes in session ``sid``, from /proc."""
    members = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()  # after "pid (comm)": state ppid pgrp session
        except OSError:
            continue
        if int(fields[3]) == sid and fields[0] != "Z":
            members.append(int(stat.parent.name))
    return members
