"""Checkpoints written on a background thread: the state at the save, in the order asked."""

from __future__ import annotations

import threading

import pytest
import torch
from lightning.pytorch.plugins.io import AsyncCheckpointIO

from dnn_tricks.background_checkpoints import BackgroundCheckpointIO
from dnn_tricks.checkpoints import AtomicCheckpointIO, read_checkpoint


class _GatedIO(AtomicCheckpointIO):
    """AtomicCheckpointIO whose writes start only once ``gate`` is set: holds the queue so
    a test can act while a save is still pending."""

    def __init__(self) -> None:
        super().__init__()
        self.gate = threading.Event()

    def save_checkpoint(self, checkpoint, path, storage_options=None) -> None:
        assert self.gate.wait(30), "the test never opened the gate"
        super().save_checkpoint(checkpoint, path, storage_options)


def test_a_file_holds_the_state_at_its_save_not_at_its_write(tmp_path):
    inner = _GatedIO()
    io = BackgroundCheckpointIO(inner)
    weights = torch.zeros(1000)
    io.save_checkpoint({"state_dict": {"w": weights}, "history": [1]}, tmp_path / "a.ckpt")
    weights.add_(1.0)  # the next optimizer steps, before the write has begun
    inner.gate.set()
    io.teardown()
    saved = read_checkpoint(tmp_path / "a.ckpt")
    assert torch.equal(saved["state_dict"]["w"], torch.zeros(1000)) and saved["history"] == [1]


def test_a_removal_waits_behind_the_queued_write_of_its_file(tmp_path):
    """ModelCheckpoint replaces a top-k file by saving the new one and removing the old: the
    old file's write may still be queued. Here it stays removed; Lightning's AsyncCheckpointIO
    removes at once and the queued write brings the file back."""
    for plugin, survives in ((BackgroundCheckpointIO, False), (AsyncCheckpointIO, True)):
        inner = _GatedIO()
        io = plugin(inner)
        old = tmp_path / f"{plugin.__name__}-epoch1.ckpt"
        io.save_checkpoint({"epoch": 1}, old)
        io.remove_checkpoint(old)
        inner.gate.set()
        io.teardown()
        assert old.exists() is survives, plugin.__name__


def test_a_load_waits_for_the_queued_write(tmp_path):
    inner = _GatedIO()
    io = BackgroundCheckpointIO(inner)
    io.save_checkpoint({"epoch": torch.tensor(7)}, tmp_path / "last.ckpt")
    assert not (tmp_path / "last.ckpt").exists()
    threading.Timer(0.2, inner.gate.set).start()
    assert io.load_checkpoint(tmp_path / "last.ckpt")["epoch"].item() == 7
    io.teardown()


def test_a_failed_write_raises_at_the_next_call_and_at_teardown(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a folder")
    io = BackgroundCheckpointIO()
    io.save_checkpoint({"epoch": 1}, blocker / "last.ckpt")  # its folder cannot be made
    with pytest.raises(OSError):
        io.wait()
    io.save_checkpoint({"epoch": 2}, blocker / "last.ckpt")
    with pytest.raises(OSError):
        io.teardown()
    io.save_checkpoint({"epoch": 3}, tmp_path / "fine.ckpt")  # usable again after teardown
    io.teardown()
    assert read_checkpoint(tmp_path / "fine.ckpt")["epoch"] == 3
    assert not list(tmp_path.glob("*.partial"))
