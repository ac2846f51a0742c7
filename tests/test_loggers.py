"""The TensorBoard logger's flush interval, read back with TensorBoard's own event reader: with
a long interval the first save flushes and later ones within the interval do not, and the end
of the run writes every point; with 0 every save flushes, as Lightning's logger does, and each
point is on disk right after its save."""

from __future__ import annotations

from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

from dnn_tricks.loggers import TensorBoardLogger


def _points(log_dir: str) -> list[tuple[int, float]]:
    events = EventAccumulator(log_dir)
    events.Reload()
    if "loss" not in events.Tags()["scalars"]:
        return []
    return [(e.step, e.value) for e in events.Scalars("loss")]


def _log_three(logger: TensorBoardLogger) -> tuple[list[int], list[list[tuple[int, float]]]]:
    """Flushes so far and the points on disk after each of three log-and-save calls (what
    Lightning does at every log step)."""
    writer = logger.experiment
    flushes, flush = [0], writer.flush

    def counted_flush() -> None:
        flushes[0] += 1
        flush()

    writer.flush = counted_flush
    counts, seen = [], []
    for step in range(3):
        logger.log_metrics({"loss": 1.0 / (step + 1)}, step=step)
        logger.save()
        counts.append(flushes[0])
        seen.append(_points(logger.log_dir))
    return counts, seen


def test_a_long_interval_flushes_once_and_the_end_writes_everything(tmp_path: Path):
    logger = TensorBoardLogger(save_dir=tmp_path, name="run", flush_every_s=3600)
    counts, seen = _log_three(logger)
    assert counts == [1, 1, 1] and seen[0] == [(0, 1.0)]
    logger.finalize("success")
    assert _points(logger.log_dir) == [(0, 1.0), (1, 0.5), (2, pytest.approx(1.0 / 3.0))]
    assert (Path(logger.log_dir) / "hparams.yaml").exists()


def test_zero_flushes_after_every_logging_call(tmp_path: Path):
    logger = TensorBoardLogger(save_dir=tmp_path, name="run", flush_every_s=0)
    counts, seen = _log_three(logger)
    assert counts == [1, 2, 3]
    assert [len(points) for points in seen] == [1, 2, 3]
    logger.finalize("success")
