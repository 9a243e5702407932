"""The one exception type lungseg raises for problems the user can fix, and how entry points
report it."""

import logging
import shutil
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")
# Set once run_cli has printed a LungsegError: the exit status 1 that follows is lungseg's, not
# Hydra's refusal of the command line (lungseg.cli_hints).
REPORTED = False


class LungsegError(Exception):
    """Bad input or configuration. The message names the file or setting, what was
    expected and how to fix it; entry points print it as one paragraph, without a traceback."""


class RunFolderInUse(LungsegError):
    """Another training runs in the run folder (lungseg.run_folder.hold_run_folder): its log
    files are left as they are, as that training writes to them."""


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """``n`` and its noun, for messages: "1 file", "3 files" (``plural``: other than noun+s)."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"


def user_error(error: BaseException | None) -> LungsegError | None:
    """The LungsegError behind ``error``, if any: Hydra's ``instantiate`` wraps exceptions
    raised in constructors (``InstantiationException`` with the original as ``__cause__``)."""
    while error is not None:
        if isinstance(error, LungsegError):
            return error
        error = error.__cause__
    return None


def run_cli(task: Callable[[], T], run_dir: str | Path | None = None) -> T:
    """Run an entry point's task. A LungsegError ends the process with one line on stderr,
    ``lungseg: error: <message>``, and exit status 1; any other exception propagates with its
    traceback (that is a bug in lungseg, not in the user's input). ``run_dir``: the folder
    Hydra made for this run, removed on such an error when this command made it and it holds
    nothing but Hydra's ``.hydra/`` and empty log files (a refused command would leave an
    empty run folder); where it held a run before, its record (``.hydra/``, log files) is put
    back as it was (lungseg.hydra_files); where else it stays, its log (train.log, ...) ends
    with the error."""
    try:
        return task()
    except Exception as error:
        cause = user_error(error)
        if cause is None:
            raise
        if run_dir is not None:
            from lungseg import hydra_files  # Hydra's record of a folder this command found

            # a folder that held a run before this command is put back as it was
            cut_logs = not isinstance(cause, RunFolderInUse)
            if not hydra_files.restore(run_dir, cut_logs) and not discard_if_empty(Path(run_dir)):
                log_to_files(f"lungseg: error: {cause}")
        print(f"lungseg: error: {cause}", file=sys.stderr)
        global REPORTED
        REPORTED = True
        sys.exit(1)


def discard_if_empty(folder: Path) -> bool:
    """Remove ``folder`` if this command made it (``hydra_files.made``: never a folder that
    existed before, also an empty one of the user's) and it holds only Hydra's ``.hydra/``
    and empty ``*.log`` files; then the folders above it that the command made with it
    (``outputs/``, ``outputs/eval/``), those left empty. Whether ``folder`` was removed."""
    from lungseg import hydra_files

    new = hydra_files.made(folder)
    if not new or not folder.is_dir():
        return False
    if not all(
        (entry.name == ".hydra" and entry.is_dir() and not entry.is_symlink())
        or (entry.suffix == ".log" and entry.is_file() and entry.stat().st_size == 0)
        for entry in folder.iterdir()
    ):
        return False
    shutil.rmtree(folder, ignore_errors=True)
    for parent in new[1:]:
        try:
            parent.rmdir()  # only an empty one: another command may have begun to fill it
        except OSError:
            break
    return True


def lightning_logs_on_console() -> None:
    """Lightning's own log lines ("GPU available", the model summary, "Trainer.fit stopped")
    on stderr as they are, not in the run's train.log: what importing Lightning does when it
    comes before Hydra sets up logging (it gives its loggers a handler of their own where the
    root logger has none). The command lines import it later, when their command line has
    been read (seconds saved on one Hydra refuses), so they call this first."""
    if logging.getLogger().hasHandlers():
        return  # as Lightning: where logging is set up, its lines go where the rest go
    for name in ("pytorch_lightning", "lightning_fabric"):
        logger = logging.getLogger(name)
        logger.setLevel(logging.INFO)
        if not logger.handlers:
            logger.addHandler(logging.StreamHandler())
        logger.propagate = False


def log_to_files(message: str) -> None:
    """``message`` as an ERROR line in the log files only (Hydra's file handler: the run's
    train.log, eval.log, ...), not again on the console, where it is printed once."""
    root = logging.getLogger()
    record = root.makeRecord("lungseg", logging.ERROR, __file__, 0, message, None, None)
    for handler in root.handlers:
        if isinstance(handler, logging.FileHandler):
            handler.handle(record)
