"""CIFAR-style residual network with configurable norm placement, dropout and stem.

He, Zhang, Ren & Sun (2016), "Deep Residual Learning for Image Recognition", Sec. 4.2:
a 3x3 conv stem, three stages of n basic blocks with widths w, 2w, 4w (stride 2 at the
first block of stages 2 and 3), global average pooling and one fully connected layer,
6n + 2 weighted layers in all (n = 3 gives ResNet-20).
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from dnn_tricks.models.init import init_weights
from dnn_tricks.models.layers import (
    LayerSpec,
    activation_name,
    adds_norm_layer,
    apply_weight_norm,
    check_choice,
    create_activation,
    create_norm_layer,
    uses_weight_norm,
)
from dnn_tricks.models.nets import (
    NormPosition,
    check_probability,
    hidden_block,
    require_image_shape,
)


class PadShortcut(nn.Module):
    """He et al. (2016) option A: an identity shortcut that subsamples by ``stride`` and
    zero-pads the new channels, so the shortcut adds no parameters."""

    def __init__(self, in_channels: int, out_channels: int, stride: int) -> None:
        super().__init__()
        self.extra = out_channels - in_channels
        self.stride = stride

    def forward(self, x: Tensor) -> Tensor:
        x = x[:, :, :: self.stride, :: self.stride]
        return F.pad(x, (0, 0, 0, 0, 0, self.extra)) if self.extra else x


class BasicBlock(nn.Module):
    """Two 3x3 convs and a shortcut; ``branch`` holds the residual path as named children.

    ``before`` (He et al. 2016's original block, norm before the activation):
        out = act(shortcut(x) + norm2(conv2(act1(norm1(conv1(x))))))
    ``after`` (norm after each activation, the branch ends with its own act and norm and
    the sum goes unchanged to the next block):
        out = shortcut(x) + norm2(act2(conv2(norm1(act1(conv1(x))))))
    Without a norm layer (``none``/``weight``) both read as ``before`` without the norms.
    Spatial dropout (Dropout2d), as in Wide ResNets (Zagoruyko & Komodakis 2016), sits
    between the two conv units.
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        stride: int,
        *,
        norm: Any,
        norm_position: NormPosition,
        activation: Any,
        num_groups: int,
        spatial_dropout: float,
        shortcut: str,
    ) -> None:
        super().__init__()
        # Without a norm layer the block is conv -> act whatever norm_position says.
        has_norm = adds_norm_layer(norm)
        post_add = not has_norm or norm_position == "before"
        units = [(1, in_channels, stride), (2, out_channels, 1)]
        parts: list[tuple[str, nn.Module]] = []
        for index, channels, step in units:
            # A bias right before a norm layer is cancelled by the norm's mean subtraction.
            bias = not has_norm or norm_position == "after"
            conv = nn.Conv2d(channels, out_channels, 3, stride=step, padding=1, bias=bias)
            conv = apply_weight_norm(conv) if uses_weight_norm(norm) else conv
            parts.append((f"conv{index}", conv))
            act = (f"act{index}", create_activation(activation))
            if not has_norm:
                parts.append(act)
            else:
                layer = create_norm_layer(norm, out_channels, True, num_groups)
                unit = [(f"norm{index}", layer), act]
                parts += unit if norm_position == "before" else unit[::-1]
            if index == 1 and spatial_dropout > 0:
                parts.append(("dropout", nn.Dropout2d(spatial_dropout)))
        if post_add:
            parts.pop()  # the second unit's activation moves after the addition
        self.branch = nn.Sequential(OrderedDict(parts))
        self.shortcut = _shortcut(shortcut, in_channels, out_channels, stride, norm, num_groups)
        self.act = create_activation(activation) if post_add else nn.Identity()

    def forward(self, x: Tensor) -> Tensor:
        return self.act(self.shortcut(x) + self.branch(x))

    def zero_init_last(self) -> None:
        """Start the block as (nearly) the identity (Goyal et al. 2017, Sec. 5.1): zero the
        scale of the branch's last norm, or the last conv's weight (its g under weight
        norm) where there is no norm layer."""
        last = getattr(self.branch, "norm2", None)
        if last is None:
            conv = self.branch.conv2
            target = (
                conv.parametrizations.weight.original0
                if hasattr(conv, "parametrizations")
                else conv.weight
            )
        else:
            # the scale of a norm given by class path may sit in a wrapper (ChannelsLast)
            scales = [p for name, p in last.named_parameters() if name.split(".")[-1] == "weight"]
            if not scales:
                raise ValueError(
                    f"zero_init_residual needs a norm layer with a learnable scale (weight); "
                    f"{type(last).__name__} has none: set zero_init_residual: false"
                )
            target = scales[0]
        nn.init.zeros_(target)


def _shortcut(
    kind: str, in_channels: int, out_channels: int, stride: int, norm: Any, num_groups: int
) -> nn.Module:
    if stride == 1 and in_channels == out_channels:
        return nn.Identity()
    if kind == "pad":
        if out_channels < in_channels:
            raise ValueError(
                f"shortcut='pad' cannot map {in_channels} to {out_channels} channels; "
                "use shortcut='conv'"
            )
        return PadShortcut(in_channels, out_channels, stride)
    # Option B: a 1x1 projection, normalized like the branch it is added to.
    conv = nn.Conv2d(in_channels, out_channels, 1, stride=stride, bias=not adds_norm_layer(norm))
    if uses_weight_norm(norm):
        conv = apply_weight_norm(conv)
    return nn.Sequential(
        OrderedDict(
            [("conv", conv), ("norm", create_norm_layer(norm, out_channels, True, num_groups))]
        )
    )


class ResNet(nn.Module):
    """CIFAR-style ResNet (He et al. 2016, Sec. 4.2) for 1- or 3-channel images.

    Args:
        input_shape: C x H x W of one image (filled in from the data).
        num_classes: number of output logits (filled in from the data).
        depth: total weighted layers, 6n + 2 (8, 14, 20, 32, 44, 56, 110); ignored when
            ``blocks_per_stage`` is set.
        blocks_per_stage: n basic blocks per stage; overrides ``depth`` when set.
        width: channels w of the first stage; later stages use 2w and 4w.
        norm: none, batch, layer, instance, group, weight or iter, for every conv, or a
            class path / {class_path, init_args} of any norm layer taking (N, C, H, W)
            (see ``dnn_tricks.models.layers``; e.g. torch.nn.GroupNorm with num_groups).
        norm_position: ``before`` the activation (conv-norm-act, He et al.'s block, whose
            last activation follows the addition) or ``after`` it (conv-act-norm in both
            units of the branch, nothing after the addition). See BasicBlock.
        activation: relu, leaky_relu, elu, gelu, silu, tanh, sigmoid, or a class path /
            {class_path, init_args} of any activation module.
        num_groups: groups for ``group`` norm and ``iter`` batch whitening.
        dropout: drop probability of the pooled features before the fc layer.
        spatial_dropout: Dropout2d probability between the two convs of every block.
        input_dropout: drop probability of input pixels.
        init: default, xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal or
            orthogonal for every conv and linear weight (biases zeroed unless default).
        zero_init_residual: zero the last norm scale of each residual branch so every block
            starts as the identity (Goyal et al. 2017).
        shortcut: ``pad`` (option A: subsample and zero-pad channels, He et al.'s CIFAR
            choice) or ``conv`` (option B: 1x1 conv and norm) where the shape changes.
        stem: ``conv`` (3x3 conv, norm, act) or ``patch_whiten``: a frozen conv whose
            filters whiten k x k patches, fitted from normalized train images at the start
            of a fresh fit, then its activation and the same 3x3 conv stem.
        patch_size: k of the patch-whitening stem.
        patch_eps: eps added to the patch covariance eigenvalues.
        patch_n_images: how many train images fit the stem.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        depth: int = 20,
        blocks_per_stage: int | None = None,
        width: int = 16,
        norm: LayerSpec = "batch",
        norm_position: NormPosition = "before",
        activation: LayerSpec = "relu",
        num_groups: int = 8,
        dropout: float = 0.0,
        spatial_dropout: float = 0.0,
        input_dropout: float = 0.0,
        init: str = "kaiming_normal",
        zero_init_residual: bool = False,
        shortcut: Literal["pad", "conv"] = "pad",
        stem: Literal["conv", "patch_whiten"] = "conv",
        patch_size: int = 2,
        patch_eps: float = 5e-4,
        patch_n_images: int = 5000,
    ) -> None:
        super().__init__()
        require_image_shape("ResNet", input_shape)
        n = _blocks_per_stage(depth, blocks_per_stage)
        for key, p in (
            ("dropout", dropout),
            ("spatial_dropout", spatial_dropout),
            ("input_dropout", input_dropout),
        ):
            check_probability(key, p)
        check_choice("norm_position", norm_position, ("before", "after"))
        check_choice("shortcut", shortcut, ("pad", "conv"))
        check_choice("stem", stem, ("conv", "patch_whiten"))
        in_ch = input_shape[0]
        layers: list[tuple[str, nn.Module]] = []
        if input_dropout > 0:
            layers.append(("input_dropout", nn.Dropout(input_dropout)))
        self.patch_n_images = patch_n_images
        if stem == "patch_whiten":
            from dnn_tricks.models.patch_whiten import PatchWhitening

            whiten = PatchWhitening(
                in_ch, patch_size=patch_size, eps=patch_eps, max_images=patch_n_images
            )
            layers += [("whiten", whiten), ("whiten_act", create_activation(activation))]
            in_ch = whiten.out_channels
        unit = dict(norm=norm, norm_position=norm_position, activation=activation)
        conv = nn.Conv2d(in_ch, width, 3, padding=1, bias=not adds_norm_layer(norm))
        layers.append(
            (
                "stem",
                hidden_block(conv, width, spatial=True, num_groups=num_groups, dropout=0.0, **unit),
            )
        )
        in_ch = width
        for stage in range(3):
            out_ch = width * 2**stage
            blocks = []
            for index in range(n):
                stride = 2 if stage > 0 and index == 0 else 1
                blocks.append(
                    BasicBlock(
                        in_ch,
                        out_ch,
                        stride,
                        num_groups=num_groups,
                        spatial_dropout=spatial_dropout,
                        shortcut=shortcut,
                        **unit,
                    )
                )
                in_ch = out_ch
            layers.append((f"stage{stage + 1}", nn.Sequential(*blocks)))
        self.features = nn.Sequential(OrderedDict(layers))
        head: list[tuple[str, nn.Module]] = [
            ("pool", nn.AdaptiveAvgPool2d(1)),
            ("flatten", nn.Flatten()),
        ]
        if dropout > 0:
            head.append(("dropout", nn.Dropout(dropout)))
        head.append(("fc", nn.Linear(in_ch, num_classes)))
        self.head = nn.Sequential(OrderedDict(head))
        init_weights(self, init, nonlinearity=activation_name(activation))
        if zero_init_residual:
            for module in self.modules():
                if isinstance(module, BasicBlock):
                    module.zero_init_last()

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def _blocks_per_stage(depth: int, blocks_per_stage: int | None) -> int:
    if blocks_per_stage is not None:
        if blocks_per_stage < 1:
            raise ValueError(f"blocks_per_stage={blocks_per_stage} must be at least 1")
        return blocks_per_stage
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(
            f"depth={depth} is not 6n + 2 (8, 14, 20, 32, 44, 56, 110); pick one of those "
            "or set blocks_per_stage"
        )
    return (depth - 2) // 6
