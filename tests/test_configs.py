"""Every file in configs/ runs: experiment configs as shrunk fits, trainer presets composed
with the digits config, augmentation pipelines through the train loader, and the group pieces
(base, trainer default, callbacks, data) through the experiments that include them."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from conftest import CONFIGS, FASHION_MNIST, shrink_args, write_cifar10_batches

BASE = CONFIGS / "base.yaml"
EXPERIMENTS = sorted({*CONFIGS.glob("*.yaml"), *CONFIGS.glob("speedrun/*.yaml")} - {BASE}, key=str)
TRAINER_PRESETS = sorted(
    set((CONFIGS / "trainer").glob("*.yaml")) - {CONFIGS / "trainer/default.yaml"}
)
# Pieces defined once and included by experiments (`config: base.yaml`, `data: data/x.yaml`,
# `trainer.callbacks: callbacks/x.yaml`); they run inside the experiments above.
GROUP_PIECES = sorted(
    {BASE, CONFIGS / "trainer/default.yaml"}
    | set((CONFIGS / "callbacks").glob("*.yaml"))
    | set((CONFIGS / "data").glob("*.yaml"))
)
AUGMENTS = sorted((CONFIGS / "augment").glob("*.yaml"))
# Presets that need hardware this machine may lack run where it exists.
NEEDS_GPU = {"gpu.yaml", "ddp.yaml", "multinode.yaml"}


def test_every_config_file_is_covered_here():
    covered = set(EXPERIMENTS) | set(TRAINER_PRESETS) | set(AUGMENTS) | set(GROUP_PIECES)
    covered |= set((CONFIGS / "search").glob("*.yaml"))  # run by tests/test_search.py
    covered |= set((CONFIGS / "ablate").glob("*.yaml"))  # run by tests/test_ablate.py
    assert set(CONFIGS.rglob("*.yaml")) == covered


def _included(config: Path) -> list[Path]:
    """The files a config pulls in: its `config:` parent and the group pieces it names."""
    found = []
    for line in config.read_text().splitlines():
        match = re.match(
            r"^(?:config|data|trainer|callbacks|trainer\.callbacks):\s*([\w./-]+\.yaml)", line
        )
        if match:
            piece = (config.parent / match.group(1)).resolve()
            found += [piece, *_included(piece)]
    return found


def test_every_group_piece_is_included_by_an_experiment():
    used = {piece for config in EXPERIMENTS for piece in _included(config)}
    used |= {piece for preset in [CONFIGS / "base.yaml"] for piece in _included(preset)}
    assert set(GROUP_PIECES) <= used, set(GROUP_PIECES) - used


def test_full_callbacks_extend_the_basic_set_unchanged():
    basic = yaml.safe_load((CONFIGS / "callbacks/basic.yaml").read_text())
    full = yaml.safe_load((CONFIGS / "callbacks/full.yaml").read_text())
    assert full[: len(basic)] == basic and len(full) > len(basic)


def _data_overrides(config, tmp_path, monkeypatch) -> list[str]:
    """Point configs at data that exists offline: CIFAR-10 batch files written here."""
    text = "\n".join(p.read_text() for p in [config, *_included(config)])
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


def _hardware_overrides(config: Path) -> list[str]:
    """bf16 autocast on a CPU without bf16 units is emulated (the GPU speedrun's two batches
    took minutes): float32 there; benchmarks/gpu_checks.py checks bf16 where it is native."""
    if "precision: bf16-mixed" in config.read_text() and not torch.cuda.is_available():
        return ["--trainer.precision=32-true"]
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
            *_hardware_overrides(config),
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
