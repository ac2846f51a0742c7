"""The parts of a torchvision or timm classification model that fitting it to the data
touches: finding and replacing its head and first convolution, loading pretrained weights,
building it by name. Used by ``dnn_tricks.models.backbones``."""

from __future__ import annotations

import difflib
import importlib
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from dnn_tricks.models.nets import require_image_shape

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
            out = logits_of(model(torch.zeros(2, *shape)))
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


def logits_of(out: Any) -> Tensor:
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


def build_model(
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


def small_input_stem(model: nn.Module, in_chans: int, name: str) -> None:
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
