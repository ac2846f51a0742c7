"""A checkpoint stands alone: loaded with ``Classifier.load_from_checkpoint`` (weights only), its
``standalone()`` module maps raw inputs to the same probabilities ``trainer predict`` writes,
and a resumed fit never refits the data-fitted layers."""

from __future__ import annotations

import csv

import numpy as np
import torch

from conftest import CONFIGS, shrink_args
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier


def _fit_digits(run_cli, tmp_path, *extra: str):
    run_cli(
        ["fit", "--config", CONFIGS / "digits.yaml", *shrink_args(tmp_path / "logs", 2, 5), *extra]
    )
    return next((tmp_path / "logs").glob("*/version_0"))


def test_checkpoint_alone_gives_trainer_predict_probabilities_on_raw_inputs(run_cli, tmp_path):
    run = _fit_digits(run_cli, tmp_path, "--model.input_norm.kind=zca_whiten")
    checkpoint = run / "checkpoints" / "last.ckpt"
    out = tmp_path / "predictions.csv"
    run_cli(
        ["predict", "--config", run / "config.yaml", "--ckpt_path", checkpoint]
        + [f"--predictions.path={out}"]
    )
    with open(out) as f:
        rows = list(csv.DictReader(f))
    written = np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows])

    model = Classifier.load_from_checkpoint(checkpoint, weights_only=True, map_location="cpu")
    # the raw test split as a user holds it: uint8 H x W x C -> float N x C x H x W in [0, 1]
    data = DataModule(source="digits", val_fraction=0.15, test_fraction=0.2)
    images, _ = data.split("test")
    raw = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        probs = torch.softmax(model.standalone()(raw), dim=1).numpy()
    assert len(written) == len(raw) and model.input_norm.kind == "zca_whiten"
    np.testing.assert_allclose(probs, written, atol=2e-6)
    # without its fitted statistics the same net gives other answers: the layer matters
    fresh_norm = model.standalone()
    fresh_norm.input_norm.mean = torch.zeros_like(fresh_norm.input_norm.mean)
    with torch.no_grad():
        shifted = torch.softmax(fresh_norm(raw), dim=1).numpy()
    assert np.abs(shifted - written).max() > 1e-3


def test_resumed_fit_restores_the_patch_stem_and_input_norm_without_refitting(
    run_cli, tmp_path, monkeypatch
):
    stem = [
        "--model.net=dnn_tricks.models.nets.ConvNet",
        "--model.net.init_args.channels=[8]",
        "--model.net.init_args.hidden=[]",
        "--model.net.init_args.stem=patch_whiten",
        "--model.scheduler=null",
        "--model.input_norm.per_channel=true",
    ]
    run = _fit_digits(run_cli, tmp_path, *stem)
    first = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]

    # fitted at fit start from the train split: the stem's eigenvalues are those of the
    # normalized train patches (checked against NumPy), the normalizer's mean the train mean
    data = DataModule(source="digits", val_fraction=0.15, test_fraction=0.2)
    train = data.split("train")[0].astype(np.float64) / 255
    np.testing.assert_allclose(first["input_norm.mean"].numpy(), train.mean(), rtol=1e-6)
    z = (train - train.mean()) / np.sqrt(train.var() + 1e-5)
    patches = np.lib.stride_tricks.sliding_window_view(z[..., 0], (2, 2), axis=(1, 2))
    expected = np.sort(np.linalg.eigvalsh(np.cov(patches.reshape(-1, 4).T)))[::-1]
    stem_key = next(k for k in first if k.endswith("eigenvalues"))
    np.testing.assert_allclose(first[stem_key].numpy(), expected, rtol=1e-6)

    calls = []
    monkeypatch.setattr(Classifier, "adapt_layers", lambda self, batches: calls.append(1))
    run_cli(
        ["fit", "--config", run / "config.yaml", "--ckpt_path", run / "checkpoints" / "last.ckpt"]
        + ["--trainer.max_epochs=3", "--test_after_fit=false"]
    )
    assert calls == []  # a resumed fit restores, never refits
    resumed_run = next(p for p in (tmp_path / "logs").glob("*/version_1"))
    resumed = torch.load(resumed_run / "checkpoints" / "last.ckpt", weights_only=True)
    for key in [k for k in first if k.startswith("input_norm.")] + [
        k for k in first if "eigenvalues" in k or k.endswith("stem.weight")
    ]:
        assert torch.equal(resumed["state_dict"][key], first[key]), key
