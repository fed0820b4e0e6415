"""What a Ray worker process changes in Ultralytics and Ray, once, for the trials it runs: Ultralytics'
AMP check once per node and never a download, its own Ray Tune and W&B reporting off, no update check,
and the checkpoints a trial staged moved into Ray's checkpoint folder rather than copied."""

from __future__ import annotations

import json
import os
import re
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Optional

from yolotune.layout import STAGED, write_atomic
from yolotune.storage import cache_root

AMP_CHECK_MODEL = "yolo26n.pt"  # what ultralytics.utils.checks.check_amp loads from its weights dir


def check_amp_once_per_node(weights_dir: Optional[str]) -> None:
    """Ultralytics' trainer runs its AMP check (``check_amp``) in every trial's set-up; in this worker
    process it runs ``node_amp_check`` instead (the trainer calls the name it imported)."""
    import ultralytics.engine.trainer

    ultralytics.engine.trainer.check_amp = partial(node_amp_check, weights_dir=weights_dir)


def node_amp_check(model, weights_dir: Optional[str]) -> bool:
    """Ultralytics' AMP check, run at most once per node and GPU model: later trials read its result
    from yolotune's cache (keyed by the GPU's name and torch's version; a lock makes trials that start
    together wait for the first one's).

    The check loads its model (``yolo26n.pt``) from ``weights_dir``, the driver's copy
    (preflight.amp_check_weights), and downloads nothing: where that folder is not on this node (a
    cluster node), or the driver had none (offline), the check is skipped at once with AMP on, as
    Ultralytics does offline, and the next trial tries again.
    """
    import torch
    from filelock import FileLock
    from ultralytics.utils import checks

    device = next(model.parameters()).device
    if device.type != "cuda":
        return checks.check_amp(model)  # AMP off at once on the CPU, without a model
    gpu = torch.cuda.get_device_name(device)
    record = cache_root() / "amp-check" / f"{re.sub(r'[^A-Za-z0-9.+-]+', '_', gpu)}-torch-{torch.__version__}.json"
    record.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{record}.lock"):
        if record.is_file():
            amp = json.loads(record.read_text())["amp"]
            print(f"yolotune: AMP {'on' if amp else 'off'}, as an earlier trial's AMP check on this node's {gpu} found")
            return amp
        with _no_downloads(weights_dir) as downloads:
            amp = checks.check_amp(model)
        if downloads:
            where = f"in {weights_dir} on this node" if weights_dir else "here: the driver could not fetch it (offline)"
            print(f"yolotune: AMP check skipped, AMP on: its model {AMP_CHECK_MODEL} is not {where}, and trials "
                  "download nothing")
        else:
            write_atomic(record, json.dumps({"amp": bool(amp)}))
        return amp


@contextmanager
def _no_downloads(weights_dir: Optional[str]):
    """Ultralytics with its weights dir at ``weights_dir`` (check_amp reads it at each call) and a model
    that is not there failing at once, as offline (check_amp then skips its check), instead of being
    downloaded; yields the models asked for that were not there."""
    import ultralytics.utils
    from ultralytics.utils import downloads

    asked = []

    def local_only(file, *args, **kwargs):  # Ultralytics asks it for every model it loads, present or not
        if Path(file).is_file():
            return str(file)
        asked.append(file)
        raise ConnectionError("yolotune: trials download nothing")

    saved = ultralytics.utils.WEIGHTS_DIR, downloads.attempt_download_asset
    if weights_dir:
        ultralytics.utils.WEIGHTS_DIR = Path(weights_dir)
    downloads.attempt_download_asset = local_only
    try:
        yield asked
    finally:
        ultralytics.utils.WEIGHTS_DIR, downloads.attempt_download_asset = saved


def move_staged_checkpoints() -> None:
    """Ray copies each reported checkpoint into the trial's checkpoint folder before report returns,
    while the GPU waits: ~10 MB (YOLO11n) to ~350 MB (YOLO11x, AdamW) per trial-epoch. A checkpoint that
    a trial staged on the local file system of that folder is moved into it instead (a rename); Ray's
    checks and bookkeeping around the copy stay as they are, and anything else (an object store, a
    PBT clone) is copied as before. Once per worker process."""
    from pyarrow.fs import LocalFileSystem
    from ray.train._internal import storage

    copy = storage._pyarrow_fs_copy_files
    if getattr(copy, "moves_staged", False):
        return

    def copy_or_move(source, destination, source_filesystem=None, destination_filesystem=None, **kwargs):
        if (Path(source).name.startswith(STAGED) and isinstance(source_filesystem, LocalFileSystem)
                and isinstance(destination_filesystem, LocalFileSystem)):
            try:
                for path in Path(source).iterdir():
                    os.replace(path, Path(destination) / path.name)
                return None
            except OSError:  # another device: what is left is copied
                pass
        return copy(source, destination, source_filesystem=source_filesystem,
                    destination_filesystem=destination_filesystem, **kwargs)

    copy_or_move.moves_staged, copy_or_move.ray_copy = True, copy
    storage._pyarrow_fs_copy_files = copy_or_move


def disable_ultralytics_reporting() -> None:
    """yolotune reports every epoch itself; Ultralytics' Ray Tune and W&B callbacks would report twice.

    Ultralytics adds the callbacks of each enabled integration module to every trainer; emptying
    those modules' callback tables turns them off in this worker process only (its settings file,
    shared with the user, is left alone).
    """
    from ultralytics.utils.callbacks import raytune, wb

    raytune.callbacks.clear()
    wb.callbacks.clear()


def disable_ultralytics_update_check() -> None:
    """YOLO.train asks the package index whether a newer Ultralytics exists (a request of up to 3 s in
    every trial, only to print a line); in this worker process it asks nothing."""
    from ultralytics.utils import checks

    checks.check_pip_update_available = lambda: False
