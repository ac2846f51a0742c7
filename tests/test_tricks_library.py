"""Tricks the libraries provide, switched on as a config does, each seen acting: weight
averaging (EMA, SWA), the lr and batch-size finders, gradient clipping and accumulation,
mixup / cutmix, compile and channels_last. References are hand computations of the
documented formulas."""

from __future__ import annotations

import functools
import json
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from lightning.pytorch import Callback, Trainer, seed_everything
from lightning.pytorch.callbacks import ModelCheckpoint, StochasticWeightAveraging
from scipy import stats
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIGS
from dnn_tricks.callbacks.averaging import EMA
from dnn_tricks.callbacks.batch_size import TrainBatchSizeFinder
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.input_norm import NormalizeConfig
from dnn_tricks.models.mixing import BatchMixing, MixConfig
from dnn_tricks.models.nets import MLP, ConvNet
from dnn_tricks.regularize import Jacobian


def _model(norm: str = "none", lr: float = 0.05, momentum: float = 0.0, **kwargs: Any):
    return Classifier(
        net=functools.partial(MLP, hidden=[16], norm=norm),
        optimizer=functools.partial(torch.optim.SGD, lr=lr, momentum=momentum),
        input_shape=(1, 8, 8),
        num_classes=10,
        **kwargs,
    )


def _trainer(callbacks: list[Callback], epochs: int = 1, batches: int = 4, **kwargs: Any):
    return Trainer(
        max_epochs=epochs,
        limit_train_batches=batches,
        limit_val_batches=kwargs.pop("limit_val_batches", 0),
        accelerator="cpu",
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        **kwargs,
    )


def _digits(batch_size: int = 32) -> DataModule:
    return DataModule(source="digits", batch_size=batch_size, num_workers=0)


def _params(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in module.named_parameters()}


class _Record(Callback):
    """The network's weights after every optimizer step and at every epoch end, and the lr
    of every batch."""

    def __init__(self) -> None:
        self.steps: list[dict] = []
        self.epochs: list[dict] = []
        self.lrs: list[float] = []

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.lrs.append(trainer.optimizers[0].param_groups[0]["lr"])

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.steps.append(_params(pl_module.net))

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        self.epochs.append(_params(pl_module.net))


# ------------------------------------------------------------------ weight averaging


def test_ema_final_weights_are_the_moving_average_of_the_steps():
    """theta_ema = theta_1, then theta_ema <- d theta_ema + (1 - d) theta_t after every step;
    the fitted input normalization and integer buffers come through intact."""
    seed_everything(0, verbose=False)
    decay, record = 0.8, _Record()
    model = _model(norm="batch", input_norm=NormalizeConfig(kind="standardize"))
    trainer = _trainer([record, EMA(decay=decay)], epochs=2, batches=4, limit_val_batches=2)
    trainer.fit(model, _digits())
    assert len(record.steps) == 8
    expected = dict(record.steps[0])
    for weights in record.steps[1:]:
        expected = {k: decay * expected[k] + (1 - decay) * weights[k] for k in expected}
    final = _params(model.net)
    for name in final:
        torch.testing.assert_close(final[name], expected[name], rtol=1e-5, atol=1e-6)
    moved = max(float((final[n] - record.steps[-1][n]).abs().max()) for n in final)
    assert moved > 1e-3  # the average, not the last weights
    # BatchNorm's step counter and the normalizer's codes are copied, not averaged
    assert int(model.net.layers[1].norm.num_batches_tracked) == 8
    fresh = _model(norm="batch", input_norm=NormalizeConfig(kind="standardize"))
    fresh.load_state_dict(model.state_dict())  # kind / shape codes intact: loads
    x = torch.rand(5, 1, 8, 8)
    torch.testing.assert_close(fresh.input_norm(x), model.input_norm(x))


def test_ema_resumed_run_ends_like_the_uninterrupted_one(tmp_path):
    """The checkpoint carries the average and the current weights: 2 epochs, then a resume to
    4, ends where 4 epochs straight end."""

    def run(epochs: int, folder: str, ckpt_path: Any = None) -> Classifier:
        seed_everything(0, verbose=False)
        model = _model(norm="batch", input_norm=NormalizeConfig(kind="standardize"))
        trainer = Trainer(
            max_epochs=epochs,
            limit_train_batches=4,
            limit_val_batches=2,
            accelerator="cpu",
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[EMA(decay=0.8), ModelCheckpoint(tmp_path / folder, save_last=True)],
        )
        # test-made checkpoints name functools.partial hyperparameters: trusted here
        trainer.fit(model, _digits(), ckpt_path=ckpt_path, weights_only=False)
        return model

    straight = run(4, "straight")
    run(2, "first")
    resumed = run(4, "first", ckpt_path=tmp_path / "first" / "last.ckpt")
    for (name, a), (_, b) in zip(
        straight.state_dict().items(), resumed.state_dict().items(), strict=True
    ):
        torch.testing.assert_close(b, a, rtol=1e-6, atol=1e-7, msg=name)


def test_swa_averages_the_epoch_weights_at_the_swa_lr():
    """From swa_epoch_start on the lr anneals to swa_lrs, and the final weights are the mean
    of the weights sampled once per SWA epoch (Izmailov et al. 2018); Lightning samples them
    as each SWA epoch starts, i.e. at the previous epoch's end."""
    seed_everything(0, verbose=False)
    record = _Record()
    swa = StochasticWeightAveraging(swa_lrs=0.01, swa_epoch_start=2, annealing_epochs=1)
    trainer = _trainer([record, swa], epochs=4, batches=3)
    model = _model(lr=0.1, input_norm=NormalizeConfig(kind="none"))
    trainer.fit(model, _digits())
    # swa_epoch_start counts from 1: the 2nd epoch (index 1) is the first SWA epoch, whose
    # lr anneals to swa_lrs over annealing_epochs
    assert record.lrs[:6] == [0.1] * 6 and record.lrs[-6:] == [pytest.approx(0.01)] * 6
    final = _params(model.net)
    for name in final:
        mean = sum(record.epochs[epoch][name] for epoch in (0, 1, 2)) / 3
        torch.testing.assert_close(final[name], mean)
        assert not torch.allclose(final[name], record.epochs[3][name])


# ------------------------------------------------------------------ finders


def test_lr_find_command_writes_the_sweep_and_its_suggestion(run_cli, tmp_path):
    out = tmp_path / "lr"
    run_cli(
        [
            "lr-find",
            "--config",
            CONFIGS / "digits.yaml",
            "--num_training=25",
            "--min_lr=1e-4",
            "--max_lr=1",
            f"--out={out}",
            "--trainer.enable_progress_bar=false",
            "--data.num_workers=0",
        ]
    )
    result = json.loads((out / "lr_find.json").read_text())
    assert (out / "lr_find.png").stat().st_size > 0
    lrs, losses = np.array(result["lr"]), np.array(result["loss"])
    assert 12 <= len(lrs) <= 25  # stops early only if the loss diverges
    # exponential sweep from min_lr: a constant ratio from step to step, ending at max_lr
    assert lrs[0] == pytest.approx(1e-4) and np.all(lrs <= 1 + 1e-12)
    ratios = lrs[2:] / lrs[1:-1]
    np.testing.assert_allclose(ratios, (1 / 1e-4) ** (1 / 25), rtol=1e-9)
    if len(lrs) == 25:
        assert lrs[-1] == pytest.approx(1.0)
    # the suggestion: where d loss / d lr is most negative, first 10 points and the last skipped
    slope = np.gradient(losses[10:-1], lrs[10:-1])
    assert result["suggested_lr"] == pytest.approx(lrs[10 + slope.argmin()])
    assert not list(tmp_path.rglob("*.ckpt")) and not list(tmp_path.rglob("config.yaml"))


class _FailsAbove(Classifier):
    """A model whose training step runs out of memory for batches above ``limit``, as a
    too-large batch does on an accelerator."""

    limit = 32

    def training_step(self, batch, batch_idx):
        if batch[0].shape[0] > self.limit:
            raise RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate")
        return super().training_step(batch, batch_idx)


def test_batch_size_finder_doubles_until_out_of_memory():
    """power mode: 8 -> 16 -> 32 -> 64 runs out of memory -> the fit trains at 32, with the
    model's fitted input normalization; the evaluation after fit searches nothing."""
    seed_everything(0, verbose=False)
    model = _FailsAbove(
        net=functools.partial(MLP, hidden=[16]),
        input_norm=NormalizeConfig(kind="standardize"),
        input_shape=(1, 8, 8),
        num_classes=10,
    )
    sizes: list[int] = []

    class Sizes(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            sizes.append(batch[0].shape[0])

    finder = TrainBatchSizeFinder(mode="power", steps_per_trial=1, init_val=8, max_trials=6)
    data = _digits(batch_size=8)
    # the finder restores the model from its own checkpoint, whose hyperparameters name these
    trusted = [functools.partial, MLP, torch.optim.Adam, NormalizeConfig]
    trainer = _trainer([finder, Sizes()], epochs=1, batches=3)
    with torch.serialization.safe_globals(trusted):
        trainer.fit(model, data)
        trainer.test(model, data, verbose=False)
    assert finder.optimal_batch_size == 32 and data.batch_size == 32
    # the trials run with the other callbacks switched off: only the real batches are seen
    assert sizes == [32, 32, 32]


# ------------------------------------------------------------------ gradients


class _Gradients(Callback):
    """Gradients as backward left them (before clipping) and the weights around each step."""

    def __init__(self) -> None:
        self.before: list[tuple[dict, dict]] = []
        self.after: list[dict] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        grads = {n: p.grad.detach().clone() for n, p in pl_module.net.named_parameters()}
        self.before.append((_params(pl_module.net), grads))

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        self.after.append(_params(pl_module.net))


@pytest.mark.parametrize("algorithm", ["norm", "value"])
def test_gradient_clipping_clips_what_the_step_uses(algorithm):
    """Plain SGD moves by -lr g, so the step shows the gradient it used: by norm
    g * min(1, c / (||g|| + 1e-6)) over all parameters together, by value clamp(g, -c, c)."""
    seed_everything(0, verbose=False)
    clip, lr, seen = 0.05, 0.1, _Gradients()
    trainer = _trainer([seen], batches=2, gradient_clip_val=clip, gradient_clip_algorithm=algorithm)
    trainer.fit(_model(lr=lr, input_norm=NormalizeConfig(kind="none")), _digits())
    for (weights, grads), after in zip(seen.before, seen.after, strict=True):
        total = math.sqrt(sum(float(g.pow(2).sum()) for g in grads.values()))
        biggest = max(float(g.abs().max()) for g in grads.values())
        assert (total if algorithm == "norm" else biggest) > clip  # clipping is active
        for name, g in grads.items():
            if algorithm == "norm":
                expected = g * min(1.0, clip / (total + 1e-6))
            else:
                expected = g.clamp(-clip, clip)
            used = (weights[name] - after[name]) / lr
            torch.testing.assert_close(used, expected, rtol=1e-4, atol=1e-6)


def test_gradient_accumulation_equals_the_big_batch_step():
    """accumulate_grad_batches=4 over batches of 16 steps every 4th batch and moves the
    weights as one step on the same 64 samples does (mean loss, so equal gradients)."""
    generator = torch.Generator().manual_seed(0)
    x, y = torch.rand(128, 1, 8, 8, generator=generator), torch.arange(128) % 10

    def run(batch_size: int, accumulate: int) -> tuple[dict, list[int]]:
        seed_everything(0, verbose=False)
        model = _model(lr=0.5, input_norm=NormalizeConfig(kind="none"))
        steps: list[int] = []

        class Steps(Callback):
            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                steps.append(trainer.global_step)

        loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)
        trainer = _trainer([Steps()], batches=1.0, accumulate_grad_batches=accumulate)
        trainer.fit(model, train_dataloaders=loader)
        return _params(model.net), steps

    small, small_steps = run(16, 4)
    big, big_steps = run(64, 1)
    assert small_steps == [0, 0, 0, 1, 1, 1, 1, 2] and big_steps == [1, 2]
    for name in big:
        torch.testing.assert_close(small[name], big[name], rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------ mixup / cutmix


def _batch(n: int = 8) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    return torch.rand(n, 3, 6, 6, generator=generator), torch.arange(n) % 5


def test_mixup_mixes_neighbours_with_a_beta_weight():
    """x' = lam x_i + (1 - lam) x_{i-1}, y' = lam onehot(y_i) + (1 - lam) onehot(y_{i-1}),
    lam ~ Beta(alpha, alpha) (Zhang et al. 2018)."""
    mixing = BatchMixing(MixConfig(mixup_alpha=0.4), num_classes=5)
    x, y = _batch()
    torch.manual_seed(0)
    lams = []
    for _ in range(400):
        mixed, soft = mixing(x, y)
        lam = float(soft[0, y[0]])  # y_0 differs from its neighbour y_{-1}
        onehot = F.one_hot(y, 5).float()
        torch.testing.assert_close(mixed, lam * x + (1 - lam) * x.roll(1, 0))
        torch.testing.assert_close(soft, lam * onehot + (1 - lam) * onehot.roll(1, 0))
        lams.append(lam)
    assert stats.kstest(lams, stats.beta(0.4, 0.4).cdf).pvalue > 1e-3


def test_cutmix_pastes_a_box_and_weighs_labels_by_area():
    """Each pixel comes from x_i or, inside one box, from x_{i-1}; the label weight of y_i
    is the share of pixels x_i kept (Yun et al. 2019)."""
    mixing = BatchMixing(MixConfig(cutmix_alpha=1.0), num_classes=5)
    x, y = _batch()
    torch.manual_seed(0)
    for _ in range(50):
        mixed, soft = mixing(x, y)
        from_neighbour = (mixed != x).any(dim=1)  # N x H x W
        assert torch.equal(mixed[:, :, from_neighbour[0]], x.roll(1, 0)[:, :, from_neighbour[0]])
        rows, cols = from_neighbour[0].any(1), from_neighbour[0].any(0)
        assert int(from_neighbour[0].sum()) == int(rows.sum()) * int(cols.sum())  # a box
        kept = 1 - float(from_neighbour[0].sum()) / 36
        assert float(soft[0, y[0]]) == pytest.approx(kept, abs=1e-6)
        assert soft.sum(1).tolist() == pytest.approx([1.0] * 8)


def test_mixing_prob_and_errors():
    x, y = _batch()
    unmixed, soft = BatchMixing(MixConfig(mixup_alpha=1.0, prob=0.0), 5)(x, y)
    assert torch.equal(unmixed, x) and torch.equal(soft, F.one_hot(y, 5).float())
    with pytest.raises(ValueError, match="mixup_alpha > 0 or cutmix_alpha > 0"):
        BatchMixing(MixConfig(), 5)
    with pytest.raises(ValueError, match="model.mixing.prob"):
        BatchMixing(MixConfig(mixup_alpha=1.0, prob=2.0), 5)
    with pytest.raises(ValueError, match="N x C x H x W"):
        BatchMixing(MixConfig(mixup_alpha=1.0), 5)(torch.rand(4, 13), torch.arange(4))


def test_classifier_trains_on_mixed_batches_with_soft_target_cross_entropy():
    model = _model(input_norm=NormalizeConfig(kind="none"), mixing=MixConfig(mixup_alpha=1.0))
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    torch.manual_seed(3)
    loss = model.training_step((x, y), 0)
    torch.manual_seed(3)
    mixed, soft = BatchMixing(MixConfig(mixup_alpha=1.0), 10)(x, y)
    logits = model.net(mixed)
    expected = -(soft * torch.log_softmax(logits, dim=1)).sum(1).mean()
    torch.testing.assert_close(loss, expected)
    assert not torch.allclose(loss, F.cross_entropy(model.net(x), y))


# ------------------------------------------------------------------ compile, channels_last


def test_compile_and_channels_last_match_eager_and_keep_parameter_names():
    """nn.Module.compile compiles in place: the state dict keeps the eager names (no
    "_orig_mod."), compiled NHWC training gives eager's loss and gradients on CPU, and the
    Jacobian penalty still trains."""

    def make(**kwargs: Any) -> Classifier:
        torch.manual_seed(0)
        return Classifier(
            net=functools.partial(ConvNet, channels=[4], convs_per_stage=1, hidden=[8]),
            input_norm=NormalizeConfig(kind="none"),
            input_shape=(1, 8, 8),
            num_classes=10,
            regularizers=[Jacobian(weight=0.1, projections=-1)],
            **kwargs,
        )

    eager, fast = make(), make(compile=True, channels_last=True)
    assert list(fast.state_dict()) == list(eager.state_dict())
    assert not any("_orig_mod" in name for name in fast.state_dict())
    x, y = torch.rand(16, 1, 8, 8), torch.arange(16) % 10
    losses = []
    for model in (eager, fast):
        loss = F.cross_entropy(model(x), y)
        loss.backward()
        losses.append(float(loss))
    assert losses[1] == pytest.approx(losses[0], abs=1e-5)
    for a, b in zip(eager.net.parameters(), fast.net.parameters(), strict=True):
        torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-5)
    # the Jacobian penalty differentiates twice, which compiled graphs cannot: it runs eager
    penalties = []
    for model in (eager, fast):
        model.zero_grad()
        terms, _ = model._penalties(x)
        terms["jacobian"].backward()
        penalties.append(float(terms["jacobian"]))
    assert penalties[1] == pytest.approx(penalties[0], rel=1e-5)
    for a, b in zip(eager.net.parameters(), fast.net.parameters(), strict=True):
        if a.grad is not None:
            torch.testing.assert_close(b.grad, a.grad, rtol=1e-4, atol=1e-6)
