"""Score a checkpoint: `python eval.py ckpt_path=<ckpt> [overrides]` (see conf/eval.yaml)."""

import hydra
from omegaconf import DictConfig

from lungseg.errors import run_cli
from lungseg.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: evaluate(cfg))


if __name__ == "__main__":
    main()
