"""Initialisation schemes and weight norm against their published formulas.

Xavier (Glorot & Bengio 2010): Var(W) = 2 / (fan_in + fan_out); Kaiming (He et al. 2015):
Var(W) = gain^2 / fan_in with gain^2 = 2 for ReLU; orthogonal (Saxe et al. 2014); weight
norm (Salimans & Kingma 2016): w = g v / ||v||. Variances are checked on layers with
~10^5 weights, where the sampling error of the variance is well under 1%.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from dnn_tricks.models.init import INIT_CHOICES, init_weights
from dnn_tricks.models.nets import MLP, ConvNet
from dnn_tricks.models.resnet import ResNet

FAN_IN, FAN_OUT = 400, 300


def _linear_weight(scheme: str, activation: str = "relu") -> torch.Tensor:
    torch.manual_seed(0)
    model = MLP((FAN_IN,), 2, hidden=(FAN_OUT,), init=scheme, activation=activation)
    return model.layers[1].linear.weight.detach()


def _kurtosis(w: torch.Tensor) -> float:
    z = (w - w.mean()) / w.std()
    return z.pow(4).mean().item()


@pytest.mark.parametrize(
    ("scheme", "variance", "kurtosis"),
    [
        ("xavier_uniform", 2 / (FAN_IN + FAN_OUT), 1.8),
        ("xavier_normal", 2 / (FAN_IN + FAN_OUT), 3.0),
        ("kaiming_uniform", 2 / FAN_IN, 1.8),
        ("kaiming_normal", 2 / FAN_IN, 3.0),
        ("default", 1 / (3 * FAN_IN), 1.8),  # torch: U(-1/sqrt(fan_in), 1/sqrt(fan_in))
    ],
)
def test_linear_weights_have_the_documented_variance_and_distribution(scheme, variance, kurtosis):
    w = _linear_weight(scheme)
    assert w.shape == (FAN_OUT, FAN_IN)
    assert abs(w.var().item() / variance - 1) < 0.03
    assert abs(w.mean().item()) < 3 * math.sqrt(variance / w.numel())
    # Uniform has kurtosis 1.8, Gaussian 3: tells the _uniform and _normal variants apart.
    assert abs(_kurtosis(w) - kurtosis) < 0.1


def test_kaiming_uses_the_activations_gain():
    # torch's gain for tanh is 5/3 (nn.init.calculate_gain documentation).
    w = _linear_weight("kaiming_normal", activation="tanh")
    assert abs(w.var().item() / ((5 / 3) ** 2 / FAN_IN) - 1) < 0.03


@pytest.mark.parametrize(
    ("scheme", "variance"),
    [
        ("xavier_normal", lambda fan_in, fan_out: 2 / (fan_in + fan_out)),
        ("kaiming_uniform", lambda fan_in, fan_out: 2 / fan_in),
    ],
)
def test_conv_fans_include_the_kernel_area(scheme, variance):
    torch.manual_seed(0)
    model = ConvNet((1, 8, 8), 2, channels=(96, 128), convs_per_stage=1, init=scheme)
    conv = model.features[1][0].conv
    w = conv.weight.detach()
    fan_in, fan_out = 96 * 9, 128 * 9
    assert abs(w.var().item() / variance(fan_in, fan_out) - 1) < 0.03


@pytest.mark.parametrize(("fan_in", "fan_out"), [(400, 300), (300, 400)])
def test_orthogonal_weights_have_orthonormal_rows_or_columns(fan_in, fan_out):
    model = MLP((fan_in,), 2, hidden=(fan_out,), init="orthogonal")
    w = model.layers[1].linear.weight.detach().double()
    gram = w @ w.T if fan_out <= fan_in else w.T @ w  # the smaller Gram matrix is I
    torch.testing.assert_close(
        gram, torch.eye(min(fan_in, fan_out), dtype=torch.float64), atol=1e-5, rtol=0
    )


def test_orthogonal_conv_weights_are_orthogonal_once_flattened():
    model = ResNet((3, 16, 16), 10, depth=8, width=8, init="orthogonal")
    w = model.features.stage1[0].branch.conv1.weight.detach().flatten(1).double()  # 8 x 72
    torch.testing.assert_close(w @ w.T, torch.eye(8, dtype=torch.float64), atol=1e-5, rtol=0)


@pytest.mark.parametrize("scheme", [s for s in INIT_CHOICES if s != "default"])
def test_every_scheme_zeroes_biases_and_leaves_norm_layers_alone(scheme):
    model = ConvNet((1, 8, 8), 2, channels=(4,), norm="batch", hidden=(6,), init=scheme)
    for module in model.modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)) and module.bias is not None:
            assert torch.count_nonzero(module.bias) == 0
        if isinstance(module, nn.BatchNorm2d):
            assert torch.equal(module.weight, torch.ones_like(module.weight))


def test_default_keeps_pytorchs_nonzero_biases():
    model = MLP((FAN_IN,), 2, hidden=(FAN_OUT,), init="default")
    assert torch.count_nonzero(model.layers[1].linear.bias) > 0


def test_resnet_default_is_he_initialisation():
    model = ResNet((3, 32, 32), 10, depth=8, width=64)  # He et al. 2016 use their 2015 init
    w = model.features.stage3[0].branch.conv2.weight.detach()  # 256 x 256 x 3 x 3
    assert abs(w.var().item() / (2 / (256 * 9)) - 1) < 0.03


def test_unknown_scheme_names_the_key():
    with pytest.raises(ValueError, match="init='glorot' is unknown; choose one of: default"):
        init_weights(nn.Linear(2, 2), "glorot")


# -- weight norm -----------------------------------------------------------------------------


def _weight_norm_layer(model: nn.Module) -> nn.Module:
    return next(
        m for m in model.modules() if isinstance(m, nn.Linear) and hasattr(m, "parametrizations")
    )


@pytest.mark.parametrize("scheme", ["default", "kaiming_normal", "orthogonal"])
def test_weight_norm_splits_w_into_g_and_direction_with_g_equal_to_the_norm(scheme):
    torch.manual_seed(0)
    model = MLP((FAN_IN,), 2, hidden=(FAN_OUT,), norm="weight", init=scheme)
    layer = _weight_norm_layer(model)
    g = layer.parametrizations.weight.original0.detach()
    v = layer.parametrizations.weight.original1.detach()
    w = layer.weight.detach()
    assert g.shape == (FAN_OUT, 1) and v.shape == (FAN_OUT, FAN_IN)
    # At initialisation g = ||w|| per output unit (and v = w), so the net starts as initialised.
    torch.testing.assert_close(g, w.norm(dim=1, keepdim=True))
    torch.testing.assert_close(v, w)
    # w = g v / ||v|| stays true after g and v move apart.
    with torch.no_grad():
        layer.parametrizations.weight.original0.mul_(torch.rand(FAN_OUT, 1) + 0.5)
        layer.parametrizations.weight.original1.add_(torch.randn(FAN_OUT, FAN_IN))
    g = layer.parametrizations.weight.original0.detach()
    v = layer.parametrizations.weight.original1.detach()
    torch.testing.assert_close(layer.weight.detach(), g * v / v.norm(dim=1, keepdim=True))


def test_weight_norm_keeps_the_schemes_variance():
    torch.manual_seed(0)
    model = MLP((FAN_IN,), 2, hidden=(FAN_OUT,), norm="weight", init="kaiming_normal")
    w = _weight_norm_layer(model).weight.detach()
    assert abs(w.var().item() / (2 / FAN_IN) - 1) < 0.03


def test_weight_norm_gradient_flows_to_g_and_v():
    model = ConvNet((1, 8, 8), 2, channels=(4,), hidden=(6,), norm="weight", init="xavier_normal")
    model(torch.randn(3, 1, 8, 8)).sum().backward()
    conv = model.features[0][0].conv
    assert conv.parametrizations.weight.original0.grad is not None
    assert conv.parametrizations.weight.original1.grad.abs().sum() > 0
