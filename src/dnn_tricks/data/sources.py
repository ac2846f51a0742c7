"""Named dataset sources: each returns raw arrays, before any split or normalization.

Images are kept as uint8 N x H x W x C (what albumentations transforms and what is cheapest
to move to the device); tabular data as float32 N x D. Labels are int64 in 0..K-1.
"""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"


@dataclass
class SourceData:
    """Raw arrays of one source; ``test_*`` is None when the source has no own test split."""

    x: np.ndarray
    y: np.ndarray
    classes: list[str]
    test_x: np.ndarray | None = None
    test_y: np.ndarray | None = None

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: C x H x W for images, D for tabular data."""
        if self.is_image:
            height, width, channels = self.x.shape[1:]
            return (channels, height, width)
        return tuple(self.x.shape[1:])


def _sklearn(loader: Callable, as_image: tuple[int, int] | None = None) -> SourceData:
    bunch = loader()
    x = bunch.data.astype(np.float32)
    if as_image is not None:
        # digits are 8 x 8 images with 17 grey levels (0..16); store them as uint8 0..255
        # so they go through the same image path (and augmentation) as any other image.
        x = np.rint(x.reshape(-1, *as_image, 1) * (255.0 / 16.0)).astype(np.uint8)
    names = [str(name) for name in getattr(bunch, "target_names", np.unique(bunch.target))]
    return SourceData(x=x, y=bunch.target.astype(np.int64), classes=names)


def load_digits_source(root: str | None, download: bool) -> SourceData:
    from sklearn.datasets import load_digits

    return _sklearn(load_digits, as_image=(8, 8))


def load_wine_source(root: str | None, download: bool) -> SourceData:
    from sklearn.datasets import load_wine

    return _sklearn(load_wine)


def load_breast_cancer_source(root: str | None, download: bool) -> SourceData:
    from sklearn.datasets import load_breast_cancer

    return _sklearn(load_breast_cancer)


_IDX_STEMS = (
    "train-images-idx3-ubyte",
    "train-labels-idx1-ubyte",
    "t10k-images-idx3-ubyte",
    "t10k-labels-idx1-ubyte",
)


def _cache_dir() -> Path:
    return Path(os.environ.get("DNN_TRICKS_CACHE", Path.home() / ".cache" / "dnn_tricks"))


def _find_idx_file(folders: list[Path], stem: str) -> Path | None:
    for folder in folders:
        for name in (stem, stem + ".gz"):
            if (folder / name).is_file():
                return folder / name
    return None


def _uncompressed(path: Path) -> Path:
    """torchvision's IDX readers take uncompressed files; unpack a .gz once into the cache."""
    if path.suffix != ".gz":
        return path
    stat = path.stat()
    key = hashlib.sha1(f"{path.resolve()}:{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()
    target = _cache_dir() / "idx" / key[:16] / path.stem
    if not target.is_file():
        target.parent.mkdir(parents=True, exist_ok=True)
        partial = target.with_suffix(".partial")
        with gzip.open(path, "rb") as src, open(partial, "wb") as dst:
            shutil.copyfileobj(src, dst)
        partial.replace(target)  # atomic: a concurrent reader never sees half a file
    return target


def _idx_source(dataset_cls: type, label: str, root: str, download: bool) -> SourceData:
    from torchvision.datasets.mnist import read_image_file, read_label_file

    if download:
        train = dataset_cls(root, train=True, download=True)
        test = dataset_cls(root, train=False, download=True)
        images, labels = train.data, train.targets
        test_images, test_labels = test.data, test.targets
        classes = list(train.classes)
    else:
        folder = Path(root)
        folders = [folder, folder / dataset_cls.__name__ / "raw"]
        files = [_find_idx_file(folders, stem) for stem in _IDX_STEMS]
        if any(f is None for f in files):
            missing = [s for s, f in zip(_IDX_STEMS, files, strict=True) if f is None]
            raise FileNotFoundError(
                f"data.root={root!r} has no {label} IDX files ({', '.join(missing)}[.gz]); "
                f"point data.root at the folder that holds them, or set data.download: true"
                + (" or install Debian's dataset-fashion-mnist" if label == "Fashion-MNIST" else "")
            )
        paths = [str(_uncompressed(f)) for f in files]  # type: ignore[arg-type]
        images, labels = read_image_file(paths[0]), read_label_file(paths[1])
        test_images, test_labels = read_image_file(paths[2]), read_label_file(paths[3])
        classes = list(dataset_cls.classes)
    return SourceData(
        x=images.numpy()[..., None],
        y=labels.numpy().astype(np.int64),
        classes=[str(c) for c in classes],
        test_x=test_images.numpy()[..., None],
        test_y=test_labels.numpy().astype(np.int64),
    )


def load_fashion_mnist_source(root: str | None, download: bool) -> SourceData:
    from torchvision.datasets import FashionMNIST

    return _idx_source(FashionMNIST, "Fashion-MNIST", root or FASHION_MNIST_DEBIAN, download)


def load_mnist_source(root: str | None, download: bool) -> SourceData:
    from torchvision.datasets import MNIST

    return _idx_source(MNIST, "MNIST", root or "data", download)


def load_cifar10_source(root: str | None, download: bool) -> SourceData:
    from torchvision.datasets import CIFAR10

    root = root or "data"
    try:
        train = CIFAR10(root, train=True, download=download)
        test = CIFAR10(root, train=False, download=download)
    except RuntimeError as err:
        raise FileNotFoundError(
            f"data.root={root!r} has no CIFAR-10 batches (cifar-10-batches-py/); "
            "set data.download: true to fetch them, or point data.root at their parent folder"
        ) from err
    return SourceData(
        x=np.ascontiguousarray(train.data),
        y=np.asarray(train.targets, dtype=np.int64),
        classes=list(train.classes),
        test_x=np.ascontiguousarray(test.data),
        test_y=np.asarray(test.targets, dtype=np.int64),
    )


def _read_image_folder(folder: Path) -> tuple[np.ndarray, np.ndarray, list[str]]:
    from PIL import Image
    from torchvision.datasets import ImageFolder

    try:
        index = ImageFolder(str(folder), loader=lambda path: path)  # pixels are read below
    except FileNotFoundError as error:
        raise ValueError(
            f"data.root={str(folder)!r} holds no images in class sub-folders ({error}); "
            "put each class's .png/.jpg files in a sub-folder named after the class"
        ) from None
    grey = all(Image.open(p).mode in ("L", "1", "I;16") for p, _ in index.samples)
    arrays, sizes = [], {}
    for path, _ in index.samples:
        with Image.open(path) as image:
            pixels = np.asarray(image.convert("L" if grey else "RGB"), dtype=np.uint8)
        sizes.setdefault(pixels.shape[:2], path)
        arrays.append(pixels[..., None] if grey else pixels)
    if len(sizes) > 1:
        (size_a, path_a), (size_b, path_b) = list(sizes.items())[:2]
        raise ValueError(
            f"data.root={str(folder)!r} mixes image sizes ({path_a} is {size_a[1]}x{size_a[0]}, "
            f"{path_b} is {size_b[1]}x{size_b[0]}); resize the images to one size first"
        )
    labels = np.asarray(index.targets, dtype=np.int64)
    return np.stack(arrays), labels, list(index.classes)


def load_image_folder_source(root: str | None, download: bool) -> SourceData:
    """A folder of class sub-folders; ``train/`` and ``test/`` sub-folders give the splits."""
    if root is None or not Path(root).is_dir():
        raise FileNotFoundError(
            f"data.root={root!r} is not a folder; image_folder needs data.root pointing at a "
            "folder of class sub-folders (optionally inside train/ and test/)"
        )
    folder = Path(root)
    if (folder / "train").is_dir() and (folder / "test").is_dir():
        x, y, classes = _read_image_folder(folder / "train")
        test_x, test_y, test_classes = _read_image_folder(folder / "test")
        if test_classes != classes:
            raise ValueError(f"data.root={root!r}: train/ and test/ have different class folders")
        return SourceData(x=x, y=y, classes=classes, test_x=test_x, test_y=test_y)
    x, y, classes = _read_image_folder(folder)
    return SourceData(x=x, y=y, classes=classes)


def _checked_arrays(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    if x.ndim == 3:
        x = x[..., None]
    if x.ndim == 4:
        if x.dtype != np.uint8:
            raise ValueError(
                f"{where}: image arrays must be uint8 N x H x W [x C] (0..255), got {x.dtype}; "
                "convert them, or flatten to N x D for tabular data"
            )
    elif x.ndim == 2:
        x = x.astype(np.float32)
        if not np.isfinite(x).all():
            bad = np.argwhere(~np.isfinite(x))[0]
            raise ValueError(
                f"{where}: x holds NaN or Inf (first at row {bad[0]}, column {bad[1]}); "
                "impute or drop those values first"
            )
    else:
        raise ValueError(f"{where}: x must be N x D, N x H x W or N x H x W x C, got {x.shape}")
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{where}: y must be a vector of {len(x)} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: y must hold integer class labels 0..K-1, got {y.dtype}")
    return x, y.astype(np.int64)


def load_arrays_source(root: str | None, download: bool) -> SourceData:
    """A .npz with ``x`` and ``y`` (and optionally ``x_test``, ``y_test``)."""
    if root is None or not Path(root).is_file():
        raise FileNotFoundError(
            f"data.root={root!r} is not a file; the arrays source needs data.root pointing "
            "at a .npz with arrays x and y"
        )
    with np.load(root, allow_pickle=False) as arrays:
        missing = [key for key in ("x", "y") if key not in arrays.files]
        if missing:
            raise ValueError(
                f"data.root={root!r} lacks array(s) {', '.join(missing)} (it has "
                f"{', '.join(arrays.files) or 'none'}); save it with np.savez(path, x=..., y=...)"
            )
        x, y = _checked_arrays(arrays["x"], arrays["y"], f"data.root={root!r}")
        test = None
        if "x_test" in arrays.files and "y_test" in arrays.files:
            test = _checked_arrays(arrays["x_test"], arrays["y_test"], f"data.root={root!r} test")
    labels = np.concatenate([y, test[1]]) if test else y
    classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
    return SourceData(
        x=x,
        y=y,
        classes=classes,
        test_x=test[0] if test else None,
        test_y=test[1] if test else None,
    )


SOURCES: dict[str, Callable[[str | None, bool], SourceData]] = {
    "digits": load_digits_source,
    "wine": load_wine_source,
    "breast_cancer": load_breast_cancer_source,
    "fashion_mnist": load_fashion_mnist_source,
    "mnist": load_mnist_source,
    "cifar10": load_cifar10_source,
    "image_folder": load_image_folder_source,
    "arrays": load_arrays_source,
}


def load_source(name: str, root: str | None = None, download: bool = False) -> SourceData:
    """Load the source ``name``; downloads happen only when ``download`` is true."""
    if name not in SOURCES:
        raise ValueError(f"data.source={name!r} is unknown; choose one of: {', '.join(SOURCES)}")
    data = SOURCES[name](root, download)
    if len(data.x) == 0:
        raise ValueError(f"data.source={name!r} (data.root={root!r}) holds no samples")
    return data
