"""Export a trained network: `python export.py ckpt_path=<ckpt> format=onnx|pt2|torchscript`
(see README.md and conf/export.yaml)."""

import hydra
from omegaconf import DictConfig

from lungseg.cli_hints import hint_on_override_error
from lungseg.errors import lightning_logs_on_console, run_cli

lightning_logs_on_console()


@hydra.main(version_base="1.3", config_path="conf", config_name="export")
def main(cfg: DictConfig) -> None:
    # Imported here: torch and Lightning take seconds to import, and a command line Hydra
    # refuses is answered without them (as in train.py).
    from lungseg.export import export

    run_cli(lambda: export(cfg))


if __name__ == "__main__":
    with hint_on_override_error("export.py", "export"):
        main()
