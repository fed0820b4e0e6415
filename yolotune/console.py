"""What a running experiment prints, and the experiment's console log.

``live_view(...)`` is a Ray Tune callback in the driver. It keeps one progress line for the
experiment (trials done, trial-epochs run, the best value of the metric and its trial, elapsed
and remaining time) and prints one line per trial event: started, batch cut by Ultralytics,
stopped early, finished, errored, retried after a lost node or worker (and the node it goes on on).
It also asks for the report (trials.csv, plots, report.html) to be refreshed, in a background thread, whenever a trial
ends; the runner's refresh runs in a process of its own (``report.refresh_in_process``), so the driver's
interpreter only waits for it, and ``Refresher`` spaces refreshes by their cost. ``log_to(path)`` copies everything printed into the
experiment's ``yolotune.log``.

On a terminal the progress line is redrawn in place by tqdm: it clears and redraws its line
around our event lines and trims it to the terminal's width, even as the window is resized.
(Neither rich nor tqdm comes with Ultralytics 8.4 or Ray, so yolotune depends on one: tqdm,
which is small, has no dependencies of its own and is what optuna and hyperopt install anyway;
rich would bring markdown-it and pygments along for one line.) Elsewhere (CI, nohup, a pipe) every line is plain text with no control
characters, and progress lines come at most every ``PLAIN_EVERY_S`` seconds when something changed
(every ``PLAIN_HEARTBEAT_S`` when nothing did), plus one after
each trial that ends.

Importing this module does not import Ray (see ``__getattr__``).
"""

from __future__ import annotations

import logging
import sys
import threading
import time
from contextlib import contextmanager, suppress
from datetime import datetime
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional

from yolotune.errors import is_storage_full
from yolotune.layout import TRAIN_LOG, TRAINED_BATCH, TRIAL_RECORD, read_jsonl, trial_dirname

VERBOSE = ("yolotune", "ray", "quiet")  # the config's `verbose`: our live view, Ray's tables, or nothing
PLAIN_EVERY_S = 30.0
PLAIN_HEARTBEAT_S = 600.0  # an unchanged progress line is repeated this rarely, to show the run is alive
TERMINAL_EVERY_S = 1.0
RETRY_S = 2.0
ENDED = ("TERMINATED", "ERROR")


# --- formatting


def duration(seconds: float) -> str:
    s = int(round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def short(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}"
    text = str(value)
    return text if len(text) <= 16 else text[:15] + "…"


def sampled(config: Dict, width: int = 100) -> str:
    """``lr0=0.00188 lrf=0.277 ...``: values to 3 digits, cut after about ``width`` characters."""
    parts, used = [], 0
    items = list(config.items())
    for i, (key, value) in enumerate(items):
        part = f"{key}={short(value)}"
        if parts and used + len(part) > width:
            parts.append(f"(+{len(items) - i} more)")
            break
        parts.append(part)
        used += len(part) + 1
    return " ".join(parts)


def started_line(trial_id: str, config: Dict, resumed: bool = False) -> str:
    return f"trial {trial_id} {'resumed from its checkpoint' if resumed else 'started'}: {sampled(config)}"


def ended_line(trial_id: str, epochs: int, max_epochs: int, metric: str, last, best) -> str:
    how = f"stopped early by the scheduler at epoch {epochs}" if epochs < max_epochs else f"finished {n_epochs(epochs)}"
    return f"trial {trial_id} {how}: {metric} {_number(last)} (best {_number(best)})"


def batch_cut_line(trial_id: str, configured, trained) -> Optional[str]:
    """The line for a trial that trains with a smaller batch than configured (Ultralytics halves it after
    running out of GPU memory in the first epoch); None otherwise, and for a batch AutoBatch sizes
    (configured ``-1`` or a fraction, below any batch)."""
    if trained is None or trained >= configured:
        return None
    return (f"trial {trial_id}: Ultralytics cut the batch from {configured:g} to {trained:g} after running out of "
            "GPU memory")


def node_of(result: Dict) -> str:
    """The node a trial's result came from: its hostname and the start of its Ray node id."""
    return f"{result.get('hostname', '?')} (node {str(result.get('node_id', '?'))[:8]})"


def retry_line(trial_id: str, epochs: int, last_result: Dict, error: str, retry: int, retries: int) -> str:
    return (f"trial {trial_id} lost its worker on {node_of(last_result)} after {n_epochs(epochs)}: {error}; "
            f"retry {retry} of {retries}, from its last checkpoint")


def went_on_line(trial_id: str, result: Dict) -> str:
    return f"trial {trial_id} goes on on {node_of(result)} with epoch {result.get('epoch')}"


def errored_line(trial_id: str, epochs: int, error: str, log: Path) -> str:
    return f"trial {trial_id} errored after {n_epochs(epochs)}: {error}  (log: {log})"


def error_of(text: str, width: int = 160) -> str:
    """The exception line of a traceback (its last non-blank line), cut after ``width`` characters."""
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    line = lines[-1] if lines else "unknown error"
    return line if len(line) <= width else line[:width - 1] + "…"


def n_epochs(n: int) -> str:
    return f"{n} epoch" if n == 1 else f"{n} epochs"


def _number(value) -> str:
    return "-" if value is None else f"{value:.4g}"


def _error(trial) -> str:
    return error_of(Path(trial.error_file).read_text()) if trial.error_file else "unknown error"


def _epoch(trial) -> int:
    return int((trial.last_result or {}).get("epoch", 0) or 0)


# --- the progress line


class Progress:
    """The experiment's progress line, computed from Ray's trial list.

    A trial has ended when its end was announced (``end``), or when it had already ended the first
    time it was seen (a resumed experiment's). Ray's statuses alone would not do: it announces an
    end before it sets the status, and an interrupt sets the running trials TERMINATED unannounced.

    Remaining time: every unfinished trial (and every trial not yet started) is assumed to run
    all ``epochs``, each epoch as long as the mean epoch so far, as many trials at once as have
    run at once (no fewer than the longest trial's remaining epochs take). A trial's first epoch
    in this run is left out of the mean: it includes starting the worker and the data loaders.
    With a scheduler that stops trials early (``prunes``) this is an upper estimate, shown as "up to".
    """

    def __init__(self, metric: str, mode: str, total: int, epochs: int, prunes: bool, now: Optional[float] = None):
        self.metric, self.mode, self.total, self.epochs, self.prunes = metric, mode, total, epochs, prunes
        self.start = time.time() if now is None else now
        self.ended: Dict[str, bool] = {}  # trial id -> errored
        self.seen: set = set()
        self.reported: set = set()  # trials that reported an epoch in this run
        self.epoch_s, self.timed_epochs = 0.0, 0
        self.at_once = 1  # the most trials seen running at once
        self.order: Dict[str, int] = {}  # trial id -> its place in trials.jsonl: ties go to the first, as results rank

    def started(self, trial_id: str) -> None:
        """A trial started, after those before it (in the order trials.jsonl records them)."""
        self.order.setdefault(trial_id, len(self.order))

    def end(self, trial_id: str, errored: bool) -> None:
        self.ended[trial_id] = errored

    def result(self, trial_id: str, seconds: float) -> None:
        """An epoch reported by a trial, ``seconds`` after its previous report (or its start)."""
        if trial_id in self.reported:
            self.epoch_s += seconds
            self.timed_epochs += 1
        self.reported.add(trial_id)

    def done(self, trials: Iterable) -> int:
        return len(self._ended(trials))

    def _ended(self, trials: Iterable) -> Dict[str, bool]:
        for trial in trials:
            if trial.trial_id not in self.seen:
                self.seen.add(trial.trial_id)
                if trial.status in ENDED:
                    self.ended.setdefault(trial.trial_id, trial.status == "ERROR")
        return self.ended

    def line(self, trials, now: Optional[float] = None) -> str:
        trials = list(trials)
        now = time.time() if now is None else now
        ended = self._ended(trials)
        epochs_run = sum(_epoch(t) for t in trials)
        errored = sum(ended.values())
        parts = [f"{len(ended)}/{self.total} trials" + (f" ({errored} errored)" if errored else ""),
                 f"{epochs_run} trial-epochs", self._best(trials),
                 f"{duration(now - self.start)} elapsed"]
        if len(ended) < self.total:
            parts.append(self._left(trials, ended))
        return " | ".join(parts)

    def _best(self, trials) -> str:
        values = [(t.metric_analysis[self.metric][self.mode], t.trial_id) for t in trials
                  if self.metric in (t.metric_analysis or {})]
        if not values:
            return f"best {self.metric} -"
        sign = -1 if self.mode == "max" else 1  # ties: the first trial recorded, not the highest trial id
        value, trial_id = min(values, key=lambda found: (sign * found[0], self.order.get(found[1], len(self.order))))
        return f"best {self.metric} {value:.4g} ({trial_id})"

    def _left(self, trials, ended) -> str:
        unfinished = [t for t in trials if t.trial_id not in ended]
        self.at_once = max(self.at_once, sum(t.status == "RUNNING" for t in unfinished))
        if not self.timed_epochs:
            return "time left: estimating"
        to_go = [max(self.epochs - _epoch(t), 0) for t in unfinished]
        to_go += [self.epochs] * max(self.total - len(trials), 0)
        epochs = max(sum(to_go) / min(self.at_once, len(to_go)), max(to_go))
        return f"{'up to ' if self.prunes else '~'}{duration(epochs * self.epoch_s / self.timed_epochs)} left"


class Throttle:
    """True at most once every ``every_s`` seconds, or when forced."""

    def __init__(self, every_s: float):
        self.every_s, self.last = every_s, None

    def __call__(self, now: float, force: bool = False) -> bool:
        if force or self.last is None or now - self.last >= self.every_s:
            self.last = now
            return True
        return False


# --- output


class Screen:
    """Event lines and the progress line, to stdout (and so to yolotune.log) or, with ``echo=False``,
    to yolotune.log alone."""

    def __init__(self, echo: bool, total: int):
        self.echo, self.stream = echo, sys.stdout
        self.terminal = terminal = getattr(self.stream, "terminal", self.stream)
        self.bar = None
        if echo and terminal.isatty():
            from tqdm import tqdm

            # Written to the terminal only: yolotune.log gets plain progress lines instead.
            self.bar = tqdm(total=total, file=terminal, bar_format="{bar:8} {desc}", dynamic_ncols=True,
                            leave=False)
        self.plain_at, self.plain_news = None, None  # when the last plain progress line was printed, and its news

    def event(self, line: str) -> None:
        if not self.echo:
            return _log_only(line)
        if self.bar:
            self.bar.clear()
        print(line, file=self.stream, flush=True)
        if self.bar:
            self.bar.refresh()

    def progress(self, line: str, done: int, force: bool = False, now: Optional[float] = None) -> None:
        """Redraw the terminal's progress line; print it as a plain line when due (or ``force``)."""
        if self.bar:
            self.bar.n = done
            self.bar.set_description_str(line)
        now = time.time() if now is None else now
        news = " | ".join(line.split(" | ")[:3])  # trials, trial-epochs, best: not the clock
        since = None if self.plain_at is None else now - self.plain_at
        due = since is None or since >= PLAIN_EVERY_S and (news != self.plain_news or since >= PLAIN_HEARTBEAT_S)
        if force or due:
            self.plain_at, self.plain_news = now, news
            if self.bar or not self.echo:
                _log_only(line)
            else:
                print(line, file=self.stream, flush=True)

    def close(self, line: str, shown: bool) -> None:
        """Leave the final progress line on the screen and in the log, once each; ``shown``: it was
        just printed as a plain line (to the log alone, on a terminal)."""
        if self.bar:
            self.bar.close()
            self.bar = None
            if shown:
                print(line, file=self.terminal, flush=True)
                return
        if not shown:
            self.event(line)


class Refresher:
    """Runs ``refresh`` in a background thread when asked. Requests made while it runs coalesce into
    one more run, two never run at once, and its errors are printed as warnings, never raised.

    A refresh's cost grows with the experiment (at 1,000 trials a report took ~40 s), so after each
    one it waits ``(1 - SHARE) / SHARE`` times as long as that one took before the next: refreshing
    takes at most ``SHARE`` of the time, however large the experiment, and the page is at most a few
    refreshes' time old (it says when it was written and the newest epoch it holds)."""

    SHARE = 0.1

    def __init__(self, refresh: Callable[[], None]):
        self.refresh = refresh
        self.wanted, self.closing = threading.Event(), threading.Event()
        self.thread = threading.Thread(target=self._loop, name="yolotune-report", daemon=True)
        self.thread.start()

    def request(self) -> None:
        self.wanted.set()

    def close(self) -> None:
        """Wait for a refresh in progress; drop a pending one (the runner writes the final report)."""
        self.closing.set()
        self.wanted.set()
        self.thread.join()

    def _loop(self) -> None:
        while True:
            self.wanted.wait()
            if self.closing.is_set():
                return
            self.wanted.clear()
            started = time.monotonic()
            for attempt in (1, 2):
                try:
                    self.refresh()
                    break
                except Exception as e:  # noqa: BLE001 - the report is a convenience; trials go on
                    if attempt == 2:
                        print(f"yolotune: warning: could not refresh the report: {e}", file=sys.stderr)
                    else:  # the first failure may be a file Ray was rewriting as it was read
                        time.sleep(RETRY_S)
            self.closing.wait((time.monotonic() - started) * (1 - self.SHARE) / self.SHARE)


# --- the console log


class _Tee:
    """A text stream that writes to the terminal's stream and to the log file."""

    def __init__(self, terminal, log):
        self.terminal, self.log = terminal, log

    def write(self, text: str) -> int:
        self.to_log(text)
        return self.terminal.write(text)

    def to_log(self, text: str) -> None:
        with suppress(OSError):  # a full disk: the console goes on without its copy
            self.log.write(text)

    def flush(self) -> None:
        with suppress(OSError):
            self.log.flush()
        self.terminal.flush()

    def __getattr__(self, name):  # isatty, fileno, encoding...: the terminal's
        return getattr(self.terminal, name)


@contextmanager
def log_to(path: Path):
    """Copy everything printed to stdout and stderr meanwhile into ``path``, appending."""
    log = open(path, "a", buffering=1, encoding="utf-8")
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = _Tee(out, log), _Tee(err, log)
    try:
        sys.stdout.to_log(f"--- {datetime.now().astimezone():%Y-%m-%d %H:%M:%S %z}: {' '.join(sys.argv)}\n")
        yield
    finally:
        sys.stdout, sys.stderr = out, err
        with suppress(OSError):  # what a full disk kept from the log is lost, not the run's outcome
            log.close()


class LibraryNotices(logging.Filter):
    """While entered, the info lines that libraries log in the driver as they set themselves up on a new
    machine (Ultralytics creating its settings file as it is first imported, matplotlib building its
    font cache) stay off the console: into yolotune.log when it is open (``log_to``), else held, to be
    written there when entered again with the log open (a dry run has none: they are dropped). Their
    warnings still show. With ``verbose=ray`` everything shows."""

    LOGGERS = ("ultralytics", "matplotlib.font_manager")  # a logger's filters see only its own records

    def __init__(self, verbose: str):
        super().__init__()
        self.active = verbose != "ray"
        self.held: list = []

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno >= logging.WARNING:
            return True
        self.held.append(f"{record.levelname} {record.name}: {record.getMessage()}\n")
        self._write_held()
        return False

    def _write_held(self) -> None:
        if isinstance(sys.stdout, _Tee):
            for line in self.held:
                sys.stdout.to_log(line)
            self.held.clear()

    def __enter__(self) -> "LibraryNotices":
        if self.active:
            self._write_held()
            for name in self.LOGGERS:
                logging.getLogger(name).addFilter(self)
        return self

    def __exit__(self, *exc) -> None:
        for name in self.LOGGERS:
            logging.getLogger(name).removeFilter(self)


def announce(line: str, verbose: str) -> None:
    """A line about the whole run (its plan): on the console unless quiet, in yolotune.log always."""
    if verbose == "quiet":
        _log_only(line)
    else:
        print(line)


def _log_only(line: str) -> None:
    if isinstance(sys.stdout, _Tee):
        sys.stdout.to_log(line + "\n")


class _RayConsoleFilter(logging.Filter):
    """On Ray's console handler: copies Ray's records to yolotune.log (the handler writes to the
    stderr of import time, which the tee does not see), and with ``live_view`` keeps the ones the
    live view reports itself off the console: trial failures with their tracebacks (one line each
    there, the traceback in the trial's train.log), the list of failed trials, Ray's resume hint, its
    writes that found the storage full (the run stops with one line saying so), and, as a resume
    restores, that trials not started yet have no results."""

    REPORTED = ("Trial task failed", "Trials did not complete", "Experiment has been interrupted",
                "Failed to fetch metrics for")
    FULL = "No space left on device"  # Ray's failed writes to a full storage: the run ends with one line on it

    def __init__(self, live_view: bool):
        super().__init__()
        self.live_view = live_view

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        error = record.exc_info[1] if record.exc_info else None
        _log_only(f"{record.levelname} {record.name}: {message}"
                  + (f"\n{logging.Formatter().formatException(record.exc_info)}" if error is not None else ""))
        full = self.FULL in message or is_storage_full(error)  # a state save's error is in its traceback
        return not (self.live_view and (message.startswith(self.REPORTED) or full))


@contextmanager
def ray_logs(verbose: str):
    """Ray's log records meanwhile: into yolotune.log too, and filtered unless ``verbose`` is ray."""
    handlers, keep = logging.getLogger("ray").handlers, _RayConsoleFilter(verbose != "ray")
    for handler in handlers:
        handler.addFilter(keep)
    try:
        yield
    finally:
        for handler in handlers:
            handler.removeFilter(keep)


# --- the Ray Tune callback


def live_view(exp_dir: Path, metric: str, mode: str, epochs: int, prunes: bool, verbose: str,
              refresh: Callable[[], None], batch):
    """The callback for ``RunConfig(callbacks=...)``; ``refresh()`` rewrites the report; ``batch``: the
    trials' batch unless their config samples one."""
    return sys.modules[__name__].LiveView(exp_dir, metric, mode, epochs, prunes, verbose == "yolotune", refresh,
                                          batch)


def __getattr__(name: str):
    # The callback class subclasses Ray's, so it is built on first use; pickle (Ray's tuner.pkl)
    # finds it here by name.
    if name != "LiveView":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()["LiveView"] = cls = _build_live_view()
    return cls


def _build_live_view():
    from ray.tune import Callback

    class LiveView(Callback):
        def __init__(self, exp_dir: Path, metric: str, mode: str, epochs: int, prunes: bool, echo: bool,
                     refresh: Callable[[], None], batch):
            self.exp_dir, self.metric, self.mode, self.epochs = Path(exp_dir), metric, mode, epochs
            self.prunes, self.echo, self.refresh, self.batch = prunes, echo, refresh, batch

        def __getstate__(self):  # tuner.pkl keeps the settings, not the terminal or the thread
            return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}

        def setup(self, total_num_samples: Optional[int] = None, **info):
            total = total_num_samples or info.get("num_samples") or 0
            self._progress = Progress(self.metric, self.mode, total, self.epochs, self.prunes)
            for event in read_jsonl(self.exp_dir / TRIAL_RECORD)[0]:  # a resumed experiment's trials, in order
                self._progress.started(str(event.get("trial_id")))
            self._screen = Screen(self.echo, total)
            self._refresher = Refresher(self.refresh)
            self._tick, self._last_ended = Throttle(TERMINAL_EVERY_S), False
            self._batch_cut: set = set()  # trials whose cut batch was named
            self._retried: set = set()  # trials retried after a system failure, until their next result

        def on_trial_start(self, iteration, trials, trial, **info):
            self._progress.started(trial.trial_id)  # after the trial recorder's callback wrote it down
            self._last_ended = False
            self._screen.event(started_line(trial.trial_id, trial.config, resumed=_epoch(trial) > 0))

        def on_trial_complete(self, iteration, trials, trial, **info):
            analysis = (trial.metric_analysis or {}).get(self.metric, {})
            line = ended_line(trial.trial_id, _epoch(trial), self.epochs, self.metric, analysis.get("last"),
                              analysis.get(self.mode))
            self._ended(trials, trial, line, errored=False)

        def on_trial_error(self, iteration, trials, trial, **info):
            log = self.exp_dir / trial_dirname(trial.trial_id) / TRAIN_LOG
            self._ended(trials, trial, errored_line(trial.trial_id, _epoch(trial), _error(trial), log), errored=True)

        def on_trial_recover(self, iteration, trials, trial, **info):
            self._last_ended = False
            self._screen.event(retry_line(trial.trial_id, _epoch(trial), trial.last_result or {}, _error(trial),
                                          trial.num_failures, trial.max_failures))
            self._retried.add(trial.trial_id)

        def on_trial_result(self, iteration, trials, trial, result, **info):
            self._progress.result(trial.trial_id, result.get("time_this_iter_s", 0.0))
            self._last_ended = False
            if trial.trial_id in self._retried:
                self._retried.discard(trial.trial_id)
                self._screen.event(went_on_line(trial.trial_id, result))
            line = batch_cut_line(trial.trial_id, trial.config.get("batch", self.batch), result.get(TRAINED_BATCH))
            if line and trial.trial_id not in self._batch_cut:
                self._batch_cut.add(trial.trial_id)
                self._screen.event(line)

        def on_step_end(self, iteration, trials, **info):
            if self._tick(time.time()):
                self._screen.progress(self._progress.line(trials), self._progress.done(trials))

        def on_experiment_end(self, trials, **info):
            self._screen.close(self._progress.line(trials), shown=self._last_ended)
            self._refresher.close()

        def _ended(self, trials, trial, line: str, errored: bool) -> None:
            self._progress.end(trial.trial_id, errored)
            self._screen.event(line)
            done = self._progress.done(trials)
            self._screen.progress(self._progress.line(trials), done, force=True)
            if not self._progress.total or done < self._progress.total:  # after the last: the runner's final report
                self._refresher.request()
            self._last_ended = True

    LiveView.__qualname__ = "LiveView"
    return LiveView
