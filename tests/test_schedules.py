"""LR schedules against their formulas computed here by hand, torch's documented semantics,
resume, and the model filling in the length of training."""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import pytest
import torch
from jsonargparse import ArgumentParser
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.cli import LRSchedulerCallable
from torch.optim import SGD
from torch.optim.lr_scheduler import ExponentialLR, LRScheduler, OneCycleLR, StepLR

from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.nets import MLP
from dnn_tricks.schedules import InverseTimeDecay, WarmupCosine, build_scheduler

LRS = (0.1, 0.03)  # two param groups: every schedule must scale each from its own lr_0


def _optimizer(momentum: float = 0.0) -> SGD:
    groups = [{"params": [torch.zeros(1, requires_grad=True)], "lr": lr} for lr in LRS]
    return SGD(groups, lr=LRS[0], momentum=momentum)


def _trace(scheduler: LRScheduler, steps: int) -> list[list[float]]:
    """lr of every group at t = 0 .. steps - 1, stepping in the documented order."""
    out = [list(scheduler.get_last_lr())]
    for _ in range(steps - 1):
        scheduler.optimizer.step()
        scheduler.step()
        out.append(list(scheduler.get_last_lr()))
    return out


def _assert_trace(trace: list[list[float]], formula: Callable[[float, int], float]) -> None:
    for t, lrs in enumerate(trace):
        assert lrs == pytest.approx([formula(lr0, t) for lr0 in LRS], rel=1e-12, abs=1e-15), t


def _cos(start: float, end: float, p: float) -> float:
    """Half a cosine from start (p = 0) to end (p = 1)."""
    return end + (start - end) * (1 + math.cos(math.pi * p)) / 2


def _config_factory(config: dict | str) -> Callable:
    """The scheduler factory a config makes, as LightningCLI parses and instantiates it."""
    parser = ArgumentParser()
    parser.add_argument("--scheduler", type=LRSchedulerCallable)
    instantiate = getattr(parser, "instantiate", None) or parser.instantiate_classes  # < 4.50
    return instantiate(parser.parse_object({"scheduler": config})).scheduler


@pytest.mark.parametrize("staircase", [False, True])
def test_inverse_time_decay_formula(staircase: bool) -> None:
    sched = InverseTimeDecay(_optimizer(), decay_rate=0.5, decay_steps=3, staircase=staircase)
    units = (lambda t: t // 3) if staircase else (lambda t: t / 3)
    _assert_trace(_trace(sched, 20), lambda lr0, t: lr0 / (1 + 0.5 * units(t)))
    # anchor: lr halves once 0.5 * t / 3 reaches 1
    assert _trace(InverseTimeDecay(_optimizer(), 0.5, 3, staircase), 7)[6][0] == pytest.approx(
        LRS[0] / 2
    )


@pytest.mark.parametrize("warmup", [0, 4])
def test_warmup_cosine_formula_and_anchors(warmup: int) -> None:
    total, eta, s = 14, 0.002, 0.2

    def formula(lr0: float, t: int) -> float:
        if t < warmup:
            return lr0 * (s + (1 - s) * t / warmup)
        return _cos(lr0, eta, (t - warmup) / (total - warmup))

    sched = WarmupCosine(_optimizer(), warmup, total, min_lr=eta, warmup_start_factor=s)
    trace = _trace(sched, total + 1)
    _assert_trace(trace, formula)
    assert trace[0][0] == pytest.approx(s * LRS[0] if warmup else LRS[0])
    assert trace[warmup][0] == pytest.approx(LRS[0])  # warmup ends at the peak
    half = warmup + (total - warmup) // 2
    assert trace[half][1] == pytest.approx((LRS[1] + eta) / 2)  # half-way down the cosine
    assert trace[total][0] == pytest.approx(eta)


def test_warmup_cosine_errors() -> None:
    with pytest.raises(ValueError, match="total_steps is None"):
        WarmupCosine(_optimizer(), warmup_steps=2)
    with pytest.raises(ValueError, match="warmup_start_factor=0"):
        WarmupCosine(_optimizer(), 2, 10, warmup_start_factor=0.0)
    with pytest.warns(UserWarning, match="never reached"):
        WarmupCosine(_optimizer(), 5, 3)


def test_one_cycle_filled_in_matches_the_published_schedule() -> None:
    """OneCycleLR from a config without total_steps: the model's length is filled in, and the
    lr and momentum follow Smith & Topin (2019), as torch documents it: cosine from
    max_lr / div up to max_lr over pct_start of the steps, then down to that / final_div."""
    total, peak, div, final_div, pct = 40, 1.0, 10.0, 100.0, 0.25
    factory = _config_factory(
        {
            "class_path": "torch.optim.lr_scheduler.OneCycleLR",
            "init_args": {
                "max_lr": peak,
                "pct_start": pct,
                "div_factor": div,
                "final_div_factor": final_div,
            },
        }
    )
    sched = build_scheduler(factory, _optimizer(0.9), total)
    assert isinstance(sched, OneCycleLR) and sched.total_steps == total
    start, end = peak / div, peak / div / final_div
    up, down = pct * total - 1, total - 1  # last step of each phase

    def lr(t: int) -> float:
        return _cos(start, peak, t / up) if t <= up else _cos(peak, end, (t - up) / (down - up))

    def momentum(t: int) -> float:
        return _cos(0.95, 0.85, t / up) if t <= up else _cos(0.85, 0.95, (t - up) / (down - up))

    for t in range(total):
        group = sched.optimizer.param_groups[0]
        assert group["lr"] == pytest.approx(lr(t), rel=1e-12), t
        assert group["momentum"] == pytest.approx(momentum(t), rel=1e-12), t
        if t < total - 1:
            sched.optimizer.step()
            sched.step()
    assert sched.get_last_lr()[0] == pytest.approx(end)


def test_torch_step_and_exponential_semantics() -> None:
    # the module docstring promises these formulas for the schedules torch covers
    _assert_trace(
        _trace(StepLR(_optimizer(), 3, gamma=0.5), 12), lambda lr0, t: lr0 * 0.5 ** (t // 3)
    )
    _assert_trace(_trace(ExponentialLR(_optimizer(), gamma=0.9), 12), lambda lr0, t: lr0 * 0.9**t)


@pytest.mark.parametrize(
    "make",
    [
        lambda opt: InverseTimeDecay(opt, decay_rate=0.3, decay_steps=2, staircase=True),
        lambda opt: WarmupCosine(opt, 3, 15, min_lr=0.001, warmup_start_factor=0.1),
        lambda opt: build_scheduler(functools.partial(OneCycleLR, max_lr=0.5), opt, 20),
    ],
    ids=["inverse_time", "warmup_cosine", "one_cycle"],
)
def test_state_dict_resume_continues_identically(make) -> None:
    straight = _trace(make(_optimizer(0.9)), 16)

    opt = _optimizer(0.9)
    first = make(opt)
    head = _trace(first, 6)
    opt2 = _optimizer(0.9)
    second = make(opt2)  # scheduler first, then states, as Lightning restores them
    opt2.load_state_dict(opt.state_dict())
    second.load_state_dict(first.state_dict())
    opt2.step()
    second.step()
    tail = _trace(second, 10)  # t = 6 .. 15
    assert head + tail == straight  # bit-identical, not just close


class LinearToZero(LRScheduler):
    """A user's schedule class that needs nothing but the optimizer and its length."""

    def __init__(self, optimizer: SGD, total_steps: int | None = None) -> None:
        self.total_steps = total_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr0 * (1 - self.last_epoch / self.total_steps) for lr0 in self.base_lrs]


def test_build_scheduler_fills_total_steps_only_when_unset() -> None:
    unset = functools.partial(WarmupCosine, warmup_steps=2)
    given = functools.partial(WarmupCosine, warmup_steps=2, total_steps=50)
    assert build_scheduler(unset, _optimizer(), 30).total_steps == 30
    assert build_scheduler(given, _optimizer(), 30).total_steps == 50
    one_cycle = functools.partial(OneCycleLR, max_lr=0.1)  # total_steps read from the signature
    assert build_scheduler(one_cycle, _optimizer(0.9), 30).total_steps == 30
    assert build_scheduler(LinearToZero, _optimizer(), 30).total_steps == 30  # a plain class
    step = build_scheduler(functools.partial(StepLR, step_size=3), _optimizer(), 30)
    assert isinstance(step, StepLR)  # takes no total_steps: called as it is
    with pytest.raises(ValueError, match="max_steps"):
        build_scheduler(unset, _optimizer(), float("inf"))

    # the same through config-made factories
    path = "dnn_tricks.schedules.WarmupCosine"
    unset = _config_factory({"class_path": path, "init_args": {"warmup_steps": 1}})
    given = _config_factory(
        {"class_path": path, "init_args": {"warmup_steps": 1, "total_steps": 9}}
    )
    step = _config_factory(
        {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3}}
    )
    assert build_scheduler(unset, _optimizer(), 40).total_steps == 40
    assert build_scheduler(given, _optimizer(), 40).total_steps == 9
    assert isinstance(build_scheduler(step, _optimizer(), 40), StepLR)


class _RecordLR(Callback):
    """The lr each training batch runs with."""

    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("interval", ["step", "epoch"])
def test_classifier_passes_the_fit_length(interval: str) -> None:
    """configure_optimizers gives OneCycleLR the fit's optimizer steps (per-step schedule) or
    epochs (per-epoch schedule), so the run goes through exactly one whole cycle."""
    seed_everything(0, verbose=False)
    epochs, batches, peak, div, final_div = 4, 2, 0.1, 25.0, 1e4
    model = Classifier(
        net=functools.partial(MLP, hidden=[8]),
        optimizer=functools.partial(SGD, lr=0.01, momentum=0.9),
        scheduler=functools.partial(
            OneCycleLR, max_lr=peak, pct_start=0.5, div_factor=div, final_div_factor=final_div
        ),
        scheduler_interval=interval,
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    record = _RecordLR()
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=0,
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[record],
    )
    trainer.fit(model, DataModule(source="digits", batch_size=32, num_workers=0))
    total = epochs * batches if interval == "step" else epochs
    assert trainer.lr_scheduler_configs[0].scheduler.total_steps == total
    used = record.lrs if interval == "step" else record.lrs[::batches]
    # the cycle as torch documents it: up for pct_start of the steps, then down to the end
    start, end, up = peak / div, peak / div / final_div, 0.5 * total - 1
    expected = [
        _cos(start, peak, t / up) if t <= up else _cos(peak, end, (t - up) / (total - 1 - up))
        for t in range(total)
    ]
    assert used == pytest.approx(expected, rel=1e-12)
    assert used[-1] == pytest.approx(end)
