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

import difflib
import importlib
import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import Tensor, nn

from dnn_tricks import regularize
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
    jsonargparse calls itself), is fitted by :func:`adapt_model`."""
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


# ---------------------------------------------------------------- fitting a model to the data


def find_head(model: nn.Module) -> str:
    """Dotted name of the classifier head: timm's ``get_classifier()``, else the last
    ``nn.Linear`` registered (the last layer of every torchvision classification model)."""
    if hasattr(model, "get_classifier"):
        head = model.get_classifier()
        for name, module in model.named_modules():
            if module is head and name:
                return name
    names = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no nn.Linear classifier head to replace; "
            "model.net needs a classification model ending in a Linear layer"
        )
    return names[-1]


def first_conv(model: nn.Module) -> str | None:
    """Dotted name of the first ``nn.Conv2d`` registered: the input convolution."""
    return next((n for n, m in model.named_modules() if isinstance(m, nn.Conv2d)), None)


def adapt_input_weight(weight: Tensor, in_chans: int) -> Tensor:
    """Conv weights for ``in_chans`` input channels from weights for C channels.

    One channel: the sum over the C channels, so a gray image gives the output the RGB
    model gives for that image copied into each channel (the usual practice, as in timm's
    ``adapt_input_conv``; ours because timm is an optional extra). Other counts: the
    channels repeated cyclically and scaled by C / in_chans, which keeps the output scale.
    """
    out, c = weight.shape[:2]
    if in_chans == 1:
        return weight.sum(dim=1, keepdim=True)
    repeated = weight.repeat(1, math.ceil(in_chans / c), 1, 1)[:, :in_chans]
    return repeated * (c / in_chans)


def _replace(model: nn.Module, name: str, module: nn.Module) -> None:
    parent, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, child, module)


def adapt_model(
    model: nn.Module, input_shape: Sequence[int], num_classes: int, label: str
) -> nn.Module:
    """Fit a built classification model to the data, in place: the head gets ``num_classes``
    outputs (a fresh Linear layer; timm models through their ``reset_classifier``) and the
    first convolution the data's channel count (:func:`adapt_input_weight`). A forward pass
    on zeros then checks that the images fit the model, so a mismatch fails here, in one line.
    """
    require_image_shape(label, input_shape)
    in_chans = input_shape[0]
    head_name = find_head(model)
    head = model.get_submodule(head_name)
    if getattr(head, "out_features", None) != num_classes:
        if hasattr(model, "reset_classifier"):
            model.reset_classifier(num_classes)
        else:
            new = nn.Linear(head.in_features, num_classes, bias=head.bias is not None)
            _replace(model, head_name, new)
    conv_name = first_conv(model)
    conv = model.get_submodule(conv_name) if conv_name else None
    if conv is not None and conv.in_channels != in_chans:
        new = nn.Conv2d(
            in_chans,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            conv.groups,
            bias=conv.bias is not None,
            padding_mode=conv.padding_mode,
        )
        with torch.no_grad():
            new.weight.copy_(adapt_input_weight(conv.weight, in_chans))
            if conv.bias is not None:
                new.bias.copy_(conv.bias)
        _replace(model, conv_name, new)
    _check_forward(model, input_shape, num_classes, label)
    return model


def _check_forward(model: nn.Module, shape: Sequence[int], num_classes: int, label: str) -> None:
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            out = _logits(model(torch.zeros(2, *shape)))
    except RuntimeError as error:
        first = str(error).strip().splitlines()[0]
        raise ValueError(
            f"model.net {label} does not run on the data's {tuple(shape)} images ({first}); "
            "pick a model made for this input size (small_input: true for ResNets)"
        ) from None
    finally:
        model.train(was_training)
    if tuple(out.shape) != (2, num_classes):
        raise ValueError(
            f"model.net {label} gives outputs of shape {tuple(out.shape)[1:]} for the data's "
            f"images, not ({num_classes},) class logits"
        )


def _logits(out: Any) -> Tensor:
    # Inception/GoogLeNet return (logits, aux_logits) named tuples in training.
    return out.logits if hasattr(out, "logits") else out


# ---------------------------------------------------------------- building by name


def _torchvision_builder(name: str) -> Any:
    import torchvision.models as tv

    known = tv.list_models(module=tv)
    if name not in known:
        close = difflib.get_close_matches(name, known, n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see torchvision.models"
        raise ValueError(
            f"model.net.init_args.name={name!r} is not a torchvision classification model; "
            f"{hint} (timm models: 'timm:<name>')"
        )
    return tv.get_model_builder(name)


def _timm() -> Any:
    try:
        import timm
    except ImportError:
        raise ValueError("timm models need timm: pip install 'dnn-tricks[timm]'") from None
    return timm


def _check_timm_name(timm: Any, name: str) -> None:
    if not timm.is_model(name):
        close = difflib.get_close_matches(name, timm.list_models(), n=3)
        hint = f"did you mean {', '.join(close)}?" if close else "see timm.list_models()"
        raise ValueError(f"model.net.init_args.name='timm:{name}' is not a timm model; {hint}")


def _import_path(path: str) -> Any:
    module, _, attr = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), attr)
    except (ImportError, AttributeError, ValueError):
        raise ValueError(
            f"model.net.init_args.name={path!r} cannot be imported; give a torchvision name "
            "(resnet18), 'timm:<name>' or an importable class path"
        ) from None


def _is_file(weights: str) -> bool:
    return Path(weights).suffix in (".pt", ".pth", ".bin", ".safetensors") or "/" in weights


def load_weights(model: nn.Module, path: str, label: str) -> None:
    """Load a state dict file (torch, read with ``weights_only=True``, or safetensors) into
    ``model``; keys or shapes that do not match give one line naming the first of each."""
    key = "model.net.init_args.weights"
    if not Path(path).is_file():
        raise FileNotFoundError(f"{key}={path!r} is not a file; give a saved state_dict")
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        state = load_file(path)
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{key}={path!r} holds no state_dict (a dict of tensors)")
    try:
        missing, unexpected = model.load_state_dict(state, strict=False)
    except RuntimeError as error:
        lines = [line.strip() for line in str(error).splitlines() if "size mismatch" in line]
        detail = lines[0] if lines else str(error).strip().splitlines()[0]
        raise ValueError(f"{key}={path!r} does not fit {label}: {detail}") from None
    if missing or unexpected:
        parts = [
            f"{what} {keys[0]}" + (f" and {len(keys) - 1} more" if len(keys) > 1 else "")
            for what, keys in (("missing", missing), ("unexpected", unexpected))
            if keys
        ]
        raise ValueError(
            f"{key}={path!r} does not fit {label} ({'; '.join(parts)}); "
            "give weights saved from this architecture"
        )


def _torchvision_weights(name: str, weights: str) -> Any:
    """A torchvision weights enum from ``IMAGENET1K_V1``, ``DEFAULT`` or its full name."""
    import torchvision.models as tv

    try:
        return tv.get_weight(weights) if "." in weights else tv.get_model_weights(name)[weights]
    except (KeyError, ValueError, AttributeError):
        options = ", ".join(tv.get_model_weights(name).__members__)
        raise ValueError(
            f"model.net.init_args.weights={weights!r} is neither a file nor weights of "
            f"{name} ({options})"
        ) from None


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
    :func:`adapt_input_weight`). Freeze the backbone for the first epochs with the callback
    ``dnn_tricks.callbacks.finetune.FreezeBackbone``. Parameter names in checkpoints are the
    model's own under ``net.model.``.

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
        model = _build(name, weights, tuple(input_shape), num_classes, dict(model_args or {}))
        if small_input:
            _small_stem(model, input_shape[0], name)
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
        return _logits(self.model(x))

    def extra_repr(self) -> str:
        return f"name={self.name!r}, head={self.head_name!r}"


def _build(
    name: str, weights: str | None, shape: tuple[int, ...], num_classes: int, args: dict
) -> nn.Module:
    """The model ``name`` with ``weights`` loaded; without weights already at ``num_classes``
    outputs (and for timm ``in_chans`` inputs), else as the weights were trained."""
    if name.startswith("timm:"):
        timm, arch = _timm(), name[len("timm:") :]
        _check_timm_name(timm, arch)
        if weights is None or weights == "pretrained":
            return timm.create_model(
                arch,
                pretrained=weights == "pretrained",
                num_classes=num_classes,
                in_chans=shape[0],
                **args,
            )
        model = timm.create_model(arch, **args)
    elif "." in name:
        model = _import_path(name)(**args)
    else:
        builder = _torchvision_builder(name)
        if weights is None:
            return builder(num_classes=num_classes, **args)
        if not _is_file(weights):
            return builder(weights=_torchvision_weights(name, weights), **args)
        model = builder(**args)
    if weights is not None:
        load_weights(model, weights, name)
    return model


def _small_stem(model: nn.Module, in_chans: int, name: str) -> None:
    """Replace a ResNet's 7x7 stride-2 stem conv and max pool by a 3x3 stride-1 conv."""
    if not all(isinstance(getattr(model, a, None), nn.Module) for a in ("conv1", "bn1", "maxpool")):
        raise ValueError(
            f"model.net.init_args.small_input=true needs a ResNet stem (conv1, bn1, maxpool) "
            f"and {name} has none; set small_input: false"
        )
    conv = nn.Conv2d(in_chans, model.bn1.num_features, 3, stride=1, padding=1, bias=False)
    # torchvision's ResNet init (He et al. 2015, fan_out)
    nn.init.kaiming_normal_(conv.weight, mode="fan_out", nonlinearity="relu")
    model.conv1, model.maxpool = conv, nn.Identity()


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
    alike. The logged rates (LearningRateMonitor) are the unscaled, scheduled ones."""
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
