"""Data sources: where samples come from, before any split, augmentation or normalization.

A source is a class with ``load() -> SourceData``. The built-in ones have short names in
``SOURCES`` (name -> class path, one place as timm keeps its norm layers); ``data.source``
takes a short name, a class path, or ``{class_path: ..., init_args: {...}}`` for a user's
own :class:`Source` subclass written outside the project.

Images are uint8 N x H x W x C (what albumentations transforms and what is cheapest to move
to the device), held in memory, memory-mapped, or as files decoded on demand (image_folder);
tabular data is float32 N x D. Labels are int64 in 0..K-1.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

CHUNKS_META = "dnn_tricks_chunks.json"  # marks a folder written by trainer prepare-data

# Short names of the built-in sources; a class path works wherever a short name does.
SOURCES: dict[str, str] = {
    "digits": "dnn_tricks.data.sources.Digits",
    "wine": "dnn_tricks.data.sources.Wine",
    "breast_cancer": "dnn_tricks.data.sources.BreastCancer",
    "fashion_mnist": "dnn_tricks.data.vision_sources.FashionMNIST",
    "mnist": "dnn_tricks.data.vision_sources.MNIST",
    "cifar10": "dnn_tricks.data.vision_sources.CIFAR10",
    "arrays": "dnn_tricks.data.arrays.Arrays",
    "image_folder": "dnn_tricks.data.image_folder.ImageFolder",
    "streaming": "dnn_tricks.data.streaming.Streaming",
}


@dataclass
class SourceData:
    """The samples of one source.

    ``x`` is anything indexable by an integer array that gives a batch: an ndarray (in
    memory or memory-mapped) or a lazy row store (image files, LitData chunks). ``test_*``
    and ``val_*`` are None when the source has no such split of its own; the DataModule
    then holds one out, stratified and seeded.
    """

    x: Any
    y: np.ndarray
    classes: list[str]
    test_x: Any = None
    test_y: np.ndarray | None = None
    val_x: Any = None
    val_y: np.ndarray | None = None

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def input_shape(self) -> tuple[int, ...]:
        """Shape of one model input: C x H x W for images, D for tabular data."""
        shape = getattr(self.x, "input_shape", None)
        if shape is not None:  # lazy row stores know it without reading a sample
            return tuple(shape)
        if self.x.ndim == 4:
            height, width, channels = self.x.shape[1:]
            return (channels, height, width)
        return tuple(self.x.shape[1:])


class Source:
    """Base of every data source: subclass it and implement :meth:`load`.

    Constructor arguments are the source's configuration (``init_args`` in YAML). A built-in
    source may also take ``root``, ``download``, ``image_size``, ``channels`` or ``bad_files``:
    when it is named by short name, the DataModule's keys of those names are passed on.

    Example (a file of your own, no edit inside the project)::

        class Blobs(Source):
            def __init__(self, n: int = 300) -> None:
                self.n = n

            def load(self) -> SourceData:
                x, y = sklearn.datasets.make_blobs(self.n, random_state=0)
                return SourceData(x=x.astype("float32"), y=y, classes=["a", "b", "c"])

    and ``data: {source: {class_path: my_module.Blobs, init_args: {n: 500}}}``.
    """

    def load(self) -> SourceData:
        raise NotImplementedError(f"{type(self).__name__} must implement load() -> SourceData")


# ----------------------------------------------------------------------------- scikit-learn


def _sklearn(loader: Callable, as_image: tuple[int, int] | None = None) -> SourceData:
    bunch = loader()
    x = bunch.data.astype(np.float32)
    if as_image is not None:
        # digits are 8 x 8 images with 17 grey levels (0..16); store them as uint8 0..255
        # so they go through the same image path (and augmentation) as any other image.
        x = np.rint(x.reshape(-1, *as_image, 1) * (255.0 / 16.0)).astype(np.uint8)
    names = [str(name) for name in getattr(bunch, "target_names", np.unique(bunch.target))]
    return SourceData(x=x, y=bunch.target.astype(np.int64), classes=names)


class Digits(Source):
    """scikit-learn's 8 x 8 handwritten digits (1,797 images, embedded, no download)."""

    def load(self) -> SourceData:
        from sklearn.datasets import load_digits

        return _sklearn(load_digits, as_image=(8, 8))


class Wine(Source):
    """scikit-learn's wine recognition data (178 x 13 features, 3 classes)."""

    def load(self) -> SourceData:
        from sklearn.datasets import load_wine

        return _sklearn(load_wine)


class BreastCancer(Source):
    """scikit-learn's Wisconsin breast cancer data (569 x 30 features, 2 classes)."""

    def load(self) -> SourceData:
        from sklearn.datasets import load_breast_cancer

        return _sklearn(load_breast_cancer)


# ----------------------------------------------------------------------------- resolving


def _import_class(path: str) -> type:
    module_name, _, class_name = path.rpartition(".")
    try:
        cls = getattr(importlib.import_module(module_name), class_name) if module_name else None
    except ImportError as err:
        raise ValueError(
            f"data.source={path!r} cannot be imported ({err}); use a short name "
            f"({', '.join(SOURCES)}) or a class path importable from where you run"
        ) from None
    if not (isinstance(cls, type) and issubclass(cls, Source)):
        raise ValueError(
            f"data.source={path!r} is unknown; choose one of: {', '.join(SOURCES)}, "
            "or give the class path of a dnn_tricks.data.sources.Source subclass"
        )
    return cls


def build_source(spec: str | Source, **keys: Any) -> Source:
    """The source object for ``data.source``: a short name or class path (built with the
    DataModule ``keys`` its constructor takes), or an already built :class:`Source`.

    A key that is set (not None / False) but that the source does not take is an error,
    so a setting is never silently ignored.
    """
    if isinstance(spec, Source):
        given = [k for k, v in keys.items() if v not in (None, False)]
        if given:
            raise ValueError(
                f"data.{given[0]} does not apply when data.source is given by class_path; "
                "put it in data.source.init_args"
            )
        return spec
    if not isinstance(spec, str):
        raise TypeError(f"data.source must be a name, a class path or a Source, got {spec!r}")
    cls = _import_class(SOURCES.get(spec, spec))
    accepted = inspect.signature(cls.__init__).parameters
    unused = [k for k, v in keys.items() if k not in accepted and v not in (None, False)]
    if unused:
        raise ValueError(
            f"data.{unused[0]} does not apply to data.source={spec!r}; remove it "
            f"(that source takes: {', '.join(p for p in accepted if p != 'self') or 'nothing'})"
        )
    return cls(**{k: v for k, v in keys.items() if k in accepted and v is not None})


def source_label(spec: str | Source) -> str:
    """How a source is named in messages: its short name, or its class path."""
    return spec if isinstance(spec, str) else f"{type(spec).__module__}.{type(spec).__qualname__}"


def load_source(spec: str | Source, root: str | None = None, download: bool = False, **keys: Any):
    """Load the source ``spec``; downloads happen only when ``download`` is true."""
    if spec != "streaming" and root and (Path(root) / CHUNKS_META).is_file():
        raise ValueError(
            f"data.root={root!r} holds chunks written by trainer prepare-data, which "
            f"data.source={source_label(spec)!r} cannot read; set data.source: streaming"
        )
    data = build_source(spec, root=root, download=download, **keys).load()
    if not isinstance(data, SourceData):
        raise TypeError(
            f"data.source={source_label(spec)!r}: load() returned {type(data).__name__}, "
            "not a dnn_tricks.data.sources.SourceData"
        )
    if len(data.y) == 0:
        label = source_label(spec)
        raise ValueError(f"data.source={label!r} (data.root={root!r}) holds no samples")
    return data
