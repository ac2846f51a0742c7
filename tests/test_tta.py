"""model.tta: evaluation averages the logits of flipped (and shifted) views, checked against
views built by hand with NumPy (mirror, reflect padding and crop); training is untouched."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from conftest import CONFIGS, shrink_args
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.input_norm import NormalizeConfig
from dnn_tricks.models.nets import ConvNet
from dnn_tricks.models.tta import shift


def _model(tta: str) -> Classifier:
    torch.manual_seed(0)
    net = lambda input_shape, num_classes: ConvNet(  # noqa: E731
        input_shape, num_classes, channels=[4], hidden=[8]
    )
    model = Classifier(
        net, NormalizeConfig(kind="none"), input_shape=(2, 6, 7), num_classes=3, tta=tta
    )
    return model.double()


def _by_hand(model: Classifier, x: np.ndarray, weights: dict) -> np.ndarray:
    """Sum of weight x logits of each view, the views made with NumPy."""
    total = 0
    for (dy, mirror), weight in weights.items():
        view = x
        if dy:
            padded = np.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1)), mode="reflect")
            view = padded[:, :, 1 + dy : 1 + dy + 6, 1 + dy : 1 + dy + 7]
        if mirror:
            view = view[..., ::-1]
        with torch.no_grad():
            logits = model.net(torch.from_numpy(np.ascontiguousarray(view)))
        total = total + weight * logits.numpy()
    return total


@pytest.mark.parametrize(
    ("tta", "weights"),
    [
        ("none", {(0, False): 1.0}),
        ("flip", {(0, False): 0.5, (0, True): 0.5}),
        (
            "flip_translate",
            {(0, False): 0.25, (0, True): 0.25}
            | {(d, m): 0.125 for d in (-1, 1) for m in (False, True)},
        ),
    ],
)
def test_eval_logits_are_the_weighted_mean_over_the_views(tta, weights):
    model = _model(tta).eval()
    x = np.random.default_rng(0).random((5, 2, 6, 7))
    with torch.no_grad():
        got = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(got, _by_hand(model, x, weights), rtol=1e-12, atol=1e-12)


def test_training_forward_sees_the_image_once():
    model = _model("flip_translate").train()
    calls = []
    model.net.register_forward_hook(lambda *_: calls.append(1))
    model(torch.rand(4, 2, 6, 7, dtype=torch.float64))
    assert len(calls) == 1
    model.eval()
    with torch.no_grad():
        model(torch.rand(4, 2, 6, 7, dtype=torch.float64))
    assert len(calls) == 1 + 6


def test_shift_reads_the_neighbouring_pixel():
    x = torch.arange(12.0).reshape(1, 1, 3, 4)
    assert shift(x, 1)[0, 0, 0, 0] == x[0, 0, 1, 1]
    assert shift(x, -1)[0, 0, 1, 1] == x[0, 0, 0, 0]
    assert shift(x, -1)[0, 0, 0, 0] == x[0, 0, 1, 1]  # mirrored border


def test_tabular_inputs_refuse_tta():
    net = lambda input_shape, num_classes: torch.nn.Linear(input_shape[0], num_classes)  # noqa: E731
    with pytest.raises(ValueError, match="model.tta=flip"):
        Classifier(net, input_shape=(13,), num_classes=3, tta="flip")


def test_trainer_test_reports_tta_accuracy(run_cli, tmp_path):
    logs = tmp_path / "logs"
    args = [*shrink_args(logs, epochs=1, batches=3), "--model.tta=flip"]
    run_cli(["fit", "--config", CONFIGS / "digits.yaml", *args])
    assert next(logs.rglob("last.ckpt")).exists()
