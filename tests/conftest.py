"""Shared fixtures: offline environment, datasets copied to temp dirs, and real small sweeps.

Every Ray a test starts lives in a temp dir of its own (RAY_TMPDIR): the test ends the processes that
hold files there, and only those, so tests never touch another Ray running on the machine.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATASETS = Path(os.environ.get("YOLOTUNE_SHARED", REPO.parent / "shared")) / "datasets"

# Tests never touch the network, the user's W&B account or their Ultralytics settings: Ultralytics
# writes its settings at first import (its weights and datasets dirs relative to where it ran), so
# they go to a fresh folder of the test run's own, set before any test module can import it.
TEST_HOME = Path(tempfile.mkdtemp(prefix="yolotune-tests-"))
os.environ.update(YOLO_OFFLINE="1", WANDB_MODE="offline", WANDB_SILENT="true", RAY_AUTH_MODE="disabled",
                  YOLO_CONFIG_DIR=str(TEST_HOME / "ultralytics"), WANDB_DIR=str(TEST_HOME / "wandb"))


@pytest.fixture(scope="session", autouse=True)
def _remove_test_home():
    yield
    shutil.rmtree(TEST_HOME, ignore_errors=True)


@pytest.fixture(scope="session")
def coco8(tmp_path_factory) -> Path:
    """coco8 copied from ../shared (read-only in CI) to a writable temp dir; returns its data YAML."""
    if not (SHARED_DATASETS / "coco8" / "coco8.yaml").is_file():
        pytest.skip(f"needs the coco8 dataset at {SHARED_DATASETS / 'coco8'} (or set YOLOTUNE_SHARED to the folder "
                    "that holds datasets/)")
    target = tmp_path_factory.mktemp("datasets") / "coco8"
    shutil.copytree(SHARED_DATASETS / "coco8", target)
    for path in [target, *target.rglob("*")]:
        path.chmod(path.stat().st_mode | 0o200)
    return target / "coco8.yaml"


@pytest.fixture(scope="session")
def shapes_cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("shapes-cache")


def processes_under(root: Path) -> set:
    """The processes (not this one) whose working directory or an open file is under ``root``: a Ray
    started with RAY_TMPDIR=root (raylet, GCS, agents, and workers, which log to files there)."""
    root = str(root)
    found = set()
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            links = [os.readlink(proc / "cwd")] + [os.readlink(fd) for fd in (proc / "fd").iterdir()]
        except OSError:  # ended meanwhile
            continue
        if any(link == root or link.startswith(root + "/") for link in links):
            found.add(int(proc.name))
    return found


def kill_processes_under(root: Path, timeout: float = 30) -> None:
    """SIGKILL what :func:`processes_under` finds (leftover workers too) until nothing is left."""
    deadline = time.time() + timeout
    while pids := processes_under(root):
        assert time.time() < deadline, f"processes under {root} survive SIGKILL: {sorted(pids)}"
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        time.sleep(0.2)


@contextlib.contextmanager
def ray_temp_dir():
    """A Ray temp dir of the test's own (short: Ray's socket paths must fit 107 bytes); on exit, every
    process that still uses it is killed and it is removed."""
    root = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))
    try:
        yield root
    finally:
        kill_processes_under(root)
        shutil.rmtree(root, ignore_errors=True)


def run_cli(*overrides: str, cwd=None, env=None, timeout=900) -> subprocess.CompletedProcess:
    """``python -m yolotune OVERRIDES`` in a subprocess, as a user runs it, with a Ray of its own
    (unless ``env`` names a RAY_TMPDIR) that ends with it."""
    with ray_temp_dir() as ray_tmp:
        return subprocess.run([sys.executable, "-m", "yolotune", *overrides], cwd=cwd or REPO, capture_output=True,
                              text=True, timeout=timeout, env={**os.environ, "RAY_TMPDIR": str(ray_tmp), **(env or {})})


def small_sweep_overrides(storage: Path, shapes_cache: Path, name: str, iterations: int = 6,
                          epochs: int = 3) -> list:
    """A real sweep that takes seconds: tiny shapes dataset, 64 px, yolo11n from its YAML.

    No warm-up and one optimizer step per batch (nbs = batch), so lr0 changes the losses from the
    first epoch, and ASHA has distinct values to rank.
    """
    return [
        f"storage={storage}", f"name={name}", f"iterations={iterations}", "seed=0",
        "data=shapes", "data.train_images=32", "data.val_images=16", "data.imgsz=64", f"data.cache_dir={shapes_cache}",
        "model=yolo11n-scratch", "space=minimal", "~space.warmup_epochs", "warmup_epochs=0",
        "space.lr0.low=1e-5", "space.lr0.high=0.2",
        f"epochs={epochs}", "imgsz=64", "batch=16", "nbs=16",  # bare, as `yolo train` takes them
        "metric=val/box_loss", "mode=min",
        "scheduler=asha", "scheduler.grace_period=1", "scheduler.reduction_factor=2",
    ]


@pytest.fixture(scope="session")
def small_sweep(tmp_path_factory, shapes_cache) -> Path:
    """One finished real sweep shared by the tests that only read its results."""
    storage = tmp_path_factory.mktemp("storage")
    proc = run_cli(*small_sweep_overrides(storage, shapes_cache, "small"))
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return storage / "small"


@pytest.fixture
def ultralytics_log_to_stdout(monkeypatch):
    """Ultralytics' log handlers write to this test's stdout: imported under an earlier test's captured
    output, they may hold a stream that is closed now (a trial's log redirects them)."""
    from ultralytics.utils import LOGGER

    for handler in LOGGER.handlers:
        if type(handler) is logging.StreamHandler:
            monkeypatch.setattr(handler, "stream", sys.stdout)
