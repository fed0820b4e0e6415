"""Results of an experiment, finished, running or interrupted: read from its directory alone.

``load(path)`` needs no running Ray and no live driver: it reads Ray's experiment state for the
trial list and statuses, and each trial's ``history.jsonl`` (written by the trial itself, see
trainable.py) for its per-epoch history. The object is a
snapshot: load again to see a running experiment's newer epochs.

``yolotune results PATH`` (``main``) prints, writes and plots the same for the command line.
"""

from __future__ import annotations

import argparse
import base64
import html
import json
import math
import sys
import time
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Dict, Iterable, List, Optional

import pandas as pd
import yaml
from omegaconf import OmegaConf

from yolotune.experiment import load_saved_config
from yolotune.layout import HISTORY, SAVED_CONFIG, is_finished, trial_dirname, write_atomic
from yolotune.plots import better
from yolotune.space import Dist, parse_space

# A trial still PAUSED when Tune returns was left there by its scheduler (synchronous HyperBand
# does that to trials it did not promote): it has ended. Only an interrupt leaves trials
# RUNNING or PENDING in the saved state.
ENDED = ("TERMINATED", "ERROR", "PAUSED")
KNOWN_STATUSES = ("TERMINATED", "ERROR", "RUNNING", "PENDING", "PAUSED")  # Ray's trial statuses
PLOTS_DIR = "plots"
REPORT = "report.html"
TRIALS_CSV = "trials.csv"


class ExperimentResults:
    def __init__(self, path, metric: Optional[str] = None, mode: Optional[str] = None):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / SAVED_CONFIG).is_file():
            raise FileNotFoundError(f"{self.path} is not a yolotune experiment (no {SAVED_CONFIG})")
        if mode not in (None, "min", "max"):
            raise ValueError(f"mode={mode!r}: min or max")
        self.config = load_saved_config(self.path)
        self.metric, self.mode = self._ranking(metric, mode)
        self._frames: Dict[tuple, pd.DataFrame] = {}  # (metric, mode) -> dataframe(): table, plots, report reuse it

    def _ranking(self, metric: Optional[str], mode: Optional[str]):
        """(metric, mode): the experiment's own by default; another metric's mode is guessed from its name."""
        metric = metric or self.config.metric
        if mode is None:
            mode = self.config.mode if metric == self.config.metric else default_mode(metric)
        return metric, mode

    def _resolve(self, metric: Optional[str], mode: Optional[str]):
        """A method's (metric, mode) arguments: this object's ranking unless another metric is named."""
        if metric in (None, self.metric):
            return self.metric, mode or self.mode
        return self._ranking(metric, mode)

    @cached_property
    def result_grid(self):
        """Ray's ResultGrid for the experiment (as ``Tuner.restore(...).get_results()``), ranked by ``metric``."""
        from ray.tune import ExperimentAnalysis, ResultGrid

        return ResultGrid(ExperimentAnalysis(str(self.path), default_metric=self.metric, default_mode=self.mode))

    @cached_property
    def _trials(self) -> List[dict]:
        """One dict per trial: id, status and sampled config, from Ray's saved experiment state."""
        states = sorted(self.path.glob("experiment_state-*.json"))  # names end in a sortable timestamp
        trials = {}
        for state_json, _ in _read_state(states[-1])["trial_data"] if states else []:
            state = json.loads(state_json)
            trials[state["trial_id"]] = {"trial_id": state["trial_id"], "status": state["status"],
                                         "config": _plain(state.get("config", {}))}
        for params in self.path.glob("trial_*/params.json"):  # trials started after the last state save
            trial_id = params.parent.name.removeprefix("trial_")
            trials.setdefault(trial_id, {"trial_id": trial_id, "status": "RUNNING",
                                         "config": json.loads(params.read_text())})
        return sorted(trials.values(), key=lambda t: t["trial_id"])

    def trial_dir(self, trial_id: str) -> Path:
        return self.path / trial_dirname(trial_id)

    @cached_property
    def _history(self) -> pd.DataFrame:
        rows = [{**row, "trial_id": trial["trial_id"]}
                for trial in self._trials
                for row in _read_results(self.trial_dir(trial["trial_id"]) / HISTORY)]
        if not rows:
            return pd.DataFrame(columns=["trial_id", "epoch"])
        # An epoch re-run after a resume (or continued by a PBT clone) counts once: its latest run.
        history = pd.DataFrame(rows).drop_duplicates(["trial_id", "epoch"], keep="last")
        history = history.sort_values(["trial_id", "epoch"], kind="stable").reset_index(drop=True)
        return history[["trial_id", "epoch", *[c for c in history.columns if c not in ("trial_id", "epoch")]]]

    def history(self) -> pd.DataFrame:
        """One row per reported epoch of every trial: trial_id, epoch and everything the trial reported."""
        return self._history.copy()

    @property
    def params(self) -> List[str]:
        return list(self.config.space.keys())

    @cached_property
    def space(self) -> Dict[str, Dist]:
        """The tuned parameters' distributions, as the experiment's config declared them."""
        return parse_space(OmegaConf.to_container(self.config.space, resolve=True))

    def dataframe(self, metric: Optional[str] = None, mode: Optional[str] = None) -> pd.DataFrame:
        """One row per trial: id, status, sampled params, epochs run, last and best ``metric`` and the
        epoch of the best, node, error. Trials that have not reported yet have empty values."""
        metric, mode = self._resolve(metric, mode)
        if (metric, mode) not in self._frames:
            self._frames[metric, mode] = self._trial_frame(metric, mode)
        return self._frames[metric, mode].copy()

    def _trial_frame(self, metric: str, mode: str) -> pd.DataFrame:
        history = self._history
        by_trial = dict(tuple(history.groupby("trial_id", sort=False)))
        rows = []
        for trial in self._trials:
            trial_id = trial["trial_id"]
            runs = by_trial.get(trial_id, history.iloc[:0])
            values = runs[metric].dropna() if metric in runs else pd.Series(dtype=float)
            best_at = (values.idxmax() if mode == "max" else values.idxmin()) if len(values) else None
            rows.append({
                "trial_id": trial_id, "status": trial["status"],
                **{p: trial["config"].get(p) for p in self.params},
                "epochs": int(runs["epoch"].max()) if len(runs) else 0,
                f"last_{metric}": values.iloc[-1] if len(values) else None,
                f"best_{metric}": values[best_at] if best_at is not None else None,
                "best_epoch": int(runs.at[best_at, "epoch"]) if best_at is not None else None,
                "hostname": runs["hostname"].iloc[-1] if "hostname" in runs and len(runs) else None,
                "node_id": runs["node_id"].iloc[-1] if "node_id" in runs and len(runs) else None,
                "error": self.errors.get(trial_id),
            })
        frame = pd.DataFrame(rows, columns=["trial_id", "status", *self.params, "epochs", f"last_{metric}",
                                            f"best_{metric}", "best_epoch", "hostname", "node_id", "error"])
        return frame.astype({f"last_{metric}": float, f"best_{metric}": float, "best_epoch": "Int64"})

    def ranked(self, metric: Optional[str] = None, mode: Optional[str] = None) -> pd.DataFrame:
        """``dataframe()`` sorted best first by ``metric``, trials without a value last, with a 1-based rank."""
        metric, mode = self._resolve(metric, mode)
        frame = self.dataframe(metric, mode)
        frame = frame.sort_values(f"best_{metric}", ascending=mode == "min", na_position="last", kind="stable")
        ranks = pd.Series(range(1, len(frame) + 1), index=frame.index, dtype="Int64")
        frame.insert(0, "rank", ranks.where(frame[f"best_{metric}"].notna()))
        return frame.reset_index(drop=True)

    @cached_property
    def errors(self) -> Dict[str, str]:
        """trial id -> first line of its error, for trials that raised."""
        found = {}
        for trial in self._trials:
            error_file = self.trial_dir(trial["trial_id"]) / "error.txt"
            if trial["status"] == "ERROR" and error_file.is_file():
                found[trial["trial_id"]] = _error_line(error_file.read_text())
        return found

    def status_counts(self) -> Dict[str, int]:
        """Trial status (Ray's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED) -> number of trials."""
        counts: Dict[str, int] = {}
        for trial in self._trials:
            counts[trial["status"]] = counts.get(trial["status"], 0) + 1
        return dict(sorted(counts.items()))

    @property
    def finished(self) -> bool:
        """Every trial has ended. False while running, and for an interrupted experiment (resumable)."""
        if is_finished(self.path):
            return True
        trials = self._trials
        return (len(trials) >= self.config.get("iterations", 1)
                and all(t["status"] in ENDED for t in trials))

    def best(self, metric: Optional[str] = None, mode: Optional[str] = None) -> Optional[pd.Series]:
        """The best trial's row (by its best value of ``metric`` over all epochs), or None."""
        metric, mode = self._resolve(metric, mode)
        frame = self.dataframe(metric, mode).dropna(subset=[f"best_{metric}"])
        if frame.empty:
            return None
        index = frame[f"best_{metric}"].idxmax() if mode == "max" else frame[f"best_{metric}"].idxmin()
        return frame.loc[index]

    def best_hyperparameters(self) -> Optional[dict]:
        """Flat Ultralytics train arguments: the fixed ones plus the best trial's sampled values."""
        best = self.best()
        if best is None:
            return None
        fixed = OmegaConf.to_container(self.config.train, resolve=True)
        sampled = {p: _scalar(best[p]) for p in self.params}
        data_yaml = self.job_data_yaml()
        model = self.config.model.weights
        return {"model": model, **({"data": data_yaml} if data_yaml else {}), **fixed, **sampled}

    def job_data_yaml(self) -> Optional[str]:
        """The absolute data YAML the trials trained on (from a trial's Ultralytics args.yaml)."""
        for args in sorted(self.path.glob("trial_*/train/args.yaml")):
            return yaml.safe_load(args.read_text()).get("data")
        return None

    def write(self) -> None:
        """(Re)write trials.csv, best_hyperparameters.yaml and best.pt, each atomically."""
        self.write_trials_csv()
        best_hp = self.best_hyperparameters()
        if best_hp is None:
            return
        write_atomic(self.path / "best_hyperparameters.yaml", yaml.safe_dump(best_hp, sort_keys=False))
        weights = self.trial_dir(self.best()["trial_id"]) / "train" / "weights" / "best.pt"
        if weights.is_file():
            from ultralytics.utils.torch_utils import strip_optimizer

            tmp = self.path / ".best.pt.tmp"
            strip_optimizer(weights, s=str(tmp))  # inference weights: no optimizer state, fp16
            tmp.replace(self.path / "best.pt")

    def write_trials_csv(self) -> Path:
        """trials.csv: ``dataframe()`` in trial order, written atomically."""
        target = self.path / TRIALS_CSV
        write_atomic(target, self.dataframe().to_csv(index=False))
        return target

    def figure(self, kind: str, metric: Optional[str] = None, mode: Optional[str] = None):
        """One plot as a matplotlib Figure (not saved): ``history``, ``params`` or ``progress``."""
        from yolotune import plots

        metric, mode = self._resolve(metric, mode)
        return plots.figure(self, kind, metric, mode)

    def plot(self, kinds: Optional[Iterable[str]] = None, metric: Optional[str] = None,
             mode: Optional[str] = None, directory=None) -> Dict[str, Path]:
        """Write ``<kind>.png`` for each of ``kinds`` (default: history, params, progress) to
        ``directory`` (default: the experiment's plots/); returns kind -> path."""
        from yolotune import plots

        metric, mode = self._resolve(metric, mode)
        directory = Path(directory) if directory is not None else self.path / PLOTS_DIR
        return plots.save(self, directory, kinds or plots.KINDS, metric, mode)

    def report(self, pngs: Optional[Dict[str, Path]] = None, top: Optional[int] = None) -> Path:
        """report.html in the experiment dir: status, errors, the ranked table, the best config and the
        plots (``pngs``, default: freshly drawn), embedded so that the page is one self-contained file."""
        pngs = pngs if pngs is not None else self.plot()
        target = self.path / REPORT
        write_atomic(target, _report_html(self, pngs, top))
        return target

    def table(self, top: Optional[int] = None) -> pd.DataFrame:
        """The ranked trials as the CLI shows them: rank, id, status, params, epochs, best and last value."""
        frame = self.ranked()
        cols = ["rank", "trial_id", "status", *self.params, "epochs", f"best_{self.metric}",
                "best_epoch", f"last_{self.metric}"]
        return frame[cols].head(top) if top else frame[cols]

    def summary(self, top: int = 5) -> str:
        lines = [*self._overview(), *self._ranking_text(top)]
        if self.best() is not None:
            lines.append("Best hyperparameters: " + str(self.path / "best_hyperparameters.yaml"))
            lines.append("Best weights:         " + str(self.path / "best.pt"))
        lines.append("Trials table:         " + str(self.path / TRIALS_CSV))
        lines.append(f"Plots and report:     yolotune results {self.path}")
        return "\n".join(lines)

    def _overview(self) -> List[str]:
        counts = self.status_counts()
        lines = [f"Experiment {self.path}  ({'finished' if self.finished else 'unfinished'})",
                 f"Trials: {sum(counts.values())}" + (f" ({_counts_text(counts)})" if counts else "")]
        lines += [f"  ERROR {trial_id}: {error}" for trial_id, error in self.errors.items()]
        return lines

    def _ranking_text(self, top: Optional[int]) -> List[str]:
        table = self.table(top)
        shown = f", top {len(table)} of {len(self._trials)}" if len(table) < len(self._trials) else ""
        return [f"Trials ranked by best {self.metric} ({better(self.mode)}){shown}:",
                _format_table(table) if len(table) else "  (no trials yet)"]


def load(path, metric: Optional[str] = None, mode: Optional[str] = None) -> ExperimentResults:
    """An experiment's results from its directory (``<storage>/<name>``), finished or not."""
    return ExperimentResults(path, metric, mode)


def write_results(exp_dir: Path) -> ExperimentResults:
    results = ExperimentResults(exp_dir)
    results.write()
    return results


def default_mode(metric: str) -> str:
    """Losses are minimised; everything Ultralytics reports besides losses (mAP, precision, recall,
    fitness) is maximised."""
    return "min" if "loss" in metric else "max"


def experiments_in(storage: Path) -> List[Path]:
    """The experiment dirs directly under a storage dir, oldest first."""
    dirs = [config.parent.parent for config in storage.glob(f"*/{SAVED_CONFIG}")]
    return sorted(dirs, key=lambda d: ((d / SAVED_CONFIG).stat().st_mtime, d.name))


class ResultsError(Exception):
    """A user's mistake on the command line: reported as one line, exit code 2."""


def main(argv: Optional[List[str]] = None) -> int:
    """``yolotune results PATH ...``: returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="yolotune results",
        description="Analyse a yolotune experiment (finished, running or interrupted): print its trials ranked "
                    "by metric and the best config, and (re)write trials.csv, plots/*.png and report.html in "
                    "it. Given a storage dir, list the experiments in it.")
    parser.add_argument("path", help="an experiment dir (<storage>/<name>) or a storage dir")
    parser.add_argument("--metric", help="rank and plot by this reported metric (default: the experiment's; "
                                         "trials.csv keeps the experiment's)")
    parser.add_argument("--mode", choices=("min", "max"),
                        help="default: the experiment's for its metric; otherwise min for losses, max for the rest")
    parser.add_argument("--top", type=_positive_int, metavar="N", help="show the best N trials only")
    parser.add_argument("--format", choices=("table", "csv", "json"), default="table", help="output format")
    args = parser.parse_args(argv)

    path = Path(args.path).expanduser()
    try:
        if (path / SAVED_CONFIG).is_file():
            try:
                results = load(path, args.metric, args.mode)
            except (OSError, ValueError, yaml.YAMLError) as e:
                raise ResultsError(f"{path}: unreadable experiment: {e}") from None
            return _show_experiment(results, args)
        experiments = experiments_in(path) if path.is_dir() else []
        if experiments:
            return _list_experiments(experiments, args)
    except ResultsError as e:
        return _fail(str(e))
    if not path.exists():
        return _fail(f"{path}: no such directory")
    return _fail(f"{path}: not a yolotune experiment (no {SAVED_CONFIG}) nor a storage dir holding experiments")


def _show_experiment(results: ExperimentResults, args) -> int:
    reported = [c for c in results._history.columns if pd.api.types.is_numeric_dtype(results._history[c])]
    if len(results._history) and results.metric not in reported:
        raise ResultsError(f"--metric {results.metric}: not reported by this experiment; reported: "
                           + ", ".join(c for c in reported if c not in ("epoch", "trial_id")))
    written = _write_outputs(results, args.top)
    if args.format == "json":
        print(json.dumps(_as_json(results, args.top, written), indent=2))
    elif args.format == "csv":
        print(results.table(args.top).to_csv(index=False), end="")
    else:
        lines = [*results._overview(), "", *results._ranking_text(args.top), ""]
        best = results.best()
        if best is not None:
            lines += [f"Best trial: {best['trial_id']}: {results.metric} {best[f'best_{results.metric}']:.6g} "
                      f"at epoch {best['best_epoch']}, in {results.trial_dir(best['trial_id'])}",
                      "Best config (Ultralytics train arguments):",
                      _indent(yaml.safe_dump(results.best_hyperparameters(), sort_keys=False))]
        lines += [f"Wrote {p}" for p in written.values()]
        print("\n".join(lines))
    return 0


def _write_outputs(results: ExperimentResults, top: Optional[int]) -> Dict[str, str]:
    """trials.csv, plots/ and report.html; a read-only experiment dir is reported, not fatal.

    trials.csv keeps the experiment's own metric whatever ``--metric`` ranks by: other tools read its columns.
    """
    own = results if results.metric == results.config.metric else load(results.path)
    try:
        csv_path = own.write_trials_csv()
        pngs = results.plot()
        report = results.report(pngs, top)
    except OSError as e:
        print(f"yolotune results: warning: could not write into {results.path}: {e}", file=sys.stderr)
        return {}
    return {"trials_csv": str(csv_path), **{k: str(p) for k, p in pngs.items()}, "report": str(report)}


def _as_json(results: ExperimentResults, top: Optional[int], written: Dict[str, str]) -> dict:
    best = results.best()
    return {
        "experiment": str(results.path), "finished": results.finished,
        "metric": results.metric, "mode": results.mode,
        "trials": len(results._trials), "status": results.status_counts(), "errors": results.errors,
        "ranked": _records(results.table(top)),
        "best": None if best is None else {
            "trial_id": best["trial_id"], "value": float(best[f"best_{results.metric}"]),
            "epoch": int(best["best_epoch"]), "config": results.best_hyperparameters()},
        "files": written,
    }


def _list_experiments(experiments: List[Path], args) -> int:
    rows = []
    for exp_dir in experiments:
        try:
            results = load(exp_dir, args.metric, args.mode)
            best = results.best()
            counts = results.status_counts()
        except (OSError, ValueError, yaml.YAMLError) as e:  # one broken experiment must not hide the others
            rows.append({"experiment": exp_dir.name, "status": f"unreadable: {e}"})
            continue
        rows.append({
            "experiment": exp_dir.name, "status": "finished" if results.finished else "unfinished",
            "trials": sum(counts.values()), **{s.lower(): n for s, n in counts.items()},
            "metric": results.metric, "mode": results.mode,
            "best": None if best is None else float(best[f"best_{results.metric}"]),
            "best_trial": None if best is None else best["trial_id"],
        })
    frame = pd.DataFrame(rows)
    order = ["experiment", "status", "trials", *[s.lower() for s in KNOWN_STATUSES], "metric", "mode", "best",
             "best_trial"]
    counted = [c for c in frame.columns if c.upper() in KNOWN_STATUSES]
    frame[counted] = frame[counted].fillna(0).astype(int)
    frame = frame[[c for c in order if c in frame] + [c for c in frame if c not in order]]
    if args.format == "json":
        print(json.dumps(_records(frame), indent=2))
    elif args.format == "csv":
        print(frame.to_csv(index=False), end="")
    else:
        print(f"{len(frame)} experiments in {Path(args.path).expanduser().resolve()}")
        print(_format_table(frame))
    return 0


def _fail(message: str) -> int:
    print(f"yolotune results: error: {message}", file=sys.stderr)
    return 2


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text}: must be >= 1")
    return value


def _report_html(results: ExperimentResults, pngs: Dict[str, Path], top: Optional[int]) -> str:
    esc = html.escape
    counts = _counts_text(results.status_counts()) or "no trials yet"
    errors = "".join(f"<li><code>{esc(t)}</code>: {esc(e)}</li>" for t, e in results.errors.items())
    best_hp = results.best_hyperparameters()
    table = results.table(top).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
    images = "".join(
        f'<figure><img alt="{esc(kind)} plot" src="data:image/png;base64,'
        f'{base64.b64encode(Path(png).read_bytes()).decode()}"><figcaption>{esc(Path(png).name)}</figcaption></figure>'
        for kind, png in pngs.items())
    return f"""<!doctype html>
<html lang="en"><head><meta charset="utf-8"><title>yolotune results: {esc(results.path.name)}</title>
<style>
body {{ font-family: sans-serif; margin: 2em auto; max-width: 1200px; padding: 0 1em; color: #222; }}
table {{ border-collapse: collapse; font-size: 13px; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 3px 8px; text-align: right; }}
pre {{ background: #f6f6f6; padding: 1em; }}
img {{ max-width: 100%; }}
</style></head><body>
<h1>Experiment {esc(results.path.name)}</h1>
<p><code>{esc(str(results.path))}</code><br>
{'finished' if results.finished else 'unfinished (running or interrupted)'}; trials: {esc(counts)}<br>
ranked by best <b>{esc(results.metric)}</b> ({better(results.mode)}); report written {datetime.now():%Y-%m-%d %H:%M}</p>
<h2>Errors</h2>{f'<ul>{errors}</ul>' if errors else '<p>none</p>'}
<h2>Trials</h2>{table}
<h2>Best config</h2>
<pre>{esc(yaml.safe_dump(best_hp, sort_keys=False)) if best_hp else 'no trial has reported yet'}</pre>
<h2>Plots</h2>{images}
</body></html>
"""


def _counts_text(counts: Dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def _format_table(frame: pd.DataFrame) -> str:
    frame = frame.copy()
    for col in frame.columns[frame.dtypes == "Int64"]:  # to_string's na_rep skips nullable ints' <NA>
        frame[col] = frame[col].map(lambda v: "-" if pd.isna(v) else str(v))
    return frame.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())


def _read_results(result_file: Path) -> List[dict]:
    """The results a trial reported, one JSON object a line."""
    lines = [line for line in (result_file.read_text().splitlines() if result_file.is_file() else []) if line.strip()]
    rows = []
    for i, line in enumerate(lines):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            if i < len(lines) - 1:
                raise
            # A driver killed mid-write leaves at most its last line cut short.
    return rows


def _read_state(state_file: Path) -> dict:
    """Ray's experiment state. Ray rewrites it in place while the experiment runs, so a read can
    catch it half-written: read again until it parses."""
    for attempt in range(20):
        try:
            return json.loads(state_file.read_text())
        except json.JSONDecodeError:
            if attempt == 19:
                raise
            time.sleep(0.1)


def _records(frame: pd.DataFrame) -> List[dict]:
    """JSON-ready rows: Python scalars at full precision, None for missing values."""
    return [{k: None if _missing(v) else _scalar(v) for k, v in row.items()} for row in frame.to_dict("records")]


def _missing(value) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("__")}


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


def _error_line(text: str) -> str:
    """The exception line of a traceback (its last non-blank line), not 'Traceback (most recent...'."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""


if __name__ == "__main__":
    sys.exit(main())
