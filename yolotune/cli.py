"""``python -m yolotune``: compose the Hydra config, validate it, run the experiment."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence, Tuple

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, open_dict

from yolotune import experiment, layout
from yolotune.config import ExperimentConfig, register_configs
from yolotune.errors import ConfigError
from yolotune.validation import validate

register_configs()


def prepare(cfg: DictConfig, overrides: Sequence[str]) -> Tuple[ExperimentConfig, Path, DictConfig]:
    """Resolve resume and the experiment name, and validate: nothing heavy runs here."""
    if cfg.resume:
        cfg, exp_dir = experiment.resume_config(cfg, overrides)
    else:
        with open_dict(cfg):
            cfg.name = cfg.name or experiment.new_name()
        exp_dir = layout.storage_dir(cfg.storage) / cfg.name
        if (exp_dir / layout.SAVED_CONFIG).exists():
            raise ConfigError("name", cfg.name, f"{exp_dir} already holds an experiment; resume it with "
                                                "resume=true or choose another name")
    exp = experiment.to_experiment(cfg)
    validate(exp)
    return exp, exp_dir, cfg


def run_experiment(cfg: DictConfig, overrides: Sequence[str]):
    """Run the experiment; returns its directory and Ray's ResultGrid."""
    exp, exp_dir, cfg = prepare(cfg, overrides)
    from yolotune.runner import run

    return exp_dir, run(exp, exp_dir, lambda: experiment.save_config(exp_dir, cfg, overrides))


@hydra.main(config_path="pkg://yolotune.conf", config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from yolotune.multirun import run_job

        def job():
            exp_dir, _ = run_experiment(cfg, overrides)
            return exp_dir, layout.is_finished(exp_dir)

        run_job(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, overrides, job)
        return
    try:
        exp_dir, grid = run_experiment(cfg, overrides)
    except ConfigError as e:
        print(f"yolotune: error: {e}", file=sys.stderr)
        sys.exit(2)
    if not layout.is_finished(exp_dir):
        sys.exit(130)  # interrupted: the conventional exit code of a Ctrl-C
    if grid.num_terminated == 0:
        sys.exit(1)  # every trial errored


def main() -> None:
    if sys.argv[1:2] == ["results"]:  # `yolotune results PATH`
        from yolotune.results_cli import main as results_main

        sys.exit(results_main(sys.argv[2:]))
    _main()
