"""``image_folder``: class sub-folders of image files, indexed at setup, decoded in workers.

Layout: ``root/<class>/**/*.jpg`` (any depth), or ``root/train/<class>/...`` with
``root/test/<class>/...`` and optionally ``root/val/<class>/...`` as the source's own
splits. Indexing reads each file's header (PIL's ``verify`` for PNG, the end-of-image
marker for JPEG, a full decode for rarer formats), so a corrupt, truncated or non-image
file is found before training, not hours into it; pixels are decoded only by the loaders.
"""

from __future__ import annotations

import multiprocessing
import os
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image

from dnn_tricks.data.image_files import GREY_MODES, BadFiles, ImageFiles
from dnn_tricks.data.sources import Source, SourceData

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".ppm", ".pgm", ".bmp", ".tif", ".tiff", ".webp")
_JPEG_END = b"\xff\xd9"


def _log(message: str) -> None:
    from lightning.pytorch.utilities import rank_zero_warn

    rank_zero_warn(message)


def check_file(path: str) -> tuple[str, tuple[int, int]] | str:
    """(mode, (width, height)) of a readable image file, else the reason it is not one.

    Cheap where it can be: PNG's ``verify`` checks every chunk's CRC without inflating;
    a JPEG that ends in its end-of-image marker is taken as whole (one that does not is
    decoded, so a valid file with trailing bytes still passes); other formats decode fully.
    """
    try:
        with Image.open(path) as image:
            mode, size, kind = image.mode, image.size, image.format
            if kind == "PNG":
                image.verify()
            elif kind == "JPEG":
                with open(path, "rb") as raw:
                    raw.seek(-2, os.SEEK_END)
                    if raw.read(2) != _JPEG_END:
                        image.load()
            else:
                image.load()
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
        return str(err).splitlines()[0] if str(err) else type(err).__name__
    return mode, size


def _check_all(paths: list[str]) -> list:
    """check_file on every path, in worker processes: parallel past the GIL, and the heap
    they churn dies with them instead of staying in this process (and in every loader
    worker forked from it later)."""
    if len(paths) < 256:
        return [check_file(p) for p in paths]
    fork = "fork" in multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if fork else None)
    workers = max(1, min(8, os.cpu_count() or 1))
    with ProcessPoolExecutor(workers, mp_context=context) as pool:
        return list(pool.map(check_file, paths, chunksize=256))


def _class_folders(folder: Path) -> list[str]:
    classes = sorted(entry.name for entry in os.scandir(folder) if entry.is_dir())
    if not classes:
        raise ValueError(
            f"data.root={str(folder)!r} holds no images in class sub-folders; put each "
            "class's image files in a sub-folder named after the class"
        )
    return classes


def _list_files(folder: Path, classes: Sequence[str]) -> tuple[list[str], list[int], list[str]]:
    """Relative image paths, their class indices, and files skipped for their extension."""
    from torchvision.datasets.folder import make_dataset

    others: list[str] = []

    def is_image(path: str) -> bool:
        if path.lower().endswith(IMAGE_EXTENSIONS):
            return True
        others.append(os.path.relpath(path, folder))
        return False

    index = {name: i for i, name in enumerate(classes)}
    found = make_dataset(str(folder), index, is_valid_file=is_image, allow_empty=True)
    paths = [os.path.relpath(path, folder) for path, _ in found]
    return paths, [label for _, label in found], others


class _Index:
    """The checked files of one folder (a split): paths, labels, modes and sizes."""

    def __init__(self, folder: Path, classes: Sequence[str], bad_files: BadFiles) -> None:
        self.folder = folder
        paths, labels, others = _list_files(folder, classes)
        if others:
            _log(
                f"data.root={str(folder)!r}: ignored {len(others)} file(s) without an image "
                f"extension ({', '.join(IMAGE_EXTENSIONS)}): {', '.join(sorted(others))}"
            )
        checks = _check_all([str(folder / p) for p in paths])
        bad = [(p, c) for p, c in zip(paths, checks, strict=True) if isinstance(c, str)]
        if bad and bad_files == "error":
            path, reason = bad[0]
            raise ValueError(
                f"data.root={str(folder)!r}: cannot read {len(bad)} image file(s), first "
                f"{folder / path} ({reason}); fix or remove them, or set data.bad_files: skip"
            )
        if bad:
            _log(
                f"data.bad_files=skip: skipped {len(bad)} of {len(paths)} file(s) under "
                f"{folder} that cannot be read: "
                + "; ".join(f"{path} ({reason})" for path, reason in bad)
            )
        keep = [i for i, c in enumerate(checks) if not isinstance(c, str)]
        self.paths = np.array([os.fsencode(paths[i]) for i in keep], dtype=np.bytes_)
        self.labels = np.array([labels[i] for i in keep], dtype=np.int64)
        self.modes = Counter(checks[i][0] for i in keep)  # type: ignore[index]
        self.sizes = {checks[i][1]: paths[i] for i in keep}  # type: ignore[index]
        counts = np.bincount(self.labels, minlength=len(classes))
        for name, count in zip(classes, counts, strict=True):
            if count == 0 and (folder / name).is_dir():
                raise ValueError(
                    f"data.root={str(folder)!r}: class folder {name!r} holds no images "
                    "that can be read; add images to it or remove it"
                )


class ImageFolder(Source):
    """A folder of class sub-folders of image files of any size and mode.

    Args:
        root: the folder (``<class>/`` sub-folders, or ``train/``, ``test/`` and optionally
            ``val/`` each holding them).
        image_size: (H, W) of the model input. Evaluation resizes the short side and crops
            the centre; training uses ``data.augment`` (e.g. RandomResizedCrop to this
            size) or the evaluation resize. Needed when the files' sizes differ.
        channels: 1 (grey) or 3 (RGB); null takes what most files are.
        bad_files: ``error`` stops at the first unreadable file with its name; ``skip``
            leaves unreadable files out and logs how many and which.
    """

    def __init__(
        self,
        root: str | None = None,
        image_size: tuple[int, int] | None = None,
        channels: int | None = None,
        bad_files: BadFiles = "error",
    ) -> None:
        if channels not in (None, 1, 3):
            raise ValueError(f"data.channels={channels} must be 1 (grey), 3 (RGB) or null")
        if image_size is not None and (len(image_size) != 2 or min(image_size) < 1):
            raise ValueError(f"data.image_size={image_size} must be [height, width], positive")
        if bad_files not in ("error", "skip"):
            raise ValueError(f"data.bad_files={bad_files!r} must be 'error' or 'skip'")
        self.root, self.image_size, self.channels = root, image_size, channels
        self.bad_files: BadFiles = bad_files

    def load(self) -> SourceData:
        if self.root is None or not Path(self.root).is_dir():
            raise FileNotFoundError(
                f"data.root={self.root!r} is not a folder; image_folder needs data.root "
                "pointing at a folder of class sub-folders (optionally inside train/ and test/)"
            )
        root = Path(self.root)
        split_dirs = {s: root / s for s in ("train", "val", "test") if (root / s).is_dir()}
        if "train" in split_dirs and len(split_dirs) > 1:
            classes = _class_folders(split_dirs["train"])
            indexes = {}
            for split, folder in split_dirs.items():
                extra = sorted(set(_class_folders(folder)) - set(classes))
                if extra:
                    raise ValueError(
                        f"data.root={self.root!r}: {split}/ has class folder(s) {extra} that "
                        "train/ lacks; add them to train/ or remove them"
                    )
                indexes[split] = _Index(folder, classes, self.bad_files)
        else:
            classes = _class_folders(root)
            indexes = {"train": _Index(root, classes, self.bad_files)}
        if not len(indexes["train"].labels):
            raise ValueError(f"data.root={self.root!r} holds no images that can be read")
        size, channels = self._shape(indexes.values())
        files = {
            split: (ImageFiles(str(i.folder), i.paths, size, channels, self.bad_files), i.labels)
            for split, i in indexes.items()
        }
        return SourceData(
            x=files["train"][0],
            y=files["train"][1],
            classes=classes,
            test_x=files["test"][0] if "test" in files else None,
            test_y=files["test"][1] if "test" in files else None,
            val_x=files["val"][0] if "val" in files else None,
            val_y=files["val"][1] if "val" in files else None,
        )

    def _shape(self, indexes: Sequence[_Index]) -> tuple[tuple[int, int], int]:
        """data.image_size and data.channels, or what the files agree on."""
        modes: Counter = sum((i.modes for i in indexes), Counter())
        grey = sum(n for mode, n in modes.items() if mode in GREY_MODES)
        channels = self.channels or (1 if 2 * grey > sum(modes.values()) else 3)
        if self.image_size is not None:
            return (int(self.image_size[0]), int(self.image_size[1])), channels
        sizes: dict[tuple[int, int], str] = {}
        for index in indexes:
            for size, path in index.sizes.items():
                sizes.setdefault(size, str(index.folder / path))
        if len(sizes) > 1:
            (size_a, path_a), (size_b, path_b) = list(sizes.items())[:2]
            raise ValueError(
                f"data.root={self.root!r} mixes image sizes ({path_a} is {size_a[0]}x{size_a[1]}, "
                f"{path_b} is {size_b[0]}x{size_b[1]}); set data.image_size: [H, W] (the short "
                "side is resized and the centre cropped)"
            )
        width, height = next(iter(sizes))
        return (height, width), channels
