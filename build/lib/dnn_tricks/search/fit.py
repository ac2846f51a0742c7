"""A run of a study is a normal ``trainer fit`` inside this process, made from base configs
plus dotted overrides: the search's trials and the ablation's runs are both made here."""

from __future__ import annotations

import logging
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import optuna
from lightning.pytorch import Callback, Trainer

from dnn_tricks.app import TrainerCLI
from dnn_tricks.search.config import override_args


def training_args(base: Sequence[str], *overrides: Mapping[str, Any]) -> list[str]:
    """``TrainerCLI`` arguments: the base configs in order, then each set of overrides."""
    args = [arg for path in base for arg in ("--config", str(path))]
    for values in overrides:
        args += override_args(dict(values))
    return args


def run_args(save_dir: str, name: str, max_seconds: float | None = None) -> list[str]:
    """What makes a fit a run of a study: quiet, logging to ``<save_dir>/<name>/version_N``,
    and stopped after ``max_seconds`` of training (Lightning's ``trainer.max_time``)."""
    args = [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        f"--trainer.logger.init_args.name={name}",
    ]
    if max_seconds is not None:
        seconds = math.ceil(max_seconds)
        days, rest = divmod(seconds, 86400)
        stamp = f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
        args.append(f"--trainer.max_time={stamp}")
    return args


class _ConfigOnly(TrainerCLI):
    """Parses and checks a training config like ``trainer``, without building anything."""

    def instantiate_classes(self) -> None:
        pass


def resolve_config(args: list[str]) -> str:
    """The complete training config (YAML) these arguments give; an unknown key or a bad
    value raises here, before anything is built."""
    cli = _ConfigOnly(args=args, run=False)
    return cli.parser.dump(cli.config)


class MetricMissing(ValueError):
    """A configured metric was never logged: a config error, not a run's failure."""


@dataclass
class FitResult:
    """What a finished run leaves: every scalar it logged last (``time/fit_s`` is the fit's
    wall time; ``best/<monitor>`` the checkpoint's best score; ``test/*`` of the best
    checkpoint when tested) and the best checkpoint's path ("" without one)."""

    metrics: dict[str, float]
    checkpoint: str
    trainer: Trainer


def scalars(metrics: Mapping[str, Any]) -> dict[str, float]:
    """Logged values (tensors or numbers) with one element -> floats."""
    out = {}
    for key, value in metrics.items():
        if hasattr(value, "numel") and value.numel() != 1:
            continue
        out[key] = float(value.item() if hasattr(value, "item") else value)
    return out


def fit(args: list[str], callbacks: Iterable[Callback] = (), test: bool = False) -> FitResult:
    """Fit with these ``TrainerCLI`` arguments (and extra callbacks), then optionally test the
    best checkpoint as ``trainer fit`` does; returns the logged scalars."""
    cli = TrainerCLI(args=args, run=False)
    cli.trainer.callbacks.extend(callbacks)
    start = time.monotonic()
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    metrics = {"time/fit_s": time.monotonic() - start, **scalars(cli.trainer.callback_metrics)}
    checkpoint = cli.trainer.checkpoint_callback
    best = str(getattr(checkpoint, "best_model_path", "") or "") if checkpoint else ""
    score = getattr(checkpoint, "best_model_score", None)
    if checkpoint is not None and getattr(checkpoint, "monitor", None) and score is not None:
        metrics[f"best/{checkpoint.monitor}"] = float(score)
    if test and not cli.trainer.interrupted:
        results = cli.trainer.test(
            cli.model, datamodule=cli.datamodule, ckpt_path=best or None, weights_only=True
        )
        metrics.update(scalars(results[0] if results else {}))
    return FitResult(metrics, best, cli.trainer)


def read_metric(metrics: Mapping[str, float], metric: str, label: str) -> float:
    """The run's value of ``metric``: the best score when a ModelCheckpoint monitors it (the
    checkpoint that is kept and tested), else its last logged value."""
    if f"best/{metric}" in metrics:
        return metrics[f"best/{metric}"]
    if metric not in metrics:
        logged = ", ".join(sorted(metrics)) or "nothing"
        raise MetricMissing(f"{label}: metric={metric!r} was not logged; logged: {logged}")
    return metrics[metric]


# Warnings that say nothing about the user's config: runs pass args while sys.argv holds the
# subcommand; a best checkpoint is reloaded for testing from another folder on purpose.
_EXPECTED_WARNINGS = (
    "LightningCLI's args parameter is intended",
    "The dirpath has changed",
)


@contextmanager
def quiet() -> Iterator[None]:
    """Runs print one line each, not Lightning's per-fit banner, Optuna's per-trial log and
    expected warnings."""
    names = ("lightning.pytorch", "lightning.fabric", "optuna")
    loggers = [logging.getLogger(name) for name in names]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR if lg.name == "optuna" else logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            # Heartbeat, stale-trial failing and retrying are marked experimental by Optuna.
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
