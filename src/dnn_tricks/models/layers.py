"""Name-to-layer registries: a string in a config becomes a layer in exactly one place.

One map per family (norm layers, activations), as timm's ``create_norm_layer`` does, so
configs stay strings and a new norm layer is one new entry.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

NORM_CHOICES = ("none", "batch", "layer", "instance", "group", "weight", "iter")


def _batch(num_features: int, spatial: bool, num_groups: int) -> nn.Module:
    return nn.BatchNorm2d(num_features) if spatial else nn.BatchNorm1d(num_features)


def _layer(num_features: int, spatial: bool, num_groups: int) -> nn.Module:
    # For conv features "layer norm" normalizes over (C, H, W) of each sample with a
    # per-channel affine: GroupNorm with one group, as in Wu & He (2018), Fig. 2.
    return nn.GroupNorm(1, num_features) if spatial else nn.LayerNorm(num_features)


def _instance(num_features: int, spatial: bool, num_groups: int) -> nn.Module:
    if not spatial:
        raise ValueError(
            "norm='instance' normalizes each channel over its H x W positions and needs conv "
            "features; use it with ConvNet/ResNet, or pick norm='layer' for an MLP"
        )
    # GroupNorm with one channel per group is instance norm with a learnable affine and
    # no running statistics: train and eval behave the same.
    return nn.GroupNorm(num_features, num_features)


def _group(num_features: int, spatial: bool, num_groups: int) -> nn.Module:
    if num_features % num_groups:
        raise ValueError(
            f"norm='group' with num_groups={num_groups} does not divide {num_features} "
            "features; set num_groups to a divisor of every layer width"
        )
    return nn.GroupNorm(num_groups, num_features)


def _iter(num_features: int, spatial: bool, num_groups: int) -> nn.Module:
    from dnn_tricks.models.iternorm import IterNorm

    return IterNorm(num_features, num_groups=min(num_groups, num_features))


def _identity(num_features: int, spatial: bool, num_groups: int) -> nn.Module:
    # "weight" norm reparametrizes the preceding linear/conv weight (see apply_weight_norm);
    # it adds no layer of its own.
    return nn.Identity()


_NORMS: dict[str, Callable[[int, bool, int], nn.Module]] = {
    "none": _identity,
    "batch": _batch,
    "layer": _layer,
    "instance": _instance,
    "group": _group,
    "weight": _identity,
    "iter": _iter,
}

_ACTIVATIONS: dict[str, Callable[[], nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


def check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """Raise a one-line error naming the config key when ``value`` is not a known name."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is unknown; choose one of: {', '.join(choices)}")


def create_norm_layer(
    name: str, num_features: int, spatial: bool, num_groups: int = 8
) -> nn.Module:
    """The normalization layer ``name`` for ``num_features`` channels (conv if ``spatial``)."""
    check_choice("norm", name, tuple(_NORMS))
    return _NORMS[name](num_features, spatial, num_groups)


def create_activation(name: str) -> nn.Module:
    """A fresh activation module from its config name."""
    check_choice("activation", name, tuple(_ACTIVATIONS))
    return _ACTIVATIONS[name]()


def apply_weight_norm(layer: nn.Module) -> nn.Module:
    """Weight normalization w = g v / ||v|| (Salimans & Kingma 2016) through torch's
    parametrization, one g per output unit (dim 0)."""
    return nn.utils.parametrizations.weight_norm(layer, name="weight", dim=0)
