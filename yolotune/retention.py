"""Which trials keep their weights: ``checkpoint.keep``, so that a long sweep's disk use is bounded.

A trial that has ended (``TERMINATED``: finished, or stopped by its scheduler) keeps its weights only
while it ranks among the best ``keep`` trials of the experiment (by ``results.ranked()``, the order
``yolotune results`` shows) or is the best trial its select rule picks; every other ended trial loses
its weights files (``*.pt``: its checkpoints' ``last.pt``, Ultralytics' ``best.pt`` and ``last.pt``,
``best_by_metric.pt``) and keeps the rest: its history, config and logs. Trials not ended (running,
paused, pending, errored: ``resume_errored=true`` continues these) keep theirs, so resume and PBT
(which clones a checkpoint of a trial still running) work as before. A trial that has ended never
climbs back into the best ``keep``: what it lost, it would not need. With a ``latency_ms`` objective an
ended trial keeps its weights until its latency is measured alone (after the trials): it has no rank before.

The driver prunes as trials end (with the live report) and once more when the experiment ends.
"""

from __future__ import annotations

from typing import List, Optional

from yolotune.layout import trial_dirname
from yolotune.results import ExperimentResults
from yolotune.storage import Location

WEIGHTS = ".pt"


def kept_trials(results: ExperimentResults, keep: Optional[int]) -> Optional[set]:
    """The ended trials whose weights stay; None: every trial's stays (``keep`` null)."""
    if keep is None:
        return None
    ranked = results.ranked()
    kept = set(ranked[ranked["rank"].notna()]["trial_id"].head(keep))
    best = results.best()
    # With a latency objective, an ended trial is ranked once the driver has timed its weights alone
    # (model_costs.measure_alone, after the trials): until then they stay.
    return kept | ({best["trial_id"]} if best is not None else set()) | set(results.latency_unmeasured)


def prune(results: ExperimentResults, location: Location, keep: Optional[int]) -> List[str]:
    """Delete the weights of the ended trials outside the best ``keep`` (local or in a store); returns
    the files deleted, relative to the experiment."""
    kept = kept_trials(results, keep)
    if kept is None:
        return []
    from pyarrow.fs import FileSelector, FileType

    frame = results.dataframe()
    ended = frame.loc[frame["status"] == "TERMINATED", "trial_id"]
    deleted = []
    for trial_id in sorted(set(ended) - kept):
        trial = location.child(trial_dirname(trial_id))
        found = trial.fs.get_file_info(FileSelector(trial.fs_path, recursive=True, allow_not_found=True))
        for info in found:
            if info.type == FileType.File and info.path.endswith(WEIGHTS):
                trial.fs.delete_file(info.path)
                deleted.append(f"{trial_dirname(trial_id)}/{info.path[len(trial.fs_path) + 1:]}")
    return deleted


def configured_keep(results: ExperimentResults) -> Optional[int]:
    """The experiment's ``checkpoint.keep`` (an experiment from before it: null, every trial keeps its weights)."""
    return (results.config.get("checkpoint") or {}).get("keep")
