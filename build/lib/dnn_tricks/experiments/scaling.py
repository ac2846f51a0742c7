"""The lecture's input-scaling experiment: gradient descent on least squares, with raw,
standardized and whitened (ZCA) inputs, for (a) independent features whose scales span
1e-2..1e2 and (b) strongly correlated features of similar scale.

    python -m dnn_tricks.experiments.scaling [--out logs/scaling]

Claim checked: the iterations GD needs grow with the Hessian's condition number kappa;
standardizing fixes unequal scales (a) but not correlations (b); whitening fixes both.
Writes scaling.md (the table) and scaling.png (loss contours and GD paths) under --out.
"""

from __future__ import annotations

import argparse
import math
from pathlib import Path

import numpy as np
import torch

from dnn_tricks.linalg import condition_number
from dnn_tricks.models.input_norm import InputNormalizer

INPUTS = {"raw": None, "standardized": "standardize", "whitened (zca)": "zca_whiten"}


def make_case(
    case: str, n: int, d: int, scale_range: tuple[float, float], rho: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Zero-mean features X (n x d) and centred targets y = linear in X plus small noise."""
    rng = np.random.default_rng(seed)
    z = rng.standard_normal((n, d))
    if case == "independent":
        x = z * np.logspace(math.log10(scale_range[0]), math.log10(scale_range[1]), d)
    elif case == "correlated":
        cov = (1 - rho) * np.eye(d) + rho * np.ones((d, d))  # kappa = (1 + (d-1) rho) / (1 - rho)
        x = z @ np.linalg.cholesky(cov).T
    else:
        raise ValueError(f"case={case!r} is unknown; choose independent or correlated")
    y = z @ rng.standard_normal(d) + 0.1 * rng.standard_normal(n)
    return x, y - y.mean()


def transform(x: np.ndarray, kind: str | None) -> np.ndarray:
    """Apply an InputNormalizer fitted on x itself (eps=0: the exact transform)."""
    if kind is None:
        return x
    t = torch.from_numpy(x)
    return InputNormalizer(kind, eps=0.0).adapt([t])(t).numpy()


def gradient_descent(
    x: np.ndarray, y: np.ndarray, tol: float, cap: int, w0: np.ndarray | None = None
) -> dict:
    """GD on f(w) = |Xw - y|^2 / (2n) with the best fixed step 2 / (L + mu).

    For a quadratic, the error evolves as e_{k+1} = (I - eta H) e_k, so each eigen-direction
    contracts by |1 - eta lambda_i|; the worst case over lambda in [mu, L] is smallest when
    |1 - eta mu| = |1 - eta L|, i.e. eta = 2 / (L + mu), giving the rate
    (kappa - 1) / (kappa + 1) (Nesterov 2004, "Introductory Lectures on Convex
    Optimization", Thm 2.1.15). Counts steps until f - f* <= tol (f(w0) - f*).
    """
    n = len(x)
    hessian, b = x.T @ x / n, x.T @ y / n
    lam = np.linalg.eigvalsh(hessian)
    big, small = lam.max(), lam.min()
    step = 2.0 / (big + small)
    w_star = np.linalg.solve(hessian, b)
    w = np.zeros(x.shape[1]) if w0 is None else w0.astype(float)
    path = [w.copy()]
    gap0 = 0.5 * (w - w_star) @ hessian @ (w - w_star)
    iterations = None
    for k in range(1, cap + 1):
        w = w - step * (hessian @ w - b)
        if len(path) < 500:
            path.append(w.copy())
        e = w - w_star
        if 0.5 * e @ hessian @ e <= tol * gap0:
            iterations = k
            break
    kappa = condition_number(torch.from_numpy(lam))
    rate = (kappa - 1) / (kappa + 1)
    # f_k - f* <= rate^(2k) (f_0 - f*), since H commutes with I - eta H
    bound = 1 if rate < 1e-12 else math.ceil(math.log(tol) / (2 * math.log(rate)))
    return {
        "condition_number": kappa,
        "step": step,
        "iterations": iterations,
        "bound": bound,
        "hessian": hessian,
        "w_star": w_star,
        "path": np.array(path),
    }


def run_scaling_experiment(
    n: int = 2000,
    d: int = 10,
    tol: float = 1e-6,
    cap: int = 100_000,
    rho: float = 0.99,
    scale_range: tuple[float, float] = (1e-2, 1e2),
    seed: int = 0,
    out: str | Path | None = None,
) -> list[dict]:
    """Rows {case, inputs, condition_number, step, iterations (None = > cap), bound, cap};
    writes scaling.md and scaling.png under ``out`` when given."""
    rows = []
    for case in ("independent", "correlated"):
        x, y = make_case(case, n, d, scale_range, rho, seed)
        for name, kind in INPUTS.items():
            res = gradient_descent(transform(x, kind), y, tol, cap)
            keys = ("condition_number", "step", "iterations", "bound")
            rows.append({"case": case, "inputs": name, "cap": cap} | {k: res[k] for k in keys})
    if out is not None:
        out = Path(out)
        out.mkdir(parents=True, exist_ok=True)
        settings = dict(n=n, d=d, tol=tol, rho=rho, scale_range=scale_range, seed=seed)
        (out / "scaling.md").write_text(markdown_table(rows, settings))
        plot_contours(out / "scaling.png", scale_range, rho, seed)
    return rows


def markdown_table(rows: list[dict], settings: dict) -> str:
    lines = [
        "| case | inputs | cond(Hessian) | step 2/(L+mu) | GD iterations | bound |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        its = f">{r['cap']}" if r["iterations"] is None else str(r["iterations"])
        lines.append(
            f"| {r['case']} | {r['inputs']} | {r['condition_number']:.3g} | {r['step']:.3g} "
            f"| {its} | {r['bound']} |"
        )
    notes = (
        f"\nLeast squares, {settings}. Iterations until f - f* <= tol (f(0) - f*); bound = "
        "ceil(log(tol) / (2 log((kappa-1)/(kappa+1)))).\n"
    )
    return "\n".join(lines) + "\n" + notes


def plot_contours(path: Path, scale_range: tuple[float, float], rho: float, seed: int) -> None:
    """2-feature versions: loss contours in weight space and the GD path, per input kind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    # milder than the table so both ellipse axes stay visible in one panel
    scales, rho2 = (0.3, 3.0), min(rho, 0.95)
    cases = {
        "independent": make_case("independent", 500, 2, scales, rho2, seed),
        "correlated": make_case("correlated", 500, 2, scale_range, rho2, seed),
    }
    fig, axes = plt.subplots(2, 3, figsize=(12, 8))
    for row, (case, (x, y)) in enumerate(cases.items()):
        for col, (name, kind) in enumerate(INPUTS.items()):
            res = gradient_descent(transform(x, kind), y, tol=1e-6, cap=200)
            ax, w_star, h = axes[row, col], res["w_star"], res["hessian"]
            half = 1.3 * np.abs(w_star).max()
            g1, g2 = np.meshgrid(*(np.linspace(c - half, c + half, 200) for c in w_star))
            e = np.stack([g1 - w_star[0], g2 - w_star[1]], -1)
            gap = 0.5 * np.einsum("...i,ij,...j->...", e, h, e)
            gap0 = 0.5 * w_star @ h @ w_star
            ax.contour(g1, g2, gap, levels=gap0 * np.logspace(-3, 0.5, 10), cmap="viridis")
            ax.plot(*res["path"].T, "r.-", ms=3, lw=0.8)
            ax.set_aspect("equal")
            its = res["iterations"] if res["iterations"] is not None else ">200"
            kappa = res["condition_number"]
            ax.set_title(f"{case}, {name}\nkappa={kappa:.3g}, GD steps={its}", fontsize=9)
            ax.set_xlabel("w1")
            ax.set_ylabel("w2")
    fig.suptitle(f"2 features: independent scales {scales}; correlated rho={rho2}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", default="logs/scaling", help="folder for scaling.md/.png")
    parser.add_argument("--n", type=int, default=2000, help="samples")
    parser.add_argument("--d", type=int, default=10, help="features")
    parser.add_argument("--tol", type=float, default=1e-6, help="relative loss gap to reach")
    parser.add_argument("--cap", type=int, default=100_000, help="most GD iterations")
    parser.add_argument("--rho", type=float, default=0.99, help="correlation in case (b)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    run_scaling_experiment(
        n=args.n, d=args.d, tol=args.tol, cap=args.cap, rho=args.rho, seed=args.seed, out=args.out
    )
    print((Path(args.out) / "scaling.md").read_text())


if __name__ == "__main__":
    main()
