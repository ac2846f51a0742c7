"""A regularizer of your own, listed by class path, with no edit inside dnn_tricks:

    trainer fit --config configs/digits.yaml --config tests/plugins/my_regularizer.yaml

Soft orthogonality (Bansal, Chen & Wang 2018, "Can We Gain More from Orthogonality
Regularizations in Training Deep CNNs?", eq. 2): weight * sum over layers of
||W^T W - I||_F^2, each kernel W flattened to (units, fan-in) and the Gram matrix taken on
its shorter side, so a wide layer is not asked for more orthogonal rows than it can have.
The term is added to the loss and logged as ``train/orthogonality``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from dnn_tricks.regularize import Regularizer, penalized_weights


class SoftOrthogonality(Regularizer):
    """Pulls every Linear / Conv kernel towards orthonormal rows (or columns).

    Args:
        weight: coefficient of the penalty (the paper uses 1e-4 to 1e-1, decayed).
    """

    name = "orthogonality"  # logged as train/orthogonality

    def __init__(self, weight: float) -> None:
        if not weight >= 0:
            raise ValueError(f"SoftOrthogonality weight={weight} must be >= 0")
        self.weight = weight

    def penalty(self, net: nn.Module) -> Tensor:
        terms = []
        for kernel in penalized_weights(net):  # trainable Linear / Conv kernels
            rows = kernel.flatten(1)
            gram = rows @ rows.T if rows.shape[0] <= rows.shape[1] else rows.T @ rows
            eye = torch.eye(len(gram), dtype=gram.dtype, device=gram.device)
            terms.append((gram - eye).pow(2).sum())
        return self.weight * sum(terms, torch.zeros(()))
