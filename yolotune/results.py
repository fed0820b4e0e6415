"""Results of an experiment, finished, running or interrupted, read from its directory alone.

``load(path)`` needs no running Ray and no live driver: it reads yolotune's trial record
(``trials.jsonl``, see records.py) for the trials, their statuses and sampled configs, and each
trial's ``history.jsonl`` (written by the trial itself, see trainable.py) for its epochs. The object
is a snapshot: load again to see a running experiment's newer epochs. What a kill can leave (a line
cut short, a damaged line) is skipped and listed in ``problems``.

This module reads and ranks and knows nothing of what is made of it: plots.py draws, importance.py
judges the parameters, report.py writes the text, the tables and the HTML, results_cli.py is the
command line.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd
import yaml
from omegaconf import OmegaConf

from yolotune import layout, model_costs, objectives, records
from yolotune.errors import ConfigError
from yolotune.space import Dist, parse_space
from yolotune.storage import Location

# A trial still PAUSED when Tune returns was left there by its scheduler (synchronous HyperBand
# does that to trials it did not promote): it has ended. Only an interrupt leaves trials RUNNING,
# or never started (PENDING).
ENDED = ("TERMINATED", "ERROR", "PAUSED")
STATUSES = ("TERMINATED", "ERROR", "RUNNING", "PENDING", "PAUSED")  # Ray's trial statuses


def default_mode(metric: str) -> str:
    """Losses are minimised; everything else Ultralytics reports (mAP, precision, recall, fitness) is maximised."""
    return "min" if "loss" in metric else "max"


def lower_is_better(mode: str) -> bool:
    if mode not in ("min", "max"):
        raise ValueError(f"mode={mode!r}: min or max")
    return mode == "min"


def better(mode: str) -> str:
    """How to read a metric ranked by ``mode``."""
    return "lower is better" if lower_is_better(mode) else "higher is better"


def best_index(values: pd.Series, mode: str):
    """The index label of the best of ``values`` (NaN skipped)."""
    return values.idxmin() if lower_is_better(mode) else values.idxmax()


def validated(history: pd.DataFrame) -> pd.DataFrame:
    """The epochs that validated (``validated`` 1; every epoch of a history from before the column): the
    only ones whose metrics count, for a trial's best and last value, rankings and plots."""
    return history[history["validated"] != 0] if "validated" in history else history


def measured(history: pd.DataFrame, metric: str) -> pd.DataFrame:
    """The rows that hold a measured value of ``metric``: a training value (``train/...``, ``lr/...``) at
    every epoch, a validation metric at the validated epochs only."""
    rows = history if metric.startswith(layout.TRAINING_VALUES) else validated(history)
    return rows.dropna(subset=[metric]) if metric in rows else rows.iloc[:0]


class UnreadableExperiment(ValueError):
    """The experiment's saved config or trial record cannot be used; the message is one line."""


class ExperimentResults:
    def __init__(self, path, metric: Optional[str] = None, mode: Optional[str] = None):
        self.path = Location(str(path)).download()  # an object store's: its small files, in the local cache
        if mode is not None:
            lower_is_better(mode)
        self.config = _read_config(self.path)
        self.metric, self.mode = self._ranking(metric, mode)
        # The saved config was validated: any name is taken as a metric here
        self.objectives = objectives.parse_objectives(self.config.objectives, bool) if self.config.get("objectives") \
            else []
        self.constraints = objectives.parse_select(self.config.get("select"), self.objectives)
        self.problems: List[str] = []  # one line each: what was skipped as damaged
        self._trials = self._read_trials()
        self._history = self._read_history()
        self.latency = model_costs.read_measured(self.path)  # trial id -> its latency measured alone
        self._frames: Dict[tuple, pd.DataFrame] = {}  # (metric, mode) -> dataframe(): table, plots, report reuse it

    def _ranking(self, metric: Optional[str], mode: Optional[str]):
        """(metric, mode): the experiment's own by default; another metric's mode is guessed from its name."""
        metric = metric or self.config.metric
        if mode is None:
            mode = self.config.mode if metric == self.config.metric else default_mode(metric)
        return metric, mode

    def resolve(self, metric: Optional[str] = None, mode: Optional[str] = None):
        """A caller's (metric, mode) arguments: this object's ranking unless another metric is named."""
        if metric in (None, self.metric):
            return self.metric, mode or self.mode
        return self._ranking(metric, mode)

    def _read_trials(self) -> List[records.TrialState]:
        if records.needs_conversion(self.path):
            raise UnreadableExperiment(
                f"{self.path}: written by an earlier yolotune (no {layout.TRIAL_RECORD}); "
                f"convert it once with: yolotune results --convert {self.path}")
        trials, skipped = records.read_trials(self.path)
        self._skipped(layout.TRIAL_RECORD, skipped)
        for trial in trials:
            if trial.status in ENDED and not self.trial_dir(trial.trial_id).is_dir():
                self.problems.append(f"{layout.trial_dirname(trial.trial_id)}: missing (its epochs are unknown)")
        return trials

    def _read_history(self) -> pd.DataFrame:
        rows = []
        for trial in self._trials:
            name = f"{layout.trial_dirname(trial.trial_id)}/{layout.HISTORY}"
            found, skipped = layout.read_jsonl(self.path / name)
            epochs = [row for row in found if _is_number(row.get("epoch"))]
            self._skipped(name, skipped + len(found) - len(epochs))
            rows += [{**row, "trial_id": trial.trial_id} for row in epochs]
        if not rows:
            return pd.DataFrame(columns=["trial_id", "epoch"])
        # An epoch re-run after a resume (or continued by a PBT clone) counts once: its latest run.
        history = pd.DataFrame(rows).drop_duplicates(["trial_id", "epoch"], keep="last")
        history["epoch"] = history["epoch"].astype(int)
        history = history.sort_values(["trial_id", "epoch"], kind="stable").reset_index(drop=True)
        return history[["trial_id", "epoch", *[c for c in history.columns if c not in ("trial_id", "epoch")]]]

    def _skipped(self, name: str, lines: int) -> None:
        if lines:
            self.problems.append(f"{name}: skipped {layout.count(lines, 'damaged line')}")

    def trial_dir(self, trial_id: str) -> Path:
        return self.path / layout.trial_dirname(trial_id)

    def history(self) -> pd.DataFrame:
        """One row per reported epoch of every trial: trial_id, epoch and everything the trial reported
        (``validated`` 0: training values only, no validation metrics; see ``validated()``)."""
        return self._history.copy()

    def reported_metrics(self) -> List[str]:
        """The numeric values the trials reported (besides the epoch), e.g. to rank by."""
        return [c for c in self._history.columns if c not in ("trial_id", "epoch", "validated")
                and pd.api.types.is_numeric_dtype(self._history[c])]

    @property
    def params(self) -> List[str]:
        return list(self.config.space.keys())

    @property
    def space(self) -> Dict[str, Dist]:
        """The tuned parameters' distributions, as the experiment's config declared them."""
        return parse_space(OmegaConf.to_container(self.config.space, resolve=True))

    def dataframe(self, metric: Optional[str] = None, mode: Optional[str] = None) -> pd.DataFrame:
        """One row per trial: id, status, sampled params, epochs run, last and best ``metric`` (over the
        validated epochs) and the epoch of the best, the batch its last epoch trained with, node, error.
        Trials that have not reported yet have empty values."""
        metric, mode = self.resolve(metric, mode)
        reported = self.reported_metrics()
        # The experiment's own metric is known good, though no epoch may have validated yet (validate=decisions).
        if len(self._history) and metric not in reported and metric != self.config.metric:
            raise ConfigError("metric", metric, f"not reported by this experiment; reported: {', '.join(reported)}")
        if (metric, mode) not in self._frames:
            self._frames[metric, mode] = self._trial_frame(metric, mode)
        return self._frames[metric, mode].copy()

    def _trial_frame(self, metric: str, mode: str) -> pd.DataFrame:
        history = self._history
        by_trial = dict(tuple(history.groupby("trial_id", sort=False)))
        errors = self.errors
        rows = []
        for trial in self._trials:
            runs = by_trial.get(trial.trial_id, history.iloc[:0])
            values = validated(runs)[metric].dropna() if metric in runs else pd.Series(dtype=float)
            best_at = best_index(values, mode) if len(values) else None
            rows.append({
                "trial_id": trial.trial_id, "status": trial.status,
                **{p: trial.config.get(p) for p in self.params},
                "epochs": int(runs["epoch"].max()) if len(runs) else 0,
                f"last_{metric}": values.iloc[-1] if len(values) else None,
                f"best_{metric}": values[best_at] if best_at is not None else None,
                "best_epoch": int(runs.at[best_at, "epoch"]) if best_at is not None else None,
                # smaller than configured where Ultralytics cut it after running out of GPU memory
                layout.TRAINED_BATCH: runs[layout.TRAINED_BATCH].iloc[-1] if layout.TRAINED_BATCH in runs and len(runs)
                else None,
                "hostname": runs["hostname"].iloc[-1] if "hostname" in runs and len(runs) else None,
                "node_id": runs["node_id"].iloc[-1] if "node_id" in runs and len(runs) else None,
                "gpu": runs["gpu"].iloc[-1] if "gpu" in runs and len(runs) else None,  # physical; "" on the CPU
                "error": errors.get(trial.trial_id),
            })
        frame = pd.DataFrame(rows, columns=["trial_id", "status", *self.params, "epochs", f"last_{metric}",
                                            f"best_{metric}", "best_epoch", layout.TRAINED_BATCH, "hostname", "node_id",
                                            "gpu", "error"])
        return frame.astype({f"last_{metric}": float, f"best_{metric}": float, "best_epoch": "Int64",
                             layout.TRAINED_BATCH: "Int64"})

    def by_objectives(self, metric: Optional[str] = None, mode: Optional[str] = None) -> bool:
        """Whether a ranking by (``metric``, ``mode``) is the experiment's own by its several objectives."""
        return bool(self.objectives) and self.resolve(metric, mode) == (self.config.metric, self.config.mode)

    def pareto(self) -> pd.DataFrame:
        """With objectives: per trial (in trial order), its value of each objective (a metric's best over
        its validated epochs; latency_ms as measured alone after the trials, model_costs.py; params and gflops
        as the trial measured them; NaN: not yet) and ``pareto_rank``; with a latency objective also
        ``latency_method``, how its latency was measured."""
        frame = pd.DataFrame({"trial_id": [t.trial_id for t in self._trials]})
        for objective in self.objectives:
            if objective.name == "latency_ms":  # the trial's own timing, on a shared device, does not count
                frame[objective.name] = frame.trial_id.map({t: r["latency_ms"] for t, r in self.latency.items()})
            elif objective.name in layout.MODEL_COSTS:
                frame[objective.name] = frame.trial_id.map(self._last_measured(objective.name))
            elif objective.name in self.reported_metrics() or objective.name == self.config.metric:
                frame[objective.name] = self.dataframe(objective.name, objective.mode)[f"best_{objective.name}"]
            else:
                frame[objective.name] = float("nan")  # no epoch has validated yet
        frame = frame.astype({o.name: float for o in self.objectives})
        frame["pareto_rank"] = objectives.pareto_ranks(frame, self.objectives)
        if self.measures_latency:
            frame["latency_method"] = frame.trial_id.map(
                {t: model_costs.describe(r) for t, r in self.latency.items()}).astype(object)
        return frame

    @property
    def measures_latency(self) -> bool:
        return any(o.name == "latency_ms" for o in self.objectives)

    @property
    def latency_unmeasured(self) -> List[str]:
        """With a latency objective: the trials that ended (TERMINATED) and are not measured alone yet (the
        next run measures them, resume=true, once its own trials have run)."""
        return model_costs.unmeasured(self._trials, self.latency) if self.measures_latency else []

    def _last_measured(self, name: str) -> Dict[str, float]:
        if name not in self._history:
            return {}
        rows = self._history.dropna(subset=[name])
        return rows.groupby("trial_id")[name].last().to_dict()

    def ranked(self, metric: Optional[str] = None, mode: Optional[str] = None) -> pd.DataFrame:
        """``dataframe()`` sorted best first by ``metric``, trials without a value last, with a 1-based rank.
        The experiment's own ranking with objectives: by Pareto rank, then the first objective, with each
        objective's value and ``pareto_rank``; trials without a Pareto rank last."""
        metric, mode = self.resolve(metric, mode)
        frame = self.dataframe(metric, mode)
        keys, ascending = [f"best_{metric}"], [lower_is_better(mode)]
        if self.by_objectives(metric, mode):
            pareto = self.pareto()
            frame.insert(2, "pareto_rank", pareto["pareto_rank"])
            frame = pd.concat([frame, pareto[[o.name for o in self.objectives[1:]]]], axis=1)
            keys, ascending = ["pareto_rank", *keys], [True, *ascending]
        frame = frame.sort_values(keys, ascending=ascending, na_position="last", kind="stable")
        ranks = pd.Series(range(1, len(frame) + 1), index=frame.index, dtype="Int64")
        frame.insert(0, "rank", ranks.where(frame[keys[0]].notna()))
        return frame.reset_index(drop=True)

    def table(self, top: Optional[int] = None) -> pd.DataFrame:
        """The ranked trials as the CLI shows them: rank, id, status, params, epochs, best and last value;
        with objectives also the Pareto rank and the other objectives' values."""
        frame = self.ranked()
        own = self.by_objectives()
        cols = ["rank", *(["pareto_rank"] if own else []), "trial_id", "status", *self.params, "epochs",
                f"best_{self.metric}", "best_epoch", f"last_{self.metric}",
                *([o.name for o in self.objectives[1:]] if own else [])]
        return frame[cols].head(top) if top else frame[cols]

    @property
    def errors(self) -> Dict[str, str]:
        """trial id -> first line of its error, for trials that raised."""
        return {t.trial_id: t.error or "" for t in self._trials if t.status == "ERROR"}

    @property
    def trial_count(self) -> int:
        """The trials that have started."""
        return len(self._trials)

    @property
    def unstarted(self) -> int:
        """Trials an interrupted sweep has not started yet: the planned ones minus the recorded ones."""
        return 0 if self.finished else max(0, self._planned() - len(self._trials))

    def _planned(self) -> int:
        grid = [len(d.values) for d in self.space.values() if d.dist == "grid"]
        return int(self.config.get("iterations", 1)) * math.prod(grid)

    def status_counts(self) -> Dict[str, int]:
        """Trial status (Ray's: TERMINATED, ERROR, RUNNING, PENDING, PAUSED) -> number of trials;
        trials not started yet count as PENDING."""
        counts: Dict[str, int] = {}
        for trial in self._trials:
            counts[trial.status] = counts.get(trial.status, 0) + 1
        if self.unstarted:
            counts["PENDING"] = counts.get("PENDING", 0) + self.unstarted
        return dict(sorted(counts.items()))

    @property
    def finished(self) -> bool:
        """Every trial has ended. False while running, and for an interrupted experiment (resumable)."""
        if layout.is_finished(self.path):
            return True
        return len(self._trials) >= self._planned() and all(t.status in ENDED for t in self._trials)

    @property
    def status(self) -> str:
        if self.finished:
            return "finished"
        return "stopped by budget" if layout.stopped_by_budget(self.path) else "unfinished"

    def best(self, metric: Optional[str] = None, mode: Optional[str] = None) -> Optional[pd.Series]:
        """The best trial's row (by its best value of ``metric`` over its validated epochs), or None. With
        objectives, the experiment's own best is the trial its ``select`` rule picks (objectives.select),
        None if no trial meets it."""
        metric, mode = self.resolve(metric, mode)
        if self.by_objectives(metric, mode):
            chosen = objectives.select(self.pareto(), self.objectives, self.constraints)
            return None if chosen is None else self.dataframe(metric, mode).loc[chosen]
        frame = self.dataframe(metric, mode).dropna(subset=[f"best_{metric}"])
        if frame.empty:
            return None
        return frame.loc[best_index(frame[f"best_{metric}"], mode)]

    @property
    def select_rule(self) -> str:
        """How the best trial is chosen, in words."""
        if self.objectives:
            return objectives.rule(self.objectives, self.constraints)
        return f"the {'lowest' if lower_is_better(self.mode) else 'highest'} best {self.metric}"

    def best_hyperparameters(self) -> Optional[dict]:
        """Flat Ultralytics train arguments: the fixed ones plus the best trial's sampled values."""
        best = self.best()
        if best is None:
            return None
        fixed = {k: v for k, v in OmegaConf.to_container(self.config.train, resolve=True).items() if v is not None}
        sampled = {p: python_scalar(best[p]) for p in self.params}
        data_yaml = self.job_data_yaml()
        return {"model": self.config.model.weights, **({"data": data_yaml} if data_yaml else {}), **fixed, **sampled}

    def job_data_yaml(self) -> Optional[str]:
        """The absolute data YAML the trials trained on (from a trial's Ultralytics args.yaml)."""
        for args in sorted(self.path.glob("trial_*/train/args.yaml")):
            try:
                return yaml.safe_load(args.read_text()).get("data")
            except (OSError, yaml.YAMLError, AttributeError):
                continue
        return None

    @property
    def result_grid(self):
        """Ray's ResultGrid for the experiment (as ``Tuner.restore(...).get_results()``), ranked by ``metric``."""
        from ray.tune import ExperimentAnalysis, ResultGrid

        return ResultGrid(ExperimentAnalysis(str(self.path), default_metric=self.metric, default_mode=self.mode))


def load(path, metric: Optional[str] = None, mode: Optional[str] = None) -> ExperimentResults:
    """An experiment's results from its directory (``<storage>/<name>``), finished or not. For an
    experiment in an object store (``s3://bucket/prefix/name``) its small files (not checkpoints or
    weights) are downloaded to ``$YOLOTUNE_CACHE`` (default ``~/.cache/yolotune``) and ``path`` is that
    local copy: plots and reports written through this object go there.

    Raises FileNotFoundError for a directory that is not an experiment, UnreadableExperiment for
    one whose saved config or trial record cannot be used, ValueError for a bad ``mode``.
    """
    return ExperimentResults(path, metric, mode)


def _read_config(exp_dir: Path):
    """The saved config, with what results need checked: a damaged file is one line, not a traceback."""
    config_file = exp_dir / layout.SAVED_CONFIG
    if not config_file.is_file():
        raise FileNotFoundError(f"{exp_dir} is not a yolotune experiment (no {layout.SAVED_CONFIG})")
    try:
        raw = yaml.safe_load(config_file.read_text(errors="replace"))
    except yaml.YAMLError as e:
        raise UnreadableExperiment(f"{config_file}: not YAML: {' '.join(str(e).split())}") from None
    problem = _config_problem(raw)
    if problem:
        raise UnreadableExperiment(f"{config_file}: {problem}")
    raw = {k: v for k, v in raw.items() if k not in ("defaults", "hydra")}
    try:
        parse_space(raw["space"])
    except ConfigError as e:
        raise UnreadableExperiment(f"{config_file}: {e}") from None
    return OmegaConf.create(raw)


def _config_problem(raw) -> Optional[str]:
    if not isinstance(raw, dict):
        return "empty" if raw is None else f"not a mapping but {type(raw).__name__}"
    if not isinstance(raw.get("metric"), str) or raw.get("mode") not in ("min", "max"):
        return "no metric, or mode not min/max"
    for key in ("space", "train", "model"):
        if not isinstance(raw.get(key), dict):
            return f"no {key} mapping"
    if not isinstance(raw.get("iterations", 1), int):
        return f"iterations={raw['iterations']!r}: not a number"
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def python_scalar(value):
    """A numpy scalar as the Python number it holds (for YAML and JSON)."""
    return value.item() if hasattr(value, "item") else value

