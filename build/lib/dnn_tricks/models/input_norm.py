"""Input normalization, a data-fitted layer of the model fitted on the train split: center,
standardize, PCA, PCA/ZCA whitening.

Why: for a linear model (and the first layer of a net) the Hessian of the squared loss is
the input second-moment matrix, and gradient descent needs about kappa iterations, kappa its
condition number (LeCun et al. 1998, "Efficient BackProp", sec. 4.3-4.4). Standardizing
removes unequal scales; whitening also removes correlations, making kappa = 1.

Statistics are accumulated in one streaming pass in float64 with the pairwise update of
Chan, Golub & LeVeque (1979), so data far from the origin (mean 1e4 x its spread) stay exact
and memory is O(D^2) whatever the number of samples.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor, nn

from dnn_tricks.linalg import (
    EIGEN_KINDS,
    StreamingMoments,
    condition_number,
    inverse_sqrt_scale,
    sorted_eigh,
    whitening_from_eigh,
)

Kind = Literal["none", "center", "standardize", "pca", "pca_whiten", "zca_whiten"]
KINDS: tuple[str, ...] = ("none", "center", "standardize", "pca", "pca_whiten", "zca_whiten")


@dataclass
class NormalizeConfig:
    """How inputs are normalized; fitted on the train split only.

    Args:
        kind: ``none``; ``center`` (subtract the mean); ``standardize`` (mean 0, std 1, like
            sklearn ``StandardScaler``: biased std, zero-variance features keep scale 1);
            ``pca`` (center and rotate onto the principal axes, descending variance);
            ``pca_whiten`` (pca, then unit variance per axis, like sklearn
            ``PCA(whiten=True)``); ``zca_whiten`` (symmetric whitening
            ``U diag(1/sqrt(lambda+eps)) U^T``: identity covariance while staying closest to
            the input). PCA kinds keep all D components; image batches keep their shape.
        eps: added to the variances (standardize) or covariance eigenvalues (whitening)
            before the inverse square root, so near-constant directions are not blown up.
        per_channel: for images, center/standardize with one mean/std per channel (the
            usual image normalization) instead of per pixel. Whitening and PCA always use the
            full C*H*W covariance.
        report_max_dim: for center/standardize, fit the full feature covariance (only to
            report condition numbers) when D is at most this; O(N D^2) time, so CIFAR's 3072
            features are skipped by default (the report then shows nan).
    """

    kind: Kind = "standardize"
    eps: float = 1e-5
    per_channel: bool = True
    report_max_dim: int = 1024


class InputNormalizer(nn.Module):
    """Fit-once input transform; see :class:`NormalizeConfig` for the kinds and arguments.

    Covariances: standardize uses the biased variance (divide by N, like StandardScaler);
    pca/whitening use the unbiased covariance (N-1, like sklearn PCA's explained_variance_).
    ``fit`` also reports conditioning: ``eigenvalues_before`` (descending eigenvalues of the
    unbiased feature covariance) and ``eigenvalues_after`` (of A Sigma A^T, A the fitted
    linear map, no second data pass). For center/standardize/none the full covariance is
    accumulated only when D <= ``report_max_dim`` (O(D^2) memory and O(N D^2) time), else
    they stay empty and ``condition_numbers()`` gives nan. Condition numbers ignore
    eigenvalues below REL_FLOOR * the largest (constant pixels), see :func:`condition_number`.

    Output shape = input shape for every kind: pca/pca_whiten put the C*H*W components
    (descending variance) back into a C x H x W tensor so conv nets still get an image, and
    ZCA stays in input space anyway. ``kind="none"`` is the identity and works unfitted.
    Statistics accumulate on the device of the batches; move the module with ``.to()``.

    Args:
        kind: see NormalizeConfig.kind.
        eps: see NormalizeConfig.eps.
        per_channel: see NormalizeConfig.per_channel.
        report_max_dim: largest D for which center/standardize also fit the full covariance
            for the condition-number report.
    """

    def __init__(
        self,
        kind: Kind = "standardize",
        eps: float = 1e-5,
        per_channel: bool = True,
        report_max_dim: int = 4096,
    ) -> None:
        super().__init__()
        if kind not in KINDS:
            raise ValueError(
                f"input_norm.kind={kind!r} is unknown; choose one of: {', '.join(KINDS)}"
            )
        if not eps >= 0:
            raise ValueError(f"input_norm.eps={eps!r} must be >= 0")
        self.kind, self.eps, self.per_channel = kind, float(eps), bool(per_channel)
        self.report_max_dim = report_max_dim
        self._shape: tuple[int, ...] | None = None
        # Only tensors in the state, so checkpoints load with weights_only=True; the
        # configuration is stored too, to refuse a checkpoint fitted with other settings.
        self.register_buffer("kind_code", torch.tensor(KINDS.index(kind)))
        self.register_buffer("eps_value", torch.tensor(self.eps, dtype=torch.float64))
        self.register_buffer("per_channel_flag", torch.tensor(self.per_channel))
        self.register_buffer("num_samples", torch.tensor(0))
        self.register_buffer("sample_shape", torch.zeros(0, dtype=torch.long))
        for name in ("mean", "scale", "weight", "eigenvalues_before", "eigenvalues_after"):
            self.register_buffer(name, torch.zeros(0, dtype=torch.float64))

    @classmethod
    def from_config(cls, cfg: NormalizeConfig) -> InputNormalizer:
        return cls(
            kind=cfg.kind,
            eps=cfg.eps,
            per_channel=cfg.per_channel,
            report_max_dim=cfg.report_max_dim,
        )

    @property
    def fitted(self) -> bool:
        return self._shape is not None

    @property
    def channelwise(self) -> bool:
        """One statistic per channel (dim 1); for N x D input that is per feature anyway."""
        return self.per_channel and self.kind in ("center", "standardize")

    def extra_repr(self) -> str:
        return f"kind={self.kind!r}, eps={self.eps}, per_channel={self.per_channel}"

    @torch.no_grad()
    def adapt(self, batches: Iterable[Tensor]) -> InputNormalizer:
        """Fit the statistics in one pass over raw train batches (N x D or N x C x H x W;
        (x, y) tuples use x): the data-fitted-layer protocol (see ``Classifier.adapt_layers``)."""
        shape, full, diag, n = None, None, None, 0
        for batch in batches:
            x = torch.as_tensor(batch[0] if isinstance(batch, (tuple, list)) else batch)
            if x.ndim < 2:
                raise ValueError(
                    f"InputNormalizer.adapt needs N x D or N x C x H x W, got {tuple(x.shape)}"
                )
            if shape is None:
                shape = tuple(x.shape[1:])
                dim = math.prod(shape)
                if self.kind in EIGEN_KINDS or dim <= self.report_max_dim:
                    full = StreamingMoments(full=True)
                if self.channelwise or (full is None and self.kind != "none"):
                    diag = StreamingMoments(full=False)
            elif tuple(x.shape[1:]) != shape:
                raise ValueError(
                    f"fit batches differ in sample shape: {shape} vs {tuple(x.shape[1:])}"
                )
            if full is not None:
                full.update(x.reshape(len(x), -1))
            if diag is not None:
                # per channel: every pixel of a channel is one observation of it
                rows = x.movedim(1, -1).reshape(-1, x.shape[1]) if self.channelwise else x
                diag.update(rows.reshape(len(rows), -1))
            n += len(x)
        if shape is None:
            raise ValueError("InputNormalizer.adapt got no batches; is the train split empty?")
        self._finish(shape, n, full, diag)
        return self

    def _finish(
        self,
        shape: tuple[int, ...],
        n: int,
        full: StreamingMoments | None,
        diag: StreamingMoments | None,
    ) -> None:
        empty = torch.zeros(0, dtype=torch.float64)
        mean, scale, weight, before, after = empty, empty, empty, empty, empty
        cov = full.covariance(ddof=1) if full is not None and n >= 2 else None
        if self.kind in EIGEN_KINDS:
            if cov is None:
                raise ValueError(f"input_norm.kind={self.kind!r} needs at least 2 train samples")
            before, vectors = sorted_eigh(cov)
            weight = whitening_from_eigh(before, vectors, self.kind, self.eps)
            mean = full.mean
            gain = (
                torch.ones_like(before)
                if self.kind == "pca"
                else inverse_sqrt_scale(before, self.eps)
            )
            # W Sigma W^T = V diag(lambda s^2) V^T for both PCA and ZCA (V = I or U)
            after = (before * gain**2).sort(descending=True).values
        else:
            stats = diag if self.channelwise or full is None else full
            if self.kind != "none":
                mean = stats.mean
            if self.kind == "standardize":
                var = stats.covariance(0) if stats.m2.ndim == 1 else stats.m2.diagonal() / n
                scale = _standardize_scale(stats.mean, var, stats.count, self.eps)
            if cov is not None:
                before = _eigvals_desc(cov)
                after = before
                if self.kind == "standardize":
                    a = scale.repeat_interleave(math.prod(shape) // scale.numel())
                    after = _eigvals_desc(a[:, None] * cov * a[None, :])
        self.mean, self.scale, self.weight = mean, scale, weight
        self.eigenvalues_before, self.eigenvalues_after = before, after
        self.sample_shape = torch.tensor(shape, dtype=torch.long)
        self.num_samples = torch.tensor(n)
        self._shape = shape

    def condition_numbers(self) -> tuple[float, float]:
        """Covariance condition number (before, after) normalization; nan when not computed."""
        if not self.fitted:
            raise RuntimeError("InputNormalizer.condition_numbers() called before adapt()")
        return condition_number(self.eigenvalues_before), condition_number(self.eigenvalues_after)

    def forward(self, x: Tensor) -> Tensor:
        """Normalize a batch; output has the dtype, device and shape of ``x``."""
        if self.kind == "none":
            return x  # nothing to fit, so usable unfitted
        if self._shape is None:
            raise ValueError(
                "model.input_norm is not fitted: it is fitted at the start of a fresh fit; "
                "for validate/test/predict/export pass --ckpt_path of a trained run"
            )
        if tuple(x.shape[1:]) != self._shape:
            raise ValueError(
                f"InputNormalizer was fitted on samples of shape {self._shape}, "
                f"got a batch {tuple(x.shape)}"
            )
        if not x.is_floating_point():
            x = x.to(torch.get_default_dtype())
        mean = self.mean.to(device=x.device, dtype=x.dtype)
        if self.kind in EIGEN_KINDS:
            flat = x.flatten(1) - mean
            w = self.weight.to(device=x.device, dtype=x.dtype)
            return (flat @ w.T).reshape(x.shape)
        view = (1, -1) + (1,) * (x.ndim - 2) if self.channelwise else (1, *self._shape)
        y = x - mean.view(view)
        if self.kind == "standardize":
            y = y * self.scale.to(device=x.device, dtype=x.dtype).view(view)
        return y

    def _load_from_state_dict(self, state_dict: dict, prefix: str, *args, **kwargs) -> None:
        # Refuse statistics fitted with other settings: they would silently change the inputs.
        for key, current, name in (
            ("kind_code", KINDS.index(self.kind), "kind"),
            ("per_channel_flag", self.per_channel, "per_channel"),
        ):
            saved = state_dict.get(prefix + key)
            if saved is not None and int(saved) != int(current):
                value = KINDS[int(saved)] if name == "kind" else bool(saved)
                raise ValueError(
                    f"checkpoint normalizer was fitted with model.input_norm.{name}={value!r} but "
                    f"the config says {getattr(self, name)!r}; set model.input_norm.{name}={value} "
                    "or refit"
                )
        saved_eps = state_dict.get(prefix + "eps_value")
        # loose tolerance: a module cast to float16/bfloat16 rounds the stored eps too
        if saved_eps is not None and not math.isclose(float(saved_eps), self.eps, rel_tol=1e-2):
            raise ValueError(
                f"checkpoint normalizer was fitted with model.input_norm.eps={float(saved_eps)} "
                f"but the config says {self.eps}; set model.input_norm.eps={float(saved_eps)} "
                "or refit"
            )
        # Fitted buffers have data-dependent shapes: resize ours before copying into them.
        for name, buf in self._buffers.items():
            saved = state_dict.get(prefix + name)
            if buf is not None and saved is not None and saved.shape != buf.shape:
                self._buffers[name] = torch.empty(saved.shape, dtype=buf.dtype, device=buf.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        shape = tuple(int(s) for s in self.sample_shape.tolist())
        self._shape = shape if int(self.num_samples) > 0 else None


def _eigvals_desc(matrix: Tensor) -> Tensor:
    return torch.linalg.eigvalsh(matrix).flip(0).clamp_min(0)


def _standardize_scale(mean: Tensor, var: Tensor, count: int, eps: float) -> Tensor:
    """1/sqrt(var + eps); constant features keep scale 1 (as sklearn), not 1/sqrt(eps).

    A feature counts as constant when its std is within float64 rounding of its mean
    (the bound sklearn's StandardScaler uses for the same purpose).
    """
    std = var.sqrt()
    constant = std <= 10 * count * torch.finfo(torch.float64).eps * mean.abs()
    return torch.where(constant, 1.0, (var + eps).clamp_min(1e-300).rsqrt())
