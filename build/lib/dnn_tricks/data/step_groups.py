"""Whether a fit can take ``data.steps_per_batch`` optimizer steps per loader batch.

A callback that handles groups itself says so with a class attribute
``follows_optimizer_steps = True``; others that act on exact global steps from their batch
hooks (``every_n_steps``, ``every_n_train_steps``, Lightning's weight averaging) make the fit
run ungrouped.

The module steps through a group under Lightning's manual optimization
(``dnn_tricks.models.fused_steps``). Some settings need one Lightning step per optimizer
step; with them the fit runs ungrouped (one batch per step, the same training) and says why
once, so a config that groups its steps still runs under DDP or with any callback.
"""

from __future__ import annotations

from typing import Any, NamedTuple

from lightning.pytorch.callbacks import BatchSizeFinder, Callback, ModelCheckpoint, WeightAveraging


class StepGroup(NamedTuple):
    """The batches of one group stacked, as the train loader serves them; Lightning moves it
    to the device as it is (a named tuple keeps its type), and the DataModule's transfer
    hook splits it into its batches. Any other ``(x, y)`` (validation, a callback's sample)
    stays one batch."""

    x: Any
    y: Any


def collate_group(batch: tuple[Any, Any]) -> StepGroup:
    """``ArrayDataset.__getitems__`` of a group's indices (already stacked) as a StepGroup."""
    return StepGroup(*batch)


def _per_step_callback(callback: Callback) -> str | None:
    """Why ``callback`` needs a Lightning step per optimizer step, or None."""
    # the project's EMA, RunningStatsCheck and ActivationStats handle groups themselves
    if getattr(callback, "follows_optimizer_steps", False):
        return None
    if isinstance(callback, WeightAveraging):
        return "updates its average once per Lightning step"
    if isinstance(callback, BatchSizeFinder):
        return "tries batch sizes one Lightning step at a time"
    if isinstance(callback, ModelCheckpoint) and callback._every_n_train_steps:
        return "saves at global steps that are multiples of every_n_train_steps"
    if getattr(callback, "every_n_steps", 0):  # a callback of yours that counts steps
        return "acts at global steps that are multiples of every_n_steps"
    return None


def ungrouped_reason(trainer: Any) -> str | None:
    """What in this trainer needs one optimizer step per Lightning step, or None."""
    if trainer.world_size > 1:
        return "DDP (one forward per group could not sync each step's gradients)"
    if trainer.accumulate_grad_batches != 1 or trainer.gradient_clip_val:
        return "trainer.accumulate_grad_batches / gradient_clip_val (Lightning's, per step)"
    for callback in trainer.callbacks:
        reason = _per_step_callback(callback)
        if reason is not None:
            return f"{type(callback).__name__}, which {reason}"
    return None
