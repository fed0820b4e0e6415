"""The wandb group: one W&B run per trial, grouped per experiment, plus a summary run.

Every W&B call happens in the driver. A Ray Tune callback turns each result a trial reports into a
history row of the trial's run. A run kept inside the trial's Ray worker would lose its end: Ray
ends a stopped trial's worker without waiting for the trial's function to unwind, and wandb writes
a run to disk only when the run finishes. Credentials never pass through here: W&B reads them
itself (WANDB_API_KEY or the netrc file). This module imports only the standard library; wandb and
Ray are imported by the functions that use them, so validating a config imports neither.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import netrc
import os
import queue
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, List, Optional
from urllib.parse import urlsplit

from yolotune import layout
from yolotune.errors import ConfigError

MODES = ("disabled", "offline", "online")


@dataclass
class WandbConfig:
    mode: str = "disabled"  # disabled | offline | online
    project: str = "yolotune"
    entity: Optional[str] = None
    group: Optional[str] = None  # null: the experiment name
    tags: List[str] = field(default_factory=list)
    notes: Optional[str] = None

    def check(self, exp) -> None:
        if self.mode not in MODES:
            raise ConfigError("wandb.mode", self.mode, f"one of {', '.join(MODES)}")
        if not self.project or "/" in self.project:
            raise ConfigError("wandb.project", self.project, "a W&B project name (no '/')")
        if self.mode != "disabled":
            check_wandb(self)


def check_wandb(cfg) -> None:
    """Refuse, before any trial starts, a W&B mode that could only fail once the experiment runs."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb", cfg.mode, "needs wandb: pip install 'yolotune[wandb]'")
    if cfg.mode == "online" and not _logged_in():
        raise ConfigError("wandb", cfg.mode, "no W&B login found; run `wandb login` or set WANDB_API_KEY "
                                             "(or use wandb=offline and `wandb sync` the runs later)")


# The W&B cloud's API hosts: `wandb login` saves its key in the netrc file under one of these names.
CLOUD_HOSTS = ("api.wandb.ai", "api.forge.coreweave.com")


def _logged_in() -> bool:
    """Whether W&B will find credentials where it looks for them: the environment, then netrc.

    (wandb.login cannot tell: it reports no login whenever WANDB_MODE=offline is set.)
    """
    if os.environ.get("WANDB_API_KEY") or os.environ.get("WANDB_IDENTITY_TOKEN_FILE"):
        return True
    base_url = os.environ.get("WANDB_BASE_URL")
    hosts = [urlsplit(base_url).netloc] if base_url else CLOUD_HOSTS
    candidates = [os.environ["NETRC"]] if os.environ.get("NETRC") else ["~/.netrc", "~/_netrc"]
    for path in map(os.path.expanduser, candidates):
        try:
            entries = netrc.netrc(path)
        except (OSError, netrc.NetrcParseError):
            continue
        return any(entries.authenticators(host) for host in hosts)
    return False


def trial_settings(exp, exp_dir: Path, train: Dict[str, Any]) -> Dict[str, Any]:
    """Everything the W&B runs need, as plain values (Ray pickles them into tuner.pkl): no credential."""
    cfg = exp.wandb
    return {
        "mode": cfg.mode, "project": cfg.project, "entity": cfg.entity, "group": cfg.group or exp_dir.name,
        "tags": list(cfg.tags), "notes": cfg.notes,
        "dir": str(Path(os.environ.get("WANDB_DIR") or exp_dir).expanduser().resolve()),
        "experiment": exp_dir.name, "metric": exp.metric, "metric_mode": exp.mode, "train": dict(train),
        "objectives": list(exp.objectives),
    }


def run_id(experiment: str, key: str) -> str:
    """The same W&B run id each time a trial (or the summary) of this experiment starts: a resumed
    trial continues its own run."""
    return hashlib.sha1(f"{experiment}/{key}".encode()).hexdigest()[:16]


def _init(settings: Dict[str, Any], key: str, name: str, job_type: str, config: Dict[str, Any]):
    import wandb

    Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        mode=settings["mode"], project=settings["project"], entity=settings["entity"], group=settings["group"],
        tags=settings["tags"], notes=settings["notes"], dir=settings["dir"], job_type=job_type, name=name,
        id=run_id(settings["experiment"], key), resume="allow", config=config,
        reinit="create_new",  # the driver keeps one open run per running trial
        # Neither the driver's console (Ray's progress table) nor its machine's stats belong to a trial;
        # silent: wandb's lines for every trial would bury Tune's progress table.
        settings=wandb.Settings(console="off", x_disable_stats=True, silent=True),
    )


class TrialRuns:
    """The open W&B runs of the running trials, driven by a background thread: wandb.init and
    finish wait on the W&B server when online, and Tune's loop, and so every trial's next report,
    would wait with them."""

    def __init__(self, settings: Dict[str, Any]):
        self.settings = settings
        self.runs: Dict[str, Any] = {}
        self.configs: Dict[str, dict] = {}
        self.tasks: queue.Queue = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="yolotune-wandb", daemon=True)
        self.thread.start()

    def log(self, trial_id: str, name: str, config: dict, row: Dict[str, float], best: Optional[float],
            objectives: Optional[Dict[str, float]] = None) -> None:
        """``objectives``: the trial's value of each objective so far (objective/<name> in its run's summary)."""
        self.tasks.put((self._log, trial_id, name, config, row, best, objectives or {}))

    def finish(self, trial_id: str, failed: bool) -> None:
        self.tasks.put((self._finish, trial_id, failed))

    def close(self) -> None:
        """Finish every open run and wait until W&B has written (or uploaded) them."""
        self.tasks.put(None)
        self.thread.join()

    def _work(self) -> None:
        while (task := self.tasks.get()) is not None:
            _warn_on_failure(*task)
        for trial_id in list(self.runs):
            _warn_on_failure(self._finish, trial_id, False)

    def _log(self, trial_id, name, config, row, best, objectives) -> None:
        train = self.settings["train"]
        if trial_id not in self.runs:
            self.runs[trial_id] = _init(self.settings, trial_id, name, "trial", {**train, **config})
            self.runs[trial_id].define_metric("*", step_metric="epoch")
        elif config != self.configs[trial_id]:  # PBT changed the trial's hyperparameters
            self.runs[trial_id].config.update(config, allow_val_change=True)
        self.configs[trial_id] = config
        run = self.runs[trial_id]
        if best is not None:
            run.summary[f"best_{self.settings['metric']}"] = best
        run.summary.update({f"objective/{k}": v for k, v in objectives.items()})
        run.log(row)

    def _finish(self, trial_id, failed) -> None:
        self.configs.pop(trial_id, None)
        run = self.runs.pop(trial_id, None)
        if run is not None:
            run.finish(exit_code=1 if failed else 0)


def _warn_on_failure(function, *args) -> None:
    try:
        function(*args)
    except Exception as e:  # W&B (a server, a network) failing must not fail a tuning experiment
        print(f"yolotune: W&B logging failed: {e}", file=sys.stderr)


def tune_callback(settings: Dict[str, Any]):
    """The Ray Tune callback that logs every trial to W&B."""
    return _callback_class()(settings)


@functools.lru_cache(maxsize=None)
def _callback_class():
    # Built on first use: subclassing Ray's Callback at import would import Ray (seconds) at validation.
    from ray.tune import Callback
    from ray.tune.result import AUTO_RESULT_KEYS

    class WandbCallback(Callback):
        def __init__(self, settings: Dict[str, Any]):
            self.settings = settings
            self.runs: Optional[TrialRuns] = None

        def __reduce__(self):  # Ray pickles callbacks into tuner.pkl; this class is only reachable this way
            return tune_callback, (self.settings,)

        def setup(self, **info):
            self.runs = TrialRuns(self.settings)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            metric, mode = self.settings["metric"], self.settings["metric_mode"]
            # What the trainable reported (metrics and epoch), not Ray's bookkeeping (time, pid, done, ...).
            row = {k: v for k, v in result.items()
                   if k not in AUTO_RESULT_KEYS and k != layout.PAST_DEADLINE and isinstance(v, (int, float))
                   and not isinstance(v, bool)}
            objectives = {}
            for entry in self.settings.get("objectives", []):  # settings pickled before objectives have none
                name, objective_mode = entry.rsplit(":", 1)
                value = row.get(name) if name in layout.MODEL_COSTS else \
                    _running_best(trial, row, name, objective_mode)
                if value is not None:
                    objectives[name] = value
            self.runs.log(trial.trial_id, str(trial), dict(trial.config), row, _running_best(trial, row, metric, mode),
                          objectives)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.runs.finish(trial.trial_id, failed=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.runs.finish(trial.trial_id, failed=True)

        def on_experiment_end(self, trials, **info):
            self.runs.close()

    return WandbCallback


def _running_best(trial, row: Dict[str, float], metric: str, mode: str) -> Optional[float]:
    """Ray's running min/max of ``metric`` over the trial's earlier results (kept across a resume) and this row's."""
    values = [trial.metric_analysis.get(metric, {}).get(mode), row.get(metric)]
    values = [v for v in values if v is not None]
    return (max if mode == "max" else min)(values) if values else None


def log_experiment_summary(exp_dir: Path, settings: Dict[str, Any]) -> None:
    """One run in the experiment's group: a table of all trials (config, best metric, status) for
    the parallel-coordinates and scatter panels, one scatter chart per tuned parameter, the parameters'
    importance (importance.py: a bar chart and ``importance/<parameter>`` in the run's summary), with
    objectives each trial's objectives and Pareto rank (a table, a scatter, the front's trial ids and the
    select rule in the summary), and the best config as the run's config."""
    _warn_on_failure(_log_summary, exp_dir, settings)


def _log_summary(exp_dir: Path, settings: Dict[str, Any]) -> None:
    import wandb

    from yolotune.importance import importance
    from yolotune.results import ExperimentResults

    results = ExperimentResults(exp_dir)
    best_key = f"best_{results.metric}"
    run = _init(settings, "summary", "summary", "summary", results.best_hyperparameters() or {})
    frame = results.dataframe()
    # a nullable integer column's <NA> (a trial with no best epoch yet) is no JSON to wandb; NaN is
    table = wandb.Table(dataframe=frame.astype({c: float for c in frame.columns[frame.dtypes == "Int64"]}))
    charts = {f"scatter/{p}": wandb.plot.scatter(table, p, best_key, title=f"{best_key} vs {p}")
              for p in results.params}
    judged = importance(results)
    if judged.values:
        shares = wandb.Table(columns=["parameter", "importance"], data=[[p, v] for p, v in judged.values.items()])
        charts["importance"] = wandb.plot.bar(shares, "parameter", "importance",
                                              title=f"Parameter importance for {best_key} ({judged.method})")
    if results.objectives:  # each trial's objectives and Pareto rank, the first two as a scatter chart
        pareto = results.pareto()
        charts["pareto_table"] = wandb.Table(dataframe=pareto.astype({"pareto_rank": float}))
        first, second = results.objectives[:2]
        charts["pareto"] = wandb.plot.scatter(charts["pareto_table"], second.name, first.name,
                                              title=f"{first.name} vs {second.name}")
        run.summary.update({"objectives": [f"{o.name}:{o.mode}" for o in results.objectives],
                            "select": results.select_rule,
                            "pareto_front": list(pareto.trial_id[pareto.pareto_rank == 1])})
    run.log({"trials": table, **charts})
    # importance/<parameter>, beside which method judged it on how many trials (or why it did not)
    run.summary.update({"importance_method": judged.method, "importance_trials": judged.trials,
                        **({"importance_reason": judged.reason} if judged.reason else {}),
                        **{f"importance/{p}": v for p, v in judged.values.items()}})
    best = results.best()
    if best is not None:
        run.summary.update({"best_trial_id": best["trial_id"], best_key: best[best_key]})
    print(f"W&B: {run.url}" if settings["mode"] == "online" else
          f"W&B runs saved offline; upload them with: wandb sync {settings['dir']}/wandb/offline-run-*")
    run.finish()
