"""LR schedules against their written formulas, torch's documented semantics, and resume."""

import functools
import math
from collections.abc import Callable

import pytest
import torch
from jsonargparse import ArgumentParser
from torch.optim import SGD, Optimizer
from torch.optim.lr_scheduler import ExponentialLR, LRScheduler, OneCycleLR, StepLR

from dnn_tricks.schedules import (
    InverseTimeDecay,
    OneCycle,
    WarmupCosine,
    build_scheduler,
    needs_total_steps,
)

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


@pytest.mark.parametrize("staircase", [False, True])
def test_inverse_time_decay_formula(staircase: bool) -> None:
    sched = InverseTimeDecay(_optimizer(), decay_rate=0.5, decay_steps=3, staircase=staircase)
    units = (lambda t: t // 3) if staircase else (lambda t: t / 3)
    _assert_trace(_trace(sched, 20), lambda lr0, t: lr0 / (1 + 0.5 * units(t)))
    # anchor: lr halves once 0.5 * t / 3 reaches 1
    assert _trace(InverseTimeDecay(_optimizer(), 0.5, 3, staircase), 7)[6][0] == pytest.approx(
        LRS[0] / 2
    )


def test_warmup_cosine_formula_and_anchors() -> None:
    w, total, m, s = 4, 14, 0.1, 0.2

    def formula(lr0: float, t: int) -> float:
        if t < w:
            return lr0 * (s + (1 - s) * t / w)
        p = min((t - w) / (total - w), 1.0)
        return lr0 * (m + (1 - m) * (1 + math.cos(math.pi * p)) / 2)

    sched = WarmupCosine(_optimizer(), w, total, min_lr_ratio=m, warmup_start_factor=s)
    trace = _trace(sched, total + 4)
    _assert_trace(trace, formula)
    assert trace[0][0] == pytest.approx(s * LRS[0])
    assert trace[w][0] == pytest.approx(LRS[0])  # warmup ends at the peak
    assert trace[w + 5][0] == pytest.approx((1 + m) / 2 * LRS[0])  # half-way down the cosine
    assert trace[total][0] == trace[total + 3][0] == pytest.approx(m * LRS[0])  # then held


def test_warmup_cosine_total_steps_filled_later() -> None:
    sched = WarmupCosine(_optimizer(), warmup_steps=2)
    assert sched.total_steps is None and sched.get_last_lr()[0] == 0.0
    sched.optimizer.step()
    with pytest.raises(ValueError, match="total_steps is None"):
        sched.step()

    sched = WarmupCosine(_optimizer(), warmup_steps=2)
    sched.total_steps = 6  # what a trainer hook would do
    trace = _trace(sched, 7)
    assert trace[2][0] == pytest.approx(LRS[0]) and trace[6][0] == pytest.approx(0.0)


def test_one_cycle_matches_torch() -> None:
    kw = dict(max_lr=[1.0, 0.5], pct_start=0.25, div_factor=10.0, final_div_factor=100.0)
    ours = _trace(OneCycle(_optimizer(0.9), total_steps=40, **kw), 40)
    torch_trace = _trace(OneCycleLR(_optimizer(0.9), total_steps=40, **kw), 40)
    assert ours == torch_trace
    assert ours[0][0] == pytest.approx(1.0 / 10.0)  # starts at max_lr / div_factor
    with pytest.raises(ValueError, match="total_steps is None"):
        OneCycle(_optimizer(0.9), max_lr=1.0)


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
        lambda opt: WarmupCosine(opt, 3, 15, min_lr_ratio=0.05, warmup_start_factor=0.1),
        lambda opt: OneCycle(opt, max_lr=0.5, total_steps=20),
    ],
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
    assert head + tail == straight  # closed forms: bit-identical, not just close


def _jsonargparse_factory(config: dict) -> Callable:
    parser = ArgumentParser()
    parser.add_argument("--scheduler", type=Callable[[Optimizer], LRScheduler])
    return parser.instantiate(parser.parse_object({"scheduler": config})).scheduler


class LinearToZero(LRScheduler):
    """A scheduler class that needs nothing but the optimizer and its length."""

    def __init__(self, optimizer: Optimizer, total_steps: int | None = None) -> None:
        self.total_steps = total_steps
        super().__init__(optimizer)

    def get_lr(self) -> list[float]:
        return [lr0 * (1 - self.last_epoch / self.total_steps) for lr0 in self.base_lrs]


def test_build_scheduler_injects_total_steps_only_when_unset() -> None:
    unset = functools.partial(WarmupCosine, warmup_steps=2)
    given = functools.partial(WarmupCosine, warmup_steps=2, total_steps=50)
    step = functools.partial(StepLR, step_size=3)
    assert needs_total_steps(unset) and not needs_total_steps(given)
    assert not needs_total_steps(step)
    assert build_scheduler(unset, _optimizer(), 30).total_steps == 30
    assert build_scheduler(given, _optimizer(), 30).total_steps == 50
    assert isinstance(build_scheduler(step, _optimizer(), 30), StepLR)

    # a plain class: its total_steps defaults to None, so it is filled in
    assert needs_total_steps(LinearToZero) and needs_total_steps(OneCycleLR)
    assert build_scheduler(LinearToZero, _optimizer(), 30).total_steps == 30
    with pytest.raises(ValueError, match="max_steps"):
        build_scheduler(unset, _optimizer(), float("inf"))


def test_build_scheduler_with_jsonargparse_factories() -> None:
    path = "dnn_tricks.schedules."
    unset = _jsonargparse_factory({"class_path": path + "OneCycle", "init_args": {"max_lr": 0.1}})
    given = _jsonargparse_factory(
        {"class_path": path + "WarmupCosine", "init_args": {"warmup_steps": 1, "total_steps": 9}}
    )
    step = _jsonargparse_factory(
        {"class_path": "torch.optim.lr_scheduler.StepLR", "init_args": {"step_size": 3}}
    )
    assert build_scheduler(unset, _optimizer(0.9), 40).total_steps == 40
    assert build_scheduler(given, _optimizer(), 40).total_steps == 9
    assert not needs_total_steps(step) and isinstance(
        build_scheduler(step, _optimizer(), 40), StepLR
    )
