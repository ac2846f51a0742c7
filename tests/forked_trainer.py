"""``trainer <args>`` in processes of their own, forked from a multiprocessing forkserver that
imported the application once: each run is a real process (SIGKILL ends it as it would end
the command) but costs no fresh import of torch and Lightning (~6 s of CPU each).

Used by the tests that kill runs or run several at once (test_kill_during_save.py,
test_reliability.py)."""

from __future__ import annotations

import multiprocessing
import os
from multiprocessing.context import ForkServerContext
from pathlib import Path

_context: ForkServerContext | None = None


def _launcher() -> ForkServerContext:
    global _context
    if _context is None:
        _context = multiprocessing.get_context("forkserver")
        # takes effect when the server starts, at the first start() of this session
        _context.set_forkserver_preload(["dnn_tricks.cli", "dnn_tricks.app"])
    return _context


def _trainer_main(args: list[str], workdir: str, env: dict[str, str], log: str) -> None:
    """Body of a run's process: ``trainer <args>`` run from ``workdir``, output to ``log``."""
    import torch

    os.chdir(workdir)
    os.environ.update(env)
    output = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    os.dup2(output, 1)
    os.dup2(output, 2)
    torch.set_num_threads(1)
    from dnn_tricks.cli import main

    main(args)


def start(
    args: list[str], workdir: Path, log: Path, env: dict[str, str] | None = None
) -> multiprocessing.Process:
    """Start ``trainer <args>`` (the console script's ``dnn_tricks.cli.main``); its stdout
    and stderr go to ``log``. Join it with a timeout: a hang must fail the test."""
    env = {"NO_ALBUMENTATIONS_UPDATE": "1", **(env or {})}
    process = _launcher().Process(
        target=_trainer_main, args=(list(map(str, args)), str(workdir), env, str(log))
    )
    process.start()
    return process


def run(args: list[str], workdir: Path, log: Path, timeout: float, **kwargs) -> None:
    """Run ``trainer <args>`` to the end; fail with its log's tail if it does not exit 0."""
    process = start(args, workdir, log, **kwargs)
    process.join(timeout)
    if process.exitcode is None:
        process.kill()
        process.join(30)
        raise AssertionError(f"trainer {' '.join(map(str, args[:3]))} ran past {timeout} s")
    assert process.exitcode == 0, log.read_text()[-3000:]
