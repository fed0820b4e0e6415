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
import yaml

from conftest import run_cli, small_sweep_overrides
from yolotune import console, plots
from yolotune.console import Progress, Refresher, Screen, Throttle


@pytest.fixture(autouse=True)
def _fresh_live_view_class(monkeypatch):
    """Each test builds ``console.LiveView`` anew (``__getattr__`` caches it in the module): mutmut forks its
    mutants from a process that already built it, so a mutant of its builder would otherwise never run."""
    monkeypatch.delitem(console.__dict__, "LiveView", raising=False)


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


@pytest.mark.parametrize("seconds, text", [(59.4, "59s"), (59.5, "1m00s"), (60, "1m00s"), (61, "1m01s"),
                                           (3599, "59m59s"), (3600, "1h00m"), (3659, "1h00m"), (3660, "1h01m"),
                                           (7199, "1h59m"), (7200, "2h00m"),
                                           (36000 + 59 * 60, "10h59m")])
def test_duration_boundaries(seconds, text):
    assert console.duration(seconds) == text


@pytest.mark.parametrize("value, text", [("a" * 16, "a" * 16), ("a" * 17, "a" * 15 + "…"),
                                         (123456789012345678, "123456789012345…"), (0.000123456, "0.000123"),
                                         (1234.5, "1.23e+03"), (2.0, "2"), (None, "None")])
def test_short_values(value, text):
    assert console.short(value) == text


def test_sampled_values_fit_the_width():
    def config(first: int, n: int) -> dict:  # parts k0=vv..., then "k1=vvvvvv" (9 characters) each
        return {f"k{i}": "v" * (first if i == 0 else 6) for i in range(n)}

    assert len(" ".join(f"{k}={v}" for k, v in list(config(7, 10).items()))) == 100
    assert console.sampled(config(7, 10)) == " ".join(f"{k}={v}" for k, v in config(7, 10).items())  # 100: all
    assert console.sampled(config(7, 11)) == console.sampled(config(7, 10)) + " (+1 more)"
    assert console.sampled(config(8, 12)) == " ".join(f"{k}={v}" for k, v in config(8, 9).items()) + " (+3 more)"
    assert console.sampled(config(7, 11), width=9) == "k0=vvvvvvv (+10 more)"  # the first part always
    assert console.sampled({"lr0": 0.0066912, "momentum": 0.9, "optimizer": "SGD", "mosaic": 1}) == \
        "lr0=0.00669 momentum=0.9 optimizer=SGD mosaic=1"
    assert console.sampled({}) == ""


@pytest.mark.parametrize("text, line", [
    ("Traceback (most recent call last):\n  File x\nValueError: bad lr0\n  \n", "ValueError: bad lr0"),
    ("  KeyError: 'x'  ", "KeyError: 'x'"), ("", "unknown error"), (None, "unknown error"), ("\n  \n", "unknown error"),
    ("E" * 160, "E" * 160), ("E" * 161, "E" * 159 + "…"),
])
def test_error_of_is_the_last_line_cut_to_160(text, line):
    assert console.error_of(text) == line


def test_numbers_and_epochs():
    assert [console._number(v) for v in (None, 0, 0.123456, 12345.6, 1.1)] == ["-", "0", "0.1235", "1.235e+04", "1.1"]
    epochs = [SimpleNamespace(last_result=r) for r in (None, {}, {"epoch": None}, {"epoch": 0}, {"epoch": 3.0})]
    assert [console._epoch(t) for t in epochs] == [0, 0, 0, 0, 3]
    assert console._epoch(SimpleNamespace(last_result={"epoch": 7})) == 7 and \
        isinstance(console._epoch(SimpleNamespace(last_result={"epoch": 3.0})), int)


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
    last = Progress("fitness", "max", total=2, epochs=3, prunes=False, now=0)
    last.result("a", 30)
    last.result("a", 10)
    trials = [_trial("a", epoch=3), _trial("b", epoch=5)]  # ran all their epochs (b: a resumed run of fewer)
    assert last.line(trials, now=50) == "0/2 trials | 8 trial-epochs | best fitness - | 50s elapsed | ~0s left"


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


class _Recording:
    """A stream that records its writes and flushes, in order."""

    def __init__(self, tty=False):
        self.calls, self.tty = [], tty

    def write(self, text):
        self.calls.append(text)
        return len(text)

    def flush(self):
        self.calls.append("<flush>")

    def isatty(self):
        return self.tty


def test_plain_screen_flushes_each_line_to_the_stdout_it_was_made_with(monkeypatch):
    stream, later = _Recording(), _Recording()
    monkeypatch.setattr(sys, "stdout", stream)
    screen = Screen(echo=True, total=2)
    monkeypatch.setattr(sys, "stdout", later)
    screen.event("trial a started")
    screen.progress("0/2 trials", done=0, now=0)
    screen.close("1/2 trials", shown=False)
    assert stream.calls == ["trial a started", "\n", "<flush>", "0/2 trials", "\n", "<flush>",
                            "1/2 trials", "\n", "<flush>"]
    assert later.calls == []


@pytest.mark.parametrize("echo, tty, drawn", [(True, True, None), (True, False, "2/5 trials\n"), (False, True, ""),
                                              (False, False, "")])
def test_screen_draws_a_bar_on_a_terminal_it_echoes_to(tmp_path, monkeypatch, echo, tty, drawn):
    terminal = _Recording(tty)
    monkeypatch.setattr(sys, "stdout", terminal)
    with console.log_to(tmp_path / "yolotune.log"):
        screen = Screen(echo=echo, total=5)
        bar = screen.bar
        screen.progress("2/5 trials", done=2, now=0)
        screen.close("2/5 trials", shown=True)
        assert screen.bar is None
    assert (tmp_path / "yolotune.log").read_text().splitlines()[1:] == ["2/5 trials"]  # the bar: not in the log
    out = "".join(call for call in terminal.calls if call != "<flush>")
    if drawn is not None:
        assert bar is None and out == drawn
        return
    assert (bar.total, bar.n, bar.leave) == (5, 2, False) and bar.dynamic_ncols  # follows the terminal's width
    assert out.startswith("\r") and " 2/5 trials\r" in out and "%" not in out and "it/s" not in out  # bar, line
    assert out.endswith("\r2/5 trials\n") and out.count("\n") == 1  # the bar cleared, the final line once
    assert terminal.calls[-3:] == ["2/5 trials", "\n", "<flush>"]


def test_screen_without_echo_writes_its_progress_lines_to_the_log_only(tmp_path, capsys):
    with console.log_to(tmp_path / "yolotune.log"):
        screen = Screen(echo=False, total=2)
        screen.progress("0/2 trials", done=0, now=0)
        screen.progress("0/2 trials", done=0, now=10)
        screen.event("trial a finished")
        screen.progress("1/2 trials", done=1, force=True, now=11)
        screen.close("1/2 trials", shown=True)
        screen.close("2/2 trials", shown=False)
    assert capsys.readouterr().out == ""
    assert (tmp_path / "yolotune.log").read_text().splitlines()[1:] == \
        ["0/2 trials", "trial a finished", "1/2 trials", "2/2 trials"]


def test_the_console_log_answers_for_the_terminal(tmp_path, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    with console.log_to(tmp_path / "yolotune.log"):
        assert sys.stdout.isatty() and sys.stdout.getvalue() == "" and sys.stdout.terminal is terminal
        print("x")
        assert sys.stdout.getvalue() == "x\n"


@pytest.mark.parametrize("verbose, shown", [("yolotune", True), ("ray", True), ("quiet", False)])
def test_announce_prints_unless_quiet_and_always_logs(tmp_path, capsys, verbose, shown):
    with console.log_to(tmp_path / "yolotune.log"):
        console.announce("plan: 4 trials on 2 GPUs", verbose)
    assert capsys.readouterr().out == ("plan: 4 trials on 2 GPUs\n" if shown else "")
    assert (tmp_path / "yolotune.log").read_text().splitlines()[1:] == ["plan: 4 trials on 2 GPUs"]


def test_the_live_view_class_is_built_on_first_use_and_kept():
    from ray.tune import Callback

    assert "LiveView" not in vars(console)  # the autouse fixture removed it
    cls = console.LiveView
    assert vars(console)["LiveView"] is cls and console.LiveView is cls and issubclass(cls, Callback)
    assert (cls.__name__, cls.__qualname__, cls.__module__) == ("LiveView", "LiveView", "yolotune.console")
    for name in ("LiveVieww", "liveview", "XXLiveViewXX"):
        with pytest.raises(AttributeError) as error:
            getattr(console, name)
        assert str(error.value) == f"module 'yolotune.console' has no attribute {name!r}"
    assert {"liveview", "LIVEVIEW", "XXLiveViewXX"}.isdisjoint(vars(console))
    view = console.live_view(Path("exp"), "fitness", "max", 7, True, "yolotune", print, 16)
    assert type(view) is cls and (view.exp_dir, view.metric, view.mode, view.epochs, view.prunes, view.echo,
                                  view.refresh) == (Path("exp"), "fitness", "max", 7, True, True, print)
    assert console.live_view("exp", "fitness", "max", 7, False, "ray", print, 16).echo is False

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


def test_the_console_flushes_the_terminal_when_its_log_cannot(capsys):
    def fail():
        raise OSError(28, "No space left on device")

    tee = console._Tee(sys.stdout, SimpleNamespace(write=len, flush=fail))
    tee.write("shown")
    tee.flush()
    assert capsys.readouterr().out == "shown"


@pytest.mark.parametrize("result, node", [
    ({"hostname": "h1", "node_id": "0123456789abcdef"}, "h1 (node 01234567)"),
    ({"hostname": "h1"}, "h1 (node ?)"),
    ({"node_id": "abc"}, "? (node abc)"),
    ({}, "? (node ?)"),
])
def test_node_of_names_host_and_node(result, node):
    assert console.node_of(result) == node


def test_a_retried_trial_goes_on_once(tmp_path, clock, capsys):
    view = console.live_view(tmp_path, "val/box_loss", "min", 4, True, "yolotune", print, 16)
    view.setup(total_num_samples=1)
    trial = _live_trial("a", epoch=1, last=1.0, best=1.0)
    view.on_trial_recover(0, [trial], trial)
    for epoch in (2, 3):
        _report(view, [trial], trial, epoch, 1.0, 1.0, hostname="h", node_id="n")
    went_on = [line for line in capsys.readouterr().out.splitlines() if "goes on" in line]
    assert went_on == ["trial a goes on on h (node n) with epoch 2"]


def test_console_goes_on_when_its_log_finds_the_disk_full(capsys):
    """/dev/full: every write finds no space left (ENOSPC), as on a storage that filled up."""
    with console.log_to(Path("/dev/full")):
        print("still on the console")
    assert capsys.readouterr().out == "still on the console\n"


def test_ray_records_the_live_view_reports_stay_off_the_console(tmp_path, capsys):
    logger, handler = logging.getLogger("ray.tune.test"), logging.StreamHandler(sys.stderr)
    logging.getLogger("ray").addHandler(handler)
    try:
        with console.log_to(tmp_path / "yolotune.log"), console.ray_logs("yolotune"):
            logger.error("Trial task failed for trial trial_x")
            logger.warning("No trial is running and no new trial has been started")
            logger.error("Saving experiment state failed: OSError: [Errno 28] No space left on device")
            logger.warning("Failed to fetch metrics for 2 trial(s):\n- trial_p: FileNotFoundError(...)")  # not started
        logger.error("Trial task failed for trial trial_y")  # filter removed
        with console.log_to(tmp_path / "yolotune.log"), console.ray_logs("ray"):
            logger.error("Trial task failed for trial trial_z")  # Ray's console as Ray has it
    finally:
        logging.getLogger("ray").removeHandler(handler)
    err = capsys.readouterr().err
    assert "trial_x" not in err and "Errno 28" not in err and "No trial is running" in err and "trial_y" in err and "trial_z" in err
    assert "trial_p" not in err
    log = (tmp_path / "yolotune.log").read_text()
    assert "Trial task failed for trial trial_x" in log and "trial_z" in log and "trial_y" not in log
    assert "trial_p" in log


def test_refresher_coalesces_requests_and_never_runs_twice_at_once(capsys, monkeypatch):
    monkeypatch.setattr(Refresher, "SHARE", 1.0)  # no wait between refreshes: see the test below
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


def test_refresher_waits_nine_times_a_refreshs_length_before_the_next():
    """At most a tenth of the time refreshing, whatever a refresh costs (counted from its own length,
    so a loaded machine only makes the wait longer)."""
    starts, took = [], 0.05

    def refresh():
        starts.append(time.monotonic())
        time.sleep(took)

    refresher = Refresher(refresh)
    refresher.request()
    while not starts:
        time.sleep(0.01)
    refresher.request()  # during the first refresh: runs once the wait is over
    deadline = time.monotonic() + 10
    while len(starts) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    refresher.close()
    assert len(starts) == 2 and starts[1] - starts[0] >= took / Refresher.SHARE


def test_closing_the_refresher_ends_its_wait_at_once():
    refresher = Refresher(lambda: time.sleep(0.2))  # then a 1.8 s wait
    refresher.request()
    time.sleep(0.3)
    closing = time.monotonic()
    refresher.close()
    assert time.monotonic() - closing < 1.0


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
    assert capsys.readouterr().err.count("warning: could not refresh the report: state file half written") == 1


def test_refresher_retries_once_quietly_in_a_daemon_thread(monkeypatch, capsys):
    """A state file Ray was rewriting as it was read: the retry reads it whole, and nothing is said.
    The thread is a daemon (a hung refresh never keeps the driver from exiting), named in stack dumps."""
    monkeypatch.setattr(console, "RETRY_S", 0.01)
    calls = []

    def refresh():
        calls.append(1)
        if len(calls) == 1:
            raise ValueError("state file half written")

    refresher = Refresher(refresh)
    assert (refresher.thread.name, refresher.thread.daemon) == ("yolotune-report", True)
    refresher.request()
    time.sleep(0.3)
    refresher.close()
    assert len(calls) == 2 and capsys.readouterr().err == ""


def test_a_trial_whose_batch_ultralytics_cut_is_named_once(tmp_path, capsys):
    """Compared with the trial's sampled batch, else the experiment's; a batch AutoBatch sizes is not."""
    view = console.live_view(tmp_path, "fitness", "max", 3, False, "yolotune", print, 32)
    view.setup(total_num_samples=4)
    fixed, sampled, autobatch, kept = (SimpleNamespace(trial_id=f"t{i}", config=config) for i, config in
                                       enumerate([{"lr0": 0.01}, {"batch": 64}, {"batch": 0.7}, {"batch": 16}]))
    for epoch in (1, 2):
        for trial, trained in ((fixed, 16), (sampled, 8), (autobatch, 24), (kept, 16)):
            view.on_trial_result(0, [], trial, {"epoch": epoch, "trained_batch": trained, "time_this_iter_s": 1.0})
    assert capsys.readouterr().out.splitlines() == [
        "trial t0: Ultralytics cut the batch from 32 to 16 after running out of GPU memory",
        "trial t1: Ultralytics cut the batch from 64 to 8 after running out of GPU memory"]
    view.on_experiment_end([])


def test_live_view_pickles_its_settings_only(tmp_path):
    view = console.live_view(tmp_path, "fitness", "max", 10, True, "yolotune", print, 16)
    view.setup(total_num_samples=4)
    view.on_experiment_end(trials=[])
    copy = pickle.loads(pickle.dumps(view))  # Ray keeps callbacks in tuner.pkl
    assert type(copy).__name__ == "LiveView" and copy.exp_dir == tmp_path and copy.echo
    assert not any(k.startswith("_") for k in vars(copy))


def test_the_live_report_is_refreshed_as_trials_end_but_the_last(tmp_path, capsys):
    """The runner writes the final report right after the last trial: a refresh then would only delay it."""
    refreshes = []
    view = console.live_view(tmp_path, "fitness", "max", 2, False, "yolotune", lambda: refreshes.append(1), 16)
    view.setup(total_num_samples=3)
    trials = [SimpleNamespace(trial_id=f"t{i}", status="RUNNING", last_result={"epoch": 2}, metric_analysis={})
              for i in range(3)]
    for i, trial in enumerate(trials):
        trial.status = "TERMINATED"
        view.on_trial_complete(0, trials, trial)
        time.sleep(0.3)
        assert len(refreshes) == min(i + 1, 2), f"after trial {i + 1} of 3"
    view.on_experiment_end(trials)



# --- the LiveView callback, driven as Ray Tune drives it


class _Requests:
    """Stands in for Refresher: counts the refreshes the live view asks for."""

    def __init__(self, refresh):
        self.refresh, self.requests, self.closed = refresh, 0, False

    def request(self):
        self.requests += 1

    def close(self):
        self.closed = True


@pytest.fixture
def clock(monkeypatch):
    """console's clock, set by hand (the throttle, elapsed time and plain progress lines read it)."""
    now = SimpleNamespace(t=1000.0)
    monkeypatch.setattr(console, "time", SimpleNamespace(time=lambda: now.t, sleep=time.sleep))
    monkeypatch.setattr(console, "Refresher", _Requests)
    return now


def _live_trial(trial_id, epoch=0, config=None, last=None, best=None, error_file=None):
    """A Ray Tune trial as the live view reads it; ``best`` is the minimum, the maximum is worse than ``last``."""
    analysis = {"val/box_loss": {"min": best, "max": 9.0, "last": last}} if best is not None else {}
    return SimpleNamespace(trial_id=trial_id, status="RUNNING", config=config or {}, error_file=error_file,
                           last_result={"epoch": epoch} if epoch else {}, metric_analysis=analysis,
                           num_failures=0, max_failures=2)


def _report(view, trials, trial, epoch, last, best, **result):
    trial.last_result = {"epoch": epoch, **result}
    trial.metric_analysis = {"val/box_loss": {"min": best, "max": 9.0, "last": last}}
    view.on_trial_result(0, trials, trial, {"epoch": epoch, **result})


def test_live_view_prints_trial_events_and_progress_lines(tmp_path, clock, capsys):
    """3 trials of 4 epochs: one stopped early, one resumed, retried after a lost node and finished on
    another, one errored."""
    error_file = tmp_path / "error.txt"
    error_file.write_text("Failure # 1\nTraceback (most recent call last):\n  File x\nValueError: bad lr0\n")
    lost_node = tmp_path / "lost.txt"
    lost_node.write_text("Failure # 1\nThe actor died because its node has died. Node Id: abcdef1234\n")
    refresh = print
    with console.log_to(tmp_path / "yolotune.log"):
        view = console.live_view(tmp_path, "val/box_loss", "min", 4, True, "yolotune", refresh, 16)
        view.setup(total_num_samples=3)
        t0 = _live_trial("t0", config={"lr0": 0.0123456, "optimizer": "SGD"})
        t1 = _live_trial("t1", epoch=1, config={"lr0": 0.1}, last=1.3, best=1.3)
        trials = [t0, t1]  # t2 not created yet
        view.on_trial_start(0, trials, t0)
        view.on_step_end(1, trials)
        view.on_trial_start(1, trials, t1)
        clock.t = 1040
        _report(view, trials, t0, 1, 1.5, 1.5, time_this_iter_s=40.0)  # a trial's first epoch: not timed
        _report(view, trials, t1, 2, 1.2, 1.2, time_this_iter_s=30.0)
        clock.t = 1050
        _report(view, trials, t0, 2, 1.3, 1.2, time_this_iter_s=10.0)
        _report(view, trials, t1, 3, 1.1, 1.1)  # no time reported: 0 s
        clock.t = 1060
        view.on_step_end(3, trials)  # mean epoch 5 s; to go: t0 2, t1 1, t2 4 epochs, 2 at once: 4 epochs
        clock.t = 1070
        view.on_trial_complete(4, trials, t0)  # Ray calls back before it sets the status
        t0.status = "TERMINATED"
        t2 = _live_trial("t2", config={"lr0": 0.001}, error_file=str(error_file))
        trials.append(t2)
        view.on_trial_start(5, trials, t2)
        t1.last_result.update(hostname="w2", node_id="abcdef1234")
        t1.error_file, t1.num_failures = str(lost_node), 1
        view.on_trial_recover(6, trials, t1)
        clock.t = 1080
        view.on_trial_error(7, trials, t2)
        t2.status = "ERROR"
        clock.t = 1090
        _report(view, trials, t1, 4, 1.15, 1.1, time_this_iter_s=5.0, hostname="h1", node_id="11112222ff")
        view.on_trial_complete(8, trials, t1)
        t1.status = "TERMINATED"
        view.on_experiment_end(trials)  # the last line printed was the final one
    printed = capsys.readouterr().out.splitlines()
    assert printed == [
        "trial t0 started: lr0=0.0123 optimizer=SGD",
        "0/3 trials | 1 trial-epochs | best val/box_loss 1.3 (t1) | 0s elapsed | time left: estimating",
        "trial t1 resumed from its checkpoint: lr0=0.1",
        "0/3 trials | 5 trial-epochs | best val/box_loss 1.1 (t1) | 1m00s elapsed | up to 20s left",
        "trial t0 stopped early by the scheduler at epoch 2: val/box_loss 1.3 (best 1.2)",
        "1/3 trials | 5 trial-epochs | best val/box_loss 1.1 (t1) | 1m10s elapsed | up to 20s left",
        "trial t2 started: lr0=0.001",
        "trial t1 lost its worker on w2 (node abcdef12) after 3 epochs: The actor died because its node has died. "
        "Node Id: abcdef1234; retry 1 of 2, from its last checkpoint",
        f"trial t2 errored after 0 epochs: ValueError: bad lr0  (log: {tmp_path / 'trial_t2' / 'train.log'})",
        "2/3 trials (1 errored) | 5 trial-epochs | best val/box_loss 1.1 (t1) | 1m20s elapsed | up to 5s left",
        "trial t1 goes on on h1 (node 11112222) with epoch 4",
        "trial t1 finished 4 epochs: val/box_loss 1.15 (best 1.1)",
        "3/3 trials (1 errored) | 6 trial-epochs | best val/box_loss 1.1 (t1) | 1m30s elapsed",
    ]
    assert (tmp_path / "yolotune.log").read_text().splitlines()[1:] == printed
    assert view._refresher.refresh is refresh and view._refresher.closed
    assert view._refresher.requests == 2  # after t0 and t2; after the last trial the runner writes the report


@pytest.mark.parametrize("info, total", [({"total_num_samples": 3}, 3), ({"num_samples": 5}, 5),
                                         ({"total_num_samples": None, "num_samples": 2}, 2), ({}, 0)])
def test_live_view_total_and_its_final_line_without_trials(tmp_path, clock, capsys, info, total):
    view = console.live_view(tmp_path, "fitness", "max", 10, False, "yolotune", print, 16)
    view.setup(**info)
    clock.t += 65
    view.on_experiment_end([])
    left = " | time left: estimating" if total else ""
    assert capsys.readouterr().out == f"0/{total} trials | 0 trial-epochs | best fitness - | 1m05s elapsed{left}\n"


@pytest.mark.parametrize("events, finals", [
    ([], 1), (["complete"], 1), (["error"], 1), (["complete", "start"], 2), (["complete", "result"], 2),
    (["complete", "recover"], 2), (["error", "complete"], 1),
])
def test_live_view_prints_the_final_line_unless_it_just_did(tmp_path, clock, capsys, events, finals):
    view = console.live_view(tmp_path, "val/box_loss", "min", 4, True, "yolotune", print, 16)
    view.setup(total_num_samples=3)
    trials = [_live_trial("a", epoch=2, last=1.0, best=1.0), _live_trial("b", epoch=2, last=2.0, best=2.0)]
    ended = iter(trials)
    for event in events:
        if event == "complete":
            view.on_trial_complete(0, trials, next(ended))
        elif event == "error":
            view.on_trial_error(0, trials, next(ended))
        elif event == "start":
            view.on_trial_start(0, trials, trials[1])
        elif event == "result":
            view.on_trial_result(0, trials, trials[1], {"epoch": 3})
        else:
            view.on_trial_recover(0, trials, trials[1])
    view.on_experiment_end(trials)
    ended, errored = len([e for e in events if e in ("complete", "error")]), "error" in events
    final = f"{ended}/3 trials{' (1 errored)' if errored else ''} | 4 trial-epochs | best val/box_loss 1 (a)" \
        " | 0s elapsed | time left: estimating"
    printed = capsys.readouterr().out.splitlines()
    assert printed.count(final) == finals and printed[-1] == final


def test_live_view_end_lines_without_values_or_error_file(tmp_path, clock, capsys):
    exp_dir = tmp_path / "exp"
    view = console.live_view(exp_dir, "val/box_loss", "min", 2, False, "yolotune", print, 16)
    view.setup(total_num_samples=0)  # unknown: every end asks for a refresh
    unvalidated = _live_trial("a", epoch=2)
    other_metric = _live_trial("b", epoch=1)
    other_metric.metric_analysis = {"fitness": {"min": 0.1, "max": 0.2, "last": 0.2}}
    no_analysis = _live_trial("c", epoch=2)
    no_analysis.metric_analysis = None
    lost = _live_trial("d", epoch=1)
    trials = [unvalidated, other_metric, no_analysis, lost]
    for trial in trials[:3]:
        view.on_trial_complete(0, trials, trial)
    view.on_trial_error(0, trials, lost)
    printed = capsys.readouterr().out.splitlines()
    assert printed[::2] == ["trial a finished 2 epochs: val/box_loss - (best -)",
                            "trial b stopped early by the scheduler at epoch 1: val/box_loss - (best -)",
                            "trial c finished 2 epochs: val/box_loss - (best -)",
                            f"trial d errored after 1 epoch: unknown error  (log: {exp_dir / 'trial_d' / 'train.log'})"]
    assert printed[1::2] == [f"{n}/0 trials{' (1 errored)' if n == 4 else ''} | 6 trial-epochs | best val/box_loss -"
                             " | 0s elapsed" for n in (1, 2, 3, 4)]
    assert view._refresher.requests == 4


def test_quiet_live_view_writes_the_log_only(tmp_path, clock, capsys):
    with console.log_to(tmp_path / "yolotune.log"):
        view = console.live_view(tmp_path, "fitness", "max", 3, True, "quiet", print, 16)
        view.setup(total_num_samples=1)
        trial = _live_trial("a", epoch=3)
        view.on_trial_start(0, [trial], trial)
        view.on_step_end(0, [trial])
        view.on_trial_complete(0, [trial], trial)
        view.on_experiment_end([trial])
    assert capsys.readouterr().out == ""
    assert (tmp_path / "yolotune.log").read_text().splitlines()[1:] == [
        "trial a resumed from its checkpoint: ",
        "0/1 trials | 3 trial-epochs | best fitness - | 0s elapsed | time left: estimating",
        "trial a finished 3 epochs: fitness - (best -)", "1/1 trials | 3 trial-epochs | best fitness - | 0s elapsed"]


def test_live_view_on_a_terminal_redraws_its_bar_at_most_every_second(tmp_path, clock, monkeypatch):
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stdout", terminal)
    with console.log_to(tmp_path / "yolotune.log"):
        view = console.live_view(tmp_path, "fitness", "max", 3, False, "yolotune", print, 16)
        view.setup(total_num_samples=2)
        bar = view._screen.bar
        assert bar.total == 2 and bar.n == 0
        trials = [_live_trial("a"), _live_trial("b")]
        view.on_step_end(0, trials)
        assert bar.desc == "0/2 trials | 0 trial-epochs | best fitness - | 0s elapsed | time left: estimating"
        trials[0].last_result = {"epoch": 1}
        clock.t += 0.9
        view.on_step_end(1, trials)
        assert bar.desc.startswith("0/2 trials | 0 trial-epochs")  # not redrawn within the second
        clock.t += 0.1
        view.on_step_end(2, trials)
        assert bar.desc == "0/2 trials | 1 trial-epochs | best fitness - | 1s elapsed | time left: estimating"
        trials[0].last_result = {"epoch": 3}
        view.on_trial_complete(3, trials, trials[0])
        assert (bar.n, bar.desc) == \
            (1, "1/2 trials | 3 trial-epochs | best fitness - | 1s elapsed | time left: estimating")
        view.on_trial_complete(4, trials, trials[1])
        assert bar.n == 2
        view.on_experiment_end(trials)
        assert view._screen.bar is None
    final = "2/2 trials | 3 trial-epochs | best fitness - | 1s elapsed"
    assert terminal.getvalue().endswith(f"\r{final}\n") and terminal.getvalue().count(final + "\n") == 1
    assert (tmp_path / "yolotune.log").read_text().splitlines()[1:] == [
        "0/2 trials | 0 trial-epochs | best fitness - | 0s elapsed | time left: estimating",
        "trial a finished 3 epochs: fitness - (best -)",
        "1/2 trials | 3 trial-epochs | best fitness - | 1s elapsed | time left: estimating",
        "trial b stopped early by the scheduler at epoch 0: fitness - (best -)", final]


def test_trial_log_keeps_finished_lines_and_restores_everything(tmp_path, ultralytics_log_to_stdout):
    from ultralytics.utils import LOGGER

    from yolotune.trial_log import trial_log

    streams = [getattr(h, "stream", None) for h in LOGGER.handlers]  # pytest may add a handler without one
    out, err = sys.stdout, sys.stderr
    log = tmp_path / "trial_x" / "train.log"
    with pytest.raises(ValueError):
        with trial_log(log):
            LOGGER.info("an Ultralytics line")
            print("\r\x1b[K  1/3  50%", end="", flush=True)
            print("\r\x1b[K  1/3 100%")
            print("a warning", file=sys.stderr)
            raise ValueError("bad lr0")
    with pytest.raises(SystemExit):  # how Ray stops a trial: no traceback for that
        with trial_log(log):
            print("second trial in the same worker")
            sys.exit(0)
    assert (sys.stdout, sys.stderr) == (out, err) and [getattr(h, "stream", None) for h in LOGGER.handlers] == streams
    lines = log.read_text().splitlines()
    assert lines[:3] == ["an Ultralytics line", "  1/3 100%", "a warning"]
    assert lines[3].startswith("Traceback") and lines[-2:] == ["ValueError: bad lr0", "second trial in the same worker"]


def first_run_env(home: Path) -> dict:
    """A machine where neither Ultralytics nor matplotlib has run yet: no settings file, no font cache."""
    return {"HOME": str(home), "YOLO_CONFIG_DIR": str(home / "ultralytics"), "MPLCONFIGDIR": str(home / "mpl")}


def first_run_happened(home: Path) -> bool:
    return any((home / "ultralytics").glob("*/settings.json")) and any((home / "mpl").glob("fontlist-*.json"))


@pytest.mark.subprocess
def test_a_first_dry_run_on_a_new_machine_prints_only_yolotunes_lines(tmp_path, shapes_cache):
    """Ultralytics' three lines about the settings file it creates and matplotlib's font cache line stay off
    the console; a dry run has no experiment log to keep them."""
    proc = run_cli("experiment=quickstart", "dry_run=true", f"storage={tmp_path / 'runs'}", "data.train_images=8",
                   "data.val_images=4", f"data.cache_dir={shapes_cache}", cwd=tmp_path,
                   env=first_run_env(tmp_path / "home"))
    assert (proc.returncode, proc.stderr) == (0, ""), proc.stderr
    assert first_run_happened(tmp_path / "home")
    lines = proc.stdout.splitlines()
    assert len(lines) == 2 and lines[0].startswith("Plan: ") and lines[1].startswith("Checked: "), proc.stdout
    assert not (tmp_path / "runs").exists()


@pytest.mark.slow
def test_a_sweep_prints_a_short_live_view_and_keeps_every_log(tmp_path, shapes_cache):
    """4 trials of 3 epochs, one of which errors (its optimizer does not exist), stdout a pipe, on a machine where
    Ultralytics and matplotlib run for the first time: only yolotune's lines, their setup lines in yolotune.log."""
    overrides = [o for o in small_sweep_overrides(tmp_path, shapes_cache, "live", iterations=1)
                 if not o.startswith("space.lr0")]
    proc = run_cli(*overrides, "~space.lr0", "~space.momentum", "~train.optimizer",
                   "+space.optimizer={dist:grid,values:[SGD,SGD,SGD,NotAnOptimizer]}",
                   env=first_run_env(tmp_path / "home"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert first_run_happened(tmp_path / "home")
    exp_dir = tmp_path / "live"
    live = proc.stdout.split("\nExperiment ")[0].splitlines()
    assert len(live) <= 3 * 4 + 6, proc.stdout
    assert live[0].startswith("Plan: ") and all(re.match(r"(trial \w+ |\d/4 trials[ (])", line) for line in live[1:]), \
        proc.stdout
    assert "INFO ultralytics: Creating new Ultralytics Settings" in (exp_dir / "yolotune.log").read_text()
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
    assert len(list((exp_dir / "plots").glob("*.png"))) == len(plots.KINDS) and (exp_dir / "report.html").is_file()


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


@pytest.mark.parametrize("mode", ["max", "min"])
def test_progress_line_names_the_trial_the_results_rank_best_when_values_tie(tmp_path, mode):
    """Ties go to the trial recorded first (trials.jsonl: the order trials started, which need not be the order
    Ray created them in), in the live line and in results.best alike, whichever way the metric is ranked."""
    from yolotune.layout import append_jsonl
    from yolotune.results import load

    created = ["a_00000", "b_00001", "c_00002"]  # Ray's trial list
    started = ["b_00001", "a_00000", "c_00002"]  # their workers came up in this order
    values = {"b_00001": 0.5, "a_00000": 0.5, "c_00002": 0.2 if mode == "max" else 0.9}
    (tmp_path / ".hydra").mkdir()
    (tmp_path / ".hydra" / "config.yaml").write_text(yaml.safe_dump({
        "metric": "fitness", "mode": mode, "iterations": 3, "space": {}, "train": {"epochs": 1},
        "model": {"weights": "yolo11n.yaml"}, "scheduler": {"type": "fifo"}, "search": {"type": "random"},
        "data": {"yaml": "/data/shapes.yaml"}}))
    progress = Progress("fitness", mode, total=3, epochs=1, prunes=False, now=0)
    for trial_id in started:
        append_jsonl(tmp_path / "trials.jsonl", {"event": "started", "trial_id": trial_id, "config": {}})
        progress.started(trial_id)
        (tmp_path / f"trial_{trial_id}").mkdir()
        append_jsonl(tmp_path / f"trial_{trial_id}" / "history.jsonl",
                     {"epoch": 1, "validated": 1, "fitness": values[trial_id]})
    assert load(tmp_path).best()["trial_id"] == "b_00001"
    trials = [_trial(trial_id, epoch=1, best=values[trial_id], metric="fitness") for trial_id in created]
    assert "best fitness 0.5 (b_00001)" in progress.line(trials, now=1)


def test_a_resumed_live_view_knows_the_order_its_trials_were_recorded_in(tmp_path):
    from yolotune.layout import append_jsonl

    for trial_id in ("b_00001", "a_00000", "b_00001"):
        append_jsonl(tmp_path / "trials.jsonl", {"event": "started", "trial_id": trial_id})
    view = console.live_view(tmp_path, "fitness", "max", 1, False, "quiet", lambda: None, 16)
    view.setup(total_num_samples=3)
    try:
        view.on_trial_start(0, [], _trial("c_00002"))
        assert view._progress.order == {"b_00001": 0, "a_00000": 1, "c_00002": 2}
    finally:
        view.on_experiment_end([])


@pytest.mark.parametrize("error,shown", [(OSError(28, "Error writing bytes to file"), False),  # ENOSPC
                                         (OSError(13, "Permission denied"), True), (None, True)])
def test_rays_failed_state_save_on_a_full_storage_stays_off_the_console(error, shown):
    """Ray logs a failed experiment-state save with the error in its traceback only, not its message: on a
    full storage the run ends with yolotune's one line instead; other errors still show."""
    from yolotune.console import _RayConsoleFilter

    record = logging.LogRecord("ray.tune.execution.experiment_state", logging.ERROR, __file__, 1,
                               "Saving experiment state to storage at '%s' failed with exception: ", ("/runs/x",),
                               (type(error), error, None) if error else None)
    assert _RayConsoleFilter(live_view=True).filter(record) is shown
    assert _RayConsoleFilter(live_view=False).filter(record) is True  # verbose=ray: Ray's records as Ray prints them
