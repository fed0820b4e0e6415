"""yolotune's multirun sweeper and launcher: Hydra's basic ones, except that a job whose config does
not compose becomes a refused row of the multirun summary instead of ending the multirun, and
every job writes its row to the one summary of the multirun.

Hydra loads plugins only from its ``hydra_plugins`` namespace, so this folder ships as
``hydra_plugins.yolotune_launcher`` (pyproject.toml); conf/hydra/yolotune.yaml selects them.
"""

import logging
from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus, configure_log, filter_overrides, run_job, setup_globals
from omegaconf import open_dict

from yolotune.config import check_storage
from yolotune.multirun import SUMMARY, append_row, mark_failed, new_row
from yolotune.overrides import composition_error
from yolotune.storage import Location

log = logging.getLogger(__name__)


class YolotuneSweeper(BasicSweeper):
    def sweep(self, arguments):
        """A storage that cannot hold the sweep dir (<storage>/multirun/...) refuses every job: one
        line before Hydra tries to make the folder."""
        check_storage(self.config.storage)
        return super().sweep(arguments)

    def validate_batch_is_legal(self, batch) -> None:
        """Hydra composes every job before running any, and one bad job ends them all; the launcher
        below reports each bad job instead."""


class YolotuneLauncher(BasicLauncher):
    def launch(self, job_overrides, initial_job_idx: int):
        """Hydra's basic launch, except that a job whose config does not compose is a refused row;
        that every job's row goes to this multirun's summary, even when the jobs sweep ``storage``;
        and that the summary is uploaded after each job (a URI storage)."""
        setup_globals()
        configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
        sweep_dir = Path(self.config.hydra.sweep.dir)
        returns = []
        for job_num, overrides in enumerate(job_overrides, initial_job_idx):
            log.info(f"#{job_num} : {' '.join(filter_overrides(overrides))}")
            try:
                config = self.hydra_context.config_loader.load_sweep_config(self.config, list(overrides))
            except Exception as e:  # noqa: BLE001 - translated when it is a composition error, else re-raised
                error = composition_error(e, overrides)
                if error is None:
                    raise
                row = new_row(job_num, overrides)
                mark_failed(row, error)
                append_row(sweep_dir, row)
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED))
            else:
                with open_dict(config):
                    config.hydra.job.id = config.hydra.job.num = job_num
                    # Hydra would make <the job's storage>/multirun/... (a storage the job's own checks
                    # may refuse) and keep a summary there: one multirun, one summary.
                    config.hydra.sweep.dir = str(sweep_dir)
                returns.append(run_job(hydra_context=self.hydra_context, task_function=self.task_function,
                                       config=config, job_dir_key="hydra.sweep.dir",
                                       job_subdir_key="hydra.sweep.subdir"))
                configure_log(self.config.hydra.hydra_logging, self.config.hydra.verbose)
            Location(self.config.storage).upload(sweep_dir / SUMMARY)
        return returns
