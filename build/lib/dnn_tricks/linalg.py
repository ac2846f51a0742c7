"""Streaming second moments and the eigen-decomposition behind every whitening here: input
normalization (PCA, PCA/ZCA whitening) and the patch-whitening stem share this one place."""

from __future__ import annotations

import math

import torch
from torch import Tensor

EIGEN_KINDS = ("pca", "pca_whiten", "zca_whiten")

# Eigenvalues below this fraction of the largest count as zero: constant pixels (digits'
# borders, Fashion-MNIST corners) would otherwise make every condition number infinite.
REL_FLOOR = 1e-12


class StreamingMoments:
    """Count, mean and centred sum of squares (a vector, or the D x D scatter) in float64.

    Each batch is centred on its own mean, then merged with the running total by the
    update of Chan, Golub & LeVeque (1979): M2 = M2_a + M2_b + d d^T n_a n_b / n, where
    d = mean_b - mean_a. Never subtracts two large sums, so offsets do not cancel digits.
    """

    def __init__(self, full: bool) -> None:
        self.full = full
        self.count = 0
        self.mean: Tensor | None = None
        self.m2: Tensor | None = None

    def update(self, x: Tensor) -> None:
        """Add the rows of ``x`` (N x D)."""
        n_b = x.shape[0]
        if n_b == 0:
            return
        xc = x.to(torch.float64, copy=True)  # our own copy, so centring can be in place
        mean_b = xc.mean(0)
        xc -= mean_b
        m2_b = xc.T @ xc if self.full else (xc * xc).sum(0)
        if self.mean is None or self.m2 is None:
            self.count, self.mean, self.m2 = n_b, mean_b, m2_b
            return
        n = self.count + n_b
        delta = mean_b - self.mean
        spread = torch.outer(delta, delta) if self.full else delta * delta
        self.m2 = self.m2 + m2_b + spread * (self.count * n_b / n)
        self.mean = self.mean + delta * (n_b / n)
        self.count = n

    def covariance(self, ddof: int = 1) -> Tensor:
        """Scatter / (count - ddof): ddof=1 unbiased (sklearn PCA), ddof=0 biased."""
        assert self.m2 is not None, "no data"
        return self.m2 / (self.count - ddof)


def sorted_eigh(cov: Tensor) -> tuple[Tensor, Tensor]:
    """Eigenvalues (descending, clamped at 0) and eigenvectors (columns) of a PSD matrix.

    Signs are made deterministic (largest-magnitude entry of each vector positive), so
    refitting gives the same PCA rotation.
    """
    lam, u = torch.linalg.eigh(cov)
    lam, u = lam.flip(0).clamp_min(0), u.flip(1)
    pivot = u.gather(0, u.abs().argmax(0, keepdim=True))
    return lam, u * torch.where(pivot < 0, -1.0, 1.0).to(u.dtype)


def inverse_sqrt_scale(eigenvalues: Tensor, eps: float) -> Tensor:
    """1/sqrt(lambda + eps), and 0 for directions below the floor (no data there, eps=0)."""
    denom = eigenvalues + eps
    floor = REL_FLOOR * float(eigenvalues.max()) if eigenvalues.numel() else 0.0
    keep = denom > floor
    return torch.where(keep, denom.clamp_min(torch.finfo(denom.dtype).tiny).rsqrt(), 0.0)


def whitening_from_eigh(eigenvalues: Tensor, eigenvectors: Tensor, kind: str, eps: float) -> Tensor:
    """Matrix W (rows = output features) with y = W (x - mean), from a sorted eigh.

    pca: U^T; pca_whiten: diag(s) U^T; zca_whiten: U diag(s) U^T, s = 1/sqrt(lambda+eps).
    ZCA is the only symmetric whitening and, among all whitening matrices, the one that
    minimises E||Wx - x||^2 (Kessy, Lewin & Strimmer 2018, "Optimal whitening and
    decorrelation").
    """
    if kind == "pca":
        return eigenvectors.T.contiguous()
    s = inverse_sqrt_scale(eigenvalues, eps)
    if kind == "pca_whiten":
        return s[:, None] * eigenvectors.T
    if kind == "zca_whiten":
        return (eigenvectors * s) @ eigenvectors.T
    raise ValueError(f"whitening kind={kind!r} is unknown; choose one of: {', '.join(EIGEN_KINDS)}")


def whitening_matrix(cov: Tensor, kind: str, eps: float) -> Tensor:
    """Whitening (or PCA rotation) matrix of a covariance; see :func:`whitening_from_eigh`."""
    return whitening_from_eigh(*sorted_eigh(cov), kind, eps)


def condition_number(eigenvalues: Tensor) -> float:
    """lambda_max / lambda_min over eigenvalues above REL_FLOOR * lambda_max.

    The floor restricts kappa to the subspace the data span: a constant pixel adds an exact
    zero eigenvalue that no optimizer ever has to traverse. nan when there is no variance.
    """
    if eigenvalues.numel() == 0 or not float(eigenvalues.max()) > 0:
        return math.nan
    top = float(eigenvalues.max())
    kept = eigenvalues[eigenvalues > REL_FLOOR * top]
    return top / float(kept.min())
