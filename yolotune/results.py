"""Results of an experiment, finished, running or interrupted: read from its directory alone.

``load(path)`` needs no running Ray and no live driver: it reads Ray's experiment state for the
trial list and statuses, and each trial's ``result.json`` for its per-epoch history.
"""

from __future__ import annotations

import json
from functools import cached_property
from pathlib import Path
from typing import Dict, List, Optional

import pandas as pd
import yaml
from omegaconf import OmegaConf

from yolotune.experiment import SAVED_CONFIG, write_atomic


class ExperimentResults:
    def __init__(self, path, metric: Optional[str] = None, mode: Optional[str] = None):
        self.path = Path(path).expanduser().resolve()
        if not (self.path / SAVED_CONFIG).is_file():
            raise FileNotFoundError(f"{self.path} is not a yolotune experiment (no {SAVED_CONFIG})")
        self.config = OmegaConf.load(self.path / SAVED_CONFIG)
        self.metric = metric or self.config.metric
        self.mode = mode or self.config.mode

    @cached_property
    def result_grid(self):
        """Ray's ResultGrid for the experiment (as ``Tuner.restore(...).get_results()``)."""
        from ray.tune import ExperimentAnalysis, ResultGrid

        return ResultGrid(ExperimentAnalysis(str(self.path)))

    @cached_property
    def _trials(self) -> List[dict]:
        """One dict per trial: id, status and sampled config, from Ray's saved experiment state."""
        states = sorted(self.path.glob("experiment_state-*.json"))
        trials = {}
        if states:
            for state_json, _ in json.loads(states[-1].read_text())["trial_data"]:
                state = json.loads(state_json)
                trials[state["trial_id"]] = {"trial_id": state["trial_id"], "status": state["status"],
                                             "config": _plain(state.get("config", {}))}
        for params in self.path.glob("trial_*/params.json"):  # trials started after the last state save
            trial_id = params.parent.name.removeprefix("trial_")
            trials.setdefault(trial_id, {"trial_id": trial_id, "status": "RUNNING",
                                         "config": json.loads(params.read_text())})
        return sorted(trials.values(), key=lambda t: t["trial_id"])

    def trial_dir(self, trial_id: str) -> Path:
        from yolotune.trainable import trial_dirname

        return self.path / trial_dirname(trial_id)

    def history(self) -> pd.DataFrame:
        """One row per reported epoch of every trial."""
        frames = []
        for trial in self._trials:
            result_file = self.trial_dir(trial["trial_id"]) / "result.json"
            lines = result_file.read_text().splitlines() if result_file.is_file() else []
            rows = [json.loads(line) for line in lines if line.strip()]
            if rows:
                frame = pd.json_normalize(rows, sep="/").drop(columns=["config"], errors="ignore", level=None)
                frame = frame[[c for c in frame.columns if not c.startswith("config/")]]
                frame["trial_id"] = trial["trial_id"]
                frames.append(frame)
        return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["trial_id", "epoch"])

    @property
    def params(self) -> List[str]:
        return list(self.config.space.keys())

    def dataframe(self) -> pd.DataFrame:
        """One row per trial: id, status, sampled params, epochs run, last and best metric, node, error."""
        history = self.history()
        rows = []
        for trial in self._trials:
            trial_id = trial["trial_id"]
            runs = history[history.trial_id == trial_id] if len(history) else history
            values = runs[self.metric] if self.metric in runs else pd.Series(dtype=float)
            best = (values.max() if self.mode == "max" else values.min()) if len(values) else None
            rows.append({
                "trial_id": trial_id, "status": trial["status"],
                **{p: trial["config"].get(p) for p in self.params},
                "epochs": int(runs["epoch"].max()) if len(runs) else 0,
                f"last_{self.metric}": values.iloc[-1] if len(values) else None,
                f"best_{self.metric}": best,
                "hostname": runs["hostname"].iloc[-1] if "hostname" in runs and len(runs) else None,
                "node_id": runs["node_id"].iloc[-1] if "node_id" in runs and len(runs) else None,
                "error": self.errors.get(trial_id),
            })
        return pd.DataFrame(rows)

    @cached_property
    def errors(self) -> Dict[str, str]:
        """trial id -> first line of its error, for trials that raised."""
        found = {}
        for trial in self._trials:
            error_file = self.trial_dir(trial["trial_id"]) / "error.txt"
            if trial["status"] == "ERROR" and error_file.is_file():
                found[trial["trial_id"]] = _error_line(error_file.read_text())
        return found

    def best(self, metric: Optional[str] = None, mode: Optional[str] = None) -> Optional[pd.Series]:
        """The best trial's row (by its best value of ``metric`` over all epochs), or None."""
        metric, mode = metric or self.metric, mode or self.mode
        frame = self.dataframe() if metric == self.metric else ExperimentResults(self.path, metric, mode).dataframe()
        frame = frame.dropna(subset=[f"best_{metric}"])
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
        frame = self.dataframe()
        write_atomic(self.path / "trials.csv", frame.to_csv(index=False))
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

    def summary(self, top: int = 5) -> str:
        frame = self.dataframe()
        counts = frame["status"].value_counts().to_dict() if len(frame) else {}
        lines = [f"Experiment {self.path}", "Trials: " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))]
        for trial_id, error in self.errors.items():
            lines.append(f"  ERROR {trial_id}: {error}")
        key = f"best_{self.metric}"
        ranked = frame.dropna(subset=[key]).sort_values(key, ascending=self.mode == "min")
        if len(ranked):
            cols = ["trial_id", "status", "epochs", key, *self.params]
            lines += [f"Top {min(top, len(ranked))} by {self.metric} ({self.mode}):",
                      ranked[cols].head(top).to_string(index=False, float_format=lambda v: f"{v:.4g}")]
            lines.append("Best hyperparameters: " + str(self.path / "best_hyperparameters.yaml"))
            lines.append("Best weights:         " + str(self.path / "best.pt"))
        lines.append("Trials table:         " + str(self.path / "trials.csv"))
        return "\n".join(lines)


def load(path, metric: Optional[str] = None, mode: Optional[str] = None) -> ExperimentResults:
    return ExperimentResults(path, metric, mode)


def write_results(exp_dir: Path) -> ExperimentResults:
    results = ExperimentResults(exp_dir)
    results.write()
    return results


def _plain(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("__")}


def _scalar(value):
    return value.item() if hasattr(value, "item") else value


def _error_line(text: str) -> str:
    """The exception line of a traceback (its last non-blank line), not 'Traceback (most recent...'."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[-1] if lines else ""
