"""Several worker processes on one machine, each running the same study loop against the
shared storage, each with one torch thread: N workers use N cores instead of fighting over
them. The runs of a study are many small fits, which scale better across processes than
across the threads of one (on a busy 2-core machine a 2-thread step of a small model was
10-30x slower than a 1-thread step)."""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


def _one_thread() -> None:
    import torch

    torch.set_num_threads(1)


def run_workers(work: Callable[[T], Any], config: T, workers: int) -> None:
    """``work(config)`` in this process (``workers == 1``) or in ``workers`` fresh processes
    at once, one torch thread each; waits for all, then raises the first worker's error, if
    any, here.

    Fresh ("spawn") processes, since forking a process that holds torch's thread pool and
    open database connections is unsafe."""
    if workers == 1:
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            work(config)
        finally:
            torch.set_num_threads(threads)
        return
    previous = os.environ.get("OMP_NUM_THREADS")
    os.environ["OMP_NUM_THREADS"] = "1"  # read by the children's torch at import
    try:
        context = multiprocessing.get_context("spawn")
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_one_thread) as pool:
            futures = [pool.submit(work, config) for _ in range(workers)]
            errors = [f.exception() for f in futures]
    finally:
        if previous is None:
            os.environ.pop("OMP_NUM_THREADS", None)
        else:
            os.environ["OMP_NUM_THREADS"] = previous
    for error in errors:
        if error is not None:
            raise error
