import platform
import resource

import pytest
import torch

from lungseg.hostmem import retain_freed_memory


def faults_to_fill(num_bytes: int) -> int:
    """Minor page faults taken by allocating and writing a fresh tensor of num_bytes."""
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    torch.empty(num_bytes, dtype=torch.uint8).fill_(1)  # freed at once
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="glibc's mallopt")
def test_freed_memory_is_reused_without_page_faults():
    assert retain_freed_memory()
    assert retain_freed_memory()  # a second call keeps it
    size = 64 * 2**20  # far above glibc's largest mmap threshold (32 MiB)
    # The heap grows over the first few rounds (torch's 64-byte aligned allocations leave
    # gaps), then the freed blocks are reused. Given back to the OS, every round would fault
    # its 16,384 4-KiB pages in again.
    faults = [faults_to_fill(size) for _ in range(16)]
    assert sum(faults[-4:]) < 500, faults
