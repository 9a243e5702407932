"""Score a checkpoint: `python eval.py ckpt_path=<ckpt> [overrides]` (see conf/eval.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lungseg import hydra_files
from lungseg.errors import run_cli
from lungseg.evaluate import evaluate


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    run_dir = HydraConfig.get().runtime.output_dir
    run_cli(lambda: evaluate(cfg), run_dir)
    hydra_files.settle(run_dir)  # scored: an earlier command's .hydra/ there is kept beside


if __name__ == "__main__":
    main()
