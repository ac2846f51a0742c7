"""``trainer lr-find``: Lightning's learning-rate range test (Smith 2017) on a config.

The lr grows geometrically (or linearly) from ``min_lr`` to ``max_lr`` over ``num_training``
optimizer steps while the (smoothed) training loss is recorded; the suggestion is the lr where
the loss falls fastest. Writes ``lr_find.png`` (loss against lr, suggestion marked) and
``lr_find.json`` (suggestion and the curve), by default under the config's log folder
(``logs/<name>/lr_find``), and prints the suggested lr. The model and data are built exactly
as ``trainer fit`` builds them; the run leaves no checkpoint, log folder or config.yaml.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from lightning.pytorch.callbacks import Checkpoint
from lightning.pytorch.cli import SaveConfigCallback
from lightning.pytorch.tuner import Tuner


def find_lr(
    config_args: list[str],
    out: Path | None = None,
    min_lr: float = 1e-6,
    max_lr: float = 1.0,
    num_training: int = 100,
    mode: str = "exponential",
) -> dict:
    """Run the range test on the model and data of ``config_args`` (as ``trainer fit`` reads
    them); write the plot and the JSON to ``out`` and return what the JSON holds."""
    from dnn_tricks.app import TrainerCLI

    if not 0 < min_lr < max_lr:
        raise ValueError(f"--min_lr={min_lr} and --max_lr={max_lr} need 0 < min_lr < max_lr")
    if num_training < 2:
        raise ValueError(f"--num_training={num_training} must be at least 2")
    cli = TrainerCLI(args=config_args, run=False)
    trainer = cli.trainer
    root = getattr(trainer.logger, "root_dir", None) or trainer.default_root_dir
    out = Path(out) if out is not None else Path(root) / "lr_find"
    # A probe, not a run: nothing logged, checkpointed or saved as the run's config.
    trainer.loggers = []
    trainer.callbacks = [
        c for c in trainer.callbacks if not isinstance(c, (Checkpoint, SaveConfigCallback))
    ]
    model, data = cli.model, cli.datamodule
    # the finder steps its own schedule and reads the loss once per Lightning step
    data.steps_per_batch = 1
    # The sweep runs in a callback's on_fit_start, before the model would fit its data-fitted
    # layers (input normalization, whitening stem) in its own: fit them first, as fit does.
    data.setup("fit")
    model.adapt_layers(lambda: data.raw_batches("train"))
    finder = Tuner(trainer).lr_find(
        model,
        datamodule=data,
        min_lr=min_lr,
        max_lr=max_lr,
        num_training=num_training,
        mode=mode,
        update_attr=False,
    )
    if finder is None:  # only under fast_dev_run
        raise ValueError("trainer.fast_dev_run skips the lr finder; unset it")
    suggestion = finder.suggestion()
    result = {
        "suggested_lr": suggestion,
        "min_lr": min_lr,
        "max_lr": max_lr,
        "mode": mode,
        "lr": [float(v) for v in finder.results["lr"]],
        "loss": [float(v) for v in finder.results["loss"]],
    }
    out.mkdir(parents=True, exist_ok=True)
    (out / "lr_find.json").write_text(json.dumps(result, indent=1))
    figure = finder.plot(suggest=suggestion is not None, show=False)
    figure.savefig(out / "lr_find.png", dpi=100)
    return result


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="trainer lr-find",
        description="Learning-rate range test: sweep the lr over some training steps, write the "
        "loss curve (PNG, JSON) and print the suggested lr. Other arguments (--config, "
        "--model.*, --data.*, --trainer.*) are read as by `trainer fit`.",
    )
    parser.add_argument("--out", type=Path, default=None, help="default: <log dir>/lr_find")
    parser.add_argument("--min_lr", type=float, default=1e-6, help="first lr of the sweep")
    parser.add_argument("--max_lr", type=float, default=1.0, help="last lr of the sweep")
    parser.add_argument("--num_training", type=int, default=100, help="steps in the sweep")
    parser.add_argument("--mode", choices=("exponential", "linear"), default="exponential")
    known, rest = parser.parse_known_args(argv)
    result = find_lr(rest, known.out, known.min_lr, known.max_lr, known.num_training, known.mode)
    where = known.out or "the log folder's lr_find/"
    print(
        f"suggested learning rate: {result['suggested_lr']} (lr_find.png, lr_find.json in {where})"
    )
