"""The processes that Lightning's ``ddp`` strategy starts for ranks 1..N-1, kept inside the
multirun job that started them (train.py's ``ddp_ranks_in_this_job``).

Lightning's launcher starts them with ``subprocess.Popen`` and hands the list of them to a
thread that watches them for the rest of the process: when one of them ends with a non-zero
status, the thread kills every process, the main one too. In a sweep the main process goes on
to the next job, so a rank of a finished job that ended badly (stopped in a collective when
rank 0 left it, or killed) would kill the whole sweep in the middle of a later job, and leave
that job's own ranks waiting for a rank 0 that is gone. A job therefore takes its ranks from
the watching thread when it ends, and ends only when they have.
"""

import logging
import subprocess
import time
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


def detach_ranks_of_this_job() -> list[Any]:
    """The processes the job's launchers started, taken from Lightning's watching thread (its
    list of them is the launcher's ``procs``: emptied, the thread ends at its next look)
    before anything else ends the job: a rank that ends badly from then on, or one killed by
    ``end_ranks``, is no reason to kill the sweep."""
    procs = []
    while _launchers:
        launcher = _launchers.pop()
        procs += launcher.procs
        launcher.procs.clear()
    return procs


def end_ranks(procs: list[Any], grace: float = GRACE_SECONDS) -> None:
    """Wait for ``procs`` (ranks 1..N-1, in order) to end, ``grace`` seconds in all, and kill
    the ones still running then; a rank that ended with an error status is logged."""
    deadline = time.monotonic() + grace
    for rank, proc in enumerate(procs, start=1):
        try:
            proc.wait(timeout=max(deadline - time.monotonic(), 0.01))
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


def end_ranks_of_this_job(grace: float = GRACE_SECONDS) -> None:
    """``detach_ranks_of_this_job``, then ``end_ranks``."""
    end_ranks(detach_ranks_of_this_job(), grace)
