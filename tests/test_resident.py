"""data.device_resident and data.batch_augment: the same batches as the loader path, the same
weights after a fit, augmentation against hand computations (NumPy padding and crops, an
enumeration of cutout squares, binomial and chi-square bounds on the draws), resume in
mid-epoch bitwise equal to an uninterrupted run, and DDP shards."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
import yaml
from callback_helpers import one_thread
from scipy import stats

from conftest import CONFIGS, shrink_args
from dnn_tricks.data.batch_augment import BatchAugment, BatchAugmentConfig, cutout, translate
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.data.resident import ResidentBatches, epoch_generator

DIGITS = CONFIGS / "digits.yaml"
RESIDENT = "--data.device_resident=true"


@pytest.fixture(autouse=True)
def _single_thread():
    with one_thread():
        yield


def _pair(monkeypatch, **kwargs) -> tuple[DataModule, DataModule]:
    monkeypatch.setenv("PL_GLOBAL_SEED", "7")
    loader = DataModule(source="digits", batch_size=32, **kwargs)
    resident = DataModule(source="digits", batch_size=32, device_resident=True, **kwargs)
    return loader, resident


def _assert_same_batches(a, b) -> None:
    a, b = list(a), list(b)
    assert len(a) == len(b) > 0
    for (xa, ya), (xb, yb) in zip(a, b, strict=True):
        assert xa.dtype == xb.dtype == torch.uint8
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_train_batches_equal_the_loader_path_epoch_by_epoch(monkeypatch):
    loader, resident = _pair(monkeypatch)
    a, b = loader.train_dataloader(), resident.train_dataloader()
    # the train split in full batches, the ragged tail dropped
    assert len(a) == len(b) == len(resident.split("train")[1]) // 32
    for epoch in (0, 1, 5):
        a.sampler.set_epoch(epoch)
        b.sampler.set_epoch(epoch)
        _assert_same_batches(a, b)


def test_evaluation_batches_are_the_split_in_order(monkeypatch):
    loader, resident = _pair(monkeypatch, eval_batch_size=100)
    _assert_same_batches(loader.val_dataloader(), resident.val_dataloader())
    _assert_same_batches(loader.test_dataloader(), resident.test_dataloader())
    x, y = resident.split("test")
    seen = torch.cat([labels for _, labels in resident.test_dataloader()])
    assert torch.equal(seen, torch.from_numpy(y))  # every test sample once, in order


def test_fit_trains_to_the_same_weights_as_the_loader_path(run_cli, tmp_path):
    """Same batches and the same global random stream (dropout): bitwise the same model."""
    weights = []
    for name, extra in (("loader", []), ("resident", [RESIDENT])):
        logs = tmp_path / name
        args = [*shrink_args(logs, 2, 5), "--test_after_fit=false", *extra]
        run_cli(["fit", "--config", DIGITS, *args])
        state = torch.load(next(logs.rglob("last.ckpt")), weights_only=True)["state_dict"]
        weights.append(state)
    assert weights[0].keys() == weights[1].keys()
    for key in weights[0]:
        assert torch.equal(weights[0][key], weights[1][key]), key


def _images(n: int, height: int = 8, width: int = 8, seed: int = 0) -> torch.Tensor:
    rng = np.random.default_rng(seed)
    return torch.from_numpy(rng.integers(1, 256, size=(n, 2, height, width), dtype=np.uint8))


def test_flip_mirrors_exactly_with_the_configured_probability():
    n, p = 20_000, 0.3
    x = _images(n)
    augment = BatchAugment(BatchAugmentConfig(flip=p), (2, 8, 8))
    out = augment(x, augment.draw(n, epoch_generator(1, 0, 0)))
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    kept = (out == x).flatten(1).all(1)
    assert bool((flipped ^ kept).all())  # each image is itself or its exact mirror
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(float(flipped.float().mean()) - p) < 5 * sigma


@pytest.mark.parametrize("padding", ["constant", "reflect"])
def test_translate_is_a_crop_of_the_padded_image(padding):
    shift, fill = 3, 17
    x = _images(64, height=7, width=9)
    rng = np.random.default_rng(1)
    dy = torch.from_numpy(rng.integers(-shift, shift + 1, 64))
    dx = torch.from_numpy(rng.integers(-shift, shift + 1, 64))
    out = translate(x, dy, dx, padding, fill)
    pad = ((0, 0), (shift, shift), (shift, shift))
    for i in range(64):
        if padding == "constant":
            padded = np.pad(x[i].numpy(), pad, mode="constant", constant_values=fill)
        else:
            padded = np.pad(x[i].numpy(), pad, mode="reflect")  # edge pixel not repeated
        top, left = shift + int(dy[i]), shift + int(dx[i])
        expected = padded[:, top : top + 7, left : left + 9]
        np.testing.assert_array_equal(out[i].numpy(), expected)


def test_translate_draws_cover_the_range_uniformly():
    shift, n = 2, 25_000
    augment = BatchAugment(BatchAugmentConfig(translate=shift), (1, 8, 8))
    params = augment.draw(n, epoch_generator(3, 0, 0))
    for axis in ("dy", "dx"):
        counts = np.bincount(params[axis].numpy() + shift, minlength=2 * shift + 1)
        assert len(counts) == 2 * shift + 1  # nothing beyond +-shift
        assert stats.chisquare(counts).pvalue > 1e-4


def test_cutout_area_matches_an_enumeration_of_squares():
    size, height, width, prob, n = 5, 8, 10, 0.75, 40_000
    # hand computation: the clipped square's area for each possible centre, averaged
    area = np.zeros((height, width))
    for cy in range(height):
        for cx in range(width):
            top, left = cy - size // 2, cx - size // 2
            rows = min(top + size, height) - max(top, 0)
            cols = min(left + size, width) - max(left, 0)
            area[cy, cx] = rows * cols
    expected = prob * area.mean() / (height * width)

    x = torch.full((n, 1, height, width), 255, dtype=torch.uint8)
    config = BatchAugmentConfig(cutout=size, cutout_prob=prob, fill=0)
    augment = BatchAugment(config, (1, height, width))
    out = augment(x, augment.draw(n, epoch_generator(5, 0, 0)))
    cut = (out == 0).float().mean(dim=(1, 2, 3))
    assert abs(float(cut.mean()) - expected) < 5 * float(cut.std()) / n**0.5
    one = cutout(x[:1], torch.tensor([1]), torch.tensor([9]), size, torch.tensor([True]))
    hand = np.full((height, width), 255, dtype=np.uint8)
    hand[0:4, 7:10] = 0  # rows -1..3 and columns 7..11, clipped
    np.testing.assert_array_equal(one[0, 0].numpy(), hand)


def test_draws_depend_on_seed_rank_and_epoch_only():
    augment = BatchAugment(BatchAugmentConfig(flip=0.5, translate=2, cutout=3), (1, 8, 8))

    def draw(seed, rank, epoch):
        return torch.stack(list(augment.draw(500, epoch_generator(seed, rank, epoch)).values()))

    assert torch.equal(draw(0, 0, 3), draw(0, 0, 3))
    assert not torch.equal(draw(0, 0, 3), draw(0, 1, 3))
    assert not torch.equal(draw(0, 0, 3), draw(0, 0, 4))
    assert not torch.equal(draw(0, 0, 3), draw(1, 0, 3))


def _augmented_batches(**kwargs) -> ResidentBatches:
    x, y = _images(300), torch.arange(300)
    augment = BatchAugment(BatchAugmentConfig(flip=0.5, translate=2, cutout=3), (2, 8, 8))
    return ResidentBatches(x, y, 32, seed=11, drop_last=True, augment=augment, **kwargs)


def test_a_resumed_epoch_continues_with_the_next_batch_and_the_same_draws():
    full = _augmented_batches()
    full.sampler.set_epoch(4)
    expected = list(full)

    first = _augmented_batches()
    first.sampler.set_epoch(4)
    iterator = iter(first)
    for _ in range(3):
        next(iterator)
    state = first.state_dict()
    assert state == {"epoch": 4, "batches": 3}

    resumed = _augmented_batches()
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(4)
    rest = list(resumed)
    assert len(rest) == len(expected) - 3
    for (xa, ya), (xb, yb) in zip(expected[3:], rest, strict=True):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    resumed.sampler.set_epoch(5)  # the next epoch starts from its beginning
    assert len(list(resumed)) == len(expected)


def test_ddp_ranks_take_disjoint_equal_shards_of_the_same_permutation():
    one = _augmented_batches()
    one.sampler.set_epoch(2)
    permutation = torch.cat([y for _, y in one])  # labels are the row numbers
    shards = []
    for rank in (0, 1):
        part = _augmented_batches(rank=rank, world_size=2)
        part.sampler.set_epoch(2)
        assert len(part) == (300 // 2) // 32
        shards.append(torch.cat([y for _, y in part]))
    assert len(shards[0]) == len(shards[1])
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
    full = _augmented_batches()
    full.sampler.set_epoch(2)
    whole = torch.tensor(list(iter(full.sampler)))
    assert torch.equal(shards[0], whole[0::2][: len(shards[0])])
    assert torch.equal(shards[1], whole[1::2][: len(shards[1])])
    assert set(permutation.tolist()) <= set(whole.tolist())


def test_fit_resumed_in_mid_epoch_ends_bitwise_like_an_uninterrupted_run(run_cli, tmp_path):
    """A checkpoint after step 9 (epoch 1, batch 3 of 6), resumed: the same batches, the
    same augmentation draws and random stream, the same final weights (a per-step OneCycle
    schedule makes Lightning read the loader's length before the checkpoint: the state then
    travels through the DataModule)."""
    augment = [
        RESIDENT,
        "--data.batch_augment.flip=0.5",
        "--data.batch_augment.translate=1",
        "--data.batch_augment.cutout=3",
        "--model.scheduler=torch.optim.lr_scheduler.OneCycleLR",
        "--model.scheduler.max_lr=0.1",
        "--model.scheduler_interval=step",
        "--test_after_fit=false",
    ]
    mid = {
        "class_path": "lightning.pytorch.callbacks.ModelCheckpoint",
        "init_args": {"filename": "mid-{step}", "every_n_train_steps": 9, "save_top_k": -1},
    }
    straight = tmp_path / "straight"
    run_cli(
        [
            "fit",
            "--config",
            DIGITS,
            *shrink_args(straight, 3, 6),
            *augment,
            f"--trainer.callbacks+={json.dumps(mid)}",
        ]
    )
    checkpoints = next(straight.rglob("checkpoints"))
    resumed = tmp_path / "resumed"
    run_cli(
        [
            "fit",
            "--config",
            DIGITS,
            *shrink_args(resumed, 3, 6),
            *augment,
            f"--ckpt_path={checkpoints / 'mid-step=9.ckpt'}",
        ]
    )
    a = torch.load(checkpoints / "last.ckpt", weights_only=True)
    b = torch.load(next(resumed.rglob("last.ckpt")), weights_only=True)
    assert a["global_step"] == b["global_step"] == 18
    for key in a["state_dict"]:
        assert torch.equal(a["state_dict"][key], b["state_dict"][key]), key


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (["--data.batch_augment.flip=0.5"], "data.batch_augment acts on device-resident"),
        ([RESIDENT, f"--data.augment={CONFIGS / 'augment' / 'light.yaml'}"], "data.augment"),
        ([RESIDENT, "--data.batch_augment.translate=8"], "data.batch_augment.translate=8"),
        ([RESIDENT, "--data.batch_augment.flip=1.5"], "probabilities"),
    ],
)
def test_misconfigurations_fail_in_one_line(run_cli, tmp_path, capsys, overrides, message):
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", DIGITS, *shrink_args(tmp_path / "logs"), *overrides])
    assert exit_info.value.code == 2
    error = capsys.readouterr().err.strip().splitlines()[-1]
    assert error.startswith("error: ") and message in error


def test_tabular_rows_stay_resident_but_refuse_image_augmentation(monkeypatch):
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    data = DataModule(source="wine", batch_size=16, device_resident=True)
    x, _ = next(iter(data.train_dataloader()))
    assert x.dtype == torch.float32 and x.shape == (16, 13)
    augmenting = DataModule(
        source="wine", batch_size=16, device_resident=True, batch_augment=BatchAugmentConfig()
    )
    with pytest.raises(ValueError, match="needs images"):
        augmenting.train_dataloader()


def test_two_ddp_processes_split_the_resident_data(tmp_path):
    from test_ddp import run_ddp

    ranks = run_ddp(tmp_path, "--trainer.max_epochs=1", RESIDENT)
    data = DataModule(**yaml.safe_load((CONFIGS / "data" / "digits.yaml").read_text()))
    train, val = (len(data.split(name)[1]) for name in ("train", "val"))
    steps = (train // 2) // data.batch_size  # equal shards of the train split
    assert [r["train_batches"] for r in ranks] == [steps, steps]
    assert ranks[0]["global_step"] == ranks[1]["global_step"] == steps
    assert ranks[0]["weights"] == ranks[1]["weights"]  # gradients all-reduced: one model
    assert ranks[0]["val_samples"] + ranks[1]["val_samples"] == val  # each sample once


def test_deep_copies_share_the_device_data_and_an_ema_fit_runs(run_cli, tmp_path, monkeypatch):
    """EMA's AveragedModel deep-copies the LightningModule, which reaches the trainer and its
    batches through the CLI's optimizer factory: the copy must not fail on the running pass
    nor duplicate the device tensors."""
    import copy

    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    data = DataModule(source="digits", batch_size=32, device_resident=True)
    batches = data.train_dataloader()
    running = iter(batches)
    next(running)
    assert copy.deepcopy(batches) is batches and copy.deepcopy(running) is running
    assert copy.deepcopy(data)._resident is data._resident
    ema = "--trainer.callbacks+=dnn_tricks.callbacks.averaging.EMA"
    run_cli(["fit", "--config", DIGITS, *shrink_args(tmp_path / "logs", 2, 3), RESIDENT, ema])
