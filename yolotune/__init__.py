"""yolotune: declarative Hydra experiments that tune Ultralytics YOLO on Ray Tune."""

__version__ = "0.1.0"
