"""yolotune: declarative Hydra experiments that tune Ultralytics YOLO on Ray Tune.

``yolotune.tune(...)`` runs an experiment from Python; ``yolotune.load(path)`` reads one.
Both are imported on first use, so ``import yolotune`` (and composing a config) stays light.
"""

import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"
__all__ = ["tune", "load"]


def _use_checkout_conf() -> None:
    """Imported from a checkout (``python -m yolotune`` in its root imports this folder, not the installed
    package), ``yolotune.conf`` is the checkout's top-level ``conf/``, which the wheel and an editable
    install map there: its configs are the ones this source reads and the user edits."""
    checkout = Path(__file__).resolve().parent.parent
    conf = checkout / "conf"
    if not ((checkout / "pyproject.toml").is_file() and (conf / "__init__.py").is_file()):
        return  # an installed package: its own yolotune/conf
    spec = importlib.util.spec_from_file_location(f"{__name__}.conf", conf / "__init__.py",
                                                  submodule_search_locations=[str(conf)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    globals()["conf"] = module  # as an import of the submodule binds it


_use_checkout_conf()


def __getattr__(name):
    if name == "tune":
        from yolotune.api import tune

        return tune
    if name == "load":
        from yolotune.results import load

        return load
    raise AttributeError(f"module 'yolotune' has no attribute {name!r}")
