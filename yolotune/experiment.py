"""The experiment directory ``<storage>/<name>/``: naming, the saved config, resume lookup, and
turning a composed config (fresh, or saved by an earlier run) into the typed ExperimentConfig."""

from __future__ import annotations

import os
import secrets
import shlex
import subprocess
import sys
import tempfile
from datetime import datetime
from pathlib import Path
from typing import Optional, Sequence, Tuple

from omegaconf import DictConfig, OmegaConf

from yolotune.config import SCHEMAS, DataConfig, ExperimentConfig, ShapesDataConfig
from yolotune.errors import ConfigError
from yolotune.layout import PROVENANCE, SAVED_CONFIG, is_finished, storage_dir, write_atomic

# What a resume may change: how trials run, not what they search.
RESUMABLE_KEYS = ("resume", "resume_errored", "name", "storage", "resources", "wandb", "failure", "ray", "verbose",
                  "hydra")


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """Typed experiment from a composed or saved config; each group gets its option's schema."""
    raw = OmegaConf.to_container(cfg, resolve=True)
    raw.pop("hydra", None)
    scheduler, search, data = raw.pop("scheduler"), raw.pop("search"), raw.pop("data")
    train, space = raw.pop("train"), raw.pop("space")  # as given: merging would bring back removed keys
    exp = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw))
    exp.train, exp.space = train, space
    exp.scheduler = _typed("scheduler", scheduler, SCHEMAS["scheduler"].get(scheduler.get("type")))
    exp.search = _typed("search", search, SCHEMAS["search"].get(search.get("type")))
    exp.data = _typed("data", data, ShapesDataConfig if data.get("yaml") == "shapes" else DataConfig)
    return exp


def _typed(group: str, node: dict, schema):
    if schema is None:
        allowed = ", ".join(SCHEMAS[group])
        raise ConfigError(f"{group}.type", node.get("type"), f"one of {allowed}")
    return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))


def new_name() -> str:
    return f"{datetime.now():%Y%m%d-%H%M%S}-{secrets.token_hex(2)}"


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


def find_resumable(storage: Path, name: Optional[str]) -> Path:
    if name:
        exp_dir = storage / name
        if not (exp_dir / SAVED_CONFIG).is_file():
            raise ConfigError("name", name, f"no yolotune experiment at {exp_dir}")
        return exp_dir
    candidates = [p.parent.parent for p in storage.glob(f"*/{SAVED_CONFIG}") if not is_finished(p.parent.parent)]
    if not candidates:
        raise ConfigError("resume", True, f"no unfinished experiment under {storage}; start one without resume=true")
    return max(candidates, key=lambda p: (p / SAVED_CONFIG).stat().st_mtime)


def resume_config(cfg: DictConfig, overrides: Sequence[str]) -> Tuple[DictConfig, Path]:
    """The saved config of the experiment to resume, with this run's harmless overrides applied."""
    changed = [_override_key(o) for o in overrides]
    for key, text in zip(changed, overrides):
        if key.split(".")[0] not in RESUMABLE_KEYS:
            raise ConfigError(key, text.split("=", 1)[-1], "cannot change on resume (it would change the search); "
                              f"allowed: {', '.join(RESUMABLE_KEYS[:-1])}")
    exp_dir = find_resumable(storage_dir(cfg.storage), cfg.name)
    saved = load_saved_config(exp_dir)
    for key in changed:
        if key.split(".")[0] != "hydra":
            OmegaConf.update(saved, key, OmegaConf.select(cfg, key), merge=False, force_add=True)
    saved.resume, saved.name = True, exp_dir.name
    return saved, exp_dir


def load_saved_config(exp_dir: Path) -> DictConfig:
    saved = OmegaConf.load(exp_dir / SAVED_CONFIG)
    saved.pop("defaults", None)
    saved.pop("hydra", None)
    return saved


def _override_key(override: str) -> str:
    return override.split("=", 1)[0].lstrip("+~").split("@")[0]
