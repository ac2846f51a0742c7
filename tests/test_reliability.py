"""Runs survive kills, never overwrite each other, repeat bitwise, and keep splits apart."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from xml.etree import ElementTree

import forked_trainer
import numpy as np
import pytest
import torch

from conftest import CONFIGS, REPO, shrink_args
from dnn_tricks.checkpoints import AtomicCheckpointIO, read_checkpoint

DIGITS = CONFIGS / "digits.yaml"
QUIET = [
    "--trainer.enable_progress_bar=false",
    "--trainer.enable_model_summary=false",
    "--test_after_fit=false",
    # short epochs: these tests are about folders, kills and resumes, not accuracy
    "--trainer.limit_train_batches=12",
    "--trainer.limit_val_batches=3",
]


def _fit_args(save_dir: Path, epochs: int, *extra: str) -> list[str]:
    return [
        "fit",
        "--config",
        str(DIGITS),
        f"--trainer.max_epochs={epochs}",
        f"--trainer.logger.init_args.save_dir={save_dir}",
        *QUIET,
        *extra,
    ]


def _weights(path: Path) -> dict[str, torch.Tensor]:
    return torch.load(path, weights_only=True)["state_dict"]


def _assert_bitwise_equal(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key


def test_same_second_runs_get_distinct_folders_and_identical_results(tmp_path):
    logs = tmp_path / "logs"
    procs = [
        forked_trainer.start(_fit_args(logs, 3), tmp_path, tmp_path / f"run{i}.log")
        for i in range(2)
    ]
    for i, proc in enumerate(procs):
        proc.join(300)
        assert proc.exitcode == 0, (tmp_path / f"run{i}.log").read_text()[-2000:]
    runs = sorted((logs / "digits").iterdir())
    assert [r.name for r in runs] == ["version_0", "version_1"]
    first, second = (_weights(r / "checkpoints" / "last.ckpt") for r in runs)
    _assert_bitwise_equal(first, second)
    assert (runs[0] / "config.yaml").read_text() == (runs[1] / "config.yaml").read_text()


# checkpoints written on the training thread (the default) or on a background thread
WRITERS = {
    "atomic": [],
    "background": [
        '--trainer.plugins=[{"class_path": '
        '"dnn_tricks.background_checkpoints.BackgroundCheckpointIO"}]'
    ],
}


@pytest.mark.parametrize("writer", WRITERS.values(), ids=WRITERS.keys())
def test_kill_9_then_resume_from_last_ends_like_an_uninterrupted_run(tmp_path, writer):
    """With every check and view (configs/callbacks/full.yaml): none may draw from the
    random generators a resumed run restores, or the dropout masks would shift."""
    epochs = 4
    extra = [f"--trainer.callbacks={CONFIGS / 'callbacks' / 'full.yaml'}", *writer]
    straight = tmp_path / "straight"
    forked_trainer.run(_fit_args(straight, epochs, *extra), tmp_path, tmp_path / "a.log", 300)
    killed = tmp_path / "killed"
    last = killed / "digits" / "version_0" / "checkpoints" / "last.ckpt"
    proc = forked_trainer.start(_fit_args(killed, epochs, *extra), tmp_path, tmp_path / "b.log")
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline and proc.exitcode is None:
        if last.exists() and read_checkpoint(last)["epoch"] >= 1:
            os.kill(proc.pid, signal.SIGKILL)
            break
        time.sleep(0.02)
    proc.join(60)
    assert proc.exitcode == -signal.SIGKILL, "the run finished before it could be killed"
    interrupted_at = read_checkpoint(last)["epoch"]
    assert interrupted_at < epochs - 1
    resume = _fit_args(killed, epochs, *extra, "--ckpt_path=last")
    forked_trainer.run(resume, tmp_path, tmp_path / "c.log", 300)
    resumed = killed / "digits" / "version_1" / "checkpoints" / "last.ckpt"
    assert read_checkpoint(resumed)["epoch"] == epochs - 1
    _assert_bitwise_equal(
        _weights(resumed), _weights(straight / "digits" / "version_0" / "checkpoints" / "last.ckpt")
    )
    # the earlier run's checkpoints are still there, untouched by the resumed run
    assert last.exists() and read_checkpoint(last)["epoch"] == interrupted_at


def test_checkpoint_state_round_trips_callbacks_and_datamodule(run_cli, tmp_path):
    run_cli(["fit", "--config", DIGITS, *shrink_args(tmp_path / "logs", epochs=2)])
    ckpt = read_checkpoint(next((tmp_path / "logs").rglob("last.ckpt")))
    names = " ".join(ckpt["callbacks"])
    for callback in ("ModelCheckpoint", "EarlyStopping", "RNGState"):
        assert callback in names
    # the fitted input normalization travels in the model's weights
    assert ckpt["state_dict"]["input_norm.mean"].numel() == 64  # digits: 8 x 8 pixels
    rng = next(v for k, v in ckpt["callbacks"].items() if k.startswith("RNGState"))
    assert isinstance(rng["torch"], torch.Tensor)


def test_a_save_interrupted_midway_leaves_the_previous_file_intact(tmp_path, monkeypatch):
    io = AtomicCheckpointIO()
    target = tmp_path / "last.ckpt"
    io.save_checkpoint({"step": torch.tensor(1)}, target)

    def dies_halfway(obj, file, *args, **kwargs):
        file.write(b"PK\x03\x04 half a zip")
        raise KeyboardInterrupt  # what a kill looks like from inside the writer

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"step": torch.tensor(2)}, target)
    monkeypatch.undo()
    assert read_checkpoint(target)["step"].item() == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.ckpt"]  # no temporary left behind


def test_corrupt_and_mismatched_checkpoints_give_one_line(run_cli, tmp_path, capsys):
    run_cli(["fit", "--config", DIGITS, *shrink_args(tmp_path / "logs")])
    last = next((tmp_path / "logs").rglob("last.ckpt"))
    with pytest.raises(SystemExit):
        run_cli(
            [
                "test",
                "--config",
                DIGITS,
                "--ckpt_path",
                last,
                "--model.net.init_args.hidden=[64]",
                *shrink_args(tmp_path / "logs"),
            ]
        )
    assert "was trained with another model config" in capsys.readouterr().err
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(last.read_bytes()[: last.stat().st_size // 2])
    with pytest.raises(SystemExit):
        run_cli(
            ["test", "--config", DIGITS, "--ckpt_path", truncated, *shrink_args(tmp_path / "logs")]
        )
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and "is corrupt or truncated" in lines[0]


def test_test_data_never_influences_training(tmp_path):
    """Changing the test split leaves every trained weight bitwise the same."""
    from dnn_tricks.app import TrainerCLI

    rng = np.random.default_rng(0)
    x = rng.normal(size=(400, 6)).astype(np.float32)
    y = (x[:, 0] + x[:, 1] > 0).astype(np.int64)
    results = []
    for scale in (1.0, 1000.0):
        path = tmp_path / f"d{scale}.npz"
        np.savez(path, x=x, y=y, x_test=x[:50] * scale + 7, y_test=y[:50])
        cli = TrainerCLI(
            args=[
                "--config",
                str(DIGITS),
                "--data.source=arrays",
                f"--data.root={path}",
                "--model.net.init_args.hidden=[16]",
                "--data.batch_size=32",
                *shrink_args(tmp_path / "logs", epochs=2, batches=100),
            ],
            run=False,
        )
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        # the model's state holds its fitted input normalization too
        results.append({k: v.clone() for k, v in cli.model.state_dict().items()})
    _assert_bitwise_equal(results[0], results[1])


def test_only_the_train_loader_augments(tmp_path):
    from dnn_tricks.data.datamodule import DataModule

    dm = DataModule(source="digits", augment=str(CONFIGS / "augment" / "light.yaml"), num_workers=0)
    dm.setup("fit")
    assert dm.train_dataloader().dataset.transform is not None
    for loader in (dm.val_dataloader(), dm.test_dataloader(), dm.predict_dataloader()):
        assert loader.dataset.transform is None


def test_ci_fails_every_skip_but_the_gpu_ones(tmp_path):
    """tests/skip_policy.py in a pytest session of its own, with and without CI's variable."""
    (tmp_path / "test_inner.py").write_text(
        "import pytest\n"
        "def test_data():\n"
        "    pytest.skip('the dataset is not installed')\n"
        "@pytest.mark.skipif(True, reason='no database server')\n"
        "def test_server():\n"
        "    pass\n"
        "def test_optional():\n"
        "    pytest.importorskip('no_such_module_here')\n"
        "def test_cuda():\n"
        "    pytest.skip('needs CUDA GPUs')\n"
        "@pytest.mark.gpu\n"
        "@pytest.mark.skipif(True, reason='not here')\n"
        "def test_marked():\n"
        "    pass\n"
    )
    outcomes = {}
    for value in ("1", ""):
        report = tmp_path / f"report{value}.xml"
        env = {**os.environ, "PYTHONPATH": str(REPO / "tests"), "DNN_TRICKS_REQUIRE_ALL": value}
        subprocess.run(
            [sys.executable, "-m", "pytest", "-p", "skip_policy", "-p", "no:cacheprovider"]
            + ["-q", f"--junitxml={report}", "test_inner.py"],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            timeout=120,
        )
        cases = ElementTree.parse(report).getroot().iter("testcase")
        outcomes[value] = {
            case.get("name"): next((child.tag for child in case), "passed") for case in cases
        }
    assert outcomes["1"] == {
        "test_data": "failure",
        "test_server": "error",  # a skipif mark skips in setup: the failure is a setup error
        "test_optional": "failure",
        "test_cuda": "skipped",
        "test_marked": "skipped",
    }
    assert set(outcomes[""].values()) == {"skipped"}
