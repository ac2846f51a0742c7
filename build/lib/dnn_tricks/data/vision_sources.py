"""The torchvision-format sources: MNIST and Fashion-MNIST (IDX files) and CIFAR-10
(python batches), read from disk, downloaded only when ``data.download`` says so."""

from __future__ import annotations

import gzip
import hashlib
import os
import shutil
from pathlib import Path

import numpy as np

from dnn_tricks.data.sources import Source, SourceData

FASHION_MNIST_DEBIAN = "/usr/share/datasets/fashion-mnist"

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


class FashionMNIST(Source):
    """Fashion-MNIST from its IDX files (60k train + 10k test, 28 x 28 grey).

    Args:
        root: folder of the IDX files (.gz or not); null uses Debian's
            /usr/share/datasets/fashion-mnist.
        download: let torchvision download them into ``root``.
    """

    def __init__(self, root: str | None = None, download: bool = False) -> None:
        self.root, self.download = root, download

    def load(self) -> SourceData:
        from torchvision.datasets import FashionMNIST as Reader

        root = self.root or FASHION_MNIST_DEBIAN
        return _idx_source(Reader, "Fashion-MNIST", root, self.download)


class MNIST(Source):
    """MNIST from its IDX files (60k train + 10k test, 28 x 28 grey).

    Args:
        root: folder of the IDX files; null uses ./data.
        download: let torchvision download them into ``root``.
    """

    def __init__(self, root: str | None = None, download: bool = False) -> None:
        self.root, self.download = root, download

    def load(self) -> SourceData:
        from torchvision.datasets import MNIST as Reader

        return _idx_source(Reader, "MNIST", self.root or "data", self.download)


class CIFAR10(Source):
    """CIFAR-10 from its python batches (50k train + 10k test, 32 x 32 RGB).

    Args:
        root: parent folder of cifar-10-batches-py/; null uses ./data.
        download: let torchvision download them into ``root``.
    """

    def __init__(self, root: str | None = None, download: bool = False) -> None:
        self.root, self.download = root, download

    def load(self) -> SourceData:
        from torchvision.datasets import CIFAR10 as Reader

        root = self.root or "data"
        try:
            train = Reader(root, train=True, download=self.download)
            test = Reader(root, train=False, download=self.download)
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
