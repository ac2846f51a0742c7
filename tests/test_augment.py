"""Augmentation pipelines: loading, errors, seeding, picklability and the preview grid."""

import collections
import copy
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader, Dataset

# albumentations comes through our module, which sets NO_ALBUMENTATIONS_UPDATE before the
# import; importing it directly here would let it query PyPI for updates.
from dnn_tricks.data.augment import (
    A,
    Augment,
    load_pipeline,
    preview_grid,
    save_grid_png,
    seed_augment,
    worker_init_fn,
)

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "augment"
SHIPPED = ["light", "medium", "occlusion"]


def _images(shape, n=6, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (n, *shape), dtype=np.uint8)


def _reference():
    return A.Compose([A.HorizontalFlip(p=0.5), A.Affine(rotate=(-15, 15), p=0.7)])


def _continuous():
    """Every call draws continuous parameters, so two streams never coincide by chance."""
    return A.Compose([A.Affine(rotate=(-30, 30), p=1.0), A.GaussNoise(p=1.0)])


# ----------------------------------------------------------------------------- loading


def test_none_means_no_augmentation():
    assert load_pipeline(None) is None


@pytest.mark.parametrize("wrapped", [True, False])
def test_inline_dict_matches_albumentations_own_round_trip(wrapped):
    spec = A.to_dict(_reference())
    if not wrapped:
        spec = spec["transform"]
    assert A.to_dict(load_pipeline(spec)) == A.to_dict(_reference())


@pytest.mark.parametrize("fmt, suffix", [("json", ".json"), ("yaml", ".yaml")])
def test_file_written_by_a_save_loads(tmp_path, fmt, suffix):
    path = tmp_path / f"pipe{suffix}"
    A.save(_reference(), str(path), data_format=fmt)
    assert A.to_dict(load_pipeline(path)) == A.to_dict(_reference())
    assert A.to_dict(load_pipeline(str(path))) == A.to_dict(_reference())


def test_single_transform_is_wrapped_in_compose():
    pipe = load_pipeline({"__class_fullname__": "HorizontalFlip", "p": 1.0})
    assert isinstance(pipe, A.Compose)
    image = _images((5, 7, 3), n=1)[0]
    np.testing.assert_array_equal(Augment(pipe, seed=0)(image), image[:, ::-1])


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_is_what_albumentations_reads(name):
    path = CONFIGS / f"{name}.yaml"
    ours = load_pipeline(path)
    assert A.to_dict(ours) == A.to_dict(A.load(str(path), data_format="yaml"))


@pytest.mark.parametrize("name", SHIPPED)
@pytest.mark.parametrize("shape", [(8, 8, 1), (28, 28, 1), (32, 32, 3), (28, 28, 3)])
def test_shipped_config_keeps_shape_and_dtype(name, shape):
    augment = Augment(load_pipeline(CONFIGS / f"{name}.yaml"), seed=1)
    for image in _images(shape, n=12):
        out = augment(image)
        assert out.shape == shape and out.dtype == np.uint8
        assert out.flags.c_contiguous  # torch.from_numpy needs positive strides
        torch.from_numpy(out)


def test_output_matches_numpy_flip_and_grayscale_keeps_channel_axis():
    augment = Augment(A.Compose([A.HorizontalFlip(p=1.0)]), seed=0)
    image = _images((6, 9, 1), n=1)[0]
    np.testing.assert_array_equal(augment(image), image[:, ::-1])
    np.testing.assert_array_equal(augment(image[:, :, 0]), image[:, ::-1])


# ----------------------------------------------------------------------------- errors


def _compose(*transforms):
    return {"__class_fullname__": "Compose", "transforms": list(transforms)}


def _assert_one_line(exc_info, *parts):
    message = str(exc_info.value)
    assert "\n" not in message
    for part in parts:
        assert part in message, (part, message)


def test_unknown_transform_names_position_and_suggestion():
    spec = _compose({"__class_fullname__": "HorizontalFlip"}, {"__class_fullname__": "GausNoise"})
    with pytest.raises(ValueError) as exc:
        load_pipeline({"__version__": "2.0.8", "transform": spec})
    _assert_one_line(exc, "data.augment", "#2", "'GausNoise'", "did you mean 'GaussNoise'")


def test_bad_parameter_names_transform_key_and_value():
    spec = _compose({"__class_fullname__": "Rotate", "limit": "abc", "p": 0.5})
    with pytest.raises(ValueError) as exc:
        load_pipeline(spec)
    _assert_one_line(exc, "#1", "'Rotate'", "limit='abc'", "valid number")


def test_unknown_argument_is_an_error_with_suggestion():
    spec = _compose({"__class_fullname__": "Rotate", "limt": 10})
    with pytest.raises(ValueError) as exc:
        load_pipeline(spec)
    _assert_one_line(exc, "#1", "'Rotate'", "'limt'", "did you mean 'limit'")


def test_nested_transform_error_names_its_path():
    inner = {"__class_fullname__": "OneOf", "p": 0.5, "transforms": [
        {"__class_fullname__": "Blur", "p": 0.5},
        {"__class_fullname__": "GaussianBlur", "p": 1.5},
    ]}  # fmt: skip
    with pytest.raises(ValueError) as exc:
        load_pipeline(_compose({"__class_fullname__": "HorizontalFlip"}, inner))
    _assert_one_line(exc, "#2.2", "'GaussianBlur'", "p=1.5")


def test_missing_file_names_path(tmp_path):
    path = tmp_path / "nope.yaml"
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_pipeline(path)


def test_pipeline_that_leaves_uint8_is_refused():
    augment = Augment(A.Compose([A.ToFloat(p=1.0)]), seed=0)
    with pytest.raises(TypeError, match="ToFloat"):
        augment(_images((8, 8, 1), n=1)[0])


# ----------------------------------------------------------------------------- seeding


def _draws(augment, images):
    return np.stack([augment(image) for image in images])


def test_same_seed_same_images_other_seed_other_images():
    images = _images((28, 28, 1), n=10)
    pipe = load_pipeline(CONFIGS / "medium.yaml")
    first = _draws(Augment(copy.deepcopy(pipe), seed=7), images)
    again = _draws(Augment(copy.deepcopy(pipe), seed=7), images)
    other = _draws(Augment(copy.deepcopy(pipe), seed=8), images)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first, other)


def test_default_seed_follows_torch_seed_and_rank(monkeypatch):
    images = _images((16, 16, 3), n=4)
    torch.manual_seed(123)
    a = _draws(Augment(_continuous()), images)
    torch.manual_seed(123)
    b = _draws(Augment(_continuous()), images)
    np.testing.assert_array_equal(a, b)
    monkeypatch.setenv("RANK", "1")
    torch.manual_seed(123)
    assert not np.array_equal(a, _draws(Augment(_continuous()), images))


def test_seed_augment_decouples_transforms():
    """A.Compose(seed=s) seeds every child alike, so two p=0.5 flips always fire together;
    after seed_augment they must be independent: P(exactly one) = 1/2."""
    image = _images((4, 4, 1), n=1)[0]
    flips = [A.HorizontalFlip(p=0.5), A.VerticalFlip(p=0.5)]
    pipe = A.Compose(flips, seed=1, save_applied_params=True)

    def exactly_one(n=400):
        return sum(len(pipe(image=image)["applied_transforms"]) == 1 for _ in range(n)) / n

    assert exactly_one() == 0.0  # albumentations' own seeding: fully coupled
    seed_augment(pipe, 1)
    assert 0.4 < exactly_one() < 0.6  # 4 standard deviations of a fair coin over 400 draws


class _Same(Dataset):
    """Eight copies of one image: any difference between outputs comes from the stream."""

    def __init__(self, augment):
        self.augment = augment
        self.image = _images((12, 12, 1), n=1)[0]

    def __len__(self):
        return 8

    def __getitem__(self, index):
        return torch.from_numpy(self.augment(self.image))


def _load(init_fn, seed=0):
    torch.manual_seed(seed)
    loader = DataLoader(
        _Same(Augment(_continuous(), seed=3)), batch_size=1, num_workers=2, worker_init_fn=init_fn
    )
    return torch.cat(list(loader))


def test_worker_init_fn_gives_workers_distinct_reproducible_streams():
    # DataLoader hands samples round-robin: index 0 to worker 0, index 1 to worker 1.
    plain = _load(None)
    assert torch.equal(plain[0], plain[1])  # the bug: both workers copy one generator
    seeded = _load(worker_init_fn)
    assert not torch.equal(seeded[0], seeded[1])
    assert torch.equal(seeded, _load(worker_init_fn))
    assert not torch.equal(seeded, _load(worker_init_fn, seed=1))


def test_augment_pickles_with_its_state():
    augment = Augment(load_pipeline(CONFIGS / "medium.yaml"), seed=5)
    images = _images((28, 28, 1), n=6)
    clone = pickle.loads(pickle.dumps(augment))
    np.testing.assert_array_equal(_draws(clone, images), _draws(augment, images))


# ----------------------------------------------------------------------------- preview


def test_preview_grid_layout_by_hand(tmp_path):
    n, h, w, c, draws, pad = 3, 10, 7, 3, 4, 2
    images = _images((h, w, c), n=n)
    augment = Augment(_continuous(), seed=9)
    twin = copy.deepcopy(augment)
    grid = preview_grid(images, augment, draws=draws, pad=pad, pad_value=255)

    assert grid.shape == (n * h + (n + 1) * pad, (draws + 1) * w + (draws + 2) * pad, c)
    assert grid.dtype == np.uint8
    # Cell (row 1, col 0) is the original; (row 0, col 1) the first draw of the stream.
    np.testing.assert_array_equal(grid[pad + h + pad : pad + 2 * h + pad, pad : pad + w], images[1])
    first_draw = twin(images[0])
    np.testing.assert_array_equal(grid[pad : pad + h, 2 * pad + w : 2 * pad + 2 * w], first_draw)
    assert (grid[:pad] == 255).all() and (grid[:, :pad] == 255).all()
    # The preview drew from a copy: the training stream still starts where it did.
    np.testing.assert_array_equal(augment(images[0]), first_draw)

    path = save_grid_png(grid[..., :1], tmp_path / "sub" / "grid.png", scale=2)
    from PIL import Image

    saved = np.asarray(Image.open(path))
    assert saved.shape == (2 * grid.shape[0], 2 * grid.shape[1])
    np.testing.assert_array_equal(saved[::2, ::2], grid[..., 0])


def test_applied_frequencies_match_p():
    """Shipped medium pipeline: each transform fires at its configured rate (binomial, 4 sd)."""
    pipe = load_pipeline(CONFIGS / "medium.yaml")
    pipe.save_applied_params = True
    seed_augment(pipe, 0)
    image = _images((8, 8, 1), n=1)[0]
    n = 1000
    counts = collections.Counter()
    for _ in range(n):
        counts.update(name for name, _ in pipe(image=image)["applied_transforms"])
    for t in pipe.transforms:
        sd = (n * t.p * (1 - t.p)) ** 0.5
        assert abs(counts[type(t).__name__] - n * t.p) < 4 * sd, (type(t).__name__, counts)
