"""Turns a validated experiment into a Ray Tune ``Tuner``, runs it, and writes the results."""

from __future__ import annotations

import contextlib
import logging
import os
import shlex
from pathlib import Path
from typing import Any, Callable, Dict

from yolotune import console, layout
from yolotune.layout import trial_dirname
from yolotune.config import ExperimentConfig
from yolotune.data import build_label_caches, check_readable_on_every_node, resolve_data
from yolotune.errors import ConfigError
from yolotune.model import resolve_weights
from yolotune.resources import TrialResources, plan
from yolotune.space import parse_space, to_ray_space


# Ray's TensorBoard logger only warns about Ultralytics' metric names; W&B is the dashboard here.
# A forced state snapshot per checkpoint is what keeps a SIGKILL from losing finished epochs.
os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
os.environ.setdefault("TUNE_WARN_EXCESSIVE_EXPERIMENT_CHECKPOINT_SYNC_THRESHOLD_S", "0")


def run(exp: ExperimentConfig, exp_dir: Path, save_config: Callable[[], None]):
    """Run (or resume) the experiment in ``exp_dir`` and return Ray's ResultGrid.

    ``save_config`` creates the experiment directory; it is called once the weights, data and
    resources are known to be usable, so a run that cannot start leaves nothing behind.
    """
    import ray
    from ray import tune

    from yolotune.results import write_results
    from yolotune.trainable import train_trial

    _prepare_console(exp)
    job = _job(exp, exp_dir)
    wandb_settings = None
    if exp.wandb.mode != "disabled":
        from yolotune.wandb_logging import trial_settings

        wandb_settings = trial_settings(exp, exp_dir, job["train"])
    with _ultralytics_quiet(exp):
        build_label_caches(job["data"])
    if exp.ray.address is None:  # checked before Ray starts: a GPU asked of a machine without one fails here
        resources = plan(exp.resources, os.cpu_count() or 1, _local_gpus())
    started = not ray.is_initialized()
    if started:
        ray.init(**_ray_init_args(exp))
    log = contextlib.ExitStack()
    try:
        if exp.ray.address is not None:
            total = ray.cluster_resources()
            resources = plan(exp.resources, total.get("CPU", 1), total.get("GPU", 0))
            local_files = [job["data"]] + ([job["weights"]] if os.path.isabs(job["weights"]) else [])
            check_readable_on_every_node(local_files)
        job["threads"] = resources.threads
        job["train"].setdefault("workers", resources.threads)  # data loader processes: the trial's CPUs (GPU only)
        if not exp.resume:
            save_config()
        log.enter_context(console.log_to(exp_dir / layout.CONSOLE_LOG))
        log.enter_context(console.ray_logs(exp.verbose))
        trainable = tune.with_resources(tune.with_parameters(train_trial, job=job),
                                        {"cpu": resources.cpu, "gpu": resources.gpu})
        if exp.resume and (exp_dir / "tuner.pkl").exists():
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True,
                                       resume_errored=exp.resume_errored)
            _use_this_runs_console(tuner, exp, exp_dir)
        else:
            tuner = _new_tuner(exp, exp_dir, trainable, resources, wandb_settings)
        grid = tuner.fit()
        with _ultralytics_quiet(exp):
            results = write_results(exp_dir)
        _refresh_report(exp_dir)
        print("\n" + results.summary())
        if wandb_settings:
            from yolotune.wandb_logging import log_experiment_summary

            log_experiment_summary(exp_dir, wandb_settings)
        if results.finished:
            layout.mark_finished(exp_dir)
        else:  # interrupted (Ctrl-C): Ray saved the state; say how to go on
            print(f"\nInterrupted; every finished epoch is saved. Resume with:\n  {resume_command(exp_dir)}")
        return grid
    finally:
        log.close()
        if started:
            ray.shutdown()


def _new_tuner(exp: ExperimentConfig, exp_dir: Path, trainable, resources: TrialResources, wandb_settings):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from yolotune.schedulers import build_scheduler
    from yolotune.search import build_search

    space = parse_space(exp.space)
    callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), _live_view(exp, exp_dir)]
    if wandb_settings:  # W&B runs live in the driver, not in the trials' workers (see wandb_logging.py)
        from yolotune.wandb_logging import tune_callback

        callbacks.append(tune_callback(wandb_settings))
    return tune.Tuner(
        trainable,
        param_space=to_ray_space(space),
        tune_config=tune.TuneConfig(
            metric=exp.metric, mode=exp.mode, num_samples=exp.iterations,
            scheduler=build_scheduler(exp.scheduler, exp.search, exp.train.get("epochs", 100), space),
            search_alg=build_search(exp.search, exp.seed),
            max_concurrent_trials=resources.max_concurrent_trials,
            reuse_actors=True,  # one warm worker runs trial after trial: no torch import per trial
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=exp_dir.name, storage_path=str(exp_dir.parent),
            failure_config=tune.FailureConfig(max_failures=exp.failure.max_failures),
            # A trial needs only its newest checkpoint; under PBT others clone it, so keep a few more.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=4 if exp.scheduler.type == "pbt" else 1),
            callbacks=callbacks,
            log_to_file=True, verbose=_ray_verbosity(exp),
        ),
    )


def _prepare_console(exp: ExperimentConfig) -> None:
    if exp.verbose not in console.VERBOSE:
        raise ConfigError("verbose", exp.verbose, f"one of {', '.join(console.VERBOSE)}")
    if exp.verbose != "ray":  # Ray's new output engine prints tables even at verbose=0; the legacy one is silent
        os.environ["RAY_AIR_NEW_OUTPUT"] = "0"


def _ray_verbosity(exp: ExperimentConfig) -> int:
    return 1 if exp.verbose == "ray" else 0


@contextlib.contextmanager
def _ultralytics_quiet(exp: ExperimentConfig):
    """Ultralytics' info lines and progress bars in the driver (label scans, weight stripping) stay off
    the console; its warnings still show."""
    from ultralytics.utils import LOGGER

    level = LOGGER.level
    if exp.verbose != "ray":
        LOGGER.setLevel(logging.WARNING)
    try:
        yield
    finally:
        LOGGER.setLevel(level)


def _live_view(exp: ExperimentConfig, exp_dir: Path):
    epochs = getattr(exp.scheduler, "max_t", None) or exp.train.get("epochs", 100)
    prunes = exp.scheduler.type not in ("fifo", "pbt") or exp.search.type == "bohb"
    return console.live_view(exp_dir, exp.metric, exp.mode, epochs, prunes, exp.verbose, _refresh_report)


def _use_this_runs_console(tuner, exp: ExperimentConfig, exp_dir: Path) -> None:
    """tuner.pkl holds the first run's callbacks and verbosity: give the resumed run this run's (and
    an experiment from before the live view its live view). Ray has no public way to do this."""
    run_config = tuner._local_tuner.get_run_config()
    kept = [c for c in run_config.callbacks or [] if not isinstance(c, console.LiveView)]
    run_config.callbacks = kept + [_live_view(exp, exp_dir)]
    run_config.verbose = _ray_verbosity(exp)


def _refresh_report(exp_dir: Path) -> None:
    """trials.csv, plots/ and report.html, from the experiment directory as it is now; called by the
    live view's background thread as trials end, and once when the experiment ends."""
    from yolotune.results import ExperimentResults

    results = ExperimentResults(exp_dir)
    results.write_trials_csv()
    results.report(results.plot())


def resume_command(exp_dir: Path) -> str:
    return f"python -m yolotune resume=true name={shlex.quote(exp_dir.name)} storage={shlex.quote(str(exp_dir.parent))}"


def _ray_init_args(exp: ExperimentConfig) -> Dict[str, Any]:
    args = {"log_to_driver": False, "runtime_env": exp.ray.runtime_env or None,
            "logging_level": logging.INFO if exp.verbose == "ray" else logging.WARNING}
    if exp.ray.address is None:  # a private local Ray, never a cluster that `ray start` left recorded
        return {**args, "address": "local", "num_cpus": os.cpu_count(), "num_gpus": _local_gpus(),
                "include_dashboard": False, "_node_ip_address": "127.0.0.1"}  # this machine only
    return {**args, "address": exp.ray.address}


def _trial_name(trial) -> str:
    return trial_dirname(trial.trial_id)


def _job(exp: ExperimentConfig, exp_dir: Path) -> Dict[str, Any]:
    """Everything a trial needs besides its sampled values: plain, resolved, absolute."""
    train = dict(exp.train)
    train.setdefault("plots", False)  # per-epoch plots cost seconds per trial; ask with train.plots=true
    if exp.seed is not None and "seed" not in exp.space:
        train.setdefault("seed", exp.seed)
    return {"weights": resolve_weights(exp.model.weights), "data": resolve_data(exp.data), "train": train,
            "experiment_dir": str(exp_dir), "threads": 1}


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
