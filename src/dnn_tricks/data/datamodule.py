"""The DataModule: a named source, a seeded stratified split, input normalization fitted on
the train split only and applied on the device, and augmentation on the train split only."""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np
import torch
from jsonargparse.typing import Path_fr
from lightning.pytorch import LightningDataModule
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from sklearn.model_selection import train_test_split
from torch import Tensor
from torch.utils.data import DataLoader

from dnn_tricks.data.datasets import ArrayDataset, EpochShuffleSampler, collate_batch
from dnn_tricks.data.normalize import InputNormalizer, NormalizeConfig
from dnn_tricks.data.sources import SourceData, load_source

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
    """Loads a source, splits it and serves normalized (and, for training, augmented) batches.

    Args:
        source: digits, wine, breast_cancer (scikit-learn, embedded), fashion_mnist, mnist
            (IDX files), cifar10, image_folder (class sub-folders) or arrays (.npz, x and y).
        root: folder or file of the source (fashion_mnist defaults to Debian's
            /usr/share/datasets/fashion-mnist; mnist and cifar10 to ./data).
        download: let torchvision download mnist / fashion_mnist / cifar10 into ``root``.
        batch_size: training batch size PER DEVICE (under DDP the global batch is
            batch_size x devices x nodes, as in Lightning).
        eval_batch_size: batch size for validation, test and predict.
        val_fraction: stratified share of the training data held out for validation.
        test_fraction: held-out stratified test share, for sources without their own test split.
        train_subset: keep only this many (stratified) training samples; null keeps all.
        seed: seed of the splits (independent of the training seed, so splits stay put).
        normalize: input normalization fitted on the train split only (kind, eps, per_channel).
        augment: albumentations pipeline for the train split: its serialized dict (A.to_dict)
            or a path to a file written by A.save (in a config file, relative to that file);
            null for none.
        num_workers: DataLoader worker processes; ``auto`` uses 0 for in-memory data without
            augmentation (batches are one array slice, IPC would only cost) and up to 4 with it.
        pin_memory: pin host memory for faster copies to a GPU; ``auto`` pins when CUDA is used.
        predict_split: which split ``trainer predict`` predicts.
    """

    def __init__(
        self,
        source: str = "digits",
        root: str | None = None,
        download: bool = False,
        batch_size: int = 64,
        eval_batch_size: int = 1000,
        val_fraction: float = 0.1,
        test_fraction: float = 0.2,
        train_subset: int | None = None,
        seed: int = 0,
        normalize: NormalizeConfig | None = None,
        augment: dict[str, Any] | Path_fr | None = None,
        num_workers: int | Literal["auto"] = "auto",
        pin_memory: bool | Literal["auto"] = "auto",
        predict_split: Split = "test",
    ) -> None:
        super().__init__()
        if batch_size < 1 or eval_batch_size < 1:
            raise ValueError("data.batch_size and data.eval_batch_size must be positive")
        self.source, self.root, self.download = source, root, download
        self.batch_size, self.eval_batch_size = batch_size, eval_batch_size
        self.val_fraction, self.test_fraction = val_fraction, test_fraction
        self.train_subset, self.seed = train_subset, seed
        self.normalize_config = normalize or NormalizeConfig()
        self.normalizer = InputNormalizer.from_config(self.normalize_config)
        self.augment_spec = augment
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.predict_split = predict_split
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
            self._data = load_source(self.source, self.root, self.download)
            y = (
                np.concatenate([self._data.y, self._data.test_y])
                if self._data.test_y is not None
                else self._data.y
            )
            if y.min() < 0 or y.max() >= max(len(self._data.classes), 1):
                raise ValueError(
                    f"data.source={self.source!r}: labels must be "
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

    # -- splits and normalization --
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
            x, y, test = data.x[kept], data.y[kept], (data.x[held], data.y[held])
        train, val = _stratified_split(y, self.val_fraction, self.seed + 1, "val_fraction")
        if self.train_subset is not None and self.train_subset < len(train):
            keep, _ = train_test_split(
                train, train_size=self.train_subset, random_state=self.seed, stratify=y[train]
            )
            train = np.sort(keep)
        self._splits = {
            "train": (x[train], y[train]),
            "val": (x[val], y[val]),
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
        """Float inputs of a split in chunks, unaugmented and unnormalized (for fitting)."""
        dataset = ArrayDataset(*self.split(name))
        for start in range(0, len(dataset), batch):
            yield self.to_float(
                dataset.__getitems__(range(start, min(start + batch, len(dataset))))[0]
            )

    def fit_normalizer(self) -> None:
        """Fit the input normalization on the train split only and report the conditioning."""
        self.normalizer.fit(self.raw_batches("train"))
        before, after = self.normalizer.condition_numbers()
        rank_zero_info(
            f"input normalization '{self.normalizer.kind}': condition number of the train-feature "
            f"covariance {before:.4g} -> {after:.4g}"
        )
        logger = self.trainer.logger if self.trainer is not None else None
        if logger is not None:
            logger.log_metrics({"data/cond_before": before, "data/cond_after": after}, step=0)

    def setup(self, stage: str) -> None:
        self.split("train")
        if self._pipeline is not None and self._augment is None:
            from dnn_tricks.data.augment import Augment

            self._augment = Augment(self._pipeline)
        if stage == "fit":
            self.fit_normalizer()

    def prepare_inputs(self, x: Tensor) -> Tensor:
        """What the model sees: float inputs normalized with the train statistics."""
        if not self.normalizer.fitted:
            rank_zero_warn(
                "the input normalizer was neither fitted nor restored from a checkpoint; "
                "fitting it on the train split now (pass --ckpt_path to use a run's statistics)"
            )
            self.fit_normalizer()
        self.normalizer.to(x.device)
        return self.normalizer(self.to_float(x))

    def on_after_batch_transfer(self, batch: Any, dataloader_idx: int) -> Any:
        x, y = batch
        return self.prepare_inputs(x), y

    def normalized_train_inputs(self, n: int) -> Tensor:
        """The first ``n`` train inputs, normalized: data-dependent init (patch whitening)."""
        x, _ = self.split("train")
        return self.prepare_inputs(
            torch.from_numpy(x[:n]).permute(0, 3, 1, 2) if x.ndim == 4 else torch.from_numpy(x[:n])
        )

    # -- loaders --
    def _workers(self) -> int:
        if self.num_workers != "auto":
            return int(self.num_workers)
        return 0 if self._pipeline is None else min(4, os.cpu_count() or 1)

    def _loader(self, name: Split, train: bool) -> DataLoader:
        x, y = self.split(name)
        dataset = ArrayDataset(x, y, transform=self._augment if train else None)
        workers = self._workers()
        pin = torch.cuda.is_available() if self.pin_memory == "auto" else self.pin_memory
        init_fn = None
        if train and self._augment is not None:
            from dnn_tricks.data.augment import worker_init_fn

            init_fn = worker_init_fn
        # Shuffling that depends only on (seed, epoch) makes a resumed run see the same batches.
        sampler = EpochShuffleSampler(len(dataset), _training_seed()) if train else None
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            sampler=sampler,
            # A last batch of one sample breaks batch norm in train mode; dropping the ragged
            # tail also keeps every step's gradient noise alike.
            drop_last=train,
            num_workers=workers,
            pin_memory=pin,
            persistent_workers=workers > 0,
            collate_fn=collate_batch,
            worker_init_fn=init_fn,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader("train", train=True)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", train=False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", train=False)

    def predict_dataloader(self) -> DataLoader:
        return self._loader(self.predict_split, train=False)

    # -- checkpoint state: the fitted normalizer travels with every checkpoint --
    def state_dict(self) -> dict[str, Any]:
        return {"normalizer": self.normalizer.state_dict()}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.normalizer.load_state_dict(state_dict["normalizer"])
