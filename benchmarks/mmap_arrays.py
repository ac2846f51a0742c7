"""Memory-mapped arrays train with flat memory: anonymous memory of a process that splits
and streams one epoch of a float32 x.npy much larger than the memory it uses.

The file's pages are page cache (the kernel drops them under pressure), not the process's
own memory, so what is measured is RssAnon: before, after the split, and its peak over the
epoch and over the input-normalization pass (``raw_batches``). What does grow with the row
count are the split indices (8 bytes per row and split).

    .venv/bin/python benchmarks/mmap_arrays.py [--rows 1000000] [--features 256]
        [--dir /tmp/dnn_tricks_mmap]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402


def anon_mib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1]) // 1024
    return 0


def write(folder: Path, rows: int, features: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "y.npy").exists():
        return
    x = np.lib.format.open_memmap(folder / "x.npy", "w+", np.float32, (rows, features))
    rng = np.random.default_rng(0)
    for start in range(0, rows, 100_000):
        stop = min(rows, start + 100_000)
        x[start:stop] = rng.normal(size=(stop - start, features)).astype(np.float32)
    x.flush()
    del x
    np.save(folder / "y.npy", (np.arange(rows) % 10).astype(np.int64))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--features", type=int, default=256)
    parser.add_argument("--batch", type=int, default=4096)
    parser.add_argument("--dir", type=Path, default=Path("/tmp/dnn_tricks_mmap"))
    args = parser.parse_args()
    folder = args.dir / f"{args.rows}x{args.features}"
    write(folder, args.rows, args.features)

    import torch

    from dnn_tricks.data.datamodule import DataModule

    torch.set_num_threads(1)
    size_mib = (folder / "x.npy").stat().st_size // 2**20
    before = anon_mib()
    data = DataModule(source="arrays", root=str(folder), batch_size=args.batch)
    start = time.perf_counter()
    data.setup("fit")
    split_s, after_split = time.perf_counter() - start, anon_mib()
    epoch_peak, start = after_split, time.perf_counter()
    for _ in data.train_dataloader():
        epoch_peak = max(epoch_peak, anon_mib())
    epoch_s = time.perf_counter() - start
    fit_peak = after_split
    for _ in data.raw_batches("train"):
        fit_peak = max(fit_peak, anon_mib())
    print(f"x.npy: {args.rows} x {args.features} float32 = {size_mib} MiB, memory-mapped")
    print("| | anonymous memory | time |")
    print("|---|---|---|")
    print(f"| before | {before} MiB | |")
    print(f"| after the split | {after_split} MiB | {split_s:.1f} s |")
    print(f"| peak over one epoch (batch {args.batch}) | {epoch_peak} MiB | {epoch_s:.1f} s |")
    print(f"| peak over the normalizer's pass | {fit_peak} MiB | |")
    print(f"growth over the file size: {(epoch_peak - before) / size_mib:.3f}")


if __name__ == "__main__":
    main()
