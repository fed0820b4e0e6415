"""``yolotune.tune(...)``: the guide's ``model.tune(use_ray=True, ...)`` on yolotune's engine.

It composes the same Hydra config as the CLI and sets the given values on it (no override strings:
any path, any value), so it gets the same validation and writes the same experiment directory; it
returns Ray's ResultGrid. Mistakes raise ConfigError naming the key, the value and what is allowed.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from omegaconf import OmegaConf, open_dict

from yolotune.config import literal, register_configs
from yolotune.errors import ConfigError
from yolotune.layout import first_line
from yolotune.overrides import composition_error, normalize
from yolotune.space import from_ray


def tune(model: str = "yolo11n.pt", data: str = "coco8.yaml", space: Optional[Dict[str, Any]] = None,
         grace_period: int = 10, gpu_per_trial: Optional[float] = None, iterations: int = 10, resume: bool = False,
         name: Optional[str] = None, storage: str = "runs/tune", overrides: Sequence[str] = (), use_ray: bool = True,
         objectives: Optional[Sequence[str]] = None, select: Optional[str] = None, **train_args):
    """Tune ``model`` on ``data``; ``space`` maps train arguments to Ray Tune domains
    (``tune.uniform(1e-5, 1e-1)``) or yolotune specs (``{"dist": "uniform", ...}``, ``"uniform(0, 1)"``);
    None means the default space. ``overrides`` is a list of CLI overrides (["scheduler=fifo", "seed=0"]);
    ``objectives`` (["fitness:max", "latency_ms:min"]) and ``select`` ("latency_ms<=5") are the
    experiment's keys of those names. ``train_args`` are Ultralytics train arguments (epochs=50, imgsz=320,
    ...). ``use_ray`` is accepted for the guide's calls: yolotune always tunes with Ray.

    With ``resume=True`` the experiment's saved config is used: only ``name``, ``storage``,
    ``gpu_per_trial`` and harmless ``overrides`` apply.
    """
    from hydra import compose, initialize_config_module

    from yolotune.cli import run_experiment

    if isinstance(overrides, str) or not all(isinstance(o, str) for o in overrides):
        raise ConfigError("overrides", overrides, "a list of override strings, e.g. ['scheduler=fifo', 'seed=0']")
    if use_ray is not True:
        raise ConfigError("use_ray", use_ray, "yolotune always tunes with Ray Tune; leave use_ray=True")
    if space is not None and not isinstance(space, dict):
        raise ConfigError("space", space, "a mapping of train arguments to distributions, e.g. "
                                          "{'lr0': tune.uniform(1e-5, 1e-1)}")
    groups = list(overrides) + (["data=shapes"] if data == "shapes" and not resume else [])
    register_configs()
    try:
        with initialize_config_module("yolotune.conf", version_base="1.3"):
            cfg = compose("config", overrides=normalize(groups))
    except Exception as e:  # noqa: BLE001 - Hydra's composition errors, as the CLI reports them
        error = composition_error(e, groups)
        if error is None:
            raise
        raise error from None
    values = {"storage": storage, "resume": resume, "name": name, "resources.gpu_per_trial": gpu_per_trial}
    if not resume:
        values.update({"iterations": iterations, "model.weights": model})
        values.update({key: value for key, value in (("objectives", objectives), ("select", select))
                       if value is not None})
        if data != "shapes":
            values["data.yaml"] = data
        if "grace_period" in cfg.scheduler:
            values["scheduler.grace_period"] = grace_period
        values.update({f"train.{key}": value for key, value in train_args.items()})
        if space is not None:
            values["space"] = {key: _spec(f"space.{key}", value) for key, value in space.items()}
    set_keys = []
    with open_dict(cfg):
        for key, value in values.items():
            if value is None and key in ("name", "resources.gpu_per_trial"):
                continue
            try:
                OmegaConf.update(cfg, key, literal(value), merge=False, force_add=True)
            except Exception as e:  # noqa: BLE001 - OmegaConf's type errors
                raise ConfigError(key, value, f"wrong type ({first_line(str(e))})") from None
            set_keys.append(f"{key}={value}")
    return run_experiment(cfg, [*overrides, *set_keys])[1]


def _spec(key: str, value: Any):
    if isinstance(value, (dict, str)) and not (isinstance(value, dict) and "grid_search" in value):
        return value
    return from_ray(key, value)

