"""TensorBoard images that show what the tricks do: the input normalization's eigenvalue
spectrum, augmented training samples, the validation confusion matrix, weight histograms.

Each is a small callback that writes on global rank 0 only, to the first TensorBoardLogger
(nothing happens without one). Figures are drawn with matplotlib's object API on an Agg
canvas, so no display and no pyplot global state are involved.
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from torch import Tensor
from torchmetrics.classification import MulticlassConfusionMatrix

from dnn_tricks.callbacks.trainer_utils import tensorboard


def _figure(width: float, height: float) -> Figure:
    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _check_every(key: str, value: int) -> None:
    if value < 1:
        raise ValueError(f"{key}={value} must be >= 1")


def spectrum_figure(before: Tensor, after: Tensor, kind: str) -> Figure:
    """Descending covariance eigenvalues of the train inputs before and after normalization,
    on a log scale: the condition number is the height of each curve (LeCun et al. 1998)."""
    figure = _figure(6, 4)
    axes = figure.add_subplot()
    for values, label in ((before, "before"), (after, f"after '{kind}'")):
        v = values.double().cpu().numpy()
        positive = v[v > 1e-12 * v.max()] if v.size and v.max() > 0 else v[:0]
        if positive.size:
            kappa = positive.max() / positive.min()
            axes.semilogy(
                np.arange(1, positive.size + 1), positive, label=f"{label} (κ={kappa:.3g})"
            )
    axes.set_xlabel("component (descending)")
    axes.set_ylabel("eigenvalue of the input covariance")
    axes.set_title("train-input covariance spectrum")
    axes.legend()
    return figure


class NormalizationSpectrum(Callback):
    """At train start, logs ``data/eigenvalue_spectrum``: the eigenvalues of the train-input
    covariance before and after the model's input normalization (``model.input_norm``'s
    ``eigenvalues_before`` / ``eigenvalues_after``), with their condition numbers.

    Example, under ``trainer.callbacks``::

        - class_path: dnn_tricks.callbacks.figures.NormalizationSpectrum

    Args: none. The spectrum is skipped (with a note) when the normalizer computed none
    (``none``/``center``/``standardize`` on inputs wider than its ``report_max_dim``).
    """

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer, norm = tensorboard(trainer), getattr(pl_module, "input_norm", None)
        if writer is None or norm is None or not norm.fitted:
            return
        if norm.eigenvalues_before.numel() == 0:
            rank_zero_info("NormalizationSpectrum: the normalizer computed no spectrum; skipped")
            return
        figure = spectrum_figure(norm.eigenvalues_before, norm.eigenvalues_after, norm.kind)
        writer.add_figure("data/eigenvalue_spectrum", figure, trainer.global_step)


class AugmentationGrid(Callback):
    """At fit start, logs ``data/augmented_samples``: ``num_images`` training images, each
    row the original and then ``draws`` augmented versions from the DataModule's pipeline
    (``data.augment``; a copy draws, so the training stream is untouched).

    Example, under ``trainer.callbacks``::

        - class_path: dnn_tricks.callbacks.figures.AugmentationGrid
          init_args:
            num_images: 8
            draws: 7

    Args:
        num_images: training images shown (the first of the train split, one per row).
        draws: augmented versions per image.
        min_height: enlarge the grid (nearest neighbour) to at least this many pixels high,
            so 8x8 digits stay visible.
    """

    def __init__(self, num_images: int = 8, draws: int = 7, min_height: int = 256) -> None:
        _check_every("AugmentationGrid num_images", num_images)
        _check_every("AugmentationGrid draws", draws)
        self.num_images, self.draws, self.min_height = num_images, draws, min_height

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer, dm = tensorboard(trainer), trainer.datamodule
        augment = getattr(dm, "augment", None)
        if writer is None or not hasattr(dm, "split"):
            return
        images = dm.split("train")[0][: self.num_images]
        if augment is None or images.ndim != 4:
            rank_zero_info("AugmentationGrid: no augmentation of images configured; skipped")
            return
        from dnn_tricks.data.augment import preview_grid

        grid = preview_grid(images, augment, self.draws)
        scale = max(1, math.ceil(self.min_height / grid.shape[0]))
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
        writer.add_image("data/augmented_samples", grid, trainer.global_step, dataformats="HWC")


def confusion_figure(
    metric: MulticlassConfusionMatrix, counts: Tensor, names: list[str], normalize: bool
) -> Figure:
    """torchmetrics' own confusion-matrix plot, drawn on an Agg figure: rows are the true
    class, columns the predicted one; with ``normalize`` each row is shares summing to 1."""
    shown = counts / counts.sum(1, keepdim=True).clamp_min(1) if normalize else counts
    k = len(names)
    figure = _figure(2 + 0.6 * k, 1.5 + 0.6 * k)
    axes = figure.add_subplot()
    metric.plot(val=shown, ax=axes, add_text=k <= 20, labels=names, cmap="Blues")
    return figure


class ConfusionMatrix(Callback):
    """At the end of every ``every_n_epochs``-th validation epoch, logs
    ``val/confusion_matrix``, drawn by torchmetrics' ``MulticlassConfusionMatrix.plot``.
    Predictions come from a forward hook on the module during validation, so no extra forward
    pass; the counts are summed over DDP processes by torchmetrics. Sanity-check runs are
    skipped.

    Example, under ``trainer.callbacks``::

        - class_path: dnn_tricks.callbacks.figures.ConfusionMatrix
          init_args:
            every_n_epochs: 1
            normalize: true

    Args:
        every_n_epochs: draw after every N-th validation epoch.
        normalize: show each true class's row as shares (recall per class on the diagonal)
            instead of counts.
    """

    def __init__(self, every_n_epochs: int = 1, normalize: bool = True) -> None:
        _check_every("ConfusionMatrix every_n_epochs", every_n_epochs)
        self.every_n_epochs, self.normalize = every_n_epochs, normalize
        self.metric: MulticlassConfusionMatrix | None = None
        self.last: list[list[int]] = []
        self._handle: Any = None
        self._logits: Tensor | None = None

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        classes = getattr(pl_module, "num_classes", None)
        if not isinstance(classes, int) or classes < 2:
            raise ValueError("ConfusionMatrix needs a classifier with a num_classes attribute")
        self.metric = MulticlassConfusionMatrix(classes)

    def _active(self, trainer: Trainer) -> bool:
        return (
            not trainer.sanity_checking and (trainer.current_epoch + 1) % self.every_n_epochs == 0
        )

    def on_validation_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self._active(trainer) or self.metric is None:
            return
        self.metric = self.metric.to(pl_module.device)
        self.metric.reset()
        self._handle = pl_module.register_forward_hook(self._capture)

    def _capture(self, module: Any, args: Any, output: Any) -> None:
        # Under DDP, Lightning reaches validation_step through a call of the module whose
        # output is the step's (None); only a tensor output is the logits.
        if isinstance(output, Tensor):
            self._logits = output.detach()

    def on_validation_batch_end(
        self,
        trainer: Trainer,
        pl_module: LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if self._handle is not None and self._logits is not None:
            self.metric.update(self._logits.argmax(1), batch[1])
        self._logits = None

    def on_validation_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if self._handle is None:
            return
        self._handle.remove()
        self._handle = None
        counts = self.metric.compute().cpu()  # every process: torchmetrics syncs
        self.last = counts.long().tolist()
        writer = tensorboard(trainer)
        if writer is None:
            return
        names = list(getattr(trainer.datamodule, "class_names", None) or range(len(counts)))
        figure = confusion_figure(self.metric, counts, [str(n) for n in names], self.normalize)
        writer.add_figure("val/confusion_matrix", figure, trainer.global_step)

    def on_exception(
        self, trainer: Trainer, pl_module: LightningModule, error: BaseException
    ) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def state_dict(self) -> dict[str, Any]:
        return {"last": self.last}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last = state_dict.get("last", [])


class WeightHistograms(Callback):
    """Logs a histogram ``weights/<parameter>`` of every parameter (and, optionally, of
    its gradient as ``grads/<parameter>``) at the end of every ``every_n_epochs``-th
    training epoch, on rank 0.

    Example, under ``trainer.callbacks``::

        - class_path: dnn_tricks.callbacks.figures.WeightHistograms
          init_args:
            every_n_epochs: 1
            gradients: false

    Args:
        every_n_epochs: log after every N-th training epoch.
        gradients: also log the gradients of the epoch's last step.
    """

    def __init__(self, every_n_epochs: int = 1, gradients: bool = False) -> None:
        _check_every("WeightHistograms every_n_epochs", every_n_epochs)
        self.every_n_epochs, self.gradients = every_n_epochs, gradients

    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard(trainer)
        if writer is None or (trainer.current_epoch + 1) % self.every_n_epochs:
            return
        for name, param in pl_module.named_parameters():
            writer.add_histogram(
                f"weights/{name}", param.detach().float().cpu(), trainer.global_step
            )
            if self.gradients and param.grad is not None:
                grad = param.grad.detach().float().cpu()
                writer.add_histogram(f"grads/{name}", grad, trainer.global_step)
