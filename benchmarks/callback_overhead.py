"""What each checking / logging callback costs: fit time with it vs. without, same run.

Trains the quick-start model (digits, MLP 256-128 with batch norm, batch 32) for a few
epochs with no extra callback, then with each callback alone, and prints the time ratios.
A tiny model on a CPU is the worst case for a callback's relative cost: its per-step work
does not shrink with the model. Every configuration runs ``--repeats`` times; the fastest
run counts (the least disturbed by other load on the machine). CPU time of this process is
reported next to wall time because it is less sensitive to other processes.

    python benchmarks/callback_overhead.py --epochs 5 --repeats 3
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from functools import partial

import torch
from lightning.pytorch import Trainer, seed_everything
from lightning.pytorch.loggers import TensorBoardLogger

from dnn_tricks.callbacks.activation_stats import ActivationStats
from dnn_tricks.callbacks.figures import (
    AugmentationGrid,
    ConfusionMatrix,
    NormalizationSpectrum,
    WeightHistograms,
)
from dnn_tricks.callbacks.input_stats import InputStatsCheck
from dnn_tricks.callbacks.precise_bn import PreciseBN
from dnn_tricks.callbacks.running_stats import RunningStatsCheck
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.nets import MLP

CONFIGURATIONS = {
    "baseline (no extra callback)": list,
    "ActivationStats every 50 steps": lambda: [ActivationStats(every_n_steps=50)],
    "ActivationStats every step": lambda: [ActivationStats(every_n_steps=1)],
    "RunningStatsCheck (100 steps, 8 batches)": lambda: [RunningStatsCheck()],
    "RunningStatsCheck every step": lambda: [RunningStatsCheck(every_n_steps=1)],
    "InputStatsCheck": lambda: [InputStatsCheck()],
    "figures": lambda: [NormalizationSpectrum(), AugmentationGrid(), ConfusionMatrix()],
    "WeightHistograms every epoch": lambda: [WeightHistograms()],
    "PreciseBN (200 batches)": lambda: [PreciseBN(checkpoint=None)],
}


def run_once(callbacks: list, epochs: int, log_dir: str) -> tuple[float, float, int]:
    seed_everything(0, verbose=False)
    model = Classifier(
        net=partial(MLP, hidden=[256, 128], norm="batch", dropout=0.1),
        optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9, nesterov=True),
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    data = DataModule(source="digits", batch_size=32, val_fraction=0.15)
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        logger=TensorBoardLogger(log_dir, name="bench"),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
        callbacks=callbacks,
    )
    wall, cpu = time.perf_counter(), time.process_time()
    trainer.fit(model, data)
    return time.perf_counter() - wall, time.process_time() - cpu, trainer.global_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    import logging

    logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as log_dir:
        run_once([], 1, log_dir)  # warm-up: imports, first-touch allocations
        for _ in range(args.repeats):  # interleaved, so slow phases of the machine hit all
            for name, make in CONFIGURATIONS.items():
                wall, cpu, steps = run_once(make(), args.epochs, log_dir)
                best = results.get(name, (float("inf"), float("inf")))
                results[name] = (min(best[0], wall), min(best[1], cpu))
    base_wall, base_cpu = results["baseline (no extra callback)"]
    print(
        f"digits MLP 256-128 BN, {args.epochs} epochs ({steps} steps), "
        f"{args.threads} thread(s), best of {args.repeats}"
    )
    print(f"{'configuration':44s} {'wall s':>7s} {'ratio':>6s} {'cpu s':>7s} {'ratio':>6s}")
    for name, (wall, cpu) in results.items():
        print(f"{name:44s} {wall:7.2f} {wall / base_wall:6.3f} {cpu:7.2f} {cpu / base_cpu:6.3f}")


if __name__ == "__main__":
    main()
