"""The model group: the weights every trial starts from, loaded once in the driver so that a
missing download or a broken file fails before Ray starts, in one line. A space may tune the model
too (``space.model: choice([yolo11n.yaml, yolo11s.yaml])``): each choice is checked and loaded the same way."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path

from omegaconf import MISSING

from yolotune.errors import ConfigError
from yolotune.layout import first_line
from yolotune.storage import fetch_checked, is_uri, node_file

SUFFIXES = (".pt", ".yaml", ".yml")


@dataclass
class ModelConfig:
    weights: str = MISSING  # a .pt file (pretrained) or a model YAML (from scratch); each option names one

    def check(self, exp) -> None:
        check_weights("model.weights", self.weights)
        tuned = exp.dists.get("model")
        for i, weights in enumerate(tuned.values if tuned is not None and tuned.values is not None else []):
            check_weights(f"space.model.values[{i}]", weights)

    def resolve(self) -> str:
        """A local file's absolute path, or an Ultralytics model YAML or asset name, after loading it once.
        Weights in a store stay a URI: each node loads its own copy (storage.node_file)."""
        return resolve_weights("model.weights", self.weights)


def check_weights(key: str, weights: str) -> None:
    """``model.weights`` or a tuned model (``space.model``): a .pt file or a model YAML."""
    if not isinstance(weights, str) or not weights.split("?")[0].endswith(SUFFIXES) or "\n" in weights:
        raise ConfigError(key, weights, "a .pt file or a model YAML such as yolo11n.yaml")
    if is_uri(weights):
        return  # fetched in resolve_weights()
    local = Path(weights).expanduser()
    if local.exists() and not local.is_file():
        raise ConfigError(key, weights, "a file (this is a directory)")


def resolve_weights(key: str, weights: str) -> str:
    """``weights`` as trials load it (see ModelConfig.resolve), loaded once here."""
    local = Path(weights).expanduser()
    if is_uri(weights):
        resolved = str(fetch_checked(key, weights, node_file, "it"))
    elif local.is_file():
        resolved = str(local.resolve())
    elif weights.endswith(".pt"):
        resolved = _download(key, weights)
    else:
        resolved = weights  # a model YAML of Ultralytics' (yolo11n.yaml): built from its package
    try:
        from ultralytics import YOLO

        YOLO(resolved)
    except Exception as e:  # noqa: BLE001 - whatever makes Ultralytics refuse the file
        raise ConfigError(key, weights, f"Ultralytics cannot load it: {first_line(str(e))}") from None
    return weights if is_uri(weights) else resolved


def _download(key: str, weights: str) -> str:
    from ultralytics.utils import LOGGER
    from ultralytics.utils.downloads import attempt_download_asset

    level = LOGGER.level
    LOGGER.setLevel(logging.ERROR)  # its offline warnings would bury the one line that says what to do
    try:
        path = Path(attempt_download_asset(weights))
    except Exception:  # noqa: BLE001 - offline or unknown asset
        path = None
    finally:
        LOGGER.setLevel(level)
    if path is None or not path.is_file():
        raise ConfigError(key, weights, "not on disk and cannot be downloaded; use model=yolo11n-scratch (no "
                                        "download) or a local .pt path")
    return str(path.resolve())
