"""yolotune's multirun sweeper and launcher: Hydra's basic ones, except that a job whose config does
not compose becomes a failed row of the multirun summary instead of ending the multirun.

Hydra loads plugins only from its ``hydra_plugins`` namespace, so this folder ships as
``hydra_plugins.yolotune_launcher`` (pyproject.toml); conf/hydra/yolotune.yaml selects them.
"""

from pathlib import Path

from hydra._internal.core_plugins.basic_launcher import BasicLauncher
from hydra._internal.core_plugins.basic_sweeper import BasicSweeper
from hydra.core.utils import JobReturn, JobStatus

from yolotune.config import check_storage
from yolotune.multirun import append_row, mark_failed, new_row
from yolotune.overrides import composition_error


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
        returns = []
        for offset, overrides in enumerate(job_overrides):
            try:
                returns += super().launch([overrides], initial_job_idx + offset)
            except Exception as e:  # noqa: BLE001 - translated when it is a composition error, else re-raised
                error = composition_error(e, overrides)
                if error is None:
                    raise
                row = new_row(initial_job_idx + offset, overrides)
                mark_failed(row, error)
                append_row(Path(self.config.hydra.sweep.dir), row)
                returns.append(JobReturn(overrides=list(overrides), status=JobStatus.COMPLETED))
        return returns
