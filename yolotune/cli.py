"""``python -m yolotune``: compose the Hydra config, validate it, run the experiment.

Every mistake ends here as one line ``yolotune: error: <key>=<value>: <what is allowed>`` and exit
code 2, whether Hydra found it while composing or yolotune while validating.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path
from typing import Sequence, Tuple

from omegaconf import DictConfig, open_dict

from yolotune import experiment, layout
from yolotune.config import ExperimentConfig, literal, register_configs, to_experiment, validate
from yolotune.errors import ConfigError, StorageFull
from yolotune.overrides import composition_error, group_options, normalize, replace_space_entries

register_configs()


def prepare(cfg: DictConfig, overrides: Sequence[str]) -> Tuple[ExperimentConfig, Path, DictConfig]:
    """Resolve resume and the experiment name, and validate: nothing heavy runs, nothing is written."""
    if cfg.resume:
        cfg, exp_dir = experiment.resume_config(cfg, overrides)
    exp = to_experiment(cfg)
    validate(exp)
    if not cfg.resume:
        with open_dict(cfg):
            cfg.name = exp.name = cfg.name or experiment.new_name()
            cfg.space = literal(exp.space)  # saved as tuned: the model's task's default space (config.task_space)
        location = experiment.open_storage(cfg.storage).child(cfg.name)
        exp_dir = location.local
        if location.exists():
            raise ConfigError("name", cfg.name, f"{location.uri} already exists; resume it with resume=true or choose "
                                                "another name")
    return exp, exp_dir, cfg


def run_experiment(cfg: DictConfig, overrides: Sequence[str]):
    """Run the experiment, holding its lock; returns its directory and Ray's ResultGrid (None for a dry run; a
    finished experiment's own, its resume runs nothing)."""
    exp, exp_dir, cfg = prepare(cfg, overrides)
    from yolotune.preflight import dry_run
    from yolotune.runner import finished_results, run

    if exp.resume and layout.is_finished(exp_dir) and not exp.resume_errored:
        return exp_dir, finished_results(exp, exp_dir)  # as the guide's resume of a finished one: nothing runs
    if exp.dry_run:
        dry_run(exp, exp_dir)
        return exp_dir, None

    lock = experiment.RunLock(exp_dir)
    try:
        if exp.resume:
            lock.acquire()  # before Ray starts: a second resume of it is refused here
        return exp_dir, run(exp, exp_dir, lambda: experiment.create(exp_dir, lock, cfg, overrides))
    finally:
        lock.release()


def _main(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    hydra_cfg = HydraConfig.get()
    overrides = list(hydra_cfg.overrides.task)
    replace_space_entries(cfg, overrides)
    if hydra_cfg.mode == RunMode.MULTIRUN:
        from yolotune.multirun import run_job

        def job():
            exp_dir, grid = run_experiment(cfg, overrides)
            return (None, False) if grid is None else (exp_dir, layout.is_finished(exp_dir))  # None: dry_run

        run_job(Path(hydra_cfg.sweep.dir), hydra_cfg.job.num, overrides, job)
        return
    try:
        exp_dir, grid = run_experiment(cfg, overrides)
    except ConfigError as e:
        fail(e)
    except StorageFull as e:
        print(f"yolotune: error: {e}", file=sys.stderr)
        sys.exit(1)
    if grid is None:  # dry_run: checked, nothing run
        return
    if not layout.is_finished(exp_dir) and not layout.stopped_by_budget(exp_dir):
        sys.exit(130)  # interrupted: the conventional exit code of a Ctrl-C
    if grid.num_terminated == 0:
        sys.exit(1)  # every trial errored


def fail(error: ConfigError) -> None:
    print(f"yolotune: error: {error}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    argv = sys.argv[1:]
    if argv[:1] == ["results"]:  # `yolotune results PATH`
        from yolotune.results_cli import main as results_main

        sys.exit(results_main(argv[1:]))
    if "--help" in argv or "-h" in argv:
        print(help_text())
        return
    try:
        sys.argv[1:] = normalize(argv)
    except ConfigError as e:
        fail(e)
    import hydra

    # Hydra's own errors would print several lines and exit 1: let them through to be translated.
    os.environ["HYDRA_FULL_ERROR"] = "1"
    _register_plugins()
    app = hydra.main(config_path="pkg://yolotune.conf", config_name="config", version_base="1.3")(_main)
    try:
        app()
    except ConfigError as e:  # the multirun sweeper's own check (hydra_plugin)
        fail(e)
    except KeyboardInterrupt:  # a Ctrl-C before Ray's handler, or a second one (runner.run said what is kept)
        sys.exit(130)
    except Exception as e:  # noqa: BLE001 - translated when it is a composition error, else re-raised
        error = composition_error(e, sys.argv[1:])
        if error is None:
            raise
        fail(error)


def _register_plugins() -> None:
    """Hydra finds plugins by walking the hydra_plugins namespace, which an editable install
    (pip install -e) hides from it: register yolotune's sweeper and launcher by hand."""
    from hydra.core.plugins import Plugins

    plugins = Plugins.instance()  # first: its scan re-executes the modules of Hydra's own plugins
    from hydra_plugins.yolotune_launcher import YolotuneLauncher, YolotuneSweeper

    for plugin in (YolotuneSweeper, YolotuneLauncher):
        plugins.class_name_to_class.setdefault(f"{plugin.__module__}.{plugin.__name__}", plugin)


# The documentation's pages, as the repository holds them (docs/; `mkdocs serve` shows them as a site).
DOCS = "docs"


def help_text() -> str:
    lines = ["yolotune: tune Ultralytics YOLO hyperparameters on Ray Tune.",
             "Usage: python -m yolotune [group=option ...] [key=value ...]   (-m for a multirun)", "",
             "Config groups (group=option; conf/<group>/<option>.yaml), each with its page of the docs:"]
    lines += [f"  {group}: {', '.join(options)}   ({DOCS}/configuration/{group}.md)"
              for group, options in group_options().items()]
    lines += ["",
              "Keys: iterations, name, storage, resume, resume_errored, metric, mode, seed, failure.max_failures,",
              "      ray.address, ray.runtime_env, and any Ultralytics train argument as train.KEY=VALUE (or KEY=VALUE).",
              f"      python -m yolotune --cfg job  prints the composed config; {DOCS}/configuration/index.md "
              "lists every key.",
              f"Errors: each one-line error, its cause and what to do: {DOCS}/troubleshooting.md", "",
              "Examples:",
              "  python -m yolotune experiment=quickstart",
              "  python -m yolotune space=minimal data=coco128 iterations=20 epochs=30 imgsz=320",
              "  python -m yolotune -m scheduler=asha,fifo experiment=quickstart",
              "  python -m yolotune resume=true",
              "Results of an experiment: yolotune results runs/tune/NAME",
              "Hydra's own options: python -m yolotune --hydra-help"]
    return "\n".join(lines)
