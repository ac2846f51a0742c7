"""Training-step bookkeeping: epoch means equal a hand computation, per-step logging happens
at Lightning's log steps only, and a non-finite loss checked without a host sync (as on an
accelerator) still stops the fit before any checkpoint holds the broken weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest
import torch
from callback_helpers import one_thread
from test_nonfinite import PlantNaNInput

from conftest import CONFIGS, shrink_args
from dnn_tricks.models.step_metrics import EpochSums, NonFiniteGuard


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def test_epoch_sums_are_sample_weighted_means_and_top1_accuracy():
    rng = np.random.default_rng(0)
    sums = EpochSums()
    losses, sizes, correct = [0.5, 2.0, 1.25], [4, 4, 2], 0
    for loss, n in zip(losses, sizes, strict=True):
        logits = torch.from_numpy(rng.normal(size=(n, 3)))
        target = torch.from_numpy(rng.integers(0, 3, size=n))
        correct += int((logits.numpy().argmax(1) == target.numpy()).sum())
        value = torch.tensor(loss, dtype=torch.float64)
        sums.add({"a": value, "b": value, "c": 2 * value}, logits, target)
    means = sums.means(accuracy="acc")
    expected = np.average(losses, weights=sizes)
    assert float(means["a"]) == pytest.approx(expected)
    assert float(means["b"]) == pytest.approx(expected)  # the same tensor under two names
    assert float(means["c"]) == pytest.approx(2 * expected)
    assert float(means["acc"]) == pytest.approx(correct / sum(sizes))
    sums.reset()
    assert sums.means(accuracy="acc") == {}


def test_means_reduced_over_processes_are_over_every_sample():
    """Two processes with unequal batches: the reduced means are the means over the union
    (not the mean of the two processes' means), from one summed tensor."""
    rng = np.random.default_rng(1)
    ranks, pooled_losses, pooled_sizes, pooled_correct = [EpochSums(), EpochSums()], [], [], 0
    for rank, sizes in zip(ranks, ([8, 8, 3], [5]), strict=True):
        for n in sizes:
            logits = torch.from_numpy(rng.normal(size=(n, 4)))
            target = torch.from_numpy(rng.integers(0, 4, size=n))
            loss = float(rng.uniform(0.1, 3.0))
            pooled_losses.append(loss)
            pooled_sizes.append(n)
            pooled_correct += int((logits.numpy().argmax(1) == target.numpy()).sum())
            rank.add({"loss": torch.tensor(loss, dtype=torch.float32)}, logits, target)
    seen: list[torch.Tensor] = []
    ranks[1].means("acc", reduce=lambda totals: seen.append(totals) or totals)
    (other,) = seen
    means = ranks[0].means("acc", reduce=lambda totals: totals + other)  # the all-reduce
    assert float(means["loss"]) == pytest.approx(np.average(pooled_losses, weights=pooled_sizes))
    assert float(means["acc"]) == pytest.approx(pooled_correct / sum(pooled_sizes))
    alone = ranks[1].means("acc")
    assert float(alone["loss"]) == pytest.approx(pooled_losses[-1])


def test_validation_and_test_metrics_equal_a_hand_computation(tmp_path):
    """val/loss and val/acc (and test/*), logged once per evaluation, are the sample mean of
    the cross-entropy and the top-1 accuracy over the whole split, computed here directly."""
    import torch.nn.functional as F

    from dnn_tricks.app import TrainerCLI

    args = ["--config", str(CONFIGS / "digits.yaml"), *shrink_args(tmp_path, epochs=1)]
    whole = ["--trainer.limit_val_batches=1.0", "--trainer.limit_test_batches=1.0"]
    cli = TrainerCLI(args=[*args, *whole], run=False)
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    data, model = cli.datamodule, cli.model.eval()
    for stage in ("val", "test"):
        run = cli.trainer.validate if stage == "val" else cli.trainer.test
        (logged,) = run(model, datamodule=data, verbose=False)
        loader = data.val_dataloader() if stage == "val" else data.test_dataloader()
        with torch.no_grad():
            pairs = [(model(data.to_float(x)).double(), y) for x, y in loader]
        logits, y = torch.cat([p[0] for p in pairs]), torch.cat([p[1] for p in pairs])
        assert len(y) == len(data.split(stage)[1])  # the whole split
        expected_loss = float(F.cross_entropy(logits, y, reduction="sum")) / len(y)
        expected_acc = float((logits.argmax(1) == y).double().mean())
        assert logged[f"{stage}/loss"] == pytest.approx(expected_loss, rel=1e-5)
        assert logged[f"{stage}/acc"] == pytest.approx(expected_acc, abs=1e-7)


def test_guard_keeps_the_first_non_finite_step_and_its_value():
    guard = NonFiniteGuard()

    class Module:  # what check() reads of a LightningModule outside a trainer
        _trainer = None

    for step, loss in enumerate([1.0, 2.0, float("inf"), float("nan"), 3.0]):
        guard.record(torch.tensor(loss), step)
    with pytest.raises(FloatingPointError, match=r"became inf at global step 2 \(epoch 4\)"):
        guard.check(Module(), epoch=4)
    clean = NonFiniteGuard()
    clean.record(torch.tensor(1.0), 0)
    clean.check(Module(), epoch=0)  # finite: nothing raised


def _plant_nan(step: int, record: Path) -> list[str]:
    """Overrides adding test_nonfinite's callback: NaN inputs at optimizer step ``step``."""
    return [
        f"--trainer.callbacks+={PlantNaNInput.__module__}.PlantNaNInput",
        f"--trainer.callbacks.step={step}",
        f"--trainer.callbacks.record={record}",
    ]


def test_deferred_check_stops_before_validation_and_keeps_the_last_checkpoint(
    run_cli, tmp_path, capsys, monkeypatch
):
    """As on an accelerator: the loss is recorded on the device and read only at log steps
    (every 10 here) and before validation / checkpoints; the NaN of step 5 (epoch 1, whose
    steps are 3..5) is found before epoch 1 validates or saves."""
    monkeypatch.setattr(NonFiniteGuard, "read_is_free", staticmethod(lambda loss, trainer: False))
    record, logs = tmp_path / "last.sha256", tmp_path / "logs"
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            [
                "fit",
                "--config",
                CONFIGS / "digits.yaml",
                *shrink_args(logs, epochs=3, batches=3),
                *_plant_nan(5, record),
            ]
        )
    assert exit_info.value.code == 2
    assert (
        "error: the training loss became nan at global step 5 (epoch 1)" in capsys.readouterr().err
    )
    last = logs / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    assert hashlib.sha256(last.read_bytes()).hexdigest() == record.read_text()
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())


def test_step_values_are_logged_at_log_steps_and_epoch_means_once_per_epoch(run_cli, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    logs = tmp_path / "logs"
    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "digits.yaml",
            *shrink_args(logs, epochs=2, batches=6),
            "--trainer.log_every_n_steps=4",
            "--test_after_fit=false",
        ]
    )
    (run,) = logs.glob("*/version_0")
    events = EventAccumulator(str(run)).Reload()
    steps = {tag: [e.step for e in events.Scalars(tag)] for tag in events.Tags()["scalars"]}
    assert steps["train/loss_step"] == [3, 7, 11]  # global steps 4, 8, 12 of 12, 0-based
    assert steps["train/loss_epoch"] == [5, 11]
    assert steps["train/acc"] == [5, 11]
    values = [e.value for e in events.Scalars("train/acc")]
    assert all(0.0 <= v <= 1.0 for v in values)
