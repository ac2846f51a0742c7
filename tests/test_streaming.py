"""Streaming with LitData: ``trainer prepare-data`` writes a config's splits as chunks, and
``data.source: streaming`` trains from them, shuffled per epoch, each sample once per epoch
across two DDP processes, resuming mid-epoch bitwise like an uninterrupted run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from lightning.pytorch import Callback

from conftest import CONFIGS, REPO
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.data.streaming import write_chunks

litdata = pytest.importorskip("litdata")

N, BATCH = 500, 15  # 300 train samples: 10 steps of 2 x 15 under DDP, 20 steps alone


class SeenIds(Callback):
    """Records the id (feature 0) of every training sample per epoch, one file per rank.

    Args:
        out_dir: folder for ``rank<R>.json``.
    """

    def __init__(self, out_dir: str) -> None:
        self.out_dir, self.seen = Path(out_dir), {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        ids = batch[0][:, 0].round().long().tolist()
        self.seen.setdefault(str(trainer.current_epoch), []).extend(ids)

    def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, *args) -> None:
        if not trainer.sanity_checking:
            ids = batch[0][:, 0].round().long().tolist()
            self.seen.setdefault(f"val{trainer.current_epoch}", []).extend(ids)

    def on_fit_end(self, trainer, pl_module) -> None:
        self.out_dir.mkdir(parents=True, exist_ok=True)
        (self.out_dir / f"rank{trainer.global_rank}.json").write_text(json.dumps(self.seen))


def _config(folder: Path) -> Path:
    """Unique ids in feature 0 (so a test can tell samples apart), four classes."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, 6)).astype(np.float32)
    x[:, 0] = np.arange(N)
    y = (x[:, 1] > 0).astype(int) + 2 * (x[:, 2] > 0)
    np.savez(folder / "ids.npz", x=x, y=y)
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "devices": 1,
            "deterministic": True,
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "dnn_tricks.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(folder / "logs"), "name": "ids"},
            },
        },
        "model": {
            "input_norm": {"kind": "standardize"},
            "net": {"class_path": "dnn_tricks.models.nets.MLP", "init_args": {"hidden": [16]}},
            "optimizer": {"class_path": "torch.optim.SGD", "init_args": {"lr": 0.05}},
        },
        "data": {
            "source": "arrays",
            "root": str(folder / "ids.npz"),
            "batch_size": BATCH,
            "val_fraction": 0.25,
            "test_fraction": 0.2,
        },
    }
    path = folder / "ids.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """(config, chunk folder, the in-memory DataModule the chunks were written from)."""
    folder = tmp_path_factory.mktemp("streaming")
    config = _config(folder)
    data = yaml.safe_load(config.read_text())["data"]
    datamodule = DataModule(**data)
    write_chunks(datamodule, str(folder / "chunks"))
    return config, folder / "chunks", datamodule


def test_chunks_hold_the_config_splits_in_order(prepared):
    _, chunks, reference = prepared
    meta = json.loads((chunks / "dnn_tricks_chunks.json").read_text())
    assert meta["source"] == "arrays" and meta["input_shape"] == [6]
    assert meta["counts"] == {"train": 300, "val": 100, "test": 100}
    for split in ("train", "val", "test"):
        x, y = reference.split(split)
        stored = litdata.StreamingDataset(str(chunks / split))
        records = [stored[i] for i in range(len(stored))]
        np.testing.assert_array_equal(np.stack([r["x"] for r in records]), x)
        np.testing.assert_array_equal([r["y"] for r in records], y)
    streamed = DataModule(source="streaming", root=str(chunks), batch_size=BATCH)
    assert streamed.input_shape == (6,) and streamed.class_names == reference.class_names
    fitted = torch.cat(list(streamed.raw_batches("train", batch=64)))
    np.testing.assert_array_equal(fitted.numpy(), reference.split("train")[0])


def test_each_epoch_is_shuffled_and_complete(prepared, monkeypatch):
    _, chunks, reference = prepared
    monkeypatch.setenv("PL_GLOBAL_SEED", "0")
    dm = DataModule(source="streaming", root=str(chunks), batch_size=BATCH)
    dm.setup("fit")
    loader = dm.train_dataloader()
    epochs = [[int(i) for x, _ in loader for i in x[:, 0]] for _ in range(2)]
    train_ids = sorted(reference.split("train")[0][:, 0].astype(int).tolist())
    for order in epochs:
        assert sorted(order) == train_ids  # every sample once
    assert epochs[0] != epochs[1] and epochs[0] != train_ids  # shuffled, anew each epoch


def test_prepare_data_command_and_a_streaming_fit(run_cli, tmp_path, prepared, capsys):
    config, _, _ = prepared
    out = tmp_path / "chunks"
    run_cli(["prepare-data", "--config", config, "--out", out])
    assert "train from it with --data.source=streaming" in capsys.readouterr().out
    run_cli(
        [
            "fit",
            "--config",
            config,
            "--data.source=streaming",
            f"--data.root={out}",
            "--trainer.max_epochs=1",
            f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        ]
    )
    assert list((tmp_path / "logs").glob("ids/version_0/checkpoints/*.ckpt"))


def test_two_ddp_processes_see_each_sample_once_per_epoch(prepared, tmp_path):
    config, chunks, reference = prepared
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "RANK", "WORLD_SIZE")}
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "tests"), env.get("PYTHONPATH", "")])
    command = [
        sys.executable,
        "-m",
        "dnn_tricks.cli",
        "fit",
        "--config",
        str(config),
        "--config",
        str(CONFIGS / "trainer" / "ddp_cpu.yaml"),
        "--data.source=streaming",
        f"--data.root={chunks}",
        "--test_after_fit=false",
        f"--trainer.logger.init_args.save_dir={tmp_path / 'logs'}",
        "--trainer.callbacks+=test_streaming.SeenIds",
        f"--trainer.callbacks.out_dir={tmp_path / 'seen'}",
    ]
    done = subprocess.run(
        command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )  # a hang fails the test instead of blocking CI
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [json.loads((tmp_path / "seen" / f"rank{r}.json").read_text()) for r in (0, 1)]
    train_ids = set(reference.split("train")[0][:, 0].astype(int).tolist())
    for epoch in ("0", "1"):
        first, second = ranks[0][epoch], ranks[1][epoch]
        assert len(first) == len(second) == 150  # half each, no padding
        assert not set(first) & set(second) and set(first) | set(second) == train_ids
    assert ranks[0]["0"] != ranks[0]["1"]
    # Validation: equal shares of the 100 samples, each on one rank.
    val_ids = reference.split("val")[0][:, 0].astype(int).tolist()
    for epoch in ("val0", "val1"):
        assert sorted(ranks[0][epoch] + ranks[1][epoch]) == sorted(val_ids)


def _fit(run_cli, config, chunks, name, out, *extra):
    run_cli(
        [
            "fit",
            "--config",
            config,
            "--data.source=streaming",
            f"--data.root={chunks}",
            "--test_after_fit=false",
            f"--trainer.logger.init_args.name={name}",
            "--trainer.callbacks+=test_streaming.SeenIds",
            f"--trainer.callbacks.out_dir={out}",
            *extra,
        ]
    )
    return json.loads((out / "rank0.json").read_text())


def test_resuming_mid_epoch_continues_at_the_next_batch_bitwise(run_cli, prepared, tmp_path):
    config, chunks, _ = prepared
    logs = yaml.safe_load(config.read_text())["trainer"]["logger"]["init_args"]["save_dir"]
    straight = _fit(run_cli, config, chunks, "straight", tmp_path / "a")
    cut = _fit(
        run_cli,
        config,
        chunks,
        "cut",
        tmp_path / "b",
        "--trainer.max_steps=27",  # 20 steps per epoch: stops 7 batches into epoch 1
        "--trainer.callbacks+=ModelCheckpoint",
        "--trainer.callbacks.every_n_train_steps=27",
        "--trainer.callbacks.filename=mid",
    )
    mid = Path(logs) / "cut" / "version_0" / "checkpoints" / "mid.ckpt"
    assert torch.load(mid, weights_only=True)["loops"]["fit_loop"]["state_dict"]["combined_loader"]
    resumed = _fit(run_cli, config, chunks, "cut", tmp_path / "c", f"--ckpt_path={mid}")
    assert len(cut["1"]) == 7 * BATCH and len(resumed["1"]) == 13 * BATCH
    assert cut["1"] + resumed["1"] == straight["1"]  # no batch seen twice or skipped

    def weights(name, version):
        (path,) = (Path(logs) / name / version / "checkpoints").glob("epoch=1-*.ckpt")
        return torch.load(path, weights_only=True)["state_dict"]

    a, b = weights("straight", "version_0"), weights("cut", "version_1")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# ---------------------------------------------------------------- bad input, one line each


def _one_line(run_cli, capsys, *args) -> str:
    with pytest.raises(SystemExit) as info:
        run_cli([str(a) for a in args])
    assert info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def test_chunk_folder_mistakes(run_cli, capsys, prepared, tmp_path):
    config, chunks, _ = prepared
    line = _one_line(run_cli, capsys, "fit", "--config", config, f"--data.root={chunks}")
    assert "holds chunks written by trainer prepare-data" in line
    assert "data.source='arrays' cannot read; set data.source: streaming" in line

    foreign = tmp_path / "foreign"  # LitData chunks of some other writer
    litdata.optimize(
        fn=lambda i: {"image": np.zeros(3), "class": i},
        inputs=list(range(4)),
        output_dir=str(foreign / "train"),
        chunk_bytes="1MB",
        num_workers=1,
        start_method="fork",
        verbose=False,
    )
    line = _one_line(
        run_cli,
        capsys,
        "fit",
        "--config",
        config,
        "--data.source=streaming",
        f"--data.root={foreign}",
    )
    assert "holds LitData chunks that trainer prepare-data did not write" in line

    line = _one_line(run_cli, capsys, "prepare-data", "--config", config, "--out", chunks)
    assert f"--out {chunks} is not empty" in line


def test_image_folders_are_written_at_the_evaluation_size(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for cls in ("a", "b"):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, size=(*rng.integers(10, 30, size=2), 3), dtype=np.uint8)
            Image.fromarray(pixels).save(tmp_path / "imgs" / cls / f"{i}.png")
    keys = dict(source="image_folder", root=str(tmp_path / "imgs"), image_size=(8, 6))
    folder = DataModule(**keys, batch_size=2, val_fraction=0.25, test_fraction=0.25)
    write_chunks(folder, str(tmp_path / "chunks"))
    streamed = DataModule(source="streaming", root=str(tmp_path / "chunks"), batch_size=2)
    assert streamed.input_shape == (3, 8, 6) and streamed.class_names == ["a", "b"]
    for split in ("train", "val", "test"):
        x, y = folder.split(split)
        rows, labels = streamed.split(split)
        np.testing.assert_array_equal(rows[np.arange(len(rows))], x[np.arange(len(x))])
        np.testing.assert_array_equal(labels, y)
