"""``arrays``: your own NumPy arrays, from one .npz (loaded) or a folder of .npy files
(memory-mapped, so an array larger than memory trains with flat memory)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from dnn_tricks.data.sources import Source, SourceData

_CHECK_ROWS = 65536  # rows per chunk when scanning a mapped array for NaN/Inf


class MappedRows:
    """Rows of a memory-mapped .npy (``np.load(mmap_mode="r")``), selected by an index.

    Indexing reads only the rows asked for: images come back as uint8 N x H x W x C and
    tabular rows as float32, one batch at a time. It pickles as its file name and index,
    not its data, so spawned workers reopen the file instead of receiving a copy.

    Args:
        path: the .npy file.
        index: the rows of the file this view holds (None: all of them).
    """

    def __init__(self, path: str, index: np.ndarray | None = None) -> None:
        self.path = path
        self._array = np.load(path, mmap_mode="r", allow_pickle=False)
        self.index = np.arange(len(self._array)) if index is None else np.asarray(index)

    def __getstate__(self) -> dict[str, Any]:
        return {"path": self.path, "index": self.index}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__init__(state["path"], state["index"])  # type: ignore[misc]

    def __len__(self) -> int:
        return len(self.index)

    @property
    def shape(self) -> tuple[int, ...]:
        rest = self._array.shape[1:]
        return (len(self), *rest, 1) if len(rest) == 2 else (len(self), *rest)

    @property
    def ndim(self) -> int:
        return len(self.shape)

    @property
    def dtype(self) -> np.dtype:
        """The file's dtype for images (which must be uint8), float32 for tabular rows."""
        return self._array.dtype if self.ndim == 4 else np.dtype(np.float32)

    def take(self, index: Any) -> MappedRows:
        return MappedRows(self.path, self.index[index])

    def __getitem__(self, key: Any) -> np.ndarray:
        first, rest = (key[0], key[1:]) if isinstance(key, tuple) else (key, ())
        rows = np.asarray(self._array[self.index[first]])
        if self._array.ndim == 3 and rows.ndim == 3:  # grey images stored without channels
            rows = rows[..., None]
        if self.ndim == 2:
            rows = rows.astype(np.float32, copy=False)
        return rows[(slice(None), *rest)] if rest else rows


def _check(x: Any, y: np.ndarray, where: str) -> None:
    """The checks every array source passes, chunk by chunk so a mapped file stays mapped."""
    if x.ndim not in (2, 4):
        raise ValueError(f"{where}: x must be N x D, N x H x W or N x H x W x C, got {x.shape}")
    if x.ndim == 4 and x.dtype != np.uint8:
        raise ValueError(
            f"{where}: image arrays must be uint8 N x H x W [x C] (0..255), got {x.dtype}; "
            "convert them, or flatten to N x D for tabular data"
        )
    if y.ndim != 1 or len(y) != len(x):
        raise ValueError(f"{where}: y must be a vector of {len(x)} labels, got shape {y.shape}")
    if not np.issubdtype(y.dtype, np.integer):
        raise ValueError(f"{where}: y must hold integer class labels 0..K-1, got {y.dtype}")
    if x.ndim == 2:
        for start in range(0, len(x), _CHECK_ROWS):
            block = x[start : start + _CHECK_ROWS]
            if not np.isfinite(block).all():
                bad = np.argwhere(~np.isfinite(block))[0]
                raise ValueError(
                    f"{where}: x holds NaN or Inf (first at row {start + bad[0]}, column "
                    f"{bad[1]}); impute or drop those values first"
                )


def _in_memory(x: np.ndarray, y: np.ndarray, where: str) -> tuple[np.ndarray, np.ndarray]:
    x = x[..., None] if x.ndim == 3 else x
    x = x.astype(np.float32) if x.ndim == 2 else x
    _check(x, y, where)
    return x, y.astype(np.int64)


def _mapped(folder: Path, stem: str, where: str) -> tuple[MappedRows, np.ndarray] | None:
    x_path, y_path = folder / f"x{stem}.npy", folder / f"y{stem}.npy"
    if not x_path.is_file() and not y_path.is_file():
        return None
    if not (x_path.is_file() and y_path.is_file()):
        missing = y_path if x_path.is_file() else x_path
        raise FileNotFoundError(f"{where}: {missing.name} is missing; save it with np.save")
    x, y = MappedRows(str(x_path)), np.load(y_path, allow_pickle=False)
    _check(x, y, where)
    return x, y.astype(np.int64)


class Arrays(Source):
    """Your own arrays: ``x`` (N x D floats, or uint8 images N x H x W [x C]) and ``y``
    (integer labels 0..K-1), optionally ``x_test`` and ``y_test``.

    Args:
        root: a ``.npz`` holding them (loaded into memory), or a folder of ``x.npy`` and
            ``y.npy`` (and ``x_test.npy``, ``y_test.npy``), memory-mapped: only the rows of
            each batch are read, so arrays larger than memory train with flat memory.
    """

    def __init__(self, root: str | None = None) -> None:
        self.root = root

    def load(self) -> SourceData:
        root, where = self.root, f"data.root={self.root!r}"
        if root is not None and Path(root).is_dir():
            train = _mapped(Path(root), "", where)
            if train is None:
                raise FileNotFoundError(
                    f"{where} has no x.npy and y.npy; save them with np.save(folder/'x.npy', x)"
                )
            test = _mapped(Path(root), "_test", f"{where} test")
        elif root is not None and Path(root).is_file():
            with np.load(root, allow_pickle=False) as arrays:
                missing = [key for key in ("x", "y") if key not in arrays.files]
                if missing:
                    raise ValueError(
                        f"{where} lacks array(s) {', '.join(missing)} (it has "
                        f"{', '.join(arrays.files) or 'none'}); save it with "
                        "np.savez(path, x=..., y=...)"
                    )
                train = _in_memory(arrays["x"], arrays["y"], where)
                test = None
                if "x_test" in arrays.files and "y_test" in arrays.files:
                    test = _in_memory(arrays["x_test"], arrays["y_test"], f"{where} test")
        else:
            raise FileNotFoundError(
                f"{where} is neither a file nor a folder; the arrays source needs a .npz with "
                "arrays x and y, or a folder of x.npy and y.npy"
            )
        labels = np.concatenate([train[1], test[1]]) if test else train[1]
        classes = [str(c) for c in range(int(labels.max()) + 1)] if len(labels) else []
        return SourceData(
            x=train[0],
            y=train[1],
            classes=classes,
            test_x=test[0] if test else None,
            test_y=test[1] if test else None,
        )
