"""Hydra's Optuna sweeper, ending with a lungseg error when every trial failed
(``hparams_search=optuna`` selects it as ``hydra.sweeper._target_``).

Left alone, such a search ends with Optuna's traceback "No trials are completed yet" from its
best trial. Hydra takes sweepers from the ``hydra_plugins`` package only, hence this folder;
``python train.py`` finds it beside the script.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig

from lungseg.errors import run_cli
from lungseg.sweep import check_some_run_finished


class LungsegOptunaSweeper(Sweeper):
    """Hydra's OptunaSweeper (same settings) that reports a search whose trials all failed as
    ``lungseg: error: ...`` with the sweep folder and the first trial's error, exit status 1."""

    def __init__(self, **settings: Any) -> None:
        # Imported here, as Hydra's own OptunaSweeper imports its implementation: Hydra imports
        # every hydra_plugins module at start-up, with or without the research extra.
        from hydra_plugins.hydra_optuna_sweeper.optuna_sweeper import OptunaSweeper

        self.optuna = OptunaSweeper(**settings)

    def setup(
        self, *, hydra_context: HydraContext, task_function: TaskFunction, config: DictConfig
    ) -> None:
        self.config = config
        self.optuna.setup(hydra_context=hydra_context, task_function=task_function, config=config)

    def sweep(self, arguments: list[str]) -> None:
        run_cli(lambda: self._sweep(arguments))

    def _sweep(self, arguments: list[str]) -> None:
        try:
            self.optuna.sweep(arguments)
        except ValueError:  # Optuna's: no completed trial to take the best parameters from
            check_some_run_finished(self.config)
            raise
