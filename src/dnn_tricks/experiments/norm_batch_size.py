"""Batch norm vs group norm vs layer norm as the batch shrinks: a small Wu & He (2018) repro.

Wu & He (2018), "Group Normalization", Fig. 1 / Table 2: ImageNet ResNet-50 top-1 error
goes 23.6 -> 34.7% for batch norm from 32 to 2 images per GPU while group norm stays at
24.1%, because batch statistics from a few samples are noisy in training and a poor match
for the running estimates used at test time. Here a small ConvNet on Fashion-MNIST trains
with each norm at each batch size for the same number of epochs, hence the same samples
seen. The learning rate follows the linear scaling rule of Goyal et al. (2017),
lr = base_lr * batch_size / 32, as Wu & He do, so every run takes the same total step.

    python -m dnn_tricks.experiments.norm_batch_size --epochs 2 --train-size 10000

writes ``results.md`` (the error table) and ``error_vs_batch_size.png`` under ``--out``.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import torch

REFERENCE_BATCH = 32
FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


def train_one(
    norm: str,
    batch_size: int,
    *,
    epochs: int,
    train_size: int | None,
    base_lr: float,
    source: str,
    root: str | None,
    seed: int,
    channels: Sequence[int],
    num_groups: int,
    limit_train_batches: int | float | None,
    limit_test_batches: int | float | None,
) -> dict:
    """Train one ConvNet with ``norm`` at ``batch_size``; its test accuracy and cost."""
    from lightning.pytorch import Trainer, seed_everything

    from dnn_tricks.data.datamodule import DataModule
    from dnn_tricks.models.classifier import Classifier
    from dnn_tricks.models.nets import ConvNet

    seed_everything(seed, verbose=False)  # same init and batch order for every norm
    data = DataModule(
        source=source,
        root=root,
        batch_size=batch_size,
        train_subset=train_size,
        seed=seed,
        num_workers=0,
    )
    lr = base_lr * batch_size / REFERENCE_BATCH
    net = functools.partial(
        ConvNet,
        channels=tuple(channels),
        convs_per_stage=1,
        hidden=(128,),
        norm=norm,
        num_groups=num_groups,
    )
    model = Classifier(
        net=net,
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=0.9),
        input_shape=data.input_shape,
        num_classes=data.num_classes,
    )
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,  # only the final test error is compared
        limit_train_batches=limit_train_batches,
        limit_test_batches=limit_test_batches,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    acc = float(metrics["test/acc"])
    return {
        "norm": norm,
        "batch_size": batch_size,
        "lr": lr,
        "epochs": epochs,
        "steps": int(trainer.global_step),
        "samples_seen": int(trainer.global_step) * batch_size,
        "test_acc": acc,
        "test_error": 100.0 * (1.0 - acc),
        "train_seconds": seconds,
    }


def markdown_table(rows: list[dict]) -> str:
    """Test error (%) with one row per norm and one column per batch size, as in Wu & He's
    Table 2, followed by every run's details."""
    norms = list(dict.fromkeys(r["norm"] for r in rows))
    sizes = sorted({r["batch_size"] for r in rows}, reverse=True)
    cell = {(r["norm"], r["batch_size"]): r for r in rows}
    lines = [
        "Test error (%) by batch size",
        "",
        "| norm | " + " | ".join(f"bs {b}" for b in sizes) + " |",
        "|---|" + "---|" * len(sizes),
    ]
    for norm in norms:
        errors = [f"{cell[norm, b]['test_error']:.2f}" if (norm, b) in cell else "" for b in sizes]
        lines.append(f"| {norm} | " + " | ".join(errors) + " |")
    lines += [
        "",
        "| norm | batch size | lr | epochs | steps | samples seen | test acc | train s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['norm']} | {r['batch_size']} | {r['lr']:.4g} | {r['epochs']} | {r['steps']} "
            f"| {r['samples_seen']} | {r['test_acc']:.4f} | {r['train_seconds']:.0f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: Path) -> None:
    """Error vs batch size per norm, large batches on the left as in Wu & He's Fig. 1."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 3.5))
    for norm in dict.fromkeys(r["norm"] for r in rows):
        points = sorted((r["batch_size"], r["test_error"]) for r in rows if r["norm"] == norm)
        sizes, errors = zip(*points, strict=True)
        ax.plot(sizes, errors, marker="o", label=f"{norm} norm")
    ax.set_xscale("log", base=2)
    ax.invert_xaxis()
    sizes = sorted({r["batch_size"] for r in rows})
    ax.set_xticks(sizes, [str(s) for s in sizes])
    ax.set_xlabel("batch size (images per step)")
    ax.set_ylabel("test error (%)")
    ax.set_title("Fashion-MNIST ConvNet, same epochs per run")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


@contextlib.contextmanager
def _quiet(threads: int) -> Iterator[None]:
    """Fewer threads and no per-run Lightning banners for the duration of the sweep."""
    import lightning.pytorch  # noqa: F401 - it configures its loggers on import

    logger = logging.getLogger("lightning.pytorch")
    level, old_threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning-internal deprecation
            yield
    finally:
        logger.setLevel(level)
        torch.set_num_threads(old_threads)


def run(
    batch_sizes: Sequence[int] = (32, 8, 2),
    norms: Sequence[str] = ("batch", "group", "layer"),
    epochs: int = 2,
    train_size: int | None = 10000,
    base_lr: float = 0.05,
    out: str | Path = "logs/norm_batch_size",
    source: str = "fashion_mnist",
    root: str | None = FASHION_MNIST_ROOT,
    seed: int = 0,
    channels: Sequence[int] = (32, 64),
    num_groups: int = 8,
    limit_train_batches: int | float | None = None,
    limit_test_batches: int | float | None = None,
    threads: int = 1,
) -> list[dict]:
    """Train every norm at every batch size; write results.md and the PNG under ``out``.

    ``threads`` sets torch's intra-op threads for the runs: on a small shared CPU one thread
    was 30x faster per batch-2 step than two (4 ms vs 170 ms), since tiny batches leave
    nothing to split and contended threads spin.
    """
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with _quiet(threads):
        for batch_size in batch_sizes:
            for norm in norms:
                r = train_one(
                    norm,
                    batch_size,
                    epochs=epochs,
                    train_size=train_size,
                    base_lr=base_lr,
                    source=source,
                    root=root,
                    seed=seed,
                    channels=channels,
                    num_groups=num_groups,
                    limit_train_batches=limit_train_batches,
                    limit_test_batches=limit_test_batches,
                )
                rows.append(r)
                print(
                    f"{norm:>6} norm, batch {batch_size:>3}: test error {r['test_error']:.2f}% "
                    f"({r['steps']} steps, {r['train_seconds']:.0f} s)",
                    flush=True,
                )
    (out / "results.md").write_text(markdown_table(rows))
    plot(rows, out / "error_vs_batch_size.png")
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=2, help="epochs for every run")
    parser.add_argument("--train-size", type=int, default=10000, help="train subset size")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[32, 8, 2])
    parser.add_argument("--norms", nargs="+", default=["batch", "group", "layer"])
    parser.add_argument("--base-lr", type=float, default=0.05, help="SGD lr at batch size 32")
    parser.add_argument("--out", default="logs/norm_batch_size", help="output folder")
    parser.add_argument("--root", default=FASHION_MNIST_ROOT, help="Fashion-MNIST folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    rows = run(
        batch_sizes=args.batch_sizes,
        norms=args.norms,
        epochs=args.epochs,
        train_size=args.train_size,
        base_lr=args.base_lr,
        out=args.out,
        root=args.root,
        seed=args.seed,
        threads=args.threads,
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
