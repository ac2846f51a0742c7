"""Fine-tuning schedule: a frozen backbone for the first epochs, then the whole network.

The PyTorch transfer-learning tutorial trains a new head on a fixed pretrained backbone
("ConvNet as fixed feature extractor") or fine-tunes everything; freezing first and then
unfreezing combines both, so the random head does not send large gradients into the
pretrained weights while it is still wrong.
"""

from __future__ import annotations

from lightning.pytorch import Callback, LightningModule, Trainer


class FreezeBackbone(Callback):
    """Train only the head of a ``dnn_tricks.models.backbones.Backbone`` for the first
    ``epochs`` epochs, then the whole network.

    Example::

        trainer:
          callbacks:
            - class_path: dnn_tricks.callbacks.finetune.FreezeBackbone
              init_args: {epochs: 2}

    While frozen, the backbone's parameters get no gradients (so the optimizer, its weight
    decay and momentum skip them) and its batch norm layers keep their running statistics.
    The state is a function of the epoch alone, so a resumed run freezes exactly as an
    uninterrupted one. Under DDP use ``strategy: ddp_find_unused_parameters_true``, since
    the frozen parameters get no gradients.

    Lightning's ``BackboneFinetuning`` is the anchor, but it adds the backbone's parameters
    to the optimizer only when it unfreezes them, as one group under weight decay: schedules
    built over the initial groups (OneCycleLR) do not know that group, and norms and biases
    get decayed. Here every group exists from the first step (see
    ``dnn_tricks.models.backbones.optimizer_groups``) and freezing only withholds gradients.

    Args:
        epochs: epochs with a frozen backbone; 0 trains everything from the start.
    """

    def __init__(self, epochs: int = 1) -> None:
        if epochs < 0:
            raise ValueError(f"FreezeBackbone epochs={epochs} must be >= 0")
        self.epochs = epochs

    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        net = getattr(pl_module, "net", None)
        if not callable(getattr(net, "freeze_backbone", None)):
            raise ValueError(
                "the FreezeBackbone callback needs model.net: dnn_tricks.models.backbones."
                f"Backbone (this model.net is {type(net).__name__}); remove the callback or "
                "switch model.net"
            )

    def on_train_epoch_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        pl_module.net.freeze_backbone(trainer.current_epoch < self.epochs)

    def teardown(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if stage == "fit":  # leave the model trainable, as it would be without the callback
            pl_module.net.freeze_backbone(False)
