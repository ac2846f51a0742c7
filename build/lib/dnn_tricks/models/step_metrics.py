"""Training-step bookkeeping without a per-step tax: epoch sums of the logged training scalars
kept on the device, and the first non-finite loss recorded there without a host sync.

Why not ``self.log`` and torchmetrics every step: Lightning's ``self.log`` moves its result
record to the value's device on every call, walking the record's whole state (about 1 ms per
call on the 2-core CPU; three calls per step cost 3x the digits MLP's own step), and a
torchmetrics ``forward`` computes the batch value besides updating (and ``MeanMetric`` checks
for NaN, a host sync on an accelerator). Here a step costs a few tensor additions; the module
reads the sums at Lightning's log steps and at the epoch end. Validation and test keep their
loss and accuracy the same way (a ``self.log`` per evaluation batch cost ~1 ms each too).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

_NONE = 2**62  # "no non-finite loss" on this rank: above any step, for the MIN reduction


class EpochSums:
    """Sample-weighted sums of named scalars over one training epoch, and the number of
    correct top-1 predictions, all on the device of the values."""

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.correct: Tensor | None = None
        self.samples = 0

    def add(self, values: dict[str, Tensor], logits: Tensor, target: Tensor) -> None:
        """Add one batch: each value is a batch mean; ``target`` holds class indices."""
        n, weighted = len(target), {}
        for name, value in values.items():
            if id(value) not in weighted:  # e.g. the loss is the data loss without regularizers
                weighted[id(value)] = value.detach() * n
            held = self.sums.get(name)
            self.sums[name] = weighted[id(value)] if held is None else held + weighted[id(value)]
        correct = (logits.detach().argmax(1) == target).sum()
        self.correct = correct if self.correct is None else self.correct + correct
        self.samples += n

    def means(
        self, accuracy: str, reduce: Callable[[Tensor], Tensor] | None = None
    ) -> dict[str, Tensor]:
        """Each value's epoch mean, and the accuracy under the name ``accuracy``; empty
        before the epoch's first step. ``reduce`` sums a tensor over processes (DDP): the
        means are then over every process's samples, from one collective."""
        if self.correct is None:
            return {}
        names = list(self.sums)
        count = torch.tensor(self.samples, dtype=torch.float64, device=self.correct.device)
        parts = [*(self.sums[name] for name in names), self.correct, count]
        totals = torch.stack([part.double() for part in parts])
        if reduce is not None:
            totals = reduce(totals)
        *sums, correct, samples = totals.unbind()
        means = {name: (total / samples).float() for name, total in zip(names, sums, strict=True)}
        means[accuracy] = (correct / samples).float()
        return means


class NonFiniteGuard:
    """The first optimizer step whose training loss was NaN or infinite.

    ``record`` keeps the step and the value on the loss's device (no host sync, so an
    accelerator's queue stays full); ``check`` reads them and raises. ``observe`` checks at
    once where a read costs nothing (one CPU process), else records and checks at every log
    step; the module also checks before any validation, checkpoint or end of training, so no
    checkpoint ever holds the broken weights.
    Under DDP ``check`` is a collective (every rank calls it at the same points): all ranks stop
    together, naming the earliest step at which any of them saw a non-finite loss.
    """

    def __init__(self) -> None:
        self.step: Tensor | None = None
        self.value: Tensor | None = None

    @staticmethod
    def read_is_free(loss: Tensor, trainer: Any) -> bool:
        """A CPU loss in one process: reading it waits for nothing and talks to no peer."""
        return loss.device.type == "cpu" and (trainer is None or trainer.world_size == 1)

    def observe(self, module: Any, loss: Tensor, log_step: bool) -> None:
        """After each training loss: check it at once where reading it is free, else record
        it and check at log steps (``module`` is the LightningModule)."""
        if self.read_is_free(loss, module._trainer):
            if not bool(torch.isfinite(loss)):
                where = f"became {loss.item()}"
                raise FloatingPointError(_message(where, module.global_step, module.current_epoch))
            return
        self.record(loss, module.global_step)
        if log_step:
            self.check(module, module.current_epoch)

    def record(self, loss: Tensor, step: int) -> None:
        loss = loss.detach()
        if self.step is None or self.step.device != loss.device:
            self.step = torch.full((), -1, dtype=torch.long, device=loss.device)
            self.value = torch.zeros((), dtype=loss.dtype, device=loss.device)
        first = ~torch.isfinite(loss) & (self.step < 0)
        self.step = torch.where(first, step, self.step)
        self.value = torch.where(first, loss, self.value)

    def check(self, module: Any, epoch: int) -> None:
        """Raise FloatingPointError if a recorded loss was not finite (on any DDP rank)."""
        if self.step is None:
            return
        trainer = module._trainer
        earliest = int(self.step)
        if trainer is not None and trainer.world_size > 1:
            from torch.distributed import ReduceOp

            mine = torch.where(self.step >= 0, self.step, _NONE)
            earliest = int(trainer.strategy.reduce(mine, reduce_op=ReduceOp.MIN))
            earliest = -1 if earliest == _NONE else earliest
        if earliest < 0:
            return
        mine = int(self.step) == earliest
        where = f"became {float(self.value)}" if mine else "became non-finite on another process"
        raise FloatingPointError(_message(where, earliest, epoch))


def _message(where: str, step: int, epoch: int) -> str:
    return (
        f"the training loss {where} at global step {step} (epoch {epoch}); lower the learning "
        "rate or check the inputs. The last good checkpoint is kept."
    )
