"""RunningStatsCheck: are the running statistics of the norm layers healthy?

Eval-mode predictions rest entirely on running buffers that no gradient ever checks. Three
ways they silently go wrong, each caught here:

* they become non-finite (one NaN batch poisons an exponential average for good);
* they drift from the statistics the layer sees with the current weights (momentum too
  low, a frozen layer, the lag of an average while weights move; Wu & Johnson 2021,
  "Rethinking 'Batch' in BatchNorm", sec. 3);
* validation runs in train mode, so validation data move them (a leak and a bug).
"""

from __future__ import annotations

from collections import deque
from typing import Any, Literal

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_warn
from torch import Tensor, nn

from dnn_tricks.callbacks.norm_stats import describe_unhealthy, health_flags, measure_drift
from dnn_tricks.callbacks.trainer_utils import (
    batch_inputs,
    batches_of,
    eager_network,
    log_scalars,
    sum_over_processes,
)
from dnn_tricks.norm_layers import running_buffers, running_stat_layers

Action = Literal["warn", "raise"]


def _warm(layer: nn.Module, trainer: Trainer) -> bool:
    """Whether an exponential average has forgotten its initial value (mean 0, variance 1):
    after k steps of momentum m it still holds (1 - m)^k of it; checked below 5%, i.e.
    after 29 steps for PyTorch's m = 0.1. A cumulative average (m = None) is always warm."""
    momentum = getattr(layer, "momentum", None)
    return momentum is None or (1 - momentum) ** trainer.global_step < 0.05


def _identical(a: Tensor, b: Tensor) -> bool:
    """Bit-for-bit equal values, NaN equal to NaN (a NaN buffer has not "changed")."""
    return torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True)


class RunningStatsCheck(Callback):
    """Checks the running statistics of every layer that keeps them during fit: BatchNorm,
    IterNorm, or any layer with ``running_*`` buffers (``dnn_tricks.norm_layers``).

    * Health: every ``every_n_steps`` training steps and at the end of every validation, all
      running buffers must be finite, variances >= 0 and whitening diagonals > 0; otherwise
      a FloatingPointError names the layers and the step (``trainer`` exits with status 2;
      checkpoints already written are kept).
    * Train-mode validation: the running buffers are copied when a validation starts and
      compared when it ends. Any change means the model ran in train mode on validation data
      (its statistics now hold validation data); a RuntimeError names the layers.
    * Drift: at each validation during fit (so the checkpoint written after it holds the
      result) and at training-epoch ends not followed by one, the last ``drift_batches``
      training batches (as the model saw them: augmented, normalized; re-using them draws
      nothing from the loader, so the run stays the same with or without the check) go
      through the model again in eval mode, without gradients and without touching the
      buffers; forward pre-hooks average each layer's batch statistics (what the running
      buffers estimate, see :class:`BatchStatistics`) and :func:`layer_drift` compares
      them. Logged as ``running_stats/drift/<layer>`` and
      ``running_stats/max_drift``; a layer above ``drift_threshold`` is warned about by name
      (or raises, with ``drift_action: raise``). A layer is measured once its running
      average has forgotten its initial value (see :func:`_warm`; 29 steps at momentum 0.1).

    Under DDP the drift statistics are summed over processes and compared with rank 0's
    buffers (which DDP broadcasts to the others at every forward and checkpoints keep);
    every decision is taken on all processes alike (so none hangs waiting for one that
    raised) and rank 0 logs.

    Example, under ``trainer.callbacks`` in a config::

        - class_path: dnn_tricks.callbacks.running_stats.RunningStatsCheck
          init_args:
            every_n_steps: 100
            drift_batches: 8
            drift_threshold: 1.0
            drift_action: warn

    Args:
        every_n_steps: check buffer health after every N-th optimizer step (one host sync);
            0 checks at validation only.
        drift_batches: latest training batches re-run at each drift check (kept by
            reference, no copy); 0 disables the drift check.
        drift_threshold: largest tolerated drift: |mean shift| or |log std ratio| of a
            layer's eval-mode output on training data, worst channel (1.0 = a mean one
            standard deviation off, or a std off by a factor e). Healthy digits MLPs measured
            0.1-0.4 (BatchNorm) and 0.1-0.65 (IterNorm) with 8 batches of 32: the lag of the
            running averages while weights move, plus the noise of 256 samples per channel.
        drift_action: ``warn`` or ``raise`` (RuntimeError) when a layer drifts too far.
    """

    def __init__(
        self,
        every_n_steps: int = 100,
        drift_batches: int = 8,
        drift_threshold: float = 1.0,
        drift_action: Action = "warn",
    ) -> None:
        if every_n_steps < 0:
            raise ValueError(f"RunningStatsCheck every_n_steps={every_n_steps} must be >= 0")
        if drift_batches < 0:
            raise ValueError(f"RunningStatsCheck drift_batches={drift_batches} must be >= 0")
        if not drift_threshold > 0:
            raise ValueError(f"RunningStatsCheck drift_threshold={drift_threshold} must be > 0")
        if drift_action not in ("warn", "raise"):
            raise ValueError(
                f"RunningStatsCheck drift_action={drift_action!r} is unknown; choose warn or raise"
            )
        self.every_n_steps, self.drift_batches = every_n_steps, drift_batches
        self.drift_threshold, self.drift_action = drift_threshold, drift_action
        self.drift: dict[str, float] = {}  # last measured drift per layer
        self.drift_warnings = 0
        self._recent: deque[Tensor] = deque(maxlen=max(drift_batches, 1))
        self._snapshot: dict[str, Tensor] = {}

    # -- health --
    def check_health(self, trainer: Trainer, pl_module: LightningModule, where: str) -> None:
        layers = running_stat_layers(pl_module)
        if not layers:
            return
        flags = torch.stack([health_flags(m) for _, m in layers])
        bad = sum_over_processes(trainer, (~flags.all(1)).sum())
        if int(bad) == 0:
            return
        found = describe_unhealthy(layers) or ["on another process"]
        raise FloatingPointError(
            f"RunningStatsCheck: running statistics became invalid {where} (global step "
            f"{trainer.global_step}, epoch {trainer.current_epoch}): {' | '.join(found)}; "
            "lower the learning rate or look for non-finite inputs"
        )

    # checks after the Lightning step in which a multiple of every_n_steps was passed: that
    # step itself, or the end of its group where a Lightning step takes several
    # (data.steps_per_batch); a grouped fit need not run ungrouped for it
    follows_optimizer_steps = True

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._seen_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: Trainer, pl_module: LightningModule, outputs: Any, batch: Any, idx: int
    ) -> None:
        if self.drift_batches:
            for part in batches_of(batch):  # a group's batches one by one
                self._recent.append(batch_inputs(part).detach())
        step, every = trainer.global_step, self.every_n_steps
        passed = bool(every) and step // every > getattr(self, "_seen_step", step - 1) // every
        self._seen_step = step
        if passed:
            self.check_health(trainer, pl_module, "after a training step")

    # -- train-mode validation --
    def on_validation_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        if not trainer.sanity_checking:
            # measured before validation uses the statistics and before the checkpoint
            # that follows validation is written, so the checkpoint holds this epoch's drift
            self.check_drift(trainer, pl_module)
        self._snapshot = {
            f"{name}.{key}": buf.detach().clone()
            for name, layer in running_stat_layers(pl_module)
            for key, buf in running_buffers(layer).items()
        }

    def on_validation_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        current = {
            f"{name}.{key}": buf
            for name, layer in running_stat_layers(pl_module)
            for key, buf in running_buffers(layer).items()
        }
        moved = [
            k
            for k, before in self._snapshot.items()
            if k in current and not _identical(before, current[k])
        ]
        self._snapshot = {}
        # Under DDP only rank 0's copy is evidence: DDP broadcasts rank 0's buffers into the
        # other ranks at every forward, validation included, so theirs change legitimately.
        count = torch.tensor(len(moved) if trainer.is_global_zero else 0, device=pl_module.device)
        if int(sum_over_processes(trainer, count)):
            shown = ", ".join(moved[:4]) + (f" and {len(moved) - 4} more" if len(moved) > 4 else "")
            shown = shown if trainer.is_global_zero else "on rank 0"
            raise RuntimeError(
                f"RunningStatsCheck: running statistics changed during validation "
                f"({shown}): the model ran in train mode on "
                "validation data. Do not call .train() in a validation step or hook; Lightning "
                "puts the model in eval mode for validation"
            )
        self.check_health(trainer, pl_module, "after validation")

    # -- drift --
    def on_train_epoch_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self.check_drift(trainer, pl_module)  # epochs without validation

    def check_drift(self, trainer: Trainer, pl_module: LightningModule) -> None:
        """Re-run the batches kept since the last measurement (none: nothing to do)."""
        recent, self._recent = list(self._recent), deque(maxlen=self._recent.maxlen)
        layers = [(n, m) for n, m in running_stat_layers(pl_module) if _warm(m, trainer)]
        if not self.drift_batches or not layers or not recent:
            return
        with trainer.precision_plugin.forward_context():
            drifts = measure_drift(
                eager_network(pl_module),
                recent,
                layers,
                reduce=lambda t: sum_over_processes(trainer, t),
            )
        if trainer.world_size > 1:
            # the statistics are summed over ranks, but each rank compares them with its own
            # buffers; rank 0's are the ones DDP broadcasts and checkpoints keep, so its
            # verdict is everyone's (and no rank raises alone)
            drifts = trainer.strategy.broadcast(drifts, src=0)
        if not drifts:
            return
        self.drift = {d.layer: d.value for d in drifts}
        metrics = {f"running_stats/drift/{d.layer}": d.value for d in drifts}
        metrics["running_stats/max_drift"] = max(self.drift.values())
        log_scalars(trainer, metrics)
        over = [d for d in drifts if d.value > self.drift_threshold]
        if not over:
            return
        message = (
            f"RunningStatsCheck: running statistics drift beyond drift_threshold="
            f"{self.drift_threshold} at epoch {trainer.current_epoch}: "
            + "; ".join(
                f"{d.layer} (channel {d.channel}: eval output mean {d.mean_shift:+.3g}, "
                f"log std ratio {d.log_std_ratio:+.3g})"
                for d in sorted(over, key=lambda d: -d.value)
            )
            + ". Eval-mode outputs will differ from training; check the norm layers' momentum, "
            "or recompute the statistics (PreciseBN)"
        )
        self.drift_warnings += 1
        if self.drift_action == "raise":
            raise RuntimeError(message)
        rank_zero_warn(message)

    # -- resume --
    def state_dict(self) -> dict[str, Any]:
        return {"drift": dict(self.drift), "drift_warnings": self.drift_warnings}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.drift = dict(state_dict.get("drift", {}))
        self.drift_warnings = int(state_dict.get("drift_warnings", 0))
