"""Every switch seen acting inside a real ``Trainer.fit`` (or ``trainer fit``), each against a
value computed here independently: the loss terms, the max-norm constraint, the weight-decay
groups, each shipped LR schedule at every step, ReduceLROnPlateau and EarlyStopping on
planted plateaus, the median pruner on a planted bad trial, and the patch-whitening stem.

(``compile`` and ``channels_last`` giving eager's loss within 1e-5 on CPU is checked in
tests/test_tricks_library.py, which already pays the compilation once.)"""

from __future__ import annotations

import copy
import functools
import math

import numpy as np
import optuna
import pytest
import torch
import yaml
from lightning.pytorch import Callback, Trainer, seed_everything
from torch import nn
from torch.optim import SGD, lr_scheduler

from conftest import CONFIGS, shrink_args
from dnn_tricks import regularize, schedules
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.input_norm import NormalizeConfig
from dnn_tricks.models.nets import MLP, ConvNet

DIGITS = CONFIGS / "digits.yaml"


@pytest.fixture(scope="module")
def digits() -> DataModule:
    dm = DataModule(source="digits", batch_size=32, num_workers=0)
    dm.setup("fit")
    return dm


def trainer(**kwargs) -> Trainer:
    options = dict(
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    return Trainer(**{**options, **kwargs})


# ---------------------------------------------------------------- the loss and its terms


class FirstStep(Callback):
    """The batch and network weights the first training step starts from, and its loss."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        if batch_idx == 0:
            self.x, self.y = batch[0].clone(), batch[1].clone()
            self.net = copy.deepcopy(pl_module.net)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == 0:
            self.loss = float(outputs["loss"])


def test_the_loss_is_cross_entropy_plus_each_weighted_term(digits):
    l1, l2, jac, smoothing = 1e-3, 1e-2, 0.05, 0.1
    seed_everything(0, verbose=False)
    model = Classifier(
        net=functools.partial(MLP, hidden=[16], norm="none"),
        input_norm=NormalizeConfig(kind="none"),
        optimizer=functools.partial(SGD, lr=0.1),
        input_shape=digits.input_shape,
        num_classes=digits.num_classes,
        label_smoothing=smoothing,
        regularizers=[
            regularize.L1(l1),
            regularize.L2(l2),
            regularize.Jacobian(jac, projections=-1),
        ],
    )
    first = FirstStep()
    trainer(max_steps=1, limit_val_batches=0, callbacks=[first]).fit(model, datamodule=digits)

    net, x, y = first.net.double(), first.x.double(), first.y
    logp = torch.log_softmax(net(x), dim=1)
    # label smoothing (torch's documented target): (1 - e) one-hot + e / K everywhere
    cross_entropy = -((1 - smoothing) * logp[torch.arange(len(y)), y] + smoothing * logp.mean(1))
    weights = [m.weight for m in net.modules() if isinstance(m, nn.Linear)]  # no biases
    l1_term = l1 * sum(w.abs().sum() for w in weights)
    l2_term = l2 * sum((w**2).sum() for w in weights)
    # (lambda / 2) ||J||_F^2 per sample, averaged: the exact Jacobian of each sample's logits
    squares = [
        torch.autograd.functional.jacobian(lambda v: net(v[None])[0], xi).pow(2).sum() for xi in x
    ]
    jac_term = jac / 2 * torch.stack(squares).mean()
    expected = cross_entropy.mean() + l1_term + l2_term + jac_term
    assert first.loss == pytest.approx(float(expected), rel=1e-5)
    assert float(l1_term) > 1e-3 and float(jac_term) > 1e-4  # each term matters here


def test_after_a_fit_with_max_norm_every_unit_has_norm_at_most_c(run_cli, tmp_path):
    c = 0.5
    norms = {}
    for name, regs in (("free", "[]"), ("constrained", MAX_NORM.format(c=c))):
        logs = tmp_path / name
        run_cli(
            ["fit", "--config", DIGITS, *shrink_args(logs, epochs=2, batches=5)]
            + ["--model.optimizer.init_args.lr=0.5", f"--model.regularizers={regs}"]
            + ["--test_after_fit=false"]
        )
        state = torch.load(next(logs.rglob("last.ckpt")), weights_only=True)["state_dict"]
        weights = [v for k, v in state.items() if k.startswith("net.") and v.ndim == 2]
        assert len(weights) == 3  # 64-256-128-10
        norms[name] = np.concatenate([np.linalg.norm(w.numpy(), axis=1) for w in weights])
    assert norms["free"].max() > c  # without the constraint the units grow past c
    assert norms["constrained"].max() <= c * (1 + 1e-6)
    assert norms["constrained"].max() > 0.9 * c  # and the constraint was binding


MAX_NORM = "[{{class_path: dnn_tricks.regularize.MaxNorm, init_args: {{c: {c}}}}}]"


# ---------------------------------------------------------------- optimizer groups


@pytest.mark.parametrize("decay_norm_and_bias", [False, True])
def test_the_optimizer_decays_exactly_the_weights(digits, decay_norm_and_bias):
    model = Classifier(
        net=functools.partial(ConvNet, channels=[4], convs_per_stage=1, hidden=[8], norm="batch"),
        optimizer=functools.partial(SGD, lr=0.1, weight_decay=1e-3),
        input_shape=digits.input_shape,
        num_classes=digits.num_classes,
        decay_norm_and_bias=decay_norm_and_bias,
    )
    fit = trainer(max_steps=1, limit_val_batches=0)
    fit.fit(model, datamodule=digits)
    groups = fit.optimizers[0].param_groups
    decayed = {id(p) for g in groups if g["weight_decay"] == 1e-3 for p in g["params"]}
    exempt = {id(p) for g in groups if g["weight_decay"] == 0.0 for p in g["params"]}
    # the reference: weights of convolutions and linear layers, named here by module type
    weights = {id(m.weight) for m in model.net.modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    trainable = {id(p) for p in model.parameters() if p.requires_grad}
    assert decayed | exempt == trainable and not decayed & exempt
    assert decayed == (trainable if decay_norm_and_bias else weights)
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.net.modules())


# ---------------------------------------------------------------- LR schedules in a fit


def _cos(start: float, end: float, p: float) -> float:
    return end + (start - end) * (1 + math.cos(math.pi * p)) / 2


LR0, EPOCHS, BATCHES = 0.1, 4, 3
# Each shipped schedule (configs/*.yaml, configs/ablate/lr_schedules.yaml): its factory
# arguments, and its formula lr(t, T) written here from the papers / torch's documentation,
# t counting optimizer steps or epochs and T the fit's length in the same unit.
SCHEDULES = {
    "CosineAnnealingLR": (
        lr_scheduler.CosineAnnealingLR,
        lambda T: {"T_max": T},
        lambda t, T: _cos(LR0, 0.0, t / T),
    ),
    "ExponentialLR": (
        lr_scheduler.ExponentialLR,
        lambda T: {"gamma": 0.9},
        lambda t, T: LR0 * 0.9**t,
    ),
    "StepLR": (
        lr_scheduler.StepLR,
        lambda T: {"step_size": 2, "gamma": 0.25},
        lambda t, T: LR0 * 0.25 ** (t // 2),
    ),
    "InverseTimeDecay": (
        schedules.InverseTimeDecay,
        lambda T: {"decay_rate": 0.6},
        lambda t, T: LR0 / (1 + 0.6 * t),
    ),
    "WarmupCosine": (
        schedules.WarmupCosine,
        lambda T: {"warmup_steps": 2, "warmup_start_factor": 0.1},
        lambda t, T: LR0 * (0.1 + 0.9 * t / 2) if t < 2 else _cos(LR0, 0.0, (t - 2) / (T - 2)),
    ),
    "OneCycleLR": (
        lr_scheduler.OneCycleLR,
        lambda T: {"max_lr": 1.0, "pct_start": 0.25, "div_factor": 10.0},
        # warm from max/div to max over the first pct*T - 1 steps, then down to
        # max/div/final_div (final_div_factor 1e4) by step T - 1; total_steps filled in
        lambda t, T: (
            _cos(0.1, 1.0, t / (0.25 * T - 1))
            if t <= 0.25 * T - 1
            else _cos(1.0, 0.1 / 1e4, (t - (0.25 * T - 1)) / (T - 1 - (0.25 * T - 1)))
        ),
    ),
}


class RecordLR(Callback):
    def __init__(self) -> None:
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])


@pytest.mark.parametrize("interval", ["step", "epoch"])
@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_the_lr_at_every_step_of_a_fit_is_the_schedules_formula(digits, name, interval):
    factory, arguments, formula = SCHEDULES[name]
    total = EPOCHS * BATCHES if interval == "step" else EPOCHS
    args = arguments(total)
    if name == "OneCycleLR" and interval == "epoch":
        args["pct_start"] = 0.5  # a warm phase of at least one epoch
        formula = lambda t, T: _cos(0.1, 1.0, t / 1) if t <= 1 else _cos(1.0, 1e-5, (t - 1) / 2)  # noqa: E731
    if name in ("WarmupCosine", "OneCycleLR"):  # the length is filled in by the model
        assert "total_steps" not in args
    model = Classifier(
        net=functools.partial(MLP, hidden=[8]),
        optimizer=functools.partial(SGD, lr=LR0, momentum=0.9),
        scheduler=functools.partial(factory, **args),
        scheduler_interval=interval,
        input_shape=digits.input_shape,
        num_classes=digits.num_classes,
    )
    record = RecordLR()
    fit = trainer(max_epochs=EPOCHS, limit_train_batches=BATCHES, limit_val_batches=1)
    fit.callbacks.append(record)
    fit.fit(model, datamodule=digits)
    assert len(record.lrs) == EPOCHS * BATCHES
    for step, lr in enumerate(record.lrs):
        t = step if interval == "step" else step // BATCHES
        assert lr == pytest.approx(formula(t, total), rel=1e-9, abs=1e-12), (step, t)


# ---------------------------------------------------------------- planted plateaus


class PlantMetric(Callback):
    """Logs ``planted/loss`` = values[epoch] at each validation end: a plateau on demand."""

    def __init__(self, values: list[float]) -> None:
        self.values = values

    def on_validation_epoch_end(self, trainer, pl_module):
        if not trainer.sanity_checking:
            pl_module.log("planted/loss", self.values[trainer.current_epoch])


def test_reduce_on_plateau_lowers_the_lr_when_the_plateau_outlasts_patience(digits):
    # improves at epoch 1, then flat: with patience 1, epochs 2 and 3 are bad; after the
    # second bad epoch (num_bad_epochs 2 > patience 1, torch's rule) the lr halves, and
    # the count restarts (cooldown 0), so it halves again after epochs 4 and 5.
    values = [1.0, 0.9, 0.9, 0.9, 0.9, 0.9, 0.9]
    model = Classifier(
        net=functools.partial(MLP, hidden=[8]),
        optimizer=functools.partial(SGD, lr=LR0),
        scheduler=functools.partial(
            lr_scheduler.ReduceLROnPlateau, mode="min", factor=0.5, patience=1, threshold=0.0
        ),
        scheduler_monitor="planted/loss",
        input_shape=digits.input_shape,
        num_classes=digits.num_classes,
    )
    record = RecordLR()
    fit = trainer(max_epochs=len(values), limit_train_batches=1, limit_val_batches=1)
    fit.callbacks += [PlantMetric(values), record]
    fit.fit(model, datamodule=digits)
    # the lr each epoch trained with: reduced at the end of epochs 3 and 5
    assert record.lrs == pytest.approx([LR0] * 4 + [LR0 / 2] * 2 + [LR0 / 4])


def test_early_stopping_stops_after_patience_epochs_on_a_real_plateau(run_cli, tmp_path):
    """lr 0 and no batch norm or dropout: val/loss is exactly the same every epoch. The
    shipped EarlyStopping (patience 8 on val/loss) keeps epoch 0's value as the best, so it
    stops at the end of epoch 8: nine epochs of twenty."""
    patience = yaml.safe_load((CONFIGS / "callbacks" / "basic.yaml").read_text())[2]
    assert patience["class_path"].endswith("EarlyStopping")
    patience = patience["init_args"]["patience"]
    logs = tmp_path / "logs"
    run_cli(
        ["fit", "--config", DIGITS, *shrink_args(logs, epochs=20, batches=2)]
        + ["--model.optimizer.init_args.lr=0.0", "--model.net.init_args.norm=none"]
        + ["--model.net.init_args.dropout=0.0", "--test_after_fit=false"]
    )
    last = torch.load(next(logs.rglob("last.ckpt")), weights_only=True)
    assert last["epoch"] == patience  # epochs 0 .. patience
    (state,) = [v for k, v in last["callbacks"].items() if k.startswith("EarlyStopping")]
    assert state["wait_count"] == patience and state["stopped_epoch"] == patience


# ---------------------------------------------------------------- the median pruner


def _seed_for(order: list[float], key: str, choices: list[float]) -> int:
    """A search seed whose trials sample ``order``: trial n samples with seed + n
    (SearchConfig.seed), replayed here with Optuna's RandomSampler alone."""
    for seed in range(200):
        study = optuna.create_study(direction="maximize")
        drawn = []
        for n in range(len(order)):
            study.sampler = optuna.samplers.RandomSampler(seed=seed + n)
            trial = study.ask()
            drawn.append(trial.suggest_categorical(key, choices))
            study.tell(trial, 0.0)
        if drawn == order:
            return seed
    raise AssertionError(f"no seed below 200 samples {order}")


def test_the_median_pruner_prunes_a_planted_bad_trial(run_cli, tmp_path):
    """Two good trials (lr 0.05) run to the end; the third (lr 0: accuracy stays at chance)
    is below their median at its first epoch and is pruned there."""
    lr, choices, order = "model.optimizer.init_args.lr", [0.05, 0.0], [0.05, 0.05, 0.0]
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    search = {
        "base": [str(DIGITS)],
        "study_name": "planted",
        "log_dir": str(tmp_path / "search"),
        "n_trials": 3,
        "seed": _seed_for(order, lr, choices),
        "pruner": "median",
        "prune_startup_trials": 2,
        "prune_warmup_epochs": 0,
        "test_best": False,
        "fixed": {
            "trainer.max_epochs": 3,
            "trainer.limit_train_batches": 10,
            "trainer.limit_val_batches": 2,
        },
        "space": {lr: {"type": "categorical", "choices": choices}},
    }
    (tmp_path / "search.yaml").write_text(yaml.safe_dump(search))
    run_cli(["search", "--config", tmp_path / "search.yaml"])
    storage = f"sqlite:///{tmp_path / 'search' / 'planted' / 'study.db'}"
    trials = optuna.load_study(study_name="planted", storage=storage).trials
    assert [t.params[lr] for t in trials] == order
    assert [t.state.name for t in trials] == ["COMPLETE", "COMPLETE", "PRUNED"]
    good = [t.intermediate_values for t in trials[:2]]
    assert all(sorted(v) == [0, 1, 2] for v in good)
    assert list(trials[2].intermediate_values) == [0]  # pruned at its first epoch
    median = float(np.median([v[0] for v in good]))
    assert trials[2].intermediate_values[0] < median


# ---------------------------------------------------------------- patch-whitening stem


def _patches(images: np.ndarray, k: int) -> np.ndarray:
    """All k x k patches of N x C x H x W images as rows, in (C, kh, kw) order."""
    windows = np.lib.stride_tricks.sliding_window_view(images, (k, k), axis=(2, 3))
    n, c, h, w = windows.shape[:4]
    return windows.transpose(0, 2, 3, 1, 4, 5).reshape(n * h * w, c * k * k)


def test_the_patch_whitening_stem_is_fitted_on_train_data_and_kept_on_resume(run_cli, tmp_path):
    net = (
        "--model.net={class_path: dnn_tricks.models.nets.ConvNet, init_args: "
        "{channels: [8], convs_per_stage: 1, hidden: [16], stem: patch_whiten, patch_size: 2}}"
    )
    logs = tmp_path / "logs"
    run_cli(
        ["fit", "--config", DIGITS, net, *shrink_args(logs, epochs=1), "--test_after_fit=false"]
    )
    first = torch.load(
        logs / "digits" / "version_0" / "checkpoints" / "last.ckpt", weights_only=True
    )
    state = first["state_dict"]
    # the stem is the module with an ``initialized`` flag (a frozen, data-fitted layer)
    (key,) = [k.replace(".initialized", ".weight") for k in state if k.endswith(".initialized")]
    filters = state[key].double().reshape(len(state[key]), -1).numpy()[:4]  # without negatives

    # the reference: the covariance of the train split's patches, as the stem sees them
    # (after the input normalization the checkpoint holds), computed with NumPy; the split
    # and the model as `trainer fit` builds them from the same config
    from dnn_tricks.app import TrainerCLI

    cli = TrainerCLI(args=["--config", str(DIGITS), net, *shrink_args(tmp_path / "x")], run=False)
    dm, model = cli.datamodule, cli.model
    dm.setup("fit")
    model.load_state_dict(state)
    covariances = {}
    for split in ("train", "val"):
        x = dm.to_float(torch.from_numpy(dm.split(split)[0]).permute(0, 3, 1, 2))
        with torch.no_grad():
            images = model.input_norm(x).double().numpy()
        covariances[split] = np.cov(_patches(images, 2), rowvar=False)
    lam = np.linalg.eigvalsh(covariances["train"])[::-1]
    whitened = filters @ covariances["train"] @ filters.T
    np.testing.assert_allclose(whitened, np.diag(lam / (lam + 5e-4)), atol=2e-3)
    off_val = filters @ covariances["val"] @ filters.T
    assert np.abs(off_val - np.diag(lam / (lam + 5e-4))).max() > 2e-2  # not the val split's

    # resume on another train subset: a refit would change the filters; they stay bitwise
    run_cli(
        ["fit", "--config", DIGITS, net, *shrink_args(logs, epochs=2), "--test_after_fit=false"]
        + ["--data.train_subset=400", "--ckpt_path=last"]
    )
    resumed = torch.load(
        logs / "digits" / "version_1" / "checkpoints" / "last.ckpt", weights_only=True
    )
    assert resumed["epoch"] == 1 and resumed["global_step"] > first["global_step"]
    assert torch.equal(resumed["state_dict"][key], state[key])
    trained = next(k for k in state if k.startswith("net.") and state[k].ndim >= 2 and k != key)
    assert not torch.equal(resumed["state_dict"][trained], state[trained])  # training went on


# ---------------------------------------------------------------- compile, channels_last


def test_compile_and_channels_last_train_the_first_step_like_eager():
    """The first step of a real fit: the same loss within 1e-5 on CPU (network and batch
    shape are those tests/test_tricks_library.py compiles, so inductor's cache serves both)."""
    digits = DataModule(source="digits", batch_size=16, num_workers=0)
    losses = []
    for fast in (False, True):
        seed_everything(0, verbose=False)
        model = Classifier(
            net=functools.partial(ConvNet, channels=[4], convs_per_stage=1, hidden=[8]),
            input_norm=NormalizeConfig(kind="none"),
            optimizer=functools.partial(SGD, lr=0.1),
            input_shape=digits.input_shape,
            num_classes=digits.num_classes,
            compile=fast,
            channels_last=fast,
        )
        first = FirstStep()
        trainer(max_steps=1, limit_val_batches=0, callbacks=[first]).fit(model, datamodule=digits)
        losses.append(first.loss)
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
