"""Train a segmentation model: `python train.py [overrides]` (see README.md and conf/)."""

import logging
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, read_write

from lungseg import ranks
from lungseg.cli_hints import CONFIG_FLAGS, hint_on_override_error
from lungseg.errors import LungsegError, lightning_logs_on_console, run_cli, user_error
from lungseg.sweep import record_error

lightning_logs_on_console()

log = logging.getLogger(__name__)
# Set in the environment of the processes that Lightning's ddp strategy starts for the ranks
# 1..N-1 of a multirun job.
SWEEP_RANK = "LUNGSEG_SWEEP_RANK"


@contextmanager
def ddp_ranks_in_this_job() -> Iterator[None]:
    """Keep the extra processes of Lightning's ``ddp`` strategy inside this multirun job.

    The strategy starts ranks 1..N-1 by re-running ``sys.argv`` with ``hydra.run.dir=<this
    job's hydra.run.dir>``. Under ``-m`` that would re-run the whole sweep into a second sweep
    folder; here they run this job alone (its overrides, ``hydra.mode=RUN``) in this job's
    folder. Afterwards the process group is released, the job's ranks have ended
    (lungseg.ranks), and the launcher's environment variables (LOCAL_RANK, MASTER_PORT, ...)
    are gone, so that the next job starts its own ranks.
    """
    hydra_cfg = HydraConfig.get()
    argv, environ = sys.argv, dict(os.environ)
    sys.argv = [
        argv[0],
        *_config_flags(argv[1:]),
        *hydra_cfg.overrides.hydra,
        *hydra_cfg.overrides.task,
        "hydra.mode=RUN",
    ]
    with read_write(hydra_cfg):
        hydra_cfg.run.dir = hydra_cfg.runtime.output_dir
    os.environ[SWEEP_RANK] = "1"
    try:
        yield
    finally:
        sys.argv = argv
        procs = ranks.detach_ranks_of_this_job()  # before any of them can end badly
        try:
            leave_process_group()  # first: a rank still in a collective then stops at once
        finally:
            ranks.end_ranks(procs)
            for key in set(os.environ) - set(environ):
                del os.environ[key]
            os.environ.update(environ)


@contextmanager
def end_of_rank() -> Iterator[None]:
    try:
        yield
    finally:
        leave_process_group()


def leave_process_group() -> None:
    torch = sys.modules.get("torch")  # not imported yet: there is no process group to leave
    if (
        torch is not None
        and torch.distributed.is_available()
        and torch.distributed.is_initialized()
    ):
        torch.distributed.destroy_process_group()


def _config_flags(args: list[str]) -> list[str]:
    """Hydra's flags that say where the config comes from (--config-dir/-cd, --config-name/-cn,
    --config-path/-cp, as "flag value" or "flag=value"), which the other ranks need as much
    as the overrides; -m and the sweep's own overrides are left out."""
    kept, args = [], iter(args)
    for arg in args:
        if arg in CONFIG_FLAGS:
            kept += [arg, next(args, "")]
        elif arg.split("=", 1)[0] in CONFIG_FLAGS:
            kept.append(arg)
    return kept


def check_run_folder(cfg: DictConfig) -> None:
    """LungsegError where ``output_dir`` is not Hydra's run folder: the run would be split in
    two, train.log and .hydra/ in one folder, checkpoints and metrics in the other."""
    hydra_dir = HydraConfig.get().runtime.output_dir
    if Path(cfg.output_dir).expanduser().resolve() != Path(hydra_dir).resolve():
        fix = (
            "Leave output_dir out: each job writes into its own folder of the sweep "
            "(hydra.sweep.dir=<folder> chooses the sweep's)."
            if HydraConfig.get().mode == RunMode.MULTIRUN
            else f"Give hydra.run.dir={cfg.output_dir} instead (output_dir follows it)."
        )
        raise LungsegError(
            f"output_dir={cfg.output_dir} is not the run folder Hydra made ({hydra_dir}), so "
            f"the run would be split in two: train.log and .hydra/ there, checkpoints, "
            f"metrics and TensorBoard files in {cfg.output_dir}. {fix}"
        )


def train_run(cfg: DictConfig) -> dict:
    check_run_folder(cfg)
    # Imported here, not above: torch and Lightning take seconds to import, and a command line
    # Hydra refuses (a mistyped key, a list the shell split) is answered without them.
    from lungseg.train import train

    return train(cfg)


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> float | None:
    # Warnings (files skipped with data.strict=false, ...) into train.log too, not only stderr.
    logging.captureWarnings(True)
    sweep_job = HydraConfig.get().mode == RunMode.MULTIRUN
    if not sweep_job and SWEEP_RANK not in os.environ:
        metrics = run_cli(lambda: train_run(cfg), HydraConfig.get().runtime.output_dir)
    else:
        try:
            # Ranks 1..N-1 leave the process group before they exit, as rank 0 does.
            with ddp_ranks_in_this_job() if sweep_job else end_of_rank():
                metrics = train_run(cfg)
        except Exception as error:
            if user_error(error) is None:
                raise
            # Exiting would end the whole sweep (Lightning ends every rank when one exits with
            # an error). The next job runs instead; rank 0 records the error, and the sweep
            # summary (lungseg.sweep.SweepSummary) lists it and makes the sweep exit with 1.
            if sweep_job:  # in the job's folder (output_dir may be set to another)
                job = HydraConfig.get()
                record_error(job.runtime.output_dir, error, list(job.overrides.task))
            else:
                log.error("this rank stopped; rank 0 records the error: %s", user_error(error))
            return None
    # The value a Hydra sweeper (e.g. Optuna) maximises.
    return metrics.get("best_score")


if __name__ == "__main__":
    with hint_on_override_error("train.py", "config"):
        main()
