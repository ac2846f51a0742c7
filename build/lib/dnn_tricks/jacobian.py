"""The Jacobian of a network's logits with respect to its inputs: a differentiable
penalty for training and a detached norm for validation.

Hoffman, Roberts & Yaida 2019, "Robust Learning with Jacobian Regularization". A small
||J(x)||_F means small input perturbations move the logits little. Used by the
``regularize.Jacobian`` regularizer and the classifier's ``val/jacobian_norm`` metric.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor


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
