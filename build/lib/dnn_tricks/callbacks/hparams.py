"""The HParams tab of TensorBoard: one row per run, its config and its final results.

Lightning's own ``SaveConfigCallback`` writes the run's resolved ``config.yaml``; its
``save_config`` hook is the documented place to log that config elsewhere, and
``logger.log_hyperparams(params, metrics)`` writes TensorBoard's hyperparameter summary. The
application installs ``HParamsConfig`` in its place, so every ``trainer`` run gets its row.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import LightningArgumentParser, SaveConfigCallback

INCLUDE = (
    "model",
    "data",
    "seed_everything",
    "trainer.max_epochs",
    "trainer.precision",
    "trainer.accumulate_grad_batches",
    "trainer.gradient_clip_val",
    "trainer.gradient_clip_algorithm",
)
RESULTS = ("val/acc", "val/loss", "test/acc")


def select(config: Mapping[str, Any], keys: Sequence[str]) -> dict[str, Any]:
    """The parts of a nested config named by dotted keys (``model``, ``trainer.max_epochs``),
    as a nested dict; Lightning's logger flattens it to ``model/optimizer/init_args/lr``."""
    chosen: dict[str, Any] = {}
    for key in keys:
        node: Any = config
        for part in key.split("."):
            node = node.get(part) if isinstance(node, Mapping) else None
        if node is not None:
            chosen[key.replace(".", "/")] = node
    return chosen


def result_tag(metric: str) -> str:
    """``val/acc`` -> ``hparams/val_acc``: the HParams tab's own copy of a final result, so
    the placeholder TensorBoard needs at the start never lands on the metric's own curve."""
    return "hparams/" + metric.replace("/", "_")


class HParamsConfig(SaveConfigCallback):
    """``SaveConfigCallback`` that also logs the run's config as its hyperparameters, with
    the results the HParams tab compares runs by.

    At setup (before Lightning logs the model's own hyperparameters: TensorBoard keeps the
    first summary of a run) it calls ``logger.log_hyperparams`` with the ``include`` parts of
    the config and the result tags ``hparams/val_acc``, ``hparams/val_loss``,
    ``hparams/test_acc`` and ``hparams/best_<monitor>`` at 0. At fit end it logs the final
    validation values and the ModelCheckpoint's best score there; at test end the test
    values. Lightning calls ``save_config`` on global rank 0 only.

    Args:
        parser, config, config_filename, overwrite, multifile, save_to_log_dir: those of
            Lightning's SaveConfigCallback (the application passes them).
        include: dotted config keys whose values (whole sub-trees for sections) become the
            run's hyperparameters.
        results: metrics whose final values are the run's results.
    """

    def __init__(
        self,
        parser: LightningArgumentParser,
        config: Any,
        config_filename: str = "config.yaml",
        overwrite: bool = False,
        multifile: bool = False,
        save_to_log_dir: bool = True,
        include: Sequence[str] = INCLUDE,
        results: Sequence[str] = RESULTS,
    ) -> None:
        super().__init__(parser, config, config_filename, overwrite, multifile, save_to_log_dir)
        self.include, self.results = list(include), list(results)

    @staticmethod
    def best_tag(trainer: Trainer) -> str | None:
        monitor = getattr(trainer.checkpoint_callback, "monitor", None)
        return result_tag(f"best/{monitor}") if monitor else None

    def save_config(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        params = select(self.config.as_dict(), self.include)
        tags = [result_tag(m) for m in self.results]
        if best := self.best_tag(trainer):
            tags.append(best)
        for logger in trainer.loggers:
            logger.log_hyperparams(params, metrics=dict.fromkeys(tags, 0.0))

    def _log_results(self, trainer: Trainer) -> None:
        """Log the final value of every result the last fit or test produced."""
        found = trainer.callback_metrics
        values = {result_tag(m): float(found[m]) for m in self.results if m in found}
        score = getattr(trainer.checkpoint_callback, "best_model_score", None)
        if trainer.state.fn == "fit" and (best := self.best_tag(trainer)) and score is not None:
            values[best] = float(score)
        for logger in trainer.loggers if values else ():
            logger.log_metrics(values, step=trainer.global_step)

    def on_fit_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_results(trainer)

    def on_test_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        self._log_results(trainer)
