"""A trial's train.log: everything the trial prints, as plain lines."""

from __future__ import annotations

import logging
import re
import traceback
from contextlib import contextmanager, redirect_stderr, redirect_stdout
from pathlib import Path


@contextmanager
def trial_log(path: Path):
    """Send everything the trial prints to its train.log (appended on resume): stdout, stderr (so
    warnings too), Ultralytics' LOGGER, and the traceback if it raises. The worker process runs
    trial after trial, so all of it is undone when the trial ends, however it ends (a trial stopped
    by the scheduler ends with SystemExit inside ``tune.report``)."""
    from ultralytics.utils import LOGGER

    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", buffering=1, encoding="utf-8") as raw:
        log = _FinishedLines(raw)
        # LOGGER's handler holds the sys.stdout of import time: point it at the log for this trial.
        handlers = [h for h in LOGGER.handlers if type(h) is logging.StreamHandler]
        streams = [h.setStream(log) for h in handlers]
        try:
            with redirect_stdout(log), redirect_stderr(log):
                yield
        except Exception:
            log.write(traceback.format_exc())
            raise
        finally:
            for handler, stream in zip(handlers, streams):
                handler.setStream(stream)
            log.close()


class _FinishedLines:
    """Writes whole lines only: a progress bar redrawn in place (``\\r``) leaves its final state, and
    terminal control sequences are dropped, so train.log reads as plain text."""

    def __init__(self, file):
        self.file, self.line = file, ""

    def write(self, text: str) -> int:
        for part in re.split(r"(\r|\n)", _ANSI.sub("", text)):
            if part == "\n":
                self.file.write(self.line + "\n")
                self.line = ""
            elif part == "\r":
                self.line = ""
            else:
                self.line += part
        return len(text)

    def flush(self) -> None:  # a line in progress waits for its end
        self.file.flush()

    def close(self) -> None:
        if self.line:
            self.file.write(self.line + "\n")
        self.file.flush()

    def isatty(self) -> bool:
        return False


_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
