"""Sources: the registry of short names and class paths, a user's own source by class path
(tests/plugins/my_source.py, from outside the package), and memory-mapped .npy arrays."""

from __future__ import annotations

import importlib
import pickle

import numpy as np
import pytest
import yaml
from plugins.my_source import TwoMoons
from sklearn.datasets import make_moons

from conftest import CONFIGS, REPO, shrink_args
from dnn_tricks.data.arrays import MappedRows
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.data.sources import SOURCES, Source, SourceData, build_source, load_source

PLUGIN_YAML = REPO / "tests" / "plugins" / "my_source.yaml"


def test_every_short_name_is_a_class_path_to_a_source():
    for name, path in SOURCES.items():
        module, _, cls = path.rpartition(".")
        assert issubclass(getattr(importlib.import_module(module), cls), Source), name
        assert type(build_source(name)).__name__ == cls


def test_a_class_path_works_where_a_short_name_does():
    by_name = load_source("wine")
    by_path = load_source("dnn_tricks.data.sources.Wine")
    np.testing.assert_array_equal(by_name.x, by_path.x)


def test_keys_a_source_does_not_take_are_errors_not_ignored():
    with pytest.raises(ValueError, match=r"data.image_size does not apply to data.source='wine'"):
        build_source("wine", image_size=(8, 8))
    with pytest.raises(ValueError, match="put it in data.source.init_args"):
        build_source(TwoMoons(), root="somewhere")
    with pytest.raises(ValueError, match=r"data.source='no_such' is unknown; choose one of"):
        build_source("no_such")
    with pytest.raises(ValueError, match="cannot be imported"):
        build_source("nowhere_module.Thing")


def test_load_must_return_source_data():
    class Wrong(Source):
        def load(self):
            return np.zeros((3, 2))

    with pytest.raises(TypeError, match="load\\(\\) returned ndarray, not a"):
        load_source(Wrong())


def test_own_source_from_a_test_module_through_the_cli(run_cli, tmp_path):
    """The README's example, run as written: one file of the user's plus a YAML overlay."""
    logs = tmp_path / "logs"
    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "wine.yaml",
            "--config",
            PLUGIN_YAML,
            *shrink_args(logs, epochs=1, batches=2),
            "--test_after_fit=false",
        ]
    )
    (saved,) = logs.glob("*/version_0/config.yaml")
    source = yaml.safe_load(saved.read_text())["data"]["source"]
    assert source["class_path"] == "plugins.my_source.TwoMoons"
    assert source["init_args"] == {"samples": 600, "noise": 0.2, "seed": 0}


def test_own_source_is_split_like_a_built_in_one():
    dm = DataModule(source=TwoMoons(samples=400, noise=0.1), val_fraction=0.25, test_fraction=0.2)
    x, y = make_moons(400, noise=0.1, random_state=0)  # the reference: scikit-learn itself
    parts = [dm.split(name) for name in ("train", "val", "test")]
    assert [len(p[1]) for p in parts] == [240, 80, 80]
    joined = np.concatenate([p[0] for p in parts])
    order = np.lexsort(joined.T)
    np.testing.assert_allclose(joined[order], x.astype(np.float32)[np.lexsort(x.T)])
    assert dm.class_names == ["upper", "lower"] and dm.input_shape == (2,)
    for _, labels in parts:  # stratified: both moons in each split equally
        assert abs(int(labels.sum()) * 2 - len(labels)) <= 1


# ---------------------------------------------------------------- memory-mapped arrays


def _write_npy(folder, x, y, **test):
    folder.mkdir()
    np.save(folder / "x.npy", x)
    np.save(folder / "y.npy", y)
    for name, value in test.items():
        np.save(folder / f"{name}.npy", value)
    return folder


def test_npy_folder_is_memory_mapped_and_read_row_by_row(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6))  # float64 on disk: read as float32 a batch at a time
    x[:, 0] = np.arange(500)
    y = np.arange(500) % 4
    data = load_source("arrays", root=str(_write_npy(tmp_path / "a", x, y)))
    assert isinstance(data.x, MappedRows) and isinstance(data.x._array, np.memmap)
    index = np.array([7, 3, 499])
    np.testing.assert_array_equal(data.x[index], x[index].astype(np.float32))
    # A split is an index into the file, never a copy of it; pickling sends the file name.
    dm = DataModule(source="arrays", root=str(tmp_path / "a"), val_fraction=0.2, test_fraction=0.2)
    train, labels = dm.split("train")
    assert isinstance(train, MappedRows) and len(train) == 320
    ids = train[np.arange(len(train))][:, 0].astype(int)
    np.testing.assert_array_equal(labels, y[ids])
    assert len(pickle.dumps(train)) < 8 * len(train) + 2000  # the index, not 320 x 6 floats
    again = pickle.loads(pickle.dumps(train))
    np.testing.assert_array_equal(again[np.arange(5)], train[np.arange(5)])


def test_npy_images_and_a_test_pair(tmp_path):
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, size=(40, 5, 6), dtype=np.uint8)  # grey, no channel axis
    folder = _write_npy(
        tmp_path / "imgs",
        x,
        np.arange(40) % 2,
        x_test=x[:10],
        y_test=np.arange(10) % 2,
    )
    data = load_source("arrays", root=str(folder))
    assert data.input_shape == (1, 5, 6) and data.x.shape == (40, 5, 6, 1)
    np.testing.assert_array_equal(data.x[np.arange(3)][..., 0], x[:3])
    assert len(data.test_y) == 10


@pytest.mark.parametrize(
    ("make", "expected"),
    [
        (lambda f: _write_npy(f, np.zeros((4, 2)), np.zeros(3, int)), "y must be a vector of 4"),
        (lambda f: _write_npy(f, np.full((4, 2), np.nan), np.zeros(4, int)), "x holds NaN"),
        (lambda f: _write_npy(f, np.zeros((4, 2, 2, 1)), np.zeros(4, int)), "must be uint8"),
    ],
)
def test_npy_mistakes_name_the_folder(tmp_path, make, expected):
    folder = make(tmp_path / "bad")
    with pytest.raises(ValueError, match=expected) as info:
        load_source("arrays", root=str(folder))
    assert str(folder) in str(info.value)


def test_npy_folder_missing_y(tmp_path):
    (tmp_path / "f").mkdir()
    np.save(tmp_path / "f" / "x.npy", np.zeros((3, 2)))
    with pytest.raises(FileNotFoundError, match="y.npy is missing"):
        load_source("arrays", root=str(tmp_path / "f"))


def test_source_data_of_a_user_without_test_split_gets_one_held_out():
    data = SourceData(x=np.zeros((50, 3), np.float32), y=np.arange(50) % 2, classes=["a", "b"])

    class Given(Source):
        def load(self):
            return data

    dm = DataModule(source=Given(), test_fraction=0.2, val_fraction=0.25, batch_size=8)
    assert [len(dm.split(n)[1]) for n in ("train", "val", "test")] == [30, 10, 10]
