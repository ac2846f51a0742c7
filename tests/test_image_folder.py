"""image_folder: files of any size and mode become the configured input, decoded lazily in
the loaders; unreadable files are named or skipped with a log; bad layouts get one line."""

from __future__ import annotations

import pickle
from pathlib import Path

import albumentations as A
import numpy as np
import pytest
import torch
import yaml
from PIL import Image
from torch.utils.data import DataLoader

from conftest import CONFIGS, requires_fashion_mnist, shrink_args
from dnn_tricks.app import TrainerCLI
from dnn_tricks.data.augment import Augment
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.data.datasets import ArrayDataset, collate_batch
from dnn_tricks.data.image_files import BadImageError, ImageFiles, decode
from dnn_tricks.data.sources import load_source

RNG = np.random.default_rng(0)


def _rgb(h, w):
    return RNG.integers(0, 256, size=(h, w, 3), dtype=np.uint8)


def _folder(root, per_class=6, classes=("cat", "dog"), size=(12, 10), fmt="png"):
    for cls in classes:
        (root / cls).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(_rgb(*size)).save(root / cls / f"{i}.{fmt}")
    return root


# ---------------------------------------------------------------- modes and sizes


def test_modes_become_the_configured_channels(tmp_path):
    rgb = _rgb(9, 7)
    rgba = np.dstack([rgb, RNG.integers(0, 256, size=(9, 7), dtype=np.uint8)])
    wide = RNG.integers(0, 65536, size=(9, 7)).astype(np.uint16)
    palette = Image.fromarray(rgb).quantize(colors=6)
    Image.fromarray(rgb).save(tmp_path / "rgb.png")
    Image.fromarray(rgba, "RGBA").save(tmp_path / "rgba.png")
    Image.fromarray(wide).save(tmp_path / "wide.png")
    palette.save(tmp_path / "pal.png")
    assert Image.open(tmp_path / "wide.png").mode == "I;16"

    def read(name, channels):
        return decode(str(tmp_path / name), channels, (9, 7))

    np.testing.assert_array_equal(read("rgb.png", 3), rgb)
    np.testing.assert_array_equal(read("rgba.png", 3), rgb)  # alpha dropped, colour kept
    # palette: each index looked up in the palette by hand
    table = np.array(palette.getpalette()[:18], dtype=np.uint8).reshape(6, 3)
    np.testing.assert_array_equal(read("pal.png", 3), table[np.asarray(palette)])
    # 16-bit grey scaled by 255/65535, then repeated into RGB
    grey16 = np.rint(wide / 257.0).astype(np.uint8)
    np.testing.assert_array_equal(read("wide.png", 1)[..., 0], grey16)
    np.testing.assert_array_equal(read("wide.png", 3), np.repeat(grey16[..., None], 3, axis=2))
    # RGB to grey: ITU-R 601-2 luma, L = (299 R + 587 G + 114 B) / 1000 (PIL's documented rule)
    luma = (rgb.astype(np.float64) @ np.array([299, 587, 114])) / 1000
    assert np.abs(read("rgb.png", 1)[..., 0] - luma).max() <= 1.0


def test_exif_orientation_is_applied(tmp_path):
    stored = _rgb(12, 8)
    exif = Image.Exif()
    exif[0x0112] = 6  # EXIF: "rotate 90 degrees clockwise to display"
    Image.fromarray(stored).save(tmp_path / "turned.png", exif=exif)
    np.testing.assert_array_equal(
        decode(str(tmp_path / "turned.png"), 3, (8, 12)), np.rot90(stored, k=-1)
    )


@pytest.mark.parametrize(("size", "target", "box"), [((40, 80), (20, 20), (20, 0, 60, 40))])
def test_evaluation_resizes_the_short_side_and_crops_the_centre(tmp_path, size, target, box):
    pixels = _rgb(*size)
    Image.fromarray(pixels).save(tmp_path / "wide.png")
    out = decode(str(tmp_path / "wide.png"), 3, target)
    # Reference: crop the centre square by hand, then resize it: no squashing. (Only the
    # two outermost pixels may differ: resizing inside the whole image filters across the crop.)
    crop = Image.fromarray(pixels).crop(box).resize(target[::-1], Image.Resampling.BICUBIC)
    assert out.shape == (*target, 3)
    inner = (slice(2, -2), slice(2, -2))
    assert np.abs(out[inner].astype(int) - np.asarray(crop, dtype=int)[inner]).max() <= 1
    # The squashed alternative is far away (the test can tell the two apart).
    squashed = Image.fromarray(pixels).resize(target[::-1], Image.Resampling.BICUBIC)
    assert np.abs(out.astype(int) - np.asarray(squashed, dtype=int)).mean() > 10


def test_jpeg_draft_decoding_matches_a_full_decode(tmp_path):
    rows, cols = np.mgrid[0:160, 0:240]
    smooth = np.dstack([rows * 255 // 159, cols * 255 // 239, (rows + cols) * 255 // 398])
    Image.fromarray(smooth.astype(np.uint8)).save(tmp_path / "big.jpg", quality=95)
    fast = decode(str(tmp_path / "big.jpg"), 3, (20, 30))
    full = np.asarray(Image.open(tmp_path / "big.jpg").convert("RGB").resize((30, 20)), dtype=int)
    assert np.abs(fast.astype(int) - full).mean() < 3


def test_mixed_folder_gets_channels_by_majority_and_a_lazy_store(tmp_path):
    root = tmp_path / "imgs"
    for cls, sizes in (("a", [(30, 20), (41, 33)]), ("b", [(28, 64), (50, 50)])):
        (root / cls).mkdir(parents=True)
        for i, (h, w) in enumerate(sizes):
            Image.fromarray(_rgb(h, w)[..., 0]).save(root / cls / f"{i}.png")  # grey
    Image.fromarray(_rgb(20, 20)).save(root / "a" / "colour.jpg")
    data = load_source("image_folder", root=str(root), image_size=(16, 24))
    assert isinstance(data.x, ImageFiles) and data.input_shape == (1, 16, 24)
    assert len(pickle.dumps(data.x)) < 2000  # paths only, no pixels
    batch = data.x[np.arange(5)]
    assert batch.shape == (5, 16, 24, 1) and batch.dtype == np.uint8
    colour = load_source("image_folder", root=str(root), image_size=(16, 24), channels=3)
    assert colour.input_shape == (3, 16, 24)


# ---------------------------------------------------------------- training pipelines


def _banded(root):
    """64 x 32 images, the top 12 rows white: the centre crop to a square never shows them."""
    (root / "a").mkdir(parents=True)
    (root / "b").mkdir(parents=True)
    pixels = np.zeros((64, 32), np.uint8)
    pixels[:12] = 255  # (the crop starts at row 16; the filter reaches 2 rows out)
    for cls in ("a", "b"):
        for i in range(4):
            Image.fromarray(pixels).save(root / cls / f"{i}.png")
    return root


def test_a_size_setting_pipeline_gets_the_full_image_others_the_evaluation_resize(tmp_path):
    data = load_source("image_folder", root=str(_banded(tmp_path / "f")), image_size=(16, 16))
    evaluated = data.x[np.arange(8)]
    assert evaluated.max() == 0  # the centre square holds no white row

    sizing = Augment(A.Compose([A.Resize(16, 16)]), seed=0)
    x, _ = ArrayDataset(data.x, data.y, transform=sizing).__getitems__(range(8))
    assert sizing.sets_size and x[:, 0, :2].float().mean() == 255  # saw the white band

    flip = Augment(A.Compose([A.HorizontalFlip(p=1.0)]), seed=0)
    x, _ = ArrayDataset(data.x, data.y, transform=flip).__getitems__(range(8))
    assert not flip.sets_size
    np.testing.assert_array_equal(x.permute(0, 2, 3, 1).numpy(), evaluated[:, :, ::-1])

    with pytest.raises(ValueError, match="data.augment turns a 35x39 image into 5x5"):
        ArrayDataset(data.x, data.y, transform=Augment(A.Compose([A.RandomCrop(5, 5)]), seed=0))


# ---------------------------------------------------------------- unreadable files


def _bad_files(root):
    _folder(root, per_class=4, fmt="jpg")
    whole = (root / "cat" / "0.jpg").read_bytes()
    (root / "cat" / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (root / "dog" / "text.png").write_text("not an image")
    (root / "dog" / "empty.jpg").write_bytes(b"")
    png = root / "dog" / "cut.png"
    Image.fromarray(_rgb(12, 10)).save(png)
    png.write_bytes(png.read_bytes()[:-30])
    (root / "dog" / "notes.txt").write_text("ignored, and said so")
    return root


def test_unreadable_files_stop_with_their_name_by_default(tmp_path):
    root = _bad_files(tmp_path / "f")
    with pytest.raises(ValueError, match=r"cannot read 4 image file\(s\), first .*truncated.jpg"):
        load_source("image_folder", root=str(root))


def test_skip_leaves_them_out_and_says_which(tmp_path):
    root = _bad_files(tmp_path / "f")
    with pytest.warns(UserWarning) as caught:
        data = load_source("image_folder", root=str(root), bad_files="skip")
    log = " ".join(str(w.message) for w in caught)
    assert "skipped 4 of 12 file(s)" in log
    for name in ("truncated.jpg", "text.png", "empty.jpg", "cut.png", "notes.txt"):
        assert name in log
    assert len(data.y) == 8 and data.x[np.arange(8)].shape == (8, 12, 10, 3)


def test_a_file_broken_after_indexing_is_named_across_worker_processes(tmp_path):
    data = load_source("image_folder", root=str(_folder(tmp_path / "f", per_class=4)))
    (tmp_path / "f" / "dog" / "2.png").write_bytes(b"garbage")
    loader = DataLoader(
        ArrayDataset(data.x, data.y), batch_size=8, num_workers=1, collate_fn=collate_batch
    )
    with pytest.raises(BadImageError) as info:
        next(iter(loader))
    assert str(info.value).startswith("cannot decode image file ")
    assert "dog/2.png" in str(info.value) and "\n" not in str(info.value)

    skipping = ImageFiles(data.x.root, data.x.paths, data.x.size, 3, bad_files="skip")
    with pytest.warns(UserWarning, match="skipped .*dog/2.png"):
        x, y = ArrayDataset(skipping, data.y).__getitems__(range(8))
    assert len(x) == len(y) == 7 and y.tolist() == [0, 0, 0, 0, 1, 1, 1]


def test_large_folders_are_checked_in_worker_processes_with_the_same_verdicts(tmp_path):
    from dnn_tricks.data.image_folder import _check_all, check_file

    paths = []
    for i in range(300):  # above the size at which the checks go to a process pool
        path = tmp_path / f"{i}.png"
        Image.fromarray(_rgb(4 + i % 5, 6)).save(path)
        paths.append(str(path))
    Path(paths[123]).write_bytes(b"broken")
    pooled = _check_all(paths)
    assert pooled == [check_file(p) for p in paths]
    assert isinstance(pooled[123], str) and pooled[7] == ("RGB", (6, 6))


# ---------------------------------------------------------------- splits and fitting


def test_split_is_stratified_seeded_and_fit_batches_are_evaluation_sized(tmp_path):
    root = tmp_path / "f"
    for cls, h in (("a", 20), ("b", 30), ("c", 40)):
        (root / cls).mkdir(parents=True)
        for i in range(10):
            Image.fromarray(_rgb(h, 25 + i)).save(root / cls / f"{i}.png")
    kw = dict(source="image_folder", root=str(root), image_size=(8, 8), batch_size=4)
    dm = DataModule(**kw, val_fraction=0.2, test_fraction=0.2)
    for name, n in (("train", 19), ("val", 5), ("test", 6)):  # sklearn rounds held-out up
        _, y = dm.split(name)
        assert len(y) == n and np.bincount(y, minlength=3).max() - np.bincount(y).min() <= 1
    again = DataModule(**kw, val_fraction=0.2, test_fraction=0.2)
    np.testing.assert_array_equal(again.split("val")[0].paths, dm.split("val")[0].paths)
    # The normalizer's inputs: the train split, unaugmented, at the evaluation size.
    x, _ = dm.split("train")
    fitted = torch.cat(list(dm.raw_batches("train", batch=5)))
    reference = np.stack([decode(x.path(i), 3, (8, 8)) for i in range(len(x))])
    np.testing.assert_allclose(fitted.permute(0, 2, 3, 1).numpy(), reference / 255.0, rtol=1e-6)
    # ... or a seeded sample of it, the same for every DataModule of that seed.
    sampled = DataModule(**kw, val_fraction=0.2, test_fraction=0.2, fit_samples=5)
    first = torch.cat(list(sampled.raw_batches("train")))
    assert first.shape == (5, 3, 8, 8) and torch.equal(
        first, torch.cat(list(sampled.raw_batches()))
    )
    assert any(torch.equal(first[0], row) for row in fitted)


def test_own_train_val_test_folders(tmp_path):
    for split in ("train", "val", "test"):
        _folder(tmp_path / split, per_class=3 if split == "train" else 2)
    dm = DataModule(source="image_folder", root=str(tmp_path), batch_size=2)
    assert [len(dm.split(n)[1]) for n in ("train", "val", "test")] == [6, 4, 4]
    assert dm.input_shape == (3, 12, 10)  # one size: no image_size needed


# ---------------------------------------------------------------- bad input, one line each


def _run_bad(run_cli, capsys, tmp_path, root, *extra):
    with pytest.raises(SystemExit) as info:
        run_cli(
            [
                "fit",
                "--config",
                CONFIGS / "digits.yaml",
                *shrink_args(tmp_path / "logs"),
                "--data.source=image_folder",
                f"--data.root={root}",
                *extra,
            ]
        )
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_bad_layouts_get_one_line(run_cli, capsys, tmp_path):
    empty_class = _folder(tmp_path / "e")
    (empty_class / "bird").mkdir()
    line = _run_bad(run_cli, capsys, tmp_path, empty_class, "--data.image_size=[8,8]")
    assert "class folder 'bird' holds no images" in line

    (tmp_path / "none").mkdir()
    line = _run_bad(run_cli, capsys, tmp_path, tmp_path / "none")
    assert "holds no images in class sub-folders" in line

    _folder(tmp_path / "s" / "train")
    _folder(tmp_path / "s" / "test", classes=("cat", "dog", "fox"))
    line = _run_bad(run_cli, capsys, tmp_path, tmp_path / "s")
    assert "test/ has class folder(s) ['fox'] that train/ lacks" in line

    mixed = _folder(tmp_path / "m")
    Image.fromarray(_rgb(30, 30)).save(mixed / "cat" / "big.png")
    line = _run_bad(run_cli, capsys, tmp_path, mixed)
    assert "mixes image sizes" in line and "set data.image_size: [H, W]" in line


# ---------------------------------------------------------------- real data, real check

REAL_TRAIN, REAL_TEST, REAL_EPOCHS = 12000, 10000, 3


@pytest.mark.slow
@requires_fashion_mnist()
def test_fashion_mnist_as_files_trains_like_the_arrays(tmp_path):
    """Fashion-MNIST written as PNG and JPEG files upscaled to 28-64 px, read back through
    image_folder at 28 x 28, trains the ConvNet to the accuracy of the same images held in
    memory (same samples, splits, seed and budget): within 1.5 points on 10,000 test images.
    Measured on the 2-core machine: 0.8880 (arrays) vs 0.8874 (files), 4 min under load."""
    fm = load_source("fashion_mnist")
    rng = np.random.default_rng(0)

    def per_class(y, n):  # class-major, like the folder's order, so the splits coincide
        return np.concatenate([np.flatnonzero(y == c)[: n // 10] for c in range(10)])

    train, test = per_class(fm.y, REAL_TRAIN), per_class(fm.test_y, REAL_TEST)
    arrays = tmp_path / "fm.npz"
    np.savez(arrays, x=fm.x[train], y=fm.y[train], x_test=fm.test_x[test], y_test=fm.test_y[test])
    for split, x, y in (
        ("train", fm.x[train], fm.y[train]),
        ("test", fm.test_x[test], fm.test_y[test]),
    ):
        for k, (pixels, label) in enumerate(zip(x[..., 0], y, strict=True)):
            folder = tmp_path / "files" / split / f"c{label}"
            folder.mkdir(parents=True, exist_ok=True)
            side = int(rng.integers(28, 65))
            image = Image.fromarray(pixels).resize((side, side), Image.Resampling.BICUBIC)
            image.save(folder / f"{k:05d}.{'png' if k % 2 else 'jpg'}", quality=95)
    config = tmp_path / "convnet.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "seed_everything": 0,
                "trainer": {
                    "max_epochs": REAL_EPOCHS,
                    "accelerator": "cpu",
                    "deterministic": True,
                    "enable_progress_bar": False,
                    "enable_model_summary": False,
                    "enable_checkpointing": False,
                    "logger": {
                        "class_path": "dnn_tricks.loggers.TensorBoardLogger",
                        "init_args": {"save_dir": str(tmp_path / "logs")},
                    },
                },
                "model": {
                    "input_norm": {"kind": "standardize", "per_channel": True},
                    "net": {
                        "class_path": "dnn_tricks.models.nets.ConvNet",
                        "init_args": {
                            "channels": [32, 64],
                            "convs_per_stage": 1,
                            "hidden": [128],
                            "norm": "batch",
                            "dropout": 0.25,
                        },
                    },
                    "optimizer": {
                        "class_path": "torch.optim.SGD",
                        "init_args": {
                            "lr": 0.05,
                            "momentum": 0.9,
                            "nesterov": True,
                            "weight_decay": 5e-4,
                        },
                    },
                    # An annealed LR: the last weights, not a noisy point of a constant-LR
                    # walk, are compared (constant LR: gaps of 1.0 and 1.9 points measured).
                    "scheduler": {
                        "class_path": "torch.optim.lr_scheduler.OneCycleLR",
                        "init_args": {"max_lr": 0.1, "pct_start": 0.25},
                    },
                    "scheduler_interval": "step",
                },
                "data": {"batch_size": 128, "val_fraction": 0.1},
            }
        )
    )
    sources = {
        "arrays": ["--data.source=arrays", f"--data.root={arrays}"],
        "files": [
            "--data.source=image_folder",
            f"--data.root={tmp_path / 'files'}",
            "--data.image_size=[28,28]",
            "--data.channels=1",
        ],
    }
    accuracy = {}
    for name, keys in sources.items():
        cli = TrainerCLI(
            args=["--config", str(config), *keys, f"--trainer.logger.init_args.name={name}"],
            run=False,
        )
        assert cli.datamodule.input_shape == (1, 28, 28)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        (result,) = cli.trainer.test(cli.model, datamodule=cli.datamodule, verbose=False)
        accuracy[name] = result["test/acc"]
    print(f"Fashion-MNIST test accuracy: {accuracy}")
    assert accuracy["arrays"] > 0.8
    assert abs(accuracy["arrays"] - accuracy["files"]) <= 0.015
