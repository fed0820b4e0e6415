"""What an experiment's results look like: the text summary, trials.csv and the HTML report.

``write_all`` (re)writes trials.csv, plots/*.png and report.html together; the runner calls it
when a sweep ends, and anything that wants the files fresh (the live view, as trials end) calls
it with the experiment dir or a loaded ``ExperimentResults``. ``yolotune results`` writes them only
when asked (``--plots``: trials.csv and the plots; ``--report``: everything).
"""

from __future__ import annotations

import base64
import html
import os
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Dict, List, Optional, Union

import pandas as pd
import yaml

from yolotune import layout, plots
from yolotune.importance import COUNTED, Importance, importance
from yolotune.results import ExperimentResults, better, load
from yolotune.storage import Location


def write_all(experiment: Union[str, Path, ExperimentResults], top: Optional[int] = None) -> Dict[str, Path]:
    """(Re)write trials.csv, plots/<kind>.png (plots.KINDS) and report.html, each atomically; returns
    name -> path (``trials_csv``, each plot's kind, ``report``).

    Plots and report rank by the results' metric; trials.csv keeps the experiment's own metric
    whatever another ranking says: other tools read its columns. Raises OSError if the directory
    is read-only.
    """
    results = experiment if isinstance(experiment, ExperimentResults) else load(experiment)
    written = write_plots(results)
    pngs = {kind: path for kind, path in written.items() if kind != "trials_csv"}
    return {**written, "report": write_report(results, pngs, top)}


def write_plots(results: ExperimentResults) -> Dict[str, Path]:
    """(Re)write trials.csv and plots/<kind>.png; returns name -> path (``trials_csv``, each plot's kind)."""
    own = results if results.metric == results.config.metric else load(results.path)
    return {"trials_csv": write_trials_csv(own), **plots.save(results)}


def live_refresh(uri: str, prune: bool = True) -> None:
    """What the live view runs as trials end, in a process of its own (``refresh_in_process``), for the
    experiment at ``uri`` (a directory or a store URI: the trials' files reach a store, not the driver):
    with ``prune``, the ended trials' weights pruned by ``checkpoint.keep`` (retention.py), then
    ``write_all``, its files written back there."""
    from yolotune import retention

    location = Location(uri)
    results = load(location.download())
    if prune:
        retention.prune(results, location, retention.configured_keep(results))
    location.upload(*write_all(results).values())


def refresh_in_process(uri: str, prune: bool = True) -> None:
    """``live_refresh(uri, prune)`` in a Python process of its own: at thousands of trials it takes
    seconds of CPU that the driver's interpreter (its event handling) must not share. Raises
    RuntimeError with the process's last line of error output if it fails."""
    # yolotune as this process imported it, whatever the working directory (Hydra may have changed it)
    path = os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]), os.environ.get("PYTHONPATH")) if p)
    proc = subprocess.run([sys.executable, "-c", "import sys; from yolotune.report import live_refresh; "
                           "live_refresh(sys.argv[1], sys.argv[2] == 'prune')", uri, "prune" if prune else "keep"],
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": path})
    if proc.returncode:
        lines = proc.stderr.strip().splitlines() or [f"exit code {proc.returncode}"]
        raise RuntimeError(lines[-1])


def write_trials_csv(results: ExperimentResults) -> Path:
    """trials.csv: ``results.dataframe()`` in trial order, with objectives also each objective's value, the
    Pareto rank and how the latency was measured (``results.pareto()``), written atomically."""
    target = results.path / layout.TRIALS_CSV
    frame = results.dataframe()
    if results.objectives:
        frame = frame.merge(results.pareto(), on="trial_id", how="left", validate="one_to_one")
    layout.write_atomic(target, frame.to_csv(index=False))
    return target


def write_report(results: ExperimentResults, pngs: Dict[str, Path], top: Optional[int] = None) -> Path:
    """report.html: status, errors, the ranked table, the best config and the plots ``pngs``, embedded
    so that the page is one self-contained file."""
    target = results.path / layout.REPORT
    layout.write_atomic(target, report_html(results, pngs, top))
    return target


def summary(results: ExperimentResults, top: int = 5) -> str:
    """What the runner prints when a sweep ends: status, the best ``top`` trials and where the files are."""
    lines = [*overview(results), *ranking(results, top)]
    path = results.path
    lines += rule_line(results) + latency_lines(results)
    if results.best() is not None:
        lines.append(f"Best hyperparameters: {path / layout.BEST_HYPERPARAMETERS}")
        lines.append(f"Best weights:         {path / layout.BEST_WEIGHTS}")
    lines.append(f"Trials table:         {path / layout.TRIALS_CSV}")
    lines.append(f"Plots and report:     {path / layout.PLOTS_DIR}, {path / layout.REPORT}")
    return "\n".join(lines)


def details(results: ExperimentResults, top: Optional[int], written: Dict[str, Path]) -> str:
    """``yolotune results EXP``'s table output: overview, ranking, the best config, the files written."""
    lines = [*overview(results), "", *ranking(results, top), "", *rule_line(results), *latency_lines(results)]
    best = results.best()
    if best is not None:
        metric = results.metric
        lines += [f"Best trial: {best['trial_id']}: {metric} {best[f'best_{metric}']:.6g} "
                  f"at epoch {best['best_epoch']}, in {results.trial_dir(best['trial_id'])}",
                  "Best config (Ultralytics train arguments):",
                  _indent(yaml.safe_dump(results.best_hyperparameters(), sort_keys=False)), ""]
    lines += [*importance_lines(importance(results)), ""]
    lines += [f"Wrote {p}" for p in written.values()] or \
        [f"Plots and report: --plots writes {layout.TRIALS_CSV} and {layout.PLOTS_DIR}/*.png, --report those and "
         f"{layout.REPORT}"]
    return "\n".join(lines)


def rule_line(results: ExperimentResults) -> List[str]:
    """With objectives: how the best trial (best_hyperparameters.yaml, best.pt) is chosen."""
    if not results.objectives:
        return []
    if results.best() is not None:
        return [f"Best trial: {results.select_rule}"]
    nobody = "no trial met it, so no best weights or hyperparameters" if results.finished else "no trial meets it yet"
    return [f"Best trial: {results.select_rule}: {nobody}"]


def latency_lines(results: ExperimentResults) -> List[str]:
    """With a latency objective: how the trials' latency was measured, and which ended trials wait for it."""
    if not results.measures_latency:
        return []
    methods = results.pareto()["latency_method"].dropna().unique()
    lines = [f"latency_ms measured {method}" for method in methods]
    waiting = results.latency_unmeasured
    if waiting:
        lines.append(f"latency_ms not measured yet for {layout.count(len(waiting), 'ended trial')} "
                     f"({', '.join(waiting)}), without a Pareto rank till then: measured alone once the run's trials "
                     "have ended (after an interrupted run, by the next resume=true)")
    return lines


def overview(results: ExperimentResults) -> List[str]:
    counts = results.status_counts()
    lines = [f"Experiment {results.path}  ({results.status})",
             f"Trials: {sum(counts.values())}" + (f" ({counts_text(counts)})" if counts else "")]
    return lines + [f"  ERROR {trial_id}: {error}" for trial_id, error in results.errors.items()]


def ranking(results: ExperimentResults, top: Optional[int]) -> List[str]:
    table = results.table(top)
    shown = f", top {len(table)} of {results.trial_count}" if len(table) < results.trial_count else ""
    by = f"Pareto rank of {', '.join(f'{o.name} ({o.mode})' for o in results.objectives)}, then best " \
        if results.objectives else "best "
    return [f"Trials ranked by {by}{results.metric} ({better(results.mode)}){shown}:",
            format_table(table) if len(table) else "  (no trials yet)", *unmeasured_line(results)]


def unmeasured_line(results: ExperimentResults) -> List[str]:
    """Trials that have run, none with a value of the metric yet: early in a sweep, before any validated epoch."""
    frame = results.dataframe()
    if not (frame["epochs"] > 0).any() or frame[f"best_{results.metric}"].notna().any():
        return []
    when = " (trials validate at the epochs their scheduler decides on, and at the last: validate=decisions)" \
        if results.config.get("validate", "decisions") == "decisions" else ""
    return [f"{results.metric}: not measured yet: no trial has validated an epoch{when}"]


def importance_lines(judged: Importance) -> List[str]:
    """The parameters' importance as a table, or why there is none."""
    head = f"Parameter importance for best {judged.metric} ({judged.method}, {judged.trials} trials)"
    if judged.reason:
        return [f"{head}: {judged.reason}"]
    frame = pd.DataFrame({"parameter": list(judged.values), "importance": list(judged.values.values())})
    return [f"{head}:", format_table(frame), f"(counted: {COUNTED}" + (f"; {judged.sampled})" if judged.sampled
                                                                        else ")")]


def counts_text(counts: Dict[str, int]) -> str:
    return ", ".join(f"{n} {status}" for status, n in counts.items())


def format_table(frame: pd.DataFrame) -> str:
    frame = frame.copy()
    for col in frame.columns[frame.dtypes == "Int64"]:  # to_string's na_rep skips nullable ints' <NA>
        frame[col] = frame[col].map(lambda v: "-" if pd.isna(v) else str(v))
    return frame.to_string(index=False, na_rep="-", float_format=lambda v: f"{v:.4g}")


def report_html(results: ExperimentResults, pngs: Dict[str, Path], top: Optional[int]) -> str:
    esc = html.escape
    counts = counts_text(results.status_counts()) or "no trials yet"
    errors = "".join(f"<li><code>{esc(t)}</code>: {esc(e)}</li>" for t, e in results.errors.items())
    best_hp = results.best_hyperparameters()
    table = results.table(top).to_html(index=False, na_rep="", float_format=lambda v: f"{v:.4g}", border=0)
    judged = importance(results)
    ranked = "".join(f"<tr><td>{esc(name)}</td><td>{value:.3f}</td></tr>" for name, value in judged.values.items())
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
{results.status if results.status != 'unfinished' else 'unfinished (running or interrupted)'}; trials: {esc(counts)}<br>
ranked by {f"Pareto rank of {esc(', '.join(o.name for o in results.objectives))}, then " if results.objectives
           else ""}best <b>{esc(results.metric)}</b> ({better(results.mode)}); best trial: {esc(results.select_rule)};
report written {datetime.now():%Y-%m-%d %H:%M:%S}{freshness(results)}</p>
{"".join(f"<p>{esc(line)}</p>" for line in latency_lines(results))}
<h2>Errors</h2>{f'<ul>{errors}</ul>' if errors else '<p>none</p>'}
<h2>Trials</h2>{table}
<h2>Parameter importance</h2>
<p>For best <b>{esc(judged.metric)}</b> by {esc(judged.method)}, over {judged.trials} trials; counted: {esc(COUNTED)}{
 f"; {esc(judged.sampled)}" if judged.sampled else ""}.
Each parameter's share of the variance of the metric across trials (they sum to 1).</p>
{f'<table><tr><th>parameter</th><th>importance</th></tr>{ranked}</table>' if ranked else
 f'<p>Importance {esc(judged.reason or "")}.</p>'}
<h2>Best config</h2>
<pre>{esc(yaml.safe_dump(best_hp, sort_keys=False)) if best_hp else 'no trial has reported yet'}</pre>
<h2>Plots</h2>{images}
</body></html>
"""


def freshness(results: ExperimentResults) -> str:
    """How fresh a running experiment's page is: the newest epoch it holds, and when the live view
    writes the next one (it refreshes as trials end, at most as often as REFRESH_NOTE says)."""
    if results.finished or results.history().empty or "timestamp" not in results.history():
        return ""
    newest = datetime.fromtimestamp(float(results.history()["timestamp"].max()))
    return f", from the trials' epochs up to {newest:%Y-%m-%d %H:%M:%S}; {REFRESH_NOTE}"


REFRESH_NOTE = "while the experiment runs this page is rewritten as trials end, each rewrite waiting nine " \
               "times as long as the last one took (reload it)"


def _indent(text: str) -> str:
    return "\n".join("  " + line for line in text.rstrip().splitlines())
