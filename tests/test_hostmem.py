import ctypes
import ctypes.util
import logging
import platform
import resource

import pytest
import torch

from lungseg import hostmem

pytestmark = pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
SIZE = 64 * 2**20  # far above glibc's largest mmap threshold (32 MiB)


def faults(fill) -> int:
    """Minor page faults taken by fill()."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    fill()
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


def torch_fill() -> None:
    torch.empty(SIZE, dtype=torch.uint8).fill_(1)  # freed at once


def malloc_fill() -> None:
    libc = ctypes.CDLL(ctypes.util.find_library("c"))
    libc.malloc.restype = ctypes.c_void_p
    libc.free.argtypes = [ctypes.c_void_p]
    block = libc.malloc(SIZE)
    ctypes.memset(block, 1, SIZE)
    libc.free(block)


# malloc first: its block then sits at the heap's top, where a trim would take it back
@pytest.mark.parametrize("fill", [malloc_fill, torch_fill])
def test_freed_memory_is_reused_without_page_faults(fill):
    assert hostmem.configure(True)
    assert hostmem.retain_freed_memory()  # a second call keeps it
    # The heap grows over the first rounds (torch's 64-byte aligned blocks leave gaps), then
    # freed blocks are reused. Unmapped (torch's blocks) or trimmed off the heap's top (a plain
    # malloc's), every round would fault its 16,384 4-KiB pages in again.
    counts = [faults(fill) for _ in range(16)]
    assert sum(counts[-4:]) < 500, counts


def test_false_after_true_warns_that_it_holds(caplog):
    assert hostmem.configure(True)
    with caplog.at_level(logging.WARNING, logger="lungseg.hostmem"):
        assert hostmem.configure(False)
    assert "stays kept until the process ends" in caplog.text
