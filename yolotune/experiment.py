"""An experiment's life in its directory ``<storage>/<name>/``: its name, the saved config and
provenance that make it re-runnable, finding the experiment that ``resume=true`` continues (where it
is now: it may have been moved or copied), and the lock that lets one process at a time run it."""

from __future__ import annotations

import fcntl
import os
import secrets
import shlex
import socket
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from yolotune.errors import ConfigError
from yolotune.config import NAME
from yolotune.layout import (PROVENANCE, RUN_LOCK, SAVED_CONFIG, TUNER_STATE, first_line, is_experiment, is_finished,
                             write_atomic)
from yolotune.storage import Location

# What a resume may change: how trials run, not what they search.
RESUMABLE_KEYS = ("resume", "resume_errored", "dry_run", "name", "storage", "resources", "wandb", "failure", "ray", "verbose",
                  "budget", "validate",
                  "hydra")


def new_name() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


class RunLock:
    """Held by the one process that runs an experiment, from its start (or resume) to its end: an
    flock on ``.running`` in the experiment dir, which the kernel releases when the process ends,
    however it ends, so a killed run leaves no stale lock. For an object store it is taken in the
    local mirror: it keeps out runs on this machine only."""

    def __init__(self, exp_dir: Path):
        self.exp_dir = exp_dir
        self._file = None

    def acquire(self) -> None:
        self.exp_dir.mkdir(parents=True, exist_ok=True)
        lock = os.fdopen(os.open(self.exp_dir / RUN_LOCK, os.O_RDWR | os.O_CREAT, 0o644), "r+")
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = lock.read().strip() or "another process"
            lock.close()
            raise ConfigError("name", self.exp_dir.name, f"in use: {holder} is running it; wait for it to end "
                                                         "(a killed run holds it no more)") from None
        lock.truncate()
        lock.write(f"yolotune process {os.getpid()} on {socket.gethostname()}\n")
        lock.flush()
        self._file = lock

    def release(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def create(exp_dir: Path, lock: RunLock, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Make a new experiment's dir, locked, with its saved config: refused if another run (started at
    the same moment with the same name) made it since prepare() found the name free."""
    lock.acquire()
    if is_experiment(exp_dir):
        raise ConfigError("name", exp_dir.name, "another yolotune run started an experiment of this name meanwhile; "
                                                "choose another name")
    save_config(exp_dir, cfg, overrides)


def save_config(exp_dir: Path, cfg: DictConfig, overrides: Sequence[str]) -> None:
    """Write the composed config the way Hydra does (.hydra/config.yaml, .hydra/overrides.yaml)."""
    hydra_dir = exp_dir / ".hydra"
    hydra_dir.mkdir(parents=True, exist_ok=True)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    # defaults and searchpath make the file a primary config that re-runs the experiment as it was:
    #   python -m yolotune --config-path <storage>/<name>/.hydra name=null
    plain = {"defaults": [{"hydra": "yolotune"}, "_self_"], "hydra": {"searchpath": ["pkg://yolotune.conf"]},
             **plain}
    write_atomic(hydra_dir / "config.yaml", OmegaConf.to_yaml(plain))
    write_atomic(hydra_dir / "overrides.yaml", OmegaConf.to_yaml(list(overrides)))
    save_provenance(exp_dir)


def save_provenance(exp_dir: Path) -> None:
    """What re-running needs besides the config: the command, the versions, the code's git state."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {"python": sys.version.split()[0]}
    for package in ("yolotune", "ultralytics", "ray", "torch", "hydra-core", "wandb"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            versions[package] = None
    via_cli = Path(sys.argv[0]).name in ("__main__.py", "yolotune")
    argv = ["python", "-m", "yolotune", *sys.argv[1:]] if via_cli else [Path(sys.executable).name, *sys.argv]
    info = {"command": shlex.join(argv),
            "cwd": os.getcwd(), "started": datetime.now().astimezone().isoformat(timespec="seconds"),
            "versions": versions, "git": _git_state(Path.cwd())}
    write_atomic(exp_dir / PROVENANCE, OmegaConf.to_yaml(info))


def _git_state(cwd: Path) -> Optional[dict]:
    def git(*args) -> str:
        return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain")),
                "root": git("rev-parse", "--show-toplevel")}
    except (OSError, subprocess.CalledProcessError):
        return None  # not a git checkout, or no git


def started(exp_dir: Path) -> bool:
    """Whether Ray Tune started the experiment (and saved what a resume restores)."""
    return (exp_dir / SAVED_CONFIG).is_file() and (exp_dir / TUNER_STATE).is_file()


def open_storage(storage: str) -> Location:
    """The storage; an object store is probed first, so that a wrong endpoint, bucket or credentials
    fail here, in one line, before anything is written."""
    location = Location(storage)
    problem = location.check_reachable() if location.remote else None
    if problem:
        raise ConfigError("storage", storage, f"cannot use it: {problem} (endpoint: AWS_ENDPOINT_URL, credentials: "
                                              "AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY or AWS_PROFILE)")
    return location


def find_resumable(storage: Location, name: Optional[str]) -> Path:
    """The experiment's local dir (for an object store: its small files, downloaded to the cache)."""
    if name:
        if not NAME.match(name):
            raise ConfigError("name", name, "one folder name under storage (letters, digits, _ . = + -)")
        uri = storage.child(name).uri
        exp_dir = storage.child(name).download()
        if not started(exp_dir):
            raise ConfigError("name", name, f"no started yolotune experiment at {uri}")
        return exp_dir  # a finished one too: its resume shows its results (cli.run_experiment)
    root = storage.download()
    candidates = [p.parent.parent for p in root.glob(f"*/{SAVED_CONFIG}")
                  if started(p.parent.parent) and not is_finished(p.parent.parent)]
    if not candidates:
        raise ConfigError("resume", True, f"no unfinished experiment under {storage.uri}; start one without resume=true")
    return max(candidates, key=lambda p: (p / SAVED_CONFIG).stat().st_mtime)


def resume_config(cfg: DictConfig, overrides: Sequence[str]) -> Tuple[DictConfig, Path]:
    """The saved config of the experiment to resume, with this run's harmless overrides applied."""
    changed = [_override_key(o) for o in overrides]
    for key, text in zip(changed, overrides):
        if key.split(".")[0] not in RESUMABLE_KEYS:
            raise ConfigError(key, text.split("=", 1)[-1], "cannot change on resume (it would change the search); "
                              f"allowed: {', '.join(RESUMABLE_KEYS[:-1])}")
    exp_dir = find_resumable(open_storage(cfg.storage), cfg.name)
    saved = load_saved_config(exp_dir)
    check_tuner_state(exp_dir)
    for key in changed:
        if key.split(".")[0] != "hydra":
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    # The storage it was found in, not the one it started in: it may have been moved or copied since
    # (Ray's Tuner.restore takes it from there too, checkpoints included).
    saved.resume, saved.name, saved.storage = True, exp_dir.name, cfg.storage
    return saved, exp_dir


def load_saved_config(exp_dir: Path) -> DictConfig:
    """The config an experiment saved; ConfigError when it is damaged."""
    try:
        saved = OmegaConf.load(exp_dir / SAVED_CONFIG)
    except Exception as e:  # noqa: BLE001 - unreadable YAML, or not a mapping
        raise ConfigError("name", exp_dir.name, f"its saved config {SAVED_CONFIG} is unreadable: "
                                                f"{first_line(str(e))}") from None
    if not isinstance(saved, DictConfig):
        raise ConfigError("name", exp_dir.name, f"its saved config {SAVED_CONFIG} is not a mapping")
    saved.pop("defaults", None)
    saved.pop("hydra", None)
    return saved


def check_tuner_state(exp_dir: Path) -> None:
    """Ray's saved state, read through without loading it (that would import Ray and run its code): a
    cut or damaged file is one line here rather than Ray's traceback once it has started."""
    import pickletools

    try:
        for _ in pickletools.genops((exp_dir / TUNER_STATE).read_bytes()):
            pass
    except Exception as e:  # noqa: BLE001 - pickletools raises ValueError and others on bad data
        raise ConfigError("name", exp_dir.name, f"its Ray state {TUNER_STATE} is damaged ({first_line(str(e))}); "
                                                "results still read it (yolotune results), but it cannot resume") from None


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@")[0]
