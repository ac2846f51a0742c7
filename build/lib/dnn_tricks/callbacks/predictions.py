"""Writes ``trainer predict`` results as a CSV: which sample, predicted class name, class
probabilities (and the true class when a labelled split is predicted)."""

from __future__ import annotations

import csv
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BasePredictionWriter


class PredictionWriter(BasePredictionWriter):
    """One CSV row per predicted sample, then ``predicted`` (the class name) and
    ``prob_<class>`` for every class. A labelled split (``data.predict_split``) gives
    ``index`` (position in the split) and ``target``; new data (``data.predict_path``) gives
    ``path`` (a folder of images) or ``index`` (row of a CSV / array), with no target.

    Args:
        path: CSV file to write; null writes ``predictions.csv`` in the run's log folder.
            Under multi-process predict each rank writes ``<stem>.rank<r>.csv``.
    """

    def __init__(self, path: str | None = None) -> None:
        super().__init__(write_interval="epoch")
        self.path = path

    def _target(self, trainer: Trainer) -> Path:
        path = Path(self.path) if self.path else Path(trainer.log_dir or ".") / "predictions.csv"
        if trainer.world_size > 1:
            path = path.with_name(f"{path.stem}.rank{trainer.global_rank}{path.suffix}")
        return path

    def write_on_epoch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        predictions: Sequence[Any],
        batch_indices: Sequence[Any],
    ) -> None:
        batches = (
            predictions[0] if predictions and isinstance(predictions[0], list) else predictions
        )
        indices = (
            batch_indices[0]
            if batch_indices and isinstance(batch_indices[0], list)
            else batch_indices
        )
        probs = torch.cat([b["probs"] for b in batches]).float().cpu()
        targets = torch.cat([b["target"] for b in batches]).cpu().tolist()
        order = [i for batch in indices for i in batch] if indices else list(range(len(probs)))
        names = getattr(trainer.datamodule, "class_names", None) or [
            str(i) for i in range(probs.shape[1])
        ]
        # New data: the loader's dataset names each input, and the "target" of a sample is
        # its position in those names (so a file skipped as unreadable cannot shift them).
        loader = trainer.predict_dataloaders
        loader = loader[0] if isinstance(loader, (list, tuple)) else loader
        ids = getattr(getattr(loader, "dataset", None), "ids", None)
        if ids is not None:
            column = "path" if ids and isinstance(ids[0], str) else "index"
            header, keys = [column], [[ids[t]] for t in targets]
        else:
            header, keys = (
                ["index", "target"],
                [[i, t] for i, t in zip(order, targets, strict=True)],
            )
        path = self._target(trainer)
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow([*header, "predicted", *[f"prob_{n}" for n in names]])
            for key, row in zip(keys, probs, strict=True):
                predicted = names[int(row.argmax())]
                writer.writerow([*key, predicted, *[f"{p:.6g}" for p in row.tolist()]])
        print(f"wrote {len(probs)} predictions to {path}")
