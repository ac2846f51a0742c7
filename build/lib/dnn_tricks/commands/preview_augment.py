"""``trainer preview-augment``: a PNG grid of training images and augmented draws of each,
to see what a pipeline does before spending compute on it."""

from __future__ import annotations

import argparse
from pathlib import Path

from dnn_tricks.data.augment import Augment, preview_grid, save_grid_png


def write_preview(
    config_args: list[str], out: Path, images: int = 8, draws: int = 6, scale: int = 4
) -> Path:
    """Build the config's DataModule and write ``images`` train images with ``draws``
    augmented versions each (one row per image) to ``out``."""
    from dnn_tricks.app import TrainerCLI

    cli = TrainerCLI(args=config_args, run=False)
    datamodule = cli.datamodule
    if datamodule._pipeline is None:
        raise ValueError("data.augment is not set in this config; nothing to preview")
    x, _ = datamodule.split("train")
    if x.ndim != 4:
        raise ValueError(f"data.source={datamodule.source!r} is tabular; augmentation needs images")
    grid = preview_grid(x[:images], Augment(datamodule._pipeline, seed=0), draws=draws)
    return save_grid_png(grid, out, scale=scale)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="trainer preview-augment",
        description="Write a PNG grid: original train images, then augmented draws of each. "
        "Other arguments (--config, --data.*) are read as by `trainer fit`.",
    )
    parser.add_argument("--out", type=Path, default=Path("logs/augment_preview.png"))
    parser.add_argument("--images", type=int, default=8, help="rows: train images shown")
    parser.add_argument("--draws", type=int, default=6, help="augmented draws per image")
    parser.add_argument("--scale", type=int, default=4, help="pixel upscaling of the PNG")
    known, rest = parser.parse_known_args(argv)
    path = write_preview(rest, known.out, known.images, known.draws, known.scale)
    print(f"wrote {path}")
