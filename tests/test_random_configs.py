"""Random combinations of the switches never crash: Hypothesis draws a network, its norm,
norm placement, activation, dropout and init, the input normalization, regularizers, an LR
schedule and its interval, and augmentation (per image, or mixup / cutmix per batch), and
runs one training step and one validation step of each on digits (300 train images).

The Classifier and DataModule are built directly, with what ``trainer fit`` would build from
the same config (a net factory, regularizer objects, optimizer and schedule factories): the
config parser costs ~0.5 s a run, which 300 runs cannot afford; the configs themselves are
parsed by tests/test_configs.py.

Each combination either trains with a finite loss, or stops with one of the errors that
``trainer`` turns into one line and exit status 2 (``cli.USER_ERRORS``); any other exception
fails the test, and Hypothesis shrinks it to a minimal combination. Seeded
(``derandomize``), so a failure reproduces; the counts are printed (``-s``)."""

from __future__ import annotations

import functools
import math
import os
from collections import Counter

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from lightning.pytorch import Callback, Trainer, seed_everything
from torch.optim import lr_scheduler

from conftest import CONFIGS
from dnn_tricks import regularize, schedules
from dnn_tricks.cli import USER_ERRORS, _one_line
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.input_norm import NormalizeConfig
from dnn_tricks.models.mixing import MixConfig
from dnn_tricks.models.nets import MLP, ConvNet
from dnn_tricks.models.resnet import ResNet

EXAMPLES = int(os.environ.get("DNN_TRICKS_RANDOM_CONFIGS", 320))
NORMS = ("none", "batch", "layer", "instance", "group", "weight", "iter")
ACTIVATIONS = ("relu", "leaky_relu", "elu", "gelu", "silu", "tanh", "sigmoid")
INITS = (
    "default",
    "xavier_uniform",
    "xavier_normal",
    "kaiming_uniform",
    "kaiming_normal",
    "orthogonal",
)
INPUT_NORMS = ("none", "center", "standardize", "pca", "pca_whiten", "zca_whiten")
SCHEDULES = {
    "none": None,
    "cosine": (lr_scheduler.CosineAnnealingLR, {"T_max": 3}),
    "one_cycle": (lr_scheduler.OneCycleLR, {"max_lr": 0.1}),
    "warmup_cosine": (schedules.WarmupCosine, {"warmup_steps": 1}),
    "inverse_time": (schedules.InverseTimeDecay, {"decay_rate": 0.5}),
    "exponential": (lr_scheduler.ExponentialLR, {"gamma": 0.9}),
    "step": (lr_scheduler.StepLR, {"step_size": 1}),
    "plateau": (lr_scheduler.ReduceLROnPlateau, {}),
}
PIPELINES = ("light", "medium", "occlusion")  # albumentations, per image (configs/augment)
MIXING = ("mixup", "cutmix")  # per batch, in the model
AUGMENTS = ("none", *PIPELINES, *MIXING)


def _net(draw) -> tuple[str, dict]:
    kind = draw(st.sampled_from(("MLP", "ConvNet", "ResNet")))
    args = {
        "norm": draw(st.sampled_from(NORMS)),
        "norm_position": draw(st.sampled_from(("before", "after"))),
        "activation": draw(st.sampled_from(ACTIVATIONS)),
        # 1.0 is out of range on purpose: it must give the one-line error
        "dropout": draw(st.sampled_from((0.0, 0.1, 0.5, 1.0))),
        "num_groups": draw(st.sampled_from((1, 2, 4))),
        "init": draw(st.sampled_from(INITS)),
    }
    if kind == "MLP":
        args["hidden"] = draw(st.sampled_from(([8], [16, 8])))
    elif kind == "ConvNet":
        args.update(channels=[4, 8], convs_per_stage=1, hidden=[8])
    else:
        args.update(depth=8, width=4)
    if kind != "MLP":
        args["stem"] = draw(st.sampled_from(("conv", "patch_whiten")))
    return kind, args


@st.composite
def combinations(draw) -> dict:
    """One combination of switches, as the arguments of the Classifier and the DataModule."""
    kind, net = _net(draw)
    regularizers = [
        (name, draw(st.sampled_from(weights)))
        for name, weights in (("L1", (1e-4, 1e-2)), ("L2", (1e-4, 1e-2)), ("Jacobian", (1e-3, 0.1)))
        if draw(st.booleans())
    ]
    if draw(st.booleans()):
        regularizers.append(("MaxNorm", draw(st.sampled_from((0.5, 3.0)))))
    return {
        "net": (kind, net),
        "regularizers": regularizers,
        "schedule": draw(st.sampled_from(sorted(SCHEDULES))),
        "interval": draw(st.sampled_from(("epoch", "step"))),
        "input_norm": (draw(st.sampled_from(INPUT_NORMS)), draw(st.booleans())),
        "augment": draw(st.sampled_from(AUGMENTS)),
        "optimizer": draw(st.sampled_from(("SGD", "Adam", "AdamW"))),
        "label_smoothing": draw(st.sampled_from((0.0, 0.1))),
    }


_data: dict[str, DataModule] = {}


def datamodule(augment: str) -> DataModule:
    """Digits (300 train images), one DataModule per augmentation, set up once."""
    if augment not in _data:
        path = CONFIGS / "augment" / f"{augment}.yaml" if augment in PIPELINES else None
        dm = DataModule(
            source="digits",
            train_subset=300,
            batch_size=16,
            eval_batch_size=64,
            num_workers=0,
            augment=None if path is None else str(path),
        )
        dm.setup("fit")
        _data[augment] = dm
    return _data[augment]


def run_one(combo: dict, root: str) -> float:
    """One training and one validation step (``fast_dev_run``); the training loss."""
    kind, net_args = combo["net"]
    net_class = {"MLP": MLP, "ConvNet": ConvNet, "ResNet": ResNet}[kind]
    schedule = SCHEDULES[combo["schedule"]]
    augment = combo["augment"]
    dm = datamodule(augment)
    seed_everything(0, verbose=False)
    model = Classifier(
        net=functools.partial(net_class, **net_args),
        input_norm=NormalizeConfig(kind=combo["input_norm"][0], per_channel=combo["input_norm"][1]),
        optimizer=functools.partial(getattr(torch.optim, combo["optimizer"]), lr=0.01),
        scheduler=None if schedule is None else functools.partial(schedule[0], **schedule[1]),
        scheduler_interval=combo["interval"],
        input_shape=dm.input_shape,
        num_classes=dm.num_classes,
        label_smoothing=combo["label_smoothing"],
        mixing=MixConfig(**{f"{augment}_alpha": 1.0}) if augment in MIXING else None,
        regularizers=[getattr(regularize, name)(value) for name, value in combo["regularizers"]],
    )
    losses = []

    class LastLoss(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            losses.append(float(outputs["loss"]))

    trainer = Trainer(
        fast_dev_run=1,
        accelerator="cpu",
        logger=False,
        callbacks=[LastLoss()],
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=root,
    )
    trainer.fit(model, datamodule=dm)
    return losses[-1]


def test_random_switch_combinations_train_or_fail_in_one_line(tmp_path):
    outcomes: Counter = Counter()
    drawn: Counter = Counter()

    @settings(
        max_examples=EXAMPLES,
        derandomize=True,  # the same combinations on every run: a failure reproduces
        deadline=None,
        database=None,
        suppress_health_check=[HealthCheck.too_slow],
    )
    @given(combo=combinations())
    def train_or_fail_in_one_line(combo: dict) -> None:
        drawn.update(
            [
                f"net={combo['net'][0]}",
                f"schedule={combo['schedule']}",
                f"augment={combo['augment']}",
                f"input_norm={combo['input_norm'][0]}",
                f"regularizers={len(combo['regularizers'])}",
            ]
        )
        try:
            loss = run_one(combo, str(tmp_path))
        except USER_ERRORS as error:
            line = _one_line(error)
            assert line and line != type(error).__name__, (combo, error)
            outcomes[f"{type(error).__name__}: {line[:90]}"] += 1
            outcomes[" one-line error (exit 2)"] += 1
            return
        assert math.isfinite(loss), (combo, loss)
        outcomes[" trained, finite loss"] += 1

    train_or_fail_in_one_line()
    tried = outcomes[" trained, finite loss"] + outcomes[" one-line error (exit 2)"]
    print(f"\nrandom configurations tried: {tried}")
    for key, count in sorted(outcomes.items(), key=lambda kv: (-kv[1], kv[0])):
        print(f"  {count:4d}  {key}")
    print("  drawn:", dict(sorted(drawn.items())))
    assert tried >= 300
    assert outcomes[" trained, finite loss"] >= tried // 2, "most combinations must train"
