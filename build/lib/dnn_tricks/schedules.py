"""Learning-rate schedules: torch's, named by class path, plus the two this project adds, and
the one rule that gives a schedule the length of training.

Here t counts optimizer steps when ``model.scheduler_interval`` is ``step``, epochs otherwise.
torch.optim.lr_scheduler covers the classics; name them by ``class_path``:

- one-cycle (Smith & Topin 2019): ``OneCycleLR(max_lr, pct_start, ...)``, total_steps filled in.
- cosine annealing (Loshchilov & Hutter 2017): ``CosineAnnealingLR(T_max, eta_min)``; with a
  warmup and the length filled in: ``WarmupCosine`` below.
- exponential, lr_t = lr_0 gamma^t: ``ExponentialLR(gamma)``.
- staircase / step decay, lr_t = lr_0 gamma^floor(t / step_size): ``StepLR(step_size, gamma)``;
  at chosen milestones: ``MultiStepLR(milestones, gamma)``.
- polynomial decay to zero: ``PolynomialLR(total_iters, power)``.
- reduce on plateau: ``ReduceLROnPlateau(mode, factor, patience)``, watching
  ``model.scheduler_monitor``.

The length of training: a schedule factory that takes a ``total_steps`` argument and leaves it
unset (None) is called with ``total_steps=`` the fit's length; ``Classifier.configure_optimizers``
passes it explicitly through ``build_scheduler``. A ``total_steps`` written in the config wins.
"""

from __future__ import annotations

import functools
import inspect
import math
import warnings
from collections.abc import Callable

from torch.optim import Optimizer
from torch.optim.lr_scheduler import (
    CosineAnnealingLR,
    LinearLR,
    LRScheduler,
    ReduceLROnPlateau,
    SequentialLR,
)


class InverseTimeDecay(LRScheduler):
    """1/t decay: lr_t = lr_0 / (1 + decay_rate * t / decay_steps).

    Kept here because torch has no 1/t schedule, and LambdaLR's lambda cannot be written in a
    YAML config. With staircase, t / decay_steps becomes floor(t / decay_steps). Decays slower
    than exponential; the Robbins-Monro conditions (sum lr = inf, sum lr^2 < inf) hold, which is
    why the classic SGD analyses use it (Bottou 2012, "SGD tricks").

    Args:
        optimizer: wrapped optimizer; lr_0 is each param group's initial lr.
        decay_rate: how fast the rate falls; lr halves at t = decay_steps / decay_rate.
        decay_steps: the time unit of t (steps or epochs, as the scheduler is stepped).
        staircase: decay in whole units of decay_steps instead of continuously.
        last_epoch: index of the last step when resuming; -1 starts fresh.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        decay_rate: float,
        decay_steps: int = 1,
        staircase: bool = False,
        last_epoch: int = -1,
    ) -> None:
        if decay_rate < 0:
            raise ValueError(f"InverseTimeDecay decay_rate={decay_rate} must be >= 0")
        if decay_steps < 1:
            raise ValueError(f"InverseTimeDecay decay_steps={decay_steps} must be >= 1")
        self.decay_rate = decay_rate
        self.decay_steps = decay_steps
        self.staircase = staircase
        super().__init__(optimizer, last_epoch)

    def get_lr(self) -> list[float]:
        # closed form from base_lrs: chaining-free, so a resumed run matches exactly
        units = self.last_epoch / self.decay_steps
        if self.staircase:
            units = math.floor(units)
        return [base / (1.0 + self.decay_rate * units) for base in self.base_lrs]

    _get_closed_form_lr = get_lr


class WarmupCosine(SequentialLR):
    """Linear warmup, then cosine annealing to ``min_lr``: torch's ``LinearLR`` then
    ``CosineAnnealingLR``, joined by ``SequentialLR``.

    A class because SequentialLR takes schedulers already built on the optimizer, which a YAML
    config cannot build. With W = warmup_steps, T = total_steps, s = warmup_start_factor:
    lr_t = lr_0 (s + (1 - s) t / W) for t < W, then
    lr_t = min_lr + (lr_0 - min_lr) (1 + cos(pi (t - W) / (T - W))) / 2 up to t = T.
    Warmup keeps the first large-gradient steps from blowing up adaptive or large-batch
    training (Goyal et al. 2017).

    Example (per-step schedule; the model fills in total_steps)::

        scheduler:
          class_path: dnn_tricks.schedules.WarmupCosine
          init_args: {warmup_steps: 500, min_lr: 1.0e-4}
        scheduler_interval: step

    Args:
        optimizer: wrapped optimizer; lr_0 is each param group's initial lr.
        warmup_steps: length W of the linear warmup; 0 starts the cosine at once.
        total_steps: length T of the whole schedule (warmup included); None is filled in with
            the fit's length by the model (``build_scheduler``).
        min_lr: the lr the cosine ends at (torch's ``eta_min``, the same for every group).
        warmup_start_factor: lr at t = 0 as a fraction of lr_0, in (0, 1] (LinearLR's
            ``start_factor``).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int | None = None,
        min_lr: float = 0.0,
        warmup_start_factor: float = 0.01,
    ) -> None:
        if total_steps is None:
            raise ValueError(
                "WarmupCosine total_steps is None: set it in the config, or build the schedule "
                "with dnn_tricks.schedules.build_scheduler (the Classifier does)"
            )
        if warmup_steps < 0:
            raise ValueError(f"WarmupCosine warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 < warmup_start_factor <= 1.0:
            raise ValueError(
                f"WarmupCosine warmup_start_factor={warmup_start_factor} must be in (0, 1]"
            )
        if total_steps <= warmup_steps:  # shrunk smoke runs get here: warn, do not fail
            warnings.warn(
                f"WarmupCosine total_steps={total_steps} <= warmup_steps={warmup_steps}: "
                "the cosine phase is never reached",
                stacklevel=2,
            )
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        phases: list[LRScheduler] = []
        if warmup_steps > 0:
            phases.append(LinearLR(optimizer, warmup_start_factor, 1.0, warmup_steps))
        span = max(total_steps - warmup_steps, 1)
        phases.append(CosineAnnealingLR(optimizer, T_max=span, eta_min=min_lr))
        super().__init__(optimizer, phases, milestones=[warmup_steps] if warmup_steps else [])


def build_scheduler(
    factory: Callable[..., LRScheduler | ReduceLROnPlateau],
    optimizer: Optimizer,
    total_steps: int | float,
) -> LRScheduler | ReduceLROnPlateau:
    """``factory(optimizer)``, plus ``total_steps=total_steps`` when the factory takes a
    ``total_steps`` argument left unset (None).

    The factory is what the config made: a class, a ``functools.partial`` (whose bound
    ``keywords`` are read; jsonargparse's factories bind every init_arg, defaults included),
    or any callable (whose ``inspect.signature`` is read). ``Classifier.configure_optimizers``
    calls it with the fit's optimizer steps (or epochs, for a per-epoch schedule), so a config
    names a length-aware schedule without repeating the length of training.
    """
    bound = factory.keywords if isinstance(factory, functools.partial) else {}
    if "total_steps" in bound:
        unset = bound["total_steps"] is None
    else:
        try:
            param = inspect.signature(factory).parameters.get("total_steps")
        except (TypeError, ValueError):  # builtins without a signature take no total_steps
            param = None
        unset = param is not None and param.default is None
    if not unset:
        return factory(optimizer)
    if not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(
            f"the scheduler needs total_steps but the trainer estimates {total_steps} steps; "
            "set trainer.max_steps or trainer.max_epochs, or total_steps in the scheduler config"
        )
    return factory(optimizer, total_steps=int(total_steps))
