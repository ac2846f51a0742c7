"""End-to-end runs of the ``trainer`` CLI on digits: fit, validate, test, predict, resume."""

from __future__ import annotations

import csv
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from conftest import CONFIGS, shrink_args

DIGITS = CONFIGS / "digits.yaml"


def _version_dir(log_dir: Path, version: int = 0) -> Path:
    return log_dir / "digits" / f"version_{version}"


def test_fit_writes_logs_config_and_best_and_last_checkpoints(run_cli, tmp_path):
    run_cli(["fit", "--config", DIGITS, *shrink_args(tmp_path / "logs", epochs=2)])
    run = _version_dir(tmp_path / "logs")
    names = {p.name for p in (run / "checkpoints").iterdir()}
    assert "last.ckpt" in names
    assert any(n.startswith("best-") for n in names), names
    assert list(run.glob("events.out.tfevents.*"))
    config = yaml.safe_load((run / "config.yaml").read_text())
    assert config["data"]["source"] == "digits"
    assert config["trainer"]["max_epochs"] == 2


def test_predict_csv_matches_test_accuracy_and_probabilities(run_cli, tmp_path):
    logs = tmp_path / "logs"
    run_cli(
        [
            "fit",
            "--config",
            DIGITS,
            *shrink_args(logs, epochs=2, batches=20),
            "--test_after_fit=false",
        ]
    )
    ckpt = _version_dir(logs) / "checkpoints" / "last.ckpt"
    out = tmp_path / "pred.csv"
    run_cli(
        [
            "predict",
            "--config",
            DIGITS,
            "--ckpt_path",
            ckpt,
            "--predictions.path",
            out,
            f"--trainer.logger.init_args.save_dir={logs}",
        ]
    )
    rows = list(csv.DictReader(out.open()))
    # digits has no own test split: 20% of 1797 samples are held out (stratified).
    assert len(rows) == 360
    assert [int(r["index"]) for r in rows] == list(range(360))
    probs = np.array([[float(r[f"prob_{c}"]) for c in range(10)] for r in rows])
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-4)
    predicted = np.array([int(r["predicted"]) for r in rows])
    np.testing.assert_array_equal(predicted, probs.argmax(axis=1))
    # The CSV's accuracy must be what `trainer test` reports on the same checkpoint.
    accuracy = float(np.mean(predicted == np.array([int(r["target"]) for r in rows])))
    from dnn_tricks.app import TrainerCLI

    cli = TrainerCLI(
        args=[
            "--config",
            str(DIGITS),
            f"--trainer.logger.init_args.save_dir={logs}",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    result = cli.trainer.test(
        cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), weights_only=True, verbose=False
    )
    assert result[0]["test/acc"] == pytest.approx(accuracy, abs=1e-6)
    assert accuracy > 0.5  # 40 steps of training already beats chance (0.1) by far


def test_validate_restores_the_normalizer_from_the_checkpoint(run_cli, tmp_path):
    logs = tmp_path / "logs"
    run_cli(["fit", "--config", DIGITS, *shrink_args(logs), "--test_after_fit=false"])
    ckpt = _version_dir(logs) / "checkpoints" / "last.ckpt"
    state = torch.load(ckpt, weights_only=True)
    from dnn_tricks.app import TrainerCLI

    # A different val_fraction would fit other statistics; validate must use the saved ones.
    cli = TrainerCLI(
        args=[
            "--config",
            str(DIGITS),
            "--data.train_subset=200",
            f"--trainer.logger.init_args.save_dir={logs}",
            "--trainer.enable_progress_bar=false",
        ],
        run=False,
    )
    cli.trainer.validate(
        cli.model, datamodule=cli.datamodule, ckpt_path=str(ckpt), weights_only=True, verbose=False
    )
    prefix = "input_norm."
    saved = {k[len(prefix) :]: v for k, v in state["state_dict"].items() if k.startswith(prefix)}
    restored = cli.model.input_norm.state_dict()
    assert saved and int(saved["num_samples"]) > 200  # fitted on the full train split
    for key, value in saved.items():
        torch.testing.assert_close(restored[key].cpu(), value)


def test_resume_from_last_checkpoint_continues_the_step_count(run_cli, tmp_path):
    logs = tmp_path / "logs"
    run_cli(["fit", "--config", DIGITS, *shrink_args(logs, epochs=1), "--test_after_fit=false"])
    ckpt = _version_dir(logs) / "checkpoints" / "last.ckpt"
    first = torch.load(ckpt, weights_only=True)
    assert first["global_step"] == 3 and first["epoch"] == 0
    run_cli(
        [
            "fit",
            "--config",
            DIGITS,
            *shrink_args(logs, epochs=2),
            "--ckpt_path",
            ckpt,
            "--test_after_fit=false",
        ]
    )
    resumed = torch.load(_version_dir(logs, 1) / "checkpoints" / "last.ckpt", weights_only=True)
    assert resumed["global_step"] == 6 and resumed["epoch"] == 1


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--data.source", "digitz"], "data.source='digitz' is unknown"),
        (
            ["--data.source", "fashion_mnist", "--data.root", "/no/such/folder"],
            "data.root='/no/such/folder'",
        ),
        (["--model.no_such_key", "1"], "--model.no_such_key"),
        (["--data.batch_size", "many"], "data.batch_size"),
    ],
)
def test_user_errors_give_one_line_and_nonzero_exit(tmp_path, override, expected):
    proc = subprocess.run(
        [sys.executable, "-m", "dnn_tricks.cli", "fit", "--config", str(DIGITS), *override],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=120,
    )
    assert proc.returncode == 2
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and expected in errors[0], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_fit_prints_lightnings_lines_but_not_its_advertising(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "dnn_tricks.cli", "fit", "--config", str(DIGITS)]
        + shrink_args(tmp_path / "logs"),
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    output = proc.stdout + proc.stderr
    assert "Seed set to 0" in output and "`Trainer.fit` stopped" in output
    assert "Tip" not in output and "litlogger" not in output


def _cpuinfo_flags() -> set[str]:
    cpuinfo = Path("/proc/cpuinfo")
    if not cpuinfo.exists():
        pytest.skip("no /proc/cpuinfo to read the CPU's flags from")
    lines = [line for line in cpuinfo.read_text().splitlines() if line.startswith("flags")]
    return set(lines[0].split(":", 1)[1].split()) if lines else set()


def test_cpu_bf16_probe_agrees_with_the_kernels_cpu_flags():
    from dnn_tricks.app import cpu_has_bf16

    flags = _cpuinfo_flags()
    assert cpu_has_bf16() == bool(flags & {"avx512_bf16", "amx_bf16"})


@pytest.mark.parametrize(
    ("native", "precision", "warned"),
    [
        (False, "bf16-mixed", True),
        (True, "bf16-mixed", False),
        (False, "32-true", False),
    ],
)
def test_bf16_on_a_cpu_without_bf16_arithmetic_is_announced(monkeypatch, native, precision, warned):
    from lightning.pytorch import Trainer

    from dnn_tricks.app import warn_if_bf16_is_emulated

    # the CPU cannot be swapped in a test: torch's two probes answer as such a CPU would
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: native)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: native)
    trainer = Trainer(accelerator="cpu", precision=precision, logger=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        warn_if_bf16_is_emulated(trainer)
    messages = [str(w.message) for w in caught if "emulated" in str(w.message)]
    assert len(messages) == int(warned)
