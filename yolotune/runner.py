"""Turns a validated experiment into a Ray Tune ``Tuner``, runs it, and writes the results."""

from __future__ import annotations

import os
import shlex
import signal
import socket
import tempfile
import threading
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Callable, Dict, Optional, Tuple

import yaml

from yolotune import layout, train_args
from yolotune.config import ExperimentConfig
from yolotune.data import build_label_caches, check_readable_on_every_node
from yolotune.errors import ConfigError
from yolotune.layout import trial_dirname
from yolotune.resources import TrialResources, plan
from yolotune.space import to_ray_space


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

    from yolotune import report
    from yolotune.results import load
    from yolotune.trainable import train_trial

    job, resources = preflight(exp, exp_dir)
    wandb_settings = None
    if exp.wandb.mode != "disabled":
        from yolotune.wandb_logging import trial_settings

        wandb_settings = trial_settings(exp, exp_dir, job["train"])
    started = not ray.is_initialized()
    if started:
        if exp.ray.address is not None:
            check_reachable(exp.ray.address)
        ray.init(**_ray_init_args(exp))
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
        trainable = tune.with_resources(tune.with_parameters(train_trial, job=job),
                                        {"cpu": resources.cpu, "gpu": resources.gpu})
        if exp.resume:
            tuner = tune.Tuner.restore(str(exp_dir), trainable, resume_unfinished=True,
                                       resume_errored=exp.resume_errored)
        else:
            tuner = _new_tuner(exp, exp_dir, trainable, resources, wandb_settings)
        (exp_dir / layout.BUDGET_MARKER).unlink(missing_ok=True)
        with time_budget(exp.budget.seconds) as budget:
            grid = tuner.fit()
        if budget.expired:
            (exp_dir / layout.BUDGET_MARKER).touch()
        results = load(exp_dir)
        export_best(results)
        report.write_all(results)
        print("\n" + report.summary(results))
        if wandb_settings:
            from yolotune.wandb_logging import log_experiment_summary

            log_experiment_summary(exp_dir, wandb_settings)
        if results.finished:
            layout.mark_finished(exp_dir)
        elif budget.expired:
            print(f"\nThe time budget ({exp.budget.time}) ended the experiment after {results.trial_count} trials; "
                  f"every finished epoch is saved. Go on (with a new budget) with:\n  {resume_command(exp_dir)}")
        else:  # interrupted (Ctrl-C): Ray saved the state; say how to go on
            print(f"\nInterrupted; every finished epoch is saved. Resume with:\n  {resume_command(exp_dir)}")
        return grid
    finally:
        if started:
            ray.shutdown()


@contextmanager
def time_budget(seconds: Optional[float]):
    """Ends tuner.fit() after ``seconds`` the way Ctrl-C does: Ray stops the trials and saves them as
    unfinished, so resume=true continues them. (Ray's own TuneConfig(time_budget_s) marks every
    unfinished trial TERMINATED, and a restored Tuner then has nothing left to run.)"""
    budget = SimpleNamespace(expired=False)

    def expire():
        budget.expired = True
        os.kill(os.getpid(), signal.SIGINT)  # Ray Tune's handler: stop gracefully, save the experiment state

    timer = threading.Timer(seconds, expire) if seconds else None
    if timer:
        timer.daemon = True
        timer.start()
    try:
        yield budget
    finally:
        if timer:
            timer.cancel()


def _new_tuner(exp: ExperimentConfig, exp_dir: Path, trainable, resources: TrialResources, wandb_settings):
    from ray import tune
    from ray.tune.logger import CSVLoggerCallback, JsonLoggerCallback

    from yolotune.records import trial_recorder

    space = exp.dists
    callbacks = [JsonLoggerCallback(), CSVLoggerCallback(), trial_recorder()]  # trial_recorder: trials.jsonl
    if wandb_settings:  # W&B runs live in the driver, not in the trials' workers (see wandb_logging.py)
        from yolotune.wandb_logging import tune_callback

        callbacks.append(tune_callback(wandb_settings))
    return tune.Tuner(
        trainable,
        param_space=to_ray_space(space),
        tune_config=tune.TuneConfig(
            metric=exp.metric, mode=exp.mode, num_samples=exp.iterations,
            scheduler=exp.search.build_scheduler(exp) if exp.search.replaces_scheduler
            else exp.scheduler.build(exp, space),
            search_alg=exp.search.build(exp),
            max_concurrent_trials=resources.max_concurrent_trials,
            reuse_actors=True,  # one warm worker runs trial after trial: no torch import per trial
            trial_name_creator=_trial_name, trial_dirname_creator=_trial_name,
        ),
        run_config=tune.RunConfig(
            name=exp_dir.name, storage_path=str(exp_dir.parent),
            failure_config=tune.FailureConfig(max_failures=exp.failure.max_failures),
            # A trial needs only its newest checkpoint; under PBT others clone it, so keep a few more.
            checkpoint_config=tune.CheckpointConfig(num_to_keep=exp.scheduler.checkpoints_to_keep),
            callbacks=callbacks,
            log_to_file=True, verbose=1,
        ),
    )


def export_best(results) -> None:
    """(Re)write best_hyperparameters.yaml and best.pt (the best trial's weights), each atomically."""
    best_hp = results.best_hyperparameters()
    if best_hp is None:
        return
    layout.write_atomic(results.path / layout.BEST_HYPERPARAMETERS, yaml.safe_dump(best_hp, sort_keys=False))
    weights = results.trial_dir(results.best()["trial_id"]) / "train" / "weights" / "best.pt"
    if weights.is_file():
        from ultralytics.utils.torch_utils import strip_optimizer

        tmp = results.path / f".{layout.BEST_WEIGHTS}.tmp"
        strip_optimizer(weights, s=str(tmp))  # inference weights: no optimizer state, fp16
        tmp.replace(results.path / layout.BEST_WEIGHTS)


def resume_command(exp_dir: Path) -> str:
    return f"python -m yolotune resume=true name={shlex.quote(exp_dir.name)} storage={shlex.quote(str(exp_dir.parent))}"


def _ray_init_args(exp: ExperimentConfig) -> Dict[str, Any]:
    args = {"log_to_driver": False, "runtime_env": exp.ray.runtime_env or None}
    if exp.ray.address is None:  # a private local Ray, never a cluster that `ray start` left recorded
        return {**args, "address": "local", "num_cpus": os.cpu_count(), "num_gpus": _local_gpus(),
                "include_dashboard": False, "_node_ip_address": "127.0.0.1"}  # this machine only
    return {**args, "address": exp.ray.address}


def check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """A cluster that does not answer fails here, in one line, instead of in a long retry loop in ray.init."""
    if address == "auto":
        recorded = Path(tempfile.gettempdir()) / "ray" / "ray_current_cluster"
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


def preflight(exp: ExperimentConfig, exp_dir: Path) -> Tuple[Dict[str, Any], Optional[TrialResources]]:
    """What only Ultralytics and the machine can check, before Ray starts: every value a trial may pass
    Ultralytics, the weights, the dataset, and the resources of this machine (a cluster's are known
    once Ray connects: None). Returns everything a trial needs besides its sampled values (plain,
    resolved, absolute) and the planned resources."""
    resources = plan(exp.resources, os.cpu_count() or 1, _local_gpus()) if exp.ray.address is None else None
    train_args.check_values(exp)
    weights, data = exp.model.resolve(), exp.data.resolve()
    build_label_caches(data)
    train = dict(exp.train)
    train.setdefault("plots", False)  # per-epoch plots cost seconds per trial; ask with train.plots=true
    if exp.seed is not None and "seed" not in exp.space:
        train.setdefault("seed", exp.seed)
    job = {"weights": weights, "data": data, "train": train, "experiment_dir": str(exp_dir), "threads": 1}
    return job, resources


def _local_gpus() -> int:
    import torch

    return torch.cuda.device_count()
