"""The command line as a YOLO user types it, and Hydra's composition errors as one line.

- ``epochs=50 imgsz=320`` (bare Ultralytics train arguments, as ``yolo train`` takes them) mean
  ``train.epochs=50 train.imgsz=320``; ``train.KEY=VALUE`` adds KEY without Hydra's ``+``, and
  ``space.KEY=...`` adds an entry.
- ``select=latency_ms<=5`` is quoted for Hydra, whose grammar has no ``<`` or ``>`` outside quotes.
- ``space.lr0={dist: choice, values: [...]}`` replaces the entry (Hydra would merge it into the
  old one, keeping fields of the old distribution).
- A composition error (unknown key or option, wrong type, bad syntax) becomes a ConfigError that
  names the key, the value and what is allowed, with the nearest valid key.
"""

from __future__ import annotations

import difflib
import re
from importlib import resources
from typing import Dict, Iterable, List, Optional, Sequence

from omegaconf import DictConfig, open_dict

from yolotune.config import top_level_keys, unknown_key_hint
from yolotune.errors import ConfigError
from yolotune.layout import first_line

# Hydra's flags that take a value, whose value is not an override.
_FLAGS_WITH_VALUE = {"--config-path", "-cp", "--config-name", "-cn", "--config-dir", "-cd", "--package", "-p",
                     "--cfg", "-c", "--info", "--experimental-rerun", "--shell-completion"}
_KEY = re.compile(r"^([+~]{0,2})([\w./@-]+)(=(.*))?$", re.S)


def group_options() -> Dict[str, List[str]]:
    """Each config group and its options, from the conf/ shipped with yolotune."""
    conf = resources.files("yolotune.conf")
    return {group.name: sorted(f.name.removesuffix(".yaml") for f in group.iterdir() if f.name.endswith(".yaml"))
            for group in sorted(conf.iterdir(), key=lambda g: g.name)
            if group.is_dir() and group.name not in ("hydra", "__pycache__")}


def normalize(argv: Sequence[str]) -> List[str]:
    """Rewrite YOLO-style train arguments and space entries into Hydra overrides."""
    from yolotune.train_args import ultralytics_args

    out, skip = [], False
    groups, keys = group_options(), set(top_level_keys())
    for arg in argv:
        if skip or arg.startswith("-"):
            out.append(arg)
            skip = arg in _FLAGS_WITH_VALUE
            continue
        match = _KEY.match(arg)
        if match is None or match.group(3) is None:
            out.append(arg)
            continue
        prefix, key, value = match.group(1), match.group(2), match.group(4)
        if not prefix and key not in keys and key not in groups and "." not in key and key in ultralytics_args():
            arg = f"++train.{key}={value}"
        elif prefix in ("", "+") and key.split(".")[0] in ("train", "space") and key.count(".") == 1:
            arg = f"++{key}={value}"  # a new train argument, or a space entry that replace_space_entries replaces
        elif prefix in ("", "+") and (key + ".").startswith("ray.runtime_env."):
            arg = f"++{key}={value}"  # Ray's own mapping, empty by default: its keys are new to Hydra
        elif key == "select" and re.search(r"[<>]", value) and value[:1] not in "'\"":
            arg = f"{prefix}select='{value}'"  # Hydra's grammar has no < or > outside quotes
        out.append(arg)
    return out


def replace_space_entries(cfg: DictConfig, overrides: Sequence[str]) -> None:
    """``space.NAME=<mapping or DIST(...)>`` replaces the entry instead of merging into it."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    for override in OverridesParser.create().parse_overrides(list(overrides)):
        key = override.key_or_group
        if override.is_delete() or not key.startswith("space.") or key.count(".") != 1:
            continue
        value = override.value()
        if isinstance(value, (dict, str)):
            with open_dict(cfg):
                cfg.space[key.split(".", 1)[1]] = value


def composition_error(error: Exception, argv: Sequence[str]) -> Optional[ConfigError]:
    """The ConfigError for an error Hydra raised while reading the command line or composing; None
    for anything else (a bug: its traceback stays)."""
    from hydra.errors import ConfigCompositionException, MissingConfigException, OverrideParseException
    from omegaconf.errors import OmegaConfBaseException

    causes = list(_chain(error))
    if not any(isinstance(e, (ConfigCompositionException, MissingConfigException, OverrideParseException,
                              OmegaConfBaseException)) for e in causes):
        return None
    overrides = [a for a in argv if "=" in a or a.startswith("~")]
    missing = next((e for e in causes if isinstance(e, MissingConfigException)), None)
    if missing is not None:
        return _missing_option(missing, overrides)
    if isinstance(error, OverrideParseException):
        bad = next((o for o in overrides if not _parses(o)), overrides[-1] if overrides else "")
        key, _, value = bad.partition("=")
        return ConfigError(key.lstrip("+~"), value, f"not a valid override value ({first_line(str(error))}); "
                                                    "quote values with special characters: key='a,b'")
    omega = next((e for e in causes if isinstance(e, OmegaConfBaseException)), None)
    key = _failed_key(causes, omega)
    value = _value_of(key, overrides)
    if omega is not None and "not in" in str(omega).split("\n")[0] or "is not in struct" in str(omega):
        return ConfigError(key, value, unknown_key_hint(key, str(omega)))
    if omega is not None:
        return ConfigError(key, value, _type_hint(first_line(str(omega).split("\n")[0])))
    return ConfigError(key or "override", value, first_line(str(error)))


def _parses(override: str) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    try:
        OverridesParser.create().parse_overrides([override])
    except OverrideParseException:
        return False
    return True


def _chain(error: BaseException) -> Iterable[BaseException]:
    while error is not None:
        yield error
        error = error.__cause__ or error.__context__


def _missing_option(error, overrides: Sequence[str]) -> ConfigError:
    groups = group_options()
    text = str(error)
    match = re.search(r"Could not find '([^']+)'", text) or re.search(r"Could not load '([^']+)'", text)
    path = match.group(1) if match else ""
    group, _, option = path.rpartition("/")
    group = group.lstrip("/")
    if group in groups:
        close = difflib.get_close_matches(option, groups[group], n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        return ConfigError(group, option, f"one of {', '.join(groups[group])}{hint}")
    return ConfigError(path or "config", "", first_line(text))


def _failed_key(causes, omega) -> str:
    for e in causes:
        match = re.search(r"Could not (?:override|append to config|delete from config)[^']*'([^']+)'", str(e))
        if match:
            return match.group(1)
        match = re.search(r"Error merging override (\S+?)=", str(e))
        if match:
            return match.group(1).lstrip("+~")
    full_key = getattr(omega, "full_key", None)
    return full_key or ""


def _value_of(key: str, overrides: Sequence[str]) -> str:
    for override in reversed(overrides):  # the last one wins, as in Hydra
        name, _, value = override.partition("=")
        if name.lstrip("+~") == key:
            return value
    return ""


def _type_hint(message: str) -> str:
    """OmegaConf's "Value 'ten' of type 'str' could not be converted to Integer" -> "an integer"."""
    match = re.search(r"could not be converted to (\w+)", message)
    if match:
        return {"Integer": "an integer", "Float": "a number", "Boolean": "true or false",
                "String": "a string"}.get(match.group(1), f"a {match.group(1).lower()}")
    if "is not Optional" in message or "cannot be assigned None" in message:
        return "a value (not null)"
    if "is not a valid bool" in message:
        return "true or false"
    if "is not a ListConfig" in message:
        return "a list, e.g. [a, b]"
    return message
