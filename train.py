"""Train a segmentation model: `python train.py [overrides]` (see README.md and conf/)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from lungseg.errors import run_cli, user_error
from lungseg.sweep import record_error
from lungseg.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    if HydraConfig.get().mode == RunMode.MULTIRUN:
        try:
            metrics = train(cfg)
        except Exception as error:
            if user_error(error) is None:
                raise
            # sys.exit would end the whole sweep. The next job runs instead; the sweep summary
            # (lungseg.sweep.SweepSummary) lists this one and makes the sweep exit with status 1.
            record_error(cfg.output_dir, error)
            return None
    else:
        metrics = run_cli(lambda: train(cfg))
    # The value a Hydra sweeper (e.g. Optuna) maximises.
    return metrics.get("best_score")


if __name__ == "__main__":
    main()
