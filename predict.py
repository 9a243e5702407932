"""Predict a folder: `python predict.py ckpt_path=<ckpt> input_dir=<dir> output_dir=<dir>`
(see conf/predict.yaml)."""

import hydra
from omegaconf import DictConfig

from lungseg.errors import run_cli
from lungseg.predict import predict


@hydra.main(version_base="1.3", config_path="conf", config_name="predict")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: predict(cfg))


if __name__ == "__main__":
    main()
