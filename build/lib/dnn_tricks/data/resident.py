"""``data.device_resident``: a whole split held on the accelerator (images as uint8), served
in shuffled batches by indexing, with no DataLoader workers, no collate and no copy to the
device per batch; train batches may be augmented there in one go (``data.batch_augment``).

For small models the loader and the host-to-device copy are a large part of a step (airbench
keeps CIFAR-10 on the GPU for this reason). The order of the train split is the loader
path's (``EpochShuffleSampler``: a permutation from (seed, epoch)), so both paths see the same
batches; under DDP each rank takes every world_size-th sample of it, cut to equal length so
every rank steps equally often. ``state_dict`` / ``load_state_dict`` are Lightning's stateful
dataloader interface: a run resumed in mid-epoch continues with the next batch of the same
permutation, with the same augmentation draws.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch import Tensor

from dnn_tricks.data.batch_augment import BatchAugment, BatchAugmentConfig
from dnn_tricks.data.datasets import EpochShuffleSampler
from dnn_tricks.data.step_groups import StepGroup


def epoch_generator(seed: int, rank: int, epoch: int) -> torch.Generator:
    """A CPU generator for one (seed, rank, epoch): independent streams per rank and epoch."""
    state = np.random.SeedSequence([seed, rank, epoch]).generate_state(1, dtype=np.uint64)[0]
    return torch.Generator().manual_seed(int(state))


class ResidentBatches:
    """Batches of one split whose tensors already live on the device.

    Args:
        x: inputs N x C x H x W (uint8 images) or N x D (float rows), on the device.
        y: labels N, on the same device.
        batch_size: samples per batch (per rank under DDP).
        seed: the training seed; None serves the split in order (evaluation).
        drop_last: leave out a last, smaller batch (training).
        rank, world_size: this process's share under DDP.
        augment: per-image batched augmentation of the train split, or None.
        steps: batches served together as one (``data.steps_per_batch``); the last group
            may hold fewer. Augmentation draws stay per sample, so grouping changes nothing.
    """

    def __init__(
        self,
        x: Tensor,
        y: Tensor,
        batch_size: int,
        seed: int | None = None,
        drop_last: bool = False,
        rank: int = 0,
        world_size: int = 1,
        augment: BatchAugment | None = None,
        steps: int = 1,
    ) -> None:
        self.x, self.y, self.batch_size, self.drop_last = x, y, batch_size, drop_last
        self.steps = steps
        self.seed, self.rank, self.world_size, self.augment = seed, rank, world_size, augment
        # Lightning calls sampler.set_epoch before every epoch, also after a resume; it reads
        # batch_sampler wherever it finds a sampler (DataLoader's pair of attributes)
        self.sampler = EpochShuffleSampler(len(y), seed) if seed is not None else None
        self.batch_sampler = None
        self._epoch, self._served = -1, 0
        self._resume: dict[str, int] | None = None

    def _shard_size(self) -> int:
        n = len(self.y)
        if self.world_size == 1:
            return n
        if self.sampler is not None:  # equal shards: every rank takes as many steps
            return n // self.world_size
        return len(range(self.rank, n, self.world_size))  # evaluation: each sample once

    def _batches(self) -> int:
        n = self._shard_size()
        return n // self.batch_size if self.drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        return math.ceil(self._batches() / self.steps)

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor]]:
        return _Pass(self)

    def __deepcopy__(self, memo: dict) -> ResidentBatches:
        # Shared, not copied: the device tensors are read-only. A deep copy of the trainer
        # reaches this object (EMA's AveragedModel copies the LightningModule, whose
        # optimizer factory refers to the CLI), and must not double the device memory.
        return self

    def _begin(self) -> tuple[Tensor, dict[str, Tensor] | None, int]:
        """This epoch's order (this rank's share), augmentation draws and first batch."""
        if self.sampler is not None:
            epoch = self.sampler.epoch
            order = torch.tensor(list(iter(self.sampler)), dtype=torch.long)
        else:
            epoch, order = 0, torch.arange(len(self.y))
        order = order[self.rank :: self.world_size][: self._shard_size()]
        start = 0
        if self._resume is not None and self._resume["epoch"] == epoch:
            start = self._resume["batches"]
        self._resume = None
        if not start:
            # A DataLoader iterator draws one number from the global RNG (its workers' base
            # seed) as an epoch begins; drawing it too keeps dropout & co. on the loader
            # path's random stream, so both paths train to the same weights. (A resumed
            # epoch had drawn it before its checkpoint's RNG state was saved.)
            torch.empty((), dtype=torch.int64).random_()
        params = None
        if self.augment is not None:
            generator = epoch_generator(int(self.seed or 0), self.rank, epoch)
            drawn = self.augment.draw(len(order), generator)  # the epoch's, one copy
            params = {name: p.to(self.x.device) for name, p in drawn.items()}
        self._epoch, self._served = epoch, start
        return order.to(self.x.device), params, start

    def _batch(
        self, order: Tensor, params: dict[str, Tensor] | None, k: int
    ) -> tuple[Tensor, Tensor]:
        group = self.batch_size * self.steps
        window = slice(k * group, min((k + 1) * group, self._batches() * self.batch_size))
        index = order[window]
        x = self.x[index]
        if params is not None and self.augment is not None:
            x = self.augment(x, {name: p[window] for name, p in params.items()})
        self._served = k + 1  # counted when handed out: its step completes before a save
        return StepGroup(x, self.y[index]) if self.steps > 1 else (x, self.y[index])

    def state_dict(self) -> dict[str, int]:
        """Where the epoch stands: its number and how many batches were handed out."""
        return {"epoch": self._epoch, "batches": self._served}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue that epoch with its next batch (when Lightning resumes in mid-epoch)."""
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class _Pass(Iterator[tuple[Tensor, Tensor]]):
    """One pass over a ResidentBatches. An iterator object, not a generator: a generator
    cannot be deep-copied, and the trainer that holds it is (see __deepcopy__ above). The
    epoch's order is drawn at the first next(), after Lightning's set_epoch: Lightning
    creates the first iterator before that call, and others only to probe."""

    def __init__(self, batches: ResidentBatches) -> None:
        self.batches, self.order, self.params, self.k = batches, None, None, 0

    def __next__(self) -> tuple[Tensor, Tensor]:
        if self.order is None:
            self.order, self.params, self.k = self.batches._begin()
        if self.k >= len(self.batches):
            raise StopIteration
        self.k += 1
        return self.batches._batch(self.order, self.params, self.k - 1)

    def __deepcopy__(self, memo: dict) -> _Pass:
        return self


def check_resident_source(x: Any, source: str) -> None:
    """Device residence needs the split as an array in memory (or memory-mapped)."""
    if hasattr(x, "batch") or hasattr(x, "dataloader"):
        raise ValueError(
            f"data.device_resident: the {source!r} source reads its samples lazily (image files "
            "or chunks); hold them as arrays (the arrays source: .npz or .npy) or set "
            "data.device_resident: false"
        )


def to_device(x: Any, y: np.ndarray, device: torch.device) -> tuple[Tensor, Tensor]:
    """A split's arrays as device tensors: images uint8 N x C x H x W, rows as they are."""
    array = np.asarray(x)
    if array.ndim == 4:  # N x H x W x C -> N x C x H x W, contiguous, once
        array = np.ascontiguousarray(array.transpose(0, 3, 1, 2))
    inputs = torch.from_numpy(np.ascontiguousarray(array)).to(device)
    labels = torch.from_numpy(np.asarray(y, dtype=np.int64)).to(device)
    return inputs, labels


class ResidentStore:
    """The DataModule's splits on the device, copied there once per split and device."""

    def __init__(self) -> None:
        self.splits: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}
        self.train: ResidentBatches | None = None
        self.pending: dict[str, Any] | None = None

    def __deepcopy__(self, memo: dict) -> ResidentStore:
        return self  # read-only device data, shared (see ResidentBatches.__deepcopy__)

    # Lightning restores a stateful train loader itself, except when the model asked for
    # trainer.estimated_stepping_batches first (a per-step schedule does): the loader then
    # exists before the checkpoint is read and never gets its state (Lightning issue #20550).
    # The DataModule's own state_dict / load_state_dict carry it instead.
    def state_dict(self) -> dict[str, Any]:
        return {"train_batches": self.train.state_dict()} if self.train is not None else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pending = state.get("train_batches")
        if self.pending is not None and self.train is not None:
            self.train.load_state_dict(self.pending)

    def batches(
        self,
        name: str,
        split: tuple[Any, np.ndarray],
        batch_size: int,
        train: bool,
        seed: int,
        trainer: Any = None,
        augment: BatchAugmentConfig | None = None,
        steps: int = 1,
    ) -> ResidentBatches:
        """Batches of split ``name`` on the trainer's device (the CPU without a trainer):
        shuffled, augmented and cut to full batches for training, in order for evaluation."""
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        key = (name, str(device))
        if key not in self.splits:
            self.splits[key] = to_device(*split, device)
        x, y = self.splits[key]
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        batch_augment = BatchAugment(augment, tuple(x.shape[1:])) if augment and train else None
        batches = ResidentBatches(
            x,
            y,
            batch_size,
            seed=seed if train else None,
            drop_last=train,
            rank=rank,
            world_size=world,
            augment=batch_augment,
            steps=steps,
        )
        if train:
            if self.pending is not None:
                batches.load_state_dict(self.pending)
                self.pending = None
            self.train = batches
        return batches
