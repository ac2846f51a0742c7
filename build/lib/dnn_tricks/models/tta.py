"""Test-time augmentation (``model.tta``): evaluation averages the logits of a few views of
each image, as airbench does (Jordan 2024: horizontal flip, then also 1-pixel shifts).

``flip``: the image and its mirror, equally weighted. ``flip_translate``: airbench's level 2,
half the weight on the unshifted pair and a quarter on each pair shifted by one pixel
diagonally (up-left, down-right), the borders mirrored. Views go through the model one at a
time: a batch of six views at the evaluation batch size would hold six times the activations.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch.nn.functional as F
from torch import Tensor

TTA = Literal["none", "flip", "flip_translate"]


def shift(x: Tensor, step: int) -> Tensor:
    """Images N x C x H x W moved by ``step`` pixels along both axes (out[i, j] =
    x[i + step, j + step]), the border mirrored (reflect padding, as a padded crop)."""
    _, _, height, width = x.shape
    padded = F.pad(x, (abs(step),) * 4, mode="reflect")
    top = abs(step) + step
    return padded[..., top : top + height, top : top + width]


def tta_logits(predict: Callable[[Tensor], Tensor], x: Tensor, mode: TTA) -> Tensor:
    """Weighted mean of ``predict`` (raw images -> logits) over the views of ``mode``."""

    def flip_mean(view: Tensor) -> Tensor:
        return (predict(view) + predict(view.flip(-1))) / 2

    if mode == "flip":
        return flip_mean(x)
    if mode == "flip_translate":
        return flip_mean(x) / 2 + (flip_mean(shift(x, -1)) + flip_mean(shift(x, 1))) / 4
    return predict(x)
