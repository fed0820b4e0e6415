"""Each scheduler and search option, composed from its YAML, turns into the right Ray
object with the configured values (table driven over conf/<group>/*.yaml)."""

from __future__ import annotations

import importlib.util

import pytest
from ray.tune import schedulers
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.bohb import TuneBOHB
from ray.tune.search.hyperopt import HyperOptSearch
from ray.tune.search.optuna import OptunaSearch

from compose import experiment, options
from yolotune.config import validate
from yolotune.space import to_ray_space

SPACE = ["space=minimal", "+space.dropout='choice([0.0, 0.1])'", "+space.close_mosaic='randint(0, 10)'", "train.epochs=30"]
SCHEDULERS = {"asha": schedulers.AsyncHyperBandScheduler, "fifo": schedulers.FIFOScheduler,
              "hyperband": schedulers.HyperBandScheduler, "median": schedulers.MedianStoppingRule,
              "pbt": schedulers.PopulationBasedTraining}
SEARCHERS = {"random": BasicVariantGenerator, "optuna": OptunaSearch, "hyperopt": HyperOptSearch, "bohb": TuneBOHB}


@pytest.mark.parametrize("option", options("scheduler"))
def test_every_scheduler_option_builds(option):
    exp = experiment(f"scheduler={option}", *SPACE)
    validate(exp)
    scheduler = exp.scheduler.build(exp, exp.dists)
    assert type(scheduler) is SCHEDULERS[exp.scheduler.type]
    assert getattr(scheduler, "_time_attr", "epoch") == "epoch"


@pytest.mark.parametrize("option", options("search"))
def test_every_search_option_builds(option):
    exp = experiment(f"search={option}", *SPACE, "seed=0")
    if any(importlib.util.find_spec(m) is None for m in exp.search.extras):
        pytest.skip(f"search={option} needs {exp.search.extras} (pip install 'yolotune[{option}]')")
    search = exp.search.build(exp)
    assert type(search) is SEARCHERS[exp.search.type]
    if exp.search.type != "random":  # the searcher accepts our space, metric and mode
        assert search.set_search_properties("fitness", "max", to_ray_space(exp.dists))


@pytest.mark.parametrize("limit,expected", [(None, 0), (1, 1), (3, 3)])
def test_random_search_keeps_the_concurrency_limit(limit, expected):
    """Ray applies TuneConfig.max_concurrent_trials to Searchers only: the generator must carry it."""
    exp = experiment("search=random", *SPACE)
    assert exp.search.build(exp, limit).max_concurrent == expected


def test_asha_gets_its_values_in_the_right_places():
    exp = experiment("scheduler=asha", "scheduler.grace_period=2", "scheduler.reduction_factor=3",
                     "scheduler.brackets=2", *SPACE)
    asha = exp.scheduler.build(exp, exp.dists)
    assert asha._max_t == 30  # max_t null: train.epochs
    assert asha._reduction_factor == 3 and len(asha._brackets) == 2
    assert [milestone for milestone, _ in asha._brackets[0]._rungs] == [18, 6, 2]  # grace_period x reduction_factor^k


def test_bohb_replaces_the_scheduler_with_its_own_hyperband():
    exp = experiment("search=bohb", "search.reduction_factor=4", *SPACE)
    scheduler = exp.search.build_scheduler(exp)
    assert type(scheduler) is schedulers.HyperBandForBOHB and scheduler._eta == 4 and scheduler._max_t_attr == 30


def test_pbt_mutates_the_space_and_clips_to_it():
    exp = experiment("scheduler=pbt", *SPACE, "space.lr0.low=1e-4", "space.lr0.high=0.1")
    scheduler = exp.scheduler.build(exp, exp.dists)
    assert set(scheduler._hyperparam_mutations) == set(exp.dists)
    clip = scheduler._custom_explore_fn
    assert clip({"lr0": 0.12, "dropout": 0.1, "close_mosaic": 11.6}) == {"lr0": 0.1, "dropout": 0.1, "close_mosaic": 10}
    assert clip({"lr0": 5e-5, "close_mosaic": -1.2}) == {"lr0": 1e-4, "close_mosaic": 0}
    assert clip({"lr0": 0.05, "close_mosaic": 4}) == {"lr0": 0.05, "close_mosaic": 4}  # inside: untouched
    assert exp.scheduler.checkpoints_to_keep > 1  # donors' checkpoints must outlive their clones
