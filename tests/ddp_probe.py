"""A callback for tests/test_ddp.py: each rank writes what it saw to ``<out_dir>/rank<R>.json``.

DDP runs in processes the test cannot look into; these files let it compare the ranks with
each other and with a single-process reference. Passed on the command line with
``--trainer.callbacks+=ddp_probe.RankProbe --trainer.callbacks.out_dir=DIR``. PlantFault
puts a fault on one rank."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer


def _floats(tensor: torch.Tensor) -> list[float]:
    return tensor.detach().double().flatten().cpu().tolist()


def _total(tensors: Any) -> float:
    return float(sum(t.detach().double().sum() for t in tensors))


class RankProbe(Callback):
    """Record each rank's normalizer, step counts, samples seen, synced metrics and weights.

    Args:
        out_dir: folder for the per-rank JSON files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)
        self.record: dict[str, Any] = {"val_acc": [], "val_samples": 0, "test_samples": 0}

    def _write(self, trainer: Trainer) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        path = self.out_dir / f"rank{trainer.global_rank}.json"
        path.write_text(json.dumps(self.record))

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        normalizer = pl_module.input_norm  # fitted in the model's on_fit_start, before this
        self.record.update(
            rank=trainer.global_rank,
            world_size=trainer.world_size,
            mean=_floats(normalizer.mean),
            scale=_floats(normalizer.scale),
        )

    def on_validation_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        if not trainer.sanity_checking:
            self.record["val_samples"] += len(batch[1])

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            self.record["val_acc"].append(float(trainer.callback_metrics["val/acc"]))

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record.update(
            train_batches=int(trainer.num_training_batches),
            global_step=int(trainer.global_step),
            weights=_total(pl_module.parameters()),
            buffers=_total(b for b in pl_module.buffers() if b.is_floating_point()),
        )
        self._write(trainer)

    def on_test_batch_end(self, trainer, pl_module, outputs, batch, batch_idx, *args):
        self.record["test_samples"] += len(batch[1])

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.record["test_acc"] = float(trainer.callback_metrics["test/acc"])
        self._write(trainer)


class PlantFault(Callback):
    """On one rank only, at one optimizer step: a NaN in the batch (so that rank's loss is
    non-finite) or an exception, to check that a fault on one rank stops every rank. Each
    rank writes its process id to ``<out_dir>/pid<R>`` at fit start, so the test can check
    that no process is left running.

    Args:
        out_dir: folder for the process-id files.
        rank: the global rank that faults.
        step: the global step at which it faults.
        kind: ``nan`` (a NaN input) or ``raise`` (a ValueError in the training loop).
    """

    def __init__(self, out_dir: str, rank: int, step: int, kind: str = "nan") -> None:
        self.out_dir, self.rank, self.step, self.kind = Path(out_dir), rank, step, kind

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"pid{trainer.global_rank}").write_text(str(os.getpid()))

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_rank != self.rank or trainer.global_step != self.step:
            return
        if self.kind == "raise":
            raise ValueError(f"a fault planted on rank {self.rank} at step {self.step}")
        batch[0][0] = float("nan")  # in place: the batch the training step receives
