"""A non-finite loss stops ``trainer fit`` at once: exit status 2, one line naming the step,
and the last good checkpoint left as it was and loadable without unpickling code."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import torch
from callback_helpers import one_thread
from lightning.pytorch import Callback

from conftest import CONFIGS, shrink_args


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


class PlantNaNInput(Callback):
    """Puts a NaN into the (normalized) inputs of the batch of optimizer step ``step``, and
    records a hash of ``last.ckpt`` as it is at that moment, to compare after the failure."""

    def __init__(self, step: int, record: str) -> None:
        self.step, self.record = step, record

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if trainer.global_step != self.step:
            return
        last = Path(trainer.checkpoint_callback.dirpath) / "last.ckpt"
        Path(self.record).write_text(hashlib.sha256(last.read_bytes()).hexdigest())
        batch[0][0] = float("nan")  # in place: the batch the training step receives


def test_nan_loss_exits_2_naming_the_step_and_keeps_the_last_checkpoint(run_cli, tmp_path, capsys):
    record = tmp_path / "last.sha256"
    plant = [
        f"--trainer.callbacks+={__name__}.PlantNaNInput",
        "--trainer.callbacks.step=5",
        f"--trainer.callbacks.record={record}",
    ]
    logs = tmp_path / "logs"

    # 3 steps per epoch: epoch 0 validates and writes last.ckpt at step 3, NaN at step 5
    with pytest.raises(SystemExit) as exit_info:
        config = ["--config", CONFIGS / "digits.yaml"]
        run_cli(["fit", *config, *shrink_args(logs, epochs=3, batches=3), *plant])

    assert exit_info.value.code == 2
    error = capsys.readouterr().err
    assert "error: the training loss became nan at global step 5 (epoch 1)" in error
    last = logs / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    assert hashlib.sha256(last.read_bytes()).hexdigest() == record.read_text()
    checkpoint = torch.load(last, weights_only=True)
    assert checkpoint["global_step"] == 3
    assert all(torch.isfinite(v).all() for v in checkpoint["state_dict"].values())
