"""Writing files without losing what was there: whole or not at all (``replace_whole``), and
earlier versions kept beside under a free name (``aside_name``, ``set_aside``,
``keep_previous``). Plain Python only: the command lines' early paths (Hydra's callbacks, the
sweep summary, the sweeper) import it without importing torch or Lightning."""

import os
import tempfile
from pathlib import Path

_UMASK = os.umask(0o022)  # read (umask sets and returns it), then set back
os.umask(_UMASK)


def replace_whole(path: Path, text: str) -> None:
    """Write ``path`` whole or not at all, through a temporary file beside it: a reader, a kill
    mid-write or another process writing it at the same time (a SLURM launcher's jobs, a sweep
    summary) never leaves half a file."""
    handle, partial = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as out:
            out.write(text)
        # mkstemp's file is its owner's alone: the mode a new file gets (or the file's own)
        os.chmod(partial, path.stat().st_mode & 0o777 if path.exists() else 0o666 & ~_UMASK)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def aside_name(path: Path) -> Path:
    """The first free ``<stem>.<n><suffix>`` (n = 1, 2, ...) beside ``path``."""
    n = 1
    while (kept := path.with_name(f"{path.stem}.{n}{path.suffix}")).exists():
        n += 1
    return kept


def set_aside(path: Path) -> Path:
    """Rename ``path`` (a file or a folder) to ``aside_name(path)`` and return the new path."""
    return path.rename(aside_name(path))


def keep_previous(path: Path, text: str) -> None:
    """Write ``text`` to ``path``; an earlier, different file there is kept as
    ``<stem>.<n><suffix>`` (n = 1, 2, ...): a continued run loses nothing of what it had."""
    if path.is_file() and path.read_text(encoding="utf-8") != text:
        set_aside(path)
    path.write_text(text, encoding="utf-8")
