"""The training task: build data, model, callbacks, logger and trainer from a Hydra config,
fit, test the best checkpoint and write the run's record."""

import json
import logging
import math
import shlex
import shutil
import signal
import time
import warnings
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import EarlyStopping, ModelCheckpoint, ProgressBar, Timer
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from lungseg import hostmem, hydra_files, postprocess, ranks
from lungseg.callbacks import EMA, FitScheduleToTime
from lungseg.checks import check_settings
from lungseg.data.folders import is_pattern, mask_folders
from lungseg.data.splits import trains_without_validation
from lungseg.errors import LungsegError, counted
from lungseg.evaluate import evaluate, scores, test_config
from lungseg.files import aside_name, keep_previous, set_aside
from lungseg.module import SegmentationModule
from lungseg.run_folder import (
    RunCheckpointIO,
    apply_initial_weights,
    check_continuable,
    check_fits,
    check_same_classes,
    check_same_network,
    check_same_optimizer,
    check_same_preparation,
    check_same_split,
    continues_run,
    hold_run_folder,
    interrupted_bests,
    missing_bests,
    read_checkpoint,
    read_initial_weights,
    resume_checkpoint,
    run_checkpoints,
    untested,
    warn_trained_on,
    write_environment,
)
from lungseg.visualize import save_curves

log = logging.getLogger(__name__)

# Lightning's advice to add DataLoader workers does not apply: the data is decoded once and
# cached in memory, and on a 2-core CPU workers would compete with the network for cores.
warnings.filterwarnings("ignore", ".*does not have many workers.*")
# Lightning 2.6's own use of a torch pytree API that torch 2.13 deprecates, once per run in
# every train.log; nothing a lungseg user can change.
warnings.filterwarnings("ignore", r"`isinstance\(treespec, LeafSpec\)` is deprecated")
# Continuing a run: its checkpoints/ holds files (a run folder is refused unless continued),
# and a ckpt_path into a new folder tracks its best anew there; both as documented.
warnings.filterwarnings("ignore", r"Checkpoint directory .* exists and is not empty")
warnings.filterwarnings("ignore", r"The dirpath has changed from .* won't be reloaded")


def plain(cfg: DictConfig | None) -> Any:
    """A resolved, OmegaConf-free copy of a config node (what checkpoints may hold)."""
    return None if cfg is None else OmegaConf.to_container(cfg, resolve=True)


def accelerator_settings(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """Map the Lightning 1.x ``gpus`` key onto ``accelerator``/``devices`` and check that a
    requested GPU exists, so a CPU-only machine gets one clear sentence, not a traceback.

    gpus: null (use accelerator/devices as given), 0 (CPU), N (N GPUs), -1 (all GPUs) or a
    list of GPU indices."""
    cfg = dict(trainer_cfg)
    gpus = cfg.pop("gpus", None)
    if gpus is not None:
        if gpus == 0 or gpus == []:
            cfg.update(accelerator="cpu", devices=1)
        else:
            cfg.update(accelerator="gpu", devices=gpus)
    if cfg.get("accelerator") in ("gpu", "cuda"):
        asked = f"trainer.gpus={gpus}" if gpus is not None else "trainer.accelerator=gpu"
        given = "trainer.gpus" if gpus is not None else "trainer=gpu or trainer.accelerator=gpu"
        if not torch.cuda.is_available():
            raise LungsegError(
                f"{asked} asks for a GPU, but PyTorch sees none (torch.cuda.is_available() is "
                f"False; this torch build is {torch.__version__}). Train on the CPU by leaving "
                f"out {given} (or with trainer=cpu), or install a CUDA build of PyTorch on a "
                "machine with an NVIDIA GPU."
            )
        wanted = cfg.get("devices")
        count = torch.cuda.device_count()
        if isinstance(wanted, int) and wanted > count:
            raise LungsegError(
                f"{asked} asks for {wanted} GPUs but this machine has {count}; "
                f"use trainer.gpus={count} or fewer."
            )
        if isinstance(wanted, (list, tuple)):
            absent = [i for i in wanted if not isinstance(i, int) or not 0 <= i < count]
            if absent:
                raise LungsegError(
                    f"{asked} asks for GPU {', '.join(map(str, absent))}, but this machine has "
                    f"{count} (numbered 0 to {count - 1}); name GPUs among those, e.g. "
                    f"trainer.gpus=[{', '.join(map(str, range(min(len(wanted), count))))}], or "
                    f"give a number: trainer.gpus={min(len(wanted), count)}."
                )
    on_gpu = trains_on_gpu(cfg)
    if cfg.get("sync_batchnorm") and not on_gpu:
        # PyTorch's SyncBatchNorm refuses CPU modules ("only work with GPU modules").
        log.info("trainer.sync_batchnorm is GPU-only: each CPU process normalises its own batch")
        cfg["sync_batchnorm"] = False
    if not on_gpu and str(cfg.get("precision")) in ("16-mixed", "16"):
        # Lightning would warn and train in bf16-mixed instead, while config.yaml says 16-mixed
        raise LungsegError(
            f"trainer.precision={cfg['precision']} is float16 mixed precision, which needs a CUDA "
            f"GPU, but this run trains on the CPU. Give trainer.precision=bf16-mixed (mixed "
            f"precision on the CPU) or 32-true, or train on a GPU (trainer.gpus=1)."
        )
    return cfg


def trains_on_gpu(settings: dict[str, Any]) -> bool:
    """Whether trainer settings (``accelerator_settings``'s, ``gpus`` mapped) train on a GPU."""
    accelerator = settings.get("accelerator", "auto")
    return accelerator in ("gpu", "cuda") or (accelerator == "auto" and torch.cuda.is_available())


def cpu_bf16_hint(settings: dict[str, Any]) -> str | None:
    """A line for a run that trains in float32 on a CPU that computes bf16 in hardware (AMX,
    AVX512-BF16), where ``trainer.precision=bf16-mixed`` is much the faster path; None
    elsewhere. ``settings``: the trainer's, from ``accelerator_settings``."""
    if trains_on_gpu(settings) or str(settings.get("precision", "32-true")) not in (
        "32-true",
        "32",
    ):
        return None
    checks = (("AMX", "_is_amx_tile_supported"), ("AVX512-BF16", "_is_avx512_bf16_supported"))
    units = [name for name, check in checks if getattr(torch.cpu, check, lambda: False)()]
    if not units:
        return None
    return (
        f"this CPU computes bf16 in hardware ({', '.join(units)}): trainer.precision=bf16-mixed "
        "ran the demo 1.3x and, with channels_last=true, a width-64 U-Net at 256 px 2x faster "
        'than float32 on one (README, "Speed")'
    )


def build_datamodule(cfg: DictConfig) -> pl.LightningDataModule:
    """Instantiate and set up the data, then write the inferred class count back into the
    config, so ``model.num_classes: ${data.num_classes}`` resolves to it."""
    datamodule = instantiate(
        cfg.data, augmentation=plain(cfg.augmentation), _convert_="all", _recursive_=False
    )
    datamodule.prepare_data()
    datamodule.setup("fit")
    OmegaConf.update(cfg, "data.num_classes", datamodule.num_classes)
    return datamodule


def flatten(tree: Any, prefix: str = "") -> dict[str, Any]:
    """{"model": {"width": 8}} → {"model.width": 8}, lists as strings (TensorBoard hparams)."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for key, value in tree.items():
            out.update(flatten(value, f"{prefix}{key}."))
        return out
    value = tree if isinstance(tree, int | float | str | bool) else str(tree)
    return {prefix[:-1]: value}


def planned_epochs(trainer: pl.Trainer) -> int | None:
    """The epochs callbacks.time_plan fitted the schedule to in trainer.max_time, if it did."""
    for callback in trainer.callbacks:
        if isinstance(callback, FitScheduleToTime):
            return callback.planned_epochs(trainer)
    return None


def stop_reason(trainer: pl.Trainer, max_epochs: int | None = None) -> str:
    """Why fit ended: "early_stopping", "max_time", "max_epochs", "max_steps", "fast_dev_run"
    (a check of the code path on a batch or a few, not a trained model) or "other". A time
    limit that cut the planned epochs short is also logged as a warning: the learning-rate
    schedule was planned for trainer.max_epochs. ``max_epochs``: the configured one, which
    the trainer's may not be (a run tested after its training trains nothing): where early
    stopping ended the last of those epochs, every epoch ran, and that is "max_epochs"."""
    if trainer.fast_dev_run:
        return "fast_dev_run"
    ran_all = max_epochs is not None and 0 <= max_epochs <= trainer.current_epoch
    for callback in trainer.early_stopping_callbacks:
        reason = getattr(callback, "stopping_reason", None)  # an Enum, NOT_STOPPED = 0
        stopped = callback.stopped_epoch > 0 if reason is None else reason.value != 0
        # stopped_epoch: the epoch it stopped in, this run's last (a continued run restores
        # the stop that ended the run before it)
        if stopped and callback.stopped_epoch == trainer.current_epoch - 1 and not ran_all:
            return "early_stopping"
    timer = next((c for c in trainer.callbacks if isinstance(c, Timer)), None)
    remaining = timer.time_remaining() if timer is not None else None
    epochs, planned = trainer.current_epoch, trainer.max_epochs
    fitted = planned_epochs(trainer)
    if fitted is not None and 0 <= fitted <= epochs:
        return "max_time"  # the epochs the schedule was fitted to in trainer.max_time
    if remaining is not None and remaining <= 0:
        if planned is not None and 0 <= epochs < planned:
            group = trainer.optimizers[0].param_groups[0] if trainer.optimizers else {}
            lr, start = group.get("lr", math.nan), group.get("initial_lr")
            log.warning(
                "trainer.max_time stopped training after %d of %s epochs, %s. Raise "
                "trainer.max_time (or set it to null), or plan fewer epochs for this machine "
                "and data.",
                epochs,
                f"trainer.max_epochs={planned}"
                if fitted is None
                else f"the {planned} that callbacks.time_plan expected to fit in it",
                # the learning rate itself had read as a share ("at 0.002 of its schedule")
                f"with the learning rate at {lr:.3g}, {100 * lr / start:.0f} % of its first "
                f"{start:.3g}, on a schedule planned for {planned} epochs"
                if start
                else f"with the learning rate at {lr:.3g}",
            )
        return "max_time"
    if planned is not None and 0 <= planned <= epochs:
        return "max_epochs"
    if 0 <= trainer.max_steps <= trainer.global_step:
        return "max_steps"
    return "other"


def logged_steps(checkpoint: dict[str, Any]) -> int:
    """The step that Lightning's loggers give the first point logged after ``checkpoint``:
    its count of batches that stepped the optimiser (as ``global_step`` with one optimiser;
    an epoch's end is logged at the step before, with the epoch's last batch)."""
    loop = ((checkpoint.get("loops") or {}).get("fit_loop") or {}).get("epoch_loop.state_dict")
    return int((loop or {}).get("_batches_that_stepped", checkpoint.get("global_step", 0)))


def build_logger(config: DictConfig, out_dir: Path, purge_step: int | None) -> Any:
    """The logger of ``config``. A TensorBoard logger that writes into the run folder of a
    continued run gets ``purge_step`` (``logged_steps`` of its checkpoint): TensorBoard then
    hides what earlier sessions there logged from that step on, the epoch an interrupted run
    did not finish, which this run trains and logs again (the curves zig-zagged there)."""
    logger = instantiate(config)
    if purge_step is None or not isinstance(logger, TensorBoardLogger):
        return logger
    if not Path(logger.log_dir).resolve().is_relative_to(out_dir.resolve()):
        return logger  # another folder's log (shared by runs?): not this run's to hide
    return instantiate(config, purge_step=purge_step)


def check_without_validation(cfg: DictConfig) -> None:
    """LungsegError for settings that need a val split, in a fit without one (data.split with
    a val fraction of 0): a hyper-parameter search (Optuna maximises the best val score), a
    scheduler that watches a val/* metric; no checkpoint without a monitor
    (callbacks.last_checkpoint), which keeps the final weights, the run's model. Before
    anything is written."""
    if HydraConfig.initialized() and "optuna" in str(HydraConfig.get().sweeper.get("_target_")):
        raise LungsegError(
            f"data.split {list(cfg.data.split)} has no val split, but hparams_search=optuna "
            f"maximises each trial's best val/dice, which only a val split gives. Give "
            f"data.split a val fraction > 0 for the search, and train the chosen settings "
            f"without validation afterwards."
        )
    checkpoints = [
        c
        for c in (cfg.get("callbacks") or {}).values()
        if c is not None and str(c.get("_target_", "")).endswith("ModelCheckpoint")
    ]
    if not any(c.get("monitor") is None for c in checkpoints):
        raise LungsegError(
            "a fit without a val split (data.split with a val fraction of 0) keeps its final "
            "weights through callbacks.last_checkpoint, which this config leaves out. Keep "
            "callbacks.last_checkpoint, or give data.split a val fraction > 0."
        )
    scheduler = plain(cfg.get("scheduler")) or {}
    if str(scheduler.get("_target_", "")).endswith("ReduceLROnPlateau") and watches_val(
        scheduler.get("monitor", "val/loss")
    ):
        raise LungsegError(
            f"data.split {list(cfg.data.split)} has no val split, but the plateau scheduler "
            f"lowers the learning rate when {scheduler.get('monitor', 'val/loss')} stops "
            f"improving, which only a val split logs. Choose scheduler=cosine (or "
            f"scheduler=none), or give data.split a val fraction > 0."
        )


def watches_val(monitor: str | None) -> bool:
    """Whether a callback or scheduler's monitor is a metric that only validation logs."""
    return bool(monitor) and str(monitor).startswith("val/")


def without_validation(callbacks: list[Any]) -> list[Any]:
    """The callbacks of a fit without a val split: early stopping and the checkpoint of the
    best val score left out (they watch val/* metrics, which nothing logs); the checkpoint
    without a monitor (callbacks.last_checkpoint) keeps the final weights, the run's model."""
    left_out = [
        c
        for c in callbacks
        if isinstance(c, EarlyStopping | ModelCheckpoint) and watches_val(c.monitor)
    ]
    log.info(
        "no val split (data.split's val fraction is 0): training runs its full schedule "
        "without validation; %s left out; the final weights (checkpoints/last.ckpt) are the "
        "model that is tested and that eval.py and predict.py use",
        " and ".join(sorted({type(c).__name__ for c in left_out})) or "nothing",
    )
    return [c for c in callbacks if not any(c is x for x in left_out)]


def postprocessed_test(
    cfg: DictConfig, checkpoint: str, out_dir: Path, device: str = "auto"
) -> dict[str, Any]:
    """eval.py's scores of the test split with the run's ``postprocess`` (threshold, min_size,
    min_confidence) and ``tta_flips``, as ``test_post/*``, on ``device`` (the run's: a run
    trained on the CPU is not scored on a GPU it left alone); the folder ``test_postprocessed/``
    gets eval.py's per_image.csv and summary.json (an earlier one is kept as
    ``test_postprocessed.<n>``). Nothing when the recipe post-processes nothing: the
    ``test/*`` scores are then the whole story. A failure is a warning that names eval.py's
    command: the run itself has finished."""
    chosen = plain(cfg.get("postprocess")) or {}
    if not chosen.get("tta_flips") and not postprocess.active(postprocess.settings(chosen, None)):
        return {}
    folder = out_dir / "test_postprocessed"
    if folder.exists():
        set_aside(folder)
    try:
        summary = evaluate(OmegaConf.merge(test_config(checkpoint, folder), {"device": device}))
    except (LungsegError, RuntimeError, OSError) as err:
        log.warning(
            "the test split was not scored with the post-processing (%s); score it with "
            "`python eval.py ckpt_path=%s`",
            err,
            checkpoint,
        )
        return {}
    return scores(summary, "test_post")


def _sweep_folder(job_dir: Path) -> Path:
    """The sweep folder of a multirun job's folder (``hydra.sweep.subdir`` may hold '/')."""
    try:
        depth = len(Path(str(HydraConfig.get().sweep.subdir)).parts)
        return job_dir.parents[depth - 1]
    except Exception:  # no Hydra, or a subdir that does not resolve here
        return job_dir.parent


def check_outside_data(out_dir: Path, data: DictConfig) -> None:
    """LungsegError where the run folder is one of the data folders (or lies below one that
    data.recursive searches): checkpoints/, curves.png and split.csv would mix with the
    user's images or masks, and the next run would read curves.png as an unpaired image."""
    if data.get("image_dir") is None:
        return  # the demo data
    folders = {"data.image_dir": [Path(str(data.image_dir)).expanduser()]}
    folders["data.mask_dir"] = mask_folders(data.mask_dir)
    run = out_dir.expanduser().resolve()
    for setting, paths in folders.items():
        for folder in paths:
            if is_pattern(folder) or not folder.is_dir():
                continue  # the data checks name a missing folder
            inside = data.get("recursive") and run.is_relative_to(folder.resolve())
            if run == folder.resolve() or inside:
                where = "is" if run == folder.resolve() else "lies in"
                raise LungsegError(
                    f"The run folder {out_dir} {where} {setting} ({folder}): its "
                    f"checkpoints, curves.png and split.csv would mix with your files, and the "
                    f"next run would read curves.png as an image without a mask. Give "
                    f"hydra.run.dir a folder outside the data folders."
                )


def train(cfg: DictConfig) -> dict[str, Any]:
    """Fit, test the best checkpoint, and write into ``cfg.output_dir``: ``checkpoints/``,
    ``tensorboard/``, ``split.csv``, ``config.yaml`` (resolved), ``environment.json``
    (versions, git commit), ``metrics.json`` and ``curves.png``. A folder that already holds a
    run is refused unless this run continues it (``resume=true``, or ``ckpt_path`` in it).
    Returns the metrics written to metrics.json."""
    out_dir = Path(cfg.output_dir)
    try:  # first: any refusal after it would leave Hydra's files in a data folder
        check_outside_data(out_dir, cfg.data)
    except LungsegError:
        # Hydra's .hydra/ and train.log out of the user's folder; a sweep's job keeps them, so
        # that the sweep's summary lists the job as failed (lungseg.sweep.collect_runs)
        if not (HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN):
            hydra_files.withdraw(out_dir)
        raise
    with hold_run_folder(out_dir):  # a second training in this folder is refused
        return _train(cfg, out_dir)


def _train(cfg: DictConfig, out_dir: Path) -> dict[str, Any]:
    """train's work, in the run folder it holds."""
    check_settings(cfg)  # wrong types and ranges, missing data folders: before anything
    started = time.monotonic()
    hostmem.configure(cfg.get("retain_freed_memory", True))
    trainer_settings = accelerator_settings(plain(cfg.trainer))  # before anything is written
    ckpt_path = resume_checkpoint(cfg, out_dir)
    initial = None  # init_weights: a new run from another run's network weights
    if cfg.get("init_weights") is not None:
        if not isinstance(cfg.init_weights, str):
            raise LungsegError(
                f"init_weights is {cfg.init_weights!r}; give one checkpoint's path, e.g. "
                f"init_weights=outputs/train/<run>/checkpoints/best-epoch012.ckpt."
            )
        if cfg.get("ckpt_path"):
            raise LungsegError(
                f"init_weights and ckpt_path are both given: ckpt_path={cfg.ckpt_path} "
                f"continues a run (its optimiser, schedule and epoch count), init_weights="
                f"{cfg.init_weights} starts a new one from its network's weights. Give one."
            )
        if ckpt_path is None:  # else resume=true continues this run from its last.ckpt
            init_path = Path(cfg.init_weights).expanduser()
            initial = read_initial_weights(init_path, plain(cfg.model))
    out_dir.mkdir(parents=True, exist_ok=True)
    pl.seed_everything(cfg.seed, workers=True)

    # From the config alone, before the data is decoded; a split file is read first.
    checked = trains_without_validation(cfg.data.split) and cfg.data.get("split_file") is None
    if checked:
        check_without_validation(cfg)
    datamodule = build_datamodule(cfg)
    datamodule.check_fit_split()
    if len(datamodule.val_dataset) == 0 and not checked:
        check_without_validation(cfg)
    # trainer.limit_val_batches=0 validates nothing either: the callbacks that watch val/*
    # (early stopping, the best checkpoint) are left out as for a val fraction of 0, instead
    # of waiting for metrics that never come (benchmarks/throughput.py keeps no checkpoint)
    validating = len(datamodule.val_dataset) > 0 and trainer_settings.get("limit_val_batches") != 0
    module = SegmentationModule(
        net=plain(cfg.model),
        loss=plain(cfg.loss),
        optimizer=plain(cfg.optimizer),
        scheduler=plain(cfg.scheduler),
        data_info=datamodule.data_info(),
        channels_last=cfg.get("channels_last", False),
        compile=cfg.get("compile", False),
        train_metrics_every_n_steps=cfg.get("train_metrics_every_n_steps", 1),
        postprocess=plain(cfg.get("postprocess")),
    )
    module.run_started = started
    continuing = continues_run(ckpt_path, out_dir)
    # the time of the run this one continues in its folder; a ckpt_path's run's is its own
    module.time_restored = not continuing
    # built before anything is written (a callback's wrong setting refuses the command first)
    callbacks = [instantiate(c) for c in cfg.callbacks.values() if c is not None]
    own = run_checkpoints(callbacks, out_dir / "checkpoints")  # the run's checkpoint records
    purge_step = None  # TensorBoard's first step that this continuation logs again
    stale: list[Path] = []  # best checkpoints of an epoch the continued run trains again
    restored: list[Path] = []  # the best checkpoint an interrupted run removed, from last.ckpt
    finishing = False  # a run stopped in its test after training: tested, nothing trained
    from_last = False  # continued from the run's own last.ckpt
    last = out_dir / "checkpoints" / "last.ckpt"
    if ckpt_path is not None:
        saved = read_checkpoint(Path(ckpt_path))  # once for all checks
        check_fits(ckpt_path, module, saved, demo=cfg.data.get("image_dir") is None)
        check_same_network(ckpt_path, saved, module.hparams.net, continuing)
        check_same_optimizer(ckpt_path, saved, module.hparams.optimizer)
        # For check_same_preparation below, after the split's check (another split changes
        # the training images' statistics too; the split is the first thing to name).
        described = {"hyper_parameters": saved.get("hyper_parameters") or {}}
        if continuing:
            check_same_classes(ckpt_path, saved, datamodule.data_info())
            purge_step = logged_steps(saved)
        if rank_zero_only.rank == 0:  # where a continued run's train.log picks up
            log.info(
                "continuing from %s: %s trained, the next is epoch %d",
                ckpt_path,
                counted(int(saved.get("epoch", -1)) + 1, "epoch"),
                int(saved.get("epoch", -1)) + 1,
            )
        from_last = continuing and last.is_file() and Path(ckpt_path).resolve() == last.resolve()
        try:
            check_continuable(cfg, ckpt_path, saved)
        except LungsegError:
            # nothing left to train: unless it was stopped in its test (no record of it yet)
            finishing = from_last and untested(out_dir, saved)
            if not finishing:
                raise
            # its epochs and no more (an early-stopped run would train one again)
            trainer_settings["max_epochs"] = int(saved.get("epoch", -1)) + 1
        if from_last:
            stale = interrupted_bests(saved, out_dir / "checkpoints")
            restored = missing_bests(saved, out_dir / "checkpoints", own)
        del saved  # Lightning reads it again to restore it
    if initial is not None:
        apply_initial_weights(module.net, initial, init_path)
        if rank_zero_only.rank == 0:  # scores of files its run trained on would flatter
            warn_trained_on(str(init_path), datamodule.split)
    split_saved = continuing and (out_dir / "split.csv").is_file()
    if split_saved:
        check_same_split(out_dir / "split.csv", datamodule.split)
    if ckpt_path is not None:
        check_same_preparation(ckpt_path, described, datamodule.data_info(), continuing)
    if not split_saved and rank_zero_only.rank == 0:
        if ckpt_path is not None:
            warn_trained_on(ckpt_path, datamodule.split)
        datamodule.write_split(out_dir / "split.csv")
        if datamodule.skipped:
            datamodule.write_skipped(out_dir / "skipped.csv")
            log.warning(
                "%s left out (data.strict=false); each is listed with its reason in %s",
                counted(len(datamodule.skipped), "file was", "files were"),
                out_dir / "skipped.csv",
            )
    if (
        rank_zero_only.rank == 0
    ):  # a continued run keeps the config it started with as config.1.yaml
        keep_previous(out_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        kept = hydra_files.settle(out_dir)
        if kept:
            log.info(
                "the run folder's earlier Hydra record is kept as %s",
                ", ".join(str(p.relative_to(out_dir)) for p in kept),
            )
    write_environment(out_dir)
    if stale and rank_zero_only.rank == 0:
        # renamed, not removed: no longer best-*.ckpt, which the run's scoring looks for
        aside = []
        for path in stale:  # an earlier interruption's file of that name is kept too
            target = path.with_name(f"interrupted-{path.name}")
            aside.append(path.rename(aside_name(target) if target.exists() else target))
        log.info(
            "%s set aside as %s: saved in the epoch the interrupted run did not finish, which "
            "this run trains again",
            ", ".join(p.name for p in stale),
            ", ".join(p.name for p in aside),
        )
    if continuing and not from_last and last.is_file() and rank_zero_only.rank == 0:
        # continued from an earlier checkpoint of the run: its later last.ckpt would be
        # written over by this run's first epoch
        kept = set_aside(last)
        log.info(
            "%s, the run's last epoch before this continuation from %s, is kept as %s",
            last.name,
            Path(ckpt_path).name,
            kept.name,
        )
    if finishing and rank_zero_only.rank == 0:
        log.info(
            "%s: the run was stopped after training its %d epochs, before its test wrote "
            "metrics.json; it is tested now, and nothing is trained",
            ckpt_path,
            trainer_settings["max_epochs"],
        )
    if restored and rank_zero_only.rank == 0:
        for path in restored:
            shutil.copyfile(last, path)
        log.info(
            "%s restored from last.ckpt (the same epoch's weights): the interrupted run had "
            "removed it when it saved a better one in the epoch it did not finish",
            ", ".join(p.name for p in restored),
        )
    # after the checks: a refused command leaves its run folder empty (then removed) and a
    # finished run's train.log as it was
    hint = cpu_bf16_hint(trainer_settings)
    if hint and rank_zero_only.rank == 0:
        log.info(hint)
    callbacks = [c for c in callbacks if not (isinstance(c, EMA) and not c.enabled)]
    if not trainer_settings.get("enable_progress_bar", True):  # Lightning refuses a bar then
        callbacks = [c for c in callbacks if not isinstance(c, ProgressBar)]
    if not validating:
        callbacks = without_validation(callbacks)
        trainer_settings["limit_val_batches"] = 0  # skipped, rather than an empty loader
        # Lightning saves an unmonitored checkpoint at an epoch's end only when it would
        # validate every epoch; otherwise it waits for a validation that never comes.
        trainer_settings["check_val_every_n_epoch"] = 1
    loggers = [build_logger(c, out_dir, purge_step) for c in cfg.logger.values() if c is not None]
    # a moved run folder's record of its best followed; an earlier record's best kept
    # (the user's trainer.plugins, one or a list, kept beside it)
    given = instantiate(trainer_settings.pop("plugins", None) or [], _convert_="all")
    given = given if isinstance(given, list | tuple) else [given]
    plugins = [*given, RunCheckpointIO(out_dir, own)]
    trainer = instantiate(trainer_settings, callbacks=callbacks, logger=loggers, plugins=plugins)
    ranks.remember(trainer.strategy.launcher)  # a sweep's job ends when its ranks have
    try:
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path, weights_only=True)
    except SystemExit as stop:  # Lightning's exit after Ctrl-C and its graceful shutdown
        if trainer.interrupted and trainer.is_global_zero:
            last = out_dir / "checkpoints" / "last.ckpt"
            sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
            log.warning(
                "Interrupted. %s; continue the run with the same command and %s resume=true.",
                f"{last} holds the last finished epoch"
                if last.is_file()
                else "No epoch had finished, so there is no checkpoint to continue from",
                # a sweep continues in its folder: -m, its overrides, hydra.sweep.dir
                f"hydra.sweep.dir={shlex.quote(str(_sweep_folder(out_dir)))}"
                if sweep
                else f"hydra.run.dir={shlex.quote(str(out_dir))}",
            )
        if trainer.received_sigterm and not stop.code:
            # Lightning ends a run stopped by SIGTERM (a cluster's pre-emption, `kill`) with
            # SystemExit() and status 0, as if it had finished: 143 (128 + SIGTERM) as the
            # shell gives, so that `train.py && eval.py` stops and SLURM can requeue the job.
            raise SystemExit(128 + signal.SIGTERM) from stop
        raise

    # The callback that keeps the best epoch (callbacks.model_checkpoint), not last.ckpt's;
    # without validation the final weights (last.ckpt) are the model.
    checkpoint = next(
        (c for c in trainer.checkpoint_callbacks if bool(c.monitor) == validating), None
    )
    best_path = checkpoint.best_model_path if checkpoint is not None else ""
    if best_path and not continues_run(best_path, out_dir):
        best_path = ""  # the restored path of the run a ckpt_path came from, not of this one
    best_gone = bool(best_path) and not Path(best_path).is_file()
    if best_gone:  # every rank: the run folder is shared, and each tests the same file
        # removed by an interrupted run when it saved a better one in the epoch it did not
        # finish (set aside as interrupted-best-*.ckpt), and older than last.ckpt's epoch, so
        # not restored from it; no later epoch of this run has beaten its score
        if trainer.is_global_zero:
            log.warning(
                "%s, the best checkpoint the continued run recorded, is gone: an interrupted "
                "run removes the earlier best when the epoch it does not finish saves a better "
                "one. No epoch since has beaten its score; %s, and metrics.json records no "
                "best score.",
                best_path,
                f"the final weights, {last}, are tested instead"
                if last.is_file()
                else "the weights in memory are tested instead",
            )
        best_path = str(last) if last.is_file() else ""
    metrics: dict[str, Any] = {
        "epochs_trained": trainer.current_epoch,
        "stopped_by": stop_reason(trainer, cfg.trainer.get("max_epochs")),
        "planned_epochs": planned_epochs(trainer),  # fitted to trainer.max_time, or null
        "best_checkpoint": best_path or None,
        "best_epoch": torch.load(best_path, map_location="cpu", weights_only=True)["epoch"]
        if best_path
        else None,
        "monitor": checkpoint.monitor if checkpoint is not None else None,
        "best_score": float(checkpoint.best_model_score)
        if checkpoint is not None and checkpoint.best_model_score is not None and not best_gone
        else None,  # a removed best's score is not the tested checkpoint's
    }
    if cfg.get("test_after_fit", True):
        # Without a saved best checkpoint (fast_dev_run) the weights in memory are tested.
        try:
            results = trainer.test(
                module, datamodule=datamodule, ckpt_path=best_path or None, weights_only=True
            )
        except SystemExit as stop:  # Ctrl-C or SIGTERM in the test, after Lightning's shutdown
            if trainer.is_global_zero:
                log.warning(
                    "Interrupted in the test, after training: metrics.json is not written. "
                    "Test the run and write it with the same command and resume=true."
                )
            if trainer.received_sigterm and not stop.code:  # status 143, as in fit
                raise SystemExit(128 + signal.SIGTERM) from stop
            raise
        metrics.update(results[0] if results else {})
    # fit and test; a continued run's earlier segments too, up to the checkpoint it continued
    metrics["train_minutes"] = module.trained_seconds() / 60
    tested = "test/loss" in metrics  # a test split was scored
    if tested and cfg.get("test_postprocessed", True) and trainer.is_global_zero and best_path:
        where = str(trainer.strategy.root_device)  # "cpu", "cuda:0"
        metrics.update(postprocessed_test(cfg, best_path, out_dir, where))
    metrics = {
        k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in metrics.items()
    }

    if trainer.is_global_zero:
        keep_previous(out_dir / "metrics.json", json.dumps(metrics, indent=2) + "\n")
        final = {f"hp/{k}": v for k, v in metrics.items() if isinstance(v, float) and "/" in k}
        for logger in trainer.loggers:
            logger.log_hyperparams(flatten(plain(cfg)), final)
            logger.finalize("success")  # flush: the trainer already closed its writers
        log.info("metrics written to %s", out_dir / "metrics.json")
        save_curves(trainer, out_dir / "curves.png", metrics["best_epoch"])
    return metrics
