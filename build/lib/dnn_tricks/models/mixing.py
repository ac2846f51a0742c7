"""Mixup and CutMix: each training batch mixed with itself shifted by one, on the device, the
loss then taken on the mixed (soft) targets. torchvision.transforms.v2's MixUp and CutMix do
the mixing; this module only chooses between them per batch and gives unmixed batches one-hot
targets, so the loss always sees one kind of target.

Mixup (Zhang et al. 2018): lambda ~ Beta(alpha, alpha), x' = lambda x_i + (1 - lambda) x_{i-1},
y' = lambda onehot(y_i) + (1 - lambda) onehot(y_{i-1}). CutMix (Yun et al. 2019): a box of
area about (1 - lambda) H W is pasted from x_{i-1}, and y' weighs the labels by the pixels
each image keeps. Pairs are neighbours in the batch, so the train loader must shuffle.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor
from torchvision.transforms import v2


@dataclass
class MixConfig:
    """Mixup / CutMix of training batches (``model.mixing``); images only (N x C x H x W).

    Example: ``model.mixing: {mixup_alpha: 0.2, cutmix_alpha: 1.0}`` picks mixup or cutmix
    with equal odds for every batch.

    Args:
        mixup_alpha: alpha of mixup's Beta(alpha, alpha) mixing weight; 0 turns mixup off.
            0.2-0.4 is usual for ImageNet, 1 (uniform lambda) for CIFAR (Zhang et al. 2018).
        cutmix_alpha: alpha of CutMix's Beta(alpha, alpha) kept-area share; 0 turns it off;
            1 is the paper's value (Yun et al. 2019).
        prob: probability that a batch is mixed at all (else it trains on one-hot targets).
    """

    mixup_alpha: float = 0.0
    cutmix_alpha: float = 0.0
    prob: float = 1.0


class BatchMixing:
    """``(images, labels) -> (mixed images, soft targets N x num_classes)`` as MixConfig says.

    Draws from torch's global RNG (as torchvision does), so ``seed_everything`` makes the
    mixing reproducible.

    Args:
        config: the mixing switches.
        num_classes: width of the one-hot / soft targets.
    """

    def __init__(self, config: MixConfig, num_classes: int) -> None:
        if config.mixup_alpha < 0 or config.cutmix_alpha < 0:
            raise ValueError("model.mixing mixup_alpha and cutmix_alpha must be >= 0 (0 is off)")
        if not 0.0 <= config.prob <= 1.0:
            raise ValueError(f"model.mixing.prob={config.prob} must be in [0, 1]")
        choices: list[v2.Transform] = []
        if config.mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=config.mixup_alpha, num_classes=num_classes))
        if config.cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=config.cutmix_alpha, num_classes=num_classes))
        if not choices:
            raise ValueError("model.mixing needs mixup_alpha > 0 or cutmix_alpha > 0 (or null)")
        self.transform = choices[0] if len(choices) == 1 else v2.RandomChoice(choices)
        self.prob, self.num_classes = config.prob, num_classes

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor]:
        if images.ndim != 4:
            raise ValueError(
                f"model.mixing mixes image batches (N x C x H x W), got {tuple(images.shape)}; "
                "set model.mixing: null for this data"
            )
        if self.prob < 1.0 and torch.rand(()).item() >= self.prob:
            return images, F.one_hot(labels, self.num_classes).to(images.dtype)
        mixed, targets = self.transform(images, labels)
        return mixed, targets.to(images.dtype)
