"""The wandb group: one W&B run per trial, grouped per experiment, plus a summary run.

``check_wandb`` runs at validation time, ``trial_settings`` and ``log_experiment_summary`` in the
driver, ``TrialRun`` inside Ray workers. wandb is imported inside the functions that use it, so
composing and validating a config never imports it. Credentials never pass through here: W&B reads
them itself (WANDB_API_KEY, which Ray workers inherit, or the netrc file).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import sys
from pathlib import Path
from typing import Any, Dict

from yolotune.errors import ConfigError


def check_wandb(cfg) -> None:
    """Refuse, before any trial starts, a W&B mode that could only fail inside the trials."""
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb", cfg.mode, "needs wandb: pip install 'yolotune[wandb]'")
    if cfg.mode == "online" and not _logged_in():
        raise ConfigError("wandb", cfg.mode, "no W&B login found; run `wandb login` or set WANDB_API_KEY "
                                             "(or use wandb=offline and `wandb sync` the runs later)")


def _logged_in() -> bool:
    import wandb

    # W&B's own lookup (WANDB_API_KEY, its settings files, netrc), without prompting or network.
    return wandb.login(prompt=False, verify=False)


def trial_settings(exp, exp_dir: Path) -> Dict[str, Any]:
    """What the trials and the summary run need: plain values that Ray pickles, never a credential."""
    cfg = exp.wandb
    return {
        "mode": cfg.mode, "project": cfg.project, "entity": cfg.entity, "group": cfg.group or exp_dir.name,
        "tags": list(cfg.tags), "notes": cfg.notes,
        # Ray workers run in their own working dir, which wandb's default (./wandb) would point into.
        "dir": str(Path(os.environ.get("WANDB_DIR") or exp_dir).expanduser().resolve()),
        "experiment": exp_dir.name, "experiment_dir": str(exp_dir), "metric": exp.metric, "metric_mode": exp.mode,
    }


def run_id(experiment: str, key: str) -> str:
    """The same W&B run id every time a trial (or the summary) of this experiment starts, resumed or not."""
    return hashlib.sha1(f"{experiment}/{key}".encode()).hexdigest()[:16]


def _init(settings: Dict[str, Any], key: str, name: str, job_type: str, config: Dict[str, Any]):
    import wandb

    Path(settings["dir"]).mkdir(parents=True, exist_ok=True)
    return wandb.init(
        mode=settings["mode"], project=settings["project"], entity=settings["entity"], group=settings["group"],
        tags=settings["tags"], notes=settings["notes"], dir=settings["dir"], job_type=job_type, name=name,
        id=run_id(settings["experiment"], key), resume="allow", config=config,
        reinit="finish_previous",  # a reused worker never logs into the previous trial's run
    )


class TrialRun:
    """The W&B run of one trial: its config, one history row per epoch, the best ``metric`` in its summary."""

    def __init__(self, settings: Dict[str, Any], ctx, config: Dict[str, Any], train: Dict[str, Any]):
        # Ray gives a stopped trial's function 2 s (TUNE_FUNCTION_THREAD_TIMEOUT_S) to return before it
        # discards the warm worker; finishing a run (an upload, online) can take longer.
        os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "60")
        self.metric, self.mode = settings["metric"], settings["metric_mode"]
        trial_dir = Path(settings["experiment_dir"]) / ctx.get_trial_name()
        self.best = self._best(_reported(trial_dir, self.metric))  # a resumed trial's epochs before the crash
        self.run = _init(settings, ctx.get_trial_id(), ctx.get_trial_name(), "trial", {**train, **config})
        self.run.define_metric("*", step_metric="epoch")

    def _best(self, values):
        values = [v for v in values if v is not None]
        return (max if self.mode == "max" else min)(values) if values else None

    def log(self, metrics: Dict[str, Any]) -> None:
        # The metrics (floats) and the step; not where the trial ran (hostname, node_id, pid).
        row = {k: v for k, v in metrics.items() if isinstance(v, float) or k == "epoch"}
        self.best = self._best([self.best, row.get(self.metric)])
        if self.best is not None:
            self.run.summary[f"best_{self.metric}"] = self.best
        self.run.log(row)

    def finish(self) -> None:
        # Called from the trainable's ``finally``: an exception other than Ray's stop (SystemExit) failed it.
        error = sys.exc_info()[0]
        self.run.finish(exit_code=0 if error in (None, SystemExit) else 1)


def _reported(trial_dir: Path, metric: str) -> list:
    results = trial_dir / "result.json"
    lines = results.read_text().splitlines() if results.is_file() else []
    return [json.loads(line).get(metric) for line in lines if line.strip()]


def log_experiment_summary(exp_dir: Path, settings: Dict[str, Any]) -> None:
    """One run in the experiment's group: a table of all trials (for the parallel-coordinates and
    scatter panels), one scatter chart per tuned parameter, and the best config."""
    import wandb

    from yolotune.results import ExperimentResults

    results = ExperimentResults(exp_dir)
    trials = results.dataframe()
    best_key = f"best_{results.metric}"
    run = _init(settings, "summary", "summary", "summary", results.best_hyperparameters() or {})
    table = wandb.Table(dataframe=trials)
    charts = {f"scatter/{p}": wandb.plot.scatter(table, p, best_key, title=f"{best_key} vs {p}")
              for p in results.params}
    run.log({"trials": table, **charts})
    best = results.best()
    if best is not None:
        run.summary.update({"best_trial_id": best["trial_id"], best_key: best[best_key]})
    run.finish()
