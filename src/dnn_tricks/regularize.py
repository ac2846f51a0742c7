"""Regularizers as pure functions on modules and tensors: weight decay groups, L1 / L2
penalties, the Jacobian penalty and the max-norm constraint.

The caller owns the coefficients: every penalty here is the bare sum, so the logged value
(`train/l1`, `train/jacobian`) means the same whatever lambda a config chooses.

Weight-normalized layers (`torch.nn.utils.parametrizations.weight_norm`, W = g v / ||v||;
Salimans & Kingma 2016) are handled as follows, since the scale of v never reaches the output:

- weight decay: g (`original0`) is a per-unit scale like a BatchNorm gamma, so it gets none;
  the direction v (`original1`) is decayed like any weight matrix.
- L1 / L2 penalties act on the effective weight W (what the layer multiplies with), not on
  v: penalizing v only shrinks ||v||, which changes no output and raises v's effective step.
- max-norm clamps |g|, which is exactly the norm of each unit's incoming weights in W.

The deprecated hook form `torch.nn.utils.weight_norm` (`weight_g`, `weight_v`) is treated alike.
"""

from collections.abc import Callable, Iterator

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase  # BatchNorm*, InstanceNorm*, SyncBN, lazy ones
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm

NORM_LAYERS: tuple[type[nn.Module], ...] = (_NormBase, nn.LayerNorm, nn.GroupNorm, nn.RMSNorm)
WEIGHT_LAYERS: tuple[type[nn.Module], ...] = (nn.Linear, nn.modules.conv._ConvNd)


# ---------------------------------------------------------------- weight-norm helpers


def _weight_norm_magnitude(module: nn.Module) -> tuple[Tensor, int] | None:
    """(g, dim) of a weight-normalized `weight`, or None when `weight` is not weight-normalized."""
    if parametrize.is_parametrized(module, "weight"):
        plist = module.parametrizations["weight"]
        if len(plist) == 1 and isinstance(plist[0], _WeightNorm):
            return plist.original0, plist[0].dim
        return None
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _LegacyWeightNorm) and hook.name == "weight":
            return module.weight_g, hook.dim
    return None


def _magnitude_param_ids(model: nn.Module) -> set[int]:
    ids = set()
    for module in model.modules():
        found = _weight_norm_magnitude(module)
        if found is not None:
            ids.add(id(found[0]))
    return ids


def _effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer actually applies, recomputed so gradients reach g and v."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _LegacyWeightNorm) and hook.name == "weight":
            # the hook form caches `weight` from the last forward; recompute it fresh
            return hook.compute_weight(module)
    return module.weight  # plain, or recomputed by the parametrization on access


def _trainable_weight(module: nn.Module) -> bool:
    if parametrize.is_parametrized(module, "weight"):
        return any(p.requires_grad for p in module.parametrizations["weight"].parameters())
    magnitude = _weight_norm_magnitude(module)
    if magnitude is not None:
        return magnitude[0].requires_grad or module.weight_v.requires_grad
    weight = module.weight
    return isinstance(weight, nn.Parameter) and weight.requires_grad


# ---------------------------------------------------------------- weight decay groups


def decay_param_groups(model: nn.Module, decay_norm_and_bias: bool = False) -> list[dict]:
    """Optimizer parameter groups that exempt biases and normalization parameters from decay.

    Decaying a BatchNorm gamma or a bias does not limit capacity (the next norm layer undoes
    the scale) and only pulls them towards 0, so common practice (Goyal et al. 2017, "Bag of
    tricks", He et al. 2019) exempts them. Exempt: parameters of norm layers (`NORM_LAYERS`),
    every parameter with at most one dimension, and weight-norm magnitudes g. Frozen
    parameters (requires_grad False) are left out altogether.

    Args:
        model: the network whose parameters are grouped.
        decay_norm_and_bias: True puts everything in one group (decay on all parameters).

    Returns:
        [{"params": decayed}, {"params": exempt, "weight_decay": 0.0}], without empty groups;
        the first group takes the optimizer's own weight_decay.
    """
    magnitudes = _magnitude_param_ids(model)
    decay: list[nn.Parameter] = []
    exempt: list[nn.Parameter] = []
    seen: set[int] = set()
    for module in model.modules():
        for param in module.parameters(recurse=False):
            if id(param) in seen or not param.requires_grad:
                continue
            seen.add(id(param))
            no_decay = (
                isinstance(module, NORM_LAYERS) or param.dim() <= 1 or id(param) in magnitudes
            )
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
        if not isinstance(module, WEIGHT_LAYERS) or not _trainable_weight(module):
            continue
        weight = _effective_weight(module)
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
    """sum W^2 over `penalized_weights(model)` (a scalar; multiply by lambda yourself).

    Unlike the optimizer's weight_decay, this explicit term is part of the loss, so it is
    logged and, with adaptive optimizers such as Adam, rescaled per parameter.
    """
    return sum((w.pow(2).sum() for w in penalized_weights(model)), _zero(model))


# ---------------------------------------------------------------- Jacobian penalty


def _check_projections(projections: int) -> None:
    if not isinstance(projections, int) or not (projections >= 1 or projections == -1):
        raise ValueError(
            f"jacobian projections={projections!r} is invalid; use an int >= 1 "
            "(random projections) or -1 (exact)"
        )


def _per_sample_sq_frobenius(
    net: Callable[[Tensor], Tensor],
    x: Tensor,
    projections: int,
    create_graph: bool,
    generator: torch.Generator | None,
) -> tuple[Tensor, Tensor]:
    """(||J_i||_F^2 estimate per sample, shape N; logits N x C) with J_i = d net(x)_i / d x_i.

    Summing the projected outputs over the batch before differentiating gives every sample's
    own v_i^T J_i in one backward pass, as samples do not interact (true in eval mode; a
    BatchNorm in train mode couples them and adds small cross-sample terms).
    """
    _check_projections(projections)
    x = x if x.requires_grad else x.detach().clone().requires_grad_(True)
    logits = net(x)
    if logits.dim() != 2:
        raise ValueError(
            f"jacobian penalty needs net outputs of shape N x C, got {tuple(logits.shape)}"
        )
    n, c = logits.shape
    exact = projections == -1
    count = c if exact else projections
    total = torch.zeros(n, device=logits.device, dtype=logits.dtype)
    for k in range(count):
        if exact:
            v = torch.zeros_like(logits)
            v[:, k] = 1.0
        else:
            v = torch.randn(n, c, device=logits.device, dtype=logits.dtype, generator=generator)
            v = v / v.norm(dim=1, keepdim=True)  # uniform on the unit sphere S^{C-1}
        # retain_graph: the caller still backpropagates the loss through `logits`
        (vjp,) = torch.autograd.grad(
            logits, x, v, create_graph=create_graph, retain_graph=True, allow_unused=True
        )
        if vjp is not None:
            total = total + vjp.flatten(1).pow(2).sum(dim=1)
    # E_v ||v^T J||^2 = ||J||_F^2 / C for v uniform on the sphere (Hoffman et al. 2019)
    return (total if exact else total * (c / projections)), logits


def jacobian_penalty(
    net: Callable[[Tensor], Tensor],
    x: Tensor,
    projections: int = 1,
    *,
    generator: torch.Generator | None = None,
) -> tuple[Tensor, Tensor]:
    """Batch mean of ||J(x)||_F^2 with J = d net(x) / d x, differentiable for training.

    Hoffman, Roberts & Yaida 2019, "Robust Learning with Jacobian Regularization": with v
    uniform on the unit sphere in the C output dims, ||J||_F^2 = C E_v ||v^T J||^2, so each
    projection costs one extra backward pass instead of C; one projection per sample is
    enough for reasonable batches. The paper's loss adds (lambda_JR / 2) times this value.

    Args:
        net: maps inputs N x ... to logits N x C.
        x: a batch of inputs of any shape N x ...; it is cloned to require grad when needed.
        projections: random projections per sample (>= 1), or -1 for the exact value
            (C one-hot projections, no sampling).
        generator: optional RNG for the projections, for reproducible estimates.

    Returns:
        (penalty, logits): the estimate (scalar, graph kept so it can be trained through)
        and net(x), so the caller computes its loss from the same forward pass.
    """
    if torch.is_inference_mode_enabled() or not torch.is_grad_enabled():
        raise RuntimeError(
            "jacobian_penalty needs autograd, but it was called under torch.inference_mode() "
            "or torch.no_grad(); use jacobian_norm(...) to measure ||J||_F during validation"
        )
    sq, logits = _per_sample_sq_frobenius(net, x, projections, True, generator)
    return sq.mean(), logits


def jacobian_norm(
    net: Callable[[Tensor], Tensor],
    x: Tensor,
    projections: int = -1,
    *,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Batch mean of ||J(x)||_F (the norm, not squared), detached: a validation metric.

    Works where Lightning validates, under torch.inference_mode(): autograd is switched back
    on locally and the input is cloned outside inference mode, as inference tensors cannot
    enter autograd. The net runs in its current mode (call it in eval mode).
    """
    with torch.inference_mode(False), torch.enable_grad():
        x = x.clone()  # a normal tensor, even if x was created under inference_mode
        sq, _ = _per_sample_sq_frobenius(net, x, projections, False, generator)
        return sq.clamp_min(0.0).sqrt().mean().detach()


# ---------------------------------------------------------------- max-norm constraint


def _clamp_unit_norms(weight: Tensor, groups: int, transposed: bool, max_norm: float) -> None:
    """Scale each output unit's incoming weights in place so its L2 norm is <= max_norm."""
    if transposed:
        # ConvTranspose weight is (in, out / groups, *k): unit (g, j) owns w[g-th in-block, j]
        blocks = weight.view(groups, weight.shape[0] // groups, weight.shape[1], -1)
        norms = blocks.pow(2).sum(dim=(1, 3)).sqrt()  # groups x out_per_group
        scale = (max_norm / norms).clamp(max=1.0)  # exactly 1 for rows already within bound
        blocks.mul_(scale[:, None, :, None])
    else:
        norms = weight.flatten(1).norm(dim=1)
        scale = (max_norm / norms).clamp(max=1.0)
        weight.mul_(scale.view(-1, *([1] * (weight.dim() - 1))))


@torch.no_grad()
def apply_max_norm(model: nn.Module, max_norm: float) -> None:
    """Project every unit's incoming weight vector onto the ball ||w||_2 <= max_norm.

    Srivastava et al. 2014 (dropout paper, section 5.1): call after each optimizer step;
    c of 3 to 4 worked best there. Units are rows of a Linear weight and output filters
    of a Conv (flattened). Biases and norm layers are untouched; weight-normalized layers
    clamp |g|, which is exactly each unit's norm in the effective weight.
    """
    if not max_norm > 0:
        raise ValueError(f"max_norm={max_norm!r} must be > 0 (Srivastava et al. use 3 to 4)")
    for module in model.modules():
        if not isinstance(module, WEIGHT_LAYERS):
            continue
        transposed = bool(getattr(module, "transposed", False))
        magnitude = _weight_norm_magnitude(module)
        if magnitude is not None:
            g, dim = magnitude
            unit_dim = 1 if transposed else 0
            groups = getattr(module, "groups", 1)
            if dim != unit_dim or groups != 1:
                raise ValueError(
                    f"max_norm on a weight-normalized {type(module).__name__} needs "
                    f"weight_norm(dim={unit_dim}) and groups=1 so g is a per-unit norm; "
                    f"got dim={dim}, groups={groups}"
                )
            g.clamp_(-max_norm, max_norm)
        elif parametrize.is_parametrized(module, "weight"):
            raise TypeError(
                f"max_norm cannot project the parametrized weight of {type(module).__name__}; "
                "only weight_norm parametrizations are supported"
            )
        elif not isinstance(module.weight, nn.parameter.UninitializedParameter):
            _clamp_unit_norms(module.weight, getattr(module, "groups", 1), transposed, max_norm)
