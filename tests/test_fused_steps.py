"""data.steps_per_batch: K batches served as one and stepped through under manual
optimization. The reference is the ungrouped run (Lightning's automatic optimization): the
same batches, and after a fit bitwise the same weights, step count and learning rate; a run
resumed from an epoch's checkpoint ends like the uninterrupted one; what cannot work is
refused in one line."""

from __future__ import annotations

import csv
import json
from functools import partial
from pathlib import Path

import pytest
import torch
import yaml
from callback_helpers import one_thread
from lightning.fabric.utilities.data import _set_sampler_epoch
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger

from conftest import CONFIGS, shrink_args
from dnn_tricks.callbacks.activation_stats import ActivationStats
from dnn_tricks.callbacks.averaging import EMA
from dnn_tricks.callbacks.input_stats import InputStatsCheck
from dnn_tricks.callbacks.precise_bn import PreciseBN
from dnn_tricks.callbacks.running_stats import RunningStatsCheck
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.fused_steps import STEP_HOOKS
from dnn_tricks.models.nets import MLP
from dnn_tricks.norm_layers import running_stat_layers

DIGITS = CONFIGS / "digits.yaml"
# a per-step one-cycle schedule (its length must match the steps taken exactly), max-norm
# after every step, dropout drawing from the global random stream
TRICKS = [
    "--model.scheduler=torch.optim.lr_scheduler.OneCycleLR",
    "--model.scheduler.max_lr=0.1",
    "--model.scheduler_interval=step",
    "--model.regularizers="
    + json.dumps([{"class_path": "dnn_tricks.regularize.MaxNorm", "init_args": {"c": 2.0}}]),
    "--test_after_fit=false",
]
RESIDENT_AUGMENTED = [
    "--data.source=fashion_mnist",
    "--data.train_subset=700",
    "--data.device_resident=true",
    "--data.batch_augment.flip=0.5",
    "--data.batch_augment.translate=2",
]


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


@pytest.mark.parametrize("resident", [False, True])
def test_groups_are_the_ungrouped_batches_in_order(monkeypatch, resident):
    monkeypatch.setenv("PL_GLOBAL_SEED", "3")
    plain = DataModule(source="digits", batch_size=32, device_resident=resident)
    grouped = DataModule(
        source="digits", batch_size=32, device_resident=resident, steps_per_batch=6
    )
    a, b = plain.train_dataloader(), grouped.train_dataloader()
    full = len(plain.split("train")[1]) // 32
    assert full % 6 and len(a) == full and len(b) == -(-full // 6)  # the last: the rest
    assert grouped.optimizer_steps(len(b)) == full and grouped.optimizer_steps(2) == 12
    for epoch in (0, 1):
        for loader in (a, b):  # as Lightning does before each epoch: it must reach the sampler
            _set_sampler_epoch(loader, epoch)
        batches = list(a)
        groups = list(b)
        assert [len(y) for _, y in groups] == [32 * 6] * (len(groups) - 1) + [32 * (full % 6)]
        assert torch.equal(torch.cat([x for x, _ in groups]), torch.cat([x for x, _ in batches]))
        assert torch.equal(torch.cat([y for _, y in groups]), torch.cat([y for _, y in batches]))


def _fit(run_cli, logs, epochs: int, *extra: str) -> dict:
    run_cli(["fit", "--config", DIGITS, *shrink_args(logs, epochs, 1.0), *TRICKS, *extra])
    return torch.load(next(logs.rglob("last.ckpt")), weights_only=True)


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["global_step"] == b["global_step"] > 0
    (sched_a,), (sched_b,) = a["lr_schedulers"], b["lr_schedulers"]
    assert sched_a["last_epoch"] == sched_b["last_epoch"] == a["global_step"]
    assert sched_a["_last_lr"] == sched_b["_last_lr"]
    assert a["state_dict"].keys() == b["state_dict"].keys()
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


@pytest.mark.parametrize("data", ["digits", "fashion_mnist_resident"])
def test_grouped_steps_train_to_the_ungrouped_weights_bitwise(run_cli, tmp_path, data):
    extra = RESIDENT_AUGMENTED if data != "digits" else []
    if data != "digits":
        from conftest import requires_fashion_mnist

        if requires_fashion_mnist().args[0]:
            pytest.skip("Debian's dataset-fashion-mnist is not installed")
        extra = [*extra, "--model.input_norm.kind=center"]
    plain = _fit(run_cli, tmp_path / "plain", 2, *extra)
    grouped = _fit(run_cli, tmp_path / "grouped", 2, *extra, "--data.steps_per_batch=4")
    _assert_same_run(plain, grouped)


def test_a_fit_resumed_from_an_epoch_checkpoint_ends_like_the_uninterrupted_one(run_cli, tmp_path):
    every_epoch = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"filename": "epoch-{epoch}", "monitor": "val/loss", "save_top_k": -1},
    }
    grouped = ["--data.steps_per_batch=6", f"--trainer.callbacks+={json.dumps(every_epoch)}"]
    straight = _fit(run_cli, tmp_path / "straight", 3, *grouped)
    first = next((tmp_path / "straight").rglob("epoch-epoch=0.ckpt"))
    resumed = _fit(run_cli, tmp_path / "resumed", 3, *grouped, f"--ckpt_path={first}")
    _assert_same_run(straight, resumed)


def _fit_grouped(
    tmp_path, callbacks: list, steps: int = 4, epochs: int = 1, **trainer_args
) -> tuple[Classifier, Trainer]:
    data = DataModule(source="digits", batch_size=32, steps_per_batch=steps)
    net = partial(MLP, hidden=[64], norm="batch")  # running statistics for PreciseBN
    model = Classifier(net=net, input_shape=data.input_shape, num_classes=data.num_classes)
    settings = {"logger": False, "enable_checkpointing": False, "enable_progress_bar": False}
    settings.update(trainer_args)
    trainer = Trainer(max_epochs=epochs, callbacks=callbacks, default_root_dir=tmp_path, **settings)
    trainer.fit(model, datamodule=data)
    return model, trainer


def test_a_fit_groups_its_steps_under_manual_optimization(tmp_path):
    model, trainer = _fit_grouped(tmp_path, [])
    full = len(trainer.datamodule.split("train")[1]) // 32
    assert not model.automatic_optimization
    assert trainer.num_training_batches == -(-full // 4) and trainer.global_step == full


@pytest.mark.parametrize(
    ("callbacks", "trainer_args", "reason"),
    [
        (
            lambda folder: [ModelCheckpoint(folder, every_n_train_steps=10)],
            {"enable_checkpointing": True},
            "ModelCheckpoint, which saves at global steps that are multiples of every_n_train",
        ),
        (lambda folder: [], {"gradient_clip_val": 1.0}, "gradient_clip_val"),
    ],
)
def test_what_needs_a_lightning_step_per_optimizer_step_runs_ungrouped_with_a_warning(
    tmp_path, callbacks, trainer_args, reason
):
    with pytest.warns(UserWarning, match="steps_per_batch=4: this fit steps one batch") as seen:
        model, trainer = _fit_grouped(tmp_path, callbacks(tmp_path / "ckpt"), **trainer_args)
    assert any(reason in str(w.message) for w in seen)
    full = len(trainer.datamodule.split("train")[1]) // 32
    assert model.automatic_optimization
    assert trainer.num_training_batches == full and trainer.global_step == full


def test_a_plateau_schedule_is_refused_in_one_line(run_cli, tmp_path, capsys):
    plateau = [
        "--model.scheduler=torch.optim.lr_scheduler.ReduceLROnPlateau",
        "--data.steps_per_batch=4",
    ]
    with pytest.raises(SystemExit):
        run_cli(["fit", "--config", DIGITS, *shrink_args(tmp_path / "logs"), *plateau])
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert "ReduceLROnPlateau needs Lightning's: set data.steps_per_batch: 1" in error


def test_the_quick_start_config_takes_an_epoch_per_lightning_step(run_cli, tmp_path):
    logs = tmp_path / "logs"
    as_shipped = [a for a in shrink_args(logs, 2, 2) if "steps_per_batch" not in a]
    run_cli(["fit", "--config", DIGITS, *as_shipped, "--test_after_fit=false"])
    assert yaml.safe_load((CONFIGS / "data" / "digits.yaml").read_text())["steps_per_batch"] == 64
    data = DataModule(source="digits", batch_size=32, val_fraction=0.15)
    full = len(data.split("train")[1]) // 32
    assert full < 64  # one loader batch per epoch, whatever limit_train_batches says
    assert torch.load(next(logs.rglob("last.ckpt")), weights_only=True)["global_step"] == 2 * full


class StepHookCounter(Callback):
    """Counts the per-step hooks, as a gradient-norm logger would use them."""

    def __init__(self) -> None:
        self.calls = {hook: 0 for hook in STEP_HOOKS}

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self.calls["on_before_backward"] += 1

    def on_after_backward(self, trainer, pl_module) -> None:
        self.calls["on_after_backward"] += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        self.calls["on_before_optimizer_step"] += 1


def test_step_hooks_run_once_per_optimizer_step_when_something_listens(tmp_path):
    """With a listener the grouped fit dispatches every hook per step (without one it skips
    the dispatch): both give the ungrouped fit's weights."""
    weights = {}
    for name, steps, callbacks in (
        ("plain", 1, []),
        ("idle", 4, []),
        ("heard", 4, [StepHookCounter()]),
    ):
        torch.manual_seed(0)
        model, trainer = _fit_grouped(tmp_path / name, callbacks, steps, epochs=2)
        weights[name] = model.state_dict()
        if name != "plain":
            assert model._idle_step_hooks is (not callbacks)
        if callbacks:
            assert callbacks[0].calls == dict.fromkeys(STEP_HOOKS, trainer.global_step)
    for name in ("idle", "heard"):
        for key, value in weights["plain"].items():
            assert torch.equal(value, weights[name][key]), (name, key)


def test_callbacks_that_read_batches_see_a_group_as_its_batches(tmp_path, recwarn):
    """PreciseBN averages over batches of batch_size (a group gives its batches one by one),
    the input-statistics check and the running-statistics check read groups; nothing falls
    back, and the fit ends with the ungrouped fit's weights and BN statistics."""
    states = []
    for steps in (1, 4):
        precise = PreciseBN(num_batches=7, evaluate=False, checkpoint=None)
        checks = [precise, InputStatsCheck(), RunningStatsCheck(every_n_steps=0)]
        torch.manual_seed(0)
        model, trainer = _fit_grouped(tmp_path / str(steps), checks, steps)
        assert precise.batches_used == 7
        assert model.automatic_optimization is (steps == 1)
        states.append(model.state_dict())
    assert not [w for w in recwarn if "steps one batch at a time" in str(w.message)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


def test_ema_follows_every_optimizer_step_of_a_group(tmp_path, recwarn):
    """The EMA updates from the optimizer's step hook: a grouped fit keeps its grouping and
    ends with the ungrouped fit's average, bit for bit."""
    states = []
    for steps in (1, 4):
        torch.manual_seed(0)
        model, trainer = _fit_grouped(tmp_path / str(steps), [EMA(decay=0.9)], steps, epochs=2)
        assert model.automatic_optimization is (steps == 1)
        states.append(model.state_dict())  # the average, swapped in at the end of the fit
    assert not [w for w in recwarn if "steps one batch at a time" in str(w.message)]
    for key, value in states[0].items():
        assert torch.equal(value, states[1][key]), key


class PlantNaNAt(Callback):
    """A NaN in the first running variance once global_step reaches ``step``."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            running_stat_layers(pl_module)[0][1].running_var[0] = float("nan")


def test_running_stats_check_runs_after_the_group_that_passes_its_step(tmp_path):
    """every_n_steps=10 with groups of 4 steps: the NaN planted after step 8 is found after
    the group that passes step 10, at step 12 (ungrouped: at step 10)."""
    for steps, found_at in ((1, 10), (4, 12)):
        check = RunningStatsCheck(every_n_steps=10, drift_batches=0)
        with pytest.raises(FloatingPointError, match=f"global step {found_at},"):
            _fit_grouped(tmp_path / str(steps), [PlantNaNAt(8), check], steps)


def test_activation_stats_record_the_first_step_of_each_group_that_holds_a_multiple(tmp_path):
    """every_n_steps=10, groups of 4 steps (0-3, 4-7, 8-11, ...): steps 0, 8, 20 and 28 are
    recorded (their groups hold 0, 10, 20, 30); ungrouped: 0, 10, 20, 30."""
    for steps, recorded in ((1, [0, 10, 20, 30]), (4, [0, 8, 20, 28])):
        logger = CSVLogger(tmp_path / str(steps), name="run")
        data = DataModule(source="digits", batch_size=32, steps_per_batch=steps)
        model = Classifier(net=MLP, input_shape=data.input_shape, num_classes=data.num_classes)
        trainer = Trainer(
            max_steps=32,
            callbacks=[ActivationStats(every_n_steps=10)],
            logger=logger,
            enable_checkpointing=False,
            enable_progress_bar=False,
        )
        trainer.fit(model, datamodule=data)
        assert model.automatic_optimization is (steps == 1)
        rows = csv.DictReader((Path(logger.log_dir) / "metrics.csv").open())
        logged = sorted(
            {int(r["step"]) for r in rows if any(k.startswith("act_") and r[k] for k in r)}
        )
        assert logged == recorded
