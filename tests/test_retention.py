"""Which trials keep their weights (checkpoint.keep), on experiment directories built by hand: seconds.

The trials kept are computed here from the fitness values written, never by yolotune."""

from __future__ import annotations

import os
import random
from pathlib import Path

import pytest

from test_analysis_fast import FITNESS, SPACE, recorded, sampled
from test_objectives_fast import METHOD
from yolotune import layout, report, retention
from yolotune.results import load
from yolotune.storage import Location
from yolotune.epoch_report import keep_best

WEIGHTS = ("checkpoint_000002/last.pt", "train/weights/best.pt", f"train/weights/{layout.TRIAL_BEST_WEIGHTS}")
KEPT_FILES = ("history.jsonl",)
# (fitness, status): ended trials, a running one, an errored one and one still paused, better and worse
TRIALS = [(0.50, "TERMINATED"), (0.90, "TERMINATED"), (0.10, "TERMINATED"), (0.70, "TERMINATED"),
          (0.95, "RUNNING"), (0.99, "ERROR"), (0.30, "TERMINATED"), (0.05, "RUNNING")]


def with_weights(exp_dir: Path) -> Path:
    rng = random.Random(0)
    recorded(exp_dir, SPACE, [(sampled(rng), [value], status) for value, status in TRIALS])
    for trial_dir in exp_dir.glob("trial_*"):
        for name in WEIGHTS:
            (trial_dir / name).parent.mkdir(parents=True, exist_ok=True)
            (trial_dir / name).write_bytes(b"weights")
    return exp_dir


def expected_with_weights(keep) -> set:
    """Every trial not ended, and the ended ones among the best ``keep`` of all trials (max fitness)."""
    ids = [f"t{n:03d}" for n in range(len(TRIALS))]
    order = sorted(range(len(TRIALS)), key=lambda n: -TRIALS[n][0])
    best = {ids[n] for n in (order if keep is None else order[:keep])}
    return best | {ids[n] for n, (_, status) in enumerate(TRIALS) if status != "TERMINATED"}


def trials_with_weights(exp_dir: Path) -> set:
    return {d.name.removeprefix("trial_") for d in exp_dir.glob("trial_*") if any(d.rglob("*.pt"))}


@pytest.mark.parametrize("keep", [None, 1, 2, 3, 5, len(TRIALS)])
def test_ended_trials_outside_the_best_keep_lose_their_weights_and_keep_their_history(tmp_path, keep):
    exp_dir = with_weights(tmp_path / "exp")
    deleted = retention.prune(load(exp_dir), Location(str(exp_dir)), keep)
    assert trials_with_weights(exp_dir) == expected_with_weights(keep)
    pruned = {f"t{n:03d}" for n in range(len(TRIALS))} - expected_with_weights(keep)
    assert sorted(deleted) == sorted(f"trial_{t}/{name}" for t in pruned for name in WEIGHTS)
    for trial_dir in exp_dir.glob("trial_*"):  # the kept trials keep every weights file; all keep their history
        kept = trial_dir.name.removeprefix("trial_") not in pruned
        assert all((trial_dir / name).is_file() == kept for name in WEIGHTS)
        assert all((trial_dir / name).is_file() for name in KEPT_FILES)


def test_the_best_trial_by_the_experiments_metric_always_keeps_its_weights(tmp_path):
    """keep=1 with a running trial ahead in the ranking: the best ended trial loses them then, and the
    best trial of all (the running one, which best.pt would come from) keeps its own."""
    exp_dir = with_weights(tmp_path / "exp")
    results = load(exp_dir)
    assert retention.kept_trials(results, 1) == {"t005"}  # 0.99, errored: ranked still
    assert retention.kept_trials(results, None) is None


def test_pruning_twice_deletes_nothing_more(tmp_path):
    exp_dir = with_weights(tmp_path / "exp")
    assert retention.prune(load(exp_dir), Location(str(exp_dir)), 2)
    assert retention.prune(load(exp_dir), Location(str(exp_dir)), 2) == []


def test_an_experiment_from_before_keep_keeps_every_trials_weights(tmp_path):
    exp_dir = with_weights(tmp_path / "exp")
    assert retention.configured_keep(load(exp_dir)) is None
    config = exp_dir / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + "checkpoint: {every: 1, keep: 3}\n")
    assert retention.configured_keep(load(exp_dir)) == 3


@pytest.mark.parametrize("link", [True, False])
def test_the_best_epochs_weights_are_a_link_to_the_checkpointed_last_pt_or_else_a_copy(tmp_path, link):
    """A link only where last.pt then moves into the checkpoint: Ultralytics rewrites last.pt in place,
    which would change a linked best."""
    last, best = tmp_path / "last.pt", tmp_path / layout.TRIAL_BEST_WEIGHTS
    best.write_bytes(b"epoch 1")
    last.write_bytes(b"epoch 2")
    keep_best(last, best, link=link)
    assert best.read_bytes() == b"epoch 2" and best.samefile(last) == link
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left
    if link:
        os.replace(last, tmp_path / "checkpoint.pt")  # as the checkpoint takes it
    last.write_bytes(b"epoch 3")  # Ultralytics' next epoch
    assert best.read_bytes() == b"epoch 2"


@pytest.mark.parametrize("prune", [True, False])
def test_the_live_refresh_prunes_unless_trials_may_clone_ended_ones_checkpoints(tmp_path, prune):
    """Under PBT (prune=False) a trial may go on from the checkpoint of one that has ended since."""
    exp_dir = with_weights(tmp_path / "exp")
    config = exp_dir / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + "checkpoint: {every: 1, keep: 1}\n")
    report.live_refresh(str(exp_dir), prune=prune)
    assert trials_with_weights(exp_dir) == expected_with_weights(1 if prune else None)
    assert (exp_dir / "report.html").is_file()


def test_with_a_latency_objective_ended_trials_keep_their_weights_until_timed_alone(tmp_path):
    """Ended trials have no Pareto rank before the driver times their weights alone (after the trials):
    they keep them until then; once timed, the best ``keep`` by Pareto rank and fitness keep theirs."""
    exp_dir = with_weights(tmp_path / "exp")
    config = exp_dir / ".hydra" / "config.yaml"
    config.write_text(config.read_text() + "objectives: ['fitness:max', 'latency_ms:min']\n")
    ended = [f"t{n:03d}" for n, (_, status) in enumerate(TRIALS) if status == "TERMINATED"]
    retention.prune(load(exp_dir), Location(str(exp_dir)), 1)
    assert trials_with_weights(exp_dir) == expected_with_weights(None)  # none timed yet: every trial keeps them
    # All timed alike: the Pareto front is the fittest ended trial (t001, 0.90) alone
    for trial_id in ended:
        layout.append_jsonl(exp_dir / layout.MEASURED_LATENCY, {"trial_id": trial_id, "latency_ms": 5.0, **METHOD})
    retention.prune(load(exp_dir), Location(str(exp_dir)), 1)
    assert trials_with_weights(exp_dir) == {"t001"} | {f"t{n:03d}" for n, (_, s) in enumerate(TRIALS) if s != "TERMINATED"}
