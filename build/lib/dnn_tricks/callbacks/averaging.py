"""Exponential moving average of the weights (Polyak & Juditsky 1992) through Lightning's
``WeightAveraging``: validation, the final model and the checkpoints use the average
theta_ema <- decay theta_ema + (1 - decay) theta, updated after every optimizer step.

Stochastic weight averaging needs nothing of ours: name Lightning's callback,
``lightning.pytorch.callbacks.StochasticWeightAveraging`` (Izmailov et al. 2018).
"""

from __future__ import annotations

from collections.abc import Callable

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.callbacks import WeightAveraging
from torch import Tensor
from torch.optim.swa_utils import get_ema_multi_avg_fn


def ema_keeping_integers(decay: float) -> Callable[[list[Tensor], list[Tensor], Tensor], None]:
    """torch's EMA update for floating tensors; integer buffers (BatchNorm's step counter, the
    input normalizer's kind code and shape) are copied, since averaging and truncating them
    back to integers turns 3 into 2."""
    ema = get_ema_multi_avg_fn(decay)

    def update(averaged: list[Tensor], current: list[Tensor], num_averaged: Tensor) -> None:
        # AveragedModel groups the tensors by dtype: one kind per call
        if averaged[0].is_floating_point() or averaged[0].is_complex():
            ema(averaged, current, num_averaged)
        else:
            for average, value in zip(averaged, current, strict=True):
                average.copy_(value)

    return update


class EMA(WeightAveraging):
    """Lightning's ``WeightAveraging`` as an exponential moving average, like its
    ``EMAWeightAveraging`` with two changes for this project's models:

    - integer buffers are copied, not averaged (``ema_keeping_integers``; Lightning's EMA
      averages them with torch's per-tensor EMA and cannot take another);
    - on a fresh fit the average starts from the model once its data-fitted layers (input
      normalization, patch whitening) are fitted, in the module's ``on_fit_start``; Lightning
      copies the model in the callbacks' ``setup``, before that. A resumed fit keeps that copy,
      which the checkpoint fills in.

    - the average is updated from the optimizer's own step hook (torch's
      ``register_step_post_hook``), not from ``on_train_batch_end``: once per optimizer step
      also where a Lightning step takes several (``data.steps_per_batch``), and not for a step
      the gradient scaler skipped.

    Validation, the final model and the checkpoints' ``state_dict`` hold the average; the
    checkpoints also keep the current weights, so a resumed fit continues both.

    Example, under ``trainer.callbacks``::

        - class_path: dnn_tricks.callbacks.averaging.EMA
          init_args: {decay: 0.999}

    Args:
        decay: weight of the old average per update; the average spans about
            1 / (1 - decay) updates.
        update_every_n_steps: update after every N-th optimizer step.
        update_starting_at_step: first optimizer step (0-based) that updates; earlier steps
            leave the average at the initial weights.
        device: where to keep the average (e.g. ``cpu`` to save accelerator memory); null:
            the model's device.
        use_buffers: also average the float buffers (BatchNorm running statistics).
    """

    # follows every optimizer step itself: a fit may group steps (dnn_tricks.data.step_groups)
    follows_optimizer_steps = True

    def __init__(
        self,
        decay: float = 0.999,
        update_every_n_steps: int = 1,
        update_starting_at_step: int = 0,
        device: str | None = None,
        use_buffers: bool = True,
    ) -> None:
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay={decay} must be in [0, 1)")
        if update_every_n_steps < 1 or update_starting_at_step < 0:
            raise ValueError("EMA update_every_n_steps must be >= 1, update_starting_at_step >= 0")
        super().__init__(
            device=device, use_buffers=use_buffers, multi_avg_fn=ema_keeping_integers(decay)
        )
        self.every, self.start = update_every_n_steps, update_starting_at_step

    def should_update(self, step_idx: int | None = None, epoch_idx: int | None = None) -> bool:
        return step_idx is not None and step_idx >= self.start and step_idx % self.every == 0

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        super().setup(trainer, pl_module, stage)  # a resumed fit restores the average into it
        self.fresh_copy = False

    def _copy_fitted_model(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """On a fresh fit, copy the model again once its on_fit_start has fitted it (the
        checkpoint path is known from fit start on)."""
        if not self.fresh_copy and trainer.ckpt_path is None:
            super().setup(trainer, pl_module, "fit")
        self.fresh_copy = True

    def on_sanity_check_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._copy_fitted_model(trainer, pl_module)  # the sanity check validates the average

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._copy_fitted_model(trainer, pl_module)
        self._hooks = [
            optimizer.register_step_post_hook(self._after_step(trainer, pl_module))
            for optimizer in trainer.optimizers
        ]

    def _after_step(self, trainer: Trainer, pl_module: LightningModule) -> Callable[..., None]:
        def update(*_: object) -> None:
            # Lightning counts the step after this hook: the 0-based index of this one
            step_idx = trainer.global_step
            if step_idx + 1 > self._latest_update_step and self.should_update(step_idx=step_idx):
                assert self._average_model is not None
                self._average_model.update_parameters(pl_module)
                self._latest_update_step = step_idx + 1

        return update

    def on_train_batch_end(self, *args: object, **kwargs: object) -> None:
        """Nothing: the optimizer's step hook updated the average (see the class notes)."""

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        for hook in getattr(self, "_hooks", []):
            hook.remove()
        self._hooks = []
        super().on_train_end(trainer, pl_module)
