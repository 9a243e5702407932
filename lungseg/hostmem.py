"""Keep freed host memory in the process, so that training on the CPU stops page-faulting.

PyTorch's CPU allocator hands every tensor to the C library's malloc and frees it when the
tensor dies, so a training step allocates and frees the same activations again and again.
glibc gives large blocks back to the operating system on free (blocks above its mmap threshold
are unmapped; the heap's top is trimmed above the trim threshold), and the next step's
allocation page-faults in fresh, zeroed pages. On the article's U-Net (width 64, 256 px, batch 4,
2 cores) that was 1.5 million page faults and 5 s of kernel time in every 14 s step. With both
returns turned off (mallopt M_MMAP_MAX=0 and the largest M_TRIM_THRESHOLD), freed blocks are
reused: 57,000 faults and 0.7 s of kernel time a step, and the bare loop went from 0.29 to 0.36
images/s; inference from 0.98 to 1.30 (README, "Speed"). jemalloc and tcmalloc, which
Intel's PyTorch tuning guide suggests preloading, keep memory the same way; this needs no
preload. The cost: the process keeps its peak heap, a little more than the peak it had (2.95
against 2.36 GB at that size, steady after the fourth step; 0.64 against 0.59 GB at width 16,
128 px). mallopt cannot set a trim threshold above 2 GiB; a process started with glibc's own
malloc settings (GLIBC_TUNABLES=glibc.malloc.*, MALLOC_*_) keeps those instead.
"""

import ctypes
import ctypes.util
import logging
import os

log = logging.getLogger(__name__)

# glibc's <malloc.h>; mallopt takes an int, so INT_MAX is the largest trim threshold it can set.
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
INT_MAX = 2**31 - 1

_retained: bool | None = None  # None: not tried in this process


def configure(retain: bool) -> bool:
    """Apply the ``retain_freed_memory`` setting of a train/eval/predict config. Returns
    whether freed memory is kept. It cannot be undone in a running process: false after an
    earlier run kept it (a -m sweep runs its jobs in one process) only warns."""
    if retain:
        return retain_freed_memory()
    if _retained:
        log.warning(
            "retain_freed_memory=false: an earlier run in this process already keeps freed "
            "memory, and it stays kept until the process ends; run this one in a process of "
            "its own to leave the C library's default"
        )
    return bool(_retained)


def _tuned_by_user() -> bool:
    """Whether the process was started with glibc malloc settings of its own."""
    return "glibc.malloc." in os.environ.get("GLIBC_TUNABLES", "") or any(
        key.startswith("MALLOC_") and key.endswith("_") for key in os.environ
    )


def retain_freed_memory() -> bool:
    """Turn off glibc's returns of freed memory to the OS for this process (and the DataLoader
    workers it forks from now on). Returns whether it is in effect: False where the C library
    is not glibc (macOS, musl, Windows) or the environment already tunes glibc's malloc."""
    global _retained
    if _retained is not None:
        return _retained
    _retained = False
    if _tuned_by_user():
        log.info("glibc malloc settings from the environment are kept (retain_freed_memory)")
        return False
    try:
        mallopt = ctypes.CDLL(ctypes.util.find_library("c")).mallopt
    except (OSError, AttributeError, TypeError):  # no C library found, or one without mallopt
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    # musl's mallopt is a stub that returns 0.
    _retained = mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, INT_MAX) == 1
    return _retained
