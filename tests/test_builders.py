"""Each scheduler and search option, composed from its YAML, turns into the right Ray
object with the configured values (table driven over conf/<group>/*.yaml)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from ray.tune import schedulers
from ray.tune.search import BasicVariantGenerator
from ray.tune.search.bohb import TuneBOHB
from ray.tune.search.hyperopt import HyperOptSearch
from ray.tune.search.optuna import OptunaSearch

from compose import experiment, options
from yolotune.config import validate
from yolotune.errors import ConfigError
from yolotune.schedulers import ClipToSpace
from yolotune.space import parse_space, to_ray_space

SPACE = ["space=minimal", "+space.bgr='choice([0.0, 0.1])'", "+space.close_mosaic='randint(0, 10)'", "train.epochs=30"]
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


@pytest.mark.parametrize("option,missing", [("optuna", "optuna"), ("hyperopt", "hyperopt"), ("bohb", "hpbandster"),
                                            ("bohb", "ConfigSpace")])
def test_a_search_whose_package_is_missing_names_the_extra(option, missing, monkeypatch):
    monkeypatch.setitem(sys.modules, missing, None)  # import machinery's own "not installed" mark
    exp = experiment(f"search={option}", *SPACE)
    with pytest.raises(ConfigError) as err:
        validate(exp)
    assert (err.value.key, err.value.value, err.value.allowed) == (
        "search", option, f"needs {missing}: pip install 'yolotune[{option}]'")


@pytest.mark.parametrize("option", options("search"))
def test_every_search_option_builds(option):
    exp = experiment(f"search={option}", *SPACE, "seed=0")
    if any(importlib.util.find_spec(m) is None for m in exp.search.extras):
        pytest.skip(f"search={option} needs {exp.search.extras} (pip install 'yolotune[{option}]')")
    search = exp.search.build(exp)
    assert type(search).__mro__[type(search) is not SEARCHERS[exp.search.type]] is SEARCHERS[exp.search.type]
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
    assert scheduler._time_attr == "epoch"


def test_pbt_mutates_the_space_and_keeps_values_inside_it():
    exp = experiment("scheduler=pbt", *SPACE, "space.lr0.low=1e-4", "space.lr0.high=0.1")
    scheduler = exp.scheduler.build(exp, exp.dists)
    assert {name: type(d) for name, d in scheduler._hyperparam_mutations.items()} == {
        name: type(d) for name, d in to_ray_space(exp.dists).items()}
    clip = scheduler._custom_explore_fn  # a bound method: picklable into tuner.pkl, mapped by mutmut to its tests
    assert isinstance(clip.__self__, ClipToSpace) and set(clip.__self__.bounds) == {n for n, d in exp.dists.items() if d.dist != "choice"}
    assert clip({"lr0": 0.12, "dropout": 0.1, "close_mosaic": 11.6}) == {"lr0": 0.1, "dropout": 0.1, "close_mosaic": 10}
    assert clip({"lr0": 5e-5, "close_mosaic": -1.2}) == {"lr0": 1e-4, "close_mosaic": 0}
    assert clip({"lr0": 0.05, "close_mosaic": 4}) == {"lr0": 0.05, "close_mosaic": 4}  # inside: untouched
    assert exp.scheduler.checkpoints_to_keep > 1  # donors' checkpoints must outlive their clones


# PBT's explore multiplies a value by 0.8 or 1.2: (explored config, what the trial gets). Integer
# distributions come back as whole numbers (nearest), floats stay floats; out of bounds: the bound.
EXPLORE_SPACE = {"lr0": "loguniform(1e-4, 1e-1)", "close_mosaic": "randint(0, 10)", "nbs": "qrandint(16, 96, 16)",
                 "lrf": "quniform(0.2, 0.8, 0.2)", "dropout": "choice([0.0, 0.1])"}
EXPLORED = [
    ({"close_mosaic": 4 * 1.2, "nbs": 48 * 0.8}, {"close_mosaic": 5, "nbs": 38}),
    ({"close_mosaic": 6 * 0.8, "nbs": 64 * 1.2}, {"close_mosaic": 5, "nbs": 77}),
    ({"lr0": 0.05 * 1.2, "lrf": 0.4 * 1.2, "dropout": 0.1}, {"lr0": 0.05 * 1.2, "lrf": 0.4 * 1.2, "dropout": 0.1}),
    ({"close_mosaic": 10 * 1.2, "nbs": 16 * 0.8, "lrf": 0.8 * 1.2}, {"close_mosaic": 10, "nbs": 16, "lrf": 0.8}),
]


@pytest.mark.parametrize("explored,kept", EXPLORED)
def test_pbt_explore_brings_values_into_the_space_with_their_type(explored, kept):
    out = ClipToSpace(parse_space(EXPLORE_SPACE)).clip(dict(explored))
    assert out == pytest.approx(kept) and {k: type(v) for k, v in out.items()} == {k: type(v) for k, v in kept.items()}


def _scheduler(*overrides):
    exp = experiment(*overrides, *SPACE)
    return exp.scheduler.build(exp, exp.dists)


def test_hyperband_median_and_pbt_get_their_values():
    hyperband = _scheduler("scheduler=hyperband", "scheduler.max_t=20", "scheduler.reduction_factor=4")
    assert (hyperband._time_attr, hyperband._max_t_attr, hyperband._eta) == ("epoch", 20, 4)
    assert _scheduler("scheduler=hyperband")._max_t_attr == 30  # max_t null: train.epochs
    median = _scheduler("scheduler=median", "scheduler.grace_period=4", "scheduler.min_samples_required=5")
    assert (median._time_attr, median._grace_period, median._min_samples_required) == ("epoch", 4, 5)
    pbt = _scheduler("scheduler=pbt", "scheduler.perturbation_interval=3", "scheduler.quantile_fraction=0.4",
                     "scheduler.resample_probability=0.3")
    assert (pbt._time_attr, pbt._perturbation_interval, pbt._quantile_fraction, pbt._resample_probability) == (
        "epoch", 3, 0.4, 0.3)


def _sample(searcher) -> list:
    """A few draws from the searcher's own random generator: equal draws, equal seeds."""
    if isinstance(searcher, OptunaSearch):
        return [searcher._sampler._rng.rng.random() for _ in range(3)]
    if isinstance(searcher, HyperOptSearch):
        return list(searcher.rstate.random(3))
    if isinstance(searcher, TuneBOHB):
        return [searcher._seed]
    return list(searcher._random_state.random(3))


@pytest.mark.parametrize("option", options("search"))
def test_searchers_are_seeded_by_the_experiment_seed(option):
    exp, other = experiment(f"search={option}", *SPACE, "seed=7"), experiment(f"search={option}", *SPACE, "seed=8")
    if any(importlib.util.find_spec(m) is None for m in exp.search.extras):
        pytest.skip(f"search={option} needs {exp.search.extras} (pip install 'yolotune[{option}]')")
    assert _sample(exp.search.build(exp)) == _sample(exp.search.build(exp)) != _sample(other.search.build(other))


def test_tpe_searchers_get_their_startup_trials():
    exp = experiment("search=optuna", "search.n_startup_trials=3", *SPACE)
    assert exp.search.build(exp)._sampler._n_startup_trials == 3
    exp = experiment("search=hyperopt", "search.n_initial_points=4", *SPACE)
    assert exp.search.build(exp).algo.keywords["n_startup_jobs"] == 4



# (overrides, the epochs a trial validates), each worked out by hand from the scheduler's rule.
DECISIONS = [
    # ASHA: rungs grace * rf^k below max_t, and the last epoch
    (["scheduler=asha", "scheduler.grace_period=1", "scheduler.reduction_factor=3", "train.epochs=10"], {1, 3, 9, 10}),
    (["scheduler=asha", "scheduler.grace_period=10", "scheduler.reduction_factor=3", "train.epochs=100"], {10, 30, 90, 100}),
    (["scheduler=asha", "scheduler.grace_period=1", "scheduler.reduction_factor=2", "train.epochs=4"], {1, 2, 4}),
    (["scheduler=asha", "scheduler.grace_period=1", "scheduler.reduction_factor=3", "train.epochs=9"], {1, 3, 9}),
    (["scheduler=asha", "scheduler.grace_period=2", "scheduler.reduction_factor=1.5", "train.epochs=6"], {2, 3, 5, 6}),
    # bracket 1 starts a rung higher: 2*3, 2*9 (bracket 0: 2, 6, 18)
    (["scheduler=asha", "scheduler.grace_period=2", "scheduler.reduction_factor=3", "scheduler.brackets=2",
      "train.epochs=30"], {2, 6, 18, 30}),
    (["scheduler=asha", "scheduler.grace_period=3", "scheduler.max_t=12", "scheduler.reduction_factor=2",
      "train.epochs=20"], {3, 6, 12}),  # trials stop at max_t
    (["scheduler=fifo", "train.epochs=7"], {7}),
    (["scheduler=pbt", "scheduler.perturbation_interval=2", "train.epochs=5"], {2, 4, 5}),
    (["scheduler=pbt", "scheduler.perturbation_interval=3", "train.epochs=9"], {3, 6, 9}),
    # HyperBand max_t 30, eta 3: brackets start at 30, 10, int(30/9)=3, int(30/27)=1, each x3 up to 30
    (["scheduler=hyperband", "train.epochs=30"], {30, 10, 3, 9, 27, 1}),
    (["scheduler=hyperband", "scheduler.max_t=16", "scheduler.reduction_factor=2", "train.epochs=20"],
     {16, 8, 4, 2, 1}),
    (["scheduler=median", "train.epochs=10"], None),
    (["search=bohb", "train.epochs=10"], None),
    (["scheduler=asha", "validate=every", "train.epochs=10"], None),
    (["scheduler=fifo", "validate=every", "train.epochs=10"], None),
]


# (overrides, the most epochs a trial trains): scheduler.max_t where the scheduler has one and it is set, else train.epochs
TRIAL_EPOCHS = [
    (["scheduler=fifo"], 10), (["scheduler=median"], 10), (["scheduler=pbt"], 10), (["scheduler=asha"], 10),
    (["scheduler=asha", "scheduler.max_t=6", "scheduler.grace_period=2"], 6),
    (["scheduler=hyperband", "scheduler.max_t=8"], 8),
]


@pytest.mark.parametrize("overrides,epochs", TRIAL_EPOCHS, ids=[" ".join(o) for o, _ in TRIAL_EPOCHS])
def test_a_trial_trains_the_schedulers_max_t_else_train_epochs(overrides, epochs):
    exp = experiment("space=minimal", *overrides, "train.epochs=10")
    validate(exp)
    assert exp.scheduler.trial_epochs(exp) == epochs


@pytest.mark.parametrize("overrides,expected", DECISIONS, ids=[" ".join(o) for o, _ in DECISIONS])
def test_trials_validate_at_their_schedulers_decision_epochs(overrides, expected):
    exp = experiment("space=minimal", *overrides)
    validate(exp)
    epochs = exp.validation_epochs()
    assert (None if epochs is None else set(epochs)) == expected


def test_decision_epochs_are_where_rays_asha_and_hyperband_decide():
    """Cross-checked against Ray's own objects: ASHA's rungs, HyperBand's brackets as it builds them."""
    import math

    exp = experiment("space=minimal", "scheduler=asha", "scheduler.grace_period=2", "scheduler.reduction_factor=1.7",
                     "scheduler.brackets=3", "train.epochs=40")
    asha = exp.scheduler.build(exp, exp.dists)
    rungs = {math.ceil(m) for bracket in asha._brackets for m, _ in bracket._rungs}
    assert exp.scheduler.decision_epochs(exp) == rungs | {40}
    for max_t, eta in ((30, 3), (81, 3), (100, 3), (17, 2.5)):
        exp = experiment("space=minimal", "scheduler=hyperband", f"scheduler.reduction_factor={eta}", f"train.epochs={max_t}")
        hyperband, milestones = exp.scheduler.build(exp, exp.dists), {max_t}
        for s in range(hyperband._s_max_1):
            if hyperband._get_r0(s) == 0:
                continue
            bracket = hyperband._create_bracket(s)
            milestones.add(bracket._cumul_r)
            while bracket._halves:
                bracket._live_trials = {}
                bracket.successive_halving("fitness", 1)
                milestones.add(bracket._cumul_r)
        assert exp.scheduler.decision_epochs(exp) == milestones, (max_t, eta)


def test_pbt_and_optuna_skip_results_without_the_metric():
    """Unvalidated epochs report no metric: PBT (require_attrs) and Optuna would raise on them."""
    import pickle

    pbt = _scheduler("scheduler=pbt")
    assert pbt._require_attrs is False
    exp = experiment("search=optuna", *SPACE, "seed=0")
    if importlib.util.find_spec("optuna") is None:
        pytest.skip("needs optuna")
    search = exp.search.build(exp)
    search.set_search_properties("fitness", "max", to_ray_space(exp.dists))
    search.suggest("t1")
    search.on_trial_result("t1", {"epoch": 1, "training_iteration": 1, "validated": 0})
    search.on_trial_result("t1", {"epoch": 2, "training_iteration": 2, "validated": 1, "fitness": 0.5})
    assert search._ot_trials["t1"].storage.get_trial(search._ot_trials["t1"]._trial_id).intermediate_values == {2: 0.5}
    assert type(pickle.loads(pickle.dumps(search))) is type(search)  # tuner.pkl holds it


# What Ray's schedulers and searchers can compare (checked in Ray 2.60's source): FIFO no metric, random
# search none, OptunaSearch a list of metrics and modes; ASHA, HyperBand, median stopping, PBT,
# HyperOpt and BOHB one metric.
MULTI_OBJECTIVE = {"scheduler": {"fifo"}, "search": {"random", "optuna"}}
OBJECTIVES = "objectives=[fitness:max,latency_ms:min]"


@pytest.mark.parametrize("group,option", [(g, o) for g in MULTI_OBJECTIVE for o in options(g)])
def test_objectives_are_refused_where_ray_compares_one_metric(group, option):
    other = {"scheduler": "search=random", "search": "scheduler=fifo"}[group]
    exp = experiment(f"{group}={option}", other, *SPACE, OBJECTIVES)
    kind = getattr(exp, group).type
    if kind in MULTI_OBJECTIVE[group]:
        if all(importlib.util.find_spec(m) for m in getattr(getattr(exp, group), "extras", ())):
            validate(exp)
        return
    with pytest.raises(ConfigError) as err:
        validate(exp)
    assert (err.value.key, err.value.value) == (group, kind)
    assert all(f"{group}={name}" in err.value.allowed for name in MULTI_OBJECTIVE[group]), err.value.allowed


def test_optuna_with_objectives_is_tpe_on_all_of_them(tmp_path):
    """Tune gets no metric then (runner.py): Ray's set_search_properties keeps the searcher's list, the
    trial's last result tells Optuna every objective, and Ray can save the searcher's state (it pickles
    the sampler: Optuna's NSGA-II samplers hold a lock)."""
    import pickle

    if importlib.util.find_spec("optuna") is None:
        pytest.skip("needs optuna")
    import optuna

    exp = experiment("search=optuna", "scheduler=fifo", *SPACE, "seed=0", OBJECTIVES)
    search = pickle.loads(pickle.dumps(exp.search.build(exp)))  # tuner.pkl holds it
    search.set_search_properties(None, None, to_ray_space(exp.dists))
    assert (search.metric, search.mode) == (["fitness", "latency_ms"], ["max", "min"])
    assert isinstance(search._sampler, optuna.samplers.TPESampler) and len(search._ot_study.directions) == 2
    search.suggest("t1")
    search.on_trial_result("t1", {"epoch": 1, "training_iteration": 1, "validated": 1, "fitness": 0.4})
    search.on_trial_complete("t1", {"epoch": 2, "fitness": 0.5, "latency_ms": 3.0})
    assert search._ot_study.trials[0].values == [0.5, 3.0]
    search.save(str(tmp_path / "searcher.pkl"))  # Ray's experiment checkpoint
