"""The batch-size finder: Lightning's ``BatchSizeFinder`` run where this project's models are
ready for it, once per fit, on the training batch only."""

from __future__ import annotations

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import BatchSizeFinder


class TrainBatchSizeFinder(BatchSizeFinder):
    """Largest training batch that fits in memory: Lightning's ``BatchSizeFinder`` (``power``
    doubles ``data.batch_size`` from ``init_val`` until a step runs out of memory and keeps the
    last size that fit; ``binsearch`` then bisects), searched at the start of the first
    training epoch of a fit, as Lightning's docs show for fine-tuning.

    Why not at fit start, where Lightning's runs: the model fits its data-fitted layers (input
    normalization, whitening stem) in its own ``on_fit_start``, after the callbacks'. And not
    for validate / test / predict: ``data.batch_size`` is the training batch only (evaluation
    uses ``data.eval_batch_size``). A resumed fit searches again. The found size is printed
    and set on the DataModule for this run; the saved config.yaml keeps the configured one.

    Example, under ``trainer.callbacks``::

        - class_path: dnn_tricks.callbacks.batch_size.TrainBatchSizeFinder
          init_args: {mode: power, init_val: 32, max_trials: 8}

    Args:
        mode: ``power`` or ``binsearch``.
        steps_per_trial: optimizer steps tried at each size.
        init_val: first batch size tried.
        max_trials: most size increases tried.
        batch_arg_name: the DataModule attribute holding the batch size.
        margin: ``binsearch`` only: shrink the found size by this fraction, for headroom.
        max_val: never try a larger batch (on CPU nothing runs out of memory early).
    """

    def __init__(
        self,
        mode: str = "power",
        steps_per_trial: int = 3,
        init_val: int = 32,
        max_trials: int = 25,
        batch_arg_name: str = "batch_size",
        margin: float = 0.05,
        max_val: int = 8192,
    ) -> None:
        super().__init__(
            mode, steps_per_trial, init_val, max_trials, batch_arg_name, margin, max_val
        )
        self.searched = False

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.searched = False

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not self.searched:
            self.searched = True
            self.scale_batch_size(trainer, pl_module)

    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return

    def on_test_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return

    def on_predict_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        return
