"""``trainer export``: a checkpoint's model, input normalization folded in, as an ONNX,
TorchScript or torch.export file with a dynamic batch dimension, checked against PyTorch on
real test inputs before it is written.

    trainer export --config C --ckpt_path K --format onnx [--out PATH]
"""

from __future__ import annotations

import argparse
from pathlib import Path

from dnn_tricks.checkpoints import check_matches_model, read_checkpoint
from dnn_tricks.export import SUFFIXES, TOLERANCE, check_format, check_out_path, export_model


def default_out(ckpt_path: Path, fmt: str) -> Path:
    """Next to the checkpoint: ``checkpoints/last.ckpt`` -> ``checkpoints/last.onnx``."""
    stem = ckpt_path.stem if ckpt_path.suffix == ".ckpt" else ckpt_path.name
    return ckpt_path.parent / f"{stem}{SUFFIXES[fmt]}"


def export_checkpoint(
    config_args: list[str], ckpt_path: str, fmt: str, out: Path | None = None, batch: int = 64
) -> tuple[Path, float, int]:
    """Build the config's model and data, load the checkpoint, export the standalone model.

    Every check a user can fail (format, checkpoint, output folder, model config) runs before
    anything is written. Returns (path written, max probability difference, inputs checked).
    """
    check_format(fmt)
    checkpoint = read_checkpoint(ckpt_path)
    out = out if out is not None else default_out(Path(ckpt_path), fmt)
    check_out_path(out)
    from dnn_tricks.app import TrainerCLI

    cli = TrainerCLI(args=config_args, run=False)  # a run's saved config.yaml works too
    model = cli.model
    check_matches_model(checkpoint, model, str(ckpt_path))
    model.load_state_dict(checkpoint["state_dict"])
    example = next(iter(cli.datamodule.raw_batches("test", batch=batch)))
    diff = export_model(model.standalone(), example, fmt, out)
    return out, diff, len(example)


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="trainer export",
        description="Write a trained model (raw inputs -> logits, input normalization "
        "included) as a standalone file, checked against PyTorch on real test inputs. Other "
        "arguments (--config, --data.*, --model.*) are read as by `trainer fit`.",
    )
    parser.add_argument("--ckpt_path", help="checkpoint to export (a .ckpt of a run)")
    parser.add_argument("--format", default="onnx", help="onnx, torchscript or exported_program")
    parser.add_argument(
        "--out", type=Path, default=None, help="file to write; default: next to the checkpoint"
    )
    parser.add_argument(
        "--batch", type=int, default=64, help="test inputs the written file is checked on"
    )
    known, rest = parser.parse_known_args(argv)
    if not known.ckpt_path:
        raise ValueError("--ckpt_path is required: the checkpoint of the run to export")
    if known.batch < 2:
        raise ValueError(f"--batch={known.batch} must be at least 2")
    out, diff, n = export_checkpoint(rest, known.ckpt_path, known.format, known.out, known.batch)
    print(
        f"wrote {out} ({known.format}): max |p_{known.format} - p_torch| = {diff:.2e} "
        f"on {n} test inputs (tolerance {TOLERANCE:g})"
    )
