"""Norms and activations by registered name, class path or partial: what gets built, and
that it computes what torch's documentation and a NumPy reference say."""

from __future__ import annotations

import functools

import numpy as np
import pytest
import torch
from torch import nn

from dnn_tricks.models.layers import (
    ChannelsLast,
    activation_name,
    create_activation,
    create_norm_layer,
)
from dnn_tricks.models.nets import MLP, ConvNet
from dnn_tricks.models.resnet import ResNet
from dnn_tricks.norm_layers import is_norm_layer, running_buffers, running_stat_layers

IMAGE = (1, 12, 12)
GROUP_NORM = {"class_path": "torch.nn.GroupNorm", "init_args": {"num_groups": 4}}


def _rms_reference(x: np.ndarray, eps: float) -> np.ndarray:
    """torch.nn.RMSNorm's documented formula over the last dim, weight 1."""
    return x / np.sqrt((x**2).mean(-1, keepdims=True) + eps)


def test_rmsnorm_by_class_path_in_an_mlp_normalizes_each_sample():
    torch.manual_seed(0)
    model = MLP((6,), 3, hidden=(5,), norm="torch.nn.RMSNorm", norm_position="before")
    block = model.layers[1]
    assert type(block.norm) is nn.RMSNorm and block.norm.normalized_shape == (5,)
    x = torch.randn(4, 6)
    with torch.no_grad():
        z = block.linear(x).double().numpy()
        out = block.act(block.norm(block.linear(x)))
    eps = torch.finfo(torch.float32).eps  # RMSNorm's documented default for eps=None
    np.testing.assert_allclose(out.numpy(), np.maximum(_rms_reference(z, eps), 0), rtol=1e-5)


@pytest.mark.parametrize("path", ["torch.nn.RMSNorm", "torch.nn.LayerNorm"])
def test_trailing_dim_norms_see_each_positions_channels_after_a_conv(path):
    layer = create_norm_layer({"class_path": path, "init_args": {"eps": 1e-3}}, 6, True)
    assert isinstance(layer, ChannelsLast) and layer.norm.normalized_shape == (6,)
    x = torch.randn(2, 6, 3, 4, dtype=torch.float64)
    with torch.no_grad():
        out = layer.double()(x).numpy()
    channels = np.moveaxis(x.numpy(), 1, -1)  # N, H, W, C
    if path.endswith("LayerNorm"):
        centred = channels - channels.mean(-1, keepdims=True)
        expected = centred / np.sqrt(channels.var(-1, keepdims=True) + 1e-3)
    else:
        expected = _rms_reference(channels, 1e-3)
    np.testing.assert_allclose(out, np.moveaxis(expected, -1, 1), rtol=1e-10)


def test_group_norm_partial_gets_the_width_as_num_channels_in_conv_nets():
    conv = ConvNet(IMAGE, 3, channels=(8, 16), convs_per_stage=1, hidden=(16,), norm=GROUP_NORM)
    resnet = ResNet(IMAGE, 3, blocks_per_stage=1, width=8, norm=GROUP_NORM, shortcut="conv")
    norms = [m for m in [*conv.modules(), *resnet.modules()] if isinstance(m, nn.GroupNorm)]
    assert {m.num_groups for m in norms} == {4}
    assert {m.num_channels for m in norms} == {8, 16, 32}  # every stage width and the fc
    assert resnet(torch.randn(2, *IMAGE)).shape == (2, 3)
    # per-sample: a sample's training output ignores its batch mates (GroupNorm semantics)
    x = torch.randn(4, *IMAGE)
    with torch.no_grad():
        torch.testing.assert_close(conv(x[:1]), conv(torch.cat([x[:1], 3 * x[1:] + 2]))[:1])


def test_batch_norm_partial_keeps_its_eps_and_momentum_and_uses_them():
    spec = {"class_path": "torch.nn.BatchNorm2d", "init_args": {"eps": 1e-3, "momentum": 0.25}}
    conv = ConvNet(IMAGE, 3, channels=(4,), convs_per_stage=1, hidden=(), norm=spec)
    bn = conv.features[0][0].norm
    assert isinstance(bn, nn.BatchNorm2d) and (bn.eps, bn.momentum) == (1e-3, 0.25)
    x = torch.randn(8, *IMAGE)
    with torch.no_grad():
        z = conv.features[0][0].conv(x)
        conv.train()(x)
    # torch's documented update from zero: running_mean = momentum * batch mean
    torch.testing.assert_close(bn.running_mean, 0.25 * z.mean((0, 2, 3)))


def test_a_conv_only_class_after_linear_layers_is_reported_and_fc_norm_fixes_it():
    args = dict(channels=(4,), convs_per_stage=1, hidden=(8,), norm="torch.nn.BatchNorm2d")
    with pytest.raises(ValueError, match=r"norm='torch.nn.BatchNorm2d' cannot normalize.*fc_norm"):
        ConvNet(IMAGE, 3, **args)
    model = ConvNet(IMAGE, 3, fc_norm="torch.nn.BatchNorm1d", **args)
    assert isinstance(model.head[1].norm, nn.BatchNorm1d)
    assert isinstance(model.features[0][0].norm, nn.BatchNorm2d)
    assert model(torch.randn(2, *IMAGE)).shape == (2, 3)


def test_python_classes_and_partials_work_like_class_paths():
    layer = create_norm_layer(functools.partial(nn.GroupNorm, 2), 6, True)
    assert (layer.num_groups, layer.num_channels) == (2, 6)
    assert isinstance(create_norm_layer(nn.BatchNorm1d, 6, False), nn.BatchNorm1d)
    assert create_norm_layer(functools.partial(nn.BatchNorm1d, eps=0.5), 6, False).eps == 0.5


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("bogus", "norm='bogus' is unknown; choose one of: none, batch"),
        ("torch.nn.NoSuchNorm", "norm='torch.nn.NoSuchNorm' cannot be imported"),
        ({"class_path": "torch.nn.GroupNorm", "init_args": {"groups": 4}}, "cannot be built"),
        ({"class_path": "torch.nn.GroupNorm", "init_args": {"num_groups": 3}}, "divisible"),
        ({"path": "torch.nn.GroupNorm"}, "takes class_path and init_args"),
        ("math.sqrt", "must build an nn.Module"),
    ],
)
def test_bad_norm_specs_name_the_key(spec, message):
    with pytest.raises(ValueError, match=message):
        MLP((4,), 2, hidden=(8,), norm=spec)


def test_activations_by_class_path_and_partial():
    leaky = create_activation(
        {"class_path": "torch.nn.LeakyReLU", "init_args": {"negative_slope": 0.2}}
    )
    x = torch.tensor([-2.0, 3.0])
    torch.testing.assert_close(leaky(x), torch.tensor([-0.4, 3.0]))
    assert isinstance(create_activation("torch.nn.Mish"), nn.Mish)
    model = MLP((4,), 2, hidden=(8,), activation="torch.nn.Mish")
    assert isinstance(model.layers[1].act, nn.Mish)
    with pytest.raises(ValueError, match="activation='swish' is unknown"):
        create_activation("swish")


def test_kaiming_gain_follows_an_activation_given_by_class_path():
    assert activation_name("torch.nn.Tanh") == "tanh"
    assert activation_name({"class_path": "torch.nn.Mish"}) == "mish"
    torch.manual_seed(0)
    model = MLP((400,), 2, hidden=(400,), activation="torch.nn.Tanh", init="kaiming_normal")
    weight = model.layers[1].linear.weight
    # nn.init.calculate_gain('tanh') = 5/3 and Var(W) = gain^2 / fan_in (He et al. 2015)
    assert abs(weight.var().item() / ((5 / 3) ** 2 / 400) - 1) < 0.03


def test_zero_init_residual_finds_the_scale_inside_a_channels_last_norm():
    model = ResNet(IMAGE, 3, blocks_per_stage=1, width=8, norm="torch.nn.LayerNorm")
    model_zero = ResNet(
        IMAGE, 3, blocks_per_stage=1, width=8, norm="torch.nn.LayerNorm", zero_init_residual=True
    )
    last = model_zero.features.stage1[0].branch.norm2
    assert isinstance(last, ChannelsLast) and torch.all(last.norm.weight == 0)
    assert torch.all(model.features.stage1[0].branch.norm2.norm.weight == 1)
    with pytest.raises(ValueError, match="zero_init_residual needs a norm layer with a learnable"):
        ResNet(IMAGE, 3, depth=8, norm="torch.nn.InstanceNorm2d", zero_init_residual=True)


def test_one_definition_of_running_statistics():
    from dnn_tricks.models.iternorm import IterNorm

    tracked, untracked = nn.BatchNorm1d(3), nn.BatchNorm1d(3, track_running_stats=False)
    assert list(running_buffers(tracked)) == ["running_mean", "running_var"]
    assert running_buffers(untracked) == {}
    assert list(running_buffers(IterNorm(4, num_groups=2))) == ["running_mean", "running_whiten"]
    assert list(running_buffers(nn.InstanceNorm2d(3, track_running_stats=True))) == [
        "running_mean",
        "running_var",
    ]
    assert all(is_norm_layer(m) for m in (untracked, nn.RMSNorm(3), IterNorm(4, num_groups=2)))
    assert not is_norm_layer(nn.Linear(3, 3))
    model = nn.Sequential(nn.Linear(3, 3), tracked, nn.Sequential(untracked, IterNorm(4, 2)))
    assert [name for name, _ in running_stat_layers(model)] == ["1", "2.1"]


@pytest.mark.parametrize(
    ("net", "norm", "norm_class"),
    [
        ("dnn_tricks.models.nets.MLP", "torch.nn.RMSNorm", nn.RMSNorm),
        (
            "dnn_tricks.models.nets.ConvNet",
            "{class_path: torch.nn.GroupNorm, init_args: {num_groups: 4}}",
            nn.GroupNorm,
        ),
    ],
)
def test_class_path_norms_through_the_cli(run_cli, tmp_path, net, norm, norm_class):
    from conftest import CONFIGS, shrink_args
    from dnn_tricks.models.classifier import Classifier

    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "digits.yaml",
            f"--model.net={net}",
            f"--model.net.init_args.norm={norm}",
            *shrink_args(tmp_path / "logs", epochs=1, batches=2),
        ]
    )
    (ckpt,) = (tmp_path / "logs").glob("*/version_0/checkpoints/last.ckpt")
    assert (
        f"{norm_class.__module__.split('.modules')[0]}.{norm_class.__name__}"
        in (ckpt.parents[1] / "config.yaml").read_text()
    )
    # the checkpoint rebuilds the same net from its saved config, weights only
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    rebuilt = Classifier.load_from_checkpoint(ckpt, weights_only=True)
    norms = [m for m in rebuilt.net.modules() if isinstance(m, norm_class)]
    assert norms and all(not running_buffers(m) for m in norms)
    assert set(state) == set(rebuilt.state_dict())
