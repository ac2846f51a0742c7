"""HParamsSummary: one row per run in TensorBoard's HParams tab, with its final metrics.

TensorBoard keeps the FIRST hyperparameter summary of a run and ignores later ones (see its
event accumulator: "we must also ignore non-initial metadata"), and Lightning writes one
with a placeholder ``hp_metric = -1`` when fit starts unless the logger has
``default_hp_metric: false``. So this callback writes its summary at fit start, before
Lightning does, naming the metric tags the tab should show. The tab shows each tag's last
value in the run, so ``val/acc`` is the final validation accuracy and ``test/acc`` the test
accuracy that ``trainer fit`` measures after fitting, with no extra logging.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml
from lightning.pytorch import Callback, LightningModule, Trainer

from dnn_tricks.callbacks.trainer_utils import log_scalars, tensorboard


def flatten_params(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested config -> {"a/b/c": value} with values TensorBoard accepts (numbers, strings,
    booleans); lists, None and objects become their text. Lightning's own keys (``_...``)
    are dropped."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        if str(key).startswith("_"):
            continue
        name = f"{prefix}{key}"
        if isinstance(value, Mapping):
            flat.update(flatten_params(value, f"{name}/"))
        elif isinstance(value, (bool, int, float, str)):
            flat[name] = value
        else:
            flat[name] = getattr(value, "__qualname__", None) or str(value)
    return flat


def select(config: Mapping[str, Any], keys: list[str]) -> dict[str, Any]:
    """The parts of a nested config named by dotted keys (``model``, ``trainer.max_epochs``)."""
    chosen: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            chosen[key.replace(".", "/")] = node
    return chosen


class HParamsSummary(Callback):
    """Writes the run's hyperparameters with the metric tags the HParams tab compares runs
    by, at fit start (before Lightning's own summary; see the module docstring).

    The hyperparameters are the ``include`` parts of the run's resolved config (the
    ``config.yaml`` that ``trainer fit`` saves in the log folder), flattened to
    ``model/optimizer/init_args/lr``-style names; without that file (a Python script), the
    model's and the DataModule's saved hyperparameters. With ``best`` it also logs
    ``hparams/best_<monitor>`` at fit end: the best score of the run's ModelCheckpoint (for
    ``val/acc``: ``hparams/best_val_acc``). Stateless: a resumed run writes to a new log
    folder and gets its own summary there.

    Example, under ``trainer.callbacks`` in a config::

        - class_path: dnn_tricks.callbacks.hparams.HParamsSummary
          init_args:
            metrics: [val/acc, val/loss, test/acc]
            include: [model, data, seed_everything, trainer.max_epochs]
            best: true

    Args:
        metrics: scalar tags shown as the run's results (their last logged values).
        include: dotted config keys whose values (whole sub-trees for sections) become the
            run's hyperparameters.
        best: add the ModelCheckpoint's best monitored score as a result.
    """

    def __init__(
        self,
        metrics: list[str] | tuple[str, ...] = ("val/acc", "val/loss", "test/acc"),
        include: list[str] | tuple[str, ...] = (
            "model",
            "data",
            "seed_everything",
            "trainer.max_epochs",
            "trainer.precision",
            "trainer.accumulate_grad_batches",
            "trainer.gradient_clip_val",
        ),
        best: bool = True,
    ) -> None:
        for key, value in (("metrics", metrics), ("include", include)):
            if isinstance(value, str) or not value:
                raise ValueError(
                    f"HParamsSummary {key}={value!r} must be a non-empty list, e.g. "
                    + ("[val/acc, test/acc]" if key == "metrics" else "[model, data]")
                )
        self.metrics, self.include, self.best = list(metrics), list(include), best

    @staticmethod
    def _best_tag(trainer: Trainer) -> str | None:
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        return f"hparams/best_{monitor.replace('/', '_')}" if monitor else None

    def params(self, trainer: Trainer, pl_module: LightningModule, log_dir: str) -> dict[str, Any]:
        config_file = Path(log_dir) / "config.yaml"
        if config_file.is_file():
            config = yaml.safe_load(config_file.read_text()) or {}
        else:
            data = getattr(trainer.datamodule, "hparams", None) or {}
            config = {"model": dict(pl_module.hparams), "data": dict(data)}
        return flatten_params(select(config, self.include))

    def on_fit_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        writer = tensorboard(trainer)
        if writer is None:
            return
        from torch.utils.tensorboard.summary import hparams

        tags = list(self.metrics)
        if self.best and (tag := self._best_tag(trainer)):
            tags.append(tag)
        # hparams() only reads the metric names; values come from the run's scalars
        file_writer = writer._get_file_writer()  # what Lightning's logger writes through too
        # the writer's folder, not trainer.log_dir: that one is a collective under DDP and
        # only rank 0 gets here
        params = self.params(trainer, pl_module, writer.get_logdir())
        for summary in hparams(params, dict.fromkeys(tags, 0.0)):
            file_writer.add_summary(summary, trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        score = getattr(trainer.checkpoint_callback, "best_model_score", None)
        tag = self._best_tag(trainer)
        if self.best and tag and score is not None:
            log_scalars(trainer, {tag: float(score)})
