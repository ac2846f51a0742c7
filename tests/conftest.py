"""Shared fixtures: run the ``trainer`` CLI in-process on any config, shrunk to a few batches."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch

# Under DNN_TRICKS_REQUIRE_ALL=1 (CI) a skipped test fails unless it needs a GPU.
from skip_policy import pytest_configure, pytest_runtest_makereport  # noqa: F401

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# One thread: the tests' models are small, and two threads fighting over a loaded 2-core
# machine made them 10-30x slower.
torch.set_num_threads(1)

REPO = Path(__file__).resolve().parents[1]
CONFIGS = REPO / "configs"
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")


def shrink_args(log_dir: Path, epochs: int = 1, batches: int = 3) -> list[str]:
    """Overrides that make any shipped config a seconds-long smoke run writing under log_dir.
    Batches are counted one per step (``data.steps_per_batch: 1``; tests/test_fused_steps.py
    runs the grouped fits, configs/digits.yaml's own grouping included)."""
    return [
        f"--trainer.max_epochs={epochs}",
        "--data.steps_per_batch=1",
        f"--trainer.limit_train_batches={batches}",
        f"--trainer.limit_val_batches={batches}",
        f"--trainer.limit_test_batches={batches}",
        f"--trainer.limit_predict_batches={batches}",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={log_dir}",
    ]


@pytest.fixture
def run_cli(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Callable[[Sequence[str]], None]:
    """Run ``trainer <args>`` in this process from a temporary working directory."""
    from dnn_tricks.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["trainer"])  # main() rewrites it; restored afterwards
    monkeypatch.setenv("DNN_TRICKS_CACHE", str(tmp_path / "cache"))

    def run(args: Sequence[str]) -> None:
        main([str(a) for a in args])

    return run


def requires_fashion_mnist() -> pytest.MarkDecorator:
    return pytest.mark.skipif(
        not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists(),
        reason="Debian's dataset-fashion-mnist is not installed",
    )


def write_cifar10_batches(root: Path, per_batch: int, monkeypatch: pytest.MonkeyPatch) -> dict:
    """Write CIFAR-10's python batch files (random pixels) under root for torchvision to read.

    Files a test writes cannot match CIFAR-10's published md5 sums, so the integrity check is
    patched out; everything else is torchvision's real loading code."""
    import pickle

    import numpy as np
    import torchvision.datasets.cifar as cifar

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    batches = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        pixels = rng.integers(0, 256, size=(per_batch, 3 * 32 * 32), dtype=np.uint8)
        labels = [i % 10 for i in range(per_batch)]
        batches[name] = (pixels, labels)
        with open(folder / name, "wb") as f:
            pickle.dump({"data": pixels, "labels": labels}, f)
    with open(folder / "batches.meta", "wb") as f:
        pickle.dump({"label_names": [f"c{i}" for i in range(10)]}, f)
    monkeypatch.setattr(cifar, "check_integrity", lambda path, md5=None: True)
    return batches
