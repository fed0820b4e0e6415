"""Composing configs in-process, as the CLI does, and the option files that exist in conf/."""

from __future__ import annotations

from pathlib import Path

from hydra import compose, initialize_config_module

from yolotune.config import register_configs, to_experiment

REPO = Path(__file__).resolve().parents[1]
register_configs()


def options(group: str) -> list:
    """Every option of a group: the YAML files in conf/<group>/ (a new file is tested with no edit here)."""
    return sorted(p.stem for p in (REPO / "conf" / group).glob("*.yaml"))


def compose_config(*overrides: str):
    with initialize_config_module("yolotune.conf", version_base="1.3"):
        return compose("config", overrides=list(overrides))


def experiment(*overrides: str):
    return to_experiment(compose_config(*overrides))
