"""Keep freed memory in the process heap, so CPU training stops paying page faults per step.

glibc's malloc serves every block above its mmap threshold (at most 32 MiB) with a fresh
``mmap`` and gives it back with ``munmap`` when freed. A convolution's backward pass on a CPU
allocates such blocks every step (an im2col buffer of batch x C*k*k x H*W floats: 115 MiB for
a 32-channel 3x3 conv on 128 Fashion-MNIST images), so each step faults in and zeroes those
pages again: measured here, ~10,000 minor faults per conv backward and up to 60% of a
speedrun's CPU time in the kernel. With ``M_MMAP_MAX = 0`` every block comes from the heap,
and with a high ``M_TRIM_THRESHOLD`` the heap keeps what is freed, so the next step reuses
it: what jemalloc or tcmalloc (``LD_PRELOAD``, as PyTorch's CPU performance guide suggests)
would buy, without another library or an environment variable set before Python starts.
"""

from __future__ import annotations

import ctypes
import sys

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

# mallopt(3) parameter numbers, from glibc's <malloc.h>
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4
KEEP_UP_TO = 2**31 - 1  # bytes of free heap top kept before trimming (mallopt takes an int)


def keep_freed_memory() -> bool:
    """Make glibc's malloc serve large blocks from the heap and keep them when freed.

    Affects allocations from now on, in this process and the processes it forks (loader
    workers). Returns False, changing nothing, where malloc is not glibc's (macOS, Windows,
    musl)."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return False
    mallopt = getattr(libc, "mallopt", None)
    if mallopt is None:
        return False
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt(M_MMAP_MAX, 0) == 1 and mallopt(M_TRIM_THRESHOLD, KEEP_UP_TO) == 1


class HeapAllocator(Callback):
    """A switch for :func:`keep_freed_memory`, applied when the trainer is set up (before the
    first batch). The process then keeps its peak memory instead of returning it to the
    system: fine for a training job, the reason it is not on by default. It matters for
    convolutions on a CPU; on a GPU the tensors live in PyTorch's caching allocator anyway.

    Example, under ``trainer.callbacks`` in a config::

        - class_path: dnn_tricks.callbacks.allocator.HeapAllocator
    """

    def __init__(self) -> None:
        self.active = False

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.active:
            return
        self.active = keep_freed_memory()
        if self.active:
            rank_zero_info("HeapAllocator: large blocks come from the heap and stay there")
        else:
            rank_zero_warn("HeapAllocator: malloc is not glibc's here; nothing changed")
