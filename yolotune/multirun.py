"""Multirun: each Hydra job is one tuning experiment; a summary compares them.

Every job appends its row to ``<sweep dir>/multirun_summary.csv`` as it ends (so the file is
right even if the multirun is killed), and the callback prints the table when all have run. A job
refused by a check (even one whose config does not compose) or failing while it runs is a
``refused`` or ``failed`` row: the other jobs still run. The exit code says how they went
(``exit_code``).
"""

from __future__ import annotations

import json
import sys
import time
import traceback
from pathlib import Path

import pandas as pd
from hydra.experimental.callback import Callback

from yolotune.layout import first_line, write_atomic

SUMMARY = "multirun_summary.csv"


def run_job(sweep_dir: Path, job_num: int, overrides, run) -> None:
    """Run one job with ``run() -> (experiment dir, finished)``, a dir of None for a dry run (checked,
    nothing made); record its row whatever happens (the launcher uploads the summary when storage is a URI)."""
    start = time.time()
    row = new_row(job_num, overrides)
    try:
        exp_dir, finished = run()
        if exp_dir is None:
            row.update(status="checked")
        else:
            row.update(experiment=str(exp_dir), status="ok" if finished else "interrupted", **_best(exp_dir))
        if row["trials_errored"] and not row["trials_finished"]:  # as a single run, which exits 1
            row.update(status="failed", error="every trial failed (trials.csv has their errors)")
    except Exception as e:  # noqa: BLE001 - one failed job must not stop the others
        mark_failed(row, e)
        if not getattr(e, "key", None):  # a bug, not a user mistake: keep the traceback
            traceback.print_exc()
    row["wall_time_s"] = round(time.time() - start, 1)
    append_row(sweep_dir, row)


def new_row(job_num: int, overrides) -> dict:
    return {"job": job_num, "overrides": " ".join(overrides), "status": "ok", "experiment": None,
            "best_metric": None, "best_config": None, "trials_finished": 0, "trials_errored": 0, "wall_time_s": None,
            "error": None}


def mark_failed(row: dict, error: Exception) -> None:
    """A job refused by a check (a ConfigError: nothing ran) or failed while it ran."""
    status = "refused" if getattr(error, "key", None) else "failed"
    row.update(status=status, error=first_line(str(error)) or type(error).__name__)
    print(f"yolotune: job {row['job']} ({row['overrides']}) {status}: yolotune: error: {row['error']}", file=sys.stderr)


def append_row(sweep_dir: Path, row: dict) -> None:
    path = sweep_dir / SUMMARY
    rows = pd.read_csv(path).to_dict("records") if path.is_file() else []
    write_atomic(path, pd.DataFrame([*rows, row]).to_csv(index=False))


def _best(exp_dir: Path) -> dict:
    from yolotune.results import ExperimentResults

    results = ExperimentResults(exp_dir)
    frame = results.dataframe()
    best = results.best()
    return {
        "trials_finished": int((frame["status"] == "TERMINATED").sum()),
        "trials_errored": int((frame["status"] == "ERROR").sum()),
        "best_metric": None if best is None else best[f"best_{results.metric}"],
        "best_config": None if best is None else json.dumps({p: best[p] for p in results.params}, default=str),
    }


class MultirunSummary(Callback):
    def on_multirun_end(self, config, **kwargs) -> None:
        path = Path(config.hydra.sweep.dir) / SUMMARY
        if not path.is_file():
            return
        frame = pd.read_csv(path)
        columns = ["job", "overrides", "status", "best_metric", "trials_finished", "trials_errored", "wall_time_s"]
        print(f"\nMultirun summary ({path}):\n" + frame[columns].to_string(index=False))
        code = exit_code(frame["status"])
        if code:
            sys.exit(code)


def exit_code(statuses) -> int:
    """0 when every job finished (or, with dry_run, passed its checks), 2 when every job was refused (as a
    single run's mistake), else 1."""
    statuses = set(statuses)
    if statuses and statuses <= {"ok", "checked"}:
        return 0
    return 2 if statuses == {"refused"} else 1
