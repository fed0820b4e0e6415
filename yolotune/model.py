"""The model group: resolves model.weights in the driver, so a missing download fails once, clearly."""

from __future__ import annotations

from pathlib import Path

from yolotune.errors import ConfigError


def resolve_weights(weights: str) -> str:
    """A model YAML passes as is (Ultralytics builds it); a .pt must be on disk or downloadable."""
    local = Path(weights).expanduser()
    if local.is_file():
        return str(local.resolve())
    if weights.endswith((".yaml", ".yml")):
        return weights
    from ultralytics.utils.downloads import attempt_download_asset

    try:
        path = Path(attempt_download_asset(weights))
    except Exception:  # noqa: BLE001 - offline or unknown asset
        path = None
    if path is None or not path.is_file():
        raise ConfigError("model.weights", weights, "not on disk and cannot be downloaded; use "
                                                    "model=yolo11n-scratch (no download) or a local .pt path")
    return str(path.resolve())
