"""``yolotune.tune(...)``'s config: the arguments given are set, the others keep what presets and overrides chose."""

from __future__ import annotations

import pytest
from omegaconf import OmegaConf

from compose import compose_config, options
from yolotune.api import compose
from yolotune.overrides import normalize


@pytest.mark.parametrize("overrides", [[], *([f"experiment={p}"] for p in options("experiment")),
                                       ["experiment=quickstart", "storage=/elsewhere", "iterations=7", "epochs=3"]])
def test_no_argument_given_composes_what_the_cli_composes(overrides):
    """``yolotune.tune(overrides=["experiment=recommended"])`` runs the preset as ``python -m yolotune`` does."""
    cfg, set_keys = compose(overrides)
    assert OmegaConf.to_container(cfg) == OmegaConf.to_container(compose_config(*normalize(overrides)))
    assert set_keys == []


# (argument, value given, where it lands, overrides that choose another value there, the value they choose)
ARGUMENTS = [
    ("model", "yolo11s.pt", "model.weights", ["experiment=quickstart"], "yolo11n.yaml"),
    ("iterations", 3, "iterations", ["experiment=recommended"], 30),
    ("grace_period", 2, "scheduler.grace_period", ["experiment=recommended"], 1),
    ("storage", "/given", "storage", ["experiment=recommended", "storage=/elsewhere"], "/elsewhere"),
    ("name", "given", "name", ["experiment=recommended", "name=chosen"], "chosen"),
    ("gpu_per_trial", 0.5, "resources.gpu_per_trial", ["resources.gpu_per_trial=0.25"], 0.25),
    ("objectives", ["fitness:max", "params:min"], "objectives", ["experiment=speed_accuracy"],
     ["fitness:max", "latency_ms:min"]),
    ("select", "latency_ms<=9", "select", ["experiment=speed_accuracy"], "latency_ms<=5"),
    ("resume", False, "resume", ["resume=true"], True),
]


@pytest.mark.parametrize("argument,given,key,overrides,chosen", ARGUMENTS, ids=[a[0] for a in ARGUMENTS])
def test_an_argument_given_replaces_the_presets_value_and_one_left_out_keeps_it(argument, given, key, overrides,
                                                                                  chosen):
    assert OmegaConf.to_container(compose_config(*overrides))  # the overrides compose on their own
    kept, _ = compose(overrides)
    assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(kept, key)}))["v"] == chosen
    replaced, set_keys = compose(overrides, **{argument: given})
    assert OmegaConf.to_container(OmegaConf.create({"v": OmegaConf.select(replaced, key)}))["v"] == given
    assert set_keys == [f"{key}={given}"]


def test_data_left_out_keeps_the_presets_dataset_and_given_picks_the_data_option_that_takes_it():
    quickstart = ["experiment=quickstart", "data.train_images=16"]
    kept, _ = compose(quickstart)
    assert (kept.data.type, kept.data.train_images) == ("shapes", 16)
    given, set_keys = compose(quickstart[:1], data="/data/mine.yaml")
    assert OmegaConf.to_container(given.data) == {"type": "yaml", "yaml": "/data/mine.yaml"}
    assert set_keys == ["data.yaml=/data/mine.yaml"]
    assert (given.iterations, given.model.weights) == (4, "yolo11n.yaml")  # the rest of the preset stays
    recommended, _ = compose(["experiment=recommended", "data.train_images=16"], data="shapes")  # its keys too
    assert (recommended.data.type, recommended.data.train_images, recommended.iterations) == ("shapes", 16, 30)


def test_train_arguments_given_replace_the_presets_and_the_others_stay():
    cfg, set_keys = compose(["experiment=quickstart"], train_args={"epochs": 3, "mosaic": None})
    assert (cfg.train.epochs, cfg.train.mosaic, cfg.train.imgsz, cfg.train.optimizer) == (3, None, 128, "AdamW")
    assert set_keys == ["train.epochs=3", "train.mosaic=None"]


def test_space_given_replaces_the_presets_space():
    from ray import tune

    kept, _ = compose(["experiment=quickstart"])
    assert OmegaConf.to_container(kept.space)["lr0"] == {"dist": "loguniform", "low": 1e-4, "high": 1e-2}
    given, _ = compose(["experiment=quickstart"], space={"lrf": tune.uniform(0.01, 0.1)})
    assert OmegaConf.to_container(given.space) == {"lrf": {"dist": "uniform", "low": 0.01, "high": 0.1}}


def test_a_resume_sets_only_what_a_resume_may_change():
    """The guide resumes with the same call and resume=True: the search's arguments are the saved experiment's."""
    cfg, set_keys = compose(["experiment=recommended"], resume=True, name="exp", storage="/s", iterations=3,
                            grace_period=2, model="yolo11s.pt", data="shapes", train_args={"epochs": 3})
    assert set_keys == ["resume=True", "storage=/s", "name=exp"]
    assert (cfg.iterations, cfg.scheduler.grace_period, cfg.train.epochs) == (30, 1, 100)
