"""The model group: the weights every trial starts from, loaded once in the driver so that a
missing download or a broken file fails before Ray starts, in one line."""

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
        if not self.weights.split("?")[0].endswith(SUFFIXES) or "\n" in self.weights:
            raise ConfigError("model.weights", self.weights, "a .pt file or a model YAML such as yolo11n.yaml")
        if is_uri(self.weights):
            return  # fetched in resolve()
        local = Path(self.weights).expanduser()
        if local.exists() and not local.is_file():
            raise ConfigError("model.weights", self.weights, "a file (this is a directory)")

    def resolve(self) -> str:
        """A local file's absolute path, or an Ultralytics model YAML or asset name, after loading it once.
        Weights in a store stay a URI: each node loads its own copy (storage.node_file)."""
        local = Path(self.weights).expanduser()
        if is_uri(self.weights):
            weights = str(fetch_checked("model.weights", self.weights, node_file, "it"))
        elif local.is_file():
            weights = str(local.resolve())
        elif self.weights.endswith(".pt"):
            weights = self._download()
        else:
            weights = self.weights  # a model YAML of Ultralytics' (yolo11n.yaml): built from its package
        try:
            from ultralytics import YOLO

            YOLO(weights)
        except Exception as e:  # noqa: BLE001 - whatever makes Ultralytics refuse the file
            raise ConfigError("model.weights", self.weights, f"Ultralytics cannot load it: {first_line(str(e))}") \
                from None
        return self.weights if is_uri(self.weights) else weights

    def _download(self) -> str:
        from ultralytics.utils import LOGGER
        from ultralytics.utils.downloads import attempt_download_asset

        level = LOGGER.level
        LOGGER.setLevel(logging.ERROR)  # its offline warnings would bury the one line that says what to do
        try:
            path = Path(attempt_download_asset(self.weights))
        except Exception:  # noqa: BLE001 - offline or unknown asset
            path = None
        finally:
            LOGGER.setLevel(level)
        if path is None or not path.is_file():
            raise ConfigError("model.weights", self.weights, "not on disk and cannot be downloaded; use "
                                                             "model=yolo11n-scratch (no download) or a local .pt path")
        return str(path.resolve())
