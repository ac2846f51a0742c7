"""The LightningModule: network, cross-entropy plus the configured regularizers, metrics,
optimizer with weight-decay parameter groups, and the LR schedule."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau
from torchmetrics.classification import MulticlassAccuracy

from dnn_tricks import regularize
from dnn_tricks.schedules import build_scheduler

NetFactory = Callable[[Sequence[int], int], nn.Module]


class Classifier(LightningModule):
    """Trains ``net`` with cross-entropy plus loss + sum_i lambda_i * Omega_i(W).

    Args:
        net: the network, e.g. ``class_path: dnn_tricks.models.nets.MLP`` with its init_args;
            ``input_shape`` and ``num_classes`` come from the data.
        optimizer: any torch optimizer with its init_args (lr, momentum, weight_decay...).
            Its ``weight_decay`` is L2 decay through the optimizer, applied to weights only
            unless ``decay_norm_and_bias``.
        scheduler: LR schedule (torch's or ``dnn_tricks.schedules``); null for a constant LR.
            A ``total_steps`` argument left unset is filled with the fit's optimizer steps.
        scheduler_interval: step the schedule every ``epoch`` or every ``step``.
        scheduler_monitor: metric a ReduceLROnPlateau schedule watches.
        input_shape: shape of one input; linked from the data, not set by hand.
        num_classes: number of classes; linked from the data, not set by hand.
        label_smoothing: cross-entropy label smoothing.
        decay_norm_and_bias: also apply the optimizer's weight decay to biases and to
            normalization parameters (off by default: decaying them only shrinks the scale).
        l1: lambda of the L1 penalty lambda * sum |W| over weights (logged ``train/l1``).
        l2: lambda of the explicit L2 penalty lambda * sum W^2 (logged ``train/l2``).
        jacobian: lambda of the Jacobian penalty (lambda / 2) ||J(x)||_F^2 (Hoffman et al.
            2019), logged ``train/jacobian``.
        jacobian_projections: random projections of the Jacobian estimate; -1 for exact.
        val_jacobian: log the mean ||J(x)||_F on validation data as ``val/jacobian_norm``.
        max_norm: after each optimizer step, project each unit's incoming weights to norm
            <= max_norm (Srivastava et al. 2014); null to disable.
        channels_last: keep conv weights and image batches in NHWC memory layout (faster
            convolutions with tensor cores under mixed precision on GPUs).
        compile: run the network through ``torch.compile`` (the checkpoint keeps the plain
            network's parameter names, so compiled and eager runs share checkpoints).
    """

    def __init__(
        self,
        net: NetFactory,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/loss",
        input_shape: Sequence[int] = (1,),
        num_classes: int = 2,
        label_smoothing: float = 0.0,
        decay_norm_and_bias: bool = False,
        l1: float = 0.0,
        l2: float = 0.0,
        jacobian: float = 0.0,
        jacobian_projections: int = 1,
        val_jacobian: bool = False,
        max_norm: float | None = None,
        channels_last: bool = False,
        compile: bool = False,
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        for key, value in (("l1", l1), ("l2", l2), ("jacobian", jacobian)):
            if value < 0:
                raise ValueError(f"model.{key}={value} must be >= 0")
        if max_norm is not None and max_norm <= 0:
            raise ValueError(f"model.max_norm={max_norm} must be positive (or null to disable)")
        if jacobian_projections == 0 or jacobian_projections < -1:
            raise ValueError("model.jacobian_projections must be a positive count or -1 (exact)")
        self.net = net(tuple(input_shape), num_classes)
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        # Kept out of the module tree on purpose: registering the compiled wrapper would add
        # a second copy of every parameter name ("_orig_mod.") to the checkpoint.
        compiled = torch.compile(self.net) if compile else self.net
        object.__setattr__(self, "_run_net", compiled)
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.num_classes = num_classes
        self.train_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.test_acc = MulticlassAccuracy(num_classes, average="micro")

    def forward(self, x: Tensor) -> Tensor:
        if self.channels_last and x.ndim == 4:
            x = x.contiguous(memory_format=torch.channels_last)
        return self._run_net(x)

    # -- training --
    def _penalties(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Each configured regularizer term (already times lambda), and logits if computed."""
        hp = self.hparams
        terms: dict[str, Tensor] = {}
        logits = None
        if hp.l1 > 0:
            terms["l1"] = hp.l1 * regularize.l1_penalty(self.net)
        if hp.l2 > 0:
            terms["l2"] = hp.l2 * regularize.l2_penalty(self.net)
        if hp.jacobian > 0:
            squared, logits = regularize.jacobian_penalty(self.net, x, hp.jacobian_projections)
            terms["jacobian"] = 0.5 * hp.jacobian * squared
        return terms, logits

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        terms, logits = self._penalties(x)
        if logits is None:
            logits = self(x)
        data_loss = F.cross_entropy(logits, y, label_smoothing=self.hparams.label_smoothing)
        loss = data_loss + sum(terms.values()) if terms else data_loss
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"the training loss became {loss.item()} at global step {self.global_step} "
                f"(epoch {self.current_epoch}); lower the learning rate or check the inputs. "
                "The last good checkpoint is kept."
            )
        self.train_acc(logits, y)
        self.log("train/loss", loss, on_step=True, on_epoch=True, prog_bar=True)
        self.log("train/data_loss", data_loss, on_step=False, on_epoch=True)
        self.log("train/acc", self.train_acc, on_step=False, on_epoch=True)
        for name, value in terms.items():
            self.log(f"train/{name}", value, on_step=True, on_epoch=True)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        if self.hparams.max_norm is not None:
            regularize.apply_max_norm(self.net, self.hparams.max_norm)

    # -- evaluation --
    def _evaluate(
        self, batch: tuple[Tensor, Tensor], stage: str, metric: MulticlassAccuracy
    ) -> None:
        x, y = batch
        logits = self(x)
        self.log(f"{stage}/loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True)
        metric(logits, y)
        self.log(f"{stage}/acc", metric, prog_bar=True)
        if stage == "val" and self.hparams.val_jacobian:
            self.log("val/jacobian_norm", regularize.jacobian_norm(self.net, x), sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val", self.val_acc)

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test", self.test_acc)

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        return {"probs": torch.softmax(self(x), dim=1), "target": y}

    # -- data-dependent init --
    def on_fit_start(self) -> None:
        """Fit data-dependent layers (the patch-whitening stem) once, on a fresh fit only:
        a resumed run restores them from the checkpoint."""
        whiteners = [m for m in self.net.modules() if hasattr(m, "init_whiten")]
        datamodule = getattr(self.trainer, "datamodule", None)
        if not whiteners or self.trainer.ckpt_path is not None or datamodule is None:
            return
        n = getattr(self.net, "patch_n_images", 5000)
        images = datamodule.normalized_train_inputs(n).to(self.device)
        for module in whiteners:
            module.init_whiten(images)

    # -- optimization --
    def configure_optimizers(self) -> Any:
        groups = regularize.decay_param_groups(self.net, self.hparams.decay_norm_and_bias)
        optimizer = self.optimizer_factory(groups)
        if self.scheduler_factory is None:
            return optimizer
        total = int(self.trainer.estimated_stepping_batches)
        if self.hparams.scheduler_interval == "epoch":
            total = int(self.trainer.max_epochs or 1)
        scheduler = build_scheduler(self.scheduler_factory, optimizer, total)
        config: dict[str, Any] = {
            "scheduler": scheduler,
            "interval": self.hparams.scheduler_interval,
        }
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.hparams.scheduler_monitor
        return {"optimizer": optimizer, "lr_scheduler": config}
