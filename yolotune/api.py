"""``yolotune.tune(...)``: the guide's ``model.tune(use_ray=True, ...)`` on yolotune's engine.

It composes the same Hydra config as the CLI, so it gets the same validation and writes the same
experiment directory; it returns Ray's ResultGrid.
"""

from __future__ import annotations

from typing import Any, Dict, Optional, Sequence

from hydra import compose, initialize_config_module
from omegaconf import open_dict

from yolotune.config import register_configs
from yolotune.space import from_ray


def tune(model: str = "yolo11n.pt", data: str = "coco8.yaml", space: Optional[Dict[str, Any]] = None,
         grace_period: int = 10, gpu_per_trial: Optional[float] = None, iterations: int = 10, resume: bool = False,
         name: Optional[str] = None, storage: str = "runs/tune", overrides: Sequence[str] = (), **train_args):
    """Tune ``model`` on ``data``; ``space`` maps train arguments to Ray Tune domains
    (``tune.uniform(1e-5, 1e-1)``) or yolotune specs (``{"dist": "uniform", ...}``, ``"uniform(0, 1)"``);
    None means the default space. ``overrides`` takes any CLI override ("scheduler=fifo", "seed=0", ...);
    ``train_args`` are Ultralytics train arguments (epochs=50, imgsz=320, ...).

    With ``resume=True`` the experiment's saved config is used: only ``name``, ``storage``,
    ``gpu_per_trial`` and harmless ``overrides`` apply.
    """
    from yolotune.cli import run_experiment

    cli = [f"storage={storage}", f"resume={str(resume).lower()}", *overrides]
    if name is not None:
        cli.append(f"name={name}")
    if gpu_per_trial is not None:
        cli.append(f"resources.gpu_per_trial={gpu_per_trial}")
    if not resume:
        cli += [f"iterations={iterations}", f"model.weights={model}"]
        cli += ["data=shapes"] if data == "shapes" else [f"data.yaml={data}"]
        if not any(o.startswith("scheduler=") for o in overrides) or "scheduler=asha" in overrides:
            cli.append(f"scheduler.grace_period={grace_period}")
    register_configs()
    with initialize_config_module("yolotune.conf", version_base="1.3"):
        cfg = compose("config", overrides=cli)
    with open_dict(cfg):
        if space is not None and not resume:
            cfg.space = {key: _spec(key, value) for key, value in space.items()}
        if not resume:
            cfg.train.update(train_args)
    return run_experiment(cfg, cli)[1]


def _spec(key: str, value: Any):
    if isinstance(value, (dict, str)) and not (isinstance(value, dict) and "grid_search" in value):
        return value
    return from_ray(f"space.{key}", value)
