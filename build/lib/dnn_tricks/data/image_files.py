"""Image files decoded on demand: a lazy N x H x W x C uint8 store.

The DataModule indexes it like an array (``files[index]``) and the DataLoader workers do
the decoding, so memory is O(batch x workers), never O(dataset). Every file becomes the
configured channel count and size the same way: EXIF orientation applied, 16-bit scaled
to 8-bit, then (for evaluation) the short side resized and the centre cropped, so the
aspect ratio is never squashed.
"""

from __future__ import annotations

import copy
import os
import warnings
from collections.abc import Callable
from typing import Any, Literal

import numpy as np
from PIL import Image, ImageOps

BadFiles = Literal["error", "skip"]
GREY_MODES = frozenset({"1", "L", "LA", "La", "I", "F", "I;16", "I;16B", "I;16L", "I;16N"})
SIXTEEN_BIT = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
# EXIF orientations 5..8 store the picture turned by 90 degrees (width and height swapped).
_TRANSPOSED = frozenset({5, 6, 7, 8})
# Bicubic, as timm's evaluation transforms: at 2-3x downscaling it keeps edges that
# bilinear blurs (a Fashion-MNIST round trip through 28-64 px files: mean error 5 vs 7 levels).
_FIT_FILTER = Image.Resampling.BICUBIC


class BadImageError(ValueError):
    """A file that cannot be decoded; its message stays one line across worker processes.

    torch re-raises a DataLoader worker's exception as ``type(err)(text)`` where ``text``
    starts with "Caught ... in DataLoader worker" and ends with the original traceback;
    this constructor keeps only the original message, so the CLI still prints one line.
    """

    def __init__(self, message: str) -> None:
        if message.startswith("Caught ") and "BadImageError: " in message:
            message = message.rstrip().rsplit("BadImageError: ", 1)[1]
        super().__init__(message)


def to_channels(image: Image.Image, channels: int) -> Image.Image:
    """An "L" (channels=1) or "RGB" (channels=3) copy of any PIL image.

    16-bit grey is scaled by 255/65535 (PIL's own conversion to "L" clips at 255 instead).
    Alpha is dropped as torchvision's loader does; palette images with a transparent
    colour go through RGBA first, as PIL asks.
    """
    if image.mode in SIXTEEN_BIT:
        wide = np.asarray(image, dtype=np.float32)
        image = Image.fromarray(np.clip(np.rint(wide / 257.0), 0, 255).astype(np.uint8), "L")
    elif image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    target = "L" if channels == 1 else "RGB"
    return image if image.mode == target else image.convert(target)


def fit_size(image: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Resize the short side to cover ``size`` (H, W), then crop the centre: no squashing."""
    height, width = size
    if image.size == (width, height):
        return image
    return ImageOps.fit(image, (width, height), method=_FIT_FILTER)


def decode(path: str, channels: int, size: tuple[int, int] | None) -> np.ndarray:
    """One file as H x W x C uint8: EXIF-oriented, ``channels`` channels, fitted to ``size``
    (None keeps the file's own size, for a training pipeline that crops it itself)."""
    with Image.open(path) as image:
        if size is not None and image.format == "JPEG":
            # Decode at 1/2, 1/4 or 1/8 scale when that still covers the target: libjpeg
            # then skips most of the work (PIL's draft never goes below the asked size).
            orientation = image.getexif().get(0x0112, 1)
            height, width = size[::-1] if orientation in _TRANSPOSED else size
            scale = max(height / image.height, width / image.width)
            need = (int(np.ceil(image.width * scale)), int(np.ceil(image.height * scale)))
            image.draft("L" if channels == 1 else "RGB", need)
        image = to_channels(ImageOps.exif_transpose(image), channels)
        if size is not None:
            image = fit_size(image, size)
        pixels = np.asarray(image)
    return pixels[:, :, None] if pixels.ndim == 2 else pixels


class ImageFiles:
    """Image files as a lazy uint8 array of shape N x H x W x C.

    ``files[index]`` decodes the selected files at the evaluation size; ``files.take(index)``
    is a smaller ImageFiles (the splits). Paths are kept as one NumPy bytes array, not a
    Python list, so forked DataLoader workers do not copy them page by page.

    Args:
        root: folder the paths are relative to.
        paths: relative paths (bytes, os.fsencode'd).
        size: (H, W) of every decoded image.
        channels: 1 (grey) or 3 (RGB).
        bad_files: ``error`` raises a one-line error naming a file that fails to decode;
            ``skip`` drops it from its batch with a warning naming it.
    """

    ndim = 4
    dtype = np.dtype(np.uint8)

    def __init__(
        self,
        root: str,
        paths: np.ndarray,
        size: tuple[int, int],
        channels: int,
        bad_files: BadFiles = "error",
    ) -> None:
        self.root, self.paths = root, paths
        self.size, self.channels, self.bad_files = (int(size[0]), int(size[1])), channels, bad_files

    def __len__(self) -> int:
        return len(self.paths)

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self), *self.size, self.channels)

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return (self.channels, *self.size)

    def path(self, i: int) -> str:
        return os.path.join(self.root, os.fsdecode(self.paths[i]))

    def take(self, index: Any) -> ImageFiles:
        return ImageFiles(self.root, self.paths[index], self.size, self.channels, self.bad_files)

    def __getitem__(self, index: Any) -> np.ndarray:
        return self.batch(index)[0]

    def prepare(self, augment: Any) -> None:
        """Called once in the main process with the train split's pipeline: see mark_sizing."""
        mark_sizing(augment, self.size, self.channels)

    def batch(
        self, index: Any, transform: Callable[[np.ndarray], np.ndarray] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Decoded images of ``index`` and the positions (into ``index``) that decoded;
        with ``transform`` (a training pipeline) each image is augmented as it comes."""
        positions = np.arange(len(self.paths))[index]
        scalar = positions.ndim == 0
        positions = np.atleast_1d(positions)
        sizing = transform is not None and getattr(transform, "sets_size", False)
        images, kept = [], []
        for k, i in enumerate(positions):
            image = self._read(int(i), None if sizing else self.size)
            if image is None:
                continue
            if transform is not None:
                image = self._checked(transform(image), int(i))
            images.append(image)
            kept.append(k)
        if not images:
            shape = (0, *self.size, self.channels)
            return np.zeros(shape, np.uint8), np.zeros(0, np.int64)
        stacked = np.stack(images)
        return (stacked[0] if scalar else stacked), np.asarray(kept, dtype=np.int64)

    def _read(self, i: int, size: tuple[int, int] | None) -> np.ndarray | None:
        path = self.path(i)
        try:
            return decode(path, self.channels, size)
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as err:
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            if self.bad_files == "skip":
                warnings.warn(
                    f"data.bad_files=skip: skipped {path}, which failed to decode ({reason})",
                    stacklevel=2,
                )
                return None
            raise BadImageError(
                f"cannot decode image file {path} ({reason}); fix or remove it, "
                "or set data.bad_files: skip"
            ) from None

    def _checked(self, image: np.ndarray, i: int) -> np.ndarray:
        if image.shape[:2] != self.size:
            raise ValueError(
                f"data.augment turned {self.path(i)} into {image.shape[0]}x{image.shape[1]} "
                f"pixels, not data.image_size {list(self.size)}; give its size-setting "
                "transform (e.g. RandomResizedCrop) size = data.image_size"
            )
        return image


def mark_sizing(augment: Any, size: tuple[int, int], channels: int, draws: int = 8) -> Any:
    """Tell whether a training pipeline sets the image size itself, and mark it.

    A pipeline whose output is ``size`` whatever its input (RandomResizedCrop to the image
    size) gets the decoded file at full resolution; one that keeps its input's size (flips,
    colour) gets the evaluation-resized image. Anything else is an error now, not a batch
    of mixed sizes later. A copy of the pipeline draws, so the training stream is untouched.
    """
    if augment is None:
        return None
    probe = copy.deepcopy(augment)
    odd = (2 * size[0] + 3, 2 * size[1] + 7)
    outputs = {probe(np.zeros((*odd, channels), np.uint8)).shape[:2] for _ in range(draws)}
    if outputs == {tuple(size)}:
        augment.sets_size = True
    elif outputs == {odd}:
        augment.sets_size = False
    else:
        shown = ", ".join(f"{h}x{w}" for h, w in sorted(outputs))
        raise ValueError(
            f"data.augment turns a {odd[0]}x{odd[1]} image into {shown}: it must either keep "
            f"the size (flips, colour) or always give data.image_size {list(size)} "
            "(e.g. RandomResizedCrop with that size and p=1)"
        )
    return augment
