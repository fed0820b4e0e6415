"""Turns a validated experiment into a Ray Tune ``Tuner``, runs it, and writes the results."""

from __future__ import annotations

import contextlib
import logging
import math
import os
import shlex
import shutil
import signal
import socket
import tempfile
import threading
import time
from functools import partial
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

import yaml

from yolotune import console, layout
from yolotune.config import ExperimentConfig
from yolotune.data import check_readable_on_every_node
from yolotune.errors import ConfigError, StorageFull, is_storage_full
from yolotune.layout import trial_dirname
from yolotune.preflight import amp_check_weights, local_gpus, preflight, ultralytics_quiet
from yolotune.resources import Node, TrialResources, check_autobatch, local_cpus, plan
from yolotune.space import to_ray_space
from yolotune.storage import Location, is_uri


# Ray's TensorBoard logger only warns about Ultralytics' metric names; W&B is the dashboard here.
# A forced state snapshot per checkpoint is what keeps a SIGKILL from losing finished epochs.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")
# How long a reused worker may take to end its trial (trainable._release); Ray's 2 s can be too short
# for data loader processes to exit on a busy machine, and the next trial then fails to start.
os.environ.setdefault("TUNE_FUNCTION_THREAD_TIMEOUT_S", "30")
# Epochs without validation report no metric (trainable.py; validate=decisions): not an error here.
# The driver checks results; yolotune checks the metric's name itself (config.validate).
os.environ["TUNE_DISABLE_STRICT_METRIC_CHECKING"] = "1"
# The settings above that Ray reads in the trials' workers: on a cluster those do not inherit the
# driver's environment, so they go to every node's workers in the job's runtime_env (_ray_init_args).
WORKER_ENV = ("TUNE_FUNCTION_THREAD_TIMEOUT_S",)


def run(exp: ExperimentConfig, exp_dir: Path, save_config: Callable[[], None]):
    """Run (or resume) the experiment in ``exp_dir`` and return Ray's ResultGrid.

    ``save_config`` creates the experiment directory; it is called once the weights, data and
    resources are known to be usable, so a run that cannot start leaves nothing behind.
    """
    import ray
    from ray import tune

    from yolotune import report, retention
    from yolotune.results import load
    from yolotune.trainable import train_trial

    location = Location(exp.storage).child(exp_dir.name)
    if exp.verbose != "ray":  # Ray's new output engine prints tables even at verbose=0; the legacy one is silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"
    notices = console.LibraryNotices(exp.verbose)
    with notices, ultralytics_quiet(exp):
        job, resources = preflight(exp, exp_dir)
    wandb_settings = None
    if exp.wandb.mode != "disabled":
        from yolotune.wandb_logging import trial_settings

        wandb_settings = trial_settings(exp, exp_dir, job["train"])
    started = not ray.is_initialized()
    if started:
        if exp.ray.address is not None:
            check_reachable(exp.ray.address)
        else:  # a private Ray on the loopback interface: its notice that token auth is on is noise here
            logging.getLogger("ray._private.authentication").setLevel(logging.ERROR)
        ray.init(**_ray_init_args(exp))
    log = contextlib.ExitStack()
    resumable = False  # once the Tuner has saved tuner.pkl
    try:
        if exp.ray.address is not None:
            resources = plan(exp.resources, cluster_nodes(), exp.iterations, job.pop("gpu_mb", None))
            check_autobatch(exp, resources.gpu)
            local_files = [p for p in (job["data"], job["weights"]) if os.path.isabs(p)]  # not URIs: fetched per node
            check_readable_on_every_node(local_files)
        job["threads"] = resources.threads
        job["gpu_per_trial"] = resources.gpu
        job.pop("gpu_mb", None)
        job["image_cache_mb"] = resources.image_cache_mb
        job["train"].setdefault("workers", resources.loader_workers)  # within the trial's CPUs (GPU only)
        if resources.gpu and job["train"].get("amp", True) not in (False, "fp32", "bf16"):
            job["amp_weights_dir"] = amp_check_weights()
        if not exp.resume:
            save_config()
        # This run's plan (a resume may run on other machines, or with other resources)
        layout.write_atomic(exp_dir / layout.PLAN, yaml.safe_dump(resources.record(), sort_keys=False))
        written = exp_dir.rglob("*") if not exp.resume else [exp_dir / layout.PLAN]
        location.upload(*(p for p in written if p.is_file() and p.name != layout.RUN_LOCK))  # a lock is local
        log.enter_context(console.log_to(exp_dir / layout.CONSOLE_LOG))
        log.enter_context(notices)  # those of the preflight, and any later, into yolotune.log
        log.enter_context(console.ray_logs(exp.verbose))
        console.announce(resources.summary(), exp.verbose)
        budget = time_budget(math.ceil(time.time() + exp.budget.seconds) if exp.budget.time else None)
        job["deadline"] = budget.deadline  # trials checkpoint the epoch that ends after it
        trainable = tune.with_resources(tune.with_parameters(train_trial, job=job),
                                        {"cpu": resources.cpu, "gpu": resources.gpu})
        if exp.resume:
            tuner = tune.Tuner.restore(location.uri, trainable, resume_unfinished=True,
                                       resume_errored=exp.resume_errored)
            _use_this_runs_callbacks(tuner, exp, location, budget)
        else:
            tuner = _new_tuner(exp, location, trainable, resources, wandb_settings, budget)
        resumable = True
        location.delete(layout.BUDGET_MARKER)  # this run's budget decides
        _handle_trial_failures()
        _save_state_after_its_upload()
        TRIAL_FOUND_STORAGE_FULL.clear()
        grid = tuner.fit()
        if TRIAL_FOUND_STORAGE_FULL.is_set():
            raise StorageFull(storage_full_line(exp, exp_dir))  # results would not fit either: resume writes them
        if any(o.split(":")[0] == "latency_ms" for o in exp.objectives):  # no trial runs now: the device is idle
            from yolotune.model_costs import measure_alone

            measure_alone(location, bool(resources.gpu))
        with ultralytics_quiet(exp):
            results = load(location.download())  # the trials' histories, from the store
            written = export_best(results, location)
            if results.finished or not exp.scheduler.clones_checkpoints:  # the last trials have ended too
                retention.prune(results, location, exp.checkpoint.keep)
        if budget.expired:
            (exp_dir / layout.BUDGET_MARKER).touch()
            written.append(exp_dir / layout.BUDGET_MARKER)
        written += report.write_all(results).values()
        print("\n" + report.summary(results))
        if wandb_settings:
            from yolotune.wandb_logging import log_experiment_summary

            log_experiment_summary(exp_dir, wandb_settings)
        if results.finished:
            layout.mark_finished(exp_dir)
            written.append(exp_dir / layout.DONE_MARKER)
        elif budget.expired:
            print(f"\nThe time budget ({exp.budget.time}) ended the experiment after {results.trial_count} trials; "
                  f"every finished epoch is saved. Go on (with a new budget) with:\n  {resume_command(exp, exp_dir)}")
        else:  # interrupted (Ctrl-C): Ray saved the state; say how to go on
            print(f"\nInterrupted; every finished epoch is saved. Resume with:\n  {resume_command(exp, exp_dir)}")
        location.upload(*written, exp_dir / layout.CONSOLE_LOG)
        return grid
    except KeyboardInterrupt:
        # A second Ctrl-C during the graceful stop (Ray's handler takes the first only): stop at once.
        # Ray saved the experiment's state with every checkpoint, so it resumes as after a kill.
        if resumable:
            print("\nStopped at once; every checkpointed epoch is saved. Resume with:\n  "
                  + resume_command(exp, exp_dir), flush=True)
        raise
    except Exception as e:
        if not is_storage_full(e):  # in the driver, or a trial's (_handle_trial_failures)
            raise
        raise StorageFull(storage_full_line(exp, exp_dir)) from None
    finally:
        log.close()
        if started:
            ray.shutdown()


def finished_results(exp: ExperimentConfig, exp_dir: Path):
    """A finished experiment's summary, printed, and Ray's ResultGrid of it, read from its saved state:
    ``resume=true`` of it runs nothing (Ray's Tuner.restore(...).get_results() reads it the same way)."""
    from ray.tune import ExperimentAnalysis, ResultGrid

    from yolotune import report
    from yolotune.results import load

    location = Location(exp.storage).child(exp_dir.name)
    with ultralytics_quiet(exp):
        print(report.summary(load(exp_dir)))
    print("\nFinished: every trial has ended, nothing was run again (resume_errored=true re-runs errored ones).")
    single = not exp.objectives  # with objectives Tune had no metric (see _new_tuner)
    return ResultGrid(ExperimentAnalysis(location.fs_path, storage_filesystem=location.fs,
                                         default_metric=exp.metric if single else None,
                                         default_mode=exp.mode if single else None))


def time_budget(deadline: Optional[float]):
    """The TimeBudget callback for a run that must end at ``deadline`` (a time.time() in whole seconds;
    None: never)."""
    return (globals().get("TimeBudget") or __getattr__("TimeBudget"))(deadline)


def __getattr__(name: str):
    # The callback class subclasses Ray's, so it is built on first use; pickle (Ray's tuner.pkl)
    # finds it here by name.
    if name != "TimeBudget":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()["TimeBudget"] = cls = _build_time_budget()
    return cls


def _build_time_budget():
    from ray.tune import Callback

    class TimeBudget(Callback):
        """Ends tuner.fit() once the time is up and every trial running then has ended its epoch
        (its report carries a checkpoint, see trainable.py): the way Ctrl-C does, so Ray saves the
        trials as unfinished and resume=true continues them. (Ray's own TuneConfig(time_budget_s)
        stops trials mid-epoch and marks them TERMINATED: a restored Tuner has nothing left to run.)"""

        def __init__(self, deadline: Optional[float]):
            self.deadline = deadline
            self.expired = False
            self.waiting: set = set()  # trials running when the time was up, until their epoch ends
            self.stopped = False

        def on_step_begin(self, iteration, trials, **info):
            if self.deadline is None or self.stopped or time.time() < self.deadline:
                return
            if not self.expired:
                self.expired = True
                # Not those whose last epoch already ended past it (they said so): they wait for the stop
                # (trainable.py).
                self.waiting = {t.trial_id for t in trials if t.status == "RUNNING"
                                and (t.last_result or {}).get(layout.PAST_DEADLINE) != self.deadline}
            if not self.waiting:  # checked a step after the last report: Ray has saved its checkpoint
                self.stopped = True
                os.kill(os.getpid(), signal.SIGINT)  # Ray Tune's handler: stop, save the experiment state

        def on_trial_result(self, iteration, trials, trial, result, **info):
            # The trial decides, from when its epoch's training ended: before the deadline, it trains on.
            if result.get(layout.PAST_DEADLINE) == self.deadline:
                self.waiting.discard(trial.trial_id)

        def on_trial_complete(self, iteration, trials, trial, **info):
            self.waiting.discard(trial.trial_id)

        def on_trial_error(self, iteration, trials, trial, **info):
            self.waiting.discard(trial.trial_id)

    TimeBudget.__qualname__ = "TimeBudget"  # pickled by reference (yolotune.runner.TimeBudget), not by value
    return TimeBudget


def _new_tuner(exp: ExperimentConfig, location: Location, trainable, resources: TrialResources, wandb_settings,
               budget):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from yolotune.records import trial_recorder

    from ray.tune.search import Searcher

    space = exp.dists
    search = exp.search.build(exp, resources.max_concurrent_trials)
    # trial_recorder: trials.jsonl; the live view: the console
    callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), trial_recorder(), _live_view(exp, location), budget]
    if wandb_settings:  # W&B runs live in the driver, not in the trials' workers (see wandb_logging.py)
        from yolotune.wandb_logging import tune_callback

        callbacks.append(tune_callback(wandb_settings))
    return tune.Tuner(
        trainable,
        param_space=to_ray_space(space),
        tune_config=tune.TuneConfig(
            # With objectives Tune gets no metric: it would replace OptunaSearch's list of them.
            metric=None if exp.objectives else exp.metric, mode=None if exp.objectives else exp.mode,
            num_samples=exp.iterations,
            scheduler=exp.search.build_scheduler(exp) if exp.search.replaces_scheduler
            else exp.scheduler.build(exp, space),
            search_alg=search,
            # Ray limits a Searcher by wrapping it; random search's generator limits itself (search.py), and
            # given the limit too, Ray would only warn that it ignores it
            max_concurrent_trials=resources.max_concurrent_trials if isinstance(search, Searcher) else None,
            reuse_actors=True,  # one warm worker runs trial after trial: no torch import per trial
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=Path(location.fs_path).name, storage_path=exp.storage if location.remote else str(location.local.parent),
            # Trials on nodes that share no directory with the driver write into Ray's trial dir,
            # which Ray uploads with every checkpoint (history.jsonl, Ultralytics' output).
            sync_config=tune.SyncConfig(sync_artifacts=location.remote),
            failure_config=tune.FailureConfig(max_failures=exp.failure.max_failures),
            # A trial needs only its newest checkpoint; under PBT others clone it, so keep a few more.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=exp.scheduler.checkpoints_to_keep),
            callbacks=callbacks,
            log_to_file=True, verbose=_ray_verbosity(exp),
        ),
    )


def export_best(results, location: Location) -> List[Path]:
    """(Re)write best_hyperparameters.yaml and best.pt (the best trial's weights, fetched from the
    store when it is one), each atomically; returns the files written."""
    best_hp = results.best_hyperparameters()
    if best_hp is None:
        return []
    written = [results.path / layout.BEST_HYPERPARAMETERS]
    layout.write_atomic(written[0], yaml.safe_dump(best_hp, sort_keys=False))
    trial_id = results.best()["trial_id"]
    # Ultralytics' best.pt: trials from before yolotune kept their best epoch's weights by the metric.
    weights = location.fetch(layout.trial_best_weights(trial_id)) or \
        location.fetch(f"{trial_dirname(trial_id)}/train/weights/best.pt")
    if weights:
        from ultralytics.utils.torch_utils import strip_optimizer

        tmp = results.path / f".{layout.BEST_WEIGHTS}.tmp"
        strip_optimizer(weights, s=str(tmp))  # inference weights: no optimizer state, fp16
        tmp.replace(results.path / layout.BEST_WEIGHTS)
        written.append(results.path / layout.BEST_WEIGHTS)
    return written


def _ray_verbosity(exp: ExperimentConfig) -> int:
    return 1 if exp.verbose == "ray" else 0


def _live_view(exp: ExperimentConfig, location: Location):
    from yolotune import report

    from ultralytics.cfg import DEFAULT_CFG_DICT

    prunes = exp.scheduler.stops_early or exp.search.replaces_scheduler
    epochs = exp.scheduler.trial_epochs(exp)
    return console.live_view(location.local, exp.metric, exp.mode, epochs, prunes, exp.verbose,
                             partial(report.refresh_in_process, location.uri,
                                     prune=not exp.scheduler.clones_checkpoints),
                             exp.train.get("batch", DEFAULT_CFG_DICT["batch"]))


def _use_this_runs_callbacks(tuner, exp: ExperimentConfig, location: Location, budget) -> None:
    """tuner.pkl holds the first run's callbacks and verbosity: give the resumed run this run's live
    view and time budget (and an experiment from before them, them). Ray has no public way to do this."""
    run_config = tuner._local_tuner.get_run_config()
    kept = [c for c in run_config.callbacks or [] if not isinstance(c, (console.LiveView, type(budget)))]
    run_config.callbacks = kept + [_live_view(exp, location), budget]
    run_config.verbose = _ray_verbosity(exp)


# Set in the driver when a trial's write found the storage full (_handle_trial_failures).
TRIAL_FOUND_STORAGE_FULL = threading.Event()


def _handle_trial_failures() -> None:
    """Ray retries a trial after any failure (FailureConfig.max_failures); yolotune only after a system
    failure, which another try on another node outlives: a lost node or worker process, a killed actor
    (RayActorError). An error of the trial's own making (a bad value, a failing dataset, out of memory)
    reaches the driver as a RayTaskError and would fail again: that trial ends in ERROR at once.
    A trial that found the storage full is neither: the run stops as Ctrl-C stops it, and the trial,
    unfinished, continues from its last checkpoint on resume=true once space is freed.
    Ray has no public hook for this; patched once per process, in the driver."""
    from ray.exceptions import RayActorError, RayTaskError
    from ray.tune.execution.tune_controller import TuneController

    from yolotune.gpu_slots import GpuMemoryTaken

    process = TuneController._process_trial_failure
    if getattr(process, "yolotune_handles", False):
        return

    def process_trial_failure(controller, trial, exception):
        if is_storage_full(exception):
            controller._try_recover(trial, exc=exception)  # back to PENDING: no failure counted, no ERROR
            if not TRIAL_FOUND_STORAGE_FULL.is_set():  # once: Ray takes a second SIGINT as "stop at once"
                TRIAL_FOUND_STORAGE_FULL.set()
                os.kill(os.getpid(), signal.SIGINT)  # Ray Tune's handler: stop, save the experiment state
            return None
        # A trial whose share of a GPU other processes held (gpu_slots.GpuMemoryTaken) is retried as after a
        # lost worker: another try, on a card with room, outlives it.
        own_error = isinstance(exception, RayTaskError) and not isinstance(
            exception.as_instanceof_cause(), (RayActorError, GpuMemoryTaken))
        if not own_error:
            return process(controller, trial, exception)
        max_failures, trial.max_failures = trial.max_failures, 0  # Trial.should_recover: no retry left
        try:
            return process(controller, trial, exception)
        finally:
            trial.max_failures = max_failures

    process_trial_failure.yolotune_handles = True
    TuneController._process_trial_failure = process_trial_failure


def _save_state_after_its_upload() -> None:
    """Ray saves the experiment state into its driver staging dir (replacing files through temporary
    ones) and uploads that dir in the background; a save while the previous upload still runs removes
    files that upload listed, and the upload fails: that snapshot is not in the storage, and Ray logs
    "Saving experiment state to storage ... failed" with a traceback. A resume makes it likely: Ray
    copies every trial's .json and .pkl into the staging dir to restore, and each upload takes them all
    back. Here each upload is waited for (small files: the state and the trials' logs), so no save meets one.
    Ray has no public hook for this; patched once per process, in the driver."""
    from ray.tune.execution.experiment_state import _ExperimentCheckpointManager

    sync_up = _ExperimentCheckpointManager.sync_up_experiment_state
    if getattr(sync_up, "yolotune_waits", False):
        return

    def sync_up_experiment_state(manager, save_fn, force=False, wait=False):
        return sync_up(manager, save_fn, force=force, wait=True)

    sync_up_experiment_state.yolotune_waits = True
    _ExperimentCheckpointManager.sync_up_experiment_state = sync_up_experiment_state


def storage_full_line(exp: ExperimentConfig, exp_dir: Path) -> str:
    """The one line a run that filled its storage stops with (an object store's: its local copy's disk)."""
    free = shutil.disk_usage(exp_dir).free
    return (f"storage {exp_dir.parent} is full ({free / 2**20:.1f} MiB free): the sweep stopped and every finished "
            f"epoch is saved; free space, then go on with: {resume_command(exp, exp_dir)}")


def resume_command(exp: ExperimentConfig, exp_dir: Path) -> str:
    storage = exp.storage if is_uri(exp.storage) else str(exp_dir.parent)
    return f"python -m yolotune resume=true name={shlex.quote(exp_dir.name)} storage={shlex.quote(storage)}"


def cluster_nodes() -> List[Tuple[float, float]]:
    """(CPUs, GPUs) of each alive node of the connected Ray cluster."""
    import ray

    return [Node(node["Resources"].get("CPU", 0), node["Resources"].get("GPU", 0),
                 node["Resources"].get("memory", 0) / 2**20) for node in ray.nodes() if node["Alive"]]


def _ray_init_args(exp: ExperimentConfig) -> Dict[str, Any]:
    args = {"log_to_driver": False, "runtime_env": worker_runtime_env(exp.ray.runtime_env),
            "logging_level": logging.INFO if exp.verbose == "ray" else logging.WARNING}
    if exp.ray.address is None:  # a private local Ray, never a cluster that `ray start` left recorded
        return {**args, "address": "local", "num_cpus": local_cpus(), "num_gpus": local_gpus(),
                "include_dashboard": False, "_node_ip_address": "127.0.0.1"}  # this machine only
    return {**args, "address": exp.ray.address}


def worker_runtime_env(runtime_env: Optional[Dict[str, Any]]) -> Dict[str, Any]:
    """The job's runtime_env (ray.runtime_env) with the settings yolotune relies on in workers
    (WORKER_ENV, as this driver has them) added to its env_vars; the user's own values win."""
    runtime_env = dict(runtime_env or {})
    ours = {name: os.environ[name] for name in WORKER_ENV if name in os.environ}
    runtime_env["env_vars"] = {**ours, **(runtime_env.get("env_vars") or {})}
    return runtime_env


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A cluster that does not answer fails here, in one line, instead of in a long retry loop in ray.init."""
    if address == "auto":
        # Where `ray start` records it: Ray's temp dir ($RAY_TMPDIR, else the system's), as Ray reads it.
        recorded = Path(os.environ.get("RAY_TMPDIR") or tempfile.gettempdir()) / "ray" / "ray_current_cluster"
        address = os.environ.get("RAY_ADDRESS") or (recorded.read_text().strip() if recorded.is_file() else "")
        if not address:
            raise ConfigError("ray.address", "auto", "no running Ray cluster found on this machine; start one with "
                                                     "`ray start --head` or give host:port")
    host, _, port = address.removeprefix("ray://").rpartition(":")
    try:
        socket.create_connection((host, int(port)), timeout=timeout_s).close()
    except (OSError, ValueError) as e:
        raise ConfigError("ray.address", address, f"no Ray cluster answers there ({e}); start one with `ray start "
                                                   "--head` or give the head node's host:port") from None


def _trial_name(trial) -> str:
    return trial_dirname(trial.trial_id)


