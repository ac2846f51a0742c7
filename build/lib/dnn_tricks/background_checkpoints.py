"""Checkpoint files written on a background thread, so training does not wait for the disk."""

from __future__ import annotations

from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as wait_for
from typing import Any

from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import CheckpointIO
from lightning_utilities.core.apply_func import apply_to_collection
from torch import Tensor

from dnn_tricks.checkpoints import AtomicCheckpointIO


class BackgroundCheckpointIO(CheckpointIO):
    """Saves and removals run on one background thread, in the order they were asked for,
    each by ``inner`` (default: :class:`AtomicCheckpointIO`: temporary file, fsync, rename).
    Training waits only while the checkpoint's tensors are copied to host memory, so a file
    holds the state at its save, whatever the weights do meanwhile. Loads, and the end of each
    stage (Lightning's ``teardown``), wait for the queue; code that opens a file itself in the
    middle of a stage calls :meth:`wait` first. A failed write raises at the next save,
    removal or load, or at the stage's end.

    Why not Lightning's AsyncCheckpointIO: it removes files at once, ahead of queued writes (an
    old top-k file whose write was still queued would come back), loads without waiting, and
    keeps the copies on the accelerator (GPU memory for a second model and optimizer state).

    Memory: one host copy of the checkpoint's tensors per queued save. Enable it under
    ``trainer.plugins``::

        trainer:
          plugins: [{class_path: dnn_tricks.background_checkpoints.BackgroundCheckpointIO}]
    """

    def __init__(self, inner: CheckpointIO | None = None) -> None:
        self.inner = inner if inner is not None else AtomicCheckpointIO()
        self._writer: ThreadPoolExecutor | None = None
        self._queued: list[Future] = []

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None
    ) -> None:
        # containers are rebuilt and tensors copied now: later steps change neither
        snapshot = apply_to_collection(checkpoint, Tensor, _host_copy)
        self._submit(self.inner.save_checkpoint, snapshot, path, storage_options)

    def remove_checkpoint(self, path: _PATH) -> None:
        self._submit(self.inner.remove_checkpoint, path)

    def load_checkpoint(
        self, path: _PATH, map_location: Any = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        self.wait()
        return self.inner.load_checkpoint(
            path, map_location=map_location, weights_only=weights_only
        )

    def wait(self) -> None:
        """Block until every queued save and removal is done; raise the first failure."""
        wait_for(self._queued)
        self._raise_failures()

    def teardown(self) -> None:
        try:
            self.wait()
        finally:
            if self._writer is not None:
                self._writer.shutdown(wait=True)
                self._writer = None
            self.inner.teardown()

    def _submit(self, work: Callable[..., None], *args: Any) -> None:
        self._raise_failures()
        if self._writer is None:
            self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="checkpoints")
        self._queued.append(self._writer.submit(work, *args))

    def _raise_failures(self) -> None:
        """Forget finished work; re-raise the first error among it."""
        finished = [f for f in self._queued if f.done()]
        self._queued = [f for f in self._queued if not f.done()]
        for future in finished:
            future.result()


def _host_copy(tensor: Tensor) -> Tensor:
    return tensor.detach().to("cpu", copy=True)
