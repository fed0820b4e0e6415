"""Ultralytics train arguments, fixed (``train``) or tuned (``space``): which exist, which are
yolotune's to set, and Ultralytics' own type and range rules for their values.

``check_names`` reads Ultralytics' cfg/default.yaml as a file (no import); ``check_values`` runs
Ultralytics' own ``check_cfg`` and so imports it: the runner calls it before Ray starts.
"""

from __future__ import annotations

import difflib
import importlib.util
import math
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterator, Set, Tuple

import yaml

from yolotune.errors import ConfigError
from yolotune.layout import first_line

# Arguments that yolotune sets itself, and where to set them instead.
OWNED = {
    "model": "set model.weights, or tune it as a choice: "
             "space.model={dist: choice, values: [yolo11n.yaml, yolo11s.yaml]}",
    "data": "set data.yaml (or pick a data option)",
    "project": "yolotune writes each trial's output in its trial directory",
    "name": "yolotune writes each trial's output in its trial directory",
    "exist_ok": "yolotune writes each trial's output in its trial directory",
    "resume": "set the top-level resume=true",
    "mode": "yolotune only trains",
    "task": "the model's task: pick a model of the task (yolo11n-seg.yaml, yolo11n-cls.yaml, ...; docs/tasks.md)",
    "device": "each trial trains on the GPU share Ray assigns it (or the CPU); set resources.gpu_per_trial",
}
# Fixed for every trial, never tuned: the trial's budget and what its reports rely on.
NOT_TUNABLE = {
    "epochs": "the trial budget; set train.epochs",
    "val": "schedulers and rankings need each epoch's validation; set train.val",
    "save": "trials report last.pt as their checkpoint; keep save=true",
}


@lru_cache(maxsize=1)
def ultralytics_defaults() -> dict:
    """The installed Ultralytics cfg/default.yaml, read as a file (no import)."""
    spec = importlib.util.find_spec("ultralytics")
    if spec is None or spec.origin is None:
        raise ConfigError("ultralytics", None, "not installed: pip install ultralytics")
    with open(Path(spec.origin).parent / "cfg" / "default.yaml") as f:
        return yaml.safe_load(f)


def ultralytics_args() -> Set[str]:
    return set(ultralytics_defaults())


def _check_name(key: str, name: str, value: Any) -> None:
    args = ultralytics_args()
    if name not in args:
        close = difflib.get_close_matches(name, sorted(args), n=1)
        hint = f"did you mean {key.rpartition('.')[0]}.{close[0]}?" if close else "see Ultralytics' cfg/default.yaml"
        raise ConfigError(key, value, f"not an Ultralytics train argument; {hint}")


def check_names(exp) -> None:
    """Every fixed and tuned key is a train argument that the user may set, and none is both."""
    for name in exp.dists:
        _check_name(f"space.{name}", name, shown(exp.space[name]))
        if name == "model" and exp.dists[name].values is not None:
            continue  # a choice of models (model.py checks each)
        if name in OWNED or name in NOT_TUNABLE:
            raise ConfigError(f"space.{name}", shown(exp.space[name]), {**OWNED, **NOT_TUNABLE}[name])
    for name, value in exp.train.items():
        _check_name(f"train.{name}", name, value)
        if name in OWNED:
            raise ConfigError(f"train.{name}", value, OWNED[name])
        if name in exp.space:
            raise ConfigError(f"train.{name}", value, f"{name} is tuned in space.{name}; fix it or tune it, not both")
    if exp.train.get("save", True) is not True:
        raise ConfigError("train.save", exp.train["save"], "trials report last.pt as their checkpoint every epoch; "
                                                           "keep save=true")


def shown(spec: Any) -> str:
    """A space entry as a refusal shows it: its string, or {...} for a mapping."""
    return spec if isinstance(spec, str) else "{...}"


def candidate_values(exp) -> Iterator[Tuple[str, str, Any]]:
    """(key shown to the user, train argument, value) for every fixed value and every end of every
    range and every choice of the space: what a trial may pass to Ultralytics."""
    for name, value in exp.train.items():
        yield f"train.{name}", name, value
    for name, dist in exp.dists.items():
        if dist.values is not None:
            for i, value in enumerate(dist.values):
                yield f"space.{name}.values[{i}]", name, value
        else:
            yield f"space.{name}.low", name, dist.low
            yield f"space.{name}.high", name, dist.high


def check_values(exp) -> None:
    """Ultralytics' own type and range rules (``check_cfg``), plus the image size and batch rules it
    applies later in training, for every value a trial may get."""
    from ultralytics.cfg import check_cfg

    for key, name, value in candidate_values(exp):
        _check_value(key, name, value)
        try:
            check_cfg({name: value}, hard=True)
        except (TypeError, ValueError) as e:
            raise ConfigError(key, value, _allowed(str(e))) from None


def _check_value(key: str, name: str, value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(key, value, "a finite number")
    if name == "imgsz":
        sizes = value if isinstance(value, list) else [value]
        if not sizes or len(sizes) > 2 or not all(type(s) is int and 32 <= s <= 8192 for s in sizes):
            raise ConfigError(key, value, "an integer image size from 32 to 8192 (or [height, width])")
    if name == "batch":
        autobatch = isinstance(value, float) and 0 < value < 1
        if not (autobatch or (type(value) is int and (value >= 1 or value == -1))):
            raise ConfigError(key, value, "an integer >= 1, -1 (AutoBatch) or a GPU memory fraction in (0, 1)")


def _allowed(message: str) -> str:
    """Ultralytics' "'k=v' is an invalid value. Valid 'k' values are ..." without its first sentence."""
    text = first_line(message)
    head, _, rest = text.partition(". ")
    return rest.rstrip(".") if head.startswith("'") and rest else text
