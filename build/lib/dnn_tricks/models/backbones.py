"""Any torchvision or timm classification model as ``model.net``, fitted to the data.

Three ways in, from least to most control:

- the project's nets: ``class_path: dnn_tricks.models.nets.ConvNet`` (input shape and class
  count linked from the data);
- a torchvision/timm builder or class by class path, e.g. ``class_path:
  torchvision.models.resnet18``: built as it is, then its head is replaced with
  ``num_classes`` outputs and its first convolution fitted to the data's channels
  (:func:`build_net`);
- the adapter :class:`Backbone`, for pretrained weights, small images and fine-tuning.

Transfer learning follows the PyTorch tutorial "Transfer learning for computer vision":
a new head, optionally a frozen backbone for the first epochs
(``dnn_tricks.callbacks.finetune.FreezeBackbone``), backbone batch norm kept in eval mode and
a lower learning rate for the backbone.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dnn_tricks import regularize
from dnn_tricks.models.backbone_parts import (
    adapt_model,
    build_model,
    find_head,
    logits_of,
    small_input_stem,
)
from dnn_tricks.models.nets import require_image_shape


class NetFactory(Protocol):
    """What ``model.net`` is: called with the data's input shape and class count.

    A Protocol (not ``Callable[[...], nn.Module]``) so jsonargparse leaves exactly the
    arguments named ``input_shape`` and ``num_classes`` to the caller: a class that takes only
    ``num_classes`` (a torchvision/timm model) then gets it by name, not its first two
    arguments by position."""

    def __call__(self, input_shape: Sequence[int], num_classes: int) -> nn.Module: ...


def build_net(
    net: NetFactory | nn.Module, input_shape: Sequence[int], num_classes: int
) -> nn.Module:
    """The network ``model.net`` describes, for data of ``input_shape`` and ``num_classes``.

    A factory that takes ``input_shape`` (the project's nets, :class:`Backbone`) is called
    with both. A factory that takes only ``num_classes`` (a torchvision/timm model class), or
    a model already built (a torchvision builder function given by class path, which
    jsonargparse calls itself), is fitted by ``backbone_parts.adapt_model``."""
    input_shape = tuple(input_shape)
    if isinstance(net, nn.Module):
        return adapt_model(net, input_shape, num_classes, type(net).__name__)
    try:
        return net(input_shape=input_shape, num_classes=num_classes)
    except TypeError as error:
        if "'input_shape'" not in str(error):
            raise
    model = net(num_classes=num_classes)
    return adapt_model(model, input_shape, num_classes, type(model).__name__)


# ---------------------------------------------------------------- the adapter


class Backbone(nn.Module):
    """A torchvision or timm classification model fitted to the data, for transfer learning.

    Example (``configs/fashion_mnist_resnet18.yaml``)::

        model:
          net:
            class_path: dnn_tricks.models.backbones.Backbone
            init_args: {name: resnet18, small_input: true}

    The head is replaced with ``num_classes`` outputs; the first convolution takes the data's
    channels (pretrained RGB filters summed for 1-channel images, see
    ``backbone_parts.adapt_input_weight``). Freeze the backbone for the first epochs with the
    callback ``dnn_tricks.callbacks.finetune.FreezeBackbone``. Parameter names in checkpoints
    are the model's own under ``net.model.``.

    Args:
        input_shape: C x H x W of one image (filled in from the data).
        num_classes: number of output logits (filled in from the data).
        name: a torchvision builder (``resnet18``, ``efficientnet_b0``, ...), ``timm:<name>``
            for a timm model (``timm:resnet18``; needs the ``timm`` extra), or the class path
            of a builder of your own (called with ``model_args``).
        weights: pretrained weights: a local file (a state_dict saved by ``torch.save`` or a
            ``.safetensors`` file) for the model as built (1000 classes, RGB), or where the
            network is reachable a torchvision weights name (``IMAGENET1K_V1``, ``DEFAULT``)
            or ``pretrained`` for timm's default weights. Null: random initialisation.
        small_input: for 28x28 or 32x32 images, replace a ResNet stem (7x7 stride-2 conv and
            max pool, which shrink 28x28 to 7x7) with a 3x3 stride-1 conv and no pooling, as
            He et al. (2016, Sec. 4.2) do for CIFAR; the new stem starts untrained.
        backbone_bn_eval: keep the backbone's batch norm layers in eval mode while training
            (running statistics frozen at their pretrained values; their scale and shift still
            train). Useful with small batches or data unlike the pretraining data.
        backbone_lr_scale: the backbone's learning rate is this times the optimizer's
            (whatever the schedule); the new head trains at the full rate. E.g. 0.1.
        model_args: further keyword arguments of the builder (``dropout``, ``drop_rate``...).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        name: str = "resnet18",
        weights: str | None = None,
        small_input: bool = False,
        backbone_bn_eval: bool = False,
        backbone_lr_scale: float = 1.0,
        model_args: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        require_image_shape("Backbone", input_shape)
        if not backbone_lr_scale > 0:
            raise ValueError(
                f"model.net.init_args.backbone_lr_scale={backbone_lr_scale} must be > 0 "
                "(to keep the backbone fixed, use the FreezeBackbone callback)"
            )
        self.name = name
        self.backbone_bn_eval = backbone_bn_eval
        self.backbone_lr_scale = float(backbone_lr_scale)
        self._frozen = False
        model = build_model(name, weights, tuple(input_shape), num_classes, dict(model_args or {}))
        if small_input:
            small_input_stem(model, input_shape[0], name)
        self.model = adapt_model(model, input_shape, num_classes, name)
        self.head_name = find_head(self.model)

    @property
    def head(self) -> nn.Module:
        return self.model.get_submodule(self.head_name)

    def head_parameters(self) -> Iterator[nn.Parameter]:
        return self.head.parameters()

    def backbone_parameters(self) -> Iterator[nn.Parameter]:
        head = {id(p) for p in self.head.parameters()}
        return (p for p in self.model.parameters() if id(p) not in head)

    def _backbone_norms(self) -> Iterator[nn.Module]:
        head = set(self.head.modules())
        for module in self.model.modules():
            if module not in head and isinstance(getattr(module, "running_mean", None), Tensor):
                yield module

    def freeze_backbone(self, frozen: bool) -> None:
        """Stop (or restart) training the backbone: its parameters get no gradients, so the
        optimizer skips them (weight decay and momentum too), and its batch norm layers keep
        their running statistics: a frozen backbone is a fixed function."""
        self._frozen = frozen
        for param in self.backbone_parameters():
            param.requires_grad_(not frozen)
        self.train(self.training)

    def train(self, mode: bool = True) -> Backbone:
        super().train(mode)
        if mode and (self.backbone_bn_eval or self._frozen):
            for module in self._backbone_norms():
                module.eval()
        return self

    def forward(self, x: Tensor) -> Tensor:
        return logits_of(self.model(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, head={self.head_name!r}"


# ---------------------------------------------------------------- optimizer groups


def optimizer_groups(net: nn.Module, decay_norm_and_bias: bool = False) -> list[dict]:
    """Parameter groups for the optimizer: the weight-decay groups of
    ``regularize.decay_param_groups``, each split into backbone and head when ``net`` has a
    ``backbone_lr_scale`` other than 1; backbone groups carry ``lr_scale``, applied by
    :func:`apply_lr_scales`."""
    groups = regularize.decay_param_groups(net, decay_norm_and_bias)
    scale = getattr(net, "backbone_lr_scale", 1.0)
    if scale == 1.0:
        return groups
    head = {id(p) for p in net.head_parameters()}
    split = []
    for group in groups:
        backbone = [p for p in group["params"] if id(p) not in head]
        heads = [p for p in group["params"] if id(p) in head]
        if backbone:
            split.append({**group, "params": backbone, "lr_scale": scale})
        if heads:
            split.append({**group, "params": heads})
    return split


def apply_lr_scales(optimizer: torch.optim.Optimizer) -> None:
    """Make each param group with an ``lr_scale`` step at ``lr_scale`` times its scheduled rate.

    The scale is applied around each optimizer step (torch's step pre/post hooks) rather than
    to the groups' initial rates, because some schedules (OneCycleLR, CyclicLR) set every
    group's rate from one ``max_lr`` and would undo it; so any schedule scales the backbone
    alike. The scheduled, unscaled rate stays in ``group["lr"]`` between steps; the project's
    LearningRateMonitor (callbacks/lr_monitor.py) logs it times the scale."""
    saved: dict[int, Any] = {}

    def scale(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for index, group in enumerate(opt.param_groups):
            if group.get("lr_scale", 1.0) != 1.0:
                saved[index] = group["lr"]
                group["lr"] = group["lr"] * group["lr_scale"]

    def restore(opt: torch.optim.Optimizer, args: Any, kwargs: Any) -> None:
        for index, lr in saved.items():
            opt.param_groups[index]["lr"] = lr
        saved.clear()

    if any(group.get("lr_scale", 1.0) != 1.0 for group in optimizer.param_groups):
        optimizer.register_step_pre_hook(scale)
        optimizer.register_step_post_hook(restore)
