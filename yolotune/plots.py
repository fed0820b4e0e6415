"""An experiment's plots, drawn off-screen on matplotlib's Agg canvas.

Figures are built without pyplot, so drawing them neither needs a display nor touches the backend or
the current figure of a notebook that calls ``results.plot()``. matplotlib is imported inside the
functions: ``import yolotune.results`` stays light.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Dict, Iterable

import pandas as pd

from yolotune.layout import write_atomic
from yolotune.results import better, lower_is_better, measured

KINDS = ("history", "params", "progress")
DPI = 110
BEST_COLOR = "black"
STAR = dict(marker="*", s=260, color="gold", edgecolor="black", linewidth=1, zorder=5)


def figure(results, kind: str, metric: str, mode: str):
    """The ``kind`` plot of ``results`` ranked by ``metric`` (``mode``), as a matplotlib Figure."""
    draw = {"history": _history, "params": _params, "progress": _progress}.get(kind)
    if draw is None:
        raise ValueError(f"plot kind {kind!r}: one of {', '.join(KINDS)}")
    return draw(results, metric, mode)


def save(results, directory: Path, kinds: Iterable[str], metric: str, mode: str) -> Dict[str, Path]:
    """``<directory>/<kind>.png`` for each kind, each written atomically; returns kind -> path."""
    paths = {}
    for kind in kinds:
        fig = figure(results, kind, metric, mode)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=DPI)
        paths[kind] = directory / f"{kind}.png"
        write_atomic(paths[kind], png.getvalue())
    return paths


def _new_figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _history(results, metric: str, mode: str):
    """The metric at every epoch of every trial that has it (validation metrics: the validated epochs; training
    losses: every epoch): early-stopped trials end early, the best is highlighted."""
    from matplotlib.lines import Line2D
    from matplotlib.ticker import MaxNLocator

    history, trials, best = results.history(), results.dataframe(metric, mode), results.best(metric, mode)
    reported = set(history.trial_id)
    shown = _count(len(trials), "trial") + ("" if len(reported) == len(trials) else f", {len(reported)} reported")
    title = f"{metric} per epoch of each trial ({shown}): experiment {results.path.name}"
    if best is None:
        return _empty(title, f"no trial has reported {metric} yet")
    fig = _new_figure(10, 5.5)
    ax = fig.add_subplot()
    ax.set_title(title)

    planned = max(int(results.config.train.get("epochs", 0)), int(history["epoch"].max()))
    status = dict(zip(trials.trial_id, trials.status))
    ids = [t for t in trials.trial_id if t in reported]
    few = len(ids) <= 10  # few trials: one colour and legend entry each; many: grey, only the best named
    colors = dict(zip(ids, _cycle(len(ids)))) if few else {}
    ends = set()
    by_trial = dict(tuple(measured(history, metric).groupby("trial_id", sort=False)))
    for trial_id in ids:
        runs = by_trial.get(trial_id)
        if runs is None:
            continue
        is_best = trial_id == best["trial_id"]
        color = BEST_COLOR if is_best else colors.get(trial_id, "0.6")
        label = f"{trial_id} (best)" if is_best else (trial_id if few else None)
        ax.plot(runs["epoch"], runs[metric], color=color, lw=3 if is_best else 1.4, alpha=1 if is_best else 0.85,
                marker="o" if len(runs) < 30 else None, ms=3.5, zorder=4 if is_best else 2, label=label)
        end = _end_kind(status[trial_id], int(runs["epoch"].iloc[-1]), planned)
        if end:
            ends.add(end)
            ax.plot(runs["epoch"].iloc[-1], runs[metric].iloc[-1], ls="", color=color, zorder=6, **_END_STYLE[end])
    ax.scatter(best["best_epoch"], best[f"best_{metric}"], **STAR,
               label=f"best: {best[f'best_{metric}']:.4g} at epoch {best['best_epoch']}")
    if not few:
        ax.plot([], [], color="0.6", lw=1.4, label=f"other trials ({len(ids) - 1})")
    handles = ax.get_legend_handles_labels()[0]
    handles += [Line2D([], [], ls="", color="0.3", **_END_STYLE[end], label=_END_LABEL[end]) for end in sorted(ends)]
    fig.legend(handles=handles, loc="outside right upper", fontsize=9)
    ax.set_xlim(0.6, planned + 0.4)  # the full planned run, so that trials stopped early visibly end early
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(f"epoch (of {planned} planned)")
    ax.set_ylabel(f"{metric} ({better(mode)})")
    ax.ticklabel_format(axis="y", useOffset=False)
    ax.grid(alpha=0.3)
    return fig


_END_STYLE = {"stopped": dict(marker="X", ms=10, mec="white", mew=0.8),
              "error": dict(marker="X", ms=12, mec="red", mew=1.5),
              "unfinished": dict(marker="o", ms=20, mfc="none", mew=1.5)}  # a ring, visible around the best's star
_END_LABEL = {"stopped": "stopped early by the scheduler", "error": "errored",
              "unfinished": "not finished (running or interrupted)"}


def _end_kind(status: str, last_epoch: int, planned: int):
    if status == "ERROR":
        return "error"
    if status != "TERMINATED":
        return "unfinished"
    return "stopped" if last_epoch < planned else None


def _params(results, metric: str, mode: str):
    """One scatter per tuned parameter: each trial's sampled value against its best metric."""
    space = results.space
    trials = results.dataframe(metric, mode)
    key = f"best_{metric}"
    scored = trials.dropna(subset=[key])
    title = (f"Best {metric} of each trial vs its sampled hyperparameters ({_count(len(scored), 'trial')}, "
             f"{better(mode)}): experiment {results.path.name}")
    if not space or scored.empty:
        return _empty(title, "no tuned parameters" if not space else f"no trial has reported {metric} yet")
    ncols = min(3, len(space))
    nrows = math.ceil(len(space) / ncols)
    fig = _new_figure(4.2 * ncols + 0.4, 3.4 * nrows + 1.0)
    axes = list(fig.subplots(nrows, ncols, squeeze=False, sharey=True).flat)
    fig.suptitle(title)
    best = results.best(metric, mode)
    for i, (ax, (name, dist)) in enumerate(zip(axes, space.items())):
        categorical = dist.values is not None
        # choice/grid values sit at their declared positions (as strings, 8 < 16 < 32 would sort as text)
        position = {str(v): k for k, v in enumerate(dist.values)} if categorical else None
        x = scored[name].map(lambda v: position.get(str(v))) if categorical else scored[name]
        ax.scatter(x, scored[key], s=40, color="tab:blue", alpha=0.8, edgecolor="white", label="trial")
        ax.scatter(position.get(str(best[name])) if categorical else best[name], best[key], **STAR,
                   label=f"best trial ({best['trial_id']})")
        if categorical:
            ax.set_xticks(range(len(dist.values)), [str(v) for v in dist.values])
            ax.set_xlim(-0.5, len(dist.values) - 0.5)
        log = dist.dist == "loguniform"
        if log:
            ax.set_xscale("log")
        if dist.low is not None:  # the whole searched range, to show where the samples fell in it
            ax.set_xlim(*_padded(dist.low, dist.high, log))
        ax.set_title(_dist_text(name, dist), fontsize=10)
        ax.set_xlabel(f"{name} (log scale)" if log else name)
        if i % ncols == 0:
            ax.set_ylabel(f"best {metric}")
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    for ax in axes[len(space):]:
        ax.set_visible(False)
    fig.legend(*fig.axes[0].get_legend_handles_labels(), loc="outside lower center", ncols=2, fontsize=9)
    return fig


def _padded(low: float, high: float, log: bool):
    if log:
        factor = (high / low) ** 0.04
        return low / factor, high * factor
    pad = 0.04 * (high - low)
    return low - pad, high + pad


def _dist_text(name: str, dist) -> str:
    if dist.values is not None:
        return f"{name} ~ {dist.dist}({dist.values})"
    q = f", {dist.q:g}" if dist.q is not None else ""
    return f"{name} ~ {dist.dist}({dist.low:g}, {dist.high:g}{q})"


def _progress(results, metric: str, mode: str):
    """Best-so-far metric as trials complete, by count and by wall time: is the search still improving?"""
    title = f"Search progress: best {metric} so far ({better(mode)}): experiment {results.path.name}"
    history = results.history()
    done = _completions(results, history, metric, mode)
    if done.empty:
        return _empty(title, f"no trial has reported {metric} yet")
    fig = _new_figure(11, 4.8)
    by_count, by_time = fig.subplots(1, 2, sharey=True)
    fig.suptitle(title)

    best_so_far = done["value"].cummin() if lower_is_better(mode) else done["value"].cummax()
    improved = best_so_far.ne(best_so_far.shift())
    scale, unit = _time_unit(done["elapsed"].max())
    for ax, x, xlabel in (
            (by_count, pd.Series(range(1, len(done) + 1)), "trials completed (in order of their last report)"),
            (by_time, done["elapsed"] / scale, f"wall time since the first trial started ({unit})")):
        ax.scatter(x, done["value"], s=30, color="0.65", label="a trial's best", zorder=2)
        ax.step(x, best_so_far, where="post", color="tab:blue", lw=2, label="best so far", zorder=3)
        ax.scatter(x[improved], best_so_far[improved], s=45, color="tab:blue", zorder=4, label="new best")
        ax.set_xlabel(xlabel)
        ax.ticklabel_format(axis="y", useOffset=False)
        ax.grid(alpha=0.3)
    by_count.xaxis.get_major_locator().set_params(integer=True)
    by_count.set_xlim(0.5, len(done) + 0.5)
    by_time.set_xlim(left=0)
    by_count.set_ylabel(metric)
    fig.legend(*by_count.get_legend_handles_labels(), loc="outside lower center", ncols=3, fontsize=9)
    return fig


def _completions(results, history: pd.DataFrame, metric: str, mode: str) -> pd.DataFrame:
    """One row per trial that reported ``metric``: its best value (the results' own, over its validated
    epochs) and when it last reported, in that order."""
    if metric not in history:
        return pd.DataFrame(columns=["trial_id", "value", "last", "elapsed"])
    trials = results.dataframe(metric, mode).set_index("trial_id")
    last = history.groupby("trial_id")["timestamp"].max()
    per_trial = pd.DataFrame({"value": trials[f"best_{metric}"], "last": last})
    per_trial = per_trial.dropna(subset=["value", "last"]).rename_axis("trial_id")
    per_trial["elapsed"] = per_trial["last"] - (history["timestamp"] - history["time_this_iter_s"]).min()
    return per_trial.sort_values(["last", "trial_id"]).reset_index()


def _time_unit(seconds: float):
    if seconds >= 3 * 3600:
        return 3600, "h"
    if seconds >= 3 * 60:
        return 60, "min"
    return 1, "s"


def _cycle(n: int):
    from matplotlib import colormaps

    return [colormaps["tab10"](i % 10) for i in range(n)]


def _empty(title: str, message: str):
    """A plot with nothing to draw yet still says what it is and why it is empty."""
    fig = _new_figure(9, 4)
    ax = fig.add_subplot()
    ax.set_title(title)
    ax.text(0.5, 0.5, message, ha="center", va="center", transform=ax.transAxes, fontsize=12, color="0.3")
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
