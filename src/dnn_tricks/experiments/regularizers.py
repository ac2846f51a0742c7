"""No regularizer vs L2 vs dropout vs Jacobian vs all of them, on real Fashion-MNIST.

A small version of Hoffman, Roberts & Yaida (2019), "Robust Learning with Jacobian
Regularization", Table 1: every setting trains the same MLP (784-512-512-10, ReLU) with the
same optimizer, schedule, epochs and seed, and reports test accuracy next to the mean
Frobenius norm ||J(x)||_F of the input-output Jacobian over test images. The claim checked:
the Jacobian penalty (lambda / 2) ||J||_F^2 gives by far the smallest ||J||_F (in the paper's
MNIST table far below no regularization, L2 and dropout) at little cost in accuracy.

    python -m dnn_tricks.experiments.regularizers --epochs 8 --train-size 20000

writes ``regularizers.md`` (the table) and TensorBoard runs ``<setting>/version_N`` under
``--out``. ||J||_F is taken with respect to the network's input, i.e. the standardized image
the penalty acts on, exactly (one backward pass per class), in eval mode.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import logging
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from dnn_tricks import regularize

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class Setting:
    """One regularization setting; everything off by default.

    Args:
        weight_decay: L2 decay of the weights through SGD's ``weight_decay`` (biases are
            exempt, see ``regularize.decay_param_groups``). torch's SGD adds weight_decay * W
            to the gradient before momentum, so this equals the explicit loss term
            (weight_decay / 2) sum W^2.
        dropout: drop probability of hidden units (Srivastava et al. 2014 keep 0.5: 0.5).
        input_dropout: drop probability of input pixels (Srivastava et al. keep 0.8: 0.2).
        jacobian: lambda_JR of the penalty (lambda_JR / 2) ||J||_F^2 (Hoffman et al. 2019).
        jacobian_projections: random projections per sample of the training estimate.
    """

    weight_decay: float = 0.0
    dropout: float = 0.0
    input_dropout: float = 0.0
    jacobian: float = 0.0
    jacobian_projections: int = 1

    def describe(self) -> str:
        parts = []
        if self.weight_decay:
            parts.append(f"SGD weight_decay {self.weight_decay:g}")
        if self.dropout or self.input_dropout:
            parts.append(f"dropout hidden {self.dropout:g} / input {self.input_dropout:g}")
        if self.jacobian:
            n = self.jacobian_projections
            parts.append(f"Jacobian lambda {self.jacobian:g}, {n} projection{'s' * (n != 1)}")
        return ", ".join(parts) or "-"


# Hoffman et al.'s five rows with common strengths: wd 5e-4, Srivastava et al.'s dropout
# rates, lambda_JR 0.01 with one projection (the paper finds one projection enough).
SETTINGS: dict[str, Setting] = {
    "none": Setting(),
    "L2": Setting(weight_decay=5e-4),
    "dropout": Setting(dropout=0.5, input_dropout=0.2),
    "Jacobian": Setting(jacobian=0.01),
    "all": Setting(weight_decay=5e-4, dropout=0.5, input_dropout=0.2, jacobian=0.01),
}


def _resolve(settings: Sequence[str] | Mapping[str, Setting] | None) -> dict[str, Setting]:
    if settings is None:
        return dict(SETTINGS)
    if isinstance(settings, Mapping):
        return dict(settings)
    unknown = [s for s in settings if s not in SETTINGS]
    if unknown:
        raise ValueError(
            f"settings={unknown} unknown; choose from: {', '.join(SETTINGS)} "
            "(or pass a mapping name -> Setting)"
        )
    return {name: SETTINGS[name] for name in settings}


def jacobian_norm_on_test(model: torch.nn.Module, data: Any, n: int) -> tuple[float, Tensor]:
    """Mean exact ||J(x)||_F of ``model.net`` (eval mode) over the first ``n`` test images.

    The images come through the test loader and the DataModule's device hook, so they are
    normalized exactly as ``trainer.test`` fed them. Returns (mean, the inputs used).
    """
    model.eval()
    inputs = []
    for batch in data.test_dataloader():
        x, _ = data.on_after_batch_transfer(batch, 0)
        inputs.append(x)
        if sum(len(b) for b in inputs) >= n:
            break
    x = torch.cat(inputs)[:n]
    total = 0.0
    for chunk in x.split(250):  # C backward passes per chunk; keeps the graph small
        total += len(chunk) * float(regularize.jacobian_norm(model.net, chunk, projections=-1))
    return total / len(x), x


def train_setting(
    name: str,
    setting: Setting,
    *,
    epochs: int,
    train_size: int | None,
    batch_size: int,
    hidden: Sequence[int],
    lr: float,
    jacobian_images: int,
    out: Path,
    root: str | None,
    seed: int,
) -> tuple[dict, tuple[Any, Tensor]]:
    """Train one setting: its row (test accuracy, mean test ||J||_F, cost), the trained
    Classifier and the normalized test images ||J||_F was measured on."""
    from lightning.pytorch import Trainer, seed_everything
    from lightning.pytorch.loggers import TensorBoardLogger

    from dnn_tricks.data.datamodule import DataModule
    from dnn_tricks.models.classifier import Classifier
    from dnn_tricks.models.input_norm import NormalizeConfig
    from dnn_tricks.models.nets import MLP
    from dnn_tricks.schedules import WarmupCosine

    seed_everything(seed, verbose=False)  # same initial weights for every setting
    data = DataModule(
        source="fashion_mnist",
        root=root,
        batch_size=batch_size,
        train_subset=train_size,
        seed=seed,
        normalize=NormalizeConfig(kind="standardize"),
        num_workers=0,
    )
    net = functools.partial(
        MLP, hidden=tuple(hidden), dropout=setting.dropout, input_dropout=setting.input_dropout
    )
    model = Classifier(
        net=net,
        optimizer=functools.partial(
            torch.optim.SGD, lr=lr, momentum=0.9, weight_decay=setting.weight_decay
        ),
        # cosine annealing per step, identical for all settings (total steps from the trainer)
        scheduler=functools.partial(WarmupCosine, warmup_steps=0),
        scheduler_interval="step",
        input_shape=data.input_shape,
        num_classes=data.num_classes,
        regularizers=(
            [regularize.Jacobian(setting.jacobian, setting.jacobian_projections)]
            if setting.jacobian
            else []
        ),
        val_jacobian=True,
    )
    trainer = Trainer(
        max_epochs=epochs,
        accelerator="cpu",
        devices=1,
        logger=TensorBoardLogger(str(out), name=name),
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        log_every_n_steps=20,
    )
    start = time.perf_counter()
    trainer.fit(model, datamodule=data)
    seconds = time.perf_counter() - start
    (metrics,) = trainer.test(model, datamodule=data, verbose=False)
    jac, inputs = jacobian_norm_on_test(model, data, jacobian_images)
    row = {
        "setting": name,
        "regularizers": setting.describe(),
        "test_acc": float(metrics["test/acc"]),
        "test_images": len(data.split("test")[1]),
        "jacobian_norm": jac,
        "jacobian_images": len(inputs),
        "train_images": len(data.split("train")[1]),
        "epochs": epochs,
        "steps": int(trainer.global_step),
        "train_seconds": seconds,
    }
    return row, (model, inputs)


def markdown_table(rows: list[dict]) -> str:
    """Hoffman et al.'s Table 1 layout: setting, test accuracy (%), mean test ||J||_F."""
    lines = [
        "| setting | regularizers | test acc (%) | mean test ‖J‖_F | train s |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['setting']} | {r['regularizers']} | {100 * r['test_acc']:.2f} "
            f"| {r['jacobian_norm']:.3g} | {r['train_seconds']:.0f} |"
        )
    r = rows[0]
    lines += [
        "",
        f"Fashion-MNIST, {r['train_images']} train images, {r['epochs']} epochs "
        f"({r['steps']} steps) per setting; accuracy on the {r['test_images']} test images; "
        f"‖J‖_F exact, eval mode, w.r.t. the standardized input, mean over the first "
        f"{r['jacobian_images']} test images.",
    ]
    return "\n".join(lines) + "\n"


@contextlib.contextmanager
def _quiet(threads: int) -> Iterator[None]:
    """Set torch's threads and silence per-run Lightning banners for the sweep."""
    import lightning.pytorch  # noqa: F401 - it configures its loggers on import

    logger = logging.getLogger("lightning.pytorch")
    level, old_threads = logger.level, torch.get_num_threads()
    logger.setLevel(logging.WARNING)
    torch.set_num_threads(threads)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", ".*does not have many workers.*")
            warnings.filterwarnings("ignore", ".*LeafSpec.*")  # Lightning-internal deprecation
            warnings.filterwarnings("ignore", ".*smaller than the logging interval.*")
            yield
    finally:
        logger.setLevel(level)
        torch.set_num_threads(old_threads)


def run(
    settings: Sequence[str] | Mapping[str, Setting] | None = None,
    epochs: int = 8,
    train_size: int | None = 20000,
    out: str | Path = "logs/regularizers",
    batch_size: int = 128,
    hidden: Sequence[int] = (512, 512),
    lr: float = 0.05,
    jacobian_images: int = 1000,
    root: str | None = FASHION_MNIST_ROOT,
    seed: int = 0,
    threads: int = 1,
    keep_models: bool = False,
) -> list[dict]:
    """Train every setting; write ``regularizers.md`` under ``out`` and return the rows.

    ``settings``: names from ``SETTINGS`` (all five when None) or a mapping name -> Setting.
    ``keep_models`` adds each trained Classifier (``model``) and the normalized test images
    its ||J||_F was measured on (``jacobian_inputs``) to the rows, for checking.
    """
    chosen = _resolve(settings)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with _quiet(threads):
        for name, setting in chosen.items():
            row, (model, inputs) = train_setting(
                name,
                setting,
                epochs=epochs,
                train_size=train_size,
                batch_size=batch_size,
                hidden=hidden,
                lr=lr,
                jacobian_images=jacobian_images,
                out=out,
                root=root,
                seed=seed,
            )
            print(
                f"{name:>9}: test acc {100 * row['test_acc']:.2f}%, "
                f"||J||_F {row['jacobian_norm']:.3g} ({row['train_seconds']:.0f} s)",
                flush=True,
            )
            if keep_models:
                row |= {"model": model, "jacobian_inputs": inputs}
            rows.append(row)
    (out / "regularizers.md").write_text(markdown_table(rows))
    return rows


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    parser.add_argument("--epochs", type=int, default=8, help="epochs for every setting")
    parser.add_argument("--train-size", type=int, default=20000, help="train subset size")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--lr", type=float, default=0.05, help="SGD peak lr (cosine to 0)")
    parser.add_argument("--jacobian-images", type=int, default=1000, help="test images for J")
    parser.add_argument("--out", default="logs/regularizers", help="output folder")
    parser.add_argument("--root", default=FASHION_MNIST_ROOT, help="Fashion-MNIST folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    args = parser.parse_args(argv)
    rows = run(
        settings=args.settings,
        epochs=args.epochs,
        train_size=args.train_size,
        out=args.out,
        batch_size=args.batch_size,
        lr=args.lr,
        jacobian_images=args.jacobian_images,
        root=args.root,
        seed=args.seed,
        threads=args.threads,
    )
    print(markdown_table(rows))


if __name__ == "__main__":
    main()
