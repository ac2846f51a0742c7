"""``trainer prepare-data --config C --out DIR``: the config's train, val and test splits,
from any source, written as LitData chunks for ``data.source: streaming``.

Images are stored at the evaluation size (``data.image_size``: short side resized, centre
cropped) as uint8, tabular rows as float32; the splits are the config's own (same seed,
fractions and train_subset), so a streaming run sees exactly the samples an in-memory or
image-folder run of the same config would. Copy DIR to an object store (``s3://...``) to
stream it from there.
"""

from __future__ import annotations

import argparse


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(
        prog="trainer prepare-data",
        description="Write the config's splits as LitData chunks for data.source: streaming. "
        "Other arguments (--config, --data.*) are read as by `trainer fit`.",
    )
    parser.add_argument("--out", required=True, help="new (or empty) folder for the chunks")
    parser.add_argument("--workers", type=int, default=1, help="processes writing chunks")
    parser.add_argument("--chunk_bytes", default="64MB", help="size of one chunk file")
    known, rest = parser.parse_known_args(argv)
    if known.workers < 1:
        raise ValueError(f"--workers={known.workers} must be at least 1")

    from dnn_tricks.app import TrainerCLI
    from dnn_tricks.data.streaming import write_chunks

    datamodule = TrainerCLI(args=rest, run=False).datamodule
    meta = write_chunks(datamodule, known.out, known.workers, known.chunk_bytes)
    counts = ", ".join(f"{split} {n}" for split, n in meta["counts"].items())
    print(
        f"wrote {meta['source']} to {known.out} ({counts}; input {meta['input_shape']}); "
        f"train from it with --data.source=streaming --data.root={known.out}"
    )
