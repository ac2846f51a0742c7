"""Batched augmentation on the device: random horizontal flip, random translation (a random
crop of the image padded on every side) and cutout, for a whole uint8 N x C x H x W batch
at once, as airbench does for CIFAR-10 with data held on the GPU.

albumentations stays the per-image CPU path (``data.augment``); this is the path of
``data.device_resident`` (``data.batch_augment``), where a per-image Python loop or a
round trip to the host would cost more than the model's step. torchvision.transforms.v2
applies one random draw to a whole batch, not one per image, hence these few functions.

Random draws happen on the CPU with a generator seeded per (seed, rank, epoch) for a whole
epoch at once (``draw``): the same images get the same draws on any device and after a
resume, and a batch costs no host round trip.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch import Tensor


@dataclass
class BatchAugmentConfig:
    """``data.batch_augment``: augmentation of device-resident train batches, per image.

    Args:
        flip: probability of a horizontal flip.
        translate: largest shift in pixels along each axis; each image moves by integers
            drawn uniformly from [-translate, translate] along rows and columns, which is a
            random H x W crop of the image padded by ``translate`` on every side.
        padding: what the shifted-in pixels hold: ``constant`` (``fill``) or ``reflect``
            (the image mirrored at its border, without repeating the edge pixel).
        cutout: side in pixels of a square set to ``fill`` (0: none). Its centre is uniform
            over the image and it is clipped at the border (DeVries & Taylor 2017), so the
            area cut is on average less than cutout**2.
        cutout_prob: probability that an image gets its cutout square.
        fill: grey level 0..255 of constant padding and of the cutout.
    """

    flip: float = 0.0
    translate: int = 0
    padding: Literal["constant", "reflect"] = "constant"
    cutout: int = 0
    cutout_prob: float = 1.0
    fill: int = 0


class BatchAugment:
    """Draws per-image parameters for an epoch and applies them to batches of it."""

    def __init__(self, config: BatchAugmentConfig, image_shape: tuple[int, ...]) -> None:
        if len(image_shape) != 3:
            raise ValueError(
                "data.batch_augment needs images (C x H x W); this source gives rows of "
                f"{tuple(image_shape)} features: remove data.batch_augment"
            )
        _, height, width = image_shape
        c = config
        if not 0.0 <= c.flip <= 1.0 or not 0.0 <= c.cutout_prob <= 1.0:
            raise ValueError("data.batch_augment.flip and .cutout_prob are probabilities in [0, 1]")
        if not 0 <= c.translate < min(height, width):
            largest = min(height, width) - 1
            raise ValueError(
                f"data.batch_augment.translate={c.translate} must lie in 0..{largest} for "
                f"{height} x {width} images"
            )
        if not 0 <= c.cutout <= max(height, width) or not 0 <= c.fill <= 255:
            raise ValueError(
                f"data.batch_augment.cutout must lie in 0..{max(height, width)} and .fill in 0..255"
            )
        if c.padding not in ("constant", "reflect"):
            raise ValueError("data.batch_augment.padding must be 'constant' or 'reflect'")
        self.config, self.height, self.width = config, height, width

    def draw(self, n: int, generator: torch.Generator) -> dict[str, Tensor]:
        """Parameters for ``n`` images (CPU tensors of length n); slice them per batch."""
        c, shift = self.config, self.config.translate
        cpu = {"generator": generator}
        return {
            "flip": torch.rand(n, **cpu) < c.flip,
            "dy": torch.randint(-shift, shift + 1, (n,), **cpu),
            "dx": torch.randint(-shift, shift + 1, (n,), **cpu),
            "cut": torch.rand(n, **cpu) < c.cutout_prob if c.cutout else torch.zeros(n, dtype=bool),
            "cy": torch.randint(0, self.height, (n,), **cpu),
            "cx": torch.randint(0, self.width, (n,), **cpu),
        }

    def __call__(self, x: Tensor, params: dict[str, Tensor]) -> Tensor:
        """Augment uint8 (or float) images N x C x H x W with their drawn parameters."""
        c = self.config
        if c.flip:
            x = torch.where(params["flip"][:, None, None, None], x.flip(-1), x)
        if c.translate:
            x = translate(x, params["dy"], params["dx"], c.padding, c.fill)
        if c.cutout:
            x = cutout(x, params["cy"], params["cx"], c.cutout, params["cut"], c.fill)
        return x


def _source_index(index: Tensor, size: int, padding: str) -> tuple[Tensor, Tensor]:
    """Where each output pixel reads from along one axis, and whether that lies inside."""
    inside = (index >= 0) & (index < size)
    if padding == "reflect":  # -1 -> 1, size -> size - 2 (the edge pixel is not repeated)
        index = index.abs()
        index = torch.where(index >= size, 2 * (size - 1) - index, index)
        return index, torch.ones_like(inside)
    return index.clamp(0, size - 1), inside


def translate(
    x: Tensor, dy: Tensor, dx: Tensor, padding: str = "constant", fill: int = 0
) -> Tensor:
    """out[n, :, i, j] = x[n, :, i + dy[n], j + dx[n]]; pixels from outside the image are
    ``fill`` (constant) or mirrored (reflect). One gather for the whole batch."""
    n, channels, height, width = x.shape
    dy, dx = dy.to(x.device), dx.to(x.device)
    rows, row_in = _source_index(
        torch.arange(height, device=x.device) + dy[:, None], height, padding
    )
    cols, col_in = _source_index(torch.arange(width, device=x.device) + dx[:, None], width, padding)
    flat = (rows[:, :, None] * width + cols[:, None, :]).reshape(n, 1, height * width)
    out = x.reshape(n, channels, height * width).gather(2, flat.expand(n, channels, -1))
    out = out.reshape(n, channels, height, width)
    if padding == "constant":
        outside = ~(row_in[:, :, None] & col_in[:, None, :])
        out = out.masked_fill(outside[:, None], fill)
    return out


def cutout(x: Tensor, cy: Tensor, cx: Tensor, size: int, active: Tensor, fill: int = 0) -> Tensor:
    """Set a size x size square centred at (cy, cx) to ``fill`` in the images where
    ``active``; rows cy - size // 2 .. cy - size // 2 + size - 1, clipped at the border."""
    _, _, height, width = x.shape
    top = (cy.to(x.device) - size // 2)[:, None]
    left = (cx.to(x.device) - size // 2)[:, None]
    rows = torch.arange(height, device=x.device)[None]
    cols = torch.arange(width, device=x.device)[None]
    in_rows = (rows >= top) & (rows < top + size)
    in_cols = (cols >= left) & (cols < left + size)
    mask = in_rows[:, :, None] & in_cols[:, None, :] & active.to(x.device)[:, None, None]
    return x.masked_fill(mask[:, None], fill)
