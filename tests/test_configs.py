"""Every file in configs/ runs: experiment configs as shrunk fits, trainer presets composed
with the digits config, augmentation pipelines through the train loader."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import CONFIGS, FASHION_MNIST, shrink_args, write_cifar10_batches

EXPERIMENTS = sorted(CONFIGS.glob("*.yaml"))
TRAINER_PRESETS = sorted((CONFIGS / "trainer").glob("*.yaml"))
AUGMENTS = sorted((CONFIGS / "augment").glob("*.yaml"))
# Presets that need hardware this machine may lack run where it exists.
NEEDS_GPU = {"gpu.yaml", "ddp.yaml", "multinode.yaml"}


def test_every_config_file_is_covered_here():
    covered = set(EXPERIMENTS) | set(TRAINER_PRESETS) | set(AUGMENTS)
    covered |= set((CONFIGS / "search").glob("*.yaml"))  # run by tests/test_search.py
    assert set(CONFIGS.rglob("*.yaml")) == covered


def _data_overrides(config, tmp_path, monkeypatch) -> list[str]:
    """Point configs at data that exists offline: CIFAR-10 batch files written here."""
    text = config.read_text()
    if "source: fashion_mnist" in text:
        if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
            pytest.skip("Debian's dataset-fashion-mnist is not installed")
        return ["--data.train_subset=2000"]
    if "source: cifar10" in text:
        write_cifar10_batches(tmp_path / "cifar", per_batch=100, monkeypatch=monkeypatch)
        return [
            f"--data.root={tmp_path / 'cifar'}",
            "--data.download=false",
            "--data.batch_size=32",
            "--data.num_workers=0",
        ]
    return []


@pytest.mark.parametrize("config", EXPERIMENTS, ids=lambda p: p.name)
def test_experiment_config_fits_validates_and_tests(run_cli, tmp_path, monkeypatch, config):
    run_cli(
        [
            "fit",
            "--config",
            config,
            *shrink_args(tmp_path / "logs", batches=2),
            *_data_overrides(config, tmp_path, monkeypatch),
        ]
    )
    assert list((tmp_path / "logs").rglob("last.ckpt"))


@pytest.mark.parametrize("preset", TRAINER_PRESETS, ids=lambda p: p.name)
def test_trainer_preset_composes_with_digits(run_cli, tmp_path, preset):
    if preset.name in NEEDS_GPU and not torch.cuda.is_available():
        pytest.skip(f"{preset.name} needs CUDA GPUs")
    args = [
        "fit",
        "--config",
        CONFIGS / "digits.yaml",
        "--config",
        preset,
        *shrink_args(tmp_path / "logs", batches=2),
    ]
    if "strategy: ddp" in preset.read_text():
        # Lightning's DDP launcher re-runs the command line for the other ranks (and kills
        # the whole group if one fails): it must be a command of its own, not pytest.
        subprocess.run(
            [sys.executable, "-m", "dnn_tricks.cli", *map(str, args)],
            cwd=tmp_path,
            check=True,
            timeout=600,
            capture_output=True,
        )
    else:
        run_cli(args)
    assert len(list((tmp_path / "logs").rglob("last.ckpt"))) == 1


@pytest.mark.parametrize("pipeline", AUGMENTS, ids=lambda p: p.name)
def test_augment_pipeline_trains_through_the_loader(run_cli, tmp_path, pipeline):
    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "digits.yaml",
            f"--data.augment={pipeline}",
            *shrink_args(tmp_path / "logs", batches=2),
            "--test_after_fit=false",
        ]
    )
    assert list((tmp_path / "logs").rglob("last.ckpt"))
