"""The wandb group: one W&B run per trial, grouped per experiment, plus a summary run."""

from __future__ import annotations

import importlib.util

from yolotune.errors import ConfigError


def check_wandb(cfg) -> None:
    if importlib.util.find_spec("wandb") is None:
        raise ConfigError("wandb", cfg.mode, "needs wandb: pip install 'yolotune[wandb]'")
