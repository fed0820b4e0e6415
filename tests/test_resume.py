"""Resume and fault tolerance: a killed or interrupted sweep loses no finished work."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import pickle
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

import yolotune
from conftest import REPO, kill_processes_under, ray_temp_dir, run_cli, small_sweep_overrides
from yolotune import layout
from yolotune.errors import ConfigError, is_storage_full
from yolotune.layout import HISTORY, read_jsonl

EPOCHS = 8


def _rows(trial_dir: Path):
    """The epochs a trial reported, from the history it appends before each report."""
    path = trial_dir / HISTORY
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


def _start(overrides, ray_tmp: Path, cwd: Path = REPO):
    # As from a terminal: SIGINT handled by default even where the tests run with it ignored (a background job)
    return subprocess.Popen([sys.executable, "-m", "yolotune", *overrides], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            env={**os.environ, "RAY_TMPDIR": str(ray_tmp)})


def _wait_for(predicate, proc, timeout=300, every=0.2):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        time.sleep(every)
    raise AssertionError("timed out")


def _one_done_one_midway(exp_dir: Path, epochs: int):
    def check():
        counts = sorted(len(_rows(d)) for d in exp_dir.glob("trial_*"))
        return epochs in counts and any(0 < c <= 2 for c in counts)  # well before the end: room to stop
    return check


def _sequential_sweep(storage, shapes_cache, name):
    """Three 8-epoch trials, one at a time, without early stopping."""
    overrides = small_sweep_overrides(storage, shapes_cache, name, iterations=3, epochs=EPOCHS)
    return [o for o in overrides if not o.startswith("scheduler")] + [
        "scheduler=fifo", "resources.max_concurrent_trials=1"]


@pytest.mark.slow
@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGINT], ids=["SIGKILL", "SIGINT"])
def test_interrupted_sweep_resumes_where_it_stopped(tmp_path, shapes_cache, sig):
    """With checkpoint.keep=1 too: the ended trials outside the best lose their weights, the running one
    keeps the checkpoint it resumes from."""
    exp_dir = tmp_path / "exp"
    with ray_temp_dir() as ray_tmp:
        proc = _start(_sequential_sweep(tmp_path, shapes_cache, "exp") + ["checkpoint.keep=1"], ray_tmp)
        _wait_for(_one_done_one_midway(exp_dir, EPOCHS), proc)
        os.killpg(proc.pid, sig)  # the whole process group, as a terminal's Ctrl-C does
        if sig == signal.SIGKILL:  # a dying machine takes this sweep's Ray workers (in their own groups) too
            kill_processes_under(ray_tmp)
        output = proc.communicate(timeout=120)[0]
    # leaving ray_temp_dir killed orphaned workers, which would otherwise train on after the driver is gone
    if sig == signal.SIGKILL:
        command = ["resume=true", f"storage={tmp_path}"]
    else:
        assert proc.returncode == 130, output[-3000:]
        command = shlex.split(output.strip().splitlines()[-1])
        assert command[:4] == ["python", "-m", "yolotune", "resume=true"], output[-2000:]
        command = command[3:]
    before = {d.name: _rows(d) for d in exp_dir.glob("trial_*")}
    finished = {name for name, rows in before.items() if len(rows) == EPOCHS}
    midway = {name: len(rows) for name, rows in before.items() if 0 < len(rows) < EPOCHS}
    assert finished and midway
    checkpoint_epoch = {name: _last_checkpoint_epoch(exp_dir / name) for name in midway}

    resumed = run_cli(*command)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    after = {d.name: _rows(d) for d in exp_dir.glob("trial_*")}
    assert len(after) == 3
    for name in finished:  # finished trials were not re-run: same results, same timestamps
        assert after[name] == before[name]
    for name in midway:  # continued after its last checkpoint, not from scratch
        new_rows = after[name][len(before[name]):]
        assert new_rows[0]["epoch"] == checkpoint_epoch[name] + 1 > 1
        assert [r["epoch"] for r in after[name]][-1] == EPOCHS
    for name, rows in after.items():  # FIFO validates the last epoch only, before and after the resume too
        assert all(r["validated"] == (r["epoch"] == EPOCHS) == ("val/box_loss" in r) for r in rows), rows
    trials = pd.read_csv(exp_dir / "trials.csv")
    assert len(trials) == 3 and (trials["epochs"] == EPOCHS).all() and (trials["status"] == "TERMINATED").all()
    events = [(e["trial_id"], e["event"]) for e in layout.read_jsonl(exp_dir / layout.TRIAL_RECORD)[0]]
    for name in midway:  # the restored recorder goes on with the same record
        trial_id = name.removeprefix("trial_")
        assert events.count((trial_id, "started")) == 1 and (trial_id, "resumed") in events, events
    # The resume prints yolotune's lines only (no Ray traceback of a failed state save), and its state saved:
    # Ray's newest experiment state has every trial ended
    assert "Traceback" not in resumed.stdout and resumed.stderr == "", resumed.stdout[-3000:] + resumed.stderr[-3000:]
    from ray.tune import ExperimentAnalysis

    assert [t.status for t in ExperimentAnalysis(str(exp_dir)).trials] == ["TERMINATED"] * 3
    best = min(after, key=lambda name: after[name][-1]["val/box_loss"])  # FIFO: each trial's one validation
    weights = {name: sorted(p.relative_to(exp_dir / name).as_posix() for p in (exp_dir / name).rglob("*.pt"))
               for name in after}
    assert {name for name, files in weights.items() if files} == {best}, weights
    kept = exp_dir / best / "train" / "weights" / layout.TRIAL_BEST_WEIGHTS
    newest_checkpoint = max((exp_dir / best).glob("checkpoint_*/last.pt"))
    assert kept.samefile(newest_checkpoint)  # its last epoch's weights, once: a link to its checkpoint
    assert all((exp_dir / name / HISTORY).is_file() for name in after)


@pytest.mark.slow
def test_a_second_ctrl_c_stops_at_once_and_the_moved_experiment_resumes_once(tmp_path, shapes_cache):
    """Ctrl-C twice: the run ends at once, resumable. The experiment, moved to another machine's default storage
    (runs/tune in the working dir), resumes there although its saved config names the old storage, which is gone;
    a second resume of it meanwhile is refused; copied once finished, it reads, and its resume shows its results."""
    overrides = small_sweep_overrides(tmp_path / "first", shapes_cache, "exp", iterations=1, epochs=3)
    overrides = [o for o in overrides if not o.startswith(("scheduler", "data.train_images"))] + [
        "scheduler=fifo", "data.train_images=16"]
    with ray_temp_dir() as ray_tmp:
        proc = _start(overrides, ray_tmp)
        _wait_for(lambda: list((tmp_path / "first" / "exp").glob("trial_*/checkpoint_*")), proc)
        os.killpg(proc.pid, signal.SIGINT)
        # The second as soon as Ray took the first (its graceful stop, then results and plots, can end within
        # a second): Ray's warning reaches the experiment's log.
        log = tmp_path / "first" / "exp" / layout.CONSOLE_LOG
        _wait_for(lambda: "Stop signal received" in log.read_text(errors="replace"), proc, timeout=60, every=0.02)
        os.killpg(proc.pid, signal.SIGINT)
        second = time.time()
        output = proc.communicate(timeout=120)[0]
        stopped_in = time.time() - second
    assert proc.returncode == 130 and "Stopped at once" in output and "Traceback" not in output, output[-3000:]
    assert stopped_in < 20, stopped_in
    command = shlex.split(output.strip().splitlines()[-1])
    assert command == ["python", "-m", "yolotune", "resume=true", "name=exp", f"storage={tmp_path / 'first'}"]

    (tmp_path / "second" / "runs" / "tune").mkdir(parents=True)
    exp_dir = tmp_path / "second" / "runs" / "tune" / "exp"
    (tmp_path / "first" / "exp").rename(exp_dir)  # moved: nothing left where it started
    (trial_dir,) = exp_dir.glob("trial_*")
    before = _rows(trial_dir)
    checkpoint_epoch = _last_checkpoint_epoch(trial_dir)
    with ray_temp_dir() as ray_tmp:
        resume = _start(["resume=true", "name=exp"], ray_tmp, cwd=tmp_path / "second")
        _wait_for(lambda: f"process {resume.pid} " in (exp_dir / layout.RUN_LOCK).read_text(), resume)
        again = run_cli("resume=true", "name=exp", cwd=tmp_path / "second", timeout=120)
        output = resume.communicate(timeout=600)[0]
    assert again.returncode == 2 and again.stderr.startswith(
        f"yolotune: error: name=exp: in use: yolotune process {resume.pid} on ") and again.stderr.count("\n") == 1, \
        again.stderr
    assert resume.returncode == 0, output[-3000:]
    after = _rows(trial_dir)
    assert after[:len(before)] == before and after[len(before)]["epoch"] == checkpoint_epoch + 1 > 1
    assert after[-1]["epoch"] == 3
    assert not (tmp_path / "first" / "exp").exists()

    shutil.copytree(exp_dir, tmp_path / "third" / "exp")  # a finished experiment, copied
    results = yolotune.load(tmp_path / "third" / "exp")
    assert results.finished and results.path == tmp_path / "third" / "exp" and len(results.dataframe()) == 1
    shown = run_cli("results", str(tmp_path / "third" / "exp"), "--format", "json", timeout=120)
    assert shown.returncode == 0 and json.loads(shown.stdout)["finished"], shown.stderr
    record = (tmp_path / "third" / "exp" / layout.TRIAL_RECORD).read_text()
    finished = run_cli("resume=true", "name=exp", f"storage={tmp_path / 'third'}", timeout=120)
    assert (finished.returncode, finished.stderr) == (0, ""), finished.stderr
    assert finished.stdout.startswith(f"Experiment {tmp_path / 'third' / 'exp'}  (finished)\nTrials: 1 (1 TERMINATED)\n")
    assert finished.stdout.endswith("\nFinished: every trial has ended, nothing was run again (resume_errored=true "
                                    "re-runs errored ones).\n"), finished.stdout
    assert (tmp_path / "third" / "exp" / layout.TRIAL_RECORD).read_text() == record  # nothing ran


def _last_checkpoint_epoch(trial_dir: Path) -> int:
    """The epoch of the trial's newest persisted checkpoint (checkpoint_00000N holds epoch N + 1).

    A kill can land between a checkpoint's copy and its result's line in result.json, so the
    checkpoint, not the history, says where the trial can continue from.
    """
    return max(int(p.name.split("_")[1]) for p in trial_dir.glob("checkpoint_*")) + 1


@pytest.mark.slow
def test_a_failing_trial_is_an_error_row_and_the_others_finish(tmp_path, coco8):
    proc = run_cli(f"storage={tmp_path}", "name=err", f"data.yaml={coco8}", "model=yolo11n-scratch",
                   "space=minimal", "~space.lr0", "~space.momentum", "~train.optimizer",
                   "+space.optimizer={dist:grid,values:[SGD,NotAnOptimizer]}", "scheduler=fifo",
                   "train.epochs=1", "train.imgsz=64", "iterations=1")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "err" / "trials.csv")
    assert sorted(trials["status"]) == ["ERROR", "TERMINATED"]
    error = trials.loc[trials.status == "ERROR", "error"].iloc[0]
    assert "NotAnOptimizer" in error
    assert "ERROR" in proc.stdout and "NotAnOptimizer" in proc.stdout  # the summary lists it
    errored = trials.loc[trials.status == "ERROR", "trial_id"].iloc[0]
    kept = (tmp_path / "err" / f"trial_{errored}" / "error.txt").read_text()
    assert "yolotune/trainable.py" in kept and "NotAnOptimizer" in kept  # the whole traceback is kept


@pytest.mark.slow
def test_all_trials_failing_exits_non_zero(tmp_path, coco8):
    proc = run_cli(f"storage={tmp_path}", "name=err", f"data.yaml={coco8}", "model=yolo11n-scratch",
                   "space=minimal", "~space.lr0", "~space.momentum", "~train.optimizer",
                   "+space.optimizer={dist:choice,values:[NotAnOptimizer]}", "scheduler=fifo",
                   "train.epochs=1", "train.imgsz=64", "iterations=1")
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    trials = pd.read_csv(tmp_path / "err" / "trials.csv")  # the run ended normally: results were written
    assert list(trials["status"]) == ["ERROR"] and "NotAnOptimizer" in trials["error"][0]


def _fails_once_at_epoch_2(storage: Path, shapes_cache: Path, name: str, marker: Path):
    """One 3-epoch trial whose training raises once, at the start of epoch 2 (tests/flaky/sitecustomize.py),
    after epoch 1's checkpoint was reported."""
    overrides = small_sweep_overrides(storage, shapes_cache, name, iterations=1, epochs=3)
    overrides = [o for o in overrides if not o.startswith("scheduler")] + ["scheduler=fifo"]
    env = {"YOLOTUNE_TEST_FAIL_ONCE": str(marker),
           "PYTHONPATH": os.pathsep.join([str(REPO / "tests" / "flaky"), os.environ.get("PYTHONPATH", "")])}
    return overrides, env


def _epochs(exp_dir: Path) -> list:
    (trial_dir,) = exp_dir.glob("trial_*")
    return [row["epoch"] for row in _rows(trial_dir)]


@pytest.mark.slow
def test_a_killed_worker_is_retried_from_its_checkpoint(tmp_path, shapes_cache):
    """A system failure (the trial's worker process killed) is retried (failure.max_failures, default 2);
    the trial's own errors are not (test_resume_errored_reruns_an_errored_trial_from_its_checkpoint)."""
    marker = tmp_path / "failed-once"
    overrides, env = _fails_once_at_epoch_2(tmp_path, shapes_cache, "retry", marker)
    proc = run_cli(*overrides, env={**env, "YOLOTUNE_TEST_FAIL_HOW": "kill"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert marker.exists()  # it was killed once
    assert _epochs(tmp_path / "retry") == [1, 2, 3]  # the retry went on from epoch 1, not from scratch
    assert list(pd.read_csv(tmp_path / "retry" / "trials.csv")["status"]) == ["TERMINATED"]
    retried = [e for e in read_jsonl(tmp_path / "retry" / "trials.jsonl")[0] if e["event"] == "retried"]
    assert len(retried) == 1 and retried[0]["retry"] == 1 and retried[0]["max_failures"] == 2, retried
    assert "lost its worker on" in proc.stdout and "retry 1 of 2" in proc.stdout, proc.stdout


@pytest.mark.slow
def test_resume_errored_reruns_an_errored_trial_from_its_checkpoint(tmp_path, shapes_cache):
    marker = tmp_path / "failed-once"
    overrides, env = _fails_once_at_epoch_2(tmp_path, shapes_cache, "errored", marker)
    first = run_cli(*overrides, env=env)  # its own error: not retried (failure.max_failures=2): ERROR
    assert first.returncode == 1, first.stdout[-3000:] + first.stderr[-3000:]
    assert list(pd.read_csv(tmp_path / "errored" / "trials.csv")["status"]) == ["ERROR"]
    assert _epochs(tmp_path / "errored") == [1]

    resumed = run_cli("resume=true", "resume_errored=true", "name=errored", f"storage={tmp_path}", env=env)
    assert resumed.returncode == 0, resumed.stdout[-3000:] + resumed.stderr[-3000:]
    assert _epochs(tmp_path / "errored") == [1, 2, 3]
    assert list(pd.read_csv(tmp_path / "errored" / "trials.csv")["status"]) == ["TERMINATED"]


@pytest.mark.parametrize("override", ["space.lr0.high=0.5", "iterations=20", "metric=fitness", "scheduler=fifo",
                                      "train.epochs=9"])
def test_resume_refuses_changes_to_the_search(tmp_path, override):
    (tmp_path / "old" / ".hydra").mkdir(parents=True)
    (tmp_path / "old" / ".hydra" / "config.yaml").write_text("iterations: 2\n")
    proc = run_cli("resume=true", f"storage={tmp_path}", override)
    assert proc.returncode == 2
    key = override.split("=")[0]
    assert proc.stderr.strip().startswith(f"yolotune: error: {key}=") and "resume" in proc.stderr


def test_nothing_to_resume(tmp_path):
    proc = run_cli("resume=true", f"storage={tmp_path}")
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"yolotune: error: resume=True: no unfinished experiment under {tmp_path}; " \
                                  "start one without resume=true"


def test_a_write_that_found_no_space_is_told_apart_however_it_arrives():
    from ray.exceptions import RayTaskError
    from ray.tune.error import TuneError

    full = OSError(errno.ENOSPC, "No space left on device")
    in_a_trial = RayTaskError("train", "Traceback ...", full)  # as the driver gets a trial's exception
    try:
        try:
            raise full
        except OSError:
            raise TuneError("Traceback ...")  # as Ray re-raises a callback's
    except TuneError as e:
        in_a_callback = e
    assert all(is_storage_full(e) for e in (full, in_a_trial, in_a_callback, OSError(errno.EDQUOT, "quota")))
    assert not any(is_storage_full(e) for e in (None, OSError(errno.EACCES, "denied"), RayTaskError(
        "train", "Traceback ...", ValueError("bad lr0")), RuntimeError("No space left on device")))


@pytest.mark.slow
def test_a_full_storage_stops_the_sweep_and_resume_goes_on(tmp_path, shapes_cache):
    """The storage is a small file system (a tmpfs in a mount namespace of the test's own) that a file
    of someone else's fills but for ~25 MiB: the trial's second epoch does not fit. The sweep stops with
    one line naming the storage and its free space, epoch 1 kept; once the file is deleted, resume=true
    trains epoch 2 and finishes."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs `unshare --mount` (root) to mount a small file system")
    storage, out = tmp_path / "storage", tmp_path / "out"
    storage.mkdir()
    out.mkdir()
    overrides = [o for o in small_sweep_overrides(storage, shapes_cache, "full", iterations=1, epochs=2)
                 if not o.startswith("scheduler")] + ["scheduler=fifo"]
    script = f"""mount -t tmpfs -o size=64m none {storage} || exit 99
head -c 39M /dev/zero > {storage}/other
"$0" -m yolotune "$@" > {out}/first.out 2> {out}/first.err; echo $? > {out}/first.rc
cp -a {storage}/full {out}/after_first && rm {storage}/other
"$0" -m yolotune resume=true name=full storage={storage} > {out}/resumed.out 2>&1; echo $? > {out}/resumed.rc
cp -a {storage}/full {out}/after_resume"""
    with ray_temp_dir() as ray_tmp:
        subprocess.run(["unshare", "--mount", "sh", "-c", script, sys.executable, *overrides], cwd=REPO, timeout=900,
                       env={**os.environ, "RAY_TMPDIR": str(ray_tmp)}, check=True)
    first = (out / "first.out").read_text() + (out / "first.err").read_text()
    assert (out / "first.rc").read_text().strip() == "1", first[-5000:]
    line = (out / "first.err").read_text().strip().splitlines()[-1]
    assert line.startswith(f"yolotune: error: storage {storage} is full ("), first[-5000:]
    assert line.endswith(f"free space, then go on with: python -m yolotune resume=true name=full storage={storage}")
    assert "Traceback" not in first, first[-5000:]
    assert _epochs(out / "after_first") == [1]  # the finished epoch is kept

    resumed = (out / "resumed.out").read_text()
    assert (out / "resumed.rc").read_text().strip() == "0", resumed[-5000:]
    assert _epochs(out / "after_resume") == [1, 2]  # epoch 2 from epoch 1's checkpoint
    assert list(pd.read_csv(out / "after_resume" / "trials.csv")["status"]) == ["TERMINATED"]
    assert (out / "after_resume" / layout.DONE_MARKER).exists()


@pytest.mark.subprocess
def test_a_running_experiment_is_refused_to_a_second_run_and_a_killed_ones_lock_is_free(tmp_path, shapes_cache):
    """resume=true of an experiment another process holds: one line, before Ray starts (tuner.pkl here is
    not Ray's: Ray would fail on it), nothing written. Killed, that process holds it no more."""
    from hydra import compose, initialize_config_module

    from yolotune.config import register_configs
    from yolotune.experiment import RunLock, create, save_config

    register_configs()
    exp_dir = tmp_path / "exp"
    with initialize_config_module("yolotune.conf", version_base="1.3"):
        cfg = compose("config", overrides=["data=shapes", f"data.cache_dir={shapes_cache}", "space=minimal",
                                           "model=yolo11n-scratch"])
    save_config(exp_dir, cfg, [])
    (exp_dir / layout.TUNER_STATE).write_bytes(pickle.dumps({}))
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from pathlib import Path; "
                               "from yolotune.experiment import RunLock; lock = RunLock(Path(sys.argv[1])); "
                               "lock.acquire(); print('locked', flush=True); time.sleep(600)", str(exp_dir)],
                              stdout=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        files = {p: p.read_bytes() for p in exp_dir.rglob("*") if p.is_file()}
        proc = run_cli("resume=true", "name=exp", f"storage={tmp_path}", timeout=120)
        assert proc.returncode == 2 and proc.stderr == (
            f"yolotune: error: name=exp: in use: yolotune process {holder.pid} on {socket.gethostname()} is running "
            "it; wait for it to end (a killed run holds it no more)\n"), proc.stderr
        assert {p: p.read_bytes() for p in exp_dir.rglob("*") if p.is_file()} == files
    finally:
        os.killpg(holder.pid, signal.SIGKILL)
        holder.wait()
    lock = RunLock(exp_dir)
    lock.acquire()
    lock.release()
    with pytest.raises(ConfigError) as err:  # what a run that found the name free is told once another made it
        create(exp_dir, lock, cfg, [])
    assert str(err.value) == ("name=exp: another yolotune run started an experiment of this name meanwhile; choose "
                              "another name")
    lock.release()


@pytest.mark.slow
def test_runs_started_at_once_get_their_own_experiments_and_one_name_goes_to_one(tmp_path, shapes_cache):
    """Four runs started together on one storage: two without a name make two experiments; of two with the
    same name, one runs it and the other is refused in one line (after its Ray started: the name was free
    when it checked)."""
    overrides = small_sweep_overrides(tmp_path, shapes_cache, "x", iterations=1, epochs=1)
    overrides = [o for o in overrides if not o.startswith(("name=", "scheduler", "data.train_images"))] + [
        "scheduler=fifo", "data.train_images=8"]
    with contextlib.ExitStack() as stack:
        procs = [_start(overrides + name, stack.enter_context(ray_temp_dir()))
                 for name in ([], [], ["name=twin"], ["name=twin"])]
        outputs = [p.communicate(timeout=600)[0] for p in procs]
    codes = [p.returncode for p in procs]
    assert codes[:2] == [0, 0] and sorted(codes[2:]) == [0, 2], outputs
    refused = outputs[2 + codes[2:].index(2)].strip().splitlines()
    assert refused[-1].startswith("yolotune: error: name=twin: ") and "Traceback" not in "".join(refused), refused
    experiments = sorted(p.name for p in tmp_path.iterdir() if (p / layout.SAVED_CONFIG).is_file())
    assert len(experiments) == 3 and "twin" in experiments, experiments
    for name in experiments:
        assert pd.read_csv(tmp_path / name / "trials.csv")["status"].tolist() == ["TERMINATED"]
