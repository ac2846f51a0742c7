"""Fit time and peak memory: streaming InputNormalizer(zca_whiten) vs sklearn PCA(whiten=True).

    python benchmarks/normalize_fit.py [--repeats 3] [--batch-size 4096]

Data: Fashion-MNIST's 60000 x 784 train images, read from the IDX .gz as uint8 in memory.
Every method starts from those uint8 pixels and ends with a fitted whitening transform, so
the float conversion counts: ours converts batch by batch (to float64, pixel / 255), sklearn
needs the whole float array first (float32 and float64 shown; sklearn would cast uint8 input
to float64). sklearn picks its "covariance_eigh" solver here (X^T X, then eigh), the same
work as ours, but in the input's precision and without streaming.

How measured: each run is a fresh subprocess (no allocator reuse between methods), with a
small warm-up fit first so library loading and BLAS buffers are not counted. Then the
kernel's peak-RSS mark is reset (write 5 to /proc/self/clear_refs); peak memory = VmHWM after
the fit minus VmRSS before it: every allocation (torch, numpy, BLAS), not only the Python
ones tracemalloc sees. Time = wall clock of the fit, median over --repeats interleaved runs.
Accuracy: largest relative error of the covariance eigenvalues (above 1e-12 of the largest)
against a two-pass float64 np.cov of the same pixels.
"""

from __future__ import annotations

import argparse
import gzip
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

DATA = Path("/usr/share/datasets/fashion-mnist/train-images-idx3-ubyte.gz")
METHODS = ("ours_zca_whiten", "sklearn_pca_whiten_f32", "sklearn_pca_whiten_f64")


def load_images(path: Path = DATA):
    import numpy as np

    with gzip.open(path, "rb") as f:
        raw = f.read()
    n, rows, cols = (int.from_bytes(raw[i : i + 4], "big") for i in (4, 8, 12))
    # copy: frombuffer over bytes is read-only, which torch.from_numpy warns about
    return np.frombuffer(raw, dtype=np.uint8, offset=16).reshape(n, rows * cols).copy()


def proc_status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise KeyError(field)


def run_child(method: str, batch_size: int) -> dict:
    import numpy as np
    import torch
    from sklearn.decomposition import PCA

    from dnn_tricks.models.input_norm import InputNormalizer

    def fit(pixels: np.ndarray) -> list[float]:
        """uint8 pixels -> fitted whitening; returns the covariance eigenvalues (descending)."""
        if method == "ours_zca_whiten":
            batches = (
                torch.from_numpy(pixels[i : i + batch_size]).double().div_(255)
                for i in range(0, len(pixels), batch_size)
            )
            return InputNormalizer("zca_whiten").adapt(batches).eigenvalues_before.tolist()
        dtype = np.float32 if method.endswith("f32") else np.float64
        return PCA(whiten=True).fit(pixels.astype(dtype) / dtype(255)).explained_variance_.tolist()

    pixels = load_images()
    fit(pixels[:2000])  # warm-up: library loading and BLAS buffers are not the method's cost
    rss_before = proc_status_kib("VmRSS")
    Path("/proc/self/clear_refs").write_text("5")  # reset VmHWM to the current RSS
    start = time.perf_counter()
    eigenvalues = fit(pixels)
    seconds = time.perf_counter() - start
    peak_mib = (proc_status_kib("VmHWM") - rss_before) / 1024
    return {"method": method, "seconds": seconds, "peak_mib": peak_mib, "eig": eigenvalues}


def eigenvalue_error(eig: list[float], ref) -> float:
    """Largest relative error over eigenvalues above 1e-12 of the top (the ones whitened)."""
    import numpy as np

    eig, keep = np.asarray(eig), ref > 1e-12 * ref[0]
    return float(np.max(np.abs(eig[keep] - ref[keep]) / ref[keep]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--child", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(run_child(args.child, args.batch_size)))
        return
    runs: dict[str, list[dict]] = {m: [] for m in METHODS}
    for _ in range(args.repeats):
        for method in METHODS:  # interleaved, so load drift hits every method alike
            cmd = [
                sys.executable,
                __file__,
                "--child",
                method,
                "--batch-size",
                str(args.batch_size),
            ]
            out = subprocess.run(cmd, check=True, capture_output=True, text=True).stdout
            runs[method].append(json.loads(out.strip().splitlines()[-1]))
    med = {
        m: (
            statistics.median(r["seconds"] for r in rs),
            statistics.median(r["peak_mib"] for r in rs),
        )
        for m, rs in runs.items()
    }
    # exact reference: two-pass float64 covariance (centre first, then multiply)
    import numpy as np

    x = load_images() / 255.0
    ref = np.linalg.eigvalsh(np.cov(x.T))[::-1]
    ours_s, ours_mib = med["ours_zca_whiten"]
    print(
        f"Fashion-MNIST 60000 x 784, median of {args.repeats} runs, ours in batches of "
        f"{args.batch_size}; cond(cov) = {ref[0] / ref[ref > 1e-12 * ref[0]][-1]:.3g}"
    )
    head = f"{'method':24s} {'fit s':>7s} {'peak MiB':>9s} {'ours/it: time':>14s} {'memory':>7s}"
    print(head + f" {'max rel. eigenvalue error':>26s}")
    for m, (sec, mib) in med.items():
        err = eigenvalue_error(runs[m][0]["eig"], ref)
        print(
            f"{m:24s} {sec:7.2f} {mib:9.1f} {ours_s / sec:14.2f} {ours_mib / mib:7.2f} {err:26.2e}"
        )


if __name__ == "__main__":
    main()
