"""A norm layer of your own, named by class path, with no edit inside dnn_tricks:

    trainer fit --config configs/digits.yaml --config tests/plugins/my_norm.yaml

Mean-only batch normalization (Salimans & Kingma 2016, "Weight Normalization", sec. 3.2):
subtract each channel's batch mean in training (its running mean in eval) and add a learned
bias, without dividing by the standard deviation. The net builds it with the layer width
as its first argument; the ``running_mean`` buffer and ``momentum`` follow BatchNorm's
naming, so RunningStatsCheck and PreciseBN look after it like any BatchNorm.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn


class MeanOnlyBatchNorm(nn.Module):
    """Centres each channel over the batch (and positions, for conv features).

    Args:
        num_features: channels C of the (N, C) or (N, C, H, W) input; given by the net.
        momentum: weight of each batch mean in the running mean, as in BatchNorm.
    """

    def __init__(self, num_features: int, momentum: float = 0.1) -> None:
        super().__init__()
        self.momentum = momentum
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.register_buffer("running_mean", torch.zeros(num_features))

    def forward(self, x: Tensor) -> Tensor:
        shape = (1, -1) + (1,) * (x.dim() - 2)  # broadcast over every dim but channels
        if self.training:
            mean = x.mean(dim=[0, *range(2, x.dim())])
            with torch.no_grad():
                self.running_mean.lerp_(mean, self.momentum)  # (1 - m) running + m batch
        else:
            mean = self.running_mean
        return x - mean.view(shape) + self.bias.view(shape)
