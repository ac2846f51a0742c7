"""``data.predict_path``: new, unlabelled inputs for ``trainer predict``.

A folder of images (searched recursively; each is decoded, EXIF-oriented and fitted to the
training input size and channels exactly as evaluation does), a ``.npz`` (array ``x``) or
``.npy`` of inputs shaped like the training inputs, or a CSV of tabular features with the
training feature count (a header row is recognised and skipped). The model's own input
normalization (fitted on the train split, stored in the checkpoint) is applied by the model.
"""

from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Any

import numpy as np

from dnn_tricks.data.image_files import BadFiles, ImageFiles

KEY = "data.predict_path"


def _images(folder: Path, input_shape: tuple[int, ...], bad_files: BadFiles) -> tuple[Any, list]:
    from dnn_tricks.data.image_folder import IMAGE_EXTENSIONS, check_file

    if len(input_shape) != 3:
        raise ValueError(
            f"{KEY}={str(folder)!r} is a folder of images, but the model takes "
            f"{input_shape[0]} tabular features; give a CSV, .npy or .npz instead"
        )
    found = sorted(
        os.path.relpath(os.path.join(top, name), folder)
        for top, _, names in os.walk(folder, followlinks=True)
        for name in names
        if name.lower().endswith(IMAGE_EXTENSIONS)
    )
    if not found:
        raise ValueError(
            f"{KEY}={str(folder)!r} holds no image files ({', '.join(IMAGE_EXTENSIONS)})"
        )
    bad = [(p, r) for p in found if isinstance(r := check_file(str(folder / p)), str)]
    if bad and bad_files == "error":
        raise ValueError(
            f"{KEY}={str(folder)!r}: cannot read {len(bad)} image file(s), first "
            f"{folder / bad[0][0]} ({bad[0][1]}); fix or remove them, or set data.bad_files: skip"
        )
    if bad:
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"data.bad_files=skip: not predicting {len(bad)} unreadable file(s): "
            + "; ".join(f"{p} ({r})" for p, r in bad)
        )
    skipped = {p for p, _ in bad}
    kept = [p for p in found if p not in skipped]
    channels, height, width = input_shape
    paths = np.array([os.fsencode(p) for p in kept], dtype=np.bytes_)
    files = ImageFiles(str(folder), paths, (height, width), channels, bad_files)
    return files, [str(folder / p) for p in kept]


def _csv_rows(path: Path, features: int) -> np.ndarray:
    with open(path, newline="") as handle:
        rows = [row for row in csv.reader(handle) if row]
    if not rows:
        raise ValueError(f"{KEY}={str(path)!r} is an empty CSV")
    try:
        [float(v) for v in rows[0]]
    except ValueError:
        rows = rows[1:]  # a header row
    widths = {len(row) for row in rows}
    if widths != {features}:
        width = sorted(widths - {features})[0] if widths - {features} else features
        raise ValueError(
            f"{KEY}={str(path)!r} has rows of {width} columns, but the model was trained on "
            f"{features} features; give one column per training feature, in training order"
        )
    try:
        x = np.array(rows, dtype=np.float32)
    except ValueError as err:
        raise ValueError(
            f"{KEY}={str(path)!r} holds a value that is not a number ({err})"
        ) from None
    if not np.isfinite(x).all():
        row, column = np.argwhere(~np.isfinite(x))[0]
        raise ValueError(f"{KEY}={str(path)!r} holds NaN or Inf (row {row}, column {column})")
    return x


def _array(path: Path) -> Any:
    if path.suffix == ".npy":
        from dnn_tricks.data.arrays import MappedRows

        return MappedRows(str(path))
    with np.load(path, allow_pickle=False) as arrays:
        names = arrays.files
        if "x" not in names and len(names) != 1:
            raise ValueError(f"{KEY}={str(path)!r} holds {names}; name the inputs array x")
        x = arrays["x" if "x" in names else names[0]]
    x = x[..., None] if x.ndim == 3 else x
    return x if x.ndim == 4 else x.astype(np.float32)


def predict_inputs(
    path: str, input_shape: tuple[int, ...], bad_files: BadFiles = "error"
) -> tuple[Any, list]:
    """(inputs as the loaders index them, one id per input: file path or row number)."""
    target = Path(path)
    if not target.exists():
        raise FileNotFoundError(
            f"{KEY}={path!r} does not exist; give a folder of images, a .npz/.npy of inputs "
            "or a CSV of features"
        )
    if target.is_dir():
        return _images(target, input_shape, bad_files)
    suffix = target.suffix.lower()
    if suffix == ".csv":
        if len(input_shape) != 1:
            raise ValueError(f"{KEY}={path!r} is a CSV, but the model takes images; give a folder")
        x = _csv_rows(target, input_shape[0])
    elif suffix in (".npy", ".npz"):
        x = _array(target)
    else:
        raise ValueError(f"{KEY}={path!r}: use a folder of images, a .npz, a .npy or a .csv")
    expected = input_shape if len(input_shape) == 1 else (*input_shape[1:], input_shape[0])
    if tuple(x.shape[1:]) != tuple(expected) or (x.ndim == 4 and x.dtype != np.uint8):
        shown = "x".join(map(str, expected))
        raise ValueError(
            f"{KEY}={path!r} holds inputs of shape {'x'.join(map(str, x.shape[1:]))} "
            f"{x.dtype}, the model takes {shown}{' uint8' if x.ndim == 4 else ''} per sample"
        )
    return x, list(range(len(x)))
