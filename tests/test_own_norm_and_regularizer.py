"""Adding your own trick: the norm layer and the regularizer of tests/plugins, each one small
module plus a YAML overlay, run through ``trainer fit`` exactly as the README shows, and
checked against hand computations."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from callback_helpers import read_events
from plugins.my_norm import MeanOnlyBatchNorm
from plugins.my_regularizer import SoftOrthogonality

from conftest import CONFIGS, REPO, shrink_args
from dnn_tricks.callbacks.norm_stats import describe_unhealthy
from dnn_tricks.callbacks.precise_bn import recompute_statistics
from dnn_tricks.models.nets import MLP
from dnn_tricks.norm_layers import running_stat_layers

PLUGINS = REPO / "tests" / "plugins"


# ---------------------------------------------------------------- the norm layer


def test_mean_only_batch_norm_against_hand_computation():
    layer = MeanOnlyBatchNorm(3, momentum=0.25)
    with torch.no_grad():
        layer.bias.copy_(torch.tensor([1.0, -1.0, 0.5]))
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    out = layer.double()(x)
    mean = x.numpy().mean(axis=(0, 2, 3))
    bias = np.array([1.0, -1.0, 0.5])[None, :, None, None]
    np.testing.assert_allclose(out.detach().numpy(), x.numpy() - mean[None, :, None, None] + bias)
    np.testing.assert_allclose(layer.running_mean.numpy(), 0.25 * mean)  # (1 - m) 0 + m mean
    layer.eval()
    single = x[:1]
    expected = single.numpy() - 0.25 * mean[None, :, None, None] + bias
    np.testing.assert_allclose(layer(single).detach().numpy(), expected)


def test_the_running_stat_callbacks_look_after_it():
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=(5,), norm="plugins.my_norm.MeanOnlyBatchNorm").double()
    ((name, layer),) = running_stat_layers(model)
    assert name == "layers.1.norm" and isinstance(layer, MeanOnlyBatchNorm)

    # PreciseBN: the running mean becomes the plain average of the batch means it sees
    batches = [torch.randn(16, 6, dtype=torch.float64) * 2 + 1 for _ in range(4)]
    used = recompute_statistics(model, iter(batches), model, num_batches=4)
    with torch.no_grad():
        means = [model.layers[1].linear(b).mean(0).numpy() for b in batches]
    assert used == 4 and layer.momentum == 0.1  # momentum restored
    np.testing.assert_allclose(layer.running_mean.numpy(), np.mean(means, axis=0), rtol=1e-12)

    # RunningStatsCheck's health check names it when its statistics break
    layer.running_mean[2] = float("inf")
    assert describe_unhealthy([(name, layer)]) == [
        "layers.1.norm: running_mean has 0 NaN and 1 inf of 5"
    ]


def test_fit_through_the_cli_with_the_norm_by_class_path(run_cli, tmp_path):
    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "digits.yaml",
            "--config",
            PLUGINS / "my_norm.yaml",
            *shrink_args(tmp_path / "logs", epochs=1, batches=3),
        ]
    )
    (run,) = (tmp_path / "logs").glob("*/version_0")
    saved = (run / "config.yaml").read_text()
    assert "plugins.my_norm.MeanOnlyBatchNorm" in saved
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["state_dict"]
    norm_keys = sorted(k for k in state if ".norm." in k)
    assert norm_keys == [
        "net.layers.1.norm.bias",
        "net.layers.1.norm.running_mean",
        "net.layers.2.norm.bias",
        "net.layers.2.norm.running_mean",
    ]
    # three training steps at momentum 0.05 moved the running means off their zero start
    assert state["net.layers.1.norm.running_mean"].abs().max() > 0


# ---------------------------------------------------------------- the regularizer


def test_soft_orthogonality_against_numpy():
    torch.manual_seed(0)
    net = torch.nn.Sequential(
        torch.nn.Conv2d(2, 3, 3), torch.nn.Flatten(), torch.nn.Linear(12, 20)
    ).double()
    expected = 0.0
    for kernel in (net[0].weight, net[2].weight):
        w = kernel.detach().numpy().reshape(len(kernel), -1)
        gram = w @ w.T if w.shape[0] <= w.shape[1] else w.T @ w  # 3x3, then 12x12
        expected += ((gram - np.eye(len(gram))) ** 2).sum()
    reg = SoftOrthogonality(weight=0.01)
    assert reg.penalty(net).item() == pytest.approx(0.01 * expected, rel=1e-12)
    # an orthogonal kernel costs nothing
    q = torch.nn.Linear(4, 4, bias=False).double()
    torch.nn.init.orthogonal_(q.weight)
    assert reg.penalty(q).item() == pytest.approx(0.0, abs=1e-12)


def test_fit_through_the_cli_with_the_regularizer_by_class_path(run_cli, tmp_path):
    c = 0.5  # binds: the digits MLP's first layer starts with rows of norm about 0.58
    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "digits.yaml",
            "--config",
            PLUGINS / "my_regularizer.yaml",
            f"--model.regularizers+={{class_path: dnn_tricks.regularize.MaxNorm, "
            f"init_args: {{c: {c}}}}}",
            *shrink_args(tmp_path / "logs", epochs=2, batches=3),
        ]
    )
    (run,) = (tmp_path / "logs").glob("*/version_0")
    events = read_events(run)
    scalars = {tag: [e.value for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    ortho, l2 = (np.array(scalars[f"train/{n}_epoch"]) for n in ("orthogonality", "l2"))
    assert len(ortho) == 2 and (ortho > 0).all() and (l2 > 0).all()
    # the terms are in the loss exactly as logged; the max-norm constraint adds none
    gap = np.array(scalars["train/loss_epoch"]) - np.array(scalars["train/data_loss"])
    np.testing.assert_allclose(gap, ortho + l2, rtol=1e-4)
    state = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    weights = [v for k, v in state.items() if k.endswith("linear.weight")]
    weights.append(state["net.layers.3.weight"])
    norms = [w.norm(dim=1).max().item() for w in weights]
    assert max(norms) <= c + 1e-5
    assert norms[0] == pytest.approx(c, rel=1e-5)  # the constraint was active
