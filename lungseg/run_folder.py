"""A training run's folder: never written over, resumable, and recorded well enough to
repeat the run (``environment.json``: package versions, platform, git commit)."""

import contextlib
import csv
import json
import logging
import os
import platform
import re
import shlex
import socket
import subprocess
import sys
from collections.abc import Iterator, Mapping
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import albumentations
import cv2
import hydra
import numpy as np
import pytorch_lightning as pl
import torch
import torchmetrics
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import ModelCheckpoint, Timer
from pytorch_lightning.plugins.io import TorchCheckpointIO
from pytorch_lightning.utilities import rank_zero_only

from lungseg.checks import same, shown
from lungseg.data.splits import listed_splits
from lungseg.errors import LungsegError, RunFolderInUse
from lungseg.files import aside_name, keep_previous, replace_whole

try:
    import fcntl
except ImportError:  # Windows: no flock; a run folder is not held there
    fcntl = None

log = logging.getLogger(__name__)

# What train() writes into a run folder before and while it trains; a folder holding any of
# them holds a run (Hydra's own .hydra/ and train.log are there before train() starts).
RUN_FILES = ("split.csv", "config.yaml", "environment.json", "checkpoints", "metrics.json")
PACKAGES = {
    "torch": torch,
    "pytorch-lightning": pl,
    "hydra-core": hydra,
    "torchmetrics": torchmetrics,
    "albumentations": albumentations,
    "opencv": cv2,
    "numpy": np,
}
_GIT_TIMEOUT_S = 10


# Held by the training in a run folder (``hold_run_folder``); named so that ls hides it.
LOCK_FILE = ".lungseg.lock"


@contextlib.contextmanager
def hold_run_folder(out_dir: Path) -> Iterator[None]:
    """Hold ``out_dir`` while this process trains in it, so that a second training there
    (``resume=true`` while the first still runs, or the same ``hydra.run.dir`` twice) is
    refused instead of both writing the same checkpoints, logs and metrics. The hold is an
    OS lock (``flock``) on ``out_dir/.lungseg.lock``, which the OS lets go when the process
    ends, however it ends (a file left by a killed run holds nothing; processes it forked,
    DataLoader workers, hold it until they end too); the file names the holder and is removed
    on the way out. Rank 0 only (the other DDP ranks share its folder).
    Nothing is held in a folder that does not exist yet (Hydra makes the CLI's first), on a
    system without flock (Windows), or where the file system refuses the lock."""
    path = out_dir / LOCK_FILE
    if fcntl is None or rank_zero_only.rank != 0 or not out_dir.is_dir():
        yield
        return
    handle = _lock(path, out_dir)
    if handle is None:
        yield
        return
    since = datetime.now().isoformat(sep=" ", timespec="seconds")
    handle.seek(0)
    handle.truncate()
    handle.write(f"pid {os.getpid()} on {socket.gethostname()}, since {since}\n")
    handle.flush()
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            path.unlink()  # before the lock goes (_lock: a run that opened it then tries again)
        fcntl.flock(handle, fcntl.LOCK_UN)  # also for forked processes that share it
        handle.close()


def _lock(path: Path, out_dir: Path) -> Any:
    """The open lock file ``path``, locked (flock) for this process, or None where the file
    cannot be made or the file system does not lock. A file that a leaving run removed after
    this one opened it is not the lock any more (another run may have made the next): then
    the path is opened again. LungsegError (RunFolderInUse) where another process holds it."""
    for _ in range(10):
        try:
            handle = open(path, "a+", encoding="utf-8")  # noqa: SIM115 (held until the end)
        except OSError:
            return None
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "another process"
            handle.close()
            raise RunFolderInUse(
                f"The run folder {out_dir} is in use: a training runs in it ({holder}). Two "
                f"trainings in one folder would write over each other's checkpoints and logs. "
                f"Wait for it to end, or stop it (kill -TERM with its pid keeps its last "
                f"finished epoch in checkpoints/last.ckpt) and continue it with resume=true; or "
                f"leave hydra.run.dir unset for a new run in a folder of its own."
            ) from None
        except OSError:  # a file system without locks
            handle.close()
            return None
        try:
            if os.fstat(handle.fileno()).st_ino == os.stat(path).st_ino:
                return handle
        except OSError:  # removed meanwhile
            pass
        handle.close()
    return None


def resume_checkpoint(cfg: DictConfig, out_dir: Path) -> str | None:
    """The checkpoint this run continues from, or None for a fresh start: ``ckpt_path``, else
    with ``resume=true`` the folder's ``checkpoints/last.ckpt`` when it exists.

    Raises LungsegError when ``out_dir`` already holds a run that this one does not continue
    (a run folder is never written over), and for a checkpoint that is missing or that
    ``torch.load(weights_only=True)`` refuses (damaged, or a pickle that would run code)."""
    last = out_dir / "checkpoints" / "last.ckpt"
    if cfg.get("ckpt_path"):
        path = Path(cfg.ckpt_path).expanduser()
    elif cfg.get("resume") and last.is_file():
        path = last
    else:
        path = None
    if path is not None:
        read_checkpoint(path)
    continues = continues_run(None if path is None else str(path), out_dir)
    # The other ranks of a DDP run start in the folder that rank 0 has begun to fill.
    if not continues and rank_zero_only.rank == 0:
        _check_unused(out_dir, bool(cfg.get("resume")))
    return None if path is None else str(path)


def _check_unused(out_dir: Path, resume: bool) -> None:
    found = [name for name in RUN_FILES if (out_dir / name).exists()]
    if not found:
        return
    saved = (out_dir / "metrics.json").exists() or any(out_dir.glob("checkpoints/*.ckpt"))
    if resume and not saved:
        log.warning("resume=true: %s holds no checkpoint yet; starting the run again", out_dir)
        return
    if resume:
        how = (
            "resume=true finds no checkpoints/last.ckpt there; continue from another of its "
            "checkpoints with ckpt_path=<checkpoint>"
        )
    elif saved:
        how = "Continue it with resume=true (from its checkpoints/last.ckpt)"
    else:  # stopped in its first epoch, or after its record was written
        how = "It saved no checkpoint yet: resume=true starts it again there"
    sweep = HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN
    new = (
        "give the sweep another hydra.sweep.dir"
        if sweep
        else "leave hydra.run.dir unset (each run gets its own timestamped folder) or give an "
        "unused path"
    )
    raise LungsegError(
        f"The run folder {out_dir} already holds a run ({', '.join(found)}), and lungseg never "
        f"writes over one. {how}, or start a new run in a new folder: {new}."
    )


def load_safely(path: Path, problem: str, fix: str) -> Any:
    """``torch.load(path, weights_only=True)``: tensors and plain values only, so unpickling
    cannot run code. A file it refuses raises LungsegError "<path> <problem>: ... <fix>"."""
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # damaged, not a torch file, or objects weights_only refuses
        first_line = str(err).splitlines()[0] if str(err) else ""
        raise LungsegError(
            f"{path} {problem}: torch.load(weights_only=True) refused it "
            f"({type(err).__name__}: {first_line}). {fix}"
        ) from None


def checkpoints_in(folder: Path) -> str:
    """For a checkpoint path that is a folder (a run's, or its checkpoints/): the checkpoint
    files in it, as the end of a sentence ("; it holds checkpoints/last.ckpt, ..."); "" for
    none or for a path that is not a folder."""
    if not folder.is_dir():
        return ""
    found = sorted(folder.glob("*.ckpt")) or sorted(folder.glob("checkpoints/*.ckpt"))
    if not found:
        return ""
    names = [p.relative_to(folder).as_posix() for p in found]
    shown = ", ".join(names[:4]) + (f", ... ({len(names)} in all)" if len(names) > 4 else "")
    return f" (it holds {shown}: give one of these files)"


def read_checkpoint(path: Path, setting: str = "ckpt_path") -> dict[str, Any]:
    """A Lightning checkpoint read with ``torch.load(weights_only=True)``: tensors and plain
    values only, so unpickling cannot run code. LungsegError for anything else, naming the
    ``setting`` that gave the path (ckpt_path, init_weights)."""
    if not path.is_file():
        problem = "is a folder" if path.is_dir() else "does not exist"
        resume = ", or resume=true to continue the run in hydra.run.dir" * (setting == "ckpt_path")
        raise LungsegError(
            f"{setting} {path} {problem}{checkpoints_in(path)}. Give a checkpoint written by "
            f"`python train.py`, e.g. <run>/checkpoints/last.ckpt{resume}."
        )
    checkpoint = load_safely(
        path,
        "cannot be trained from",
        "lungseg only loads checkpoints that hold plain values and tensors, never ones that "
        "would run code when unpickled. If it is a checkpoint of a run that was killed while "
        "saving it, use another checkpoint of that run (e.g. checkpoints/best-*.ckpt) as "
        f"{setting}.",
    )
    if not isinstance(checkpoint, dict) or not isinstance(checkpoint.get("state_dict"), dict):
        raise LungsegError(
            f"{path} is a PyTorch file but not a checkpoint written by `python train.py` (it "
            f"has no state_dict). Give <run>/checkpoints/last.ckpt or best-*.ckpt."
        )
    return checkpoint


def read_initial_weights(path: Path, net_config: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The network weights of the checkpoint at ``path`` (``init_weights``: another run, e.g.
    on other data), to start a run of network config ``net_config`` with (``apply_initial_
    weights``); the rest of the run starts fresh (optimiser, schedule, epochs). LungsegError
    for a missing or unsafe file, or another architecture."""
    checkpoint = read_checkpoint(path, "init_weights")
    before = ((checkpoint.get("hyper_parameters") or {}).get("net") or {}).get("_target_")
    target = net_config.get("_target_")
    if before and target and before != target:
        raise LungsegError(
            f"init_weights {path} holds the weights of a {before.rsplit('.', 1)[-1]}, and this "
            f"run trains a {target.rsplit('.', 1)[-1]}: they cannot start it. Give a "
            f"checkpoint of the same architecture, or train that one (model=...)."
        )
    state = checkpoint["state_dict"]
    return {k.removeprefix("net."): v for k, v in state.items() if k.startswith("net.")}


def apply_initial_weights(
    net: torch.nn.Module, weights: dict[str, torch.Tensor], path: Path
) -> None:
    """Load ``weights`` (``read_initial_weights``) into ``net`` where name and shape match;
    the other tensors (another class count, other input channels) keep their fresh
    initialisation, named in a warning. LungsegError when they are under half of its
    values (another width: hardly anything fits)."""
    own = net.state_dict()
    fit = {k: v for k, v in weights.items() if k in own and own[k].shape == v.shape}
    share = sum(v.numel() for v in fit.values()) / max(sum(v.numel() for v in own.values()), 1)
    if share < 0.5:  # another class count or input channels change a sliver of the network
        raise LungsegError(
            f"The network weights in init_weights {path} fit only {share:.0%} of this run's "
            f"network (other model settings, e.g. model.width?). Give a checkpoint of a "
            f"network like this one (see config.yaml in its run folder)."
        )
    net.load_state_dict(fit, strict=False)
    log.info(
        "init_weights %s: the network starts from %d of its %d tensors", path, len(fit), len(own)
    )
    fresh = [k for k in own if k not in fit]
    if fresh:
        log.warning(
            "init_weights %s: %d tensors of this network are not in it with the same shape "
            "(another class count or other input channels?) and start fresh: %s",
            path,
            len(fresh),
            ", ".join(fresh[:6]) + (", ..." if len(fresh) > 6 else ""),
        )


def check_fits(
    path: str, module: torch.nn.Module, checkpoint: dict[str, Any], demo: bool = False
) -> None:
    """LungsegError unless the checkpoint's weights have the names and shapes of ``module``'s,
    so that a run continued with other model settings stops with a sentence, not a traceback.
    Where the classes differ it names both (``demo``: this run reads the bundled demo data,
    often because the data folders were left out of a fine-tuning command)."""
    saved = checkpoint["state_dict"]
    own = module.state_dict()
    differ = sorted(
        key
        for key in own.keys() | saved.keys()
        if key not in own or key not in saved or own[key].shape != saved[key].shape
    )
    if differ:
        before = (checkpoint.get("hyper_parameters") or {}).get("data_info") or {}
        old = before.get("class_names")
        new = list((getattr(module, "hparams", {}).get("data_info") or {}).get("class_names", []))
        source = " (the bundled demo data: data.image_dir is not set)" if demo else ""
        classes = (
            f" It predicts the classes {', '.join(old)}; this run's data has "
            f"{', '.join(new)}{source}."
            if old is not None and new and list(old) != new
            else ""
        )
        raise LungsegError(
            f"{path} holds another network than this run builds: {len(differ)} weights differ "
            f"in name or shape (e.g. {', '.join(differ[:3])}).{classes} Continue with the "
            f"settings it was trained with (model.*, data.in_channels, data.context_slices, "
            f"data.num_classes, the data folders: see config.yaml in its run folder), or train "
            f"from scratch without ckpt_path and resume."
        )


def check_same_network(
    path: str, checkpoint: dict[str, Any], net: dict[str, Any], continuing: bool
) -> None:
    """LungsegError when the run of ``path`` is continued in its folder (``continuing``) with
    model settings other than it was trained with, whose weights keep their shapes (DeepLab's
    output_stride or atrous_rates, a dropout): it would go on training another network than it
    began, with a record that no longer says which. Into a new folder (fine-tuning its weights,
    e.g. a DeepLab trained at output_stride 16 fine-tuned at 8) the settings given take effect,
    named in a warning. ``net``: the resolved model config; a key that either side lacks (a
    checkpoint of an older lungseg) is not compared."""
    before = (checkpoint.get("hyper_parameters") or {}).get("net") or {}
    differ = [
        f"model.{key} {shown(net[key])} (the checkpoint: {shown(before[key])})"
        for key in net
        if key in before and net[key] != before[key]
    ]
    if not differ:
        return
    if not continuing:
        log.warning(
            "ckpt_path %s: its weights are fine-tuned with other model settings than it was "
            "trained with: %s",
            path,
            "; ".join(differ),
        )
        return
    raise LungsegError(
        f"{path} was trained with other model settings than this run gives: "
        f"{'; '.join(differ)}. Its weights fit, but continuing the run with these settings "
        f"would train another network than it began. Continue with the settings it was trained "
        f"with (see config.yaml in its run folder), or fine-tune its weights with the new ones "
        f"in a new run folder: ckpt_path={path} with hydra.run.dir unset (each run gets its "
        f"own folder)."
    )


def check_same_optimizer(path: str, checkpoint: dict[str, Any], optimizer: dict[str, Any]) -> None:
    """LungsegError when ``path`` was trained with another optimiser class than
    ``optimizer._target_``: a ckpt_path (also into a new folder) restores the optimiser's state
    (Adam's moments and step counts, SGD's momentum), which another class cannot take (torch
    stops at its first step with a KeyError). A checkpoint without the record is not checked."""
    before = ((checkpoint.get("hyper_parameters") or {}).get("optimizer") or {}).get("_target_")
    now = optimizer.get("_target_")
    if before is None or before == now:
        return
    raise LungsegError(
        f"{path} was trained with the optimiser {before}, but this run configures {now}: "
        f"continuing from a checkpoint restores its optimiser's state, which {now} cannot "
        f"take. Continue with the optimiser it was trained with ({before}, with its settings "
        f"under optimizer in config.yaml in its run folder), or start a new run without "
        f"ckpt_path (a checkpoint always brings its optimiser's state with it)."
    )


def continues_run(ckpt_path: str | None, out_dir: Path) -> bool:
    """Whether the checkpoint lies in ``out_dir``: this run continues the run of that folder."""
    return ckpt_path is not None and out_dir.resolve() in Path(ckpt_path).resolve().parents


_PATIENCE = 3  # Lightning's EarlyStoppingReason.PATIENCE_EXHAUSTED in a checkpoint


def _model_of(path: str) -> str:
    """The checkpoint that scores a run whose last.ckpt is ``path``: the best one beside it
    (callbacks.model_checkpoint, the model train.py tests), where the run validated; else
    ``path`` itself (without validation the final weights are the model)."""
    if Path(path).name != "last.ckpt":
        return path
    best = sorted(Path(path).parent.glob("best-epoch*.ckpt"))
    return str(best[-1]) if best else path


def check_continuable(cfg: DictConfig, path: str, checkpoint: dict[str, Any]) -> None:
    """LungsegError when the checkpoint's run has nothing left to train under ``cfg``: its
    epochs reach ``trainer.max_epochs``, its optimiser steps ``trainer.max_steps``, its
    training time ``trainer.max_time``, or early stopping ended it and the configured patience
    would end it again. (Lightning would then train nothing, or one epoch, and the run's
    metrics.json and best checkpoint would be written again; ``train`` lets a run stopped in
    its test, ``untested``, through to be tested.)"""
    done = int(checkpoint.get("epoch", -1)) + 1  # saved at the end of an epoch
    steps = int(checkpoint.get("global_step", 0))
    for key, count, unit, unlimited in (
        ("max_epochs", done, "epochs", ""),
        ("max_steps", steps, "optimiser steps", " (or -1: no limit)"),
    ):
        limit = cfg.trainer.get(key)
        if limit is not None and 0 <= limit <= count:
            raise LungsegError(
                f"{path} has trained {count} {unit} and trainer.{key} is {limit}: nothing is "
                f"left to train. Give trainer.{key} above {count}{unlimited} to train it "
                f"further, or score it with `python eval.py ckpt_path={_model_of(path)}`."
            )
    max_time = cfg.trainer.get("max_time")
    timer = (checkpoint.get("callbacks") or {}).get("Timer") or {}
    used = (timer.get("time_elapsed") or {}).get("train")  # what Lightning's Timer restores
    if max_time is not None and used is not None and used >= _seconds(max_time):
        raise LungsegError(
            f"{path} has trained for {timedelta(seconds=round(used))} (h:mm:ss), all of "
            f"trainer.max_time={max_time}: nothing is left to train. Give a longer "
            f"trainer.max_time (or trainer.max_time=null) to train it further, or score it "
            f"with `python eval.py ckpt_path={_model_of(path)}`."
        )
    check_time_plan(cfg, path, checkpoint, done)
    early = cfg.get("callbacks", {}).get("early_stopping")
    if early is None:
        return
    patience = early.get("patience", 3)
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if not key.startswith("EarlyStopping") or not isinstance(state, dict):
            continue
        waited = int(state.get("wait_count", 0))
        # Lightning 2.6 saves why it stopped (0: it did not); earlier versions only the epoch.
        reason = state.get("stopping_reason", _PATIENCE if state.get("stopped_epoch") else 0)
        if reason == 0 or (reason == _PATIENCE and waited < patience):
            continue  # not stopped, or more patience now: it trains on
        why = (
            f"{early.get('monitor')} had not improved for {waited} epochs "
            f"(callbacks.early_stopping.patience={patience}). Give "
            f"callbacks.early_stopping.patience above {waited} (or "
            f"callbacks.early_stopping=null) to train it further"
            if reason == _PATIENCE
            else f"{(state.get('stopping_reason_message') or 'a threshold').rstrip('.')}. Give "
            f"callbacks.early_stopping=null to train it further"
        )
        raise LungsegError(
            f"early stopping ended the run of {path} after epoch {state['stopped_epoch']}: "
            f"{why}, or score it with `python eval.py ckpt_path={_model_of(path)}`."
        )


def check_time_plan(cfg: DictConfig, path: str, checkpoint: dict[str, Any], done: int) -> None:
    """LungsegError when the run has trained the epochs its schedule was fitted to in
    trainer.max_time (callbacks.time_plan) and would be continued with the same time limit:
    the time is used up, whatever the epochs now."""
    for state in checkpoint.get("lr_schedulers") or []:
        plan = state.get("lungseg_time_plan") if isinstance(state, dict) else None
        planner = cfg.get("callbacks", {}).get("time_plan") or {}
        if not plan or done < plan["epochs"] or not planner.get("enabled", False):
            continue
        max_time = cfg.trainer.get("max_time")
        if max_time is None or _seconds(max_time) != plan["max_time"]:
            continue
        raise LungsegError(
            f"{path} has trained the {done} epochs that trainer.max_time={max_time} left time "
            f"for (its learning-rate schedule was fitted to them, see callbacks.time_plan): "
            "nothing is left to train. Give a longer trainer.max_time (or trainer.max_time=null) "
            f"to train it further, or score it with `python eval.py ckpt_path={_model_of(path)}`."
        )


def _seconds(max_time: Any) -> float:
    """trainer.max_time ("DD:HH:MM:SS" or a dict of timedelta's arguments) in seconds, parsed
    as the trainer's Timer parses it."""
    if isinstance(max_time, DictConfig):
        max_time = OmegaConf.to_container(max_time)
    return Timer(duration=max_time)._duration


def warn_trained_on(ckpt_path: str, split: Mapping[str, str]) -> None:
    """A warning when a run fine-tuned from ``ckpt_path`` (into a new folder) validates or
    tests on files that the checkpoint's run trained on (its split.csv beside checkpoints/):
    those scores would be optimistic. Nothing when that split.csv is not there."""
    saved = Path(ckpt_path).parent.parent / "split.csv"
    if not saved.is_file():
        return
    before = listed_splits(saved, list(split))
    seen = {
        name: sorted(s for s, now in split.items() if now == name and before.get(s) == "train")
        for name in ("val", "test")
    }
    found = [f"{len(stems)} of its {name} files" for name, stems in seen.items() if stems]
    if found:
        example = next(stems for stems in seen.values() if stems)[:3]
        new = sorted(s for s in split if s not in before)
        keep = f"Give data.split_file={saved} to keep that run's split"
        if new:  # files added since: a split file must list every file in the data
            keep = (
                f"To keep that run's split, give data.split_file a copy of {saved} with the "
                f"{len(new)} files it does not list added to the split of your choice (e.g. "
                f"{', '.join(new[:3])}; a split file must list every file in the data)"
            )
        log.warning(
            "This run fine-tunes %s, whose run trained on %s (e.g. %s; %s): their scores "
            "would be optimistic. %s.",
            ckpt_path,
            " and ".join(found),
            ", ".join(example),
            saved,
            keep,
        )


def check_same_split(saved: Path, split: Mapping[str, str]) -> None:
    """LungsegError unless ``split`` is the one the run saved in ``saved`` (its split.csv): a
    run continued in its folder must not train on what it has validated or tested on."""
    with saved.open(newline="", encoding="utf-8") as f:
        before = {row["file"]: row["split"] for row in csv.DictReader(f)}
    if before == dict(split):
        return
    moved = sorted(s for s in before.keys() & split.keys() if before[s] != split[s])
    added, missing = sorted(split.keys() - before.keys()), sorted(before.keys() - split.keys())
    found = [
        f"{len(names)} {what} (e.g. {', '.join(names[:3])})"
        for names, what in (
            (moved, "files in another split than before"),
            (added, "files it did not have"),
            (missing, "of its files missing"),
        )
        if names
    ]
    raise LungsegError(
        f"{saved} holds the split this run started with, but the data and split settings now "
        f"give another: {'; '.join(found)}. Continuing would train on images it has validated "
        f"or tested on. Continue with the data folders and split settings it started with "
        f"(seed, data.split, data.fold, data.group_pattern: see config.yaml there; "
        f"data.group_pattern=null for a run whose config.yaml has null, from before auto, "
        f"the default that splits by patient ids in the names), or keep "
        f"its split with data.split_file={saved} (which must list every file; for a k-fold "
        f"run also data.num_folds=null data.fold=null), or start a new run."
    )


_BEST = re.compile(r"best-epoch(\d+)(-v\d+)?\.ckpt")


def interrupted_bests(checkpoint: dict[str, Any], folder: Path) -> list[Path]:
    """The best checkpoints in ``folder`` (``best-epochNNN.ckpt``, callbacks.model_checkpoint's
    default names) that a run interrupted after ``checkpoint`` (its last.ckpt, in ``folder``)
    saved in the epoch it did not finish, the one after last.ckpt's: the best is saved when
    validation ends, last.ckpt when the epoch does. The continued run trains that epoch again,
    and its restored checkpoint callbacks do not know these files, so they would stay beside
    the new best for good (and a later epoch's file name sorts after it)."""
    known = {"last.ckpt"}
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key.startswith("ModelCheckpoint") and isinstance(state, dict):
            paths = [state.get(k) for k in ("best_model_path", "kth_best_model_path")]
            known |= {Path(p).name for p in [*paths, *(state.get("best_k_models") or {})] if p}
    unfinished = checkpoint.get("epoch", -2) + 1  # the one epoch after last.ckpt's
    return sorted(
        path
        for path in folder.glob("best-epoch*.ckpt")
        if (match := _BEST.fullmatch(path.name))
        and int(match.group(1)) == unfinished
        and path.name not in known
    )


def run_checkpoints(callbacks: list[Any], folder: Path) -> set[str]:
    """The state keys (their names in a checkpoint's ``callbacks``) of the ModelCheckpoint
    callbacks among ``callbacks`` that save into ``folder``, the run's checkpoints/: the
    records that are the run's own, which move with its folder (a callback of the user's
    that saves elsewhere, a mirror on another disk, keeps its own)."""
    target = os.path.realpath(folder)  # as ModelCheckpoint keeps its dirpath
    return {
        c.state_key
        for c in callbacks
        if isinstance(c, ModelCheckpoint) and c.dirpath and os.path.realpath(c.dirpath) == target
    }


def missing_bests(checkpoint: dict[str, Any], folder: Path, keys: set[str]) -> list[Path]:
    """The best checkpoints of last.ckpt's own epoch that ``checkpoint`` (a run's last.ckpt,
    in ``folder``) records but that are gone from ``folder``: an interrupted run removes the
    earlier best when the epoch it does not finish saves a better one (``interrupted_bests``),
    before last.ckpt is written again. The continued run's callbacks would still point at the
    removed file, and testing it at the end failed; ``train`` restores these from last.ckpt
    (the same epoch's weights). An older one cannot be, and is left to ``train``'s fallback.
    Only the records of ``keys`` (``run_checkpoints``), by their file names in ``folder``: a
    moved run folder's record names the old place (``follow_moved_folder``)."""
    missing = []
    for key, state in (checkpoint.get("callbacks") or {}).items():
        if key not in keys or not isinstance(state, dict):
            continue
        best = state.get("best_model_path")
        if not state.get("monitor") or not best:
            continue
        best = folder / Path(best).name
        match = _BEST.fullmatch(best.name)
        if (
            match is not None
            and not best.exists()
            and int(match.group(1)) == checkpoint.get("epoch")
        ):
            missing.append(best)
    return missing


def follow_moved_folder(checkpoint: dict[str, Any], folder: Path, keys: set[str]) -> Path | None:
    """Point the record of ``checkpoint``'s ModelCheckpoint callbacks of ``keys`` (the run's
    own, ``run_checkpoints``: their folder, best, top-k and last files) at ``folder``, the
    run's checkpoints/, where it names another folder: the run folder was moved or renamed
    (``checkpoint`` is one of the run's, read from its folder). The files keep their names; a
    best that an interrupted run removed stays missing, as in a folder that was not moved
    (``missing_bests``). Lightning drops a record made in another folder but for the best's
    path (which names the old place), and the continued run would lose track of its best.
    Returns the folder the record named before, or None where nothing was changed."""
    target = os.path.realpath(folder)  # as ModelCheckpoint keeps its dirpath
    moved = None
    for key, state in (checkpoint.get("callbacks") or {}).items():
        before = state.get("dirpath") if isinstance(state, dict) else None
        if key not in keys or not before or before == target:
            continue
        single = ("best_model_path", "kth_best_model_path", "last_model_path")
        named = [p for p in [*(state.get(k) for k in single), *state.get("best_k_models", {})] if p]
        if any(Path(p).parent != Path(before) for p in named):
            continue  # not a record of files in its folder
        here = {p: os.path.join(target, Path(p).name) for p in named}
        state.update({k: here[state[k]] for k in single if state.get(k)}, dirpath=target)
        state["best_k_models"] = {here[p]: v for p, v in state.get("best_k_models", {}).items()}
        moved = Path(before)
    return moved


_RECORD = re.compile(r"metrics(\.\d+)?\.json")


class RunCheckpointIO(TorchCheckpointIO):
    """Lightning's reading and removing of checkpoint files (a Trainer plugin), for the run
    in the folder ``run``, whose own checkpoint callbacks have the state keys ``keys``
    (``run_checkpoints``). A checkpoint of the run read from its folder whose record of those
    callbacks names another folder (the run folder was moved or renamed) has that record
    moved here (``follow_moved_folder``). A best checkpoint that the run's record names
    (metrics.json; an earlier continuation's metrics.<n>.json) is not removed when a
    callback's top-k would remove it (a continued run saved a better one): it is kept as
    ``earlier-<name>`` and the record names that file. Files are written as Lightning writes
    them."""

    def __init__(self, run: Path, keys: set[str]) -> None:
        super().__init__()
        self.run = Path(run)
        self.keys = keys
        self._followed: set[Path] = set()  # named in the log once

    def load_checkpoint(self, path: Any, *args: Any, **kwargs: Any) -> dict[str, Any]:
        checkpoint = super().load_checkpoint(path, *args, **kwargs)
        if not continues_run(str(path), self.run):  # another run's: its record stays its own
            return checkpoint
        before = follow_moved_folder(checkpoint, self.run / "checkpoints", self.keys)
        if before is not None and before not in self._followed:
            self._followed.add(before)
            if rank_zero_only.rank == 0:
                log.info(
                    "the run folder was moved or renamed: its checkpoint callbacks' record (the "
                    "best checkpoint, the top-k) named %s, and now names the same files in %s",
                    before,
                    self.run / "checkpoints",
                )
        return checkpoint

    def remove_checkpoint(self, path: Any) -> None:
        path = Path(path)
        records = self._records_naming(path)
        if not records or not path.is_file():
            super().remove_checkpoint(path)
            return
        target = path.with_name(f"earlier-{path.name}")
        kept = path.rename(aside_name(target) if target.exists() else target)
        for record, metrics in records.items():
            metrics["best_checkpoint"] = str(kept)
            try:  # replaced whole: a kill mid-write leaves the record as it was
                replace_whole(record, json.dumps(metrics, indent=2) + "\n")
            except OSError as error:  # the training goes on; the file is kept all the same
                log.warning("%s could not be made to name %s: %s", record, kept.name, error)
        log.info(
            "%s, the best checkpoint of the run's record %s, is kept as %s (which the record "
            "names now): this continuation saved a better one, and the top-k of "
            "callbacks.model_checkpoint would have removed it",
            path.name,
            ", ".join(r.name for r in records),
            kept.name,
        )

    def _records_naming(self, path: Path) -> dict[Path, dict[str, Any]]:
        """The run's records (metrics.json, metrics.<n>.json) whose best_checkpoint is
        ``path``, by its name in the run's checkpoints/ (a moved run's record names the old
        place), with their contents."""
        if path.parent.resolve() != (self.run / "checkpoints").resolve():
            return {}
        found = {}
        for record in sorted(self.run.glob("metrics*.json")):
            try:
                metrics = json.loads(record.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            best = metrics.get("best_checkpoint") if isinstance(metrics, dict) else None
            if _RECORD.fullmatch(record.name) and best and Path(best).name == path.name:
                found[record] = metrics
        return found


def untested(folder: Path, checkpoint: dict[str, Any]) -> bool:
    """Whether a run folder's checkpoint has trained epochs its metrics.json does not record:
    the run was stopped after its training, in the test that writes the record (Ctrl-C,
    SIGTERM). ``resume=true`` may then finish it, though nothing is left to train."""
    done = int(checkpoint.get("epoch", -1)) + 1
    try:
        recorded = json.loads((folder / "metrics.json").read_text(encoding="utf-8"))
        return int(recorded.get("epochs_trained") or 0) < done
    except (OSError, ValueError, AttributeError, TypeError):
        return True  # no readable record


def environment() -> dict[str, Any]:
    """Package versions, Python, platform, the command line and lungseg's git commit
    (``git_dirty``: tracked files changed since it). Outside a git checkout of lungseg (an
    installed package) the commit is "unknown" and ``git_dirty`` null."""
    commit, dirty = _git_state(Path(__file__).resolve().parents[1])
    return {
        **{name: module.__version__ for name, module in PACKAGES.items()},
        "python": platform.python_version(),
        "platform": platform.platform(),
        "command": shlex.join(sys.argv),
        "git_commit": commit,
        "git_dirty": dirty,
    }


def _git_state(root: Path) -> tuple[str, bool | None]:
    def git(*args: str) -> str:
        return subprocess.run(
            ["git", "-C", str(root), *args],
            capture_output=True,
            text=True,
            check=True,
            timeout=_GIT_TIMEOUT_S,
        ).stdout.strip()

    try:
        # A package installed into a virtual environment inside some other repository must not
        # report that repository's commit.
        if Path(git("rev-parse", "--show-toplevel")).resolve() != root:
            return "unknown", None
        return git("rev-parse", "HEAD"), bool(git("status", "--porcelain", "--untracked-files=no"))
    except (OSError, subprocess.SubprocessError):  # no git, not a checkout, or git hangs
        return "unknown", None


def write_environment(out_dir: Path) -> None:
    """``<out_dir>/environment.json``: ``environment()``, written by rank 0 only (that of an
    earlier start of the run kept beside it)."""
    if rank_zero_only.rank == 0:
        text = json.dumps(environment(), indent=2) + "\n"
        keep_previous(out_dir / "environment.json", text)


# What the images go through before the network (data_info): a run continued with other
# values would train on images its weights never saw, and its best checkpoint, made from the
# earlier ones, would be tested on the new (data.image_size, a 16-bit folder for 8-bit ...).
PREPARATION = (
    "image_size",
    "in_channels",
    "context_slices",
    "median_blur",
    "window",
    "intensity_offset",
    "normalize",
    "mask_mode",
    "ignore_index",  # masks read otherwise: the best checkpoint chosen across two labellings
    "bit_depths",
    "mean",
    "std",
)


def check_same_preparation(
    path: str, checkpoint: dict[str, Any], data_info: dict[str, Any], continuing: bool
) -> None:
    """LungsegError when the run of ``path`` is continued in its folder (``continuing``) with
    data prepared otherwise than it was trained on (``PREPARATION``: size, channels, window,
    normalisation, bit depth, the training images' statistics, i.e. other image files); into
    a new folder (fine-tuning on other data or at another size) a warning names them. A value
    that either side lacks (a checkpoint of an older lungseg) is not compared."""
    before = (checkpoint.get("hyper_parameters") or {}).get("data_info") or {}
    differ = [
        f"{key} {shown(data_info[key])} (the checkpoint: {shown(before[key])})"
        for key in PREPARATION
        if key in before
        and key in data_info
        and not same(before[key], data_info[key], rel_tol=1e-6)
    ]
    if not differ:
        return
    if not continuing:
        log.warning(
            "ckpt_path %s: its weights are fine-tuned on data prepared otherwise than it was "
            "trained on: %s",
            path,
            "; ".join(differ),
        )
        return
    raise LungsegError(
        f"{path} was trained on data prepared otherwise than this run's: {'; '.join(differ)} "
        f"(data_info; mean and std are the training images' statistics, so other image files "
        f"change them). Continuing would train on images its weights never saw, and test the "
        f"best checkpoint, made from the earlier ones, on the new. Continue with the data "
        f"settings it was trained with (config.yaml in its run folder), or fine-tune its "
        f"weights on this data in a new run folder: ckpt_path={path} with hydra.run.dir unset."
    )


def check_same_classes(path: str, checkpoint: dict[str, Any], data_info: dict[str, Any]) -> None:
    """LungsegError when the run continued from ``path`` was trained on other classes, or on
    the same in another order (data.mask_dir's folders reordered): each output channel would
    go on learning another class."""
    before = (checkpoint.get("hyper_parameters") or {}).get("data_info") or {}
    old, new = before.get("class_names"), list(data_info["class_names"])
    if old is not None and list(old) != new:
        raise LungsegError(
            f"{path} was trained on the classes {', '.join(old)} (in this order), but the data "
            f"settings now give {', '.join(new)}: continuing would teach its outputs other "
            f"classes. Continue with the settings it started with (data.mask_dir's folders in "
            f"their order, data.class_names, data.palette: see config.yaml in its run folder), "
            f"or start a new run."
        )
