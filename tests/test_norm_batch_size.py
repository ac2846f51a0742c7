"""The norm-vs-batch-size experiment, run tiny on the embedded digits data."""

from __future__ import annotations

import pytest

from dnn_tricks.experiments.norm_batch_size import REFERENCE_BATCH, markdown_table, run

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def test_tiny_run_writes_the_table_and_the_plot(tmp_path):
    rows = run(
        batch_sizes=(8, 4),
        norms=("batch", "group"),
        epochs=1,
        train_size=64,
        base_lr=0.1,
        out=tmp_path,
        source="digits",
        root=None,
        channels=(8, 16),
        limit_test_batches=1,
    )
    assert [(r["norm"], r["batch_size"]) for r in rows] == [
        ("batch", 8),
        ("group", 8),
        ("batch", 4),
        ("group", 4),
    ]
    for r in rows:
        # Same epochs over the same 64 images: every batch size sees the same samples.
        assert r["steps"] == 64 // r["batch_size"] and r["samples_seen"] == 64
        assert r["lr"] == pytest.approx(0.1 * r["batch_size"] / REFERENCE_BATCH)  # linear rule
        assert 0.0 <= r["test_acc"] <= 1.0
        assert r["test_error"] == pytest.approx(100 * (1 - r["test_acc"]))
    table = (tmp_path / "results.md").read_text()
    assert "| norm | bs 8 | bs 4 |" in table
    for norm in ("batch", "group"):
        errors = [f"{r['test_error']:.2f}" for r in rows if r["norm"] == norm]
        assert f"| {norm} | {errors[0]} | {errors[1]} |" in table
    assert (tmp_path / "error_vs_batch_size.png").read_bytes().startswith(PNG_MAGIC)


def test_table_puts_norms_in_rows_and_batch_sizes_in_descending_columns():
    def row(norm, bs, acc):
        return {
            "norm": norm,
            "batch_size": bs,
            "lr": 0.1,
            "epochs": 1,
            "steps": 10,
            "samples_seen": 10 * bs,
            "test_acc": acc,
            "test_error": 100 * (1 - acc),
            "train_seconds": 1.0,
        }

    rows = [row("batch", 2, 0.5), row("layer", 32, 0.875), row("batch", 32, 0.9)]
    table = markdown_table(rows)
    assert "| norm | bs 32 | bs 2 |" in table
    assert "| batch | 10.00 | 50.00 |" in table
    assert "| layer | 12.50 |  |" in table  # a missing run leaves its cell empty
