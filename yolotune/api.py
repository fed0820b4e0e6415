"""``yolotune.tune(...)``: the guide's ``model.tune(use_ray=True, ...)`` on yolotune's engine.

It composes the same Hydra config as the CLI and sets the given values on it (no override strings:
any path, any value), so it gets the same validation and writes the same experiment directory; it
returns Ray's ResultGrid (None with ``dry_run=true`` in ``overrides``: every check and the plan, no
sweep). Mistakes raise ConfigError naming the key, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf, open_dict

from yolotune.config import literal, register_configs
from yolotune.errors import ConfigError
from yolotune.layout import first_line
from yolotune.overrides import composition_error, normalize
from yolotune.space import from_ray


def tune(model: Optional[str] = None, data: Optional[str] = None, space: Optional[Dict[str, Any]] = None,
         grace_period: Optional[int] = None, gpu_per_trial: Optional[float] = None, iterations: Optional[int] = None,
         resume: Optional[bool] = None, name: Optional[str] = None, storage: Optional[str] = None,
         overrides: Sequence[str] = (), use_ray: bool = True, objectives: Optional[Sequence[str]] = None,
         select: Optional[str] = None, **train_args):
    """Tune ``model`` on ``data``; ``space`` maps train arguments to Ray Tune domains
    (``tune.uniform(1e-5, 1e-1)``) or yolotune specs (``{"dist": "uniform", ...}``, ``"uniform(0, 1)"``).
    ``overrides`` is a list of CLI overrides (["experiment=recommended", "scheduler=fifo", "seed=0"]);
    ``objectives`` (["fitness:max", "latency_ms:min"]) and ``select`` ("latency_ms<=5") are the
    experiment's keys of those names. ``train_args`` are Ultralytics train arguments (epochs=50, imgsz=320,
    ...). ``use_ray`` is accepted for the guide's calls: yolotune always tunes with Ray.

    Only the arguments given are set: one left out (None) keeps the value that ``overrides`` (a preset
    included) chose, else conf/config.yaml's: model yolo11n.pt, data coco8.yaml, the default space,
    10 iterations, ASHA with grace period 10, storage runs/tune. ``grace_period`` applies to schedulers
    that have one.

    With ``resume=True`` the experiment's saved config is used: only ``name``, ``storage``,
    ``gpu_per_trial`` and harmless ``overrides`` apply. A finished experiment is not run again: its
    results are returned.
    """
    from yolotune.cli import run_experiment

    if use_ray is not True:
        raise ConfigError("use_ray", use_ray, "yolotune always tunes with Ray Tune; leave use_ray=True")
    cfg, set_keys = compose(overrides, model=model, data=data, space=space, grace_period=grace_period,
                            gpu_per_trial=gpu_per_trial, iterations=iterations, resume=resume, name=name,
                            storage=storage, objectives=objectives, select=select, train_args=train_args)
    return run_experiment(cfg, [*overrides, *set_keys])[1]


def compose(overrides: Sequence[str] = (), *, model=None, data=None, space=None, grace_period=None,
            gpu_per_trial=None, iterations=None, resume=None, name=None, storage=None, objectives=None, select=None,
            train_args: Optional[Dict[str, Any]] = None) -> Tuple[DictConfig, List[str]]:
    """``tune``'s config, validated by nothing yet: ``overrides`` composed as the CLI composes them, then
    the arguments given (not None) set on it; and those as ``key=value`` for the saved overrides."""
    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("overrides", overrides, "a list of override strings, e.g. ['scheduler=fifo', 'seed=0']")
    if space is not None and not isinstance(space, dict):
        raise ConfigError("space", space, "a mapping of train arguments to distributions, e.g. "
                                          "{'lr0': tune.uniform(1e-5, 1e-1)}")
    # The data group's option that takes the data given: the synthetic shapes, or a data YAML (set below)
    picked = [] if data is None or resume else ["data=shapes" if data == "shapes" else "data=coco8"]
    cfg = _compose([*overrides, *picked])
    set_keys = [] if resume is None else [_set(cfg, "resume", resume)]
    values = {"storage": storage, "name": name, "resources.gpu_per_trial": gpu_per_trial}
    if not cfg.resume:
        values.update({"iterations": iterations, "model.weights": model, "objectives": objectives, "select": select,
                       "data.yaml": None if data == "shapes" else data})
        if "grace_period" in cfg.scheduler:
            values["scheduler.grace_period"] = grace_period
        values.update({f"train.{key}": value for key, value in (train_args or {}).items()})
        if space is not None:
            values["space"] = {key: _spec(f"space.{key}", value) for key, value in space.items()}
    set_keys += [_set(cfg, key, value) for key, value in values.items()
                 if value is not None or key.startswith("train.")]  # None: not given (train.KEY=None is Ultralytics')
    return cfg, set_keys


def _set(cfg: DictConfig, key: str, value: Any) -> str:
    with open_dict(cfg):
        try:
            OmegaConf.update(cfg, key, literal(value), merge=False, force_add=True)
        except Exception as e:  # noqa: BLE001 - OmegaConf's type errors
            raise ConfigError(key, value, f"wrong type ({first_line(str(e))})") from None
    return f"{key}={value}"


def _compose(overrides: List[str]) -> DictConfig:
    from hydra import compose as hydra_compose, initialize_config_module

    register_configs()
    try:
        with initialize_config_module("yolotune.conf", version_base="1.3"):
            cfg = hydra_compose("config", overrides=normalize(overrides))
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors, as the CLI reports them
        error = composition_error(e, overrides)
        if error is None:
            raise
        raise error from None
    return cfg


def _spec(key: str, value: Any):
    if isinstance(value, (dict, str)) and not (isinstance(value, dict) and "grid_search" in value):
        return value
    return from_ray(key, value)

