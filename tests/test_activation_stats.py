"""ActivationStats: the statistics against NumPy, dead ReLUs found in a fit, the schedule."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from callback_helpers import digits_model, fit, one_thread, read_events

from dnn_tricks.callbacks.activation_stats import ActivationStats, activation_summary


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_summary_matches_numpy_for_conv_maps():
    g = torch.Generator().manual_seed(0)
    a = torch.relu(torch.randn(6, 3, 4, 4, generator=g))
    a[:, 1] = 0.0  # channel 1 dead on the whole batch
    a[0, 2] = 0.0  # channel 2 zero for one sample only: not dead
    mean, std, zero_frac, dead_frac = activation_summary(a, zero_threshold=0.0).tolist()
    x = a.numpy().astype(np.float64)
    assert mean == pytest.approx(x.mean(), rel=1e-6)
    assert std == pytest.approx(x.std(ddof=1), rel=1e-5)
    assert zero_frac == pytest.approx((x == 0).mean(), rel=1e-6)
    assert dead_frac == pytest.approx(1 / 3)


def test_dead_relus_are_found_and_logged_every_n_steps(tmp_path):
    model = digits_model(norm="none")
    with torch.no_grad():  # planted: pre-activations of layer 1 far below zero
        model.net.layers[1].linear.bias.fill_(-1e3)
    stats = ActivationStats(every_n_steps=3, modules=["ReLU"])
    trainer, _, _ = fit([stats], tmp_path, model=model, epochs=1, batches=7)

    assert stats.last["net.layers.1.act"]["dead_frac"] == 1.0
    assert stats.last["net.layers.1.act"]["zero_frac"] == 1.0
    # layer 2 sees all-zero inputs, so each of its units is constant (relu of its bias):
    # units are dead or alive on the whole batch, nothing in between
    layer2 = stats.last["net.layers.2.act"]
    assert layer2["zero_frac"] == pytest.approx(layer2["dead_frac"])

    events = read_events(trainer.log_dir)
    steps = [e.step for e in events.Scalars("act_dead_frac/net.layers.1.act")]
    assert steps == [0, 3, 6]  # global steps that are multiples of 3, recorded once each
    assert {f"act_{s}/net.layers.2.act" for s in ("mean", "std", "zero_frac")} <= set(
        events.Tags()["scalars"]
    )


def test_modules_that_match_nothing_fail_at_setup():
    with pytest.raises(ValueError, match="modules=.*match no module"):
        fit([ActivationStats(modules=["Conv3d"])], epochs=1, batches=1)


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [({"every_n_steps": 0}, "every_n_steps"), ({"modules": "ReLU"}, "modules")],
)
def test_misconfiguration_names_the_argument(kwargs, key):
    with pytest.raises(ValueError, match=key):
        ActivationStats(**kwargs)
