"""PatchWhitening: a frozen first convolution whose filters whiten k x k input patches.

Why: the first layer then sees decorrelated, unit-variance patch features, so early training
does not spend steps undoing pixel correlations. Two published measurements:
- airbench (Jordan 2024, "94% on CIFAR-10 in 3.29 seconds on a single GPU"): 2x2 patches,
  24 channels = 12 eigenfilters and their negatives, eps 5e-4, frozen; adding this init cut
  the time to 94% from 14.2 s / 34 epochs to 8.6 s / 21 epochs, the largest single gain.
- David Page, "How to train your ResNet" (cifar10-fast): 3x3 patches, 27 filters, eps 1e-2;
  time to 94% from 43 s to 36 s.
The eigen math is shared with the input normalizer (dnn_tricks.models.input_norm).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from dnn_tricks.linalg import StreamingMoments, sorted_eigh, whitening_from_eigh


class PatchWhitening(nn.Module):
    """Convolution with PCA-whitening filters of the train patches, frozen.

    Filter i is u_i / sqrt(lambda_i + eps) for the i-th eigenpair of the k x k patch
    covariance (descending lambda), followed by the negatives of all filters when
    ``with_negatives`` (so a following ReLU keeps both signs of every direction). Before
    ``adapt`` the filters are the plain patch basis (output = the raw patch pixels),
    so the layer works, unwhitened, in shape tests. No bias: the map is linear, so the output
    covariance is whitened whatever the input mean (inputs are normalized upstream anyway).

    Args:
        in_channels: channels of the input images.
        patch_size: k of the k x k patches (airbench 2, Page 3).
        eps: added to the patch-covariance eigenvalues before the inverse square root
            (airbench 5e-4, Page 1e-2); caps the gain of near-constant directions.
        with_negatives: also emit each filter's negative; out_channels doubles.
        padding: zero padding of the convolution; statistics use unpadded patches only.
        max_images: how many train images ``adapt`` reads (the patch covariance of a few
            thousand images is already stable: airbench uses 5000).
    """

    def __init__(
        self,
        in_channels: int,
        patch_size: int = 2,
        eps: float = 5e-4,
        with_negatives: bool = True,
        padding: int = 0,
        max_images: int = 5000,
    ) -> None:
        super().__init__()
        if patch_size < 1:
            raise ValueError(f"patch_size={patch_size} must be >= 1")
        if not eps >= 0:
            raise ValueError(f"eps={eps} must be >= 0 (it is added to the patch eigenvalues)")
        self.in_channels, self.patch_size = in_channels, patch_size
        self.eps, self.with_negatives, self.padding = float(eps), with_negatives, padding
        if max_images < 1:
            raise ValueError(f"patch_n_images={max_images} must be >= 1")
        self.max_images = max_images
        n_filters = in_channels * patch_size * patch_size
        self.out_channels = n_filters * (2 if with_negatives else 1)
        # A buffer, not a Parameter: no optimizer, weight decay or init scheme can change it,
        # and requires_grad_(True) on the whole net cannot unfreeze it.
        self.register_buffer("weight", self._filters(torch.eye(n_filters)))
        self.register_buffer("eigenvalues", torch.zeros(n_filters, dtype=torch.float64))
        self.register_buffer("initialized", torch.tensor(False))

    def _filters(self, rows: Tensor) -> Tensor:
        """Rows (filters x C*k*k, unfold's order = conv weight's order) -> conv weight."""
        if self.with_negatives:
            rows = torch.cat([rows, -rows])
        k = self.patch_size
        return rows.reshape(len(rows), self.in_channels, k, k).float()

    @torch.no_grad()
    def adapt(self, batches: Iterable[Tensor]) -> PatchWhitening:
        """Set the filters from (normalized) train images N x C x H x W, streamed, using the
        first ``max_images``: the data-fitted-layer protocol (``Classifier.adapt_layers``)."""
        moments, seen = StreamingMoments(full=True), 0
        for batch in batches:
            if batch.ndim != 4 or batch.shape[1] != self.in_channels:
                raise ValueError(
                    f"PatchWhitening.adapt needs images N x {self.in_channels} x H x W, "
                    f"got {tuple(batch.shape)}"
                )
            batch = batch[: self.max_images - seen]
            for chunk in batch.split(256):  # bounds memory: unfold copies each pixel k*k times
                patches = F.unfold(chunk.to(torch.float64), self.patch_size)
                moments.update(patches.transpose(1, 2).reshape(-1, patches.shape[1]))
            seen += len(batch)
            if seen >= self.max_images:
                break
        if seen == 0:
            raise ValueError("PatchWhitening.adapt got no images; is the train split empty?")
        lam, vectors = sorted_eigh(moments.covariance())
        rows = whitening_from_eigh(lam, vectors, "pca_whiten", self.eps)
        self.weight.copy_(self._filters(rows))
        self.eigenvalues.copy_(lam)
        self.initialized.fill_(True)
        return self

    def forward(self, x: Tensor) -> Tensor:
        return F.conv2d(x, self.weight.to(x.dtype), padding=self.padding)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, patch_size={self.patch_size}, "
            f"eps={self.eps}, padding={self.padding}"
        )
