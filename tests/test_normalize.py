"""InputNormalizer against scikit-learn / NumPy references, streaming, state and errors."""

import io

import numpy as np
import pytest
import torch
from sklearn.decomposition import PCA
from sklearn.preprocessing import StandardScaler

from dnn_tricks.linalg import (
    condition_number,
    whitening_matrix,
)
from dnn_tricks.models.input_norm import (
    KINDS,
    InputNormalizer,
    NormalizeConfig,
)

FITTED_KINDS = [k for k in KINDS if k != "none"]


def correlated(n: int = 400, d: int = 6, offset: float = 0.0, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    mix = torch.randn(d, d, generator=g, dtype=torch.float64)
    return torch.randn(n, d, generator=g, dtype=torch.float64) @ mix + offset


def np_cond(cov: np.ndarray) -> float:
    lam = np.linalg.eigvalsh(cov)
    lam = lam[lam > 1e-12 * lam.max()]
    return lam.max() / lam.min()


def match_signs(y: np.ndarray, ref: np.ndarray) -> np.ndarray:
    """Flip each column of y to the sign of ref's (eigenvector signs are arbitrary)."""
    return y * np.sign((y * ref).sum(0))


def test_standardize_matches_sklearn_with_constant_feature():
    x = correlated()
    x[:, 2] = 3.0  # zero variance: sklearn keeps scale 1, so the output is 0, not nan
    norm = InputNormalizer("standardize", eps=0.0).adapt(x.split(64))
    ref = StandardScaler().fit(x.numpy())
    np.testing.assert_allclose(norm(x).numpy(), ref.transform(x.numpy()), atol=1e-12)
    assert norm.scale[2] == 1.0


def test_per_channel_standardize_images_matches_numpy():
    x = torch.rand(40, 3, 5, 5, dtype=torch.float64) * torch.tensor([1.0, 5.0, 0.1]).view(
        1, 3, 1, 1
    )
    y = InputNormalizer("standardize", eps=0.0).adapt(x.split(16))(x)
    a = x.numpy()
    ref = (a - a.mean((0, 2, 3), keepdims=True)) / a.std((0, 2, 3), keepdims=True)
    np.testing.assert_allclose(y.numpy(), ref, atol=1e-12)


def test_per_pixel_center_images_matches_numpy():
    x = torch.rand(30, 2, 4, 4, dtype=torch.float64)
    y = InputNormalizer("center", per_channel=False).adapt([x])(x)
    np.testing.assert_allclose(y.numpy(), x.numpy() - x.numpy().mean(0), atol=1e-14)


def test_pca_whiten_matches_sklearn_up_to_sign():
    x = correlated(offset=2.0)
    y = InputNormalizer("pca_whiten", eps=0.0).adapt(x.split(50))(x).numpy()
    # svd_solver="full" centres before the SVD: the exact reference
    ref = PCA(whiten=True, svd_solver="full").fit(x.numpy()).transform(x.numpy())
    np.testing.assert_allclose(match_signs(y, ref), ref, atol=1e-10)


def test_pca_matches_sklearn_and_orders_by_variance():
    x = correlated()
    y = InputNormalizer("pca").adapt(x.split(50))(x).numpy()
    ref = PCA(svd_solver="full").fit(x.numpy()).transform(x.numpy())
    np.testing.assert_allclose(match_signs(y, ref), ref, atol=1e-10)
    assert np.all(np.diff(y.var(0)) <= 0)


def test_zca_whitens_and_is_the_closest_whitening():
    x = correlated(offset=1.0)
    zca = InputNormalizer("zca_whiten", eps=0.0).adapt(x.split(50))
    y = zca(x).numpy()
    np.testing.assert_allclose(np.cov(y.T), np.eye(x.shape[1]), atol=1e-10)
    np.testing.assert_allclose(zca.weight.numpy(), zca.weight.numpy().T, atol=1e-12)
    xc = x.numpy() - x.numpy().mean(0)
    y_pca = InputNormalizer("pca_whiten", eps=0.0).adapt([x])(x).numpy()
    assert ((y - xc) ** 2).sum(1).mean() < ((y_pca - xc) ** 2).sum(1).mean()


def test_eps_is_added_to_the_eigenvalues():
    x = correlated()
    eps = 0.5
    y = InputNormalizer("zca_whiten", eps=eps).adapt([x])(x).numpy()
    lam = np.linalg.eigvalsh(np.cov(x.numpy().T))
    np.testing.assert_allclose(np.sort(np.linalg.eigvalsh(np.cov(y.T))), lam / (lam + eps))


@pytest.mark.parametrize("kind", ["standardize", "zca_whiten", "pca_whiten"])
def test_large_offset_is_exact(kind):
    # mean 1e4 x the spread: a one-pass sum-of-squares would lose about 8 digits here
    x = correlated(offset=0.0)
    shifted = x + 1e4 * x.std()
    far = InputNormalizer(kind, eps=0.0).adapt(shifted.split(33))
    near = InputNormalizer(kind, eps=0.0).adapt([x])
    np.testing.assert_allclose(far(shifted).numpy(), near(x).numpy(), atol=1e-8)
    lam_ref = np.linalg.eigvalsh(np.cov(x.numpy().T))[::-1]
    np.testing.assert_allclose(far.eigenvalues_before.numpy(), lam_ref, rtol=1e-9)


@pytest.mark.parametrize("kind", FITTED_KINDS)
@pytest.mark.parametrize("per_channel", [True, False])
def test_chunked_fit_equals_whole_fit(kind, per_channel):
    x = torch.randn(101, 2, 3, 3, dtype=torch.float64) * 3 + 7
    sizes = [1, 50, 7, 43]
    whole = InputNormalizer(kind, per_channel=per_channel).adapt([x])
    chunked = InputNormalizer(kind, per_channel=per_channel).adapt(x.split(sizes))
    for name, buf in whole.state_dict().items():
        torch.testing.assert_close(chunked.state_dict()[name], buf, rtol=1e-10, atol=1e-12)


def test_condition_numbers_match_numpy():
    x = correlated()
    x[:, 0] *= 100.0
    x = torch.cat([x, torch.zeros(len(x), 1, dtype=x.dtype)], 1)  # a constant "pixel"
    cov = np.cov(x.numpy().T)
    for kind in ["standardize", "zca_whiten", "center"]:
        norm = InputNormalizer(kind, eps=0.0).adapt(x.split(100))
        before, after = norm.condition_numbers()
        assert before == pytest.approx(np_cond(cov), rel=1e-8)
        # "after" is analytic; check it against the covariance of the actual outputs
        assert after == pytest.approx(np_cond(np.cov(norm(x).numpy().T)), rel=1e-6)
    assert InputNormalizer("zca_whiten", eps=0.0).adapt([x]).condition_numbers()[1] == (
        pytest.approx(1.0)
    )


def test_per_channel_conditioning_uses_the_full_pixel_covariance():
    x = torch.rand(60, 2, 3, 3, dtype=torch.float64)
    norm = InputNormalizer("standardize", eps=0.0).adapt([x])
    flat = x.reshape(60, -1).numpy()
    assert norm.condition_numbers()[0] == pytest.approx(np_cond(np.cov(flat.T)), rel=1e-8)
    out = norm(x).reshape(60, -1).numpy()
    assert norm.condition_numbers()[1] == pytest.approx(np_cond(np.cov(out.T)), rel=1e-6)


def test_report_skipped_above_report_max_dim():
    x = torch.rand(20, 3, 4, 4, dtype=torch.float64)
    norm = InputNormalizer("standardize", report_max_dim=10).adapt([x])
    assert all(np.isnan(c) for c in norm.condition_numbers())
    assert norm(x).shape == x.shape


def test_condition_number_floor():
    assert condition_number(torch.tensor([4.0, 2.0, 1e-20])) == 2.0
    assert np.isnan(condition_number(torch.zeros(3)))


def test_whitening_matrix_whitens_a_covariance():
    cov = torch.cov(correlated().T)
    for kind in ["pca_whiten", "zca_whiten"]:
        w = whitening_matrix(cov, kind, eps=0.0)
        torch.testing.assert_close(w @ cov @ w.T, torch.eye(len(cov), dtype=cov.dtype))


@pytest.mark.parametrize("kind", KINDS)
def test_state_dict_round_trip_into_fresh_module(kind):
    x = torch.randn(30, 3, 4, 4) + 2
    norm = InputNormalizer(kind, eps=1e-3).adapt(x.split(8))
    buffer = io.BytesIO()
    torch.save(norm.state_dict(), buffer)
    buffer.seek(0)
    fresh = InputNormalizer(kind, eps=1e-3)
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.fitted
    torch.testing.assert_close(fresh(x), norm(x))
    assert fresh.condition_numbers() == pytest.approx(norm.condition_numbers(), nan_ok=True)


@pytest.mark.parametrize(
    "other",
    [{"kind": "zca_whiten"}, {"per_channel": False}, {"eps": 1e-1}],
)
def test_loading_a_state_fitted_with_other_settings_raises(other):
    state = InputNormalizer("standardize", eps=1e-5).adapt([torch.rand(10, 4)]).state_dict()
    settings = {"kind": "standardize", "eps": 1e-5, "per_channel": True} | other
    with pytest.raises(ValueError, match=f"model.input_norm.{next(iter(other))}"):
        InputNormalizer(**settings).load_state_dict(state)


def test_forward_keeps_dtype_and_matches_float64():
    x = correlated().float()
    norm = InputNormalizer("zca_whiten").adapt([x])
    y = norm(x)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm(x.double()).float(), atol=1e-4, rtol=1e-4)


def test_errors():
    with pytest.raises(ValueError, match="input_norm is not fitted.*--ckpt_path"):
        InputNormalizer("standardize")(torch.rand(2, 3))
    with pytest.raises(ValueError, match=r"input_norm.kind='foo' is unknown.*zca_whiten"):
        InputNormalizer("foo")
    with pytest.raises(ValueError, match="input_norm.eps"):
        InputNormalizer(eps=-1.0)
    norm = InputNormalizer("center").adapt([torch.rand(5, 3)])
    with pytest.raises(ValueError, match="shape"):
        norm(torch.rand(5, 4))
    with pytest.raises(ValueError, match="no batches"):
        InputNormalizer().adapt([])
    x = torch.rand(4, 3)
    assert InputNormalizer("none")(x) is x  # identity needs no fit


def test_from_config():
    norm = InputNormalizer.from_config(NormalizeConfig(kind="pca", eps=0.1, per_channel=False))
    assert (norm.kind, norm.eps, norm.per_channel) == ("pca", 0.1, False)
