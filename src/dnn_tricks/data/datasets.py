"""In-memory datasets that hand the DataLoader whole batches.

Both implement ``__getitems__`` so the DataLoader fetches a batch with one fancy-index
instead of N ``__getitem__`` calls and a collate; with ``collate_batch`` as collate_fn this
keeps the loader far ahead of a small model on a 2-core CPU.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import Dataset, Sampler


def collate_batch(batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
    """``__getitems__`` already returns a stacked batch; nothing is left to collate."""
    return batch


class ArrayDataset(Dataset):
    """Samples of an in-memory source: uint8 images N x H x W x C or float32 rows N x D.

    Images leave as uint8 C x H x W (4x less to copy and pin than float32); the DataModule
    scales them to [0, 1] on the device. ``transform`` maps one uint8 H x W x C image to
    another (the train split's albumentations pipeline); it is never given tabular rows.
    """

    def __init__(
        self,
        x: np.ndarray,
        y: np.ndarray,
        transform: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        self.x, self.y = x, torch.from_numpy(np.asarray(y, dtype=np.int64))
        self.is_image = x.ndim == 4
        self.transform = transform if self.is_image else None

    def __len__(self) -> int:
        return len(self.x)

    def _inputs(self, index: np.ndarray) -> Tensor:
        rows = self.x[index]
        if not self.is_image:
            return torch.from_numpy(rows)
        if self.transform is not None:
            rows = np.stack([self.transform(image) for image in rows])
        return torch.from_numpy(np.ascontiguousarray(rows.transpose(0, 3, 1, 2)))

    def __getitem__(self, i: int) -> tuple[Tensor, Tensor]:
        x, y = self.__getitems__([i])
        return x[0], y[0]

    def __getitems__(self, indices: Sequence[int]) -> tuple[Tensor, Tensor]:
        index = np.asarray(indices, dtype=np.int64)
        return self._inputs(index), self.y[index]


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
