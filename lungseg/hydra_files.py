"""Hydra's own record of a run folder, ``<run>/.hydra/`` (``config.yaml``, ``hydra.yaml``,
``overrides.yaml``), kept from being replaced by a later command in the same folder.

Hydra writes those files before the task runs. A command pointed at an existing run folder
(``hydra.run.dir=<run> resume=true``; a command refused there; a sweep run again into its
folder) would replace the run's own. ``KeepHydraFiles`` (a Hydra callback, ``hydra.callbacks``
in conf/config.yaml, conf/eval.yaml and conf/predict.yaml) reads them before Hydra writes:
``settle`` (train.py, once the run goes on in that folder) keeps each replaced one beside as
``<name>.<n>.yaml``, as train.py keeps an earlier ``config.yaml`` as ``config.<n>.yaml``;
``keep_record`` (eval.py, predict.py) keeps a training run's record in place and theirs
beside; ``restore`` (a command that stops before: a refusal, a sweep's finished job) puts
them back, and cuts the folder's log files back to their length before the command, so
the folder is as it was. ``withdraw`` (a command refused in a folder of the user's that must
not hold a run: a data folder) also removes what Hydra added there, ``.hydra/`` and the log.
``made`` tells a refused command which folders it made itself (the run folder, and the
``outputs/eval/`` above it), the only ones it may remove (lungseg.errors.discard_if_empty).
The processes Lightning's ddp strategy starts for ranks above 0 run train.py again in rank 0's
folder with ``hydra.output_subdir=null``: they neither write nor touch its record.
"""

import logging
import os
import shutil
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from lungseg.files import aside_name

log = logging.getLogger(__name__)

# run folder (resolved) -> {file name: bytes} of its .hydra/, where it held files, before
# this command. In this process: Hydra's local launchers (a SLURM launcher runs each job in
# another process, where nothing is remembered and Hydra's files replace the earlier ones).
_SAVED: dict[Path, dict[str, bytes]] = {}
# run folder (resolved) -> (whether its .hydra/ existed, {log file name: length}) before
# this command
_FOUND: dict[Path, tuple[bool, dict[str, int]]] = {}
# run folder (resolved) -> the folders that did not exist before this command, the run
# folder first, then those above it that Hydra makes with it
_MADE: dict[Path, list[Path]] = {}


def _subdir(config: DictConfig) -> str | None:
    return OmegaConf.select(config, "hydra.output_subdir")


def _running_subdir() -> str | None:
    """Hydra's output_subdir in a command Hydra runs; ".hydra" otherwise (nothing is saved
    then, unless a test remembered a folder itself)."""
    return HydraConfig.get().output_subdir if HydraConfig.initialized() else ".hydra"


def remember(folder: Path, subdir: str | None = ".hydra") -> None:
    """Read ``folder/subdir``'s files, if there are any, and the lengths of ``folder``'s log
    files before Hydra writes its own; and which of ``folder`` and the folders above it do
    not exist yet (``made``)."""
    resolved = folder.resolve()
    _MADE[resolved] = [p for p in (resolved, *resolved.parents) if not p.exists()]
    if subdir is None:
        return
    files = folder / subdir
    logs = {p.name: p.stat().st_size for p in folder.glob("*.log") if p.is_file()}
    _FOUND[folder.resolve()] = (files.is_dir(), logs)
    if files.is_dir() and not files.is_symlink():
        saved = {p.name: p.read_bytes() for p in files.iterdir() if p.is_file()}
        if saved:
            _SAVED[folder.resolve()] = saved


def remembered(folder: Path | str, name: str) -> bytes | None:
    """The bytes ``folder``'s ``.hydra/<name>`` held before this command (Hydra has replaced
    the file since); None where nothing was remembered (see ``_SAVED``)."""
    record = _SAVED.get(Path(folder).resolve())
    return None if record is None else record.get(name)


def made(folder: Path | str) -> list[Path]:
    """The folders that this command made for ``folder`` (``remember``), ``folder`` first if
    it is one, then those above it, which it alone may remove again (a folder that existed
    before is the user's, also an empty one); none where nothing was remembered."""
    return _MADE.pop(Path(folder).resolve(), [])


def settle(folder: Path) -> list[Path]:
    """The command goes on in ``folder``: each of its earlier ``.hydra/`` files that Hydra
    replaced is written beside as ``<stem>.<n><suffix>`` (n = 1, 2, ...). Returns them."""
    _MADE.pop(Path(folder).resolve(), None)
    record = _SAVED.pop(Path(folder).resolve(), None)
    _FOUND.pop(Path(folder).resolve(), None)
    subdir = _running_subdir()
    if record is None or subdir is None:
        return []
    kept = []
    for name, data in record.items():
        path = Path(folder) / subdir / name
        if path.is_file() and path.read_bytes() == data:
            continue
        aside = aside_name(path)
        aside.write_bytes(data)
        kept.append(aside)
    return kept


def keep_record(folder: Path | str) -> list[Path]:
    """eval.py or predict.py went on in ``folder``. Where it held another command's record (a
    training run's, when pointed at its run folder), that record stays ``.hydra/`` (later
    commands read the run's relative data paths and its sweep from it) and this command's
    own files are written beside as ``<stem>.<n><suffix>``; where it held the same
    command's (an earlier eval into the folder), the newer record replaces it and the earlier
    is kept beside, as ``settle``. Returns the files written beside."""
    folder = Path(folder)
    _MADE.pop(folder.resolve(), None)
    record = _SAVED.get(folder.resolve())
    subdir = _running_subdir()
    if record is None or subdir is None:
        return []
    try:
        theirs = OmegaConf.create(record["hydra.yaml"].decode()).hydra.job.name
    except Exception:  # no Hydra record of a job: nothing to tell apart
        theirs = None
    if theirs is None or theirs == HydraConfig.get().job.name:
        return settle(folder)
    _SAVED.pop(folder.resolve())
    kept = []
    files = folder / subdir
    for path in sorted(files.iterdir()):
        if path.is_file() and path.name not in record:  # written by Hydra for this command
            kept.append(path.rename(aside_name(path)))
    for name, data in record.items():
        path = files / name
        if path.is_file() and path.read_bytes() != data:
            aside = aside_name(path)
            aside.write_bytes(path.read_bytes())
            kept.append(aside)
            path.write_bytes(data)
    return kept


def restore(folder: Path | str, cut_logs: bool = True) -> bool:
    """The command stopped before doing anything in ``folder``: its earlier ``.hydra/`` files
    are put back, files Hydra added there removed, and its log files cut back to their
    length before the command (not with ``cut_logs`` false: a training that runs in the
    folder writes to them meanwhile). Whether ``folder`` held such a record."""
    record = _SAVED.pop(Path(folder).resolve(), None)
    _, logs = _FOUND.pop(Path(folder).resolve(), (True, {}))
    subdir = _running_subdir()
    if record is None or subdir is None:
        return False
    _put_back(Path(folder), subdir, record, logs if cut_logs else {})
    return True


def withdraw(folder: Path | str) -> None:
    """The command is refused in a folder of the user's that must not hold a run (a data
    folder): what Hydra wrote there for it is removed, so the folder is as it was. Its
    ``.hydra/`` goes where it was not there before (an earlier record is put back, as by
    ``restore``); a log file that was not there is removed, one that was is cut back to its
    length; nothing is logged into them after (the error goes to the console only)."""
    folder = Path(folder)
    found = _FOUND.pop(folder.resolve(), None)
    record = _SAVED.pop(folder.resolve(), {})
    subdir = _running_subdir()
    if found is None or subdir is None:
        return
    had_subdir, logs = found
    # a linked .hydra/ is the user's: remember saved nothing from it, and it is left as it is
    linked = (folder / subdir).is_symlink()
    for logger in [logging.getLogger(), *logging.Logger.manager.loggerDict.values()]:
        for handler in list(getattr(logger, "handlers", [])):  # placeholders have none
            if isinstance(handler, logging.FileHandler) and (
                Path(handler.baseFilename).resolve().parent == folder.resolve()
            ):
                logger.removeHandler(handler)
                handler.close()
    _put_back(folder, None if linked else subdir, record, logs)
    try:
        if not had_subdir and not linked and (folder / subdir).is_dir():
            shutil.rmtree(folder / subdir)
        for path in folder.glob("*.log"):
            if path.is_file() and path.name not in logs:
                path.unlink()
    except OSError as error:
        log.warning("could not leave %s as it was: %s", folder, error)


def _put_back(
    folder: Path, subdir: str | None, saved: dict[str, bytes], logs: dict[str, int]
) -> None:
    """``folder/subdir`` back to ``saved`` (files Hydra added removed; subdir None: left as it
    is), and ``folder``'s log files in ``logs`` cut back to their lengths there."""
    files = folder / (subdir or ".hydra")
    try:
        if subdir is not None:
            for path in files.iterdir() if files.is_dir() else []:
                if path.is_file() and path.name not in saved:
                    path.unlink()
            for name, data in saved.items():
                (files / name).write_bytes(data)
        for name, length in logs.items():
            path = folder / name
            if path.is_file() and path.stat().st_size > length:
                os.truncate(path, length)  # Hydra's handler appends: later lines go after
    except OSError as error:  # the error that stopped the command matters more
        log.warning("could not put back %s as it was: %s", files, error)


class KeepHydraFiles(Callback):
    """Hydra callback: remembers an existing run folder's ``.hydra/`` files before Hydra
    writes its own (a single run: at the run's start; a sweep: every job folder already in the
    sweep folder), and puts them back after a sweep job that did not ``settle`` them."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        run_dir = OmegaConf.select(config, "hydra.run.dir")
        if run_dir:
            remember(Path(run_dir), _subdir(config))

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        sweep_dir = OmegaConf.select(config, "hydra.sweep.dir")
        if sweep_dir and Path(sweep_dir).is_dir():
            for job in Path(sweep_dir).iterdir():
                if job.is_dir():
                    remember(job, _subdir(config))

    def on_job_end(self, config: DictConfig, job_return: Any, **kwargs: Any) -> None:
        restore(config.hydra.runtime.output_dir)
