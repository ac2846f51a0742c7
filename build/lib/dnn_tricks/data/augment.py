"""Data augmentation: albumentations pipelines from config, seeded per run, worker and rank.

A pipeline is written in albumentations' own serialized form (what ``A.to_dict`` / ``A.save``
write), so any albumentations transform is a config value without a wrapper of ours. The train
Dataset calls an :class:`Augment` on each raw HWC uint8 image; tensors and normalization come
later. Shipped pipelines live in ``configs/augment/``.
"""

from __future__ import annotations

import os

# albumentations checks PyPI for updates at import; this project never touches the network.
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import copy  # noqa: E402
import difflib  # noqa: E402
import inspect  # noqa: E402
import json  # noqa: E402
import random  # noqa: E402
import warnings  # noqa: E402
from collections.abc import Iterator, Mapping  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import albumentations as A  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from albumentations.core.serialization import (  # noqa: E402
    SERIALIZABLE_REGISTRY,
    register_additional_transforms,
    shorten_class_name,
)
from pydantic import ValidationError  # noqa: E402

KEY = "data.augment"

__all__ = [
    "Augment",
    "load_pipeline",
    "preview_grid",
    "save_grid_png",
    "seed_augment",
    "stream_seed",
    "worker_init_fn",
]


# ----------------------------------------------------------------------------- loading


def load_pipeline(spec: Mapping[str, Any] | str | os.PathLike | None) -> A.Compose | None:
    """Build an albumentations pipeline from a config value.

    ``spec`` is the dict ``A.to_dict`` writes (with or without its ``__version__`` wrapper),
    a path to a ``.json`` / ``.yaml`` file written by ``A.save``, or ``None`` (no augmentation).
    Every transform is constructed once on its own first, so a bad entry fails with one line
    naming its position, class and argument instead of a pydantic dump from inside
    ``A.from_dict``; unknown arguments are errors here (albumentations only warns).
    """
    if spec is None:
        return None
    if isinstance(spec, (str, os.PathLike)):
        spec = _read_file(Path(spec))
    if not isinstance(spec, Mapping):
        raise TypeError(
            f"{KEY} must be albumentations' serialized dict (A.to_dict), a path to a file "
            f"written by A.save, or null; got {type(spec).__name__}"
        )
    body = spec if "__class_fullname__" in spec else spec.get("transform")
    if not isinstance(body, Mapping) or "__class_fullname__" not in body:
        raise ValueError(
            f"{KEY} needs '__class_fullname__' at its top or under 'transform' "
            f"(write it with A.to_dict or A.save); got keys {sorted(spec)}"
        )
    with warnings.catch_warnings():
        # The checking pass repeats albumentations' own warnings; A.from_dict below emits them.
        warnings.simplefilter("ignore")
        _check_node(body, label="", top=True)
    pipeline = A.from_dict({"transform": dict(body)})
    return pipeline if isinstance(pipeline, A.Compose) else A.Compose([pipeline])


def _read_file(path: Path) -> Any:
    if not path.is_file():
        raise FileNotFoundError(f"{KEY}: pipeline file '{path}' does not exist")
    text = path.read_text()
    # Same formats as A.save / A.load: json by default, yaml when the suffix says so.
    if path.suffix.lower() in (".yaml", ".yml"):
        return yaml.safe_load(text)
    return json.loads(text)


def _check_node(node: Any, label: str, top: bool = False) -> Any:
    """Construct one serialized transform (children first) and raise a one-line error."""
    where = f"transform #{label}" if label else "the top-level transform"
    if not isinstance(node, Mapping) or not isinstance(node.get("__class_fullname__"), str):
        raise ValueError(f"{KEY}: {where} must be a mapping with a '__class_fullname__' key")
    register_additional_transforms()
    name = shorten_class_name(node["__class_fullname__"])
    cls = SERIALIZABLE_REGISTRY.get(name)
    if cls is None:
        close = difflib.get_close_matches(name, SERIALIZABLE_REGISTRY, n=1)
        hint = f"did you mean '{close[0]}'?" if close else "see albumentations' transform list"
        raise ValueError(f"{KEY}: {where} '{name}' is unknown; {hint}")
    args = {k: v for k, v in node.items() if k != "__class_fullname__"}

    params = inspect.signature(cls.__init__).parameters
    if not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        allowed = [p for p in params if p != "self"]
        for key in args:
            if key not in allowed:
                close = difflib.get_close_matches(key, allowed, n=1)
                hint = f"did you mean '{close[0]}'?" if close else f"choose from {allowed}"
                raise ValueError(f"{KEY}: {where} '{name}' has no argument '{key}'; {hint}")

    p = args.get("p", 0.5)  # composes take p without validating it
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0 <= p <= 1:
        raise ValueError(f"{KEY}: {where} '{name}' rejects p={p!r}: p must be a number in [0, 1]")
    if "transforms" in args:
        children = args["transforms"]
        if not isinstance(children, list):
            raise ValueError(f"{KEY}: {where} '{name}' needs 'transforms' as a list")
        prefix = "" if top else f"{label}."
        args["transforms"] = [_check_node(c, f"{prefix}{i}") for i, c in enumerate(children, 1)]
    try:
        return cls(**args)
    except (ValueError, TypeError) as err:
        # albumentations re-raises pydantic's ValidationError as a ValueError from it.
        cause = err.__cause__ if isinstance(err.__cause__, ValidationError) else err
        raise ValueError(_rejects(where, name, args, cause)) from err


def _rejects(where: str, name: str, args: dict[str, Any], err: Exception) -> str:
    """One line: which argument the transform refused and pydantic's reason for it."""
    if isinstance(err, ValidationError) and err.errors():
        first = err.errors()[0]
        key = first["loc"][0] if first["loc"] else None
        # Union types fail once per member; list each reason for the same argument once.
        msgs = [e["msg"] for e in err.errors() if (e["loc"][:1] or (None,))[0] == key]
        reason = "; ".join(dict.fromkeys(m.removeprefix("Value error, ") for m in msgs))
    else:
        key, reason = None, str(err).splitlines()[0] if str(err) else type(err).__name__
    shown = f"{key}={args[key]!r}" if key in args else (f"{key}" if key else "its arguments")
    return f"{KEY}: {where} '{name}' rejects {shown}: {reason}"


# ----------------------------------------------------------------------------- seeding


def stream_seed(base_seed: int, *keys: int) -> int:
    """Mix a base seed with keys (worker id, rank) into an independent 64-bit seed.

    SeedSequence hashing keeps streams for neighbouring keys uncorrelated, unlike
    ``base_seed + worker_id`` (O'Neill 2015, PCG; NumPy "Parallel random number generation").
    """
    state = np.random.SeedSequence([int(base_seed), *map(int, keys)]).generate_state(2, np.uint32)
    return int(state[0]) << 32 | int(state[1])


def seed_augment(target: Augment | A.BaseCompose, seed: int) -> None:
    """Put a pipeline on one fresh random stream derived from ``seed``.

    ``A.Compose(seed=...)`` gives every child transform its own generator with the SAME seed,
    so the first draws of all transforms coincide (a flip always fires with an affine of the
    same probability). One shared generator pair, as used here, avoids that coupling.
    """
    pipeline = target.pipeline if isinstance(target, Augment) else target
    seq = np.random.SeedSequence(int(seed))
    py_seed = int(seq.generate_state(2, np.uint64)[1])
    pipeline.set_random_state(np.random.default_rng(seq), random.Random(py_seed))
    pipeline.seed = int(seed)


def _process_rank() -> int:
    """Global rank of this process (0 without torch.distributed)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank()
    return int(os.environ.get("RANK", os.environ.get("LOCAL_RANK", 0)))


def worker_init_fn(worker_id: int) -> None:
    """DataLoader ``worker_init_fn``: a distinct, reproducible augmentation stream per worker.

    Without it every worker holds an identical copy of the pipeline's generator (fork and
    spawn both copy it), so workers repeat each other's augmentations. The worker seed mixes
    ``torch.initial_seed()`` (base seed drawn per epoch from the main process's torch RNG,
    plus the worker id) with the Augment's ``base_seed`` (which includes the DDP rank), so it
    differs per worker, epoch and rank and repeats under ``seed_everything``. Setting a
    ``worker_init_fn`` stops Lightning from adding its own, so it is called here when
    ``seed_everything(workers=True)`` asked for it.
    """
    torch_seed = torch.initial_seed()  # read first: Lightning's function reseeds torch
    if int(os.environ.get("PL_SEED_WORKERS", 0)):
        from lightning.fabric.utilities.seed import pl_worker_init_function

        pl_worker_init_function(worker_id)
    info = torch.utils.data.get_worker_info()
    if info is None:
        return
    for augment in _find_augments(info.dataset):
        seed_augment(augment, stream_seed(torch_seed, augment.base_seed))


def _find_augments(obj: Any, depth: int = 0) -> Iterator[Augment]:
    """Augments held by a dataset as ``.augment``/``.transform``, through Subset-like wrappers."""
    if isinstance(obj, Augment):
        yield obj
        return
    if depth > 4 or obj is None:
        return
    for name in ("augment", "transform", "dataset"):
        yield from _find_augments(getattr(obj, name, None), depth + 1)
    for child in getattr(obj, "datasets", None) or ():
        yield from _find_augments(child, depth + 1)


# ----------------------------------------------------------------------------- applying


class Augment:
    """Picklable callable that augments one raw HWC uint8 image and returns HWC uint8.

    Args:
        pipeline: the albumentations pipeline (from :func:`load_pipeline`).
        seed: base seed of this process's augmentation stream. ``None`` derives it from
            ``torch.initial_seed()`` (what ``seed_everything`` set) and the process rank, so
            a seeded run repeats and DDP ranks draw different augmentations.
    """

    def __init__(self, pipeline: A.BaseCompose, seed: int | None = None) -> None:
        self.pipeline = pipeline
        self.base_seed = (
            stream_seed(torch.initial_seed(), _process_rank()) if seed is None else seed
        )
        seed_augment(self, self.base_seed)

    def __call__(self, image: np.ndarray) -> np.ndarray:
        if image.ndim == 2:
            image = image[:, :, None]
        if image.ndim != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"Augment expects an HxWxC uint8 image; got shape {image.shape} {image.dtype}"
            )
        out = self.pipeline(image=image)["image"]
        if not isinstance(out, np.ndarray) or out.dtype != np.uint8:
            kind = out.dtype if isinstance(out, np.ndarray) else type(out).__name__
            raise TypeError(
                f"{KEY}: the pipeline returned {kind}, not uint8; drop ToFloat/Normalize/"
                "ToTensorV2 from it (tensors and normalization come later, on the device)"
            )
        if out.ndim == 2:  # some OpenCV paths drop a trailing channel of size 1
            out = out[:, :, None]
        if out.shape[2] != image.shape[2]:
            raise ValueError(
                f"{KEY}: the pipeline turned {image.shape[2]} channels into {out.shape[2]}; "
                "remove the transform that changes the channel count"
            )
        # Flips return negative-stride views, which torch.from_numpy refuses.
        return np.ascontiguousarray(out)

    def __repr__(self) -> str:
        names = [type(t).__name__ for t in self.pipeline.transforms]
        return f"Augment({', '.join(names)}; base_seed={self.base_seed})"


# ----------------------------------------------------------------------------- preview


def preview_grid(
    images: np.ndarray, augment: Augment, draws: int = 4, pad: int = 2, pad_value: int = 255
) -> np.ndarray:
    """HWC uint8 grid: one row per image, the original then ``draws`` augmented versions.

    Shape is ``(N*(H+pad)+pad, (draws+1)*(W+pad)+pad, C)``. A copy of ``augment`` draws, so a
    preview at fit start leaves the training stream untouched.
    """
    if images.ndim == 3:
        images = images[..., None]
    if images.ndim != 4 or images.dtype != np.uint8:
        raise ValueError(f"preview_grid expects N x H x W x C uint8; got {images.shape}")
    if draws < 0 or pad < 0:
        raise ValueError(f"preview_grid needs draws >= 0 and pad >= 0; got {draws}, {pad}")
    aug = copy.deepcopy(augment)
    n, h, w, c = images.shape
    grid = np.full((n * (h + pad) + pad, (draws + 1) * (w + pad) + pad, c), pad_value, np.uint8)
    for row, image in enumerate(images):
        cells = [image] + [aug(image) for _ in range(draws)]
        top = pad + row * (h + pad)
        for col, cell in enumerate(cells):
            left = pad + col * (w + pad)
            grid[top : top + h, left : left + w] = cell
    return grid


def save_grid_png(grid: np.ndarray, path: str | os.PathLike, scale: int = 1) -> Path:
    """Write a grid as PNG, optionally enlarged ``scale`` times (nearest) for 28x28 images."""
    from PIL import Image

    if scale > 1:
        grid = grid.repeat(scale, axis=0).repeat(scale, axis=1)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(grid[:, :, 0] if grid.shape[2] == 1 else grid).save(path)
    return path
