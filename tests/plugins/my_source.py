"""A data source of your own, named by class path, with no edit inside dnn_tricks:

    trainer fit --config configs/wine.yaml --config tests/plugins/my_source.yaml

Two interleaving half circles (scikit-learn's ``make_moons``): two features that no linear
model separates, so it shows what a hidden layer buys. A source is a class with a
``load()`` that returns a ``SourceData`` (inputs, integer labels 0..K-1, class names); the
DataModule splits it, batches it and fits the model's input normalization on its train
split like any built-in source.
"""

from __future__ import annotations

import numpy as np
from sklearn.datasets import make_moons

from dnn_tricks.data.sources import Source, SourceData


class TwoMoons(Source):
    """Points on two interleaving half circles, with Gaussian noise.

    Args:
        samples: number of points (half per moon).
        noise: standard deviation of the noise added to each coordinate.
        seed: random state of the points (the split has its own, data.seed).
    """

    def __init__(self, samples: int = 600, noise: float = 0.2, seed: int = 0) -> None:
        self.samples, self.noise, self.seed = samples, noise, seed

    def load(self) -> SourceData:
        x, y = make_moons(self.samples, noise=self.noise, random_state=self.seed)
        return SourceData(x=x.astype(np.float32), y=y.astype(np.int64), classes=["upper", "lower"])
