"""The LightningModule: input normalization and network (one self-contained model), cross-entropy
plus the configured regularizers, metrics, optimizer with weight-decay parameter groups, and the
LR schedule."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from typing import Any, Literal

import torch
import torch.nn.functional as F
from lightning.pytorch import LightningModule
from lightning.pytorch.cli import LRSchedulerCallable, OptimizerCallable
from lightning.pytorch.utilities import rank_zero_info
from torch import Tensor, nn
from torch.optim.lr_scheduler import ReduceLROnPlateau

from dnn_tricks import regularize
from dnn_tricks.models import fused_steps
from dnn_tricks.models.backbones import NetFactory, apply_lr_scales, build_net, optimizer_groups
from dnn_tricks.models.input_norm import InputNormalizer, NormalizeConfig
from dnn_tricks.models.mixing import BatchMixing, MixConfig
from dnn_tricks.models.step_metrics import EpochSums, NonFiniteGuard
from dnn_tricks.models.tta import TTA, tta_logits
from dnn_tricks.schedules import build_scheduler


class Classifier(LightningModule):
    """Trains ``net`` with cross-entropy plus loss + sum_i lambda_i * Omega_i(W).

    The model is self-contained: ``forward`` takes raw inputs (float images in [0, 1] as
    N x C x H x W, or raw tabular features) and applies the fitted input normalization, then the
    network. Data-fitted layers (the input normalization, a patch-whitening stem) are fitted
    once, at the start of a fresh fit, from the unaugmented train split (``adapt_layers``);
    checkpoints carry them, and resume / validate / test / predict / export never refit.

    Args:
        input_norm: input normalization, a frozen layer fitted on the train split only
            (kind: none, center, standardize, pca, pca_whiten, zca_whiten; eps; per_channel).
        net: the network, e.g. ``class_path: dnn_tricks.models.nets.MLP`` with its init_args;
            ``input_shape`` and ``num_classes`` come from the data. Any torchvision/timm
            classification model works too (``class_path: torchvision.models.resnet18``: head
            and first conv fitted to the data); ``dnn_tricks.models.backbones.Backbone`` adds
            pretrained weights and fine-tuning switches.
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
        mixing: mixup / cutmix of each training batch after input normalization, loss on the
            soft targets (``dnn_tricks.models.mixing.MixConfig``: mixup_alpha, cutmix_alpha,
            prob); images only; null for none. ``train/acc`` counts the unshifted labels.
        decay_norm_and_bias: also apply the optimizer's weight decay to biases and to
            normalization parameters (off by default: decaying them only shrinks the scale).
        regularizers: loss terms and weight constraints, each ``class_path`` +
            ``init_args``: ``dnn_tricks.regularize.L1`` / ``L2`` (weight), ``Jacobian``
            (weight, projections), ``MaxNorm`` (c), or your own ``Regularizer`` subclass.
            Each term is logged as ``train/<name>``.
        val_jacobian: log the mean ||J(x)||_F on validation data as ``val/jacobian_norm``.
        channels_last: keep conv weights and image batches in NHWC memory layout (faster
            convolutions with tensor cores under mixed precision on GPUs).
        compile: compile the network in place with ``nn.Module.compile`` (the checkpoint keeps
            the plain network's parameter names, so compiled and eager runs share checkpoints).
        tta: test-time augmentation of images in eval mode (validate, test, predict): ``flip``
            averages the logits of each image and its mirror, ``flip_translate`` adds the
            pair shifted by one pixel each way (``dnn_tricks.models.tta``); ``none``.
    """

    def __init__(
        self,
        net: NetFactory,
        input_norm: NormalizeConfig | None = None,
        optimizer: OptimizerCallable = torch.optim.Adam,
        scheduler: LRSchedulerCallable | None = None,
        scheduler_interval: Literal["epoch", "step"] = "epoch",
        scheduler_monitor: str = "val/loss",
        input_shape: Sequence[int] = (1,),
        num_classes: int = 2,
        label_smoothing: float = 0.0,
        mixing: MixConfig | None = None,
        decay_norm_and_bias: bool = False,
        regularizers: Sequence[regularize.Regularizer] = (),
        val_jacobian: bool = False,
        channels_last: bool = False,
        compile: bool = False,
        tta: TTA = "none",
    ) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.regularizers = regularize.check_regularizers(regularizers)
        self.input_norm = InputNormalizer.from_config(input_norm or NormalizeConfig())
        self.net = build_net(net, input_shape, num_classes)
        self.channels_last = channels_last
        if channels_last:
            self.net = self.net.to(memory_format=torch.channels_last)
        if tta != "none" and len(input_shape) != 3:
            raise ValueError(f"model.tta={tta} flips and shifts images; these inputs are rows")
        self.tta = tta
        if compile:  # in place (nn.Module.compile): parameter names gain no "_orig_mod."
            self.net.compile()
        self.optimizer_factory, self.scheduler_factory = optimizer, scheduler
        self.num_classes = num_classes
        self.mixing = BatchMixing(mixing, num_classes) if mixing is not None else None
        # training scalars summed on the device, logged at log steps and epoch ends; the
        # evaluation's loss and accuracy likewise, logged at the end of validation or test
        self._epoch_sums, self._nonfinite = EpochSums(), NonFiniteGuard()
        self._eval_sums = EpochSums()
        self._idle_step_hooks = False  # set per fit: see on_train_start

    def forward(self, x: Tensor) -> Tensor:
        """Raw inputs -> logits; in eval mode with ``tta``, the mean over its views."""
        if self.tta != "none" and not self.training:  # evaluation: mean over the views
            return tta_logits(lambda v: self._net_forward(self.input_norm(v)), x, self.tta)
        return self._net_forward(self.input_norm(x))

    def _net_forward(self, z: Tensor) -> Tensor:
        """Normalized inputs -> logits (what regularizers differentiate through)."""
        if self.channels_last and z.ndim == 4:
            z = z.contiguous(memory_format=torch.channels_last)
        return self.net(z)

    def standalone(self) -> nn.Module:
        """The trained model on its own, in eval mode: raw inputs -> logits, normalization
        included; what ``trainer export`` writes. Shares this module's weights."""
        return nn.Sequential(OrderedDict(input_norm=self.input_norm, net=self.net)).eval()

    # -- training --
    def _penalties(self, x: Tensor) -> tuple[dict[str, Tensor], Tensor | None]:
        """Each loss-term regularizer's term (weight included), and the logits when an
        input-dependent one (Jacobian) computed them from normalized inputs ``x``."""
        terms: dict[str, Tensor] = {}
        logits = None
        for reg in self.regularizers:
            if reg.needs_inputs:  # double backward: compiled graphs have none, so run eager
                with torch.compiler.set_stance("force_eager"):
                    terms[reg.name], logits = reg.penalty_and_logits(self.net, x)
            elif not reg.after_step:
                terms[reg.name] = reg.penalty(self.net)
        return terms, logits

    @property
    def automatic_optimization(self) -> bool:  # type: ignore[override]
        """Lightning steps the optimizer, unless the data serves several steps per batch
        (``data.steps_per_batch``): then ``training_step`` steps through them by hand."""
        return fused_steps.steps_per_batch(self._trainer) == 1

    def training_step(self, batch: Any, batch_idx: int) -> Tensor | None:
        if not self.automatic_optimization:  # a list of batches, one optimizer step each
            return self._fused_training_step(batch, batch_idx)
        log_step = self._log_step()
        loss, terms = self._step_loss(*batch, log_step)
        if log_step:
            self.log("train/loss_step", loss, on_step=True, on_epoch=False, prog_bar=True)
            for name, value in terms.items():
                self.log(f"train/{name}_step", value, on_step=True, on_epoch=False)
        return loss

    def _step_loss(self, x: Tensor, y: Tensor, log_step: bool) -> tuple[Tensor, dict[str, Tensor]]:
        """One batch's loss and regularizer terms, added to the epoch sums."""
        x = self.input_norm(x)
        target = y
        if self.mixing is not None:  # mixup / cutmix on the device: the loss takes soft targets
            x, target = self.mixing(x, y)
        terms, logits = self._penalties(x)
        if logits is None:
            logits = self._net_forward(x)
        data_loss = F.cross_entropy(logits, target, label_smoothing=self.hparams.label_smoothing)
        loss = data_loss + sum(terms.values()) if terms else data_loss
        # checked at once on a CPU, else without a host sync (see NonFiniteGuard)
        self._nonfinite.observe(self, loss, log_step)
        # No self.log per step (about 1 ms each, see step_metrics.py): device-side sums, read
        # at Lightning's log steps and at the epoch end. train/acc counts the unshifted labels.
        epoch_values = {"train/loss_epoch": loss, "train/data_loss": data_loss}
        epoch_values.update({f"train/{name}_epoch": value for name, value in terms.items()})
        self._epoch_sums.add(epoch_values, logits, y)
        return loss, terms

    def _fused_training_step(self, batches: list[tuple[Tensor, Tensor]], batch_idx: int) -> None:
        """One optimizer step per batch of the group, as Lightning's automatic loop takes
        them: zero_grad, backward, step, weight constraints, per-step schedule; the
        per-epoch schedule after the epoch's last group. Logs the group's mean loss."""
        trainer, optimizer = self.trainer, self.optimizers()
        schedule = self.lr_schedulers()
        per_step = self.hparams.scheduler_interval == "step"
        losses, sums = [], {}
        for x, y in batches:
            if trainer.max_steps != -1 and self.global_step >= trainer.max_steps:
                break
            loss, terms = self._step_loss(x, y, log_step=False)
            optimizer.zero_grad(set_to_none=True)
            if self._idle_step_hooks:  # nothing listens: the same step without the dispatch
                loss.backward()
                optimizer._on_before_step()  # Lightning's progress counters: global_step
                optimizer.optimizer.step()
                optimizer._on_after_step()
            else:
                self.manual_backward(loss)
                optimizer.step()
            self._constrain()
            if per_step and schedule is not None:
                schedule.step()  # type: ignore[union-attr]
            losses.append(loss.detach())
            for name, value in terms.items():
                sums.setdefault(name, []).append(value.detach())
        last_group = batch_idx + 1 == trainer.num_training_batches
        if not per_step and schedule is not None and last_group:
            schedule.step()  # type: ignore[union-attr]
        # at Lightning's log steps only (a self.log costs ~0.2 ms): they count loader batches
        every = trainer.log_every_n_steps
        if losses and every and (trainer.fit_loop.epoch_loop.total_batch_idx + 1) % every == 0:
            self.log("train/loss_step", torch.stack(losses).mean(), on_step=True, prog_bar=True)
            for name, values in sums.items():
                self.log(f"train/{name}_step", torch.stack(values).mean(), on_step=True)

    def _log_step(self) -> bool:
        """Whether Lightning writes this step's metrics (every ``log_every_n_steps``)."""
        every = self._trainer.log_every_n_steps if self._trainer is not None else 0
        return bool(every) and (self.global_step + 1) % every == 0

    def on_train_start(self) -> None:
        self._idle_step_hooks = not self.automatic_optimization and fused_steps.hooks_are_idle(
            self.trainer, self
        )

    def on_train_epoch_start(self) -> None:
        self._epoch_sums.reset()

    def on_train_epoch_end(self) -> None:
        self._nonfinite.check(self, self.current_epoch)
        self._log_means(self._epoch_sums, "train/acc", prog_bar=("train/loss_epoch",))

    def _log_means(self, sums: EpochSums, accuracy: str, prog_bar: tuple[str, ...]) -> None:
        """Log the epoch means of ``sums`` over every process's samples (one all-reduce under
        DDP); the names in ``prog_bar`` also in the progress bar."""
        trainer = self._trainer
        distributed = trainer is not None and trainer.world_size > 1
        reduce = (lambda t: trainer.strategy.reduce(t, reduce_op="sum")) if distributed else None
        means = sums.means(accuracy, reduce)
        shown = {name: means.pop(name) for name in prog_bar if name in means}
        # equal on every process already; sync_dist keeps Lightning's DDP advice quiet
        for group, bar in ((shown, True), (means, False)):
            if group:
                self.log_dict(group, prog_bar=bar, sync_dist=distributed)

    def on_validation_start(self) -> None:
        self._nonfinite.check(self, self.current_epoch)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._nonfinite.check(self, self.current_epoch)

    def on_train_end(self) -> None:
        self._nonfinite.check(self, self.current_epoch)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self._constrain()

    def _constrain(self) -> None:
        """Weight constraints (max-norm) after each optimizer step."""
        for reg in self.regularizers:
            if reg.after_step:
                reg.constrain(self.net)

    # -- evaluation --
    def _evaluate(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        """Add a batch's loss and correct predictions to the stage's sums, logged at its end."""
        x, y = batch
        logits = self(x)  # through forward, where callbacks' forward hooks see the logits
        self._eval_sums.add({f"{stage}/loss": F.cross_entropy(logits, y)}, logits, y)
        if stage == "val" and self.hparams.val_jacobian:
            norm = regularize.jacobian_norm(self.net, self.input_norm(x))
            self.log("val/jacobian_norm", norm, sync_dist=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._evaluate(batch, "test")

    def on_validation_epoch_start(self) -> None:
        self._eval_sums.reset()

    def on_test_epoch_start(self) -> None:
        self._eval_sums.reset()

    def on_validation_epoch_end(self) -> None:
        self._log_means(self._eval_sums, "val/acc", prog_bar=("val/loss", "val/acc"))

    def on_test_epoch_end(self) -> None:
        self._log_means(self._eval_sums, "test/acc", prog_bar=("test/loss", "test/acc"))

    def predict_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> dict[str, Tensor]:
        x, y = batch
        return {"probs": torch.softmax(self(x), dim=1), "target": y}

    # -- data-fitted layers --
    def adapt_layers(self, batches: Callable[[], Iterable[Tensor]]) -> None:
        """Fit every data-fitted layer (any submodule with ``adapt(batches)``) in model order:
        the input normalization from raw train batches, then layers inside the net (the
        patch-whitening stem) from those batches as the net receives them, normalized.
        ``batches()`` yields the unaugmented train split anew on each call (streamed)."""
        self.input_norm.adapt(x.to(self.device) for x in batches())
        before, after = self.input_norm.condition_numbers()
        rank_zero_info(
            f"input normalization '{self.input_norm.kind}': condition number of the train-feature "
            f"covariance {before:.4g} -> {after:.4g}"
        )
        if self._trainer is not None and self.logger is not None:
            self.logger.log_metrics({"data/cond_before": before, "data/cond_after": after}, step=0)
        for layer in self.net.modules():
            if hasattr(layer, "adapt"):
                layer.adapt(self.input_norm(x.to(self.device)) for x in batches())

    def on_fit_start(self) -> None:
        """Fit the data-fitted layers on a fresh fit only (before the sanity check); a resumed
        run has restored them from the checkpoint. Every DDP rank reads the same train split,
        so all ranks hold equal statistics. Callbacks that inspect them run at train start."""
        datamodule = getattr(self.trainer, "datamodule", None)
        if self.trainer.ckpt_path is not None or datamodule is None:
            return
        self.adapt_layers(lambda: datamodule.raw_batches("train"))

    # -- optimization --
    def configure_optimizers(self) -> Any:
        # weight-decay groups, split by backbone and head for Backbone's backbone_lr_scale
        groups = optimizer_groups(self.net, self.hparams.decay_norm_and_bias)
        optimizer = self.optimizer_factory(groups)
        apply_lr_scales(optimizer)
        if self.scheduler_factory is None:
            return optimizer
        fused = not self.automatic_optimization
        if self.hparams.scheduler_interval == "epoch":
            total = int(self.trainer.max_epochs or 1)
        elif fused:  # Lightning's estimate counts loader batches, each several steps
            total = fused_steps.total_steps(self.trainer)
        else:
            total = int(self.trainer.estimated_stepping_batches)
        scheduler = build_scheduler(self.scheduler_factory, optimizer, total)
        config: dict[str, Any] = {
            "scheduler": scheduler,
            "interval": self.hparams.scheduler_interval,
        }
        if isinstance(scheduler, ReduceLROnPlateau):
            config["monitor"] = self.hparams.scheduler_monitor
            if fused:
                raise ValueError(fused_steps.plateau_refusal(self.trainer))
        return {"optimizer": optimizer, "lr_scheduler": config}
