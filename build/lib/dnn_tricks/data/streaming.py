"""``streaming``: train from LitData chunks, on a local disk or an object store.

``trainer prepare-data --config C --out DIR`` writes the config's train, val and test
splits (from any source, at the evaluation size) as LitData's optimized chunks, plus
``dnn_tricks_chunks.json`` (classes, input shape, where they came from) and the labels of
each split. ``data.source: streaming`` with ``data.root: DIR`` (or ``s3://bucket/prefix``;
LitData streams it through its local cache) then trains from them:

- each epoch is shuffled (LitData shuffles the chunk order and the samples in each chunk,
  from the run's seed and the epoch);
- under DDP each rank streams its own share: every sample once per epoch, across ranks;
- the loader's position is a ``StreamingDataLoader`` state that Lightning stores in every
  checkpoint, so a run interrupted mid-epoch resumes at the next unseen batch.

LitData is an optional extra: ``pip install "dnn-tricks[streaming]"``.
"""

from __future__ import annotations

import functools
import json
import multiprocessing
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import default_collate

from dnn_tricks.data.sources import CHUNKS_META, Source, SourceData, source_label

FORMAT = "dnn_tricks.chunks/1"
SPLITS = ("train", "val", "test")


def _litdata() -> Any:
    try:
        import litdata
    except ImportError:
        raise ValueError(
            "data.source: streaming needs LitData; install it with "
            'pip install "dnn-tricks[streaming]"'
        ) from None
    return litdata


def _join(root: str, *parts: str) -> str:
    return "/".join([root.rstrip("/"), *parts])


# ----------------------------------------------------------------------------- writing


def _sample(i: int, rows: Any, labels: np.ndarray) -> dict[str, Any]:
    """One chunk record: the input as the split stores it (uint8 HWC or float32 row), its
    label and its position in the split (which lets a reader check the order)."""
    x = np.ascontiguousarray(rows[np.array([i])][0])
    return {"x": x, "y": int(labels[i]), "i": int(i)}


def write_chunks(datamodule: Any, out: str, workers: int = 1, chunk_bytes: str = "64MB") -> dict:
    """Write the DataModule's three splits under ``out`` as LitData chunks; return the
    metadata written next to them."""
    litdata = _litdata()
    target = Path(out)
    if target.exists() and any(target.iterdir()):
        raise ValueError(f"--out {out} is not empty; choose a new folder or remove that one")
    meta: dict[str, Any] = {
        "format": FORMAT,
        "source": source_label(datamodule.source),
        "root": datamodule.root,
        "classes": list(datamodule.class_names),
        "input_shape": list(datamodule.input_shape),
        "counts": {},
    }
    for split in SPLITS:
        x, y = datamodule.split(split)
        litdata.optimize(
            fn=functools.partial(_sample, rows=x, labels=y),
            inputs=list(range(len(y))),
            output_dir=str(target / split),
            chunk_bytes=chunk_bytes,
            num_workers=workers,
            keep_data_ordered=True,  # global index i is the split's sample i
            reorder_files=False,
            verbose=False,
            # fork: workers inherit the split instead of re-importing torch and unpickling it
            start_method="fork" if "fork" in multiprocessing.get_all_start_methods() else None,
        )
        np.save(target / f"y_{split}.npy", np.asarray(y, dtype=np.int64))
        meta["counts"][split] = len(y)
        written = litdata.StreamingDataset(str(target / split))
        for i in sorted({0, len(y) // 2, len(y) - 1}):
            if written[i]["i"] != i:  # a LitData change of ordering would break the labels
                raise RuntimeError(f"chunks of {split} are out of order at sample {i}")
    # Written last: its presence marks a complete folder.
    (target / CHUNKS_META).write_text(json.dumps(meta, indent=2))
    return meta


# ----------------------------------------------------------------------------- reading


class _ToPair:
    """A chunk record -> (input tensor, label); images are augmented here (in the worker)
    and leave as uint8 C x H x W, like the in-memory loaders' batches."""

    def __init__(self, augment: Any = None) -> None:
        self.augment = augment

    def __call__(self, record: dict[str, Any]) -> tuple[Tensor, int]:
        x = np.asarray(record["x"])
        if x.ndim == 3:
            if self.augment is not None:
                x = self.augment(x)
            return torch.from_numpy(np.ascontiguousarray(x.transpose(2, 0, 1))), record["y"]
        return torch.from_numpy(x.astype(np.float32, copy=False)), record["y"]


class ChunkRows:
    """One split of a chunk folder as a lazy array (random access for fitting, previews and
    callbacks) that builds its own streaming loader for training and evaluation.

    Args:
        url: the split's folder (local path or object-store URL).
        count: its number of samples.
        input_shape: C x H x W or D.
        cache_dir: LitData's local cache for remote chunks (null: its default).
    """

    def __init__(
        self,
        url: str,
        count: int,
        input_shape: tuple[int, ...],
        cache_dir: str | None = None,
        index: np.ndarray | None = None,
    ) -> None:
        self.url, self.count, self.input_shape = url, count, tuple(input_shape)
        self.cache_dir = cache_dir
        self.index = np.arange(count) if index is None else np.asarray(index)
        self._reader: Any = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_reader": None}

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ndim(self) -> int:
        return 1 + len(self.input_shape)

    @property
    def shape(self) -> tuple[int, ...]:
        if len(self.input_shape) == 3:
            channels, height, width = self.input_shape
            return (len(self), height, width, channels)
        return (len(self), *self.input_shape)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8) if self.ndim == 4 else np.dtype(np.float32)

    def take(self, index: Any) -> ChunkRows:
        return ChunkRows(self.url, self.count, self.input_shape, self.cache_dir, self.index[index])

    def __getitem__(self, index: Any) -> np.ndarray:
        if self._reader is None:
            # Random access by global index: the same on every rank, whatever DDP shards.
            self._reader = _litdata().StreamingDataset(self.url, cache_dir=self.cache_dir)
        positions = np.atleast_1d(self.index[index])
        rows = np.stack([np.asarray(self._reader[int(p)]["x"]) for p in positions])
        return rows[0] if np.ndim(self.index[index]) == 0 else rows

    def dataloader(
        self,
        batch_size: int,
        seed: int,
        num_workers: int = 0,
        augment: Any = None,
        pin_memory: bool = False,
        worker_init_fn: Any = None,
    ) -> Any:
        """The training loader: a StreamingDataLoader, shuffled anew each epoch and sharded
        across DDP ranks (LitData reads the process group), dropping the last samples that
        would leave ranks out of step. (Evaluation reads by index like any other source, so
        Lightning's distributed sampler splits it and no sample is left out.)"""
        if len(self) != self.count:
            raise ValueError(
                "data.train_subset does not apply to data.source: streaming; write the subset "
                "with trainer prepare-data (set data.train_subset in that config) instead"
            )
        litdata = _litdata()
        dataset = litdata.StreamingDataset(
            self.url,
            cache_dir=self.cache_dir,
            shuffle=True,
            seed=seed,
            drop_last=True,
            transform=_ToPair(augment),
        )
        dataset.augment = augment  # found by augment.worker_init_fn
        return litdata.StreamingDataLoader(
            dataset,
            batch_size=batch_size,
            num_workers=num_workers,
            pin_memory=pin_memory,
            worker_init_fn=worker_init_fn,
            collate_fn=default_collate,
        )


def _read_meta(root: str) -> dict[str, Any]:
    import fsspec

    meta_url = _join(root, CHUNKS_META)
    try:
        with fsspec.open(meta_url, "r") as handle:
            meta = json.load(handle)
    except FileNotFoundError:
        try:
            with fsspec.open(_join(root, "train", "index.json"), "r"):
                other = True
        except FileNotFoundError:
            other = False
        hint = (
            "holds LitData chunks that trainer prepare-data did not write"
            if other
            else ("holds no chunks")
        )
        raise FileNotFoundError(
            f"data.root={root!r} {hint} (no {CHUNKS_META}); write them with "
            "trainer prepare-data --config C --out DIR"
        ) from None
    if meta.get("format") != FORMAT:
        raise ValueError(
            f"data.root={root!r} holds chunks in format {meta.get('format')!r}, this version "
            f"reads {FORMAT!r}; write them again with trainer prepare-data"
        )
    return meta


def _labels(root: str, split: str) -> np.ndarray:
    import fsspec

    with fsspec.open(_join(root, f"y_{split}.npy"), "rb") as handle:
        return np.load(handle, allow_pickle=False)


class Streaming(Source):
    """Chunks written by ``trainer prepare-data``, streamed with LitData.

    Args:
        root: the folder given to prepare-data as ``--out``, or an object-store URL such
            as ``s3://bucket/prefix`` holding the same files (LitData needs the store's
            credentials in the usual environment variables).
        cache_dir: where LitData keeps the chunks it streamed from an object store
            (null: LitData's default cache folder).
    """

    def __init__(self, root: str | None = None, cache_dir: str | None = None) -> None:
        self.root, self.cache_dir = root, cache_dir

    def load(self) -> SourceData:
        if not self.root:
            raise ValueError(
                "data.source: streaming needs data.root: the folder (or s3:// URL) written by "
                "trainer prepare-data --config C --out DIR"
            )
        meta = _read_meta(self.root)
        shape = tuple(meta["input_shape"])
        rows = {
            split: ChunkRows(_join(self.root, split), meta["counts"][split], shape, self.cache_dir)
            for split in SPLITS
        }
        labels = {split: _labels(self.root, split) for split in SPLITS}
        return SourceData(
            x=rows["train"],
            y=labels["train"],
            classes=list(meta["classes"]),
            val_x=rows["val"],
            val_y=labels["val"],
            test_x=rows["test"],
            test_y=labels["test"],
        )
