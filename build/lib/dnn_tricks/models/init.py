"""Weight initialisation schemes selected by name in the config."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dnn_tricks.models.layers import check_choice

INIT_CHOICES = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
)


def _kaiming(fn: Callable[..., Tensor], nonlinearity: str) -> Callable[[Tensor], Tensor]:
    # fan_in mode keeps the forward activations' variance (He et al. 2015): Var(W) = 2 / fan_in
    # for ReLU. Other activations use their own gain where torch knows one.
    known = {"relu", "leaky_relu", "tanh", "sigmoid", "linear", "selu"}
    act = nonlinearity if nonlinearity in known else "relu"
    return lambda w: fn(w, mode="fan_in", nonlinearity=act)


def init_weights(module: nn.Module, scheme: str, nonlinearity: str = "relu") -> None:
    """Initialise every Linear/Conv weight of ``module`` with ``scheme``, biases to zero.

    ``default`` keeps PyTorch's own initialisation (Kaiming uniform with a = sqrt(5)).
    Xavier (Glorot & Bengio 2010) gives Var(W) = 2 / (fan_in + fan_out); Kaiming (He et al.
    2015) gives Var(W) = 2 / fan_in; orthogonal (Saxe et al. 2014) gives W^T W = I on the
    flattened weight (rows or columns, whichever is shorter).
    """
    check_choice("init", scheme, INIT_CHOICES)
    if scheme == "default":
        return
    schemes: dict[str, Callable[[Tensor], Tensor]] = {
        "xavier_uniform": nn.init.xavier_uniform_,
        "xavier_normal": nn.init.xavier_normal_,
        "kaiming_uniform": _kaiming(nn.init.kaiming_uniform_, nonlinearity),
        "kaiming_normal": _kaiming(nn.init.kaiming_normal_, nonlinearity),
        "orthogonal": nn.init.orthogonal_,
    }
    for layer in module.modules():
        if isinstance(layer, (nn.Linear, nn.Conv1d, nn.Conv2d)) and layer.weight.requires_grad:
            weight = schemes[scheme](torch.empty_like(layer.weight))
            with torch.no_grad():
                if parametrize.is_parametrized(layer, "weight"):
                    # Assigning goes through weight norm's right_inverse: g = ||w||, v = w.
                    layer.weight = weight
                else:
                    layer.weight.copy_(weight)
            if layer.bias is not None:
                nn.init.zeros_(layer.bias)
