"""``yolotune results PATH ...``: an experiment's ranked trials, or a storage dir's experiments.

Mistakes and unreadable experiments are one line on stderr and exit code 2; what a kill left
damaged is skipped and said in one warning line on stderr.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd

from yolotune import layout, records, report
from yolotune.importance import importance
from yolotune.results import STATUSES, ExperimentResults, load, python_scalar
from yolotune.storage import Location

PROG = "yolotune results"


class UsageError(Exception):
    """A user's mistake on the command line: reported as one line, exit code 2."""


def main(argv: Optional[List[str]] = None) -> int:
    """Returns the exit code."""
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Analyse a yolotune experiment (finished, running or interrupted): print its trials ranked "
                    "by metric, the best config and the parameters' importance; with --plots or --report, "
                    "(re)write its files too. Given a storage dir, list the experiments in it.")
    parser.add_argument("path", help="an experiment dir (<storage>/<name>) or a storage dir")
    parser.add_argument("--metric", help="rank and plot by this reported metric (default: the experiment's; "
                                         "trials.csv keeps the experiment's)")
    parser.add_argument("--mode", choices=("min", "max"),
                        help="default: the experiment's for its metric; otherwise min for losses, max for the rest")
    parser.add_argument("--top", type=_positive_int, metavar="N", help="show the best N trials only")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    parser.add_argument("--plots", action="store_true", help=f"(re)write {layout.TRIALS_CSV} and "
                                                              f"{layout.PLOTS_DIR}/*.png in the experiment")
    parser.add_argument("--report", action="store_true", help=f"(re)write {layout.TRIALS_CSV}, the plots and "
                                                               f"{layout.REPORT} in the experiment")
    parser.add_argument("--convert", action="store_true",
                        help=f"first write the {layout.TRIAL_RECORD} of an experiment from an earlier yolotune "
                             "(from Ray's experiment state)")
    args = parser.parse_args(argv)

    location = Location(args.path)
    try:
        path = location.download()  # an object store's small files, into the local cache
        if layout.is_experiment(path):
            if args.convert:
                location.upload(records.convert(path))
                print(f"Wrote {location.uri}/{layout.TRIAL_RECORD}", file=sys.stderr)
            return _show_experiment(load(path, args.metric, args.mode), args, location)
        experiments = layout.experiments_in(path) if path.is_dir() else []
        if experiments:
            return _list_experiments(experiments, args)
    except (UsageError, ValueError, OSError) as e:  # ValueError: UnreadableExperiment, a bad Ray state
        return _fail(str(e))
    if not path.exists():
        return _fail(f"{path}: no such directory")
    return _fail(f"{path}: not a yolotune experiment (no {layout.SAVED_CONFIG}) nor a storage dir holding experiments")


def _show_experiment(results: ExperimentResults, args, location: Location) -> int:
    reported = results.reported_metrics()
    # The experiment's own metric is known good though no epoch may have validated yet (report says so)
    if reported and results.metric not in reported and results.metric != results.config.metric:
        raise UsageError(f"--metric {results.metric}: not reported by this experiment; reported: "
                         + ", ".join(reported))
    if results.problems:
        _warn("; ".join(results.problems))
    written = _write_outputs(results, args, location) if args.plots or args.report else {}
    if args.format == "json":
        print(json.dumps(_as_json(results, args.top, written), indent=2))
    elif args.format == "csv":
        print(results.table(args.top).to_csv(index=False), end="")
    else:
        print(report.details(results, args.top, written))
    return 0


def _write_outputs(results: ExperimentResults, args, location: Location) -> Dict[str, Path]:
    """A read-only experiment dir (or store) is reported, not fatal. In an object store the files
    are written to the local copy and uploaded."""
    try:
        written = report.write_all(results, args.top) if args.report else report.write_plots(results)
        location.upload(*written.values())
        return written
    except OSError as e:
        _warn(f"could not write into {location.uri}: {e}")
        return {}


def _as_json(results: ExperimentResults, top: Optional[int], written: Dict[str, Path]) -> dict:
    best = results.best()
    return {
        "experiment": str(results.path), "finished": results.finished,
        "metric": results.metric, "mode": results.mode,
        "objectives": [f"{o.name}:{o.mode}" for o in results.objectives], "select": results.select_rule,
        "trials": sum(results.status_counts().values()), "status": results.status_counts(),
        "errors": results.errors,
        "ranked": _records(_with_latency_method(results, results.table(top))),
        "best": None if best is None else {
            "trial_id": best["trial_id"], "value": float(best[f"best_{results.metric}"]),
            "epoch": int(best["best_epoch"]), "config": results.best_hyperparameters()},
        "importance": importance(results).as_json(),
        "files": {name: str(p) for name, p in written.items()},
    }


def _with_latency_method(results: ExperimentResults, table: pd.DataFrame) -> pd.DataFrame:
    """With a latency objective, each row's ``latency_method`` beside its value."""
    if not results.by_objectives() or not results.measures_latency:
        return table
    return table.merge(results.pareto()[["trial_id", "latency_method"]], on="trial_id", how="left")


def _list_experiments(experiments: List[Path], args) -> int:
    rows = []
    for exp_dir in experiments:
        try:
            results = load(exp_dir, args.metric, args.mode)
        except (OSError, ValueError) as e:  # one broken experiment must not hide the others
            rows.append({"experiment": exp_dir.name, "status": f"unreadable: {e}"})
            continue
        if results.problems:
            _warn(f"{exp_dir.name}: " + "; ".join(results.problems))
        best, counts = results.best(), results.status_counts()
        rows.append({
            "experiment": exp_dir.name, "status": "finished" if results.finished else "unfinished",
            "trials": sum(counts.values()), **{s.lower(): n for s, n in counts.items()},
            "metric": results.metric, "mode": results.mode,
            "best": None if best is None else float(best[f"best_{results.metric}"]),
            "best_trial": None if best is None else best["trial_id"],
        })
    frame = pd.DataFrame(rows)
    order = ["experiment", "status", "trials", *[s.lower() for s in STATUSES], "metric", "mode", "best",
             "best_trial"]
    counted = [c for c in frame.columns if c.upper() in STATUSES]
    frame[counted] = frame[counted].fillna(0).astype(int)
    frame = frame[[c for c in order if c in frame] + [c for c in frame if c not in order]]
    if args.format == "json":
        print(json.dumps(_records(frame), indent=2))
    elif args.format == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        print(f"{len(frame)} experiments in {Location(args.path).uri}")
        print(report.format_table(frame))
    return 0


def _warn(message: str) -> None:
    print(f"{PROG}: warning: {message}", file=sys.stderr)


def _fail(message: str) -> int:
    print(f"{PROG}: error: {message}", file=sys.stderr)
    return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def _records(frame: pd.DataFrame) -> List[dict]:
    """JSON-ready rows: Python scalars at full precision, None for missing values."""
    return [{k: None if _missing(v) else python_scalar(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))
