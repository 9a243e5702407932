"""Export a trained network: `python export.py ckpt_path=<ckpt> format=onnx|pt2|torchscript`
(see README.md and conf/export.yaml)."""

import hydra
from omegaconf import DictConfig

from lungseg.cli_hints import hint_on_override_error
from lungseg.errors import run_cli
from lungseg.export import export


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    run_cli(lambda: export(cfg))


if __name__ == "__main__":
    with hint_on_override_error("export.py", "export"):
        main()
