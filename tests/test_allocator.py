"""HeapAllocator: once the trainer has set it up, a large tensor freed and allocated again
costs no page faults (the kernel's own fault counter, getrusage, is the reference); before
it, every allocation of the block faults its pages in again."""

from __future__ import annotations

import subprocess
import sys

import pytest

PROBE = """
import resource, sys, torch
from dnn_tricks.callbacks.allocator import HeapAllocator

def faults_per_allocation(n=10):
    for _ in range(3):  # warm-up: the heap grows to fit the block
        torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB, above glibc's largest mmap threshold
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(n):
        torch.empty(16 * 2**20).fill_(1.0)
    return (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / n

plain = faults_per_allocation()
callback = HeapAllocator()
callback.setup(None, None, "fit")  # what the trainer calls before the first batch
switched = callback.active
print(plain, switched, faults_per_allocation())
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's malloc only")
def test_freed_blocks_stay_in_the_heap_so_reuse_costs_no_faults():
    done = subprocess.run(
        [sys.executable, "-c", PROBE], capture_output=True, text=True, timeout=120, check=True
    )
    plain, switched, after = done.stdout.split()
    pages = 64 * 2**20 / 4096
    assert switched == "True"
    assert float(plain) >= 0.9 * pages  # each fresh mmap is faulted in page by page
    assert float(after) < 0.01 * pages  # the heap's pages are reused as they are
