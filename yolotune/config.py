"""The typed experiment: assembles the config groups, each defined in its own module.

Each group has a base dataclass; each option of a group is a subclass (or, for groups with one
shape, the class itself). The subclasses are stored in Hydra's ConfigStore as
``schema_<group>_<type>`` (outside any group, so that --help and shell completion do not offer
them) for the YAML files in ``conf/<group>/`` to extend. ``ExperimentConfig`` types each group by its base
class, so OmegaConf rejects unknown keys and wrong types at composition. Composing and validating
import nothing heavy: no torch, Ray or Ultralytics.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
import tempfile
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from typing import Any, Dict, List, Optional
from urllib.parse import parse_qs, urlsplit

from omegaconf import MISSING, DictConfig, OmegaConf

from yolotune.console import VERBOSE
from yolotune.data import DataConfig
from yolotune.errors import ConfigError, check_range
from yolotune.layout import first_line, storage_dir
from yolotune.storage import Location, is_uri
from yolotune import objectives
from yolotune.model import DEFAULT_SPACES, ModelConfig, is_reported, reported_metrics
from yolotune.resources import ResourcesConfig
from yolotune.schedulers import SchedulerConfig
from yolotune.search import SearchConfig
from yolotune.space import Dist, parse_space
from yolotune.wandb_logging import WandbConfig

# Ultralytics' default when train.epochs is not given (its cfg/default.yaml).
DEFAULT_EPOCHS = 100
ADDRESS = re.compile(r"^(ray://)?[\w.-]+:\d{1,5}$")
# A name is one safe path component under storage.
NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.=+-]{0,127}$")
DURATION = re.compile(r"^(\d+(?:\.\d+)?)([smh]?)$")
# When trials validate: at the epochs their scheduler decides on (and their last), or every epoch.
VALIDATE = ("decisions", "every")


@dataclass
class FailureConfig:
    # retries of a trial after a system failure (a lost node or worker), from its last checkpoint
    max_failures: int = 2


@dataclass
class CheckpointConfig:
    every: int = 1  # epochs between a trial's checkpoints (its last epoch always has one)
    # ended trials outside the best `keep` lose their weights (retention.py); null: every trial keeps them
    keep: Optional[int] = 10


@dataclass
class BudgetConfig:
    time: Optional[str] = None  # null: no limit; 2h, 90m, 3600s or plain seconds

    @property
    def seconds(self) -> Optional[float]:
        if self.time is None:
            return None
        match = DURATION.match(str(self.time).strip())
        seconds = float(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600}[match[2]] if match else 0
        if not seconds:
            raise ConfigError("budget.time", self.time, "a time > 0: 2h, 90m, 3600s or seconds (null: no limit)")
        return seconds

    def check(self, exp) -> None:
        self.seconds  # noqa: B018 - parsing is the check


@dataclass
class RayConfig:
    address: Optional[str] = None  # null: a private local Ray; "auto" or host:port: an existing cluster
    runtime_env: Dict[str, Any] = field(default_factory=dict)


@dataclass
class ExperimentConfig:
    space: Dict[str, Any] = field(default_factory=dict)
    scheduler: SchedulerConfig = MISSING
    search: SearchConfig = MISSING
    resources: ResourcesConfig = field(default_factory=ResourcesConfig)
    data: DataConfig = MISSING
    model: ModelConfig = field(default_factory=ModelConfig)
    wandb: WandbConfig = field(default_factory=WandbConfig)
    failure: FailureConfig = field(default_factory=FailureConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    ray: RayConfig = field(default_factory=RayConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
    iterations: int = 10
    name: Optional[str] = None  # null: a new unique name
    storage: str = "runs/tune"
    resume: bool = False
    resume_errored: bool = False
    dry_run: bool = False  # every check and the plan, no sweep
    metric: str = "fitness"
    mode: str = "max"
    objectives: List[str] = field(default_factory=list)  # [] or NAME:MODE entries, the first metric:mode
    select: Optional[str] = None  # with objectives: the constraints the selected trial meets (objectives.py)
    seed: Optional[int] = None
    verbose: str = "yolotune"  # yolotune: a live view | ray: Ray Tune's tables | quiet: the final summary only
    validate: str = "decisions"  # decisions: only at the scheduler's decision epochs and the last | every: each epoch
    train: Dict[str, Any] = field(
        default_factory=lambda: {"epochs": DEFAULT_EPOCHS, "imgsz": 640, "batch": 16, "optimizer": "SGD"})

    @property
    def epochs(self) -> int:
        return self.train.get("epochs", DEFAULT_EPOCHS)

    def validation_epochs(self) -> Optional[List[int]]:
        """The epochs a trial validates (sorted), or None: every epoch. A trial also validates the epoch
        that ends past the time budget (trainable.py), and Ultralytics always validates its final one."""
        if self.validate == "every" or self.search.replaces_scheduler:  # BOHB: its own HyperBand, every epoch
            return None
        epochs = self.scheduler.decision_epochs(self)
        return None if epochs is None else sorted(epochs)

    @cached_property
    def dists(self) -> Dict[str, Dist]:
        """The space, parsed (and checked) into typed distributions."""
        return parse_space(self.space)


# Each group with options of several shapes: its base class (options are the subclasses).
GROUPS = {"scheduler": SchedulerConfig, "search": SearchConfig, "data": DataConfig}
# Groups whose options share one shape: the ExperimentConfig field's type is the schema.
PLAIN_GROUPS = {"resources": ResourcesConfig, "model": ModelConfig, "wandb": WandbConfig}


def options(group: str) -> Dict[str, type]:
    """The option classes of a group, by their ``type``."""
    return {cls.type: cls for cls in GROUPS[group].__subclasses__()}


def register_configs() -> None:
    """Store the experiment schema and each option's schema for the YAML files to extend."""
    from hydra.core.config_store import ConfigStore

    cs = ConfigStore.instance()
    cs.store(name="yolotune_schema", node=ExperimentConfig)
    # hydra.sweep.dir: the multirun summary goes to storage's local mirror when storage is a URI
    OmegaConf.register_new_resolver("yolotune_local", lambda storage: str(Location(storage).local), replace=True)
    for group in GROUPS:
        for name, cls in options(group).items():
            cs.store(name=f"schema_{group}_{name}", node=cls)


def to_experiment(cfg: DictConfig) -> ExperimentConfig:
    """The typed experiment from a composed config, or from one saved by an earlier run (which has
    lost its types: each group's option class is found again by its ``type``)."""
    try:
        plain = OmegaConf.to_container(cfg, resolve=True)
    except Exception as e:  # noqa: BLE001 - an interpolation that does not resolve
        raise _omegaconf_error(e) from None
    if not isinstance(plain, dict):
        raise ConfigError("config", plain, "a mapping")
    for key in ("hydra", "defaults"):
        plain.pop(key, None)
    train, space = plain.pop("train", None), plain.pop("space", None)  # as given: merging would bring back removed keys
    for key, value in (("train", train), ("space", space)):
        if not isinstance(value, dict):
            raise ConfigError(key, value, "a mapping")
    train = {k: v for k, v in train.items() if v is not None}  # null: unset (a preset that tunes a fixed key)
    raw = literal(plain)
    _refuse_unknown_keys(raw, ExperimentConfig, "")
    for group in GROUPS:
        raw[group] = _typed(group, raw.get(group))
    try:
        exp = OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(ExperimentConfig), raw))
    except Exception as e:  # noqa: BLE001 - OmegaConf's validation errors name the key
        raise _omegaconf_error(e) from None
    exp.train, exp.space = train, task_space(space, exp.model.task)
    return exp


def task_space(space: Dict[str, Any], task: str) -> Dict[str, Any]:
    """The space trials tune: the default space, unchanged, is the model's task's default (conf/space/)."""
    if task == "detect" or space != _space_option("default"):
        return space
    return _space_option(DEFAULT_SPACES[task])


def _space_option(name: str) -> Dict[str, Any]:
    import yaml

    return yaml.safe_load((resources.files("yolotune.conf") / "space" / f"{name}.yaml").read_text())


def _typed(group: str, node: Any) -> DictConfig:
    found = options(group)
    kind = node.get("type") if isinstance(node, dict) else None
    if kind not in found:
        raise ConfigError(f"{group}.type", kind, f"one of {', '.join(found)}")
    _refuse_unknown_keys(node, found[kind], f"{group}.")
    try:
        return OmegaConf.merge(OmegaConf.structured(found[kind]), node)
    except Exception as e:  # noqa: BLE001
        raise _omegaconf_error(e, prefix=f"{group}.") from None


def _refuse_unknown_keys(node: dict, schema: type, prefix: str) -> None:
    known = {f.name for f in dataclasses.fields(schema)}
    for key, value in node.items():
        if key not in known:
            name = f"{prefix}{key}"  # a saved config edited by hand may have a number as a key
            raise ConfigError(name, value, unknown_key_hint(name, f"not in '{schema.__name__}'"))


def top_level_keys() -> List[str]:
    return [f.name for f in dataclasses.fields(ExperimentConfig)]


def unknown_key_hint(key: str, message: str) -> str:
    """What the key could have been: the nearest key of its node, or the options that have it."""
    head, _, last = key.rpartition(".")
    group = head.split(".")[0]
    option = re.search(r"not in '(\w+)'", message)
    found = {cls.__name__: (name, cls) for name, cls in options(group).items()} if group in GROUPS \
        else {}
    if option and option.group(1) in found and head == group:
        name, cls = found[option.group(1)]
        keys = [f.name for f in dataclasses.fields(cls) if f.name != "type"]
        owners = [option for kind, c in options(group).items() if last in {f.name for f in dataclasses.fields(c)}
                  for option in options_of_type(group, kind)]
        if owners:
            return f"{group}={name} has no {last} (its keys: {', '.join(keys) or 'none'}); pick an option that " \
                   f"has it first: {' or '.join(f'{group}={o}' for o in owners)}"
        candidates = keys
        close = difflib.get_close_matches(last, candidates, n=1)
        return f"not a key of {group}={name}" + (f"; did you mean {group}.{close[0]}?" if close else
                                                  f" (its keys: {', '.join(keys) or 'none'})")
    candidates = _keys_under(head)
    close = difflib.get_close_matches(last, candidates, n=1)
    if close:
        return f"not a key of {head or 'the experiment'}; did you mean {head + '.' if head else ''}{close[0]}?"
    if not head:
        return ("not a key of the experiment nor an Ultralytics train argument "
                "(docs/configuration/index.md lists the keys)")
    return f"not a key of {head} (its keys: {', '.join(candidates) or 'none'})"


def options_of_type(group: str, kind: str) -> List[str]:
    """The conf/<group>/ options whose schema is that group's option ``kind``."""
    conf = resources.files("yolotune.conf") / group
    return sorted(f.name.removesuffix(".yaml") for f in conf.iterdir()
                  if f.name.endswith(".yaml") and f"/schema_{group}_{kind}@" in f.read_text())


def _keys_under(head: str) -> List[str]:
    if not head:
        return [*top_level_keys()]
    root = head.split(".")[0]
    if root in GROUPS:
        return sorted({f.name for cls in options(root).values() for f in dataclasses.fields(cls)})
    node = OmegaConf.structured(ExperimentConfig)
    try:
        sub = OmegaConf.select(node, head)
        return list(sub.keys()) if isinstance(sub, DictConfig) else []
    except Exception:  # noqa: BLE001 - a path that does not exist has no keys
        return []


def literal(value: Any) -> Any:
    """Values as given: OmegaConf would read ``${...}`` in a string as an interpolation."""
    if isinstance(value, str):
        return value.replace("${", "\\${")
    if isinstance(value, dict):
        return {k: literal(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [literal(v) for v in value]
    return value


def _omegaconf_error(e: Exception, prefix: str = "") -> ConfigError:
    key = getattr(e, "full_key", None) or ""
    message = getattr(e, "msg", str(e)).split("\n")[0]
    return ConfigError(prefix + key if key else prefix.rstrip(".") or "config", "", message)


def validate(exp: ExperimentConfig) -> None:
    """Every rule that needs no heavy import: each group checks itself, then the rules across groups.
    Raises ConfigError naming the key, the value and what is allowed."""
    from yolotune import train_args

    exp.dists  # parses the space: a bad entry fails here
    train_args.check_names(exp)
    check_range("train.epochs", exp.epochs, 1, None, "an integer >= 1", integer=True)
    check_range("iterations", exp.iterations, 1, None, "an integer >= 1 (the number of trials)", integer=True)
    if exp.mode not in ("max", "min"):
        raise ConfigError("mode", exp.mode, "max or min")
    task = exp.model.task
    if not is_reported(exp.metric, task):
        metrics = reported_metrics(task)
        shown = [m for m in metrics if not m.startswith("val/")] + [next(m for m in metrics if m.startswith("val/"))]
        whose = "" if task == "detect" else f" of a {task} model"
        raise ConfigError("metric", exp.metric, f"a reported metric{whose}: {', '.join(shown)}, ...")
    objectives.check(exp, lambda name: is_reported(name, task))
    if exp.name is not None and not NAME.match(exp.name):
        raise ConfigError("name", exp.name, "one folder name: letters, digits and _ . = + - (not starting with "
                                            "'.' or '-'), at most 128 characters")
    if exp.seed is not None:
        check_range("seed", exp.seed, 0, 2**32 - 1, "an integer from 0 to 2**32-1 (null: random)", integer=True)
    check_range("failure.max_failures", exp.failure.max_failures, 0, None, "an integer >= 0", integer=True)
    check_range("checkpoint.every", exp.checkpoint.every, 1, exp.epochs,
                f"an integer from 1 to train.epochs ({exp.epochs}): epochs between checkpoints", integer=True)
    if exp.checkpoint.keep is not None:
        check_range("checkpoint.keep", exp.checkpoint.keep, 1, None,
                    "an integer >= 1: the ended trials that keep their weights, the best first (null: all)",
                    integer=True)
    check_storage(exp.storage)
    exp.budget.check(exp)
    address = exp.ray.address
    if address is not None and address != "auto" and not ADDRESS.match(address):
        raise ConfigError("ray.address", address, "null (a private local Ray), auto, or a cluster's host:port "
                                                  "(ray://host:port for Ray Client)")
    _check_optimizer(exp)
    if exp.verbose not in VERBOSE:
        raise ConfigError("verbose", exp.verbose, f"one of {', '.join(VERBOSE)}")
    if exp.validate not in VALIDATE:
        raise ConfigError("validate", exp.validate, f"one of {', '.join(VALIDATE)} (decisions: only at the epochs "
                                                    "the scheduler decides on, and the last)")

    for group in (*GROUPS, *PLAIN_GROUPS):
        getattr(exp, group).check(exp)
    if exp.train.get("val", True) is False:
        if exp.search.replaces_scheduler:  # BOHB stops trials whatever the scheduler group says
            raise ConfigError("train.val", False, f"search={exp.search.type} stops trials with its own scheduler, on "
                                                  "per-epoch validation metrics; keep val=true or use search=random "
                                                  "with scheduler=fifo")
        if exp.scheduler.needs_validation:
            raise ConfigError("train.val", False, f"scheduler={exp.scheduler.type} stops trials on per-epoch "
                                                  "validation metrics; keep val=true or use scheduler=fifo")


def check_storage(storage: str) -> None:
    """A storage yolotune can create its folders in: a URI it resolves, or a local directory whose
    nearest existing part takes a new folder (tried: /proc, /sys, read-only mounts and missing
    permissions each say no in their own way; the trial folder is removed at once)."""
    if not storage or "\n" in storage:
        raise ConfigError("storage", storage, "a directory path")
    if is_uri(storage):
        _check_storage_uri(storage)
        return
    path = storage_dir(storage)
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ConfigError("storage", storage, f"a directory; {existing} is a file")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".yolotune-probe-", dir=existing))
    except OSError as e:
        raise ConfigError("storage", storage, f"a writable directory; cannot create a folder in {existing}: "
                                              f"{e.strerror}") from None


def _check_storage_uri(storage: str) -> None:
    """A URI that pyarrow resolves and that holds no secret: the saved config records it."""
    parts = urlsplit(storage)
    if parts.username or parts.password or {"access_key", "secret_key", "session_token"} & set(parse_qs(parts.query)):
        raise ConfigError("storage", storage, "a URI without credentials; give them as AWS_ACCESS_KEY_ID/"
                                              "AWS_SECRET_ACCESS_KEY or AWS_PROFILE in every node's environment")
    from pyarrow.fs import FileSystem

    try:
        FileSystem.from_uri(storage)
    except Exception as e:  # noqa: BLE001 - an unknown scheme or malformed URI
        raise ConfigError("storage", storage, f"a directory or a URI pyarrow resolves (s3://bucket/prefix, gs://...): "
                                              f"{first_line(str(e))}") from None


def _check_optimizer(exp: ExperimentConfig) -> None:
    ignored = sorted({"lr0", "momentum"} & set(exp.space))
    if ignored and exp.train.get("optimizer", "auto") == "auto":
        raise ConfigError("train.optimizer", "auto", f"Ultralytics' auto optimizer ignores {' and '.join(ignored)}, "
                                                     "which space tunes; set train.optimizer=SGD (or AdamW, ...)")
