"""Seconds-long digits fits for the callback tests, and a TensorBoard event reader."""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import TensorBoardLogger

from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.input_norm import NormalizeConfig
from dnn_tricks.models.nets import MLP

# What the shipped configs get under trainer.callbacks (the README's snippet).
CALLBACKS = """
- class_path: dnn_tricks.callbacks.input_stats.InputStatsCheck
- class_path: dnn_tricks.callbacks.running_stats.RunningStatsCheck
  init_args:
    every_n_steps: 100
    drift_batches: 8
- class_path: dnn_tricks.callbacks.activation_stats.ActivationStats
  init_args:
    every_n_steps: 50
- class_path: dnn_tricks.callbacks.precise_bn.PreciseBN
  init_args:
    num_batches: 200
- class_path: dnn_tricks.callbacks.figures.NormalizationSpectrum
- class_path: dnn_tricks.callbacks.figures.AugmentationGrid
- class_path: dnn_tricks.callbacks.figures.ConfusionMatrix
- class_path: dnn_tricks.callbacks.figures.WeightHistograms
"""


@contextmanager
def one_thread() -> Iterator[None]:
    """Tiny models run fastest on one thread, and a loaded machine makes a second
    (spin-waiting) OpenMP thread cost 10-30x on IterNorm's small matrix products."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def digits_model(
    norm: str = "batch",
    hidden: Sequence[int] = (32, 16),
    lr: float = 0.05,
    input_kind: str = "standardize",
    model_class: type[Classifier] = Classifier,
) -> Classifier:
    return model_class(
        net=partial(MLP, hidden=list(hidden), norm=norm, num_groups=4),
        input_norm=NormalizeConfig(kind=input_kind),
        optimizer=partial(torch.optim.SGD, lr=lr, momentum=0.9),
        input_shape=(1, 8, 8),
        num_classes=10,
    )


def digits_data(**kwargs: Any) -> DataModule:
    return DataModule(source="digits", batch_size=32, **kwargs)


def fit(
    callbacks: Sequence[Callback],
    tmp_path: Path | None = None,
    *,
    model: Any = None,
    data: DataModule | None = None,
    epochs: int = 2,
    batches: int = 8,
    checkpoint: bool = False,
    ckpt_path: str | None = None,
    **trainer_kwargs: Any,
) -> tuple[Trainer, Any, DataModule]:
    """A seeded digits fit of ``epochs`` x ``batches`` steps, optionally logging to
    TensorBoard under ``tmp_path`` and saving last/best checkpoints."""
    seed_everything(0, verbose=False)
    model = model if model is not None else digits_model()
    data = data if data is not None else digits_data()
    all_callbacks = list(callbacks)
    if checkpoint:
        all_callbacks.append(ModelCheckpoint(monitor="val/acc", mode="max", save_last=True))
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=2,
        accelerator="cpu",
        logger=TensorBoardLogger(str(tmp_path), name="run") if tmp_path else False,
        enable_checkpointing=checkpoint,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=all_callbacks,
        **trainer_kwargs,
    )
    # test-made checkpoints hold functools.partial hyperparameters: trusted, not weights-only
    trainer.fit(model, data, ckpt_path=ckpt_path, weights_only=False if ckpt_path else None)
    return trainer, model, data


def read_events(log_dir: str | Path) -> Any:
    """Every event of a run folder, with nothing sampled away."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    keep_all = {"scalars": 0, "images": 0, "histograms": 0, "tensors": 0}
    events = EventAccumulator(str(log_dir), size_guidance=keep_all)
    events.Reload()
    return events


def hparams_plugin(events: Any, tag: str) -> Any:
    """The HParams plugin record (experiment or session start) of a run."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    content = events.SummaryMetadata(f"_hparams_/{tag}").plugin_data.content
    return plugin_data_pb2.HParamsPluginData.FromString(content)


class CallbackRecorder(Callback):
    """For DDP tests (ranks are processes the test cannot look into): each rank writes what
    the checking callbacks ended with to ``<out_dir>/rank<R>.json`` at fit end.

    Args:
        out_dir: folder for the per-rank JSON files.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir = Path(out_dir)

    def on_fit_end(self, trainer: Trainer, pl_module: Any) -> None:
        from dnn_tricks.callbacks.norm_stats import running_buffers, running_stat_layers

        found = {type(c).__name__: c for c in trainer.callbacks}
        record = {
            "rank": trainer.global_rank,
            "world_size": trainer.world_size,
            "global_step": trainer.global_step,
            "buffers": {
                f"{name}.{key}": buf.double().flatten().tolist()
                for name, layer in running_stat_layers(pl_module)
                for key, buf in running_buffers(layer).items()
            },
        }
        if "PreciseBN" in found:
            record["precise"] = found["PreciseBN"].state_dict()
            record["precise_path"] = found["PreciseBN"].saved_path
        if "ConfusionMatrix" in found:
            record["confusion"] = found["ConfusionMatrix"].last
        if "RunningStatsCheck" in found:
            record["drift"] = found["RunningStatsCheck"].drift
        if "ActivationStats" in found:
            record["activations"] = found["ActivationStats"].last
        if "InputStatsCheck" in found:
            record["input_problems"] = found["InputStatsCheck"].problems
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(record))


class PlantNaNOnRank(Callback):
    """Puts a NaN into the first running variance on one rank only, after step ``step``.

    Args:
        rank: the global rank that gets the fault.
        step: the optimizer step after which it is planted.
    """

    def __init__(self, rank: int, step: int) -> None:
        self.rank, self.step = rank, step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        from dnn_tricks.callbacks.norm_stats import running_stat_layers

        if trainer.global_rank == self.rank and trainer.global_step == self.step:
            _, layer = running_stat_layers(pl_module)[0]
            layer.running_var[0] = float("nan")
