"""Small helpers the callbacks share: batches as the model sees them, sums over DDP
processes, and where to write scalars and images."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.loggers import TensorBoardLogger
from torch import Tensor
from torch.nn import Module, Sequential


def _is_group(batch: Any) -> bool:
    return isinstance(batch, list) and bool(batch) and isinstance(batch[0], (tuple, list))


def batches_of(batch: Any) -> list[Any]:
    """The batches of a group (``data.steps_per_batch``: a list of ``(x, y)`` pairs once
    transferred), or ``[batch]``."""
    return batch if _is_group(batch) else [batch]


def merged(batch: Any) -> Any:
    """A group of ``(x, y)`` batches as one ``(x, y)`` batch; any other batch as it is."""
    if _is_group(batch):
        inputs, targets = zip(*batch, strict=True)
        return torch.cat(inputs), torch.cat(targets)
    return batch


def batch_inputs(batch: Any) -> Tensor:
    """The model input of a batch: ``x`` of an ``(x, y)`` pair (all of a group's), or the
    batch itself."""
    batch = merged(batch)
    return batch[0] if isinstance(batch, (tuple, list)) else batch


def sum_over_processes(trainer: Trainer, tensor: Tensor) -> Tensor:
    """Sum over DDP processes (identity on one process)."""
    if trainer.world_size <= 1:
        return tensor
    return trainer.strategy.reduce(tensor, reduce_op="sum")


def log_scalars(trainer: Trainer, metrics: dict[str, float]) -> None:
    """Write scalars to every logger at the current step (loggers write on rank 0 only)."""
    for logger in trainer.loggers:
        logger.log_metrics(metrics, step=trainer.global_step)


def tensorboard(trainer: Trainer) -> Any:
    """The SummaryWriter of the first TensorBoardLogger on global rank 0, else None."""
    if not trainer.is_global_zero:
        return None
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            return logger.experiment
    return None


def to_model(pl_module: LightningModule, batch: Any) -> Any:
    """A loader batch moved to the model's device and through ``on_after_batch_transfer``
    (uint8 -> float), exactly as the training loop hands it to the model (a train group:
    its list of batches, see ``batches_of``)."""
    # Lightning's own handler: it picks the DataModule's hooks over the module's where
    # they are overridden, which no public method does.
    return pl_module._apply_batch_transfer_handler(batch)


def eager_network(pl_module: LightningModule) -> Module:
    """The module to run for statistics, raw inputs in: the project's Classifier keeps its
    plain network as ``net`` (maybe wrapped by ``torch.compile`` for training) behind its
    ``input_norm``; running those avoids a recompilation per changed momentum or added hook.
    Other modules run as they are."""
    net = getattr(pl_module, "net", None)
    if not isinstance(net, Module):
        return pl_module
    norm = getattr(pl_module, "input_norm", None)
    return Sequential(norm, net) if isinstance(norm, Module) else net


def first_loader(loaders: Any) -> Any:
    """The first DataLoader of what ``trainer.train_dataloader`` / ``val_dataloaders`` hold."""
    if isinstance(loaders, (list, tuple)):
        return loaders[0] if loaders else None
    if isinstance(loaders, dict):
        return next(iter(loaders.values()), None)
    return loaders


def cycle(loader: Any) -> Iterator[Any]:
    """Batches of ``loader`` over and over (stops at once when it is empty)."""
    while True:
        empty = True
        for batch in loader:
            empty = False
            yield batch
        if empty:
            return
