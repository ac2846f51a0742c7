"""PatchWhitening against a NumPy patch covariance; frozen; survives checkpoints."""

import io

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from numpy.lib.stride_tricks import sliding_window_view
from torch import nn

from dnn_tricks.models.patch_whiten import PatchWhitening


def smooth_images(n: int = 64, c: int = 3, size: int = 10, seed: int = 0) -> torch.Tensor:
    """Blurred noise with mixed channels: neighbouring pixels and channels correlate."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, c, size + 2, size + 2, generator=g)
    x = F.avg_pool2d(x, 3, stride=1)
    mix = torch.eye(c) + 0.5 * torch.randn(c, c, generator=g)
    return torch.einsum("dc,nchw->ndhw", mix, x)


def numpy_patches(images: torch.Tensor, k: int) -> np.ndarray:
    """All k x k patches as rows, flattened in (channel, row, col) order."""
    win = sliding_window_view(images.double().numpy(), (k, k), axis=(2, 3))  # N C H' W' k k
    return win.transpose(0, 2, 3, 1, 4, 5).reshape(-1, images.shape[1] * k * k)


@pytest.mark.parametrize("k", [2, 3])
def test_output_covariance_is_whitened(k):
    x = smooth_images()
    eps = 5e-4
    layer = PatchWhitening(3, patch_size=k, eps=eps).adapt([x])
    n_filters = 3 * k * k
    assert layer.out_channels == 2 * n_filters
    y = layer(x)[:, :n_filters].double()
    feats = y.permute(0, 2, 3, 1).reshape(-1, n_filters).numpy()
    lam = np.linalg.eigvalsh(np.cov(numpy_patches(x, k).T))[::-1]
    np.testing.assert_allclose(np.cov(feats.T), np.diag(lam / (lam + eps)), atol=1e-4)


def test_eigenfilters_are_ordered_and_negated():
    x = smooth_images()
    layer = PatchWhitening(3, patch_size=2, eps=1e-3).adapt([x])
    cov = np.cov(numpy_patches(x, 2).T)
    lam = np.linalg.eigvalsh(cov)[::-1]
    rows = layer.weight.double().reshape(24, 12).numpy()
    np.testing.assert_allclose(rows[12:], -rows[:12])
    unit = rows[:12] * np.sqrt(lam + 1e-3)[:, None]  # undo the 1/sqrt(lambda+eps) scaling
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0, rtol=1e-5)
    # filter i is the eigenvector of the i-th largest eigenvalue
    np.testing.assert_allclose(unit @ cov, lam[:, None] * unit, atol=1e-4)


def test_weights_stay_frozen_through_training():
    x = smooth_images(n=16)
    layer = PatchWhitening(3).adapt([x])
    net = nn.Sequential(layer, nn.Flatten(), nn.LazyLinear(2))
    net(x)
    net.requires_grad_(True)  # even an explicit unfreeze must not reach the whitening
    opt = torch.optim.SGD(net.parameters(), lr=0.1, momentum=0.9, weight_decay=0.1)
    before = layer.weight.clone()
    head_before = net[2].weight.detach().clone()
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(net(x), torch.zeros(len(x), dtype=torch.long)).backward()
        opt.step()
    assert torch.equal(layer.weight, before)
    assert not torch.equal(net[2].weight, head_before)


def test_uninitialized_layer_extracts_raw_patches():
    x = smooth_images(n=4)
    layer = PatchWhitening(3, patch_size=2, with_negatives=False)
    assert not layer.initialized
    feats = layer(x).double().permute(0, 2, 3, 1).reshape(-1, 12).numpy()
    np.testing.assert_allclose(feats, numpy_patches(x, 2), atol=1e-6)


def test_padding_keeps_spatial_size():
    layer = PatchWhitening(1, patch_size=3, padding=1, with_negatives=False)
    assert layer(torch.rand(2, 1, 8, 8)).shape == (2, 9, 8, 8)


def test_state_round_trip_keeps_initialized_flag():
    layer = PatchWhitening(3).adapt([smooth_images()[:32]])
    buffer = io.BytesIO()
    torch.save(layer.state_dict(), buffer)
    buffer.seek(0)
    fresh = PatchWhitening(3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.initialized
    assert torch.equal(fresh.weight, layer.weight)


def test_errors():
    with pytest.raises(ValueError, match="adapt needs images N x 3"):
        PatchWhitening(3).adapt([torch.rand(4, 1, 8, 8)])
    with pytest.raises(ValueError, match="patch_size"):
        PatchWhitening(3, patch_size=0)
