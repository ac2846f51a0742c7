"""Real SIGKILLs inside checkpoint saves, at every point of AtomicCheckpointIO's write.

How the kills land inside saves: the test sets ``DNN_TRICKS_TEST_SAVE_PAUSE`` (read by
``dnn_tricks.checkpoints``) so that one chosen save of the ``trainer fit`` process stops at a
named point, writes a marker file and sleeps; the test sees the marker and sends SIGKILL, so
the kill is certain to land at that point. The fsync is not paused (a sleep is not the
system call): the save announces it is about to call os.fsync, and the test reads
``/proc/<pid>/syscall`` until the process is inside fsync, then kills it. The checkpoints
are wide (an MLP 64-2048-2048-10 with SGD momentum: 35 MB) so that the fsync takes
milliseconds, long enough to be caught.

Each run is ``trainer fit`` in a process of its own (tests/forked_trainer.py: forked from a
server that imported the application once, so eight runs cost no eight imports of torch);
SIGKILL ends that process as it would end the command.

The kills are chained: every run after the first resumes with ``--ckpt_path last`` from what
the previous kill left and is itself killed at the next point; a last run then finishes.
After every kill each ``*.ckpt`` on disk must load with ``weights_only=True`` and hold every
key with the right shape; the partial files the kills leave are ignored by the next run.
"""

from __future__ import annotations

import collections
import os
import platform
import signal
import time
from pathlib import Path

import pytest
import torch
import yaml
from forked_trainer import start

from conftest import CONFIGS

DIGITS = CONFIGS / "digits.yaml"
EPOCHS = 12  # the chain uses about 7; a missed fsync costs one more
STEPS_PER_EPOCH = 2
WIDE = "--model.net.init_args.hidden=[2048,2048]"
PAUSE = "DNN_TRICKS_TEST_SAVE_PAUSE"  # see dnn_tricks.checkpoints.PAUSE_ENV
FSYNC_SYSCALL = {"x86_64": 74, "aarch64": 82}  # Linux system call numbers of fsync
# (phase, file name prefix, n): the n-th save of that file in the run is killed at that phase.
# n=2 for last.ckpt: a complete last.ckpt from the epoch before is then in the same folder.
KILLS = [
    ("created", "last", 2),
    ("writing", "last", 2),
    ("written", "best", 1),
    ("fsync", "last", 2),
    ("synced", "last", 2),
    ("renamed", "last", 2),
    ("renamed", "best", 1),
]
# Keys Lightning writes into every training checkpoint (its CheckpointConnector.dump_checkpoint)
TOP_LEVEL = {
    "epoch",
    "global_step",
    "pytorch-lightning_version",
    "state_dict",
    "loops",
    "callbacks",
    "optimizer_states",
    "lr_schedulers",
}


def write_callbacks(path: Path) -> Path:
    """The shipped callbacks but the two ModelCheckpoints (best-*.ckpt and last.ckpt): no
    early stop can end a run before its kill."""
    callbacks = yaml.safe_load((CONFIGS / "callbacks" / "basic.yaml").read_text())
    kept = [c for c in callbacks if c["class_path"].endswith("ModelCheckpoint")]
    assert len(kept) == 2
    path.write_text(yaml.safe_dump(kept))
    return path


def fit_args(callbacks: Path, logs: Path, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(DIGITS),
        f"--trainer.callbacks={callbacks}",
        WIDE,
        f"--trainer.max_epochs={EPOCHS}",
        f"--trainer.limit_train_batches={STEPS_PER_EPOCH}",
        "--data.steps_per_batch=1",  # one optimizer step per train batch counted above
        "--trainer.limit_val_batches=1",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={logs}",
        "--test_after_fit=false",
        *extra,
    ]


def expected_model_state(tmp_path: Path) -> tuple[dict[str, torch.Size], list[tuple]]:
    """Names and shapes of the wide model's state and of its trainable parameters, from the
    model built in this process."""
    from dnn_tricks.app import TrainerCLI

    cli = TrainerCLI(
        args=["--config", str(DIGITS), WIDE, f"--trainer.logger.init_args.save_dir={tmp_path}"],
        run=False,
    )
    state = {key: value.shape for key, value in cli.model.state_dict().items()}
    return state, [tuple(p.shape) for p in cli.model.parameters() if p.requires_grad]


def assert_complete(path: Path, expected: tuple[dict[str, torch.Size], list[tuple]]) -> dict:
    """The checkpoint loads without unpickling code and holds everything a resume needs."""
    expected, trainable = expected
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert TOP_LEVEL <= set(checkpoint), (path, sorted(set(checkpoint)))
    state = checkpoint["state_dict"]
    assert set(state) == set(expected), path
    for key, shape in expected.items():
        if shape.numel() > 0:  # buffers that are empty until fitted have their size then
            assert state[key].shape == shape, (path, key)
    # SGD momentum: one buffer per trainable parameter, of its shape
    momentum = [
        tuple(s["momentum_buffer"].shape)
        for s in checkpoint["optimizer_states"][0]["state"].values()
    ]
    assert collections.Counter(momentum) == collections.Counter(trainable), path
    assert checkpoint["global_step"] == STEPS_PER_EPOCH * (checkpoint["epoch"] + 1), path
    return checkpoint


def wait_for(marker: Path, proc, after: float, timeout: float) -> list[str]:
    """The marker's fields (pid, save count, temporary file) once written after ``after``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if marker.exists() and marker.stat().st_mtime_ns > after:
            return marker.read_text().split()
        assert proc.exitcode is None, f"the run ended (status {proc.exitcode}) before the kill"
        time.sleep(0.002)
    pytest.fail(f"no save reached the kill point within {timeout} s")


def inside_fsync_of(pid: int, temporary: str, number: int) -> bool:
    """Is the process inside the fsync system call on the file ``temporary``?"""
    try:
        current = Path(f"/proc/{pid}/syscall").read_text().split()
        if not current or current[0] != str(number):
            return False
        return os.readlink(f"/proc/{pid}/fd/{int(current[1], 16)}") == temporary
    except OSError:  # between two reads the call ended, or the descriptor was closed
        return False


def kill_in_fsync(marker: Path, proc, timeout: float) -> list[str]:
    """Kill while the process is inside fsync on the announced temporary file; a save whose
    fsync was over before it could be caught announces again at the next save."""
    number = FSYNC_SYSCALL.get(platform.machine())
    assert number is not None, f"no fsync system call number known for {platform.machine()}"
    seen = 0
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        fields = wait_for(marker, proc, seen, deadline - time.monotonic())
        seen = marker.stat().st_mtime_ns
        until = time.monotonic() + 2.0
        while time.monotonic() < until:
            if inside_fsync_of(proc.pid, fields[2], number):
                os.kill(proc.pid, signal.SIGKILL)
                return fields
    pytest.fail(f"no fsync was caught within {timeout} s")


def test_sigkill_at_every_point_of_a_save_leaves_loadable_checkpoints_and_resumes(tmp_path):
    logs = tmp_path / "logs"
    runs = logs / "digits"
    callbacks = write_callbacks(tmp_path / "callbacks.yaml")
    expected = expected_model_state(tmp_path / "reference")
    env = {"DNN_TRICKS_CACHE": str(tmp_path / "cache")}
    hits = []
    for k, (phase, prefix, n) in enumerate(KILLS):
        marker = tmp_path / f"kill{k}.marker"
        resume = ["--ckpt_path=last"] if k else []
        if k:  # what `--ckpt_path last` will resume from: the newest complete last.ckpt
            newest = max(runs.glob("version_*/checkpoints/last.ckpt"), key=os.path.getmtime)
            resumed_epoch = torch.load(newest, weights_only=True)["epoch"]
        started = time.monotonic()
        log = tmp_path / f"run{k}.log"
        pause = f"{phase},{prefix},{n},{marker}"
        proc = start(fit_args(callbacks, logs, *resume), tmp_path, log, {**env, PAUSE: pause})
        try:
            if phase == "fsync":
                fields = kill_in_fsync(marker, proc, timeout=300)
            else:
                fields = wait_for(marker, proc, 0, timeout=300)
                os.kill(proc.pid, signal.SIGKILL)  # the save sleeps at the marker: it is there
            proc.join(timeout=60)
            assert proc.exitcode == -signal.SIGKILL, log.read_text()[-3000:]
        finally:
            if proc.exitcode is None:
                proc.kill()
                proc.join(timeout=60)
        pid, count, temporary = int(fields[0]), int(fields[1]), Path(fields[2])
        assert pid == proc.pid, "the marker was written by another process"
        hits.append((phase, prefix, count, round(time.monotonic() - started, 1)))
        folder = temporary.parent
        target = folder / temporary.name[1:].split(".ckpt.")[0]
        target = target.with_name(target.name + ".ckpt")
        if phase == "renamed":
            assert not temporary.exists() and target.exists()  # killed after the rename
            assert torch.load(target, weights_only=True)["global_step"] > 0
        else:
            # killed before the rename: the partial file is there, the target is the old one
            assert temporary.exists()
            size = temporary.stat().st_size
            if phase == "created":
                assert size == 0
            elif phase == "writing":
                assert 1 << 20 <= size < 30e6  # part of a 35 MB checkpoint
            else:
                assert size > 30e6
            if prefix == "last":  # the previous epoch's last.ckpt is still there, whole
                assert target.exists()
        epochs = {path: assert_complete(path, expected)["epoch"] for path in logs.rglob("*.ckpt")}
        assert epochs
        if k:  # this run resumed from the newest last.ckpt of the runs before it
            own = [epochs[p] for p in epochs if p.parent.parent.name == f"version_{k}"]
            if phase in ("written", "fsync", "synced"):  # the killed save's data is all there
                own.append(torch.load(temporary, weights_only=True)["epoch"])
            assert own, f"run {k} saved nothing before the kill"
            assert min(own) > resumed_epoch, (resumed_epoch, own)

    # the partial files the kills left are ignored: a last run resumes and finishes
    partials = sorted(logs.rglob("*.partial"))
    assert len(partials) == sum(phase != "renamed" for phase, _, _ in KILLS)
    log = tmp_path / "final.log"
    proc = start(fit_args(callbacks, logs, "--ckpt_path=last"), tmp_path, log, env)
    proc.join(timeout=300)
    if proc.exitcode is None:
        proc.kill()
    assert proc.exitcode == 0, log.read_text()[-3000:]
    final = runs / f"version_{len(KILLS)}" / "checkpoints" / "last.ckpt"
    assert assert_complete(final, expected)["epoch"] == EPOCHS - 1
    print("kills landed at:", hits)
