"""Score a checkpoint: `python eval.py ckpt_path=<ckpt> [overrides]` (see conf/eval.yaml)."""

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from lungseg import hydra_files
from lungseg.cli_hints import hint_on_override_error
from lungseg.errors import lightning_logs_on_console, run_cli

lightning_logs_on_console()


@hydra.main(version_base="1.3", config_path="conf", config_name="eval")
def main(cfg: DictConfig) -> None:
    # Imported here: torch and Lightning take seconds to import, and a command line Hydra
    # refuses is answered without them (as in train.py).
    from lungseg.evaluate import evaluate

    run_dir = HydraConfig.get().runtime.output_dir
    run_cli(lambda: evaluate(cfg), run_dir)
    # scored: a training run's .hydra/ there stays, eval's is kept beside (an earlier eval's
    # is kept beside a newer one's)
    hydra_files.keep_record(run_dir)


if __name__ == "__main__":
    with hint_on_override_error("eval.py", "eval"):
        main()
