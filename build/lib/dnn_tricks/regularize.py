"""Regularizers: weight-decay parameter groups, and the regularizer objects a config lists
under ``model.regularizers`` (L1, L2, Jacobian, MaxNorm, or a user's own subclass).

A regularizer is either a term added to the loss (its ``penalty``, logged as
``train/<name>`` exactly as added, weight included) or a constraint applied to the weights
after every optimizer step (``after_step``, e.g. max-norm). One that ``needs_inputs`` (the
Jacobian) gets the batch and the model's forward, and returns the logits with its term so
the classifier does not run the forward twice.

Weight-normalized layers are handled as ``dnn_tricks.weight_norm`` describes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import torch
from torch import Tensor, nn
from torch.nn.utils import parametrize

from dnn_tricks.jacobian import jacobian_norm as jacobian_norm  # val/jacobian_norm metric
from dnn_tricks.jacobian import jacobian_penalty
from dnn_tricks.norm_layers import is_norm_layer
from dnn_tricks.weight_norm import (
    effective_weight,
    magnitude_param_ids,
    trainable_weight,
    weight_norm_magnitude,
)

WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (
    nn.Linear,
    nn.Conv1d,
    nn.Conv2d,
    nn.Conv3d,
    nn.ConvTranspose1d,
    nn.ConvTranspose2d,
    nn.ConvTranspose3d,
)


# ---------------------------------------------------------------- weight decay groups


def decay_param_groups(model: nn.Module, decay_norm_and_bias: bool = False) -> list[dict]:
    """Optimizer parameter groups that exempt biases and normalization parameters from decay.

    Decaying a BatchNorm gamma or a bias does not limit capacity (the next norm layer undoes
    the scale) and only pulls them towards 0, so common practice (Goyal et al. 2017, "Bag of
    tricks", He et al. 2019) exempts them. Exempt: parameters of norm layers (`is_norm_layer`),
    every parameter with at most one dimension, and weight-norm magnitudes g. Frozen
    parameters (requires_grad False) are left out altogether.

    Args:
        model: the network whose parameters are grouped.
        decay_norm_and_bias: True puts everything in one group (decay on all parameters).

    Returns:
        [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}], without empty groups;
        the first group takes the optimizer's own weight_decay.
    """
    magnitudes = magnitude_param_ids(model)
    decay: list[nn.Parameter] = []
    exempt: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            no_decay = is_norm_layer(module) or param.dim() <= 1 or id(param) in magnitudes
            (exempt if no_decay and not decay_norm_and_bias else decay).append(param)
    groups = [{"params": decay}, {"params": exempt, "weight_decay": 0.0}]
    return [group for group in groups if group["params"]]


# ---------------------------------------------------------------- L1 / L2 penalties


def penalized_weights(model: nn.Module) -> Iterator[Tensor]:
    """Yield the weights that L1 / L2 penalties act on: trainable Linear and Conv kernels.

    Biases and norm-layer parameters are left out (they set offsets and scales, not the
    complexity of the function); weight-normalized layers yield their effective weight.
    """
    for module in model.modules():
        if not isinstance(module, WEIGHT_LAYERS) or not trainable_weight(module):
            continue
        weight = effective_weight(module)
        if isinstance(weight, nn.parameter.UninitializedParameter) or weight.dim() < 2:
            continue
        yield weight


def _zero(model: nn.Module) -> Tensor:
    param = next(model.parameters(), None)
    return torch.zeros((), device=param.device if param is not None else None)


def l1_penalty(model: nn.Module) -> Tensor:
    """sum |W| over `penalized_weights(model)` (a scalar; multiply by lambda yourself)."""
    return sum((w.abs().sum() for w in penalized_weights(model)), _zero(model))


def l2_penalty(model: nn.Module) -> Tensor:
    """sum W^2 over `penalized_weights(model)` (a scalar; multiply by lambda yourself)."""
    return sum((w.pow(2).sum() for w in penalized_weights(model)), _zero(model))


# ---------------------------------------------------------------- max-norm constraint


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Project every unit's incoming weight vector onto the ball ||w||_2 <= max_norm.

    Srivastava et al. 2014 (dropout paper, section 5.1): call after each optimizer step;
    c of 3 to 4 worked best there. Units are rows of a Linear weight and output filters
    of a Conv (flattened); ``torch.renorm`` rescales the rows above the bound. Biases, norm
    layers and frozen weights are untouched; weight-normalized layers clamp |g|, which is
    exactly each unit's norm in the effective weight.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} must be > 0 (Srivastava et al. use 3 to 4)")
    for module in model.modules():
        if not isinstance(module, WEIGHT_LAYERS) or not trainable_weight(module):
            continue
        transposed = bool(getattr(module, "transposed", False))
        groups = getattr(module, "groups", 1)
        magnitude = weight_norm_magnitude(module)
        if magnitude is not None:
            g, dim = magnitude
            unit_dim = 1 if transposed else 0
            if dim != unit_dim or groups != 1:
                raise ValueError(
                    f"max_norm on a weight-normalized {type(module).__name__} needs "
                    f"weight_norm(dim={unit_dim}) and groups=1 so g is a per-unit norm; "
                    f"got dim={dim}, groups={groups}"
                )
            g.copy_(torch.renorm(g, 2, dim, max_norm))
        elif parametrize.is_parametrized(module, "weight"):
            raise TypeError(
                f"max_norm cannot project the parametrized weight of {type(module).__name__}; "
                "only weight_norm parametrizations are supported"
            )
        elif not isinstance(module.weight, nn.parameter.UninitializedParameter):
            weight = module.weight
            if transposed:
                # (in, out / groups, *k): output unit j of group g reads w[g's inputs, j]
                weight = weight.unflatten(0, (groups, -1)).flatten(3).transpose(1, 2)
                rows = weight.flatten(2).flatten(0, 1)  # one row per (g, j)
            else:
                rows = weight.flatten(1)
            weight.copy_(torch.renorm(rows, 2, 0, max_norm).view_as(weight))


# ---------------------------------------------------------------- regularizer objects


class Regularizer:
    """One entry of ``model.regularizers``. Subclass it for your own (see
    ``tests/plugins/my_regularizer.py``), overriding one of the three methods below.

    Class attributes a subclass sets:
        name: the logged term, ``train/<name>``; unique within a config.
        needs_inputs: the term depends on the batch; ``penalty_and_logits`` is called.
        after_step: a constraint; ``constrain`` is called after every optimizer step
            instead of adding a term to the loss.
    """

    name: str = "regularizer"
    needs_inputs: bool = False
    after_step: bool = False

    def penalty(self, net: nn.Module) -> Tensor:
        """The term added to the loss (weight included), from the network's parameters."""
        raise NotImplementedError(f"{type(self).__name__} must define penalty(net)")

    def penalty_and_logits(
        self, forward: Callable[[Tensor], Tensor], inputs: Tensor
    ) -> tuple[Tensor, Tensor]:
        """(term added to the loss, logits of ``forward(inputs)``) for input-dependent terms."""
        raise NotImplementedError(f"{type(self).__name__} must define penalty_and_logits")

    def constrain(self, net: nn.Module) -> None:
        """Change the network's weights in place after an optimizer step."""
        raise NotImplementedError(f"{type(self).__name__} must define constrain(net)")

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


def _check_weight(owner: str, weight: float) -> float:
    if not weight >= 0:
        raise ValueError(f"{owner} weight={weight} must be >= 0")
    return float(weight)


class L1(Regularizer):
    """L1 penalty ``weight * sum |W|`` over Linear and Conv kernels (not biases, not norm
    layers), logged ``train/l1``; pushes weights to exactly zero (sparse connections).

    Args:
        weight: lambda, the coefficient of the penalty.
    """

    name = "l1"

    def __init__(self, weight: float) -> None:
        self.weight = _check_weight("L1", weight)

    def penalty(self, net: nn.Module) -> Tensor:
        return self.weight * l1_penalty(net)


class L2(Regularizer):
    """Explicit L2 penalty ``weight * sum W^2`` over Linear and Conv kernels, logged
    ``train/l2``. Unlike the optimizer's weight_decay it is part of the logged loss, and
    adaptive optimizers such as Adam rescale its gradient per parameter.

    Args:
        weight: lambda, the coefficient of the penalty.
    """

    name = "l2"

    def __init__(self, weight: float) -> None:
        self.weight = _check_weight("L2", weight)

    def penalty(self, net: nn.Module) -> Tensor:
        return self.weight * l2_penalty(net)


class Jacobian(Regularizer):
    """Jacobian penalty ``(weight / 2) * mean ||d logits / d x||_F^2`` (Hoffman et al. 2019),
    logged ``train/jacobian``: smooths the function around the training inputs. Each random
    projection costs one extra backward pass; the logits of the same forward feed the loss.

    Args:
        weight: lambda_JR of the paper (the term is lambda_JR / 2 times the squared norm).
        projections: random projections per sample for the estimate (1 is unbiased and
            usually enough); -1 computes it exactly (one backward per class).
    """

    name = "jacobian"
    needs_inputs = True

    def __init__(self, weight: float, projections: int = 1) -> None:
        self.weight = _check_weight("Jacobian", weight)
        if not isinstance(projections, int) or not (projections >= 1 or projections == -1):
            raise ValueError(
                f"Jacobian projections={projections!r} must be a count >= 1 or -1 (exact)"
            )
        self.projections = projections

    def penalty_and_logits(
        self, forward: Callable[[Tensor], Tensor], inputs: Tensor
    ) -> tuple[Tensor, Tensor]:
        squared, logits = jacobian_penalty(forward, inputs, self.projections)
        return 0.5 * self.weight * squared, logits


class MaxNorm(Regularizer):
    """Max-norm constraint (Srivastava et al. 2014, sec. 5.1): after every optimizer step,
    each unit's incoming weight vector is scaled back onto ||w||_2 <= c (``torch.renorm``).
    Nothing is added to the loss.

    Args:
        c: the bound; 3 to 4 worked best in the paper (with dropout and a high LR).
    """

    name = "max_norm"
    after_step = True

    def __init__(self, c: float) -> None:
        if not c > 0:
            raise ValueError(f"MaxNorm c={c} must be > 0 (Srivastava et al. use 3 to 4)")
        self.c = float(c)

    def constrain(self, net: nn.Module) -> None:
        apply_max_norm(net, self.c)


def check_regularizers(regularizers: Sequence[Regularizer] | None) -> list[Regularizer]:
    """``model.regularizers`` as a list, checked: Regularizer objects with distinct names
    (each logs its term as ``train/<name>``)."""
    found = list(regularizers or ())
    for reg in found:
        if not isinstance(reg, Regularizer):
            raise TypeError(
                f"model.regularizers entries must be dnn_tricks.regularize.Regularizer objects "
                f"(class_path + init_args), got {reg!r}"
            )
    names = [reg.name for reg in found]
    repeated = sorted({name for name in names if names.count(name) > 1})
    if repeated:
        raise ValueError(
            f"model.regularizers has more than one term named {', '.join(repeated)}; list "
            "each once (a subclass of your own sets its own name)"
        )
    return found
