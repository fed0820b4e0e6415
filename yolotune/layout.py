"""The experiment directory ``<storage>/<name>/``: its file names and how they are written and read.

Imported by the driver, the Ray workers and the results reader alike, so it imports nothing
beyond the standard library (no Hydra, no OmegaConf, no Ray).

    <storage>/<name>/
      .hydra/config.yaml      the composed config (re-runnable with --config-path)
      .hydra/overrides.yaml   the command line's overrides
      provenance.yaml         command, versions, git state
      plan.yaml               the last run's resource plan: trials at once, each one's CPUs, GPU share, loaders
      trials.jsonl            yolotune's trial record: one event a line (records.py)
      latency.jsonl           with a latency objective: each ended trial's latency measured alone, its method (model_costs.py)
      trial_<id>/history.jsonl  the trial's per-epoch results, appended by the trial itself
      trial_<id>/train.log    everything the trial printed (Ultralytics' output, warnings, its traceback)
      trial_<id>/train/       Ultralytics' output (weights/last.pt, ...) and weights/best_by_metric.pt
      trials.csv, best_hyperparameters.yaml, best.pt, plots/, report.html   results
      yolotune.log            the console output of every run (appended on resume)
      .finished               written when every trial has ended; absent while resumable
      .stopped-by-budget      written when budget.time ended the last run
      .running                locked (flock) by the one process running the experiment; its pid and host
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

SAVED_CONFIG = Path(".hydra") / "config.yaml"
SAVED_OVERRIDES = Path(".hydra") / "overrides.yaml"
PROVENANCE = "provenance.yaml"
PLAN = "plan.yaml"
# Each trial's per-epoch results, appended by the trial itself before it reports the epoch to Ray.
# (Ray's own result.json is written by the driver and copied back over on pause/restore, which
# can drop epochs under PBT and HyperBand.)
HISTORY = "history.jsonl"
# In a trial's report (not its history) when its epoch ended past the time budget's deadline (its
# value): the trial stops there.
PAST_DEADLINE = "past_deadline"
TRAIN_LOG = "train.log"
CONSOLE_LOG = "yolotune.log"
TRIAL_RECORD = "trials.jsonl"
ERROR_FILE = "error.txt"  # Ray writes a failed trial's traceback there
DONE_MARKER = ".finished"
BUDGET_MARKER = ".stopped-by-budget"
RUN_LOCK = ".running"
TUNER_STATE = "tuner.pkl"  # Ray Tune's: written once the Tuner starts; what a resume restores
TRIALS_CSV = "trials.csv"
BEST_HYPERPARAMETERS = "best_hyperparameters.yaml"
BEST_WEIGHTS = "best.pt"
# A trial's weights at its best epoch by the experiment's metric (train/weights/; Ultralytics' best.pt
# follows its own fitness, and a PBT trial inherits its donor's best fitness): what best.pt exports.
TRIAL_BEST_WEIGHTS = "best_by_metric.pt"
STAGED = ".ckpt-"  # the prefix of the folders a trial stages its checkpoints in (epoch_report.py)
# Reported at every epoch, validated or not (trainable.py); validation metrics only at validated epochs.
TRAINING_VALUES = ("train/", "lr/")
# In each history row: the batch the epoch trained with, smaller than asked when Ultralytics cut it after
# running out of GPU memory in the first epoch.
TRAINED_BATCH = "trained_batch"
# What a trial measures of its best epoch's model after training when the experiment has objectives
# (trainable.py): inference time per image (ms), parameters (millions), GFLOPs at the trial's imgsz.
MODEL_COSTS = ("latency_ms", "params", "gflops")
# The latency that results count, measured by the driver after the trials, one at a time (model_costs.py).
MEASURED_LATENCY = "latency.jsonl"
PLOTS_DIR = "plots"
REPORT = "report.html"


def trial_dirname(trial_id: str) -> str:
    """A trial's directory under the experiment: Ray creates it, the trainable writes into it."""
    return f"trial_{trial_id}"


def trial_best_weights(trial_id: str) -> str:
    """The trial's TRIAL_BEST_WEIGHTS, relative to the experiment dir."""
    return f"{trial_dirname(trial_id)}/train/weights/{TRIAL_BEST_WEIGHTS}"


def storage_dir(storage: str) -> Path:
    """Absolute storage path; a ``file://`` URI is a local (or shared) path."""
    return Path(os.path.expanduser(storage.removeprefix("file://"))).resolve()


def is_experiment(path: Path) -> bool:
    return (path / SAVED_CONFIG).is_file()


def experiments_in(storage: Path) -> List[Path]:
    """The experiment dirs directly under a storage dir, oldest first."""
    dirs = [config.parent.parent for config in storage.glob(f"*/{SAVED_CONFIG}")]
    return sorted(dirs, key=lambda d: ((d / SAVED_CONFIG).stat().st_mtime, d.name))


def mark_finished(exp_dir: Path) -> None:
    (exp_dir / DONE_MARKER).touch()


def is_finished(exp_dir: Path) -> bool:
    return (exp_dir / DONE_MARKER).exists()


def stopped_by_budget(exp_dir: Path) -> bool:
    """The time budget ended the last run (not finished: resume=true goes on)."""
    return (exp_dir / BUDGET_MARKER).exists() and not is_finished(exp_dir)


def measured_value(row: dict, metric: str) -> Optional[float]:
    """The value of ``metric`` that a history row measured (a training value at every epoch, a
    validation metric at validated epochs only, as results.measured reads them), or None."""
    value = row.get(metric)
    if not isinstance(value, (int, float)) or value != value:  # absent, or NaN
        return None
    return float(value) if metric.startswith(TRAINING_VALUES) or row.get("validated", 1) else None


def write_atomic(path: Path, data) -> None:
    """Write to a temp file beside ``path`` and rename it into place: readers never see half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, path)
    except BaseException:  # a full disk, a second Ctrl-C: no temp file left beside it
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def append_jsonl(path: Path, record: dict) -> None:
    """Append one JSON line. A kill can leave the last line cut short; cut it off before appending,
    so a resumed writer never glues its first line onto the broken one."""
    if path.is_file() and path.stat().st_size:
        with open(path, "rb+") as f:
            f.seek(-1, os.SEEK_END)
            if f.read(1) != b"\n":
                f.seek(0)
                data = f.read()
                f.seek(data.rfind(b"\n") + 1)
                f.truncate()
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


def read_jsonl(path: Path) -> Tuple[List[dict], int]:
    """The records of a JSON-lines file and the number of lines skipped as unreadable (cut short
    by a kill, or damaged). A missing file has no records."""
    records, skipped = [], 0
    for line in _lines(path):
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            skipped += 1
            record = _glued_record(line)
        if isinstance(record, dict):
            records.append(record)
        elif record is not None:
            skipped += 1
    return records, skipped


def _glued_record(line: str) -> Optional[dict]:
    """The whole record that a writer without append_jsonl's repair glued onto a line cut short by
    a kill (``{"epoch": 2, "lo{"epoch": 3, ...}``), or None."""
    start = line.find("{", 1)
    while start != -1:
        try:
            record = json.loads(line[start:])
            return record if isinstance(record, dict) else None
        except json.JSONDecodeError:
            start = line.find("{", start + 1)
    return None


def _lines(path: Path) -> Iterator[str]:
    try:
        text = path.read_text(errors="replace")
    except (FileNotFoundError, IsADirectoryError):
        return iter(())
    return (line for line in text.splitlines() if line.strip())


def count(n: float, word: str) -> str:
    """``n`` and ``word``, plural unless ``n`` is 1: "1 trial", "3 trials", "0.5 CPUs"."""
    return f"{n:g} {word}{'' if n == 1 else 's'}"


def first_line(text: Optional[str]) -> str:
    """The line of an error message or traceback that says what went wrong: a traceback's last
    non-blank line (the exception), or a message's first."""
    lines = [line.strip() for line in (text or "").strip().splitlines() if line.strip()]
    if not lines:
        return ""
    return lines[-1] if lines[0].startswith("Traceback") else lines[0]
