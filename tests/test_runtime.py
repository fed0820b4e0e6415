"""The decisions of the modules a sweep runs through, in-process and without Ray running: where a
trial continues from, which epoch's weights are its best, which weights best.pt exports, which
config a trial is reported with, and which saved Ray state an old experiment is converted from.
Each test here was checked against the bug it is for (planted, seen to fail, restored)."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from pyarrow.fs import LocalFileSystem
from ray.tune import Checkpoint

from compose import experiment
from test_results_fast import LOSS, TRIALS, build, ranked_ids
from yolotune import layout, records
from yolotune.results import load
from yolotune.errors import ConfigError
from yolotune.resources import local_cpus
from yolotune.preflight import local_gpus
from yolotune.runner import _ray_init_args, check_reachable, export_best, resume_command
from yolotune.storage import Location
from yolotune.epoch_report import BestEpoch
from yolotune.trainable import _resume_point

# --- where a trial continues from -------------------------------------------------------------


def _save(path: Path, epoch: int) -> Path:
    """A checkpoint as Ultralytics writes it: tensors and pickled objects (a model) besides numbers."""
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"epoch": epoch, "model": torch.nn.Linear(1, 1), "updates": torch.tensor([epoch])}, path)
    return path


def _checkpoint(folder: Path, epoch: int) -> Checkpoint:
    _save(folder / "last.pt", epoch)
    return Checkpoint.from_directory(folder)


# (this trial's last.pt epoch or None, its registered checkpoint's epoch or None, checkpoint from another
#  trial (PBT donor), expected epoch or None for a fresh start)
RESUME_POINTS = [
    (None, None, False, None),  # a fresh trial
    (4, None, False, 4),        # the driver died before registering any checkpoint: its own last.pt
    (None, 3, False, 3),        # a resumed trial on another node: only the registered checkpoint
    (4, 3, False, 4),           # last.pt is newer than the registered checkpoint (killed right after an epoch)
    (3, 5, False, 5),           # the checkpoint is newer
    (4, 4, False, 4),
    (6, 2, True, 2),            # PBT: the donor's weights, even though this trial's own are newer
    ("cut", 3, False, 3),       # last.pt cut short by a kill: the checkpoint
    ("cut", None, False, None),  # nothing readable: a fresh start
    ("unregistered", None, False, 5),  # last.pt moved into a checkpoint folder the driver never registered
]


@pytest.mark.parametrize("own,registered,donor,expected", RESUME_POINTS)
def test_a_trial_continues_from_its_newest_readable_checkpoint(tmp_path, own, registered, donor, expected):
    trial_dir = tmp_path / "exp" / "trial_a"
    save_dir = trial_dir / "train"
    if own == "cut":
        (save_dir / "weights").mkdir(parents=True)
        (save_dir / "weights" / "last.pt").write_bytes(b"PK\x03\x04 cut")
    elif own == "unregistered":
        _save(trial_dir / "checkpoint_000004" / "last.pt", 5)
    elif own is not None:
        _save(save_dir / "weights" / "last.pt", own)
    checkpoint = None
    if registered is not None:
        checkpoint = _checkpoint((tmp_path / "exp" / "trial_b" if donor else trial_dir) / "checkpoint_000001",
                                 registered)
    point = _resume_point(trial_dir, save_dir, checkpoint)
    assert (point and point["epoch"]) == expected


# --- the best epoch's weights ------------------------------------------------------------------

def _rows(values, validated=None, metric="val/box_loss"):
    validated = validated or [1] * len(values)
    return [{"epoch": i + 1, metric: v, **({} if ok == "absent" else {"validated": ok})}
            for i, (v, ok) in enumerate(zip(values, validated))]


# (metric, mode, values, validated flags, epochs that improve)
BEST_EPOCHS = [
    ("val/box_loss", "min", [1.5, 1.2, 1.3, 1.1, 1.1], None, [1, 2, 4]),  # a tie keeps the first, as results do
    ("fitness", "max", [0.1, 0.3, 0.2, 0.3, 0.4], None, [1, 2, 5]),
    ("fitness", "max", [0.1, float("nan"), 0.05, 0.2], None, [1, 4]),  # NaN is no value
    ("val/box_loss", "min", [1.5, 0.2, 1.6, 0.9], [1, 0, 1, 1], [1, 4]),  # an unvalidated epoch holds no value
    ("train/box_loss", "min", [1.5, 1.2, 1.3], [1, 0, 0], [1, 2]),  # training values count at every epoch
    ("lr/pg0", "max", [0.1, 0.2], [0, 0], [1, 2]),
    ("fitness", "max", [None, 0.2, 0.1], None, [2]),  # an epoch without the value
    ("val/box_loss", "min", [1.5, 1.6, 1.2], ["absent"] * 3, [1, 3]),  # a history from before `validated`
]


@pytest.mark.parametrize("metric,mode,values,validated,improving", BEST_EPOCHS)
def test_the_best_epoch_follows_the_metric_and_mode_over_measured_epochs(metric, mode, values, validated,
                                                                          improving):
    best = BestEpoch(metric, mode)
    rows = _rows(values, validated, metric)
    assert [row["epoch"] for row in rows if best.improves(row)] == improving


def test_a_resumed_trial_goes_on_from_the_best_in_its_history(tmp_path):
    history = tmp_path / layout.HISTORY
    for row in _rows([1.5, 1.1, 1.3]):
        layout.append_jsonl(history, row)
    best = BestEpoch.of_history(history, "val/box_loss", "min")
    assert best.best == 1.1
    assert not best.improves({"val/box_loss": 1.2, "validated": 1})
    assert best.improves({"val/box_loss": 1.0, "validated": 1})
    assert BestEpoch.of_history(tmp_path / "none.jsonl", "fitness", "max").best is None  # a fresh trial


def _weights(path: Path, value: float) -> None:
    """A checkpoint as Ultralytics saves it, with one weight telling it apart."""
    model = torch.nn.Linear(1, 1, bias=False)
    torch.nn.init.constant_(model.weight, value)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model, "ema": None, "optimizer": {"state": 1}, "train_args": {}}, path)


def _exported_weight(path: Path) -> float:
    return float(torch.load(path, map_location="cpu", weights_only=False)["model"].weight.item())


def test_best_pt_is_the_best_trials_weights_at_its_best_epoch_by_the_metric(tmp_path):
    exp = build(tmp_path / "exp")
    best_trial = ranked_ids(LOSS, "min")[0]
    for trial_id in TRIALS:
        weights = exp / f"trial_{trial_id}" / "train" / "weights"
        _weights(weights / "last.pt", 1.0)  # its last epoch
        _weights(weights / "best.pt", 2.0)  # Ultralytics' best, by its own fitness
        _weights(weights / layout.TRIAL_BEST_WEIGHTS, 3.0 if trial_id == best_trial else 4.0)
    results = load(exp)
    written = export_best(results, Location(str(exp)))
    assert written == [exp / layout.BEST_HYPERPARAMETERS, exp / layout.BEST_WEIGHTS]
    best_hp = (exp / layout.BEST_HYPERPARAMETERS).read_text()  # in the order yolo train reads them
    assert best_hp == yaml.safe_dump(results.best_hyperparameters(), sort_keys=False)
    assert list(yaml.safe_load(best_hp))[:2] == ["model", "data"] and best_hp != yaml.safe_dump(yaml.safe_load(best_hp))
    assert _exported_weight(exp / layout.BEST_WEIGHTS) == 3.0
    exported = torch.load(exp / layout.BEST_WEIGHTS, map_location="cpu", weights_only=False)
    assert exported["optimizer"] is None and exported["model"].weight.dtype == torch.float16  # for inference

    # An experiment from before yolotune kept the best epoch's weights: Ultralytics' best.pt.
    (exp / f"trial_{best_trial}" / "train" / "weights" / layout.TRIAL_BEST_WEIGHTS).unlink()
    export_best(load(exp), Location(str(exp)))
    assert _exported_weight(exp / layout.BEST_WEIGHTS) == 2.0


def test_no_best_trial_exports_nothing(tmp_path):
    exp = build(tmp_path / "exp", rows=lambda trial_id: [])
    assert export_best(load(exp), Location(str(exp))) == []
    assert not (exp / layout.BEST_WEIGHTS).exists() and not (exp / layout.BEST_HYPERPARAMETERS).exists()


# --- the config a trial is reported with -------------------------------------------------------

def test_a_trial_is_reported_with_its_latest_config(tmp_path):
    """PBT changes a trial's hyperparameters when it exploits another trial: the trial restarts with
    the new config, and results, trials.csv and best_hyperparameters show that one."""
    exp = build(tmp_path / "exp")
    (exp / "trials.jsonl").unlink()
    storage = SimpleNamespace(storage_filesystem=LocalFileSystem(), experiment_fs_path=str(exp))  # Ray's
    trials = {t: SimpleNamespace(trial_id=t, path=str(exp / f"trial_{t}"), status="RUNNING", error_file=None,
                                 last_result={}, config={"lr0": s["lr0"], "momentum": s["momentum"], "__trial_index__": 0},
                                 storage=storage) for t, s in TRIALS.items()}
    recorder = records.trial_recorder()
    for trial in trials.values():
        recorder.on_trial_start(iteration=1, trials=list(trials.values()), trial=trial)
    exploited = trials["t_done"]
    exploited.config = {"lr0": 0.123, "momentum": 0.777, "__trial_index__": 0}  # PBT's new values
    exploited.status = "PAUSED"
    recorder.on_step_end(iteration=2, trials=list(trials.values()))
    recorder = pickle.loads(pickle.dumps(recorder))  # a resumed sweep
    recorder.on_trial_start(iteration=3, trials=list(trials.values()), trial=exploited)
    recorder.on_trial_complete(iteration=4, trials=list(trials.values()), trial=exploited)

    state = {t.trial_id: t for t in records.read_trials(exp)[0]}
    assert state["t_done"].config == {"lr0": 0.123, "momentum": 0.777}
    assert state["t_early"].config == {"lr0": TRIALS["t_early"]["lr0"], "momentum": TRIALS["t_early"]["momentum"]}
    frame = load(exp).dataframe().set_index("trial_id")
    assert (frame.at["t_done", "lr0"], frame.at["t_done", "momentum"]) == (0.123, 0.777)


# --- experiments of an earlier yolotune: converted from Ray's newest saved state -----------------

def _state(statuses: dict, lr0: float) -> str:
    trial_data = [[json.dumps({"trial_id": t, "status": s, "config": {"lr0": lr0, "__trial_index__": 0}}), "{}"]
                  for t, s in statuses.items()]
    return json.dumps({"trial_data": trial_data})


@pytest.mark.parametrize("names", [
    ("experiment_state-2025-01-01_00-00-00.json", "experiment_state-2025-01-02_00-00-00.json"),
    ("experiment_state-2025-01-01_09-00-00.json", "experiment_state-2025-01-01_10-00-00.json"),
])
def test_an_old_experiment_is_converted_from_the_newest_of_its_saved_states(tmp_path, names):
    exp = tmp_path / "exp"
    exp.mkdir()
    older, newer = names
    (exp / newer).write_text(_state({"a": "TERMINATED", "b": "ERROR"}, lr0=0.2))
    (exp / older).write_text(_state({"a": "RUNNING", "b": "RUNNING", "c": "PENDING"}, lr0=0.1))
    os.utime(exp / older, (2e9, 2e9))  # touched later: the name's timestamp decides, not the file's time
    assert records.needs_conversion(exp)
    records.convert(exp)
    assert not records.needs_conversion(exp)
    trials, skipped = records.read_trials(exp)
    assert skipped == 0
    assert [(t.trial_id, t.status, t.config) for t in trials] == [("a", "TERMINATED", {"lr0": 0.2}),
                                                                    ("b", "ERROR", {"lr0": 0.2})]
    events = layout.read_jsonl(exp / layout.TRIAL_RECORD)[0]
    assert {e["time"] for e in events} == {(exp / newer).stat().st_mtime}  # when that state was saved
    with pytest.raises(FileExistsError):
        records.convert(exp)


def test_the_record_folds_into_each_trials_latest_state_and_counts_what_it_skips(tmp_path):
    events = [
        {"trial_id": "a", "event": "started", "config": {"lr0": 0.1}},
        {"trial_id": "a", "event": "errored", "error": "ValueError: x", "error_file": "/e/trial_a/error.txt"},
        {"trial_id": "a", "event": "resumed", "config": "not a mapping"},  # keeps its config; the error is over
        {"trial_id": "b", "event": "paused"},
        {"trial_id": "d", "event": "errored", "error": "OSError: y", "error_file": "/e/trial_d/error.txt"},
        {"trial_id": 5, "event": "started"},  # skipped: the id is not a string
        {"trial_id": "c", "event": "exploded"},  # skipped: no such event
        {"event": "started"},  # skipped: no id
    ]
    (tmp_path / layout.TRIAL_RECORD).write_text("".join(json.dumps(e) + "\n" for e in events) + "not json\n")
    trials, skipped = records.read_trials(tmp_path)
    assert [(t.trial_id, t.status, t.config, t.error, t.error_file) for t in trials] == [
        ("a", "RUNNING", {"lr0": 0.1}, None, None), ("b", "PAUSED", {}, None, None),
        ("d", "ERROR", {}, "OSError: y", "/e/trial_d/error.txt")]
    assert skipped == 4


# An old experiment's trials in every state Ray saves, and one started after Ray's last save (only
# its params.json): the converted record, line by line (times aside).
def test_a_converted_record_has_every_trial_in_its_saved_state(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    trial_data = [[json.dumps(trial), "{}"] for trial in (
        {"trial_id": "a", "status": "TERMINATED", "config": {"lr0": 0.1, "__trial_index__": 0}},
        {"trial_id": "b", "status": "ERROR", "config": {"lr0": 0.2}},
        {"trial_id": "c", "status": "PAUSED", "config": {"lr0": 0.3}},
        {"trial_id": "d", "status": "ERROR"},  # no config saved, no error file
        {"trial_id": "e", "status": "RUNNING", "config": {}})]
    (exp / "experiment_state-2025-01-01_00-00-00.json").write_text(json.dumps({"trial_data": trial_data}))
    (exp / "trial_b").mkdir()
    (exp / "trial_b" / "error.txt").write_bytes(b"Failure # 1 (occurred at then)\nTraceback\nOSError: first\n"
                                                b"Failure # 2 (occurred at now)\nTraceback\n  File x\n"
                                                b"ValueError: caf\xe9 \n\n")  # not UTF-8
    for trial_id, config in (("a", {"lr0": 0.1}), ("f", {"lr0": 0.6})):  # f: started after the save
        (exp / f"trial_{trial_id}").mkdir(exist_ok=True)
        (exp / f"trial_{trial_id}" / "params.json").write_text(json.dumps(config))
    records.convert(exp)
    events = [{k: v for k, v in e.items() if k != "time"} for e in layout.read_jsonl(exp / "trials.jsonl")[0]]
    started = {"event": "started", "status": "RUNNING"}
    assert events == [
        {"trial_id": "a", **started, "config": {"lr0": 0.1}},
        {"trial_id": "a", "event": "completed", "status": "TERMINATED"},
        {"trial_id": "b", **started, "config": {"lr0": 0.2}},
        {"trial_id": "b", "event": "errored", "status": "ERROR", "error": "ValueError: caf\ufffd",
         "error_file": str(exp / "trial_b" / "error.txt")},
        {"trial_id": "c", **started, "config": {"lr0": 0.3}},
        {"trial_id": "c", "event": "paused", "status": "PAUSED"},
        {"trial_id": "d", **started, "config": {}},
        {"trial_id": "d", "event": "errored", "status": "ERROR", "error": None,
         "error_file": str(exp / "trial_d" / "error.txt")},
        {"trial_id": "e", **started, "config": {}},
        {"trial_id": "f", **started, "config": {"lr0": 0.6}}]
    assert events[-1] == {"trial_id": "f", "event": "started", "status": "RUNNING", "config": {"lr0": 0.6}}
    assert layout.read_jsonl(exp / "trials.jsonl")[0][-1]["time"] == (exp / "trial_f" / "params.json").stat().st_mtime
    with pytest.raises(FileExistsError, match=f"^{exp / 'trials.jsonl'} exists already$"):
        records.convert(exp)


def test_converting_an_experiment_without_saved_state_names_it(tmp_path):
    with pytest.raises(FileNotFoundError, match=f"^{tmp_path}: no Ray experiment state "):
        records.convert(tmp_path)


# Ray's error file: one "Failure # N" section per failure; the exception is its last line.
ERROR_LINES = [
    ("Failure # 1 (occurred at t)\nTraceback\nOSError: first\nFailure # 2 (occurred at u)\n"
     "Traceback\n  File x\n  ValueError: second  \n\n", "ValueError: second"),
    ("Traceback\n  File x\nKeyError: 'k'\n", "KeyError: 'k'"),  # no failure header
    ("The actor died.", "The actor died."),  # a single line: a message's first line
    ("Failure # 1 (occurred at t)\n\n", "Failure # 1 (occurred at t)"),
    # the last failure has no lines (cut short): the first line of the whole text
    ("Failure # 1 (occurred at t)\nOSError: first\nFailure # 2 (occurred at u)\n", "Failure # 1 (occurred at t)"),
    ("", ""),
]


@pytest.mark.parametrize("text, expected", ERROR_LINES)
def test_error_line_is_the_last_failures_exception(text, expected):
    assert records.error_line(text) == expected


def test_a_recorded_error_reads_an_error_file_that_is_not_utf8(tmp_path):
    error_file = tmp_path / "error.txt"
    error_file.write_bytes(b"Failure # 1 (occurred at t)\nTraceback\nValueError: caf\xe9\n")
    assert records._error(SimpleNamespace(error_file=str(error_file))) == "ValueError: caf\ufffd"
    assert records._error(SimpleNamespace(error_file=str(tmp_path / "none.txt"))) is None
    assert records._error(SimpleNamespace(error_file=None)) is None


def test_experiments_in_a_storage_dir_oldest_first_and_finished_ones_marked(tmp_path):
    for name, saved_at in (("a", 300), ("b", 100), ("c", 200), ("d", 100)):  # b and d: the same time, by name
        config = tmp_path / name / layout.SAVED_CONFIG
        config.parent.mkdir(parents=True)
        config.write_text("{}")
        os.utime(config, (saved_at, saved_at))
    (tmp_path / "e").mkdir()  # no saved config: not an experiment
    assert [d.name for d in layout.experiments_in(tmp_path)] == ["b", "d", "c", "a"]
    assert not layout.is_finished(tmp_path / "a")
    layout.mark_finished(tmp_path / "a")
    assert layout.is_finished(tmp_path / "a") and (tmp_path / "a" / layout.DONE_MARKER).is_file()


# A line that a writer without append_jsonl's repair glued onto one cut short by a kill: the whole
# record after the cut, or None.
GLUED = [
    ('{"epoch": 2, "lo{"epoch": 3}', {"epoch": 3}),
    ('{"a": {"b": 1, "lo{"epoch": 3}', {"epoch": 3}),  # the first "{" inside does not start a record
    ('{"a": {{"epoch": 3}', {"epoch": 3}),
    ('{{"epoch": 3}', {"epoch": 3}),  # cut right after its first character
    ('{"epoch": 2, "lo{"epoch": 3, "m": {"x": 1}}', {"epoch": 3, "m": {"x": 1}}),  # a record holding a mapping
    ('{"a": {"b": 1, "lo{"epoch": 3, "m": {"x": 1}}', {"epoch": 3, "m": {"x": 1}}),
    ('{"epoch": 2, "lo', None),
    ('"epoch": 2', None),
]


@pytest.mark.parametrize("line, record", GLUED)
def test_a_glued_record_is_the_whole_record_after_the_cut(line, record):
    assert layout._glued_record(line) == record


@pytest.mark.parametrize("text, line", [
    (None, ""), ("", ""), ("\n  \n", ""), ("  first\nsecond", "first"),
    ("Traceback (most recent call last):\n  File x\nValueError: bad\n\n", "ValueError: bad"),
])
def test_first_line_of_a_message_or_traceback(text, line):
    assert layout.first_line(text) == line


def test_stopped_by_budget_unless_finished_since(tmp_path):
    assert not layout.stopped_by_budget(tmp_path)
    (tmp_path / layout.BUDGET_MARKER).touch()
    assert layout.stopped_by_budget(tmp_path)
    layout.mark_finished(tmp_path)  # resume=true finished it
    assert not layout.stopped_by_budget(tmp_path)


# --- checkpoints reach Ray without a copy of last.pt -------------------------------------------

def _persist(tmp_path, monkeypatch, staged_name: str):
    """Ray's own persisting of a reported checkpoint (what tune.report does with it), from a folder
    staged in the trial dir; returns the staged file's inode, the persisted folder and the staged one."""
    from ray.train._internal import storage as ray_storage
    from ray.train._internal.storage import StorageContext

    from yolotune.worker_setup import move_staged_checkpoints

    copy = ray_storage._pyarrow_fs_copy_files  # Ray's own, as a new worker process has it
    monkeypatch.setattr(ray_storage, "_pyarrow_fs_copy_files", getattr(copy, "ray_copy", copy))
    move_staged_checkpoints()
    storage = StorageContext(str(tmp_path / "storage"), "exp", trial_dir_name="trial_a")
    Path(storage.experiment_fs_path, ".validate_storage_marker").touch()  # as the driver leaves it
    staged = Path(storage.trial_fs_path) / staged_name
    _save(staged / "last.pt", 3)
    inode = (staged / "last.pt").stat().st_ino
    storage.current_checkpoint_index = 0
    persisted = storage.persist_current_checkpoint(Checkpoint.from_directory(staged))
    return inode, Path(persisted.path), staged


def test_a_staged_checkpoint_moves_into_the_checkpoint_folder(tmp_path, monkeypatch):
    inode, persisted, staged = _persist(tmp_path, monkeypatch, ".ckpt-x1")
    assert persisted.name == "checkpoint_000000"
    assert (persisted / "last.pt").stat().st_ino == inode  # the same file: no second copy of its bytes
    assert (persisted / "last.pt").stat().st_nlink == 1 and list(staged.iterdir()) == []
    assert torch.load(persisted / "last.pt", weights_only=False)["epoch"] == 3


def test_other_checkpoints_are_copied_as_ray_copies_them(tmp_path, monkeypatch):
    inode, persisted, staged = _persist(tmp_path, monkeypatch, "mine")  # not staged by a trial: a user's, a PBT clone
    assert (persisted / "last.pt").stat().st_ino != inode and (staged / "last.pt").is_file()
    assert torch.load(persisted / "last.pt", weights_only=False)["epoch"] == 3


def test_checkpoints_are_moved_by_one_patch_however_often_trials_start(monkeypatch):
    from ray.train._internal import storage as ray_storage

    from yolotune.worker_setup import move_staged_checkpoints

    copy = ray_storage._pyarrow_fs_copy_files
    original = getattr(copy, "ray_copy", copy)
    monkeypatch.setattr(ray_storage, "_pyarrow_fs_copy_files", original)
    move_staged_checkpoints()
    patched = ray_storage._pyarrow_fs_copy_files
    move_staged_checkpoints()  # the worker's next trial
    assert ray_storage._pyarrow_fs_copy_files is patched and patched.ray_copy is original


# --- what a trial prints, in its train.log ------------------------------------------------------

def test_a_trial_log_keeps_whole_lines_only(tmp_path):
    from yolotune.trial_log import _FinishedLines

    with open(tmp_path / "train.log", "w") as raw:
        log = _FinishedLines(raw)
        text = "epoch 1/3 \x1b[1m 10%\r epoch 1/3  100%\nval"
        assert log.write(text) == len(text)
        log.flush()
        assert (tmp_path / "train.log").read_text() == " epoch 1/3  100%\n"  # the line in progress waits
        assert not log.isatty()
        log.write("idation done")
        log.close()  # the unfinished last line is kept
    assert (tmp_path / "train.log").read_text() == " epoch 1/3  100%\nvalidation done\n"


# --- Ray: a private local instance or a cluster that answers -----------------------------------

# What every worker, on every node, gets from the driver (runner.WORKER_ENV): Ray's 2 s would let a slow
# release of a reused worker's trial fail the next trial.
WORKERS = {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "30"}


@pytest.mark.parametrize("overrides,expected", [
    ([], {"address": "local", "num_cpus": local_cpus(), "num_gpus": local_gpus(), "include_dashboard": False,
          "_node_ip_address": "127.0.0.1", "runtime_env": {"env_vars": WORKERS}, "logging_level": logging.WARNING}),
    (["ray.address=auto", "verbose=ray", "+ray.runtime_env.env_vars.A='1'"],
     {"address": "auto", "runtime_env": {"env_vars": {**WORKERS, "A": "1"}}, "logging_level": logging.INFO}),
    (["ray.address=10.0.0.1:6379", "verbose=quiet", "+ray.runtime_env.pip=[x]"],
     {"address": "10.0.0.1:6379", "runtime_env": {"pip": ["x"], "env_vars": WORKERS}, "logging_level": logging.WARNING}),
    (["ray.address=auto", "+ray.runtime_env.env_vars.TUNE_FUNCTION_THREAD_TIMEOUT_S='60'"],  # the user's wins
     {"address": "auto", "runtime_env": {"env_vars": {"TUNE_FUNCTION_THREAD_TIMEOUT_S": "60"}},
      "logging_level": logging.WARNING}),
])
def test_ray_starts_privately_unless_a_cluster_is_named(overrides, expected, monkeypatch):
    monkeypatch.setenv("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")  # as runner.py sets it, unless the user did
    assert _ray_init_args(experiment(*overrides)) == {"log_to_driver": False, **expected}


def test_resume_command_names_the_experiment_and_its_storage(tmp_path):
    exp_dir = tmp_path / "my runs" / "exp 1"
    assert resume_command(experiment(), exp_dir) == \
        f"python -m yolotune resume=true name='exp 1' storage='{tmp_path / 'my runs'}'"
    remote = experiment("storage='s3://bucket/runs?region=x'")
    assert resume_command(remote, tmp_path / "cache" / "exp") == \
        "python -m yolotune resume=true name=exp storage='s3://bucket/runs?region=x'"


def test_ray_address_comes_before_the_recorded_cluster_and_a_host_may_hold_colons(tmp_path, monkeypatch):
    with socket.socket(socket.AF_INET6) as server, socket.socket() as closed:
        server.bind(("::1", 0))
        server.listen()
        closed.bind(("127.0.0.1", 0))  # bound, not listening: refuses
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{closed.getsockname()[1]}\n")
        address = f"::1:{server.getsockname()[1]}"  # an IPv6 host: the port is after the last colon
        monkeypatch.setenv("RAY_ADDRESS", address)
        assert check_reachable("auto") is None
        assert check_reachable(f"ray://{address}") is None


@pytest.mark.parametrize("timeout", [None, 0.5])
def test_the_cluster_check_is_bounded_by_its_timeout(monkeypatch, timeout):
    """A head that drops packets would hold connect() for the system's minutes: the check waits timeout_s."""
    calls = []
    monkeypatch.setattr(socket, "create_connection", lambda address, timeout: calls.append((address, timeout)) or
                        SimpleNamespace(close=lambda: None))
    assert check_reachable("head:6379", **({} if timeout is None else {"timeout_s": timeout})) is None
    assert calls == [(("head", 6379), 5.0 if timeout is None else timeout)]


def test_the_amp_check_model_is_found_where_ultralytics_keeps_it_or_fetched_into_the_cache(tmp_path, monkeypatch):
    import ultralytics.utils
    import ultralytics.utils.downloads

    from yolotune.preflight import amp_check_weights
    from yolotune.worker_setup import AMP_CHECK_MODEL

    cache = tmp_path / "cache"
    monkeypatch.setenv("YOLOTUNE_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)
    downloads = []

    def case(weights_dir, online, fails=False):
        def download(path):  # Ultralytics' download of a release asset
            downloads.append(path)
            if fails:
                raise ConnectionError("no answer")
            layout.write_atomic(Path(path), b"weights")

        monkeypatch.setattr(ultralytics.utils, "WEIGHTS_DIR", weights_dir)
        monkeypatch.setattr(ultralytics.utils, "ONLINE", online)
        monkeypatch.setattr(ultralytics.utils.downloads, "attempt_download_asset", download)
        return amp_check_weights()

    held = tmp_path / "ultralytics"
    layout.write_atomic(held / AMP_CHECK_MODEL, b"weights")
    layout.write_atomic(tmp_path / "weights" / AMP_CHECK_MODEL, b"weights")  # a relative dir: never the cwd's
    assert case(held, online=True) == str(held) and downloads == []
    assert case(Path("weights"), online=False) is None and downloads == []
    assert case(tmp_path / "empty", online=False) is None
    assert case(Path("weights"), online=True, fails=True) is None
    assert downloads == [cache / "weights" / AMP_CHECK_MODEL]
    assert case(Path("weights"), online=True) == str(cache / "weights")
    assert case(tmp_path / "empty", online=True) == str(cache / "weights")  # fetched once
    assert downloads == [cache / "weights" / AMP_CHECK_MODEL] * 2


def test_a_cluster_that_answers_passes_and_one_that_does_not_is_one_error(tmp_path, monkeypatch):
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        port = server.getsockname()[1]
        assert check_reachable(f"127.0.0.1:{port}") is None
        assert check_reachable(f"ray://127.0.0.1:{port}") is None
        monkeypatch.setenv("RAY_TMPDIR", str(tmp_path))  # where `ray start` records the cluster
        monkeypatch.delenv("RAY_ADDRESS", raising=False)
        (tmp_path / "ray").mkdir()
        (tmp_path / "ray" / "ray_current_cluster").write_text(f"127.0.0.1:{port}\n")
        assert check_reachable("auto") is None
    with pytest.raises(ConfigError) as err:
        check_reachable(f"127.0.0.1:{port}", timeout_s=2)  # closed now
    assert (err.value.key, err.value.value) == ("ray.address", f"127.0.0.1:{port}")
    assert err.value.allowed.startswith("no Ray cluster answers there (") and err.value.allowed.endswith(
        "start one with `ray start --head` or give the head node's host:port")
    monkeypatch.setenv("RAY_ADDRESS", f"127.0.0.1:{port}")  # Ray's own variable comes first
    with pytest.raises(ConfigError) as err:
        check_reachable("auto", timeout_s=2)
    assert err.value.value == f"127.0.0.1:{port}"
    monkeypatch.delenv("RAY_ADDRESS")
    (tmp_path / "ray" / "ray_current_cluster").unlink()
    with pytest.raises(ConfigError) as err:
        check_reachable("auto")
    assert (err.value.key, err.value.value, err.value.allowed) == (
        "ray.address", "auto", "no running Ray cluster found on this machine; start one with `ray start --head` or "
                               "give host:port")


# --- the JSON-lines files a kill can cut short ---------------------------------------------------

@pytest.mark.parametrize("before,after", [
    ("", ""),                                               # a new file
    ('{"a": 1}\n', '{"a": 1}\n'),                           # whole lines are kept
    ('{"a": 1}\n{"a": 2}\n{"a', '{"a": 1}\n{"a": 2}\n'),    # the line a kill cut short goes, only it
    ('{"a": 1}\n\n{"a": 22', '{"a": 1}\n\n'),
    ('{"a', ''),                                            # the first line cut: nothing before it
    ('x\n{"a": 1', 'x\n'),
])
def test_an_append_first_cuts_off_a_line_cut_short(tmp_path, before, after):
    path = tmp_path / "history.jsonl"
    if before:
        path.write_text(before)
    layout.append_jsonl(path, {"epoch": 3})
    assert path.read_text() == after + '{"epoch": 3}\n'


def test_an_experiment_state_save_never_meets_the_upload_before_it(tmp_path, caplog):
    """Ray's save replaces files of its staging dir through temporary ones; an upload of that dir still
    running when it does fails on a temporary file gone ("Saving experiment state to storage ... failed"),
    that snapshot unsaved. With the runner's patch each upload has ended before the next save. Ray's own
    checkpoint manager and syncer, on a staging dir the size of a resumed experiment's."""
    from ray.train._internal.storage import _FilesystemSyncer
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager
    from ray.tune.utils.util import _atomic_save

    from yolotune.runner import _save_state_after_its_upload

    _save_state_after_its_upload()
    staging, storage = tmp_path / "staging", tmp_path / "storage"
    for n in range(600):  # the trials' results, params and checkpoint metadata that a restore copies in
        (staging / f"trial_{n % 20}").mkdir(parents=True, exist_ok=True)
        (staging / f"trial_{n % 20}" / f"result_{n}.json").write_text("x" * 20_000)
    syncer = _FilesystemSyncer(storage_filesystem=LocalFileSystem(), sync_period=0, sync_timeout=60)
    manager = _ExperimentCheckpointManager(
        storage=SimpleNamespace(experiment_driver_staging_path=str(staging), experiment_fs_path=str(storage),
                                syncer=syncer), checkpoint_period=0)

    def save():  # as TuneController.save_to_dir: the searcher's and the callbacks' state, each atomically
        for _ in range(30):  # as many saves as an upload's listing of the dir takes (each lives a moment)
            _atomic_save({"state": list(range(1000))}, str(staging), "callback-states.pkl", "tmp-callback-states.pkl")

    with caplog.at_level(logging.ERROR, logger="ray.tune.execution.experiment_state"):
        for _ in range(20):
            manager.sync_up_experiment_state(save, force=True)
        syncer.wait()
    assert not [r for r in caplog.records if "failed" in r.getMessage()]
    assert pickle.loads((storage / "callback-states.pkl").read_bytes()) == {"state": list(range(1000))}
    assert not list(storage.glob(".*tmp-callback-states.pkl"))  # no temporary file uploaded
