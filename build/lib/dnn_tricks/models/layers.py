"""Norm layers and activations from a config value, built in exactly one place.

As timm's ``get_norm_layer`` does, a value is a registered short name, a class path, or a
partial: a class path with keyword arguments (eps, momentum, affine...). A norm or
activation the project never heard of plugs in by class path, with no edit here::

    norm: batch                                   # a registered name (NORM_CHOICES)
    norm: torch.nn.RMSNorm                        # a class path
    norm:                                         # a partial
      class_path: torch.nn.GroupNorm
      init_args: {num_groups: 4}
    activation: {class_path: torch.nn.LeakyReLU, init_args: {negative_slope: 0.2}}

From Python, a class or a ``functools.partial`` works too.

How a norm class is built for ``C`` features: ``C`` fills the first constructor parameter
the partial leaves unset (``num_features`` of BatchNorm2d, ``num_channels`` of GroupNorm
once ``num_groups`` is given, ``normalized_shape`` of LayerNorm and RMSNorm). The layer
sees ``(N, C)`` after a linear layer and ``(N, C, H, W)`` after a conv, with one exception:
a class whose feature parameter is ``normalized_shape`` follows torch's convention of
normalizing the trailing dims, so after a conv it is given each position's channel vector
``(N, H, W, C)`` (as ConvNeXt's LayerNorm2d, Liu et al. 2022), not the image width.
A class that cannot take the features it is given (BatchNorm2d after a linear layer) is
reported when the net is built, naming the key.

Not jsonargparse's ``Callable[[int], nn.Module]``: its partials bind the feature count to
the class's first positional parameter, which for torch.nn.GroupNorm is ``num_groups``.
"""

from __future__ import annotations

import functools
import inspect
import pkgutil
from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import Tensor, nn

# A config value: a registered name or class path (str), or {class_path, init_args} (dict).
LayerSpec = str | dict[str, Any]

NORM_CHOICES = ("none", "batch", "layer", "instance", "group", "weight", "iter")

# "weight" norm reparametrizes the preceding linear/conv weight (see apply_weight_norm).
_NO_LAYER = ("none", "weight")


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

_ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "leaky_relu": nn.LeakyReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "tanh": nn.Tanh,
    "sigmoid": nn.Sigmoid,
}


class ChannelsLast(nn.Module):
    """Applies a trailing-dims norm (LayerNorm, RMSNorm) to each position's channels:
    (N, C, H, W) -> (N, H, W, C) -> norm -> back."""

    def __init__(self, norm: nn.Module) -> None:
        super().__init__()
        self.norm = norm

    def forward(self, x: Tensor) -> Tensor:
        return self.norm(x.movedim(1, -1)).movedim(-1, 1)


def check_choice(key: str, value: str, choices: tuple[str, ...] | list[str]) -> None:
    """Raise a one-line error naming the config key when ``value`` is not a known name."""
    if value not in choices:
        raise ValueError(f"{key}={value!r} is unknown; choose one of: {', '.join(choices)}")


def _label(spec: Any) -> str:
    if isinstance(spec, Mapping):
        return repr(spec.get("class_path"))
    if isinstance(spec, functools.partial):
        return _label(spec.func)
    return repr(spec) if isinstance(spec, str) else getattr(spec, "__qualname__", repr(spec))


def _resolve(spec: Any, key: str, names: Mapping[str, Any]) -> tuple[Callable, tuple, dict]:
    """(class, bound positional args, bound keyword args) of a class path, a
    {class_path, init_args} dict, a class or a functools.partial."""
    if isinstance(spec, Mapping):
        if "class_path" not in spec or set(spec) - {"class_path", "init_args"}:
            raise ValueError(
                f"{key} as a mapping takes class_path and init_args, got keys {sorted(spec)}"
            )
        target, args, kwargs = _resolve(spec["class_path"], key, names)
        return target, args, {**kwargs, **(spec.get("init_args") or {})}
    if isinstance(spec, str):
        hint = f"choose one of: {', '.join(names)}, or a class path such as torch.nn.RMSNorm"
        if "." not in spec:
            raise ValueError(f"{key}={spec!r} is unknown; {hint}")
        try:
            return pkgutil.resolve_name(spec), (), {}
        except (ImportError, AttributeError, ValueError) as error:
            raise ValueError(f"{key}={spec!r} cannot be imported ({error}); {hint}") from None
    if isinstance(spec, functools.partial):
        return spec.func, spec.args, dict(spec.keywords)
    if callable(spec):
        return spec, (), {}
    raise TypeError(f"{key}={spec!r} must be a name, a class path or a partial")


def _build(
    spec: Any, key: str, names: Mapping[str, Any], features: int | None
) -> tuple[nn.Module, str | None]:
    """(layer, parameter name ``features`` went to, None if positional or not given):
    ``features`` fills the first parameter the partial leaves unset."""
    target, args, kwargs = _resolve(spec, key, names)
    try:
        params = list(inspect.signature(target).parameters.values())[len(args) :]
    except (TypeError, ValueError):  # no introspectable signature: pass it positionally
        params = []
    slot = None
    if features is not None:
        kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
        free = [p for p in params if p.name not in kwargs and p.kind is not p.VAR_KEYWORD]
        slot = free[0].name if free and free[0].kind in kinds else None
        args, kwargs = (args, {**kwargs, slot: features}) if slot else ((*args, features), kwargs)
    try:
        layer = target(*args, **kwargs)
    except (TypeError, ValueError) as error:
        what = f" for {features} features" if features is not None else ""
        raise ValueError(f"{key}={_label(spec)} cannot be built{what}: {error}") from None
    if not isinstance(layer, nn.Module):
        raise ValueError(f"{key}={_label(spec)} must build an nn.Module, got {type(layer)}")
    return layer, slot


def _check_accepts(layer: nn.Module, features: int, spatial: bool, key: str, spec: Any) -> None:
    """A dry forward in eval mode (running statistics untouched): report a layer that
    cannot take the features it is placed after now, not at the first training step."""
    shape = (2, features, 2, 2) if spatial else (2, features)
    training = layer.training
    try:
        with torch.no_grad():
            layer.eval()(torch.zeros(shape))
    except (RuntimeError, ValueError) as error:
        where = "a conv (N, C, H, W)" if spatial else "a linear layer (N, C)"
        first = str(error).strip().splitlines()[0]
        raise ValueError(
            f"{key}={_label(spec)} cannot normalize the features of {where} ({first}); "
            "pick a class for that input, e.g. BatchNorm2d after convs and BatchNorm1d "
            "after linear layers (ConvNet: fc_norm)"
        ) from None
    finally:
        layer.train(training)


def adds_norm_layer(norm: Any) -> bool:
    """Whether ``norm`` puts a layer of its own after the linear/conv (none/weight do not)."""
    return not (isinstance(norm, str) and norm in _NO_LAYER)


def uses_weight_norm(norm: Any) -> bool:
    """Whether ``norm`` reparametrizes the weight of the preceding layer instead."""
    return isinstance(norm, str) and norm == "weight"


def create_norm_layer(
    norm: Any, num_features: int, spatial: bool, num_groups: int = 8, key: str = "norm"
) -> nn.Module:
    """The norm layer for ``num_features`` channels (conv features if ``spatial``).

    ``norm`` is a registered name (NORM_CHOICES; ``num_groups`` serves group and iter), a
    class path, a {class_path, init_args} mapping, a class or a partial (module docstring).
    """
    if isinstance(norm, str) and norm in _NORMS:
        return _NORMS[norm](num_features, spatial, num_groups)
    layer, slot = _build(norm, key, _NORMS, num_features)
    if spatial and slot == "normalized_shape":
        layer = ChannelsLast(layer)
    _check_accepts(layer, num_features, spatial, key, norm)
    return layer


def create_activation(activation: Any, key: str = "activation") -> nn.Module:
    """A fresh activation module from a registered name, class path or partial."""
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return _ACTIVATIONS[activation]()
    return _build(activation, key, _ACTIVATIONS, None)[0]


def activation_name(activation: Any) -> str:
    """The registered name of an activation (init schemes pick their gain by it), else the
    lower-cased class name."""
    if isinstance(activation, str) and activation in _ACTIVATIONS:
        return activation
    cls = type(create_activation(activation))
    found = [name for name, known in _ACTIVATIONS.items() if known is cls]
    return found[0] if found else cls.__name__.lower()


def apply_weight_norm(layer: nn.Module) -> nn.Module:
    """Weight normalization w = g v / ||v|| (Salimans & Kingma 2016) through torch's
    parametrization, one g per output unit (dim 0)."""
    return nn.utils.parametrizations.weight_norm(layer, name="weight", dim=0)
