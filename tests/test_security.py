"""Two promises: a database password given to ``trainer search`` never leaves the process in
anything it writes or prints, and a checkpoint that holds pickled code is refused by every
subcommand that reads one, in one line, before any of its code can run."""

from __future__ import annotations

import os
import uuid
from pathlib import Path

import pytest
import torch
import yaml
from sqlalchemy.engine import make_url

from conftest import CONFIGS, shrink_args
from dnn_tricks.redact import redact

DIGITS = CONFIGS / "digits.yaml"
# CI (.ci/run) creates this role and database; its password appears nowhere else.
SECRET_URL = os.environ.get("DNN_TRICKS_TEST_POSTGRES_SECRET_URL")


def test_redact_hides_every_password_and_nothing_else():
    text = (
        "cannot open postgresql+psycopg://dnn:s3cr3t@db.example:5432/trials; "
        "also mysql://root:p@ss@host/x, sqlite:///logs/study.db and postgresql://me@host/db"
    )
    assert redact(text) == (
        "cannot open postgresql+psycopg://dnn:***@db.example:5432/trials; "
        "also mysql://root:***@host/x, sqlite:///logs/study.db and postgresql://me@host/db"
    )
    # SQLAlchemy's own rendering of one URL agrees
    url = "postgresql://dnn:s3cr3t@db.example:5432/trials"
    assert redact(url) == make_url(url).render_as_string(hide_password=True)


def _search_config(folder: Path, name: str) -> Path:
    """Two seconds-long trials of digits; the storage URL is given on the command line."""
    config = {
        "base": [str(DIGITS)],
        "study_name": name,
        "log_dir": str(folder / "out" / "search"),
        "n_trials": 2,
        "pruner": "none",
        "test_best": True,
        "fixed": {
            "trainer.max_epochs": 1,
            "trainer.limit_train_batches": 2,
            "trainer.limit_val_batches": 1,
            "trainer.limit_test_batches": 1,
            "trainer.log_every_n_steps": 1,
        },
        "space": {
            "model.optimizer.init_args.lr": {"type": "log_uniform", "low": 1e-3, "high": 0.1}
        },
    }
    path = folder / "search.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


@pytest.mark.skipif(not SECRET_URL, reason="DNN_TRICKS_TEST_POSTGRES_SECRET_URL is not set")
def test_a_postgres_password_is_in_no_file_and_no_output(run_cli, tmp_path, capfd, caplog):
    import optuna

    password = make_url(SECRET_URL).password
    assert password and len(password) >= 8, "use a password that cannot occur by chance"
    name = f"secret_{uuid.uuid4().hex[:8]}"
    config = _search_config(tmp_path, name)
    try:
        run_cli(["search", "--config", config, f"--storage={SECRET_URL}"])
        # a wrong password is reported without the password given
        wrong = SECRET_URL.replace(f":{password}@", f":{password}-wrong@")
        with pytest.raises(SystemExit):
            run_cli(["search", "--config", config, f"--storage={wrong}"])
    finally:
        optuna.delete_study(study_name=name, storage=SECRET_URL)
    out = tmp_path / "out"
    written = {
        "trials.csv": list(out.rglob("trials.csv")),
        "best_config.yaml": list(out.rglob("best_config.yaml")),
        "config.yaml": list(out.rglob("config.yaml")),
        "TensorBoard": list(out.rglob("events.out.tfevents.*")),
    }
    assert all(written.values()), {kind: len(paths) for kind, paths in written.items()}
    hparams = [
        p for p in written["TensorBoard"] if b"_hparams_/session_start_info" in p.read_bytes()
    ]
    assert hparams, "no run logged its HParams"
    secret = password.encode()
    leaks = [str(p) for p in out.rglob("*") if p.is_file() and secret in p.read_bytes()]
    assert not leaks
    printed = capfd.readouterr()
    assert "password authentication failed" in printed.err  # the wrong-password run said why
    assert password not in printed.out + printed.err
    assert password not in caplog.text


class _RunsCode:
    def __reduce__(self):
        return (os.system, ("touch pwned",))


@pytest.fixture
def evil_checkpoint(tmp_path) -> Path:
    """A Lightning-looking checkpoint whose unpickling would create the file ``pwned``."""
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "epoch": 0, "global_step": 0, "payload": _RunsCode()}, path)
    return path


@pytest.mark.parametrize("subcommand", ["fit", "validate", "test", "predict", "export"])
def test_every_subcommand_refuses_a_checkpoint_with_pickled_code(
    run_cli, tmp_path, capsys, evil_checkpoint, subcommand
):
    args = [subcommand, "--config", DIGITS, "--ckpt_path", evil_checkpoint]
    if subcommand == "export":
        args += ["--format", "onnx", "--out", tmp_path / "model.onnx"]
    else:
        args += shrink_args(tmp_path / "logs")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(args)
    assert exit_info.value.code == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "refused: it holds pickled objects" in errors[0], errors
    assert not (tmp_path / "pwned").exists()
    assert not (tmp_path / "model.onnx").exists()


def test_resuming_from_a_planted_last_checkpoint_is_refused(run_cli, tmp_path, capsys):
    """``--ckpt_path last`` finds the newest last.ckpt of earlier runs: one planted there is
    refused like any other."""
    folder = tmp_path / "logs" / "digits" / "version_0" / "checkpoints"
    folder.mkdir(parents=True)
    torch.save({"state_dict": {}, "payload": _RunsCode()}, folder / "last.ckpt")
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", DIGITS, "--ckpt_path=last", *shrink_args(tmp_path / "logs")])
    assert exit_info.value.code == 2
    assert "refused: it holds pickled objects" in capsys.readouterr().err
    assert not (tmp_path / "pwned").exists()


def test_one_line_errors_hide_a_password(monkeypatch, capsys):
    import dnn_tricks.cli as cli

    def fails(args):
        raise ValueError("storage: cannot open postgresql://me:Secret-pw-777@db.example/trials")

    monkeypatch.setattr(cli, "_run", fails)
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["search"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "Secret-pw-777" not in err and "postgresql://me:***@db.example/trials" in err


def test_a_failed_trials_note_hides_a_password(run_cli, tmp_path, monkeypatch, capsys):
    """The error a failed trial records goes to trials.csv and the printed table."""
    import dnn_tricks.search.study as study

    def fails(config, trial):
        raise RuntimeError("lost postgresql://me:Secret-pw-777@db.example/trials mid-trial")

    monkeypatch.setattr(study, "run_trial", fails)
    config = _search_config(tmp_path, "notes")
    run_cli(["search", "--config", config, "--n_trials=1"])
    (table,) = (tmp_path / "out").rglob("trials.csv")
    assert "postgresql://me:***@db.example/trials" in table.read_text()
    printed = capsys.readouterr()
    assert "Secret-pw-777" not in table.read_text() + printed.out + printed.err
