"""MLP, ConvNet and ResNet: layer order, dropout placement and semantics, and norm layers,
checked against PyTorch's documented semantics and hand computations."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from dnn_tricks.models.layers import NORM_CHOICES
from dnn_tricks.models.nets import MLP, ConvNet
from dnn_tricks.models.resnet import BasicBlock, PadShortcut, ResNet

IMAGE = (1, 12, 12)


def _small_convnet(**kwargs) -> ConvNet:
    args = dict(input_shape=IMAGE, num_classes=3, channels=(8, 16), convs_per_stage=1)
    return ConvNet(**{**args, "hidden": (16,), **kwargs})


def _small_resnet(**kwargs) -> ResNet:
    return ResNet(
        **{"input_shape": IMAGE, "num_classes": 3, "blocks_per_stage": 1, "width": 8, **kwargs}
    )


def _blocks(model: nn.Module) -> list[BasicBlock]:
    return [m for m in model.modules() if isinstance(m, BasicBlock)]


# -- layer order ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("position", "order"), [("before", ["norm", "act"]), ("after", ["act", "norm"])]
)
def test_mlp_and_convnet_put_the_norm_where_configured(position, order):
    mlp = MLP((10,), 3, hidden=(8, 8), norm="batch", norm_position=position, dropout=0.1)
    assert list(mlp.layers[1]._modules) == ["linear", *order, "dropout"]
    conv = _small_convnet(norm="group", norm_position=position)
    assert list(conv.features[0][0]._modules) == ["conv", *order]
    assert list(conv.head[1]._modules) == ["linear", *order]


def test_convnet_without_a_norm_layer_is_conv_act():
    for norm in ("none", "weight"):
        block = _small_convnet(norm=norm, norm_position="after").features[0][0]
        assert list(block._modules) == ["conv", "act"]


def test_convnet_pool_after_conv_pools_before_the_norm_and_later_convs():
    net = _small_convnet(norm="batch", convs_per_stage=2, pool_position="after_conv")
    first, second = net.features[0]  # no trailing pool: the stage is its two blocks
    assert list(first._modules) == ["conv", "pool", "norm", "act"]
    assert list(second._modules) == ["conv", "norm", "act"]
    x = torch.randn(4, *IMAGE)
    assert first(x).shape == (4, 8, 6, 6) and net(x).shape == (4, 3)
    # hand composition in train mode: conv -> 2x2 max-pool -> batch statistics -> ReLU
    conv, norm = first.conv, first.norm
    pooled = nn.functional.max_pool2d(conv(x), 2)
    mean, var = (
        pooled.mean((0, 2, 3), keepdim=True),
        pooled.var((0, 2, 3), unbiased=False, keepdim=True),
    )
    expected = torch.relu((pooled - mean) / torch.sqrt(var + norm.eps))
    torch.testing.assert_close(first(x), expected, rtol=1e-5, atol=1e-5)


def test_convnet_pool_position_is_exact_where_pool_and_activation_commute():
    """Max-pool commutes with a monotonic activation, so without a norm layer the two
    positions compute the same function from the same weights."""
    end = _small_convnet(norm="none", activation="relu")
    moved = _small_convnet(norm="none", activation="relu", pool_position="after_conv")
    moved.load_state_dict(end.state_dict())  # same parameter names: checkpoints carry over
    x = torch.randn(5, *IMAGE)
    torch.testing.assert_close(moved(x), end(x), rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="convs_per_stage >= 1"):
        _small_convnet(pool_position="after_conv", convs_per_stage=0)


def test_resnet_block_order_before_is_he_et_als_post_activation_block():
    block = _blocks(_small_resnet(norm="batch", norm_position="before"))[0]
    assert list(block.branch._modules) == ["conv1", "norm1", "act1", "conv2", "norm2"]
    assert isinstance(block.act, nn.ReLU)  # the last activation follows the addition
    assert block.branch.conv1.bias is None  # a bias before a norm would be cancelled


def test_resnet_block_order_after_ends_the_branch_with_act_and_norm():
    block = _blocks(_small_resnet(norm="group", norm_position="after", spatial_dropout=0.2))[0]
    names = ["conv1", "act1", "norm1", "dropout", "conv2", "act2", "norm2"]
    assert list(block.branch._modules) == names
    assert isinstance(block.act, nn.Identity)
    assert block.branch.conv1.bias is not None  # the activation follows the conv directly
    x = torch.randn(2, 8, 6, 6)
    block.eval()
    torch.testing.assert_close(block(x), x + block.branch(x))


def test_resnet_block_without_norm_reads_as_conv_act_whatever_the_position():
    block = _blocks(_small_resnet(norm="none", norm_position="after"))[0]
    assert list(block.branch._modules) == ["conv1", "act1", "conv2"]
    assert isinstance(block.act, nn.ReLU)


# -- resnet structure ----------------------------------------------------------------------


@pytest.mark.parametrize(("depth", "millions"), [(20, 0.27), (32, 0.46), (44, 0.66)])
def test_resnet_parameter_count_matches_he_et_al_table_6(depth, millions):
    model = ResNet((3, 32, 32), 10, depth=depth, init="default")
    assert len(_blocks(model)) == 3 * (depth - 2) // 6
    assert round(sum(p.numel() for p in model.parameters()) / 1e6, 2) == millions


@pytest.mark.parametrize(
    ("shape", "sizes"), [((1, 28, 28), [28, 14, 7]), ((3, 32, 32), [32, 16, 8])]
)
def test_resnet_stages_halve_the_resolution_and_double_the_width(shape, sizes):
    model = ResNet(shape, 10, depth=8, width=4).eval()
    x = torch.randn(2, *shape)
    h = model.features.stem(x)
    for stage, size in zip(("stage1", "stage2", "stage3"), sizes, strict=True):
        h = getattr(model.features, stage)(h)
        assert h.shape[1:] == (4 * 2 ** int(stage[-1]) // 2, size, size)
    assert model(x).shape == (2, 10)


def test_pad_shortcut_subsamples_and_appends_zero_channels():
    x = torch.randn(2, 3, 5, 5)
    out = PadShortcut(3, 5, stride=2)(x)
    expected = torch.zeros(2, 5, 3, 3)
    expected[:, :3] = x[:, :, 0::2, 0::2]
    torch.testing.assert_close(out, expected)


def test_conv_shortcut_projects_with_a_normalized_1x1_conv():
    block = _blocks(_small_resnet(shortcut="conv"))[1]
    assert block.shortcut.conv.kernel_size == (1, 1) and block.shortcut.conv.stride == (2, 2)
    assert isinstance(block.shortcut.norm, nn.BatchNorm2d)


@pytest.mark.parametrize("position", ["before", "after"])
@pytest.mark.parametrize("norm", ["batch", "group", "weight", "none"])
def test_zero_init_residual_starts_every_identity_block_as_the_identity(norm, position):
    model = _small_resnet(
        norm=norm, norm_position=position, zero_init_residual=True, blocks_per_stage=2
    )
    identity_blocks = [b for b in _blocks(model) if isinstance(b.shortcut, nn.Identity)]
    assert len(identity_blocks) == 4  # 2 blocks in each of 3 stages, 2 of them downsample
    x = torch.rand(4, 8, 6, 6)  # non-negative, as after a ReLU, so act(x) == x
    torch.testing.assert_close(model.features.stage1(x), x)
    assert not torch.equal(_small_resnet(norm=norm, blocks_per_stage=2).features.stage1[0](x), x)


def test_resnet_rejects_depths_that_are_not_6n_plus_2():
    with pytest.raises(ValueError, match=r"depth=21 is not 6n \+ 2"):
        ResNet((3, 32, 32), 10, depth=21)
    assert len(_blocks(ResNet((3, 32, 32), 10, depth=21, blocks_per_stage=2))) == 6


def test_patch_whitening_stem_feeds_the_conv_stem():
    from dnn_tricks.models import patch_whiten

    model = _small_resnet(stem="patch_whiten", patch_size=2)
    assert isinstance(model.features.whiten, patch_whiten.PatchWhitening)
    assert model.features.stem.conv.in_channels == model.features.whiten.out_channels
    assert model(torch.randn(2, *IMAGE)).shape == (2, 3)


# -- dropout ---------------------------------------------------------------------------------


def test_dropout_layers_select_which_hidden_layers_drop():
    mlp = MLP((10,), 3, hidden=(8, 8, 8), dropout=0.5, dropout_layers=[0, 2])
    has = ["dropout" in block._modules for block in mlp.layers[1:4]]
    assert has == [True, False, True]
    conv = _small_convnet(hidden=(8, 8), dropout=0.5, dropout_layers=[1])
    assert ["dropout" in block._modules for block in conv.head[1:3]] == [False, True]
    everywhere = MLP((10,), 3, hidden=(8, 8), dropout=0.5)
    assert all("dropout" in block._modules for block in everywhere.layers[1:3])


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLP((1, 12, 12), 3, hidden=(32, 32), dropout=0.5, input_dropout=0.2),
        lambda: _small_convnet(dropout=0.5, spatial_dropout=0.3, input_dropout=0.2),
        lambda: _small_resnet(dropout=0.5, spatial_dropout=0.3, input_dropout=0.2),
    ],
)
def test_dropout_is_random_in_train_and_off_in_eval(make):
    torch.manual_seed(0)
    model = make()
    x = torch.randn(8, *IMAGE)
    model.train()
    with torch.no_grad():
        assert not torch.equal(model(x), model(x))
        model.eval()
        torch.testing.assert_close(model(x), model(x), rtol=0, atol=0)


def test_dropout_keeps_units_scaled_by_one_over_keep_probability():
    p = 0.4
    block = MLP((50,), 3, hidden=(2000,), dropout=p).layers[1]
    x = torch.randn(16, 50)
    with torch.no_grad():
        kept = block[:-1](x)  # linear -> act, without the dropout
        out = block(x)
    nonzero = kept != 0
    dropped = (out == 0) & nonzero
    torch.testing.assert_close(out[~dropped], kept[~dropped] / (1 - p))
    assert abs(dropped.sum().item() / nonzero.sum().item() - p) < 0.02


@pytest.mark.parametrize("model_kind", ["convnet", "resnet"])
def test_spatial_dropout_drops_whole_channels(model_kind):
    p = 0.5
    if model_kind == "convnet":
        stage = _small_convnet(spatial_dropout=p, channels=(64,)).features[0]
        before, drop = stage[:-1], stage[-1]
    else:
        branch = _blocks(_small_resnet(spatial_dropout=p, width=64))[0].branch
        names = list(branch._modules)
        before, drop = branch[: names.index("dropout")], branch.dropout
    assert isinstance(drop, nn.Dropout2d)
    with torch.no_grad():
        h = before(torch.randn(4, *IMAGE) if model_kind == "convnet" else torch.randn(4, 64, 6, 6))
        out = drop(h)
    for n in range(h.shape[0]):
        for c in range(h.shape[1]):
            if out[n, c].abs().sum() == 0:
                continue
            torch.testing.assert_close(out[n, c], h[n, c] / (1 - p))
    zero_channels = (out.flatten(2).abs().sum(-1) == 0).float().mean().item()
    assert 0.3 < zero_channels < 0.7


# -- normalization ---------------------------------------------------------------------------


def test_batch_norm_eval_uses_running_statistics_for_a_single_sample():
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=(5,), norm="batch")
    for _ in range(4):
        model(torch.randn(32, 6) * 3 + 1)
    block = model.layers[1]
    bn = block.norm
    with torch.no_grad():
        bn.weight.uniform_(0.5, 2.0)
        bn.bias.uniform_(-1.0, 1.0)
    model.eval()
    x = torch.randn(1, 6)
    z = block.linear(x)
    expected = torch.relu(
        (z - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
    )
    torch.testing.assert_close(block(x), expected)


def test_conv_batch_norm_eval_normalizes_each_channel_with_its_running_statistics():
    torch.manual_seed(0)
    model = _small_convnet(norm="batch")
    for _ in range(3):
        model(torch.randn(16, *IMAGE) * 2 + 0.5)
    block = model.features[0][0]
    bn = block.norm
    model.eval()
    x = torch.randn(1, *IMAGE)
    z = block.conv(x)
    shape = (1, -1, 1, 1)
    scale = (bn.weight / torch.sqrt(bn.running_var + bn.eps)).view(shape)
    expected = torch.relu((z - bn.running_mean.view(shape)) * scale + bn.bias.view(shape))
    torch.testing.assert_close(block(x), expected)


@pytest.mark.parametrize(
    "make",
    [
        lambda: MLP(IMAGE, 3, hidden=(16, 16), norm="layer"),
        lambda: _small_convnet(norm="group", num_groups=4),
        lambda: _small_convnet(norm="layer"),
        lambda: _small_convnet(norm="instance"),
        lambda: _small_resnet(norm="group", num_groups=4),
        lambda: _small_resnet(norm="layer", norm_position="after"),
    ],
)
def test_per_sample_norms_ignore_batch_mates_in_training(make):
    torch.manual_seed(0)
    model = make().train()
    x = torch.randn(6, *IMAGE)
    with torch.no_grad():
        alone = model(x[:1])
        mixed = model(torch.cat([x[:1], 5 * x[1:] + 3]))
        torch.testing.assert_close(alone, mixed[:1])
        # Batch norm, by contrast, does depend on the batch in training.
        bn = _small_convnet(norm="batch").train()
        assert not torch.allclose(bn(x)[:1], bn(torch.cat([x[:1], 5 * x[1:] + 3]))[:1])


def _norm_models(norm: str) -> list[nn.Module]:
    return [
        _small_convnet(norm=norm, num_groups=4),
        _small_resnet(norm=norm, num_groups=4),
    ]


@pytest.mark.parametrize("norm", NORM_CHOICES)
def test_every_norm_builds_and_trains_on_images(norm):
    torch.manual_seed(0)
    x, y = torch.randn(4, *IMAGE), torch.tensor([0, 1, 2, 0])
    models = _norm_models(norm)
    if norm != "instance":
        models.append(MLP(IMAGE, 3, hidden=(16, 16), norm=norm, num_groups=4))
    for model in models:
        loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        grads = [p.grad for p in model.parameters() if p.requires_grad]
        assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


def test_instance_norm_on_an_mlp_says_to_use_conv_features():
    with pytest.raises(ValueError, match="norm='instance'.*needs conv features"):
        MLP((10,), 3, hidden=(8,), norm="instance")


def test_unknown_norm_and_position_name_the_key():
    with pytest.raises(ValueError, match="norm='bogus' is unknown; choose one of"):
        _small_resnet(norm="bogus")
    with pytest.raises(ValueError, match="norm_position='middle' is unknown"):
        _small_resnet(norm_position="middle")
