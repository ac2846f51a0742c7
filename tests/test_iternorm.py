"""IterNorm against NumPy re-computations of Huang et al. (2019), Algorithm 1."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from dnn_tricks.models.iternorm import IterNorm, newton_inverse_sqrt
from dnn_tricks.models.layers import create_norm_layer


def _correlated(n: int, d: int, condition: float, seed: int = 0) -> torch.Tensor:
    """n float64 samples whose covariance has eigenvalues spread over ``condition``."""
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    scales = torch.logspace(0, -np.log10(condition), d, dtype=torch.float64).sqrt()
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ (q * scales) @ q.T + 2.0


def _paper_whitening(x: np.ndarray, eps: float, T: int) -> np.ndarray:
    """The paper's literal recursion P <- 1.5 P - 0.5 P^3 Sigma_N on one group (d x m)."""
    centred = x - x.mean(axis=1, keepdims=True)
    sigma = centred @ centred.T / x.shape[1] + eps * np.eye(x.shape[0])
    trace = np.trace(sigma)
    sigma_n = sigma / trace
    p = np.eye(x.shape[0])
    for _ in range(T):
        p = 1.5 * p - 0.5 * np.linalg.matrix_power(p, 3) @ sigma_n
    return p / np.sqrt(trace)


def _group_covariances(y: torch.Tensor, groups: int) -> torch.Tensor:
    """Biased covariance of each channel group of a (N, C) output: (G, d, d)."""
    c = y - y.mean(0)
    cov = c.T @ c / y.shape[0]
    d = y.shape[1] // groups
    return torch.stack([cov[i * d : (i + 1) * d, i * d : (i + 1) * d] for i in range(groups)])


def test_whitening_matrix_matches_the_papers_recursion():
    x = _correlated(300, 6, condition=50.0)
    layer = IterNorm(6, num_groups=2, T=5, eps=1e-5, momentum=1.0, affine=False).double()
    layer(x)  # momentum 1 stores exactly this batch's whitening matrix
    for g in range(2):
        expected = _paper_whitening(x[:, 3 * g : 3 * g + 3].T.numpy(), 1e-5, 5)
        np.testing.assert_allclose(layer.running_whiten[g].numpy(), expected, rtol=1e-10)


def test_output_spectrum_follows_the_scalar_newton_recursion():
    # W and Sigma share eigenvectors, so each eigenvalue l of the batch covariance becomes
    # p_T(l_N)^2 * l / tr with p_{k+1} = 1.5 p - 0.5 p^3 l_N: partial whitening is exact
    # and predictable, not noise.
    eps, T = 1e-5, 5
    x = _correlated(500, 8, condition=10.0)
    y = IterNorm(8, num_groups=1, T=T, eps=eps, affine=False).double()(x)
    lam = np.linalg.eigvalsh(np.cov(x.T.numpy(), bias=True))
    trace = (lam + eps).sum()
    lam_n = (lam + eps) / trace
    p = np.ones_like(lam)
    for _ in range(T):
        p = 1.5 * p - 0.5 * p**3 * lam_n
    expected = np.sort(p**2 * lam / trace)
    got = np.linalg.eigvalsh(_group_covariances(y, 1)[0].numpy())
    np.testing.assert_allclose(got, expected, rtol=1e-8)


def test_each_group_is_whitened_more_with_more_iterations():
    x = _correlated(2000, 16, condition=10.0, seed=1)
    eye = torch.eye(4, dtype=torch.float64)
    errors = {}
    for T in (1, 3, 5, 10, 30):
        y = IterNorm(16, num_groups=4, T=T, affine=False).double()(x)
        errors[T] = (_group_covariances(y, 4) - eye).abs().amax().item()
    assert errors[1] > errors[3] > errors[5] > errors[10]
    # Measured on this data: 0.65 at T=1, 0.15 at T=3, 1e-3 at T=5 (the paper's default
    # whitens approximately), 4e-5 from T=10 on, which is the eps added to Sigma.
    assert errors[5] < 0.01
    assert errors[30] < 1e-4


def test_many_iterations_converge_to_the_inverse_square_root_even_when_ill_conditioned():
    x = _correlated(400, 8, condition=1e4, seed=2)
    c = x - x.mean(0)
    sigma = (c.T @ c / 400)[None]
    w = newton_inverse_sqrt(sigma, 60)[0].numpy()
    lam, vec = np.linalg.eigh(sigma[0].numpy())
    np.testing.assert_allclose(w, vec @ np.diag(lam**-0.5) @ vec.T, rtol=1e-6, atol=1e-6)


def test_conv_features_count_every_position_as_a_sample():
    x = torch.randn(4, 8, 3, 5, dtype=torch.float64)
    conv = IterNorm(8, num_groups=2, affine=False).double()
    flat = IterNorm(8, num_groups=2, affine=False).double()
    rows = x.permute(0, 2, 3, 1).reshape(-1, 8)
    expected = flat(rows).reshape(4, 3, 5, 8).permute(0, 3, 1, 2)
    torch.testing.assert_close(conv(x), expected)
    torch.testing.assert_close(conv.running_whiten, flat.running_whiten)


def test_running_statistics_follow_the_batchnorm_momentum_formula():
    m = 0.3
    layer = IterNorm(4, num_groups=2, T=5, momentum=m).double()
    mean = np.zeros(4)
    whiten = np.stack([np.eye(2), np.eye(2)])
    for seed in range(3):
        x = _correlated(64, 4, condition=5.0, seed=seed)
        layer(x)
        mean = (1 - m) * mean + m * x.mean(0).numpy()
        batch = [_paper_whitening(x[:, 2 * g : 2 * g + 2].T.numpy(), 1e-5, 5) for g in range(2)]
        whiten = (1 - m) * whiten + m * np.stack(batch)
    np.testing.assert_allclose(layer.running_mean.numpy(), mean, rtol=1e-10)
    np.testing.assert_allclose(layer.running_whiten.numpy(), whiten, rtol=1e-9)


def test_eval_uses_running_statistics_and_ignores_batch_mates():
    layer = IterNorm(6, num_groups=3).double()
    for seed in range(5):
        layer(_correlated(32, 6, condition=5.0, seed=seed))
    with torch.no_grad():
        layer.weight.uniform_(0.5, 2.0)
        layer.bias.uniform_(-1.0, 1.0)
    layer.eval()
    x = _correlated(10, 6, condition=5.0, seed=9)
    batch_out = layer(x)
    torch.testing.assert_close(layer(x[3:4]), batch_out[3:4])
    torch.testing.assert_close(layer(x), batch_out)  # deterministic
    centred = (x - layer.running_mean).reshape(10, 3, 2)
    white = torch.einsum("gij,ngj->ngi", layer.running_whiten, centred).reshape(10, 6)
    torch.testing.assert_close(batch_out, white * layer.weight + layer.bias)


def test_gradients_match_finite_differences():
    layer = IterNorm(4, num_groups=2, T=3).double()
    x = torch.randn(6, 4, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x,))
    x4 = torch.randn(2, 4, 2, 2, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(layer, (x4,))


def test_float32_affine_layer_from_the_registry_trains():
    layer = create_norm_layer("iter", 32, spatial=True, num_groups=8)
    assert isinstance(layer, IterNorm) and layer.group_size == 4
    y = layer(torch.randn(4, 32, 6, 6))
    y.square().mean().backward()
    assert y.dtype == torch.float32
    assert layer.weight.grad is not None and torch.isfinite(layer.weight.grad).all()


def test_bad_configuration_and_inputs_raise_clear_errors():
    with pytest.raises(ValueError, match="num_groups=3 does not divide num_features=8"):
        IterNorm(8, num_groups=3)
    with pytest.raises(ValueError, match="more than one value per channel"):
        IterNorm(8)(torch.randn(1, 8))
    with pytest.raises(ValueError, match=r"expects \(N, 8\)"):
        IterNorm(8)(torch.randn(4, 6))
