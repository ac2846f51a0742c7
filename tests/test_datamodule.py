"""DataModule: sources, stratified disjoint splits, train-only normalization, loaders."""

from __future__ import annotations

import gzip
import struct
from functools import partial

import numpy as np
import pytest
import torch
from lightning.pytorch import Trainer

from conftest import requires_fashion_mnist, write_cifar10_batches
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.data.sources import load_source
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.input_norm import NormalizeConfig
from dnn_tricks.models.nets import MLP


def _unique_arrays(tmp_path, n=300, classes=3, d=5):
    """An .npz whose first feature is a unique id, so split membership is checkable."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(n, d)).astype(np.float32) * np.arange(1, d + 1) + 10
    x[:, 0] = np.arange(n)
    y = np.arange(n) % classes
    path = tmp_path / "arrays.npz"
    np.savez(path, x=x, y=y)
    return path, x, y


def test_splits_are_disjoint_stratified_and_seeded(tmp_path):
    path, x, y = _unique_arrays(tmp_path)
    dm = DataModule(source="arrays", root=str(path), val_fraction=0.2, test_fraction=0.25)
    ids = {name: set(dm.split(name)[0][:, 0].astype(int)) for name in ("train", "val", "test")}
    assert not (ids["train"] & ids["val"]) and not (ids["train"] & ids["test"])
    assert not (ids["val"] & ids["test"])
    assert set.union(*ids.values()) == set(range(len(x)))
    assert len(ids["test"]) == 75 and len(ids["val"]) == 45
    for name in ("train", "val", "test"):  # stratified: each class keeps its third
        counts = np.bincount(dm.split(name)[1], minlength=3)
        assert counts.max() - counts.min() <= 1
    again = DataModule(source="arrays", root=str(path), val_fraction=0.2, test_fraction=0.25)
    np.testing.assert_array_equal(again.split("val")[0], dm.split("val")[0])
    other = DataModule(
        source="arrays", root=str(path), val_fraction=0.2, test_fraction=0.25, seed=1
    )
    assert set(other.split("val")[0][:, 0].astype(int)) != ids["val"]


def test_normalizer_statistics_are_those_of_the_train_split_alone(tmp_path):
    path, _, _ = _unique_arrays(tmp_path)
    dm = DataModule(source="arrays", root=str(path), batch_size=8)
    model = Classifier(
        net=partial(MLP, hidden=[]),
        input_norm=NormalizeConfig(kind="standardize"),
        input_shape=dm.input_shape,
        num_classes=dm.num_classes,
    )
    trainer = Trainer(max_steps=1, logger=False, enable_checkpointing=False, barebones=True)
    trainer.fit(model, dm)  # the model's setup fits its input normalization
    train = dm.split("train")[0].astype(np.float64)
    everything = np.concatenate([train, dm.split("val")[0], dm.split("test")[0]])
    with torch.no_grad():
        out = model.input_norm(torch.from_numpy(dm.split("train")[0])).double().numpy()
    expected = (train - train.mean(0)) / train.std(0)
    np.testing.assert_allclose(out, expected, atol=1e-4)
    # ... and not those of all the data (which would leak val/test into training).
    leaky = (train - everything.mean(0)) / everything.std(0)
    assert np.abs(out - leaky).max() > 1e-2


def test_image_batches_are_nchw_uint8_and_scaled_on_the_device():
    dm = DataModule(source="digits", batch_size=16)
    dm.setup("fit")
    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (16, 1, 8, 8) and x.dtype == torch.uint8 and y.dtype == torch.int64
    x_norm, _ = dm.on_after_batch_transfer((x, y), 0)
    assert x_norm.dtype == torch.float32
    assert dm.input_shape == (1, 8, 8) and dm.num_classes == 10


def test_tabular_sources_give_n_by_d():
    for name, d, k in (("wine", 13, 3), ("breast_cancer", 30, 2)):
        dm = DataModule(source=name, batch_size=8)
        dm.setup("fit")
        x, _ = next(iter(dm.train_dataloader()))
        assert x.shape == (8, d) and dm.num_classes == k


def _write_idx(folder, prefix, images, labels, compress):
    opener = gzip.open if compress else open
    suffix = ".gz" if compress else ""
    with opener(folder / f"{prefix}-images-idx3-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">IIII", 2051, len(images), *images.shape[1:]) + images.tobytes())
    with opener(folder / f"{prefix}-labels-idx1-ubyte{suffix}", "wb") as f:
        f.write(struct.pack(">II", 2049, len(labels)) + labels.tobytes())


@pytest.mark.parametrize("compress", [True, False])
def test_mnist_reads_idx_files_a_test_writes(tmp_path, monkeypatch, compress):
    monkeypatch.setenv("DNN_TRICKS_CACHE", str(tmp_path / "cache"))
    rng = np.random.default_rng(0)
    train = rng.integers(0, 256, size=(40, 28, 28), dtype=np.uint8)
    test = rng.integers(0, 256, size=(10, 28, 28), dtype=np.uint8)
    labels = (np.arange(40) % 10).astype(np.uint8)
    _write_idx(tmp_path, "train", train, labels, compress)
    _write_idx(tmp_path, "t10k", test, labels[:10], compress)
    data = load_source("mnist", root=str(tmp_path))
    np.testing.assert_array_equal(data.x[..., 0], train)
    np.testing.assert_array_equal(data.test_x[..., 0], test)
    np.testing.assert_array_equal(data.y, labels)


def test_cifar10_reads_python_batches_a_test_writes(tmp_path, monkeypatch):
    batches = write_cifar10_batches(tmp_path, per_batch=4, monkeypatch=monkeypatch)
    data = load_source("cifar10", root=str(tmp_path))
    assert data.x.shape == (20, 32, 32, 3) and data.test_x.shape == (4, 32, 32, 3)
    first = batches["data_batch_1"][0][0].reshape(3, 32, 32).transpose(1, 2, 0)
    np.testing.assert_array_equal(data.x[0], first)
    assert data.classes[:2] == ["c0", "c1"] and data.y[:4].tolist() == [0, 1, 2, 3]


def test_image_folder_with_train_and_test_subfolders(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                pixels = rng.integers(0, 256, size=(12, 10, 3), dtype=np.uint8)
                Image.fromarray(pixels).save(tmp_path / split / cls / f"{i}.png")
    data = load_source("image_folder", root=str(tmp_path))
    assert data.x.shape == (12, 12, 10, 3) and data.test_x.shape == (4, 12, 10, 3)
    assert data.classes == ["cat", "dog"] and data.input_shape == (3, 12, 10)


@requires_fashion_mnist()
def test_fashion_mnist_from_the_debian_folder():
    data = load_source("fashion_mnist")
    assert data.x.shape == (60000, 28, 28, 1) and data.test_x.shape == (10000, 28, 28, 1)
    assert np.bincount(data.test_y).tolist() == [1000] * 10
