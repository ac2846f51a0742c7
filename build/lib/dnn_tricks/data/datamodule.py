"""The DataModule: a named source, a seeded stratified split, augmentation on the train split
only, and uint8 -> float on the device. Input normalization is a layer of the model
(``model.input_norm``), fitted from ``raw_batches("train")``."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse.typing import Path_fr
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_warn
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader

from dnn_tricks.data.batch_augment import BatchAugmentConfig
from dnn_tricks.data.datasets import (
    ArrayDataset,
    EpochShuffleSampler,
    StepGroupSampler,
    collate_batch,
    take_rows,
)
from dnn_tricks.data.resident import ResidentStore, check_resident_source
from dnn_tricks.data.sources import Source, SourceData, load_source, source_label
from dnn_tricks.data.step_groups import StepGroup, collate_group, ungrouped_reason

Split = Literal["train", "val", "test"]


def _stratified_split(
    y: np.ndarray, fraction: float, seed: int, key: str
) -> tuple[np.ndarray, np.ndarray]:
    """Indices (kept, held out) with ``fraction`` of every class held out."""
    index = np.arange(len(y))
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"data.{key}={fraction} must lie strictly between 0 and 1")
    try:
        kept, held = train_test_split(index, test_size=fraction, random_state=seed, stratify=y)
    except ValueError as err:
        raise ValueError(
            f"data.{key}={fraction} cannot hold out a stratified split of {len(y)} samples "
            f"({err}); use more data or a larger data.{key}"
        ) from None
    return np.sort(kept), np.sort(held)


def _training_seed() -> int:
    """The run's seed as seed_everything set it (LightningCLI's ``seed_everything`` key)."""
    return int(os.environ.get("PL_GLOBAL_SEED", 0))


class DataModule(LightningDataModule):
    """Loads a source, splits it and serves float (and, for training, augmented) batches.

    Args:
        source: a short name: digits, wine, breast_cancer (scikit-learn, embedded),
            fashion_mnist, mnist (IDX files), cifar10, image_folder (class sub-folders of
            image files, decoded lazily), arrays (.npz, or a folder of memory-mapped x.npy
            and y.npy), streaming (LitData chunks from ``trainer prepare-data``); or a
            class path / ``{class_path, init_args}`` of your own
            ``dnn_tricks.data.sources.Source`` subclass.
        root: folder or file of the source (fashion_mnist defaults to Debian's
            /usr/share/datasets/fashion-mnist; mnist and cifar10 to ./data; streaming takes
            a local folder or an s3:// URL).
        download: let torchvision download mnist / fashion_mnist / cifar10 into ``root``.
        image_size: image_folder: [H, W] of the model input (evaluation resizes the short
            side and crops the centre; training uses ``augment`` or the same resize).
            Needed when the files' sizes differ.
        channels: image_folder: 1 (grey) or 3 (RGB); null takes what most files are.
        bad_files: image_folder and predict_path: ``error`` stops with the name of the first
            file that cannot be read; ``skip`` leaves such files out and logs which.
        batch_size: training batch size PER DEVICE (under DDP the global batch is
            batch_size x devices x nodes, as in Lightning).
        eval_batch_size: batch size for validation, test and predict.
        val_fraction: stratified share of the training data held out for validation.
        test_fraction: held-out stratified test share, for sources without their own test split.
        train_subset: keep only this many (stratified) training samples; null keeps all.
        seed: seed of the splits (independent of the training seed, so splits stay put).
        normalize: removed; input normalization is the model's ``model.input_norm`` now.
        augment: albumentations pipeline for the train split: its serialized dict (A.to_dict)
            or a path to a file written by A.save (in a config file, relative to that file);
            null for none.
        num_workers: DataLoader worker processes; ``auto`` uses 0 for in-memory data without
            augmentation (batches are one array slice, IPC would only cost) and up to 4 with it
            or for image files (decoding is the work).
        pin_memory: pin host memory for faster copies to a GPU; ``auto`` pins when CUDA is used.
        predict_split: which split ``trainer predict`` predicts.
        predict_path: new, unlabelled data for ``trainer predict`` instead of a split: a
            folder of images (recursive), a .npz / .npy of inputs or a CSV of features.
        fit_samples: fit the model's input normalization (and other data-fitted layers)
            on a seeded random sample of this many train inputs; null uses all of them.
        device_resident: hold every split on the accelerator (images as uint8) and serve
            batches by indexing there: no loader workers, no collate, no copy per batch
            (``dnn_tricks.data.resident``); needs arrays in memory, not ``augment``.
        batch_augment: with ``device_resident``, augment train batches on the device, per
            image (flip, translate, cutout: ``dnn_tricks.data.batch_augment``); null for none.
        steps_per_batch: serve this many consecutive train batches as one loader batch; the
            model takes one optimizer step per batch of ``batch_size`` inside a single
            Lightning step (``dnn_tricks.models.fused_steps``), so Lightning's fixed cost per
            step is paid once per group: for small models whose steps take about a millisecond.
            The steps see the same batches as with 1 (so the same weights, bit for bit). Under
            DDP, gradient clipping or accumulation by the trainer, or callbacks that act per
            optimizer step from their batch hooks (``every_n_train_steps``, Lightning's weight
            averaging; the project's callbacks handle groups), the fit runs ungrouped and warns
            once.
    """

    def __init__(
        self,
        source: str | Source = "digits",
        root: str | None = None,
        download: bool = False,
        image_size: tuple[int, int] | None = None,
        channels: int | None = None,
        bad_files: Literal["error", "skip"] = "error",
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        train_subset: int | None = None,
        seed: int = 0,
        normalize: dict[str, Any] | None = None,
        augment: dict[str, Any] | Path_fr | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        predict_split: Split = "test",
        predict_path: str | None = None,
        fit_samples: int | None = None,
        device_resident: bool = False,
        batch_augment: BatchAugmentConfig | None = None,
        steps_per_batch: int = 1,
    ) -> None:
        super().__init__()
        if normalize is not None:
            raise ValueError(
                "data.normalize moved to the model: write it as model.input_norm (same keys: "
                "kind, eps, per_channel), so checkpoints and exports carry the statistics"
            )
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive")
        if steps_per_batch < 1:
            raise ValueError(f"data.steps_per_batch={steps_per_batch} must be >= 1")
        self.steps_per_batch = steps_per_batch
        self._grouping: tuple[int, int] | None = None  # (id of the trainer, steps per batch)
        self.source, self.root, self.download = source, root, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.train_subset, self.seed = train_subset, seed
        self.augment_spec = augment
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.predict_split, self.predict_path = predict_split, predict_path
        self.image_size, self.channels, self.bad_files = image_size, channels, bad_files
        if fit_samples is not None and fit_samples < 1:
            raise ValueError(f"data.fit_samples={fit_samples} must be positive (or null: all)")
        self.fit_samples = fit_samples
        if batch_augment is not None and not device_resident:
            raise ValueError(
                "data.batch_augment acts on device-resident batches: set "
                "data.device_resident: true (or use data.augment, per image)"
            )
        if augment is not None and device_resident:
            raise ValueError(
                "data.augment (albumentations, per image on the CPU) does not run "
                "on device-resident batches: use data.batch_augment instead"
            )
        self.device_resident, self.batch_augment = device_resident, batch_augment
        self._resident = ResidentStore()
        self._data: SourceData | None = None
        self._splits: dict[str, tuple[np.ndarray, np.ndarray]] = {}
        # Parsed now so a bad pipeline fails before any work; the seeded Augment is made in
        # setup(), after seed_everything and the process group, so each rank gets its stream.
        self._pipeline = self._load_pipeline(augment)
        self._augment: Any = None

    # -- what the model needs to know, available before setup (argument links use it) --
    @property
    def data(self) -> SourceData:
        if self._data is None:
            self._data = load_source(
                self.source,
                self.root,
                self.download,
                image_size=self.image_size,
                channels=self.channels,
                bad_files=None if self.bad_files == "error" else self.bad_files,  # the default
            )
            data = self._data
            y = np.concatenate([v for v in (data.y, data.val_y, data.test_y) if v is not None])
            if y.min() < 0 or y.max() >= max(len(self._data.classes), 1):
                raise ValueError(
                    f"data.source={source_label(self.source)!r}: labels must be "
                    f"0..{len(self._data.classes) - 1}, "
                    f"found {y.min()}..{y.max()}; map them to consecutive class indices"
                )
        return self._data

    @property
    def augment(self) -> Any:
        """The train split's seeded augmentation (None without ``augment`` or before setup)."""
        return self._augment

    @property
    def input_shape(self) -> tuple[int, ...]:
        return self.data.input_shape

    @property
    def num_classes(self) -> int:
        return len(self.data.classes)

    @property
    def class_names(self) -> list[str]:
        return self.data.classes

    # -- splits --
    def _load_pipeline(self, spec: dict[str, Any] | str | Path_fr | None) -> Any:
        if spec is None:
            return None
        from dnn_tricks.data.augment import load_pipeline

        # jsonargparse's Path_fr remembers where a relative path was written; resolve it.
        return load_pipeline(spec.absolute if isinstance(spec, Path_fr) else spec)

    def _make_splits(self) -> None:
        data = self.data
        if data.test_x is not None:
            x, y, test = data.x, data.y, (data.test_x, data.test_y)
        else:
            kept, held = _stratified_split(data.y, self.test_fraction, self.seed, "test_fraction")
            x, y = take_rows(data.x, kept), data.y[kept]
            test = (take_rows(data.x, held), data.y[held])
        if data.val_x is not None:  # the source's own (train/val/test folders, chunks)
            train, val = np.arange(len(y)), None
        else:
            train, val = _stratified_split(y, self.val_fraction, self.seed + 1, "val_fraction")
        if self.train_subset is not None and self.train_subset < len(train):
            keep, _ = train_test_split(
                train, train_size=self.train_subset, random_state=self.seed, stratify=y[train]
            )
            train = np.sort(keep)
        self._splits = {
            "train": (take_rows(x, train), y[train]),
            "val": (data.val_x, data.val_y) if val is None else (take_rows(x, val), y[val]),
            "test": test,  # type: ignore[dict-item]
        }
        if self.batch_size > len(train):
            raise ValueError(
                f"data.batch_size={self.batch_size} is larger than the train split "
                f"({len(train)} samples); lower data.batch_size"
            )

    def split(self, name: Split) -> tuple[np.ndarray, np.ndarray]:
        """Raw (inputs, labels) of a split; inputs as the source stores them."""
        if not self._splits:
            self._make_splits()
        return self._splits[name]

    def to_float(self, x: Tensor) -> Tensor:
        """uint8 images -> float in [0, 1]; tabular rows pass through as float32."""
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    def raw_batches(self, name: Split = "train", batch: int = 4096) -> Iterator[Tensor]:
        """Float inputs of a split in chunks, unaugmented and unnormalized: what the model's
        data-fitted layers (input normalization, patch whitening) are fitted from.

        With ``fit_samples`` a seeded sample of the split, the same on every rank and call.
        Image files are decoded by loader workers at the evaluation size, a batch at a time.
        """
        x, y = self.split(name)
        index = np.arange(len(y))
        if self.fit_samples is not None and self.fit_samples < len(index):
            rng = np.random.default_rng(self.seed)
            index = np.sort(rng.choice(len(index), self.fit_samples, replace=False))
        decodes = hasattr(x, "batch")
        loader = DataLoader(
            ArrayDataset(x, y),
            batch_size=min(batch, self.eval_batch_size) if decodes else batch,
            sampler=index.tolist(),
            num_workers=self._workers(x) if decodes else 0,
            collate_fn=collate_batch,
        )
        for inputs, _ in loader:
            yield self.to_float(inputs)

    def setup(self, stage: str) -> None:
        self.split("train")
        if self._pipeline is not None and self._augment is None:
            from dnn_tricks.data.augment import Augment

            self._augment = Augment(self._pipeline)

    def state_dict(self) -> dict[str, Any]:
        """Where a device-resident train epoch stands (empty on the loader path)."""
        return self._resident.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._resident.load_state_dict(state_dict)

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        """Float inputs; a train group of ``steps_per_batch`` batches as a list of them."""
        x, y = batch
        x = self.to_float(x)
        if isinstance(batch, StepGroup):
            return list(zip(x.split(self.batch_size), y.split(self.batch_size), strict=True))
        return x, y

    def grouped_steps(self) -> int:
        """Optimizer steps per train loader batch in this fit: ``steps_per_batch``, or 1
        (with a warning) where the trainer needs a Lightning step per optimizer step."""
        trainer = self.trainer
        if self.steps_per_batch == 1 or trainer is None:
            return self.steps_per_batch
        if self._grouping is None or self._grouping[0] != id(trainer):
            reason = ungrouped_reason(trainer)
            if reason is not None:
                rank_zero_warn(
                    f"data.steps_per_batch={self.steps_per_batch}: this fit steps one batch "
                    f"at a time (the same training, without the speed-up) because of {reason}"
                )
            self._grouping = (id(trainer), 1 if reason else self.steps_per_batch)
        return self._grouping[1]

    def optimizer_steps(self, loader_batches: int) -> int:
        """Optimizer steps in the first ``loader_batches`` train loader batches of an epoch
        (each holds ``grouped_steps()`` full batches, the last group maybe fewer)."""
        full_batches = len(self.split("train")[1]) // self.batch_size
        return min(loader_batches * self.grouped_steps(), full_batches)

    # -- loaders --
    def _workers(self, x: Any = None) -> int:
        if self.num_workers != "auto":
            return int(self.num_workers)
        decodes = hasattr(x, "batch")  # image files: decoding is the work, give it processes
        return 0 if self._pipeline is None and not decodes else min(4, os.cpu_count() or 1)

    def _loader(self, name: Split, train: bool) -> DataLoader:
        x, y = self.split(name)
        if self.device_resident:  # an iterable of device batches, stateful (exact resume)
            check_resident_source(x, source_label(self.source))
            batch = self.batch_size if train else self.eval_batch_size
            return self._resident.batches(  # type: ignore[return-value]
                name,
                (x, y),
                batch,
                train,
                _training_seed(),
                self.trainer,
                self.batch_augment,
                self.grouped_steps() if train else 1,
            )
        workers = self._workers(x)
        pin = torch.cuda.is_available() if self.pin_memory == "auto" else self.pin_memory
        init_fn = None
        if train and self._augment is not None:
            from dnn_tricks.data.augment import worker_init_fn

            init_fn = worker_init_fn
        if train and hasattr(x, "dataloader"):  # streaming: LitData shuffles, shards, resumes
            if self.grouped_steps() > 1:
                raise ValueError(
                    "data.steps_per_batch > 1 groups batches of in-memory data; streamed "
                    "chunks are served by LitData's loader: set data.steps_per_batch: 1"
                )
            seed = _training_seed()
            return x.dataloader(self.batch_size, seed, workers, self._augment, pin, init_fn)
        dataset = ArrayDataset(x, y, transform=self._augment if train else None)
        # Shuffling that depends only on (seed, epoch) makes a resumed run see the same batches.
        sampler = EpochShuffleSampler(len(dataset), _training_seed()) if train else None
        # A last batch of one sample breaks batch norm in train mode; dropping the ragged
        # tail also keeps every step's gradient noise alike.
        batching: dict[str, Any] = {
            "batch_size": self.batch_size if train else self.eval_batch_size,
            "sampler": sampler,
            "drop_last": train,
        }
        collate = collate_batch
        if train and self.grouped_steps() > 1:
            assert sampler is not None
            groups = StepGroupSampler(sampler, self.batch_size, self.grouped_steps())
            batching, collate = {"batch_sampler": groups}, collate_group
        return DataLoader(
            dataset,
            **batching,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            collate_fn=collate,
            worker_init_fn=init_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        if self.predict_path is None:
            return self._loader(self.predict_split, train=False)
        from dnn_tricks.data.predict_inputs import predict_inputs

        x, ids = predict_inputs(self.predict_path, self.input_shape, self.bad_files)
        # Each sample's "label" is its position in ids, which the prediction CSV names.
        dataset = ArrayDataset(x, np.arange(len(ids)))
        dataset.ids = ids  # type: ignore[attr-defined]
        return DataLoader(
            dataset,
            batch_size=self.eval_batch_size,
            num_workers=self._workers(x),
            collate_fn=collate_batch,
        )
