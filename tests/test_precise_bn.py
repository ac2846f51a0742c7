"""PreciseBN: recomputed statistics against hand computations (plain averages over the
batches, exact whitening for IterNorm), and a fit that logs the accuracies and writes a
checkpoint holding the new statistics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from callback_helpers import fit, one_thread, read_events
from torch import nn

from dnn_tricks.callbacks.norm_stats import running_stat_layers
from dnn_tricks.callbacks.precise_bn import PreciseBN, recompute_statistics
from dnn_tricks.models.iternorm import IterNorm


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_batchnorm_statistics_become_the_plain_average_over_the_batches():
    g = torch.Generator().manual_seed(0)
    linear = nn.Linear(4, 3).double()
    bn = nn.BatchNorm1d(3, momentum=0.1).double()
    model = nn.Sequential(linear, bn, nn.ReLU()).eval()
    bn.num_batches_tracked.fill_(7)
    batches = [torch.randn(8, 4, generator=g, dtype=torch.float64) * 3 + 1 for _ in range(5)]
    weight_before = linear.weight.detach().clone()

    used = recompute_statistics(model, iter(batches * 2), model, num_batches=5)

    inputs = np.stack([(b @ linear.weight.T + linear.bias).detach().numpy() for b in batches])
    assert used == 5
    # equal batch sizes: the mean of batch means is the plain mean of all 40 layer inputs
    np.testing.assert_allclose(bn.running_mean.numpy(), inputs.reshape(-1, 3).mean(0), rtol=1e-12)
    # PyTorch keeps the unbiased batch variance; the average of those over the batches
    np.testing.assert_allclose(bn.running_var.numpy(), inputs.var(1, ddof=1).mean(0), rtol=1e-12)
    # fixed weights; momentum, mode and batch counter as they were
    assert torch.equal(linear.weight, weight_before)
    assert bn.momentum == 0.1 and not model.training and not bn.training
    assert int(bn.num_batches_tracked) == 7


def test_iternorm_statistics_become_averages_of_exact_whitening_matrices():
    g = torch.Generator().manual_seed(2)
    layer = IterNorm(4, num_groups=2, T=40).double()  # 40 Newton steps: exact inverse sqrt
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64)
    batches = [torch.randn(32, 4, generator=g, dtype=torch.float64) @ mix - 2 for _ in range(3)]

    recompute_statistics(layer, batches, layer, num_batches=3)

    x = np.stack([b.numpy() for b in batches])
    whiten = np.zeros((2, 2, 2))
    for b in x:
        for grp in range(2):
            sigma = np.cov(b[:, 2 * grp : 2 * grp + 2].T, bias=True) + layer.eps * np.eye(2)
            lam, u = np.linalg.eigh(sigma)
            whiten[grp] += (u / np.sqrt(lam)) @ u.T / len(x)
    np.testing.assert_allclose(layer.running_mean.numpy(), x.reshape(-1, 4).mean(0), rtol=1e-12)
    np.testing.assert_allclose(layer.running_whiten.numpy(), whiten, rtol=1e-9, atol=1e-12)
    assert layer.momentum == 0.1


def test_fit_logs_accuracies_and_saves_the_recomputed_statistics(tmp_path):
    precise = PreciseBN(num_batches=12)
    trainer, model, data = fit([precise], tmp_path, epochs=1, batches=6, checkpoint=True)

    events = read_events(trainer.log_dir)
    logged = {t: events.Scalars(t)[-1].value for t in events.Tags()["scalars"]}
    assert logged["val/acc_before_precise_bn"] == pytest.approx(precise.accuracy["before"])
    assert logged["val/acc_precise_bn"] == pytest.approx(precise.accuracy["after"])
    assert precise.batches_used == 12  # 6 batches per epoch here: the loader was cycled

    saved = torch.load(precise.saved_path, weights_only=False, map_location="cpu")["state_dict"]
    last = torch.load(trainer.checkpoint_callback.last_model_path, weights_only=False)
    for name, layer in running_stat_layers(model):
        key = f"{name}.running_mean"
        assert torch.equal(saved[key], layer.running_mean)  # what the model in memory holds
        assert not torch.equal(saved[key], last["state_dict"][key])  # not the running average
    # The accuracy PreciseBN reports is what Lightning's validation measures on its
    # checkpoint (the whole val split: limit_val_batches does not apply to either).
    trainer.limit_val_batches = 1.0
    (result,) = trainer.validate(model, data, ckpt_path=precise.saved_path, weights_only=False)
    assert result["val/acc"] == pytest.approx(precise.accuracy["after"], abs=1e-6)


def test_misconfiguration_names_the_argument():
    with pytest.raises(ValueError, match="num_batches"):
        PreciseBN(num_batches=0)
    with pytest.raises(ValueError, match="checkpoint"):
        PreciseBN(checkpoint="sub/dir.ckpt")


def test_a_frozen_backbones_batch_norm_is_left_as_it_is():
    """A frozen backbone keeps its batch norm in eval mode while training (a fixed
    function): PreciseBN leaves those statistics bitwise and recomputes only the rest."""
    from dnn_tricks.models.backbones import Backbone

    net = nn.Sequential(nn.BatchNorm2d(1), Backbone((1, 16, 16), 3, name="resnet18"))
    net[1].freeze_backbone(True)
    backbone = {n: b.clone() for n, b in net[1].named_buffers()}
    batches = [torch.rand(4, 1, 16, 16) * 2 + 1 for _ in range(3)]

    recompute_statistics(net, batches, net, num_batches=3)

    assert all(torch.equal(b, backbone[n]) for n, b in net[1].named_buffers())
    x = torch.stack(batches)  # the input layer: the plain mean over all pixels of each batch
    np.testing.assert_allclose(net[0].running_mean.item(), x.mean().item(), rtol=1e-5)
