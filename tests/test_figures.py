"""TensorBoard output: figure contents against NumPy / scikit-learn, and one shrunk
``trainer fit`` with every callback whose event files hold what the README promises."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import yaml
from callback_helpers import (
    digits_data,
    digits_model,
    fit,
    hparams_plugin,
    one_thread,
    read_events,
)
from sklearn.metrics import confusion_matrix
from torchmetrics.classification import MulticlassConfusionMatrix

from conftest import CONFIGS, shrink_args
from dnn_tricks.callbacks.figures import ConfusionMatrix, confusion_figure, spectrum_figure
from dnn_tricks.callbacks.trainer_utils import to_model


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_spectrum_figure_plots_the_covariance_eigenvalues():
    data, model = digits_data(), digits_model(input_kind="zca_whiten")
    data.setup("fit")
    model.adapt_layers(lambda: data.raw_batches("train"))
    pixels = data.split("train")[0].reshape(-1, 64).astype(np.float64) / 255
    expected = np.sort(np.linalg.eigvalsh(np.cov(pixels.T)))[::-1]
    expected = expected[expected > 1e-12 * expected[0]]
    norm = model.input_norm
    figure = spectrum_figure(norm.eigenvalues_before, norm.eigenvalues_after, norm.kind)
    before, after = (line.get_ydata() for line in figure.axes[0].lines)
    np.testing.assert_allclose(before, expected, rtol=1e-6)
    assert after.max() <= 1.0  # whitened: lambda / (lambda + eps)
    assert f"κ={expected[0] / expected[-1]:.3g}" in figure.axes[0].lines[0].get_label()


@pytest.mark.parametrize("normalize", [True, False])
def test_confusion_figure_draws_scikit_learns_matrix(normalize):
    rng = np.random.default_rng(0)
    y = rng.integers(0, 4, 200)
    predicted = np.where(rng.random(200) < 0.7, y, rng.integers(0, 4, 200))
    metric = MulticlassConfusionMatrix(4)
    metric.update(torch.as_tensor(predicted), torch.as_tensor(y))
    figure = confusion_figure(metric, metric.compute(), list("abcd"), normalize)
    axes = figure.axes[0]
    expected = confusion_matrix(y, predicted, normalize="true" if normalize else None)
    np.testing.assert_allclose(np.asarray(axes.images[0].get_array()), expected, rtol=1e-6)
    assert [label.get_text() for label in axes.get_yticklabels()] == list("abcd")
    assert len(axes.texts) == 16 and axes.texts[0].get_text() == str(round(expected[0, 0], 2))


def test_confusion_matrix_matches_scikit_learn(tmp_path):
    matrix = ConfusionMatrix()
    trainer, model, data = fit([matrix], tmp_path, epochs=2, batches=4)
    x, y = to_model(model, next(iter(data.val_dataloader())))  # the whole val split
    with torch.no_grad():
        predicted = model.eval()(x).argmax(1)
    assert matrix.last == confusion_matrix(y, predicted, labels=range(10)).tolist()
    images = read_events(trainer.log_dir).Images("val/confusion_matrix")
    assert [image.step for image in images] == [4, 8]  # every validation, no sanity check


@pytest.fixture
def full_run(run_cli, tmp_path):
    """A two-epoch digits fit with the shipped full callback set (configs/callbacks/full.yaml)
    and light augmentation, through the CLI."""
    callbacks = yaml.safe_load((CONFIGS / "callbacks" / "full.yaml").read_text())
    for callback in callbacks:  # fewer PreciseBN batches than shipped: seconds matter here
        if callback["class_path"].endswith("PreciseBN"):
            callback["init_args"]["num_batches"] = 10
    path = tmp_path / "full_callbacks.yaml"
    path.write_text(yaml.safe_dump(callbacks))
    logs = tmp_path / "logs"
    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "digits.yaml",
            f"--trainer.callbacks={path}",
            *shrink_args(logs, epochs=2, batches=3),
            "--trainer.log_every_n_steps=3",  # the LR monitor logs per step, on log steps
            f"--data.augment={CONFIGS / 'augment' / 'light.yaml'}",
            "--data.num_workers=0",
            # regularizer terms show up as their own scalars
            "--model.regularizers=[{class_path: dnn_tricks.regularize.L1, init_args: "
            "{weight: 1e-5}}, {class_path: dnn_tricks.regularize.L2, init_args: {weight: 1e-4}}]",
        ]
    )
    return logs / "digits" / "version_0"


def test_tensorboard_shows_every_trick(full_run):
    events = read_events(full_run)
    tags = events.Tags()
    assert {
        "data/eigenvalue_spectrum",
        "data/augmented_samples",
        "val/confusion_matrix",
    } <= set(tags["images"])
    assert len(events.Images("val/confusion_matrix")) == 2  # one per validation epoch
    scalars = set(tags["scalars"])
    expected = {
        "lr-SGD/pg1",
        "train/loss_epoch",
        "train/acc",
        "val/loss",
        "val/acc",
        "test/acc",
        "data/cond_before",
        "act_dead_frac/net.layers.1.act",
        "val/acc_before_precise_bn",
        "val/acc_precise_bn",
        "hparams/best_val_acc",
        "train/l1_epoch",
        "train/l2_epoch",
    }
    assert expected <= scalars, expected - scalars
    assert "weights/net.layers.1.linear.weight" in tags["histograms"]

    # HParams tab: the config's summary, not Lightning's hp_metric placeholder, and each
    # result's last value is the run's own final value
    experiment = hparams_plugin(events, "experiment").experiment
    results = ["hparams/val_acc", "hparams/val_loss", "hparams/test_acc", "hparams/best_val_acc"]
    assert [m.name.tag for m in experiment.metric_infos] == results
    last = {tag: events.Scalars(tag)[-1].value for tag in scalars}
    assert last["hparams/val_acc"] == last["val/acc"]
    assert last["hparams/val_loss"] == last["val/loss"]
    assert last["hparams/test_acc"] == last["test/acc"]
    val_acc = [event.value for event in events.Scalars("val/acc")]
    assert last["hparams/best_val_acc"] == pytest.approx(max(val_acc))
    session = hparams_plugin(events, "session_start_info").session_start_info
    assert session.hparams["model/optimizer/init_args/lr"].number_value == pytest.approx(0.05)
    assert session.hparams["model/net/class_path"].string_value == "dnn_tricks.models.nets.MLP"
    assert session.hparams["model/input_norm/kind"].string_value == "standardize"

    # the run's checkpoints, the PreciseBN one included, load without unpickling code
    checkpoint = torch.load(full_run / "checkpoints" / "precise_bn.ckpt", weights_only=True)
    assert "PreciseBN" in checkpoint["callbacks"]
    assert checkpoint["callbacks"]["RunningStatsCheck"]["drift"] == {}  # 6 steps: not warm
