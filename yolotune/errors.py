"""The one error a user's mistake raises: it names the key, the value and what is allowed; and the
one a full storage stops a run with."""

from __future__ import annotations

import errno
import math
from typing import Optional


class ConfigError(ValueError):
    def __init__(self, key: str, value: object, allowed: str):
        self.key, self.value, self.allowed = key, value, allowed
        super().__init__(f"{key}={_show(value)}: {allowed}")


def _show(value: object) -> str:
    """The value as the user typed it: strings bare, newlines visible."""
    text = value if isinstance(value, str) else repr(value)
    return text.replace("\n", "\\n") if text != "" else "''"


def check_range(key: str, value: object, low: Optional[float], high: Optional[float], allowed: str,
                integer: bool = False) -> None:
    """A finite number (an integer if ``integer``) in [low, high]; either bound may be None."""
    is_number = isinstance(value, int) if integer else isinstance(value, (int, float))
    if (isinstance(value, bool) or not is_number or not math.isfinite(value)
            or (low is not None and value < low) or (high is not None and value > high)):
        raise ConfigError(key, value, allowed)


class StorageFull(Exception):
    """The storage filled up while the experiment ran: the run stopped there, resumable (one line)."""


def is_storage_full(error: Optional[BaseException]) -> bool:
    """Whether ``error``, or an error that led to it, is a write that found no space left (or no quota).
    Ray keeps a trial's own exception in ``cause`` and re-raises a callback's inside a TuneError."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
            return True
        error = getattr(error, "cause", None) or error.__cause__ or error.__context__
    return False
