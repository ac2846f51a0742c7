"""The scaling experiment reproduces the lecture's claims at a small size."""

import matplotlib.image as mpimg
import numpy as np
import pytest

from dnn_tricks.experiments.scaling import gradient_descent, make_case, run_scaling_experiment


@pytest.fixture(scope="module")
def rows(tmp_path_factory):
    out = tmp_path_factory.mktemp("scaling")
    result = run_scaling_experiment(n=300, d=5, tol=1e-6, cap=500, rho=0.99, out=out)
    return {(r["case"], r["inputs"]): r for r in result}, out


def test_standardizing_fixes_scales_but_not_correlations(rows):
    table, _ = rows
    assert table["independent", "raw"]["condition_number"] > 1e6
    assert table["independent", "raw"]["iterations"] is None  # > cap
    assert table["independent", "standardized"]["condition_number"] < 2
    assert table["independent", "standardized"]["iterations"] <= 10
    # correlated features of equal scale: standardizing leaves kappa (and GD) where it was
    raw, std = table["correlated", "raw"], table["correlated", "standardized"]
    assert std["condition_number"] == pytest.approx(raw["condition_number"], rel=0.05)
    assert std["condition_number"] > 100 and std["iterations"] is None


def test_whitening_fixes_both(rows):
    table, _ = rows
    for case in ("independent", "correlated"):
        white = table[case, "whitened (zca)"]
        assert white["condition_number"] == pytest.approx(1.0, abs=1e-8)
        assert white["iterations"] == 1


def test_iterations_respect_the_convergence_bound(rows):
    table, _ = rows
    for r in table.values():
        if r["iterations"] is not None:
            assert r["iterations"] <= r["bound"]
        else:
            assert r["bound"] > r["cap"]


def test_gradient_descent_finds_the_least_squares_solution():
    x, y = make_case("correlated", 200, 3, (1e-2, 1e2), 0.5, seed=1)
    res = gradient_descent(x, y, tol=1e-12, cap=10_000)
    np.testing.assert_allclose(res["w_star"], np.linalg.lstsq(x, y, rcond=None)[0], rtol=1e-8)
    np.testing.assert_allclose(res["path"][-1], res["w_star"], rtol=1e-4)


def test_writes_table_and_figure(rows):
    _, out = rows
    table = (out / "scaling.md").read_text()
    assert "| independent | raw |" in table and ">500" in table
    assert mpimg.imread(out / "scaling.png").shape[:2] == (800, 1200)
