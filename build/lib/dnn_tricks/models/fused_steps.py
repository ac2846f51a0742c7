"""Several optimizer steps inside one Lightning step (``data.steps_per_batch``).

Lightning's automatic optimization costs about 0.3 ms of Python per step on the 2-core CPU
(hooks, closure, progress counters, logger connector), which doubles the step of a small MLP.
Keras' ``steps_per_execution`` answers the same cost by running several steps per call; here
the loader serves K consecutive batches as one, and the module steps through them under
Lightning's manual optimization: each batch gets its own forward, ``manual_backward`` and
``optimizer.step()`` (so precision plugins, ``on_before_optimizer_step`` hooks and
``global_step`` work as usual) and, with a per-step schedule, its own scheduler step.

When no callback and not the module listen to the per-step hooks (``STEP_HOOKS``) and the
precision scales no loss, a step skips Lightning's hook dispatch (~0.1 ms a step with the
default callbacks): ``loss.backward()`` and the optimizer's own ``step`` between the
LightningOptimizer's progress callbacks, so ``global_step`` counts as before
(``hooks_are_idle``).

What counts what: ``global_step``, ``max_steps``, schedules and checkpoints count optimizer
steps; Lightning's batch counters (``log_every_n_steps``, ``limit_train_batches``, an integer
``val_check_interval``, the logger's step axis) count loader batches, K steps each.
Where a fit needs a Lightning step per optimizer step (DDP, the trainer's clipping or
accumulation, callbacks that act per optimizer step) the DataModule serves it ungrouped
(``dnn_tricks.data.step_groups``).
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.plugins.precision import MixedPrecision, Precision

# the hooks Lightning runs around every manual backward and optimizer step
STEP_HOOKS = ("on_before_backward", "on_after_backward", "on_before_optimizer_step")


def steps_per_batch(trainer: Trainer | None) -> int:
    """Optimizer steps per train loader batch in this fit (the DataModule's
    ``grouped_steps()``; 1 without a DataModule that groups)."""
    datamodule = getattr(trainer, "datamodule", None) if trainer is not None else None
    grouped = getattr(datamodule, "grouped_steps", None)
    return int(grouped()) if grouped is not None else 1


def plateau_refusal(trainer: Trainer) -> str:
    """The one-line error for ReduceLROnPlateau, which a grouped fit cannot step."""
    return (
        f"data.steps_per_batch={steps_per_batch(trainer)} steps the schedule by hand, and "
        "ReduceLROnPlateau needs Lightning's: set data.steps_per_batch: 1"
    )


def total_steps(trainer: Trainer) -> int:
    """Optimizer steps of the whole fit (what a per-step schedule spans): Lightning's
    estimate counts loader batches, each K steps but the last group of an epoch."""
    estimate = trainer.estimated_stepping_batches  # sets the train loader's length up
    per_epoch = trainer.datamodule.optimizer_steps(int(trainer.num_training_batches))  # type: ignore[attr-defined]
    epochs = trainer.max_epochs if trainer.max_epochs not in (None, -1) else None
    total = per_epoch * epochs if epochs is not None else int(estimate)
    return min(total, trainer.max_steps) if trainer.max_steps != -1 else total


def hooks_are_idle(trainer: Trainer, module: LightningModule) -> bool:
    """Whether a step may run without Lightning's per-step hook dispatch, unobservably: no
    callback or module overrides a ``STEP_HOOKS`` hook or ``backward``, and the precision is
    32-bit or autocast without a gradient scaler (bf16)."""
    for hook in STEP_HOOKS:
        if getattr(type(module), hook) is not getattr(LightningModule, hook):
            return False
        if any(getattr(type(c), hook) is not getattr(Callback, hook) for c in trainer.callbacks):
            return False
    if type(module).backward is not LightningModule.backward:
        return False
    precision = trainer.precision_plugin
    unscaled = isinstance(precision, MixedPrecision) and precision.scaler is None
    return type(precision) is Precision or (type(precision) is MixedPrecision and unscaled)
