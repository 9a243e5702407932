"""Train a segmentation model: `python train.py [overrides]` (see README.md and conf/)."""

import sys

import hydra
from omegaconf import DictConfig

from lungseg.errors import LungsegError
from lungseg.train import train


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    try:
        metrics = train(cfg)
    except LungsegError as error:
        print(f"lungseg: error: {error}", file=sys.stderr)
        sys.exit(1)
    # The value a Hydra sweeper (e.g. Optuna) maximises.
    return metrics.get("best_score")


if __name__ == "__main__":
    main()
