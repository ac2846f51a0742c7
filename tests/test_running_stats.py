"""RunningStatsCheck: drift against hand computations, each check firing on a planted fault
and staying silent on a healthy run, and its state surviving a resume."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from callback_helpers import digits_model, fit, one_thread
from lightning.pytorch import Callback
from torch import nn

from dnn_tricks.callbacks.norm_stats import measure_drift, running_stat_layers
from dnn_tricks.callbacks.running_stats import RunningStatsCheck
from dnn_tricks.models.iternorm import IterNorm


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _inverse_sqrt(sigma: np.ndarray) -> np.ndarray:
    lam, u = np.linalg.eigh(sigma)
    return (u / np.sqrt(lam)) @ u.T


def test_batchnorm_drift_is_the_eval_output_shift_computed_by_hand():
    g = torch.Generator().manual_seed(0)
    bn = nn.BatchNorm1d(3)
    bn.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
    bn.running_var.copy_(torch.tensor([4.0, 0.25, 1.0]))
    scale, offset = torch.tensor([2.0, 1.0, 0.5]), torch.tensor([1.0, 0.0, 2.0])
    batches = [torch.randn(16, 3, generator=g) * scale + offset for _ in range(3)]
    # Dropout in front: the check runs in eval mode, so the layer must see the raw batches.
    model = nn.Sequential(nn.Dropout(0.9), bn)
    before = {k: v.clone() for k, v in bn.state_dict().items()}

    (drift,) = measure_drift(model, batches, [("1", bn)])

    x = np.stack([b.numpy() for b in batches]).astype(np.float64)
    run_mean, run_var = bn.running_mean.double().numpy(), bn.running_var.double().numpy()
    mu, var = x.mean(1).mean(0), x.var(1, ddof=1).mean(0)  # batch statistics, averaged
    shift = (mu - run_mean) / np.sqrt(run_var + bn.eps)
    log_std = 0.5 * np.log((var + bn.eps) / (run_var + bn.eps))
    worst = np.maximum(abs(shift), abs(log_std))
    c = int(worst.argmax())
    assert drift.layer == "1" and drift.channel == c
    assert drift.value == pytest.approx(worst[c], rel=1e-6)
    assert drift.mean_shift == pytest.approx(shift[c], rel=1e-6)
    assert drift.log_std_ratio == pytest.approx(log_std[c], rel=1e-6)
    assert model.training and model[0].training  # modes restored
    for key, value in bn.state_dict().items():  # buffers untouched
        assert torch.equal(value, before[key]), key


def test_iternorm_drift_against_exact_whitening():
    g = torch.Generator().manual_seed(1)
    layer = IterNorm(4, num_groups=2, T=40).double()  # 40 Newton steps: exact inverse sqrt
    mix = torch.randn(4, 4, generator=g, dtype=torch.float64)
    batches = [torch.randn(64, 4, generator=g, dtype=torch.float64) @ mix + 3 for _ in range(2)]
    x = np.stack([b.numpy() for b in batches])
    whiten = np.zeros((2, 2, 2))
    for b in x:
        for grp in range(2):
            part = b[:, 2 * grp : 2 * grp + 2]
            sigma = np.cov(part.T, bias=True) + layer.eps * np.eye(2)
            whiten[grp] += _inverse_sqrt(sigma) / len(x)
    layer.running_mean.copy_(torch.from_numpy(x.reshape(-1, 4).mean(0)))
    layer.running_whiten.copy_(torch.from_numpy(whiten))

    (healthy,) = measure_drift(layer, batches, [("w", layer)])
    assert healthy.value < 1e-6

    layer.running_whiten.mul_(2.0)  # eval outputs twice too wide: log std ratio log 2
    (wide,) = measure_drift(layer, batches, [("w", layer)])
    assert wide.value == pytest.approx(np.log(2.0), rel=1e-6)
    assert wide.mean_shift == pytest.approx(0.0, abs=1e-6)

    layer.running_whiten.div_(2.0)
    delta = np.array([0.3, -0.2, 0.0, 0.1])
    layer.running_mean.sub_(torch.from_numpy(delta))  # eval outputs shifted by W delta
    (shifted,) = measure_drift(layer, batches, [("w", layer)])
    expected = np.concatenate([whiten[i] @ delta[2 * i : 2 * i + 2] for i in range(2)])
    assert shifted.mean_shift == pytest.approx(expected[shifted.channel], rel=1e-6)
    assert shifted.value == pytest.approx(abs(expected).max(), rel=1e-6)


def _norm_layer(pl_module, name: str = "net.layers.1.norm") -> nn.Module:
    return dict(running_stat_layers(pl_module))[name]


class PlantNaN(Callback):
    """Puts a NaN into a running variance after the given optimizer step."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == self.step:
            _norm_layer(pl_module).running_var[0] = float("nan")


class TrainModeValidation(Callback):
    """The bug to catch: the model left in train mode during validation."""

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
        pl_module.train()


class InflateVariance(Callback):
    """Makes one layer's running variance 25x too large after the epoch's last step. The
    layers keep cumulative averages (momentum None), which the check measures from the
    first step on, so a few steps suffice."""

    def on_fit_start(self, trainer, pl_module):
        for _, layer in running_stat_layers(pl_module):
            layer.momentum = None

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if batch_idx == trainer.num_training_batches - 1:
            _norm_layer(pl_module).running_var.mul_(25.0)


def _our_warnings(caught) -> list[str]:
    return [str(w.message) for w in caught if "RunningStatsCheck" in str(w.message)]


@pytest.mark.parametrize("norm", ["batch", "iter"])
def test_healthy_run_is_silent_and_logs_drift(norm, tmp_path):
    check = RunningStatsCheck(every_n_steps=1, drift_batches=4, drift_action="raise")
    # A seeded init: IterNorm's drift over seeds 0-5 measured 0.40-0.94, but an init drawn
    # from whatever RNG state earlier tests left once reached 1.23.
    torch.manual_seed(0)
    model = digits_model(norm=norm)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        # 30 steps: a momentum-0.1 average has forgotten its initial value (checked from then on)
        trainer, model, _ = fit([check], tmp_path, model=model, epochs=1, batches=30)
    assert not _our_warnings(caught)
    names = [name for name, _ in running_stat_layers(model)]
    assert sorted(check.drift) == sorted(names) and len(names) == 2
    assert all(0 <= value < check.drift_threshold for value in check.drift.values())
    logged = trainer.logger.experiment  # flushed by the logger at fit end
    assert logged is not None
    from callback_helpers import read_events

    events = read_events(trainer.log_dir)
    assert {f"running_stats/drift/{n}" for n in names} <= set(events.Tags()["scalars"])


def test_nan_in_running_variance_stops_training_naming_layer_and_step():
    with pytest.raises(FloatingPointError) as error:
        fit([PlantNaN(step=3), RunningStatsCheck(every_n_steps=1)], epochs=1)
    message = str(error.value)
    assert "net.layers.1.norm: running_var has 1 NaN" in message
    assert "global step 3" in message


def test_nan_is_found_at_validation_even_between_step_checks():
    # every_n_steps=0: only validation checks; the NaN of step 2 is found at epoch end
    with pytest.raises(FloatingPointError, match="after validation"):
        fit([PlantNaN(step=2), RunningStatsCheck(every_n_steps=0)], epochs=1, batches=4)


def test_validation_in_train_mode_is_caught():
    with pytest.raises(RuntimeError, match="ran in train mode on validation data") as error:
        fit([TrainModeValidation(), RunningStatsCheck()], epochs=1)
    assert "net.layers.1.norm.running_mean" in str(error.value)


def test_planted_drift_warns_with_layer_name_or_raises():
    check = RunningStatsCheck(drift_batches=4)
    with pytest.warns(UserWarning, match="RunningStatsCheck") as caught:
        fit([InflateVariance(), check], epochs=1, batches=8)
    message = _our_warnings(caught)[0]
    assert "net.layers.1.norm (channel" in message
    # 25x the variance: eval outputs 1/5 as wide, log std ratio -log 5 (+ a small true drift)
    assert check.drift["net.layers.1.norm"] == pytest.approx(np.log(5.0), abs=0.4)
    assert check.drift_warnings == 1

    with pytest.raises(RuntimeError, match="net.layers.1.norm"):
        fit(
            [InflateVariance(), RunningStatsCheck(drift_batches=4, drift_action="raise")],
            epochs=1,
            batches=8,
        )


class Probe(Callback):
    """Records the check's state as it is when training (re)starts."""

    def __init__(self, check: RunningStatsCheck) -> None:
        self.check, self.seen = check, {}

    def on_train_start(self, trainer, pl_module):
        self.seen = {"drift": dict(self.check.drift), "warnings": self.check.drift_warnings}


def test_state_is_restored_on_resume(tmp_path):
    first = RunningStatsCheck(drift_batches=4)
    with pytest.warns(UserWarning, match="RunningStatsCheck"):
        trainer, _, _ = fit(
            [InflateVariance(), first], tmp_path, epochs=1, batches=8, checkpoint=True
        )
    last = trainer.checkpoint_callback.last_model_path
    resumed = RunningStatsCheck(drift_batches=4)
    probe = Probe(resumed)
    with pytest.warns(UserWarning, match="RunningStatsCheck"):
        fit(
            [InflateVariance(), resumed, probe],
            tmp_path,
            epochs=2,
            batches=8,
            checkpoint=True,
            ckpt_path=last,
        )
    assert probe.seen == {"drift": first.drift, "warnings": 1}
    assert resumed.drift != first.drift and resumed.drift_warnings == 2  # epoch 2 counted on


@pytest.mark.parametrize(
    ("kwargs", "key"),
    [
        ({"every_n_steps": -1}, "every_n_steps"),
        ({"drift_batches": -2}, "drift_batches"),
        ({"drift_threshold": 0}, "drift_threshold"),
        ({"drift_action": "ignore"}, "drift_action"),
    ],
)
def test_misconfiguration_names_the_argument(kwargs, key):
    with pytest.raises(ValueError, match=key):
        RunningStatsCheck(**kwargs)


def test_drift_is_measured_only_for_batch_statistics():
    """InstanceNorm's tracked statistics average per-sample ones, and a layer with a running
    mean alone has no spread to compare: their health is checked, their drift is not."""
    from plugins.my_norm import MeanOnlyBatchNorm

    model = nn.Sequential(
        nn.Conv2d(2, 3, 1),
        nn.InstanceNorm2d(3, track_running_stats=True),
        MeanOnlyBatchNorm(3),
        nn.BatchNorm2d(3),
    )
    layers = running_stat_layers(model)
    assert [name for name, _ in layers] == ["1", "2", "3"]
    drifts = measure_drift(model, [torch.randn(4, 2, 5, 5)], layers)
    assert [d.layer for d in drifts] == ["3"]
