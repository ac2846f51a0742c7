"""The checking and figure callbacks under DDP (configs/trainer/ddp_cpu.yaml: two gloo
processes): statistics reduced over the ranks, identical decisions on every rank (a fault
on one rank stops both, nothing hangs), and results that match one process."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from callback_helpers import CALLBACKS

from conftest import CONFIGS, REPO

DDP_CPU = CONFIGS / "trainer" / "ddp_cpu.yaml"


def run_ddp(
    workdir: Path, extra: list[dict], overrides: tuple[str, ...], check_every: int = 100
) -> subprocess.CompletedProcess:
    """``trainer fit`` on digits + the ddp_cpu preset + every callback, in a subprocess
    (Lightning starts rank 1 by re-running the command line)."""
    basic = yaml.safe_load((CONFIGS / "callbacks" / "basic.yaml").read_text())
    callbacks = yaml.safe_load(CALLBACKS)
    for callback in callbacks:
        if callback["class_path"].endswith("PreciseBN"):
            callback["init_args"]["num_batches"] = 20
        if callback["class_path"].endswith("RunningStatsCheck"):
            callback["init_args"]["every_n_steps"] = check_every
    # extra callbacks first: a fault planted in a hook is there when the checks run
    # the shipped config's own checks are replaced by the full set under test
    stock = [c for c in basic if "dnn_tricks" not in c["class_path"]]
    (workdir / "callbacks.yaml").write_text(yaml.safe_dump(extra + stock + callbacks))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO / "tests"), os.environ.get("PYTHONPATH", "")]),
        "NO_ALBUMENTATIONS_UPDATE": "1",
        "OMP_NUM_THREADS": "1",
    }
    command = [
        sys.executable,
        "-m",
        "dnn_tricks.cli",
        "fit",
        "--config",
        str(CONFIGS / "digits.yaml"),
        "--config",
        str(DDP_CPU),
        "--trainer.callbacks=callbacks.yaml",
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        "--trainer.logger.init_args.save_dir=logs",
        "--test_after_fit=false",
        *overrides,
    ]
    return subprocess.run(
        command, cwd=workdir, env=env, capture_output=True, text=True, timeout=240
    )


RECORDER = {"class_path": "callback_helpers.CallbackRecorder", "init_args": {"out_dir": "rec"}}


def test_ranks_agree_and_match_one_process(tmp_path):
    # 2 epochs of 19 steps per rank: the running averages are warm for the drift check
    done = run_ddp(tmp_path, [RECORDER], ("--trainer.max_epochs=2",))
    assert done.returncode == 0, done.stderr[-3000:]
    rank0, rank1 = (json.loads((tmp_path / "rec" / f"rank{r}.json").read_text()) for r in (0, 1))
    assert (rank0["world_size"], rank0["global_step"]) == (2, 38)

    # PreciseBN averaged its statistics over the ranks: both hold the same
    assert rank0["buffers"] == rank1["buffers"]
    assert rank0["precise"] == rank1["precise"]
    # its accuracy (counts summed over the ranks' val shares) is what one process measures
    # on its checkpoint over the whole val split
    from dnn_tricks.app import TrainerCLI

    cli = TrainerCLI(
        args=[
            "--config",
            str(CONFIGS / "digits.yaml"),
            f"--trainer.logger.init_args.save_dir={tmp_path / 'one'}",
        ],
        run=False,
    )
    precise_path = tmp_path / rank0["precise_path"]  # relative to the run's folder
    (one,) = cli.trainer.validate(cli.model, datamodule=cli.datamodule, ckpt_path=precise_path)
    assert rank0["precise"]["accuracy"]["after"] == pytest.approx(one["val/acc"], abs=1e-6)

    # the confusion matrix holds both ranks' halves: the whole val split, on every rank
    n_val = len(cli.datamodule.split("val")[1])
    assert rank0["confusion"] == rank1["confusion"]
    assert sum(map(sum, rank0["confusion"])) == n_val
    # drift and activation statistics were reduced: identical decisions on both ranks
    assert rank0["drift"] == rank1["drift"] and len(rank0["drift"]) == 2
    assert rank0["activations"] == rank1["activations"]
    assert rank0["input_problems"] == rank1["input_problems"] == []
    # rank 0 alone logs
    assert len(list((tmp_path / "logs").rglob("events.out.tfevents.*"))) == 1
    checkpoint = torch.load(precise_path, weights_only=True)
    assert checkpoint["global_step"] == 38


def test_a_fault_on_one_rank_stops_both(tmp_path):
    plant = {"class_path": "callback_helpers.PlantNaNOnRank", "init_args": {"rank": 1, "step": 2}}
    limits = ("--trainer.max_epochs=1", "--trainer.limit_train_batches=4")
    # checked after every step: at the next forward DDP would overwrite rank 1's buffers
    # with rank 0's, and the fault would be gone
    done = run_ddp(tmp_path, [plant], limits, check_every=1)
    assert done.returncode == 2, done.stderr[-3000:]
    # rank 0's buffers are fine; it stops because rank 1's are not, and says so
    assert "running statistics became invalid after a training step (global step 2" in done.stderr
    assert "on another process" in done.stderr
