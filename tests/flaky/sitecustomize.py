"""Test-only fault injection: with this folder on PYTHONPATH and YOLOTUNE_TEST_FAIL_ONCE=MARKER set,
the first Ultralytics training in any process that reaches its second epoch raises, once: it
creates MARKER, and a training that finds MARKER trains on. With YOLOTUNE_TEST_FAIL_HOW=kill it kills
its own process instead (SIGKILL: a lost worker, as a crashed node leaves it). Python imports ``sitecustomize`` at
start-up, in the driver and in every Ray worker (they inherit the environment); yolotune's code is
not touched.
"""

import importlib.abc
import importlib.util
import os
import signal
import sys

MARKER = os.environ.get("YOLOTUNE_TEST_FAIL_ONCE")


def _fail_once_at_second_epoch(trainer):
    if trainer.epoch == 1 and not os.path.exists(MARKER):
        open(MARKER, "w").close()
        if os.environ.get("YOLOTUNE_TEST_FAIL_HOW") == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError("YOLOTUNE_TEST_FAIL_ONCE: a deliberate failure at epoch 2")


class _AfterImport(importlib.abc.MetaPathFinder):
    """Adds the callback to Ultralytics' default callbacks once their module is imported."""
    name = "ultralytics.utils.callbacks.base"

    def find_spec(self, fullname, path, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(fullname)
        exec_module = spec.loader.exec_module

        def exec_and_add(module):
            exec_module(module)
            module.default_callbacks["on_train_epoch_start"].append(_fail_once_at_second_epoch)

        spec.loader.exec_module = exec_and_add
        return spec


if MARKER:
    sys.meta_path.insert(0, _AfterImport())
