"""Networks whose normalization, activation, dropout placement and init come from the config.

Each hidden layer is a small ``nn.Sequential`` with named children (``linear``/``conv``,
``norm``, ``act``, ``dropout``), so the printed model shows exactly where each trick sits.
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Sequence
from typing import Any, Literal

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

NormPosition = Literal["before", "after"]
PoolPosition = Literal["end", "after_conv"]


def hidden_block(
    layer: nn.Module,
    width: int,
    *,
    spatial: bool,
    norm: Any,
    norm_position: NormPosition,
    activation: Any,
    num_groups: int,
    dropout: float,
) -> nn.Sequential:
    """``layer`` followed by norm and activation in the configured order, then dropout.

    ``before``: layer -> norm -> act (Ioffe & Szegedy 2015); ``after``: layer -> act -> norm.
    Dropout comes last so it drops normalized, activated units (inverted scaling 1/(1-p)).
    """
    check_choice("norm_position", norm_position, ("before", "after"))
    name = "conv" if spatial else "linear"
    parts: list[tuple[str, nn.Module]] = [
        (name, apply_weight_norm(layer) if uses_weight_norm(norm) else layer)
    ]
    act = create_activation(activation)
    if not adds_norm_layer(norm):
        parts.append(("act", act))
    elif norm_position == "before":
        parts += [("norm", create_norm_layer(norm, width, spatial, num_groups)), ("act", act)]
    else:
        parts += [("act", act), ("norm", create_norm_layer(norm, width, spatial, num_groups))]
    if dropout > 0:
        parts.append(("dropout", nn.Dropout2d(dropout) if spatial else nn.Dropout(dropout)))
    return nn.Sequential(OrderedDict(parts))


def _pool_after_first(block: nn.Sequential) -> nn.Sequential:
    """``block`` (conv, norm, act, ...) with a 2x2 max-pool as its second child."""
    (first, layer), *rest = block.named_children()
    return nn.Sequential(OrderedDict([(first, layer), ("pool", nn.MaxPool2d(2)), *rest]))


def require_image_shape(net: str, input_shape: Sequence[int]) -> None:
    """Conv nets need C x H x W inputs; say so in one line for tabular sources."""
    if len(input_shape) != 3:
        raise ValueError(
            f"{net} needs images (C x H x W) but the data has shape {tuple(input_shape)}; "
            "use model.net: MLP for tabular sources"
        )


def check_probability(key: str, p: float) -> None:
    if not 0.0 <= p < 1.0:
        raise ValueError(f"{key}={p} must be a drop probability in [0, 1)")


def _dropout_at(index: int, dropout: float, dropout_layers: Sequence[int] | None) -> float:
    return dropout if dropout_layers is None or index in dropout_layers else 0.0


class MLP(nn.Module):
    """A multilayer perceptron; ``hidden: []`` makes it (multinomial) logistic regression.

    Args:
        input_shape: shape of one input (filled in from the data; images are flattened).
        num_classes: number of output logits (filled in from the data).
        hidden: width of each hidden layer.
        activation: relu, leaky_relu, elu, gelu, silu, tanh, sigmoid, or a class path /
            {class_path, init_args} of any activation module (e.g. torch.nn.Mish).
        norm: none, batch, layer, group, weight or iter (batch whitening) for hidden layers,
            or a class path / {class_path, init_args} of any norm layer, built with the
            layer width as its first unset argument (e.g. torch.nn.RMSNorm;
            see ``dnn_tricks.models.layers``).
        norm_position: ``before`` or ``after`` the activation.
        num_groups: groups for ``group`` norm and ``iter`` batch whitening.
        dropout: drop probability of hidden units (torch convention: p drops, 1-p keeps).
        input_dropout: drop probability of input features (Srivastava et al. keep 0.8: 0.2).
        dropout_layers: indices of the hidden layers that get dropout; all when null.
        init: default, xavier_uniform, xavier_normal, kaiming_uniform, kaiming_normal,
            orthogonal (biases are zeroed by every scheme but default).
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        hidden: Sequence[int] = (256, 128),
        activation: LayerSpec = "relu",
        norm: LayerSpec = "none",
        norm_position: NormPosition = "before",
        num_groups: int = 8,
        dropout: float = 0.0,
        input_dropout: float = 0.0,
        dropout_layers: Sequence[int] | None = None,
        init: str = "default",
    ) -> None:
        super().__init__()
        check_probability("dropout", dropout)
        check_probability("input_dropout", input_dropout)
        layers: list[nn.Module] = [nn.Flatten()]
        if input_dropout > 0:
            layers.append(nn.Dropout(input_dropout))
        width = math.prod(input_shape)
        for index, out in enumerate(hidden):
            drop = _dropout_at(index, dropout, dropout_layers)
            layers.append(
                hidden_block(
                    nn.Linear(width, out),
                    out,
                    spatial=False,
                    norm=norm,
                    norm_position=norm_position,
                    activation=activation,
                    num_groups=num_groups,
                    dropout=drop,
                )
            )
            width = out
        layers.append(nn.Linear(width, num_classes))
        self.layers = nn.Sequential(*layers)
        init_weights(self, init, nonlinearity=activation_name(activation))

    def forward(self, x: Tensor) -> Tensor:
        return self.layers(x)


class ConvNet(nn.Module):
    """A VGG-style CNN: stages of (conv-norm-act) x ``convs_per_stage`` then 2x2 max-pool,
    then fully connected hidden layers.

    Args:
        input_shape: C x H x W of one image (filled in from the data).
        num_classes: number of output logits (filled in from the data).
        channels: output channels of each stage.
        convs_per_stage: 3x3 convolutions per stage.
        pool_position: where each stage's 2x2 max-pool sits: ``end`` (after the stage's last
            activation) or ``after_conv`` (right after its first convolution, before that
            conv's norm and activation, as airbench orders its conv groups): the stage's norms,
            activations and later convs then work on a quarter of the pixels. With no norm (or
            a positive norm scale) and a monotonic activation, pool and activation commute.
        hidden: widths of the fully connected layers after the last stage.
        activation: relu, leaky_relu, elu, gelu, silu, tanh, sigmoid, or a class path /
            {class_path, init_args} of any activation module.
        norm: none, batch, layer, instance, group, weight or iter, for conv and fc layers
            (``instance`` applies to the conv layers only; fc layers then use none), or a
            class path / {class_path, init_args} of any norm layer: it gets (N, C, H, W)
            after convs (see ``dnn_tricks.models.layers`` for LayerNorm / RMSNorm).
        fc_norm: norm of the fully connected hidden layers, which get (N, C); null uses
            ``norm``. Set it when ``norm`` is a conv-only class (torch.nn.BatchNorm2d:
            fc_norm torch.nn.BatchNorm1d or batch).
        norm_position: ``before`` or ``after`` the activation.
        num_groups: groups for ``group`` norm and ``iter`` batch whitening.
        dropout: drop probability of the fully connected hidden units.
        spatial_dropout: Dropout2d probability (whole channels) at the end of each stage.
        input_dropout: drop probability of input pixels.
        dropout_layers: indices of the fc hidden layers that get dropout; all when null.
        init: weight initialisation scheme (see MLP).
        stem: ``conv`` (none) or ``patch_whiten``: a frozen first conv whose filters whiten
            k x k patches, fitted from normalized train images at the start of a fresh fit.
        patch_size: k of the patch-whitening stem.
        patch_eps: eps added to the patch covariance eigenvalues.
        patch_n_images: how many train images fit the stem.
    """

    def __init__(
        self,
        input_shape: Sequence[int],
        num_classes: int,
        channels: Sequence[int] = (32, 64),
        convs_per_stage: int = 2,
        pool_position: PoolPosition = "end",
        hidden: Sequence[int] = (128,),
        activation: LayerSpec = "relu",
        norm: LayerSpec = "batch",
        fc_norm: LayerSpec | None = None,
        norm_position: NormPosition = "before",
        num_groups: int = 8,
        dropout: float = 0.0,
        spatial_dropout: float = 0.0,
        input_dropout: float = 0.0,
        dropout_layers: Sequence[int] | None = None,
        init: str = "default",
        stem: Literal["conv", "patch_whiten"] = "conv",
        patch_size: int = 2,
        patch_eps: float = 5e-4,
        patch_n_images: int = 5000,
    ) -> None:
        super().__init__()
        require_image_shape("ConvNet", input_shape)
        for key, p in (("dropout", dropout), ("spatial_dropout", spatial_dropout)):
            check_probability(key, p)
        check_probability("input_dropout", input_dropout)
        check_choice("stem", stem, ("conv", "patch_whiten"))
        check_choice("pool_position", pool_position, ("end", "after_conv"))
        if pool_position == "after_conv" and convs_per_stage < 1:
            raise ValueError("pool_position=after_conv pools after a conv: convs_per_stage >= 1")
        in_ch, height, width = input_shape
        features: list[nn.Module] = []
        if input_dropout > 0:
            features.append(nn.Dropout(input_dropout))
        self.patch_n_images = patch_n_images
        if stem == "patch_whiten":
            from dnn_tricks.models.patch_whiten import PatchWhitening

            whiten = PatchWhitening(
                in_ch, patch_size=patch_size, eps=patch_eps, max_images=patch_n_images
            )
            features += [whiten, create_activation(activation)]
            in_ch = whiten.out_channels
            height, width = height - patch_size + 1, width - patch_size + 1
        block_args = dict(
            norm=norm,
            norm_position=norm_position,
            activation=activation,
            num_groups=num_groups,
        )
        for out_ch in channels:
            stage: list[nn.Module] = []
            for index in range(convs_per_stage):
                # A conv feeding the activation directly (no norm, or norm after) needs its bias.
                has_bias = not adds_norm_layer(norm) or norm_position == "after"
                conv = nn.Conv2d(in_ch, out_ch, 3, padding=1, bias=has_bias)
                block = hidden_block(conv, out_ch, spatial=True, dropout=0.0, **block_args)
                if index == 0 and pool_position == "after_conv":
                    block = _pool_after_first(block)
                stage.append(block)
                in_ch = out_ch
            if pool_position == "end":
                stage.append(nn.MaxPool2d(2))
            if spatial_dropout > 0:
                stage.append(nn.Dropout2d(spatial_dropout))
            features.append(nn.Sequential(*stage))
            height, width = height // 2, width // 2
        if height < 1 or width < 1:
            raise ValueError(
                f"ConvNet has {len(channels)} pooling stages, too many for {tuple(input_shape)} "
                "images; shorten model.net.channels"
            )
        self.features = nn.Sequential(*features)
        if fc_norm is None:
            fc_norm = "none" if norm == "instance" else norm
        head: list[nn.Module] = [nn.Flatten()]
        size = in_ch * height * width
        for index, out in enumerate(hidden):
            drop = _dropout_at(index, dropout, dropout_layers)
            head.append(
                hidden_block(
                    nn.Linear(size, out),
                    out,
                    spatial=False,
                    dropout=drop,
                    **{**block_args, "norm": fc_norm},
                )
            )
            size = out
        head.append(nn.Linear(size, num_classes))
        self.head = nn.Sequential(*head)
        init_weights(self, init, nonlinearity=activation_name(activation))

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))
