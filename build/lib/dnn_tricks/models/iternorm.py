"""Iterative batch whitening (IterNorm).

Huang, Zhou, Zhu, Liu & Shao (2019), "Iterative Normalization: Beyond Standardization
towards Efficient Whitening", CVPR. Batch norm only standardizes each channel; IterNorm
also decorrelates the channels of a group, yet avoids the eigendecomposition of
Decorrelated BN (Huang et al. 2018) by approximating Sigma^{-1/2} with a few Newton
iterations, which are plain matrix products and backpropagate cheaply and stably.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

_HALF = (torch.float16, torch.bfloat16)


def newton_inverse_sqrt(sigma: Tensor, iterations: int) -> Tensor:
    """Approximate ``sigma^{-1/2}`` for a batch of SPD matrices (G x d x d).

    Huang et al. (2019), Algorithm 1: Sigma_N = Sigma / tr(Sigma); P_0 = I;
    P_{k+1} = 1.5 P_k - 0.5 P_k^3 Sigma_N; W = P_T / sqrt(tr(Sigma)). Dividing by the trace
    puts every eigenvalue of Sigma_N in (0, 1], where the iteration converges; stopping at T
    steps leaves small-eigenvalue directions only partly whitened, which the paper argues
    is a useful middle ground between standardization and full whitening.

    The paper's one-matrix recursion amplifies rounding errors once Sigma is ill-conditioned
    (it blew up after 10-15 steps on a covariance with condition number 2e4, even in
    float64). We run the coupled Newton-Schulz form instead (Higham 2008, "Functions of
    Matrices", Ch. 6): Y_0 = Sigma_N, Z_0 = I, M = (3I - Z_k Y_k) / 2, Y_{k+1} = Y_k M,
    Z_{k+1} = M Z_k. Since Y_k = Sigma_N Z_k, Z_k is exactly the paper's P_k in exact
    arithmetic, for the same three matrix products per step, but it stays stable.
    """
    trace = sigma.diagonal(dim1=-2, dim2=-1).sum(-1)[:, None, None]
    y = sigma / trace
    eye = torch.eye(sigma.shape[-1], dtype=sigma.dtype, device=sigma.device).expand_as(sigma)
    z = eye
    for _ in range(iterations):
        m = torch.baddbmm(eye, z, y, beta=1.5, alpha=-0.5)
        y, z = torch.bmm(y, m), torch.bmm(m, z)
    return z / trace.sqrt()


class IterNorm(nn.Module):
    """Whiten each group of channels over the batch with T Newton iterations.

    In training the statistics come from the batch (for conv features every spatial
    position of every sample counts as a sample, as in batch norm); running estimates of
    the mean and of the whitening matrix, updated like BatchNorm's
    ``running = (1 - momentum) * running + momentum * batch``, are used in eval, so a
    sample's eval output does not depend on its batch mates.

    Args:
        num_features: channels C of the (N, C) or (N, C, H, W) input.
        num_groups: number of channel groups whitened separately; each group holds
            ``num_features / num_groups`` channels (the paper's group size; 8 to 16 there),
            so it must divide ``num_features``. Smaller groups cost less and need fewer
            samples for a well-conditioned covariance.
        T: Newton iterations (the paper's default 5); more iterations whiten more fully.
        eps: added to the covariance's diagonal so it stays invertible.
        momentum: weight of the new batch value in the running mean and whitening matrix.
        affine: learn a per-channel scale and shift after whitening, as in batch norm.
    """

    def __init__(
        self,
        num_features: int,
        num_groups: int = 8,
        T: int = 5,  # the paper's name for the iteration count
        eps: float = 1e-5,
        momentum: float = 0.1,
        affine: bool = True,
    ) -> None:
        super().__init__()
        if num_groups < 1 or num_features % num_groups:
            raise ValueError(
                f"IterNorm num_groups={num_groups} does not divide num_features={num_features}; "
                "set num_groups to a divisor of every layer width"
            )
        if T < 0:
            raise ValueError(f"IterNorm T={T} must be a non-negative number of iterations")
        self.num_features = num_features
        self.num_groups = num_groups
        self.group_size = num_features // num_groups
        self.T = T
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        d = self.group_size
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_whiten", torch.eye(d).repeat(num_groups, 1, 1))
        if affine:
            self.weight = nn.Parameter(torch.ones(num_features))
            self.bias = nn.Parameter(torch.zeros(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    def extra_repr(self) -> str:
        return (
            f"{self.num_features}, num_groups={self.num_groups}, T={self.T}, eps={self.eps}, "
            f"momentum={self.momentum}, affine={self.affine}"
        )

    def forward(self, x: Tensor) -> Tensor:
        if x.dim() not in (2, 4) or x.shape[1] != self.num_features:
            raise ValueError(
                f"IterNorm({self.num_features}) expects (N, {self.num_features}) or "
                f"(N, {self.num_features}, H, W) inputs, got {tuple(x.shape)}"
            )
        # Channels first, samples (and positions) last: (G, d, m).
        flat = x.transpose(0, 1).reshape(self.num_features, -1)
        # Products of small-eigenvalue matrices lose too much in half precision.
        with torch.autocast(x.device.type, enabled=False):
            white = self._whiten(flat.float() if flat.dtype in _HALF else flat)
        if self.affine:
            white = white * self.weight[:, None] + self.bias[:, None]
        shape = (x.shape[1], x.shape[0], *x.shape[2:])
        return white.reshape(shape).transpose(0, 1).to(x.dtype)

    def _whiten(self, flat: Tensor) -> Tensor:
        g, d = self.num_groups, self.group_size
        samples = flat.shape[1]
        if not self.training:
            mean, whiten = self.running_mean.to(flat.dtype), self.running_whiten.to(flat.dtype)
            centred = (flat - mean[:, None]).reshape(g, d, samples)
            return torch.bmm(whiten, centred).reshape(self.num_features, samples)
        if samples < 2:
            raise ValueError(
                "IterNorm needs more than one value per channel in training (batch size 1 with "
                "no spatial positions); use a larger batch or norm='group'/'layer'"
            )
        mean = flat.mean(dim=1)
        centred = (flat - mean[:, None]).reshape(g, d, samples)
        eye = torch.eye(d, dtype=flat.dtype, device=flat.device)
        # The paper's covariance uses 1/m (the biased estimate), like batch norm's forward.
        sigma = torch.baddbmm(eye * self.eps, centred, centred.transpose(1, 2), alpha=1 / samples)
        whiten = newton_inverse_sqrt(sigma, self.T)
        with torch.no_grad():
            m = self.momentum
            self.running_mean.mul_(1 - m).add_(mean.detach().to(self.running_mean.dtype), alpha=m)
            self.running_whiten.mul_(1 - m).add_(
                whiten.detach().to(self.running_whiten.dtype), alpha=m
            )
        return torch.bmm(whiten, centred).reshape(self.num_features, samples)
