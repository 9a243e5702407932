"""The processes that Lightning's ``ddp`` strategy starts for ranks 1..N-1, kept inside the
multirun job that started them (train.py's ``ddp_ranks_in_this_job``).

Lightning's launcher starts them with ``subprocess.Popen`` and hands the list of them to a
thread that watches them for the rest of the process: when one of them ends with a non-zero
status, the thread kills every process, the main one too. In a sweep the main process goes on
to the next job, so a rank of a finished job that ended badly (stopped in a collective when
rank 0 left it, or killed) would kill the whole sweep in the middle of a later job, and leave
that job's own ranks waiting for a rank 0 that is gone. A job therefore ends only when its
ranks have ended, and then takes them from the watching thread.
"""

import logging
import subprocess
from typing import Any

log = logging.getLogger(__name__)

# The launchers of the Trainers built in this process (lungseg.train.train adds each one).
_launchers: list[Any] = []
# How long a rank may take to end after its job did: its Python exits, nothing more.
GRACE_SECONDS = 60.0


def remember(launcher: Any) -> None:
    """Keep a Trainer's launcher if it starts processes of its own (``procs``)."""
    if isinstance(getattr(launcher, "procs", None), list):
        _launchers.append(launcher)


def end_ranks_of_this_job(grace: float = GRACE_SECONDS) -> None:
    """Wait for the processes the job's launchers started, kill the ones still running after
    ``grace`` seconds, and take them all from Lightning's watching thread (its list of them is
    the launcher's ``procs``: emptied, the thread ends at its next look)."""
    while _launchers:
        procs = _launchers.pop().procs
        for rank, proc in enumerate(procs, start=1):
            try:
                proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                log.warning(
                    "process %d of this job had not ended %g s after the job did: killed",
                    rank,
                    grace,
                )
                proc.kill()
                proc.wait()
                continue
            if proc.returncode:
                log.warning(
                    "process %d of this job ended with status %s (its log: "
                    "train_ddp_process_%d.log in the job's folder); the sweep goes on",
                    rank,
                    proc.returncode,
                    rank,
                )
        procs.clear()
