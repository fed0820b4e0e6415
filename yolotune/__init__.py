"""yolotune: declarative Hydra experiments that tune Ultralytics YOLO on Ray Tune.

``yolotune.tune(...)`` runs an experiment from Python; ``yolotune.load(path)`` reads one.
Both are imported on first use, so ``import yolotune`` (and composing a config) stays light.
"""

__version__ = "0.1.0"
__all__ = ["tune", "load"]


def __getattr__(name):
    if name == "tune":
        from yolotune.api import tune

        return tune
    if name == "load":
        from yolotune.results import load

        return load
    raise AttributeError(f"module 'yolotune' has no attribute {name!r}")
