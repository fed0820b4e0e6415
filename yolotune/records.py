"""yolotune's trial record, ``<exp>/trials.jsonl``: one line per trial status change.

The driver appends it through a Ray Tune callback (``trial_recorder``), so results never read
Ray's private experiment state. Events, each with ``trial_id``, ``event``, ``status`` and ``time``:

    started    RUNNING     a trial's first start; with its sampled ``config``
    resumed    RUNNING     started again (unpaused, resumed sweep, retried); with its ``config``
    paused     PAUSED      paused by its scheduler (PBT, HyperBand)
    completed  TERMINATED  ended normally, or stopped early by its scheduler; with its
                           ``layout.MODEL_COSTS`` when it measured them (an experiment with objectives)
    errored    ERROR       raised; with ``error`` (its exception line) and ``error_file``
    retried    PENDING     a system failure (a lost node or worker) that Ray retries from the trial's last
                           checkpoint; with ``error``, the ``node`` it ran on ({hostname, node_id}) and
                           ``retry`` (this retry's number, of ``max_failures``)
    went_on    RUNNING     a retried trial's first epoch after the retry; with the ``node`` and ``epoch``

``read_trials`` folds the events into each trial's latest state. Importing this module imports
no Ray: the callback class is built on first use (as in wandb_logging.py).
"""

from __future__ import annotations

import functools
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Tuple

from yolotune import layout
from yolotune.storage import Location

EVENT_STATUS = {"started": "RUNNING", "resumed": "RUNNING", "paused": "PAUSED", "completed": "TERMINATED",
                "errored": "ERROR", "retried": "PENDING", "went_on": "RUNNING"}


@dataclass
class TrialState:
    """A trial's latest state in the record."""

    trial_id: str
    status: str = "PENDING"
    config: dict = field(default_factory=dict)
    error: Optional[str] = None
    error_file: Optional[str] = None


def read_trials(exp_dir: Path) -> Tuple[List[TrialState], int]:
    """Each recorded trial's latest state, in order of first appearance, and the number of lines
    skipped as damaged."""
    events, skipped = layout.read_jsonl(Path(exp_dir) / layout.TRIAL_RECORD)
    trials: Dict[str, TrialState] = {}
    for event in events:
        status = EVENT_STATUS.get(event.get("event"))
        if status is None or not isinstance(event.get("trial_id"), str):
            skipped += 1
            continue
        trial = trials.setdefault(event["trial_id"], TrialState(event["trial_id"]))
        trial.status = status
        if isinstance(event.get("config"), dict):
            trial.config = event["config"]  # PBT changes a trial's config when it exploits another
        trial.error, trial.error_file = event.get("error"), event.get("error_file")
    return list(trials.values()), skipped


def error_line(text: str) -> str:
    """The exception line of Ray's error file: the last non-blank line of its last failure."""
    last_failure = text.rsplit("Failure # ", 1)[-1]
    lines = [line.strip() for line in last_failure.splitlines()[1:] if line.strip()]
    return lines[-1] if lines else layout.first_line(text)


def trial_recorder():
    """The Ray Tune callback that appends every trial's status changes to its experiment's trials.jsonl."""
    return _recorder_class()()


@functools.lru_cache(maxsize=None)
def _recorder_class():
    # Built on first use: subclassing Ray's Callback at import would import Ray.
    from ray.tune import Callback

    class TrialRecorder(Callback):
        """Holds no path: each trial's storage path names its experiment dir, so a moved experiment
        resumed from tuner.pkl (which pickles this callback) records where it is now."""

        def __init__(self):
            self.statuses: Optional[Dict[str, str]] = None  # trial id -> last recorded status
            self.retried: set = set()  # trials retried after a system failure, until their next result

        def __reduce__(self):  # the class is reachable only through trial_recorder
            return trial_recorder, ()

        def on_trial_start(self, iteration, trials, trial, **info):
            event = "resumed" if trial.trial_id in self._statuses(trial) else "started"
            self._append(trial, event, config={k: v for k, v in trial.config.items() if not k.startswith("__")})

        def on_step_end(self, iteration, trials, **info):
            for trial in trials:  # Ray has no pause hook: look for trials newly paused
                if trial.status == "PAUSED" and self._statuses(trial).get(trial.trial_id, "PAUSED") != "PAUSED":
                    self._append(trial, "paused")

        def on_trial_complete(self, iteration, trials, trial, **info):
            last = trial.last_result or {}  # the model's costs, measured after training (with objectives)
            self._append(trial, "completed", **{k: last[k] for k in layout.MODEL_COSTS if k in last})

        def on_trial_error(self, iteration, trials, trial, **info):
            error_file = Path(trial.path) / layout.ERROR_FILE  # where Ray syncs trial.error_file to
            self._append(trial, "errored", error=_error(trial), error_file=str(error_file))

        def on_trial_recover(self, iteration, trials, trial, **info):
            self.retried.add(trial.trial_id)
            self._append(trial, "retried", error=_error(trial), node=_node(trial.last_result or {}),
                         retry=trial.num_failures, max_failures=trial.max_failures)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            if trial.trial_id in self.retried:
                self.retried.discard(trial.trial_id)
                self._append(trial, "went_on", node=_node(result), epoch=result.get("epoch"))

        def on_experiment_end(self, trials, **info):
            self.on_step_end(0, trials)  # trials a scheduler left paused

        def _statuses(self, trial) -> Dict[str, str]:
            if self.statuses is None:  # a resumed sweep goes on from the record it left
                recorded, _ = read_trials(_experiment(trial).local)  # downloaded before a resume
                self.statuses = {t.trial_id: t.status for t in recorded}
            return self.statuses

        def _append(self, trial, event: str, **fields):
            self._statuses(trial)[trial.trial_id] = EVENT_STATUS[event]
            record = _experiment(trial).local / layout.TRIAL_RECORD
            layout.append_jsonl(record, {"trial_id": trial.trial_id, "event": event, "status": EVENT_STATUS[event],
                                         "time": time.time(), **fields})
            _experiment(trial).upload(record)  # to the object store, when the experiment is in one

    return TrialRecorder


def _error(trial) -> Optional[str]:
    """The exception line of the trial's latest failure; None when Ray wrote no error file."""
    try:
        return error_line(Path(trial.error_file).read_text(errors="replace"))
    except (OSError, TypeError):
        return None


def _node(result: dict) -> dict:
    """Where a result came from (trainable.py reports its node with every epoch)."""
    return {"hostname": result.get("hostname"), "node_id": result.get("node_id")}


def _experiment(trial) -> Location:
    return Location.on(trial.storage.storage_filesystem, trial.storage.experiment_fs_path)


def needs_conversion(exp_dir: Path) -> bool:
    """Whether the experiment was written by a yolotune that kept no trial record."""
    exp_dir = Path(exp_dir)
    return not (exp_dir / layout.TRIAL_RECORD).exists() and any(exp_dir.glob("experiment_state-*.json"))


def convert(exp_dir: Path) -> Path:
    """Write trials.jsonl for an experiment of an earlier yolotune, from Ray's saved experiment
    state (read here once, never by results); returns its path."""
    exp_dir = Path(exp_dir)
    target = exp_dir / layout.TRIAL_RECORD
    if target.exists():
        raise FileExistsError(f"{target} exists already")
    states = sorted(exp_dir.glob("experiment_state-*.json"))  # names end in a sortable timestamp
    if not states:
        raise FileNotFoundError(f"{exp_dir}: no Ray experiment state (experiment_state-*.json) to convert")
    saved_at = states[-1].stat().st_mtime
    lines = []
    for trial_json, _ in json.loads(states[-1].read_text())["trial_data"]:
        trial = json.loads(trial_json)
        trial_id, status = trial["trial_id"], trial["status"]
        config = {k: v for k, v in trial.get("config", {}).items() if not k.startswith("__")}
        lines.append({"trial_id": trial_id, "event": "started", "status": "RUNNING", "time": saved_at,
                      "config": config})
        end = {"TERMINATED": "completed", "ERROR": "errored", "PAUSED": "paused"}.get(status)
        if end == "errored":
            error_file = exp_dir / layout.trial_dirname(trial_id) / layout.ERROR_FILE
            error = error_line(error_file.read_text(errors="replace")) if error_file.is_file() else None
            lines.append({"trial_id": trial_id, "event": end, "status": status, "time": saved_at,
                          "error": error, "error_file": str(error_file)})
        elif end:
            lines.append({"trial_id": trial_id, "event": end, "status": status, "time": saved_at})
    recorded = {line["trial_id"] for line in lines}
    for params in sorted(exp_dir.glob("trial_*/params.json")):  # started after Ray's last state save
        trial_id = params.parent.name.removeprefix("trial_")
        if trial_id not in recorded:
            lines.append({"trial_id": trial_id, "event": "started", "status": "RUNNING",
                          "time": params.stat().st_mtime, "config": json.loads(params.read_text())})
    layout.write_atomic(target, "".join(json.dumps(line) + "\n" for line in lines))
    return target
