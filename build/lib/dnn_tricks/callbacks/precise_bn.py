"""PreciseBN: recompute the normalization statistics with the final weights after fit.

Running averages lag: each batch's statistics were measured with the weights of its own
step, and an exponential average weights recent, still-moving steps most. With fixed final
weights, a plain average over many batches estimates the population statistics precisely
(Wu & Johnson 2021, "Rethinking 'Batch' in BatchNorm", sec. 3; detectron2's PreciseBN hook
and fvcore's ``update_bn_stats``, 200 iterations by default).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor, nn

from dnn_tricks.callbacks.norm_stats import eval_mode, modes_restored
from dnn_tricks.callbacks.trainer_utils import (
    batch_inputs,
    batches_of,
    cycle,
    eager_network,
    first_loader,
    log_scalars,
    sum_over_processes,
    to_model,
)
from dnn_tricks.norm_layers import running_buffers, running_stat_layers


def averaged_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The running-statistics layers PreciseBN can recompute: those updating them as
    ``(1 - momentum) running + momentum batch`` through a ``momentum`` attribute."""
    return [(n, m) for n, m in running_stat_layers(model) if hasattr(m, "momentum")]


def trained_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """:func:`averaged_layers` that update their statistics in train mode: not those a
    model keeps in eval mode while training (a frozen or ``backbone_bn_eval`` backbone's
    batch norm), whose statistics are part of a fixed function."""
    with modes_restored(model):
        model.train()
        return [(n, m) for n, m in averaged_layers(model) if m.training]


@torch.no_grad()
def recompute_statistics(
    model: nn.Module, batches: Iterable[Any], forward: Callable[[Any], Any], num_batches: int
) -> int:
    """Replace the running statistics of every layer of ``model`` that keeps them with a
    BatchNorm-style ``momentum`` and updates them in train mode (:func:`trained_layers`) by
    their plain average over ``num_batches`` batches, with the weights fixed; returns the
    batches used.

    The model runs in train mode (dropout too, as in training, whose statistics the eval
    model was trained to expect), and before batch k (0-based) each layer's momentum is set
    to 1/(k+1): ``running = (1 - 1/(k+1)) running + batch / (k+1)`` is then exactly the
    cumulative mean of the batch statistics (what PyTorch's ``momentum=None`` does for batch
    norm, but also valid for IterNorm's running whitening matrix). Momentum, train/eval flags
    and ``num_batches_tracked`` are restored afterwards.
    """
    layers = [m for _, m in trained_layers(model)]
    momenta = [m.momentum for m in layers]
    tracked = [getattr(m, "num_batches_tracked", None) for m in layers]
    tracked = [t.clone() if isinstance(t, Tensor) else None for t in tracked]
    used = 0
    with modes_restored(model):
        model.train()
        try:
            for k, batch in enumerate(itertools.islice(batches, num_batches)):
                for layer in layers:
                    layer.momentum = 1.0 / (k + 1)
                forward(batch)
                used = k + 1
        finally:
            for layer, momentum, count in zip(layers, momenta, tracked, strict=True):
                layer.momentum = momentum
                if count is not None:
                    layer.num_batches_tracked.copy_(count)
    return used


class PreciseBN(Callback):
    """After fit, recompute every running statistic (BatchNorm, IterNorm, any layer with
    ``running_*`` buffers and a ``momentum``) with the final weights as a plain average
    over ``num_batches`` training batches.

    Runs at ``on_train_end``: after the last epoch's checkpoints, before Lightning's
    teardown. Logs ``val/acc_before_precise_bn`` and ``val/acc_precise_bn`` (top-1 accuracy
    over the validation loader, computed here, not through ``trainer.validate``) and writes
    the final weights with the new statistics to ``checkpoint`` in the checkpoint folder. The
    model in memory keeps the new statistics. The best and last checkpoints written during
    training keep their own, older statistics; ``trainer fit`` tests the best checkpoint after
    fit, so test ``precise_bn.ckpt`` with ``trainer test --ckpt_path`` to see the gain.

    Under DDP every process averages over its own share of the batches, then the statistics
    are averaged over processes; accuracies are summed over processes' validation shares.

    Example, under ``trainer.callbacks`` in a config::

        - class_path: dnn_tricks.callbacks.precise_bn.PreciseBN
          init_args:
            num_batches: 200
            evaluate: true
            checkpoint: precise_bn.ckpt

    Args:
        num_batches: training batches to average over (cycling the loader when it has
            fewer); 200 as in detectron2.
        evaluate: measure validation accuracy before and after and log both.
        checkpoint: file name, in the checkpoint folder, for the final weights with the
            recomputed statistics; null writes none.
    """

    def __init__(
        self,
        num_batches: int = 200,
        evaluate: bool = True,
        checkpoint: str | None = "precise_bn.ckpt",
    ) -> None:
        if num_batches < 1:
            raise ValueError(f"PreciseBN num_batches={num_batches} must be >= 1")
        if checkpoint is not None and (not checkpoint or Path(checkpoint).name != checkpoint):
            raise ValueError(
                f"PreciseBN checkpoint={checkpoint!r} must be a plain file name (it is written "
                "in the run's checkpoint folder), or null"
            )
        self.num_batches, self.evaluate, self.checkpoint = num_batches, evaluate, checkpoint
        self.batches_used = 0
        self.accuracy: dict[str, float] = {}
        self.saved_path: str | None = None

    def on_train_end(self, trainer: Trainer, pl_module: LightningModule) -> None:
        layers = trained_layers(pl_module)
        others = dict(running_stat_layers(pl_module)).keys() - dict(averaged_layers(pl_module))
        if others:
            rank_zero_warn(
                f"PreciseBN: {', '.join(sorted(others))} keep running statistics without a "
                "momentum attribute; left as they are"
            )
        if not layers:
            rank_zero_warn(
                "PreciseBN: the model has no layer that updates running statistics in "
                "training; skipped"
            )
            return
        loader = first_loader(trainer.train_dataloader)
        if loader is None:
            rank_zero_warn("PreciseBN: no training loader to recompute statistics from; skipped")
            return
        if self.evaluate:
            self.accuracy["before"] = self._val_accuracy(trainer, pl_module)
        # a train group (data.steps_per_batch) gives its batches one by one
        batches = (b for raw in cycle(loader) for b in batches_of(to_model(pl_module, raw)))
        with trainer.precision_plugin.forward_context():
            net = eager_network(pl_module)
            self.batches_used = recompute_statistics(
                pl_module, batches, lambda b: net(batch_inputs(b)), self.num_batches
            )
        self._average_over_processes(trainer, layers)
        message = f"PreciseBN: recomputed {len(layers)} layers over {self.batches_used} batches"
        if self.evaluate:
            self.accuracy["after"] = self._val_accuracy(trainer, pl_module)
            metrics = {
                "val/acc_before_precise_bn": self.accuracy["before"],
                "val/acc_precise_bn": self.accuracy["after"],
            }
            log_scalars(trainer, metrics)
            for key, value in metrics.items():
                trainer.callback_metrics[key] = torch.tensor(value)
            message += (
                f"; val accuracy {self.accuracy['before']:.4f} -> {self.accuracy['after']:.4f}"
            )
        if self.checkpoint:
            folder = getattr(trainer.checkpoint_callback, "dirpath", None)
            folder = folder or str(Path(trainer.log_dir or ".") / "checkpoints")
            self.saved_path = str(Path(folder) / self.checkpoint)
            trainer.save_checkpoint(self.saved_path, weights_only=False)
            message += f"; saved {self.saved_path}"
        rank_zero_info(message)

    @staticmethod
    def _average_over_processes(trainer: Trainer, layers: list[tuple[str, nn.Module]]) -> None:
        if trainer.world_size <= 1:
            return
        for _, layer in layers:
            for buf in running_buffers(layer).values():
                buf.copy_(sum_over_processes(trainer, buf.clone()) / trainer.world_size)

    @staticmethod
    @torch.no_grad()
    def _val_accuracy(trainer: Trainer, pl_module: LightningModule) -> float:
        """Top-1 accuracy over the validation loader (summed over processes)."""
        loader = first_loader(trainer.val_dataloaders)
        if loader is None and trainer.datamodule is not None:
            loader = trainer.datamodule.val_dataloader()
        counts = torch.zeros(2, dtype=torch.float64, device=pl_module.device)
        with eval_mode(pl_module), trainer.precision_plugin.forward_context():
            for batch in loader or ():
                x, y = to_model(pl_module, batch)
                counts[0] += (pl_module(x).argmax(1) == y).sum()
                counts[1] += len(y)
        correct, total = sum_over_processes(trainer, counts).tolist()
        return correct / total if total else float("nan")

    def state_dict(self) -> dict[str, Any]:
        return {"batches_used": self.batches_used, "accuracy": dict(self.accuracy)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.batches_used = int(state_dict.get("batches_used", 0))
        self.accuracy = dict(state_dict.get("accuracy", {}))
