"""Hydra's Optuna sweeper with lungseg's checks (``hparams_search=optuna`` selects it as
``hydra.sweeper._target_``): before any trial, it refuses a search over a setting that
changes the split (data.fold, data.seed, ...; lungseg.sweep.SPLIT_KEYS) and numbers
the trials after those already in the sweep folder (a study continued from its storage; one
kept in memory is refused); it ends with a lungseg error when every trial failed.

Left alone, a search over data.fold (or the split's seed) picks the easiest split; a search
run again into its folder puts its trials into the folders of the earlier ones, which hold
finished runs, and trains nothing; a search whose trials all fail ends with Optuna's
traceback "No trials are completed yet". Hydra takes sweepers from the ``hydra_plugins``
package only, hence this folder; ``python train.py`` finds it beside the script.
"""

from typing import Any

from hydra.plugins.sweeper import Sweeper
from hydra.types import HydraContext, TaskFunction
from omegaconf import DictConfig, OmegaConf

from lungseg.errors import run_cli
from lungseg.files import aside_name
from lungseg.sweep import (
    check_some_run_finished,
    check_split_not_searched,
    first_trial_number,
    sweep_folder,
)


class LungsegOptunaSweeper(Sweeper):
    """Hydra's OptunaSweeper (same settings) that refuses a search over the split, continues
    a study into its sweep folder in new trial folders, and reports a search whose trials all
    failed as ``lungseg: error: ...`` with the sweep folder and the first trial's error, exit
    status 1."""

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
        search = self.optuna.sweeper  # Hydra's implementation: its trial folders from job_idx
        # Unresolved: "${seed}" where the split follows the seed (conf/data/folders.yaml).
        data = self.config.get("data")
        data_seed = OmegaConf.to_container(data, resolve=False).get("seed") if data else None
        check_split_not_searched(search.params, arguments, data_seed)
        sweep_dir = sweep_folder(self.config)
        search.job_idx = first_trial_number(sweep_dir, search.storage)
        # As Hydra's BasicSweeper saves it: what was searched, for the summary (lungseg.sweep).
        sweep_dir.mkdir(parents=True, exist_ok=True)
        saved = sweep_dir / "multirun.yaml"
        if saved.is_file():  # a continued search's earlier one, kept: multirun.1.yaml, ...
            saved.rename(aside_name(saved))
        OmegaConf.save(self.config, saved)
        try:
            self.optuna.sweep(arguments)
        except ValueError:  # Optuna's: no completed trial to take the best parameters from
            check_some_run_finished(self.config)
            raise
