"""Learning-rate schedules that torch lacks, plus the glue that lets the trainer fill in
their length.

Here (t counts optimizer steps when Lightning's `interval` is "step", epochs otherwise):

- `InverseTimeDecay`: lr_t = lr_0 / (1 + decay_rate t / decay_steps), the 1/t decay.
- `WarmupCosine`: linear warmup, then half a cosine down to min_lr_ratio lr_0.
- `OneCycle`: torch's OneCycleLR whose `total_steps` the trainer can fill in.

The other classic schedules are in torch.optim.lr_scheduler, use them by class_path:

- exponential, lr_t = lr_0 gamma^t: `ExponentialLR(gamma)`.
- staircase / step decay, lr_t = lr_0 gamma^floor(t / step_size): `StepLR(step_size, gamma)`;
  at chosen milestones: `MultiStepLR(milestones, gamma)`.
- reduce on plateau: `ReduceLROnPlateau(mode="min", factor, patience)` with the
  Lightning monitor set to `val/loss`.
- 1-cycle (Smith & Topin 2019): `OneCycleLR`, or `OneCycle` below so total_steps can be left
  to the trainer.

Schedules whose length is the length of training take `total_steps`; `build_scheduler`
passes `trainer.estimated_stepping_batches` to them when the config leaves it unset.
"""

import functools
import inspect
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler, OneCycleLR


class InverseTimeDecay(LRScheduler):
    """1/t decay: lr_t = lr_0 / (1 + decay_rate * t / decay_steps).

    With staircase, t / decay_steps becomes floor(t / decay_steps), so the rate drops in steps.
    Decays slower than exponential; the Robbins-Monro conditions (sum lr = inf, sum lr^2 < inf)
    hold, which is why the classic SGD analyses use it (Bottou 2012, "SGD tricks").

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


class WarmupCosine(LRScheduler):
    """Linear warmup to lr_0, then cosine annealing to min_lr_ratio * lr_0.

    For t < W (W = warmup_steps, T = total_steps, s = warmup_start_factor, m = min_lr_ratio):
        lr_t = lr_0 (s + (1 - s) t / W)
    for W <= t <= T, with p = (t - W) / (T - W):
        lr_t = lr_0 (m + (1 - m) (1 + cos(pi p)) / 2)        (Loshchilov & Hutter 2017)
    and lr_t = m lr_0 after T. Warmup keeps the first large-gradient steps from blowing up
    adaptive or large-batch training (Goyal et al. 2017).

    Args:
        optimizer: wrapped optimizer; lr_0 is each param group's initial lr.
        warmup_steps: length W of the linear warmup; 0 starts the cosine at once.
        total_steps: length T of the whole schedule (warmup included); None lets the trainer
            fill it in (`build_scheduler`, or set the attribute before the first step).
        min_lr_ratio: final lr as a fraction of lr_0.
        warmup_start_factor: lr at t = 0 as a fraction of lr_0.
        last_epoch: index of the last step when resuming; -1 starts fresh.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        warmup_steps: int,
        total_steps: int | None = None,
        min_lr_ratio: float = 0.0,
        warmup_start_factor: float = 0.0,
        last_epoch: int = -1,
    ) -> None:
        if warmup_steps < 0:
            raise ValueError(f"WarmupCosine warmup_steps={warmup_steps} must be >= 0")
        if not 0.0 <= min_lr_ratio <= 1.0:
            raise ValueError(f"WarmupCosine min_lr_ratio={min_lr_ratio} must be in [0, 1]")
        if not 0.0 <= warmup_start_factor <= 1.0:
            raise ValueError(
                f"WarmupCosine warmup_start_factor={warmup_start_factor} must be in [0, 1]"
            )
        self.warmup_steps = warmup_steps
        self.total_steps = total_steps
        self.min_lr_ratio = min_lr_ratio
        self.warmup_start_factor = warmup_start_factor
        self._warned_short = False
        super().__init__(optimizer, last_epoch)

    def _factor(self, t: int) -> float:
        # t = 0 is the constructor's own step, before the trainer could fill total_steps in
        if self.total_steps is None and t > 0:
            raise ValueError(
                "WarmupCosine.total_steps is None at the first step; set total_steps in the "
                "config or build the scheduler with build_scheduler(..., total_steps=...)"
            )
        if t < self.warmup_steps:
            s = self.warmup_start_factor
            return s + (1.0 - s) * t / self.warmup_steps
        if self.total_steps is None:  # t == 0 without warmup: the cosine starts at 1 anyway
            return 1.0
        if self.total_steps <= self.warmup_steps and not self._warned_short:
            self._warned_short = True  # shrunk smoke-test runs get here; no reason to fail
            warnings.warn(
                f"WarmupCosine total_steps={self.total_steps} <= warmup_steps="
                f"{self.warmup_steps}: the cosine phase is empty",
                stacklevel=2,
            )
        span = max(self.total_steps - self.warmup_steps, 1)
        p = min((t - self.warmup_steps) / span, 1.0)
        m = self.min_lr_ratio
        return m + (1.0 - m) * 0.5 * (1.0 + math.cos(math.pi * p))

    def get_lr(self) -> list[float]:
        factor = self._factor(self.last_epoch)
        return [base * factor for base in self.base_lrs]

    _get_closed_form_lr = get_lr


class OneCycle(OneCycleLR):
    """torch's OneCycleLR (Smith & Topin 2019) with total_steps left to the trainer.

    The lr rises from max_lr / div_factor to max_lr over pct_start of the steps, then anneals
    to max_lr / (div_factor * final_div_factor); momentum moves the opposite way. Only the
    signature differs from OneCycleLR: no epochs / steps_per_epoch, since the trainer knows
    the number of steps (`build_scheduler` passes it).

    Args:
        optimizer: wrapped optimizer.
        max_lr: peak learning rate (one per param group, or one for all).
        total_steps: number of optimizer steps; None is filled in by `build_scheduler`.
        pct_start: fraction of the steps spent increasing the lr.
        anneal_strategy: "cos" or "linear" annealing.
        div_factor: initial lr = max_lr / div_factor.
        final_div_factor: final lr = initial lr / final_div_factor.
        three_phase: add a third phase that anneals to the final lr (fast.ai style).
        cycle_momentum: cycle momentum (or Adam's beta1) inversely to the lr; needs an
            optimizer that has one (SGD with momentum > 0, Adam, AdamW).
        base_momentum: momentum at the lr peak.
        max_momentum: momentum at the start and the end.
        last_epoch: index of the last step when resuming; -1 starts fresh.
    """

    def __init__(
        self,
        optimizer: Optimizer,
        max_lr: float | list[float],
        total_steps: int | None = None,
        pct_start: float = 0.3,
        anneal_strategy: Literal["cos", "linear"] = "cos",
        div_factor: float = 25.0,
        final_div_factor: float = 1e4,
        three_phase: bool = False,
        cycle_momentum: bool = True,
        base_momentum: float | list[float] = 0.85,
        max_momentum: float | list[float] = 0.95,
        last_epoch: int = -1,
    ) -> None:
        if total_steps is None:
            raise ValueError(
                "OneCycle total_steps is None; set it in the config or build the scheduler "
                "with build_scheduler(..., total_steps=trainer.estimated_stepping_batches)"
            )
        super().__init__(
            optimizer,
            max_lr,
            total_steps=total_steps,
            pct_start=pct_start,
            anneal_strategy=anneal_strategy,
            cycle_momentum=cycle_momentum,
            base_momentum=base_momentum,
            max_momentum=max_momentum,
            div_factor=div_factor,
            final_div_factor=final_div_factor,
            three_phase=three_phase,
            last_epoch=last_epoch,
        )


# ---------------------------------------------------------------- trainer-filled length


def _target_and_keywords(factory: Callable) -> tuple[Callable, dict[str, Any]]:
    """The callable a factory finally calls and the keywords already bound to it.

    Handles a class or function, functools.partial (nested ones are flattened by Python),
    and jsonargparse's factories, partial(helper, instantiator, cls, **init_args), whose
    target is the class among their bound positionals.
    """
    if not isinstance(factory, functools.partial):
        return factory, {}
    if not inspect.isclass(factory.func):
        classes = [arg for arg in factory.args if inspect.isclass(arg)]
        if classes:
            return classes[0], dict(factory.keywords)
    return factory.func, dict(factory.keywords)


def needs_total_steps(factory: Callable) -> bool:
    """True when the scheduler factory takes `total_steps` and has it unset (None)."""
    target, keywords = _target_and_keywords(factory)
    try:
        params = inspect.signature(target).parameters
    except (TypeError, ValueError):  # builtins without a signature take no total_steps
        return False
    if "total_steps" not in params:
        return False
    return keywords.get("total_steps", params["total_steps"].default) is None


def build_scheduler(
    factory: Callable[..., LRScheduler], optimizer: Optimizer, total_steps: int | float
) -> LRScheduler:
    """Call `factory(optimizer)`, adding total_steps=total_steps when the factory needs it.

    Meant for `configure_optimizers` with total_steps = trainer.estimated_stepping_batches,
    so a config names a length-aware schedule without repeating the length of training.
    """
    if not needs_total_steps(factory):
        return factory(optimizer)
    if not math.isfinite(total_steps) or total_steps < 1:
        raise ValueError(
            f"the scheduler needs total_steps but the trainer estimates {total_steps} steps; "
            "set trainer.max_steps or trainer.max_epochs, or total_steps in the scheduler config"
        )
    return factory(optimizer, total_steps=int(total_steps))
