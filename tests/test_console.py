"""The live console view, the console log, the background report and the trials' own logs."""

from __future__ import annotations

import io
import logging
import pickle
import re
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pandas as pd
import pytest

from conftest import run_cli, small_sweep_overrides
from yolotune import console
from yolotune.console import Progress, Refresher, Screen, Throttle


def _trial(trial_id, status="RUNNING", epoch=0, best=None, metric="val/box_loss"):
    analysis = {metric: {"min": best, "max": best, "last": best}} if best is not None else {}
    return SimpleNamespace(trial_id=trial_id, status=status, last_result={"epoch": epoch} if epoch else {},
                           metric_analysis=analysis, config={})


def test_durations_and_values_are_short():
    assert [console.duration(s) for s in (0, 42.4, 65, 3600 + 125)] == ["0s", "42s", "1m05s", "1h02m"]
    assert console.short(0.0018793) == "0.00188" and console.short(16) == "16" and console.short(True) == "True"
    assert console.short("a" * 30) == "a" * 15 + "…"
    many = {f"param{i}": 0.123456 for i in range(20)}
    line = console.sampled(many, width=60)
    assert line.startswith("param0=0.123 param1=0.123") and line.endswith("more)") and len(line) < 80


def test_trial_event_lines():
    assert console.started_line("a_00001", {"lr0": 0.0066912, "optimizer": "SGD"}) == \
        "trial a_00001 started: lr0=0.00669 optimizer=SGD"
    assert "a_00001 resumed from its checkpoint" in console.started_line("a_00001", {}, resumed=True)
    assert console.ended_line("a_00002", 4, 10, "fitness", 0.5, 0.61234) == \
        "trial a_00002 stopped early by the scheduler at epoch 4: fitness 0.5 (best 0.6123)"
    assert console.ended_line("a_00002", 10, 10, "fitness", 0.5, 0.6).startswith("trial a_00002 finished 10 epochs")
    assert console.ended_line("a_00002", 1, 1, "fitness", 0.5, 0.6).startswith("trial a_00002 finished 1 epoch:")
    traceback_text = "Failure # 1\nTraceback (most recent call last):\n  File x\nValueError: bad lr0\n\n"
    assert console.error_of(traceback_text) == "ValueError: bad lr0"
    assert len(console.error_of("E: " + "x" * 500)) == 160
    line = console.errored_line("a_00003", 0, "ValueError: bad lr0", Path("/runs/e/trial_a_00003/train.log"))
    assert line == "trial a_00003 errored after 0 epochs: ValueError: bad lr0  (log: /runs/e/trial_a_00003/train.log)"


def test_progress_line_counts_best_and_remaining_time():
    progress = Progress("val/box_loss", "min", total=4, epochs=10, prunes=True, now=0)
    trials = [_trial("t0"), _trial("t1")]
    assert progress.line(trials, now=5) == \
        "0/4 trials | 0 trial-epochs | best val/box_loss - | 5s elapsed | time left: estimating"
    for trial_id, seconds in [("t0", 40), ("t1", 41), ("t0", 4), ("t1", 6)]:  # first epochs: start-up, not timed
        progress.result(trial_id, seconds)
    trials = [_trial("t0", epoch=2, best=1.5), _trial("t1", epoch=2, best=1.2),
              _trial("t2", "ERROR", epoch=6, best=1.1)]
    progress.end("t0", errored=False)  # Ray calls back before it sets the status
    # 5 s an epoch, 2 trials at once; to go: t1 8 epochs and the trial not created yet 10: 10 epochs
    assert progress.line(trials, now=100) == \
        "2/4 trials (1 errored) | 10 trial-epochs | best val/box_loss 1.1 (t2) | 1m40s elapsed | up to 50s left"
    assert progress.done(trials) == 2
    maximise = Progress("val/box_loss", "max", total=4, epochs=10, prunes=False, now=0)
    maximise.result("t0", 40)
    maximise.result("t0", 5)
    # two at once, to go: 8 + 8 + 10 (not created yet) epochs of 5 s
    assert maximise.line(trials, now=100).endswith("best val/box_loss 1.5 (t0) | 1m40s elapsed | ~1m05s left")
    trials[1].status = "TERMINATED"  # an interrupt stops running trials without announcing an end
    assert progress.line(trials, now=101).startswith("2/4 trials")
    resumed = Progress("val/box_loss", "min", total=4, epochs=10, prunes=True, now=0)
    every = [_trial(f"t{i}", "TERMINATED", epoch=10, best=1.0) for i in range(4)]
    assert resumed.line(every, now=200).endswith("3m20s elapsed")  # done: no time left shown


def test_remaining_time_of_the_last_trials_is_that_of_the_longest():
    tail = Progress("fitness", "max", total=2, epochs=10, prunes=False, now=0)
    trials = [_trial("a", epoch=9), _trial("b", epoch=4)]
    tail.result("a", 30)
    tail.result("a", 10)
    assert tail.line(trials, now=50).endswith("~1m00s left")  # b's 6 epochs of 10 s, not (1 + 6) / 2 of them


def test_throttle():
    due = Throttle(30)
    assert [due(t) for t in (0, 10, 29.9, 30, 31)] == [True, False, False, True, False]
    assert due(32, force=True)


def test_plain_screen_prints_plain_lines_at_a_bounded_rate(capsys):
    screen = Screen(echo=True, total=4)
    assert screen.bar is None  # captured stdout is not a terminal
    for second in range(0, 100, 5):
        screen.progress(f"progress at {second}", done=0, now=second)
    screen.event("trial t0 finished")
    screen.progress("progress after a trial ended", done=1, force=True, now=101)
    screen.close("final", shown=True)  # already printed after the last trial ended
    lines = capsys.readouterr().out.splitlines()
    assert lines == ["progress at 0", "progress at 30", "progress at 60", "progress at 90", "trial t0 finished",
                     "progress after a trial ended"]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_terminal_screen_redraws_one_line_and_logs_plain_lines(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    with console.log_to(tmp_path / "yolotune.log"):
        screen = Screen(echo=True, total=2)
        screen.progress("1 of 2 trials", done=1, now=0)
        screen.progress("still 1 of 2 trials", done=1, now=1)  # redrawn, not logged: within 30 s
        screen.event("trial t0 finished")
        screen.progress("2 of 2 trials", done=2, force=True, now=2)
        screen.close("2 of 2 trials", shown=True)
    out = terminal.getvalue()
    assert "\r" in out and "still 1 of 2 trials" in out and "trial t0 finished\n" in out
    assert out.rstrip().endswith("2 of 2 trials") and out.count("2 of 2 trials\n") == 1
    log = (tmp_path / "yolotune.log").read_text().splitlines()[1:]
    assert log == ["1 of 2 trials", "trial t0 finished", "2 of 2 trials"]


def test_console_log_copies_the_output_and_appends(tmp_path, capsys):
    log = tmp_path / "yolotune.log"
    out, err = sys.stdout, sys.stderr
    with console.log_to(log):
        print("hello")
        print("oops", file=sys.stderr)
        Screen(echo=False, total=1).event("only in the log")
    assert (sys.stdout, sys.stderr) == (out, err)
    with console.log_to(log):
        print("again")
    text = log.read_text()
    assert text.count("--- ") == 2 and ["hello", "oops", "only in the log", "again"] == \
        [line for line in text.splitlines() if not line.startswith("--- ")]
    assert "only in the log" not in capsys.readouterr().out


def test_ray_records_the_live_view_reports_stay_off_the_console(tmp_path, capsys):
    logger, handler = logging.getLogger("ray.tune.test"), logging.StreamHandler(sys.stderr)
    logging.getLogger("ray").addHandler(handler)
    try:
        with console.log_to(tmp_path / "yolotune.log"), console.ray_logs("yolotune"):
            logger.error("Trial task failed for trial trial_x")
            logger.warning("No trial is running and no new trial has been started")
        logger.error("Trial task failed for trial trial_y")  # filter removed
        with console.log_to(tmp_path / "yolotune.log"), console.ray_logs("ray"):
            logger.error("Trial task failed for trial trial_z")  # Ray's console as Ray has it
    finally:
        logging.getLogger("ray").removeHandler(handler)
    err = capsys.readouterr().err
    assert "trial_x" not in err and "No trial is running" in err and "trial_y" in err and "trial_z" in err
    log = (tmp_path / "yolotune.log").read_text()
    assert "Trial task failed for trial trial_x" in log and "trial_z" in log and "trial_y" not in log


def test_refresher_coalesces_requests_and_never_runs_twice_at_once(capsys):
    running, runs, release = [], [], threading.Event()

    def refresh():
        assert not running, "two refreshes at once"
        running.append(1)
        release.wait(5)
        runs.append(1)
        running.clear()

    refresher = Refresher(refresh)
    refresher.request()
    time.sleep(0.2)  # the first refresh is running
    for _ in range(5):
        refresher.request()
    release.set()
    time.sleep(0.5)
    refresher.close()
    assert len(runs) == 2  # the five requests made during the first refresh became one


def test_refresher_warns_and_goes_on(monkeypatch, capsys):
    monkeypatch.setattr(console, "RETRY_S", 0.01)
    calls = []

    def refresh():
        calls.append(1)
        raise ValueError("state file half written")

    refresher = Refresher(refresh)
    refresher.request()
    time.sleep(0.3)
    refresher.close()
    assert len(calls) == 2  # one retry, then a warning
    assert "warning: could not refresh the report: state file half written" in capsys.readouterr().err


def test_live_view_pickles_its_settings_only(tmp_path):
    view = console.live_view(tmp_path, "fitness", "max", 10, True, "yolotune", print)
    view.setup(total_num_samples=4)
    view.on_experiment_end(trials=[])
    copy = pickle.loads(pickle.dumps(view))  # Ray keeps callbacks in tuner.pkl
    assert type(copy).__name__ == "LiveView" and copy.exp_dir == tmp_path and copy.echo
    assert not any(k.startswith("_") for k in vars(copy))


def test_the_live_report_is_refreshed_as_trials_end_but_the_last(tmp_path, capsys):
    """The runner writes the final report right after the last trial: a refresh then would only delay it."""
    refreshes = []
    view = console.live_view(tmp_path, "fitness", "max", 2, False, "yolotune", lambda: refreshes.append(1))
    view.setup(total_num_samples=3)
    trials = [SimpleNamespace(trial_id=f"t{i}", status="RUNNING", last_result={"epoch": 2}, metric_analysis={})
              for i in range(3)]
    for i, trial in enumerate(trials):
        trial.status = "TERMINATED"
        view.on_trial_complete(0, trials, trial)
        time.sleep(0.3)
        assert len(refreshes) == min(i + 1, 2), f"after trial {i + 1} of 3"
    view.on_experiment_end(trials)


def test_trial_log_keeps_finished_lines_and_restores_everything(tmp_path):
    from ultralytics.utils import LOGGER

    from yolotune.trainable import _trial_log

    streams = [h.stream for h in LOGGER.handlers]
    out, err = sys.stdout, sys.stderr
    log = tmp_path / "trial_x" / "train.log"
    with pytest.raises(ValueError):
        with _trial_log(log):
            LOGGER.info("an Ultralytics line")
            print("\r\x1b[K  1/3  50%", end="", flush=True)
            print("\r\x1b[K  1/3 100%")
            print("a warning", file=sys.stderr)
            raise ValueError("bad lr0")
    with pytest.raises(SystemExit):  # how Ray stops a trial: no traceback for that
        with _trial_log(log):
            print("second trial in the same worker")
            sys.exit(0)
    assert (sys.stdout, sys.stderr) == (out, err) and [h.stream for h in LOGGER.handlers] == streams
    lines = log.read_text().splitlines()
    assert lines[:3] == ["an Ultralytics line", "  1/3 100%", "a warning"]
    assert lines[3].startswith("Traceback") and lines[-2:] == ["ValueError: bad lr0", "second trial in the same worker"]


@pytest.mark.slow
def test_a_sweep_prints_a_short_live_view_and_keeps_every_log(tmp_path, shapes_cache):
    """4 trials of 3 epochs, one of which errors (its optimizer does not exist), stdout a pipe."""
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "live", iterations=1)
                 if not o.startswith("space.lr0")]
    proc = run_cli(*overrides, "~space.lr0", "~space.momentum", "~train.optimizer",
                   "+space.optimizer={dist:grid,values:[SGD,SGD,SGD,NotAnOptimizer]}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    exp_dir = tmp_path / "live"
    live = proc.stdout.split("\nExperiment ")[0].splitlines()
    assert len(live) <= 3 * 4 + 6, proc.stdout
    assert "\r" not in proc.stdout and "\x1b" not in proc.stdout
    assert "Traceback" not in proc.stderr  # the failure is one line on stdout; the traceback is in its log
    trials = pd.read_csv(exp_dir / "trials.csv")
    best = trials.loc[trials["best_val/box_loss"].idxmin(), "trial_id"]
    assert "best val/box_loss" in live[-1] and f"({best})" in live[-1] and "4/4 trials (1 errored)" in live[-1]
    errored = trials.loc[trials.status == "ERROR", "trial_id"].iloc[0]
    assert any(line.startswith(f"trial {errored} errored after 0 epochs: NotImplementedError") and "train.log" in line
               for line in live)
    for trial_id in trials.trial_id:
        log = (exp_dir / f"trial_{trial_id}" / "train.log").read_text()
        if trial_id == errored:
            assert "Traceback" in log and "NotAnOptimizer" in log
        else:
            assert re.search(r"^\s+1/3\s", log, re.M) and "Epoch" in log  # Ultralytics' epoch lines
    assert f"trial {errored} errored" in (exp_dir / "yolotune.log").read_text()
    assert len(list((exp_dir / "plots").glob("*.png"))) == 3 and (exp_dir / "report.html").is_file()


def test_plain_progress_repeats_an_unchanged_line_only_as_a_heartbeat(capsys):
    from yolotune.console import PLAIN_EVERY_S, PLAIN_HEARTBEAT_S, Screen

    screen = Screen(echo=True, total=2)
    same = "0/2 trials | 0 trial-epochs | best fitness - | {}s elapsed"
    for second in range(0, int(PLAIN_HEARTBEAT_S) + 1, 10):
        screen.progress(same.format(second), done=0, now=second)
    screen.progress("0/2 trials | 1 trial-epochs | best fitness 0.1 (a) | 9999s elapsed", done=0,
                    now=PLAIN_HEARTBEAT_S + PLAIN_EVERY_S)
    printed = capsys.readouterr().out.splitlines()
    assert printed == [same.format(0), same.format(int(PLAIN_HEARTBEAT_S)),
                       "0/2 trials | 1 trial-epochs | best fitness 0.1 (a) | 9999s elapsed"]


def test_epochs_without_validation_leave_the_best_and_last_values_to_the_validated_ones():
    """validate=decisions: an unvalidated epoch's result has no metric (Ray's Trial then keeps its running
    values); the progress line's best and a trial's end line read the validated epochs only."""
    from ray.tune.experiment import Trial

    trials = []
    for trial_id, losses in (("a", [1.4, None, 1.1, None]), ("b", [1.3, None, None, None])):
        trial = Trial("__fake", config={}, trial_id=trial_id, stub=True)
        for epoch, loss in enumerate(losses, 1):
            result = {"epoch": epoch, "validated": int(loss is not None), "train/box_loss": 0.1 / epoch}
            trial.update_last_result({**result, **({"val/box_loss": loss} if loss is not None else {})})
        trials.append(trial)
    progress = Progress("val/box_loss", "min", total=2, epochs=4, prunes=True, now=0)
    assert "| best val/box_loss 1.1 (a) |" in progress.line(trials, now=10)
    analysis = trials[0].metric_analysis["val/box_loss"]
    assert console.ended_line("a", 4, 4, "val/box_loss", analysis["last"], analysis["min"]) == \
        "trial a finished 4 epochs: val/box_loss 1.1 (best 1.1)"
