"""Datasets that hand the DataLoader whole batches, from arrays or lazy row stores.

``ArrayDataset`` implements ``__getitems__`` so the DataLoader fetches a batch with one
fancy-index instead of N ``__getitem__`` calls and a collate; with ``collate_batch`` as
collate_fn this keeps the loader far ahead of a small model on a 2-core CPU. The same
dataset serves lazy stores (memory-mapped rows, image files): they are indexed like arrays
and read only the rows of each batch, in the worker that asked for them.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import BatchSampler, Dataset, Sampler


def collate_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``__getitems__`` already returns a stacked batch; nothing is left to collate."""
    return batch


def take_rows(x: Any, index: np.ndarray) -> Any:
    """Rows ``index`` of a split's inputs: a copy for an in-memory array, a view for a lazy
    store (so splitting a memory-mapped or file-backed source never reads its data)."""
    if isinstance(x, np.ndarray) and not isinstance(x, np.memmap):
        return x[index]
    return x.take(index)


class ArrayDataset(Dataset):
    """Samples of a source: uint8 images N x H x W x C or float32 rows N x D, as an array
    or a lazy store (memory-mapped rows, image files).

    Images leave as uint8 C x H x W (4x less to copy and pin than float32); the DataModule
    scales them to [0, 1] on the device. ``transform`` maps one uint8 H x W x C image to
    another (the train split's albumentations pipeline); it is never given tabular rows.
    """

    def __init__(
        self,
        x: Any,
        y: np.ndarray,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.x, self.y = x, torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.is_image = x.ndim == 4
        self.transform = transform if self.is_image else None
        if self.transform is not None and hasattr(x, "prepare"):
            x.prepare(self.transform)  # image files: does the pipeline set the size itself?

    def __len__(self) -> int:
        return len(self.x)

    def _inputs(self, index: np.ndarray) -> tuple[Tensor, np.ndarray]:
        """The batch's inputs, and the positions in ``index`` they came from (a lazy store
        with ``data.bad_files: skip`` may leave out a file that failed to decode)."""
        if hasattr(self.x, "batch"):
            rows, kept = self.x.batch(index, self.transform)
        else:
            rows, kept = self.x[index], np.arange(len(index))
            if self.is_image and self.transform is not None:
                rows = np.stack([self.transform(image) for image in rows])
        if not self.is_image:
            return torch.from_numpy(np.ascontiguousarray(rows)), kept
        return torch.from_numpy(np.ascontiguousarray(rows.transpose(0, 3, 1, 2))), kept

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        inputs, kept = self._inputs(index)
        return inputs, self.y[index[kept]]


class EpochShuffleSampler(Sampler[int]):
    """A random permutation that depends only on (seed, epoch).

    torch's RandomSampler draws from the global RNG, so a run resumed from a checkpoint would
    see other batches than the uninterrupted run. Here epoch ``e`` always gets the same order:
    Lightning calls ``set_epoch`` before each epoch (also after a resume). Without a call the
    epoch counter advances by itself, e.g. when DDP wraps this sampler.
    """

    def __init__(self, length: int, seed: int) -> None:
        self.length, self.seed, self.epoch = length, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.length

    def __iter__(self) -> Iterator[int]:
        generator = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        self.epoch += 1
        return iter(torch.randperm(self.length, generator=generator).tolist())


class StepGroupSampler(Sampler[list[int]]):
    """``steps`` consecutive full batches of ``sampler`` served as one loader batch
    (``data.steps_per_batch``); the last group may hold fewer. Split back into batches of
    ``batch_size`` on the device, the steps see exactly the batches of the ungrouped loader.
    ``sampler`` stays reachable as ``.sampler``, where Lightning calls ``set_epoch``."""

    def __init__(self, sampler: Sampler[int], batch_size: int, steps: int) -> None:
        self.sampler, self.steps = sampler, steps
        self.batches = BatchSampler(sampler, batch_size, drop_last=True)

    def __len__(self) -> int:
        return math.ceil(len(self.batches) / self.steps)

    def __iter__(self) -> Iterator[list[int]]:
        group: list[int] = []
        for count, batch in enumerate(self.batches, 1):
            group += batch
            if count % self.steps == 0:
                yield group
                group = []
        if group:
            yield group
