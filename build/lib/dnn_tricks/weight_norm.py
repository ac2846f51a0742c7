"""Weight-normalized layers seen from outside: their magnitude g, their effective weight.

Both of torch's forms are recognised: the parametrization
(``torch.nn.utils.parametrizations.weight_norm``: ``original0`` = g, ``original1`` = v) and
the deprecated hook (``torch.nn.utils.weight_norm``: ``weight_g``, ``weight_v``).

W = g v / ||v|| (Salimans & Kingma 2016): the scale of v never reaches the output, so the
regularizers (``regularize``) treat the two parts as follows:

- weight decay: g is a per-unit scale like a BatchNorm gamma, so it gets none; the
  direction v is decayed like any weight matrix.
- L1 / L2 penalties act on the effective weight W (what the layer multiplies with), not on
  v: penalizing v only shrinks ||v||, which changes no output and raises v's effective step.
- max-norm clamps |g|, which is exactly the norm of each unit's incoming weights in W.
"""

from __future__ import annotations

from torch import Tensor, nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import _WeightNorm  # no public class to test against
from torch.nn.utils.weight_norm import WeightNorm as _LegacyWeightNorm


def weight_norm_magnitude(module: nn.Module) -> tuple[Tensor, int] | None:
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


def magnitude_param_ids(model: nn.Module) -> set[int]:
    """ids of every weight-norm magnitude g in ``model``."""
    ids = set()
    for module in model.modules():
        found = weight_norm_magnitude(module)
        if found is not None:
            ids.add(id(found[0]))
    return ids


def effective_weight(module: nn.Module) -> Tensor:
    """The weight the layer actually applies, recomputed so gradients reach g and v."""
    for hook in module._forward_pre_hooks.values():
        if isinstance(hook, _LegacyWeightNorm) and hook.name == "weight":
            # the hook form caches `weight` from the last forward; recompute it fresh
            return hook.compute_weight(module)
    return module.weight  # plain, or recomputed by the parametrization on access


def trainable_weight(module: nn.Module) -> bool:
    """Whether the optimizer can change the layer's weight (through g and v if normalized)."""
    if parametrize.is_parametrized(module, "weight"):
        return any(p.requires_grad for p in module.parametrizations["weight"].parameters())
    magnitude = weight_norm_magnitude(module)
    if magnitude is not None:
        return magnitude[0].requires_grad or module.weight_v.requires_grad
    weight = module.weight
    return isinstance(weight, nn.Parameter) and weight.requires_grad
