"""InputStatsCheck: silent on correctly normalized inputs, and each planted fault named:
shifted statistics, no whitening, and a normalizer that saw the validation split."""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from callback_helpers import digits_data, digits_model, fit, one_thread

from dnn_tricks.callbacks.input_stats import InputStatsCheck, input_problems
from dnn_tricks.models.classifier import Classifier

TOLS = {"mean_tol": 0.1, "var_tol": 0.1, "corr_tol": 0.1}


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _gaussian(n: int = 4000, d: int = 6, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def test_input_problems_on_synthetic_data():
    z = _gaussian()
    assert input_problems(z, "standardize", False, None, **TOLS) == []
    assert input_problems(z, "zca_whiten", False, 6.0, **TOLS) == []

    x = (z + 0.5).numpy()
    (shifted,) = input_problems(z + 0.5, "standardize", False, None, **TOLS)
    rms = np.sqrt(np.mean((x.mean(0) / x.std(0, ddof=1)) ** 2))  # about 0.5
    assert f"feature means are {rms:.3g} standard deviations" in shifted

    (wide,) = input_problems(z * 2, "standardize", False, None, **TOLS)
    assert f"average feature variance is {(2 * z).numpy().var(0, ddof=1).mean():.4g}" in wide

    mixed = (
        z
        @ torch.linalg.cholesky(
            torch.full((6, 6), 0.8, dtype=torch.float64) + 0.2 * torch.eye(6, dtype=torch.float64)
        ).T
    )
    problems = input_problems(mixed, "pca_whiten", False, 6.0, **TOLS)
    assert any("stay correlated" in p for p in problems)  # correlation 0.8 between features

    # a whitening that promises 3 units of variance (eps damping) but delivers 6
    (total,) = input_problems(z, "zca_whiten", False, 3.0, **TOLS)
    assert f"total variance is {z.numpy().var(0, ddof=1).sum():.4g}" in total
    assert "promises 3" in total


def test_per_channel_statistics_pool_the_positions():
    images = _gaussian(200, 2 * 4 * 4).reshape(200, 2, 4, 4)
    images[:, 1] = images[:, 1] * 3 + 1  # channel 1 off; per-pixel stats would dilute it
    (problem, variance) = input_problems(images, "standardize", True, None, **TOLS)
    assert "worst channel 1" in problem and "channel variance" in variance


@pytest.mark.parametrize("kind", ["standardize", "zca_whiten"])
def test_correctly_normalized_inputs_pass(kind):
    check = InputStatsCheck()
    fit([check], model=digits_model(input_kind=kind), epochs=1, batches=1)
    assert check.problems == []


class ShiftedModel(Classifier):
    """A normalizer whose mean is off by 0.25 on the [0, 1] pixel scale."""

    def adapt_layers(self, batches) -> None:
        super().adapt_layers(batches)
        self.input_norm.mean = self.input_norm.mean + 0.25


class LeakyModel(Classifier):
    """The leak to catch: normalization statistics fitted on the validation split."""

    def adapt_layers(self, batches) -> None:
        self.input_norm.adapt(self.trainer.datamodule.raw_batches("val"))


def test_shifted_statistics_are_named():
    data, model = digits_data(), digits_model(model_class=ShiftedModel)
    with pytest.raises(ValueError, match="InputStatsCheck") as error:
        fit([InputStatsCheck(check_val=False)], model=model, data=data, epochs=1, batches=1)
    # per-channel standardize (the default): the one channel is off by 0.25 raw std units
    pixels = data.split("train")[0].astype(np.float64) / 255
    expected = 0.25 / np.sqrt(pixels.var() + model.input_norm.eps)
    reported = re.search(r"channel means are ([\d.]+) standard deviations", str(error.value))
    assert float(reported.group(1)) == pytest.approx(expected, rel=2e-3)
    assert "mean_tol=0.1" in str(error.value)


def test_normalizer_fitted_on_validation_data_is_named():
    with pytest.raises(ValueError, match="the normalizer saw validation data"):
        fit([InputStatsCheck()], model=digits_model(model_class=LeakyModel), batches=1)


def test_warn_action_lets_training_go_on():
    model = digits_model(model_class=ShiftedModel)
    with pytest.warns(UserWarning, match="channel means are"):
        trainer, _, _ = fit([InputStatsCheck(action="warn")], model=model, epochs=1, batches=1)
    assert trainer.global_step == 1


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"num_samples": 1}, "num_samples"),
        ({"mean_tol": 0}, "mean_tol"),
        ({"corr_tol": -1}, "corr_tol"),
        ({"action": "ignore"}, "action"),
    ],
)
def test_misconfiguration_names_the_argument(kwargs, key):
    with pytest.raises(ValueError, match=key):
        InputStatsCheck(**kwargs)
