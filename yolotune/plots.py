"""An experiment's plots, drawn off-screen on matplotlib's Agg canvas.

Figures are built without pyplot, so drawing them neither needs a display nor touches the backend or
the current figure of a notebook that calls ``plots.save(results)``. matplotlib is imported inside the
functions: importing this module stays light.
"""

from __future__ import annotations

import io
import math
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Tuple

import pandas as pd

from yolotune.importance import COUNTED, importance
from yolotune.layout import PLOTS_DIR, count, write_atomic
from yolotune.results import ExperimentResults, better, lower_is_better, measured

KINDS = ("history", "params", "progress", "parallel", "importance")
PARETO = "pareto"  # an experiment with objectives has this plot too (kinds_of())
DPI = 110
BEST_COLOR = "black"
STAR = dict(marker="*", s=260, color="gold", edgecolor="black", linewidth=1, zorder=5)
MARKED_LINES = 200  # parallel coordinates: past this many trials, lines without markers
LABEL_CHARS = 32  # longer parameter names are shortened in the middle on axes, where they would crowd


def figure(results: ExperimentResults, kind: str, metric: Optional[str] = None, mode: Optional[str] = None):
    """The ``kind`` plot of ``results`` ranked by ``metric`` (default: the results' own; ``mode``: its
    mode, or guessed from the name), as a matplotlib Figure (not saved)."""
    draw = {"history": _history, "params": _params, "progress": _progress, "parallel": _parallel,
            "importance": _importance, PARETO: _pareto}.get(kind)
    if draw is None:
        raise ValueError(f"plot kind {kind!r}: one of {', '.join(KINDS)}, {PARETO}")
    return draw(results, *results.resolve(metric, mode))


def save(results: ExperimentResults, kinds: Optional[Iterable[str]] = None, metric: Optional[str] = None,
         mode: Optional[str] = None, directory=None) -> Dict[str, Path]:
    """``<kind>.png`` for each of ``kinds`` (default: ``kinds_of(results)``) in ``directory`` (default: the experiment's
    plots/), each written atomically; returns kind -> path."""
    directory = Path(directory) if directory is not None else results.path / PLOTS_DIR
    paths = {}
    for kind in kinds or kinds_of(results):
        fig = figure(results, kind, metric, mode)
        png = io.BytesIO()
        fig.savefig(png, format="png", dpi=DPI)
        paths[kind] = directory / f"{kind}.png"
        write_atomic(paths[kind], png.getvalue())
    return paths


def kinds_of(results: ExperimentResults) -> Tuple[str, ...]:
    """The plots of ``results``: KINDS, and the Pareto plot of an experiment with objectives."""
    return KINDS + ((PARETO,) if results.objectives else ())


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
    shown = count(len(trials), "trial") + ("" if len(reported) == len(trials) else f", {len(reported)} reported")
    title = f"{metric} per epoch of each trial ({shown}): experiment {results.path.name}"
    if trials[f"best_{metric}"].isna().all():
        return _empty(title, f"no trial has reported {metric} yet")
    fig = _new_figure(10, 5.5)
    ax = fig.add_subplot()
    ax.set_title(title)

    planned = max(int(results.config.train.get("epochs", 0)), int(history["epoch"].max()))
    status = dict(zip(trials.trial_id, trials.status))
    ids = [t for t in trials.trial_id if t in reported]
    few = len(ids) <= 10  # few trials: one colour and legend entry each; many: grey, only the best named
    colors = dict(zip(ids, _cycle(len(ids)))) if few else {}
    ends: Dict[str, list] = {}  # the grey trials' ends, drawn at once per kind: thousands of trials stay quick
    by_trial = dict(tuple(measured(history, metric).groupby("trial_id", sort=False)))
    for trial_id in ids:
        runs = by_trial.get(trial_id)
        if runs is None:
            continue
        is_best = best is not None and trial_id == best["trial_id"]  # None: no trial meets select
        color = BEST_COLOR if is_best else colors.get(trial_id, "0.6")
        label = f"{trial_id} (best)" if is_best else (trial_id if few else None)
        epochs, values = runs["epoch"].to_numpy(), runs[metric].to_numpy()
        ax.add_line(Line2D(epochs, values, color=color, lw=3 if is_best else 1.4, alpha=1 if is_best else 0.85,
                           marker="o" if len(runs) < 30 else None, ms=3.5, zorder=4 if is_best else 2, label=label))
        end = _end_kind(status[trial_id], int(epochs[-1]), planned)
        if end:
            ends.setdefault(end, [])
            if few or is_best:
                ax.plot(epochs[-1], values[-1], ls="", color=color, zorder=6, **_END_STYLE[end])
            else:
                ends[end].append((epochs[-1], values[-1]))
    for end, points in ends.items():
        if points:
            ax.plot(*zip(*points), ls="", color="0.6", zorder=5, **_END_STYLE[end])
    ax.autoscale_view()
    if best is not None:
        ax.scatter(best["best_epoch"], best[f"best_{metric}"], **STAR,
                   label=f"best: {best[f'best_{metric}']:.4g} at epoch {best['best_epoch']}")
    if not few:
        ax.plot([], [], color="0.6", lw=1.4, label=f"other trials ({len(ids) - (best is not None)})")
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
    title = (f"Best {metric} of each trial vs its sampled hyperparameters ({count(len(scored), 'trial')}, "
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
        if best is not None:
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


def _parallel(results, metric: str, mode: str):
    """Parallel coordinates: each trial with a value of the metric is one line through its sampled value
    on each tuned parameter's axis and its best metric on the last, coloured by that metric."""
    from matplotlib import colormaps
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize
    from matplotlib.lines import Line2D

    key = f"best_{metric}"
    scored = results.dataframe(metric, mode).dropna(subset=[key])
    title = (f"Trials in parallel coordinates ({count(len(scored), 'trial')} with a value of {metric}, "
             f"{better(mode)})\nexperiment {results.path.name}")
    if scored.empty:
        return _empty(title, f"no trial has reported {metric} yet")
    table = parallel_table(results, metric, mode)
    axes = list(table.columns)
    fig = _new_figure(max(8.0, 1.1 * len(axes) + 2.5), 5.5)
    ax = fig.add_subplot()
    ax.set_title(title)
    values = scored.set_index("trial_id")[key]
    low, high = _span(values.min(), values.max())
    cmap = colormaps["viridis_r" if lower_is_better(mode) else "viridis"]  # better: brighter
    norm = Normalize(low, high)
    best = getattr(results.best(metric, mode), "trial_id", None)
    # worst first, so that the better trials' lines are drawn on top
    order = values.sort_values(ascending=not lower_is_better(mode), kind="stable").index
    places, colors = table.loc[order].to_numpy(), cmap(norm(values[order].to_numpy()))
    marker = "o" if len(order) <= MARKED_LINES else None  # thousands of markers: seconds to draw, a blur to read
    for trial_id, ys, color in zip(order, places, colors):
        is_best = trial_id == best
        ax.add_line(Line2D(range(len(axes)), ys, color=color, gid=trial_id, lw=2.8 if is_best else 1.2,
                           alpha=1 if is_best else 0.75, zorder=3 if is_best else 2, marker=marker, ms=3))
    for x, column in enumerate(axes):
        ax.vlines(x, 0, 1, color="0.25", lw=1, zorder=1)
        for position, text in table.attrs["ticks"][column]:
            ax.text(x + 0.04, position, text, fontsize=7, va="center", color="0.2", zorder=4,
                    bbox=dict(boxstyle="square,pad=0.1", fc="white", ec="none", alpha=0.7))
    names = [_short(c) + (" (log)" if c in table.attrs["log"] else "") for c in axes]
    ax.set_xticks(range(len(axes)), names, rotation=30 if len(axes) > 5 else 0,
                  ha="right" if len(axes) > 5 else "center", rotation_mode="anchor", fontsize=9)
    ax.set_xlim(-0.3, len(axes) - 0.4)
    ax.set_ylim(-0.04, 1.04)
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    fig.colorbar(ScalarMappable(norm, cmap), ax=ax, label=f"best {metric} ({better(mode)}); thick: best trial")
    return fig


def parallel_table(results, metric: str, mode: str) -> pd.DataFrame:
    """What the parallel-coordinates plot draws: per trial with a value of ``metric`` (index: trial id),
    its place in [0, 1] on each tuned parameter's axis and on the metric's (the last column). A range
    parameter's axis spans its searched range (log-spaced for loguniform), a choice's has its values
    evenly spaced in their declared order (each widened to every sampled value), the metric's spans the
    values. ``attrs``: each axis's ticks
    [(place, text)], and the log axes."""
    key = f"best_{metric}"
    scored = results.dataframe(metric, mode).dropna(subset=[key]).set_index("trial_id")
    table, ticks, log = pd.DataFrame(index=scored.index), {}, []
    for name, dist in results.space.items():
        dist = dist.covering(scored[name])
        if dist.values is not None:
            table[name], ticks[name] = _choice_axis(dist.values, scored[name])
            continue
        table[name], ticks[name] = _range_axis(dist.low, dist.high, scored[name].astype(float),
                                               dist.dist == "loguniform")
        if dist.dist == "loguniform":
            log.append(name)
    column = f"best {metric}"
    table[column], ticks[column] = _range_axis(*_span(scored[key].min(), scored[key].max()), scored[key], False)
    table.attrs.update(ticks=ticks, log=log)
    return table


def _choice_axis(values: list, sampled: pd.Series) -> Tuple[pd.Series, List[tuple]]:
    """The values evenly spaced in their order, matched by their text (8 < 16 < 32 would sort otherwise)."""
    labels = [str(v) for v in values]
    places = {label: k / (len(labels) - 1) if len(labels) > 1 else 0.5 for k, label in enumerate(labels)}
    every = math.ceil(len(labels) / 12)  # at most a dozen labels on one axis
    return sampled.map(lambda v: places[str(v)]), [(places[t], t) for t in labels[::every]]


def _range_axis(low: float, high: float, sampled: pd.Series, log: bool) -> Tuple[pd.Series, List[tuple]]:
    scale = (lambda v: (math.log(v) - math.log(low)) / (math.log(high) - math.log(low))) if log \
        else (lambda v: (v - low) / (high - low))
    at = [low * (high / low) ** t if log else low + t * (high - low) for t in (0, 0.25, 0.5, 0.75, 1)]
    return sampled.map(scale), [(scale(v), f"{v:.3g}") for v in at]


def _span(low: float, high: float) -> Tuple[float, float]:
    """[low, high], widened around a single value, which would otherwise be an axis of no length."""
    if low < high:
        return low, high
    pad = abs(low) * 0.05 or 0.5
    return low - pad, high + pad


def _importance(results, metric: str, mode: str):
    """One bar per tuned parameter: its importance for the best metric, the method named."""
    judged = importance(results, metric, mode)
    title = (f"Parameter importance for best {metric}: {judged.method}, {count(judged.trials, 'trial')}\n"
             f"experiment {results.path.name}")
    if judged.reason:
        return _empty(title, f"Importance {judged.reason}")
    names = list(judged.values)[::-1]  # the most important at the top
    fig = _new_figure(9, 1.8 + 0.32 * len(names))
    ax = fig.add_subplot()
    ax.set_title(title)
    bars = [judged.values[n] for n in names]
    ax.barh(range(len(names)), bars, color="tab:blue")
    for y, value in enumerate(bars):
        ax.text(value, y, f" {value:.2f}", va="center", fontsize=8)
    ax.set_yticks(range(len(names)), [_short(n) for n in names], fontsize=9)
    ax.set_xlim(0, max(1.0, max(bars)) * 1.08)
    counted = COUNTED.replace("; ", ";\n")  # narrow enough beside long parameter names
    ax.set_xlabel(f"share of the variance of best {metric} that each parameter explains (sums to 1)\n"
                  f"counted: {counted}" + (f"\n{judged.sampled}" if judged.sampled else ""), fontsize=8)
    ax.grid(axis="x", alpha=0.3)
    return fig


def _pareto(results, metric: str, mode: str):
    """The trials by their objectives: the first (y) against each other one (x), the Pareto front (rank 1)
    highlighted, the selected trial starred, select's bounds drawn."""
    objectives = results.objectives
    names = ", ".join(o.name for o in objectives) or "no objectives"
    title = f"Pareto front of {names}: experiment {results.path.name}"
    if not objectives:
        return _empty(title, "the experiment has one objective (metric); set objectives=[...] for several")
    values = results.pareto().dropna(subset=["pareto_rank"])
    if values.empty:
        return _empty(title, "no trial has a value of every objective yet")
    first, others = objectives[0], objectives[1:]
    fig = _new_figure(5.2 * len(others) + 1.5, 5)
    fig.suptitle(f"{title}\n{count(len(values), 'trial')}; best: {results.select_rule}")
    best = results.best()
    front, dominated = values[values.pareto_rank == 1], values[values.pareto_rank != 1]
    for ax, other in zip(fig.subplots(1, len(others), squeeze=False)[0], others):
        ax.scatter(dominated[other.name], dominated[first.name], s=40, color="0.6", gid="dominated",
                   label=f"dominated ({len(dominated)})")
        ax.scatter(front[other.name], front[first.name], s=60, color="tab:red", edgecolor="black", zorder=3,
                   gid="front", label=f"Pareto front, rank 1 ({len(front)})")
        if len(others) == 1:  # with two objectives the front is a line
            line = front.sort_values(other.name)
            ax.plot(line[other.name], line[first.name], color="tab:red", alpha=0.5, zorder=2)
        for constraint in results.constraints:
            if constraint.name in (first.name, other.name):
                (ax.axhline if constraint.name == first.name else ax.axvline)(
                    constraint.bound, color="tab:blue", ls="--", label=f"select: {constraint}")
        if best is not None:
            chosen = values[values.trial_id == best["trial_id"]]
            ax.scatter(chosen[other.name], chosen[first.name], **STAR, label=f"best ({best['trial_id']})")
        ax.set_xlabel(f"{other.name} ({better(other.mode)})")
        ax.set_ylabel(f"best {first.name} ({better(first.mode)})")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    return fig


def _short(name: str) -> str:
    if len(name) <= LABEL_CHARS:
        return name
    half = (LABEL_CHARS - 1) // 2
    return f"{name[:half]}…{name[-half:]}"


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

