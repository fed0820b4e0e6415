"""Each scheduler, search and resources option turns into the right Ray object (table driven)."""

from __future__ import annotations

import pytest
from ray.tune import schedulers
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.hyperopt import HyperOptSearch
from ray.tune.search.optuna import OptunaSearch

from yolotune.config import (AshaConfig, FifoConfig, HyperbandConfig, HyperoptSearchConfig, MedianConfig,
                             OptunaSearchConfig, PbtConfig, RandomSearchConfig, ResourcesConfig)
from yolotune.errors import ConfigError
from yolotune.resources import plan
from yolotune.schedulers import build_scheduler
from yolotune.search import build_search
from yolotune.space import parse_space, to_ray_space

DISTS = parse_space({"lr0": "loguniform(1e-4, 1e-1)", "batch": "choice([8, 16])", "close_mosaic": "randint(0, 10)"})
SPACE = to_ray_space(DISTS)


@pytest.mark.parametrize("config,expected", [
    (AshaConfig(grace_period=2, reduction_factor=2), schedulers.AsyncHyperBandScheduler),
    (FifoConfig(), schedulers.FIFOScheduler),
    (HyperbandConfig(), schedulers.HyperBandScheduler),
    (MedianConfig(grace_period=2), schedulers.MedianStoppingRule),
    (PbtConfig(perturbation_interval=2), schedulers.PopulationBasedTraining),
], ids=lambda v: getattr(v, "type", ""))
def test_scheduler(config, expected):
    scheduler = build_scheduler(config, RandomSearchConfig(), epochs=9, space=DISTS)
    assert type(scheduler) is expected
    assert getattr(scheduler, "_time_attr", "epoch") == "epoch"


def test_asha_max_t_defaults_to_epochs():
    scheduler = build_scheduler(AshaConfig(grace_period=2), RandomSearchConfig(), epochs=9, space=DISTS)
    assert scheduler._max_t == 9


def test_pbt_mutates_the_space():
    scheduler = build_scheduler(PbtConfig(), RandomSearchConfig(), epochs=9, space=DISTS)
    assert set(scheduler._hyperparam_mutations) == {"lr0", "batch", "close_mosaic"}
    clip = scheduler._custom_explore_fn
    assert clip({"lr0": 0.12, "batch": 16, "close_mosaic": 11.6}) == {"lr0": 0.1, "batch": 16, "close_mosaic": 10}
    assert clip({"lr0": 5e-5, "close_mosaic": -1.2}) == {"lr0": 1e-4, "close_mosaic": 0}


@pytest.mark.parametrize("config,expected", [
    (RandomSearchConfig(), BasicVariantGenerator),
    (OptunaSearchConfig(), OptunaSearch),
    (HyperoptSearchConfig(), HyperOptSearch),
], ids=lambda v: getattr(v, "type", ""))
def test_search(config, expected):
    search = build_search(config, seed=0)
    assert type(search) is expected
    if expected is not BasicVariantGenerator:  # the searcher accepts our space, metric and mode
        assert search.set_search_properties("fitness", "max", SPACE)


@pytest.mark.parametrize("res,cpus,gpus,expected", [
    (ResourcesConfig(), 2, 0, (1, 0)),                          # auto on a CPU box: one 1-CPU trial per core
    (ResourcesConfig(), 16, 1, (4, 0.25)),                      # auto on a GPU box: four trials per GPU
    (ResourcesConfig(), 16, 2, (2, 0.25)),
    (ResourcesConfig(cpu_per_trial=2, gpu_per_trial=0), 8, 0, (2, 0)),
    (ResourcesConfig(cpu_per_trial=1, gpu_per_trial=0.5), 8, 1, (1, 0.5)),
])
def test_resources_plan(res, cpus, gpus, expected):
    planned = plan(res, cpus, gpus)
    assert (planned.cpu, planned.gpu) == expected and planned.threads == max(1, int(expected[0]))


@pytest.mark.parametrize("res,cpus,gpus,key", [
    (ResourcesConfig(gpu_per_trial=1), 2, 0, "resources.gpu_per_trial"),
    (ResourcesConfig(gpu_per_trial=2), 8, 1, "resources.gpu_per_trial"),
    (ResourcesConfig(cpu_per_trial=4), 2, 0, "resources.cpu_per_trial"),
])
def test_resources_beyond_the_machine(res, cpus, gpus, key):
    with pytest.raises(ConfigError) as err:
        plan(res, cpus, gpus)
    assert err.value.key == key
