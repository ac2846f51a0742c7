"""Does the train loader keep ahead of the model? Images/s of the DataModule's train loader
(with its default settings: ``num_workers: auto``, ``pin_memory: auto``, persistent workers)
against images/s of training steps of the config's network on one resident batch.

Rows: the loader as configured, then the same loader through the on-device normalization,
then with an augmentation pipeline at 0 workers and at the ``auto`` worker count. A ratio
loader / model well above 1 means the model never waits for data; with workers the loader
runs in other processes, but on a 2-core machine it also takes cores from the model.

    .venv/bin/python benchmarks/loader_throughput.py [--config configs/fashion_mnist.yaml]
        [--augment configs/augment/medium.yaml] [--batches 50] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from dnn_tricks.app import TrainerCLI  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def build(config: Path, *extra: str) -> TrainerCLI:
    with tempfile.TemporaryDirectory() as log_dir:
        return TrainerCLI(
            args=[
                "--config",
                str(config),
                f"--trainer.logger.init_args.save_dir={log_dir}",
                *extra,
            ],
            run=False,
        )


def loader_rate(cli: TrainerCLI, batches: int, normalize: bool) -> tuple[float, int]:
    """Images/s over ``batches`` train batches (after the first, which starts the workers)."""
    data = cli.datamodule
    data.setup("fit")
    loader = data.train_dataloader()
    iterator = iter(loader)
    next(iterator)
    start, n = time.perf_counter(), 0
    for _ in range(batches):
        x, _ = next(iterator)
        if normalize:
            data.prepare_inputs(x)
        n += len(x)
    return n / (time.perf_counter() - start), loader.num_workers


def model_rate(cli: TrainerCLI, steps: int = 20) -> float:
    """Images/s of SGD steps (forward, backward, update) on one normalized train batch."""
    data, net = cli.datamodule, cli.model.net
    data.setup("fit")
    x, y = next(iter(data.train_dataloader()))
    x = data.prepare_inputs(x)
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    net.train()

    def run(n: int) -> float:
        start = time.perf_counter()
        for _ in range(n):
            optimizer.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            optimizer.step()
        return n * len(x) / (time.perf_counter() - start)

    run(3)  # warm-up
    return run(steps)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fashion_mnist.yaml")
    parser.add_argument(
        "--augment", type=Path, default=ROOT / "configs" / "augment" / "medium.yaml"
    )
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base = build(args.config)
    model = model_rate(base)
    rows = [
        ("loader as configured", base, False),
        ("  + on-device normalization", build(args.config), True),
        (
            "  + augment, 0 workers",
            build(args.config, f"--data.augment={args.augment}", "--data.num_workers=0"),
            True,
        ),
        ("  + augment, auto workers", build(args.config, f"--data.augment={args.augment}"), True),
    ]
    print(
        f"{args.config.name}, batch {base.datamodule.batch_size}, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores; "
        f"pin_memory auto -> {torch.cuda.is_available()}"
    )
    print(f"{'':32} {'workers':>7} {'images/s':>10} {'/ model':>8}")
    print(f"{'model training steps':32} {'':>7} {model:10.0f}")
    for label, cli, normalize in rows:
        rate, workers = loader_rate(cli, args.batches, normalize)
        print(f"{label:32} {workers:7d} {rate:10.0f} {rate / model:7.1f}x")


if __name__ == "__main__":
    main()
