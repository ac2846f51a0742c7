"""Bad input gives one line naming the key or file and the fix, exit status 2, no traceback."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import CONFIGS, shrink_args

DIGITS = CONFIGS / "digits.yaml"


def _npz(path, **arrays):
    np.savez(path, **arrays)
    return path


def _mixed_size_folder(root):
    for cls, size in (("a", (8, 8)), ("b", (9, 8))):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.zeros(size, dtype=np.uint8)).save(root / cls / "0.png")
    return root


def _empty_folder(root):
    (root / "a").mkdir(parents=True)
    return root


CASES = {
    "unknown norm": (["--model.net.init_args.norm=batchy"], "norm='batchy' is unknown"),
    "unknown optimizer": (["--model.optimizer=torch.optim.Adamm"], "model.optimizer"),
    "unknown schedule": (
        ["--model.scheduler=torch.optim.lr_scheduler.NoSuchLR"],
        "model.scheduler",
    ),
    "unknown transform": (
        [
            '--data.augment={"transform": {"__class_fullname__": "Compose", "transforms": '
            '[{"__class_fullname__": "HorizontalFlipp", "p": 0.5}]}}'
        ],
        "'HorizontalFlipp' is unknown",
    ),
    "batch larger than train split": (["--data.batch_size=5000"], "data.batch_size=5000 is larger"),
    "bad val fraction": (["--data.val_fraction=1.5"], "data.val_fraction=1.5"),
}


@pytest.mark.parametrize("case", list(CASES), ids=list(CASES))
def test_config_mistakes(run_cli, tmp_path, capsys, case):
    override, expected = CASES[case]
    with pytest.raises(SystemExit) as exit_info:
        run_cli(["fit", "--config", DIGITS, *shrink_args(tmp_path / "logs"), *override])
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], lines


DATA_CASES = {
    "npz without y": (
        lambda p: _npz(p / "d.npz", x=np.zeros((10, 3))),
        "arrays",
        "lacks array(s) y",
    ),
    "labels out of range": (
        lambda p: _npz(p / "d.npz", x=np.zeros((40, 3)), y=np.arange(40) % 4 - 1),
        "arrays",
        "labels must be",
    ),
    "nan in features": (
        lambda p: _npz(
            p / "d.npz", x=np.where(np.eye(40, 3) > 0, np.nan, 1.0), y=np.arange(40) % 2
        ),
        "arrays",
        "x holds NaN or Inf (first at row 0, column 0)",
    ),
    "mixed image sizes": (
        lambda p: _mixed_size_folder(p / "imgs"),
        "image_folder",
        "mixes image sizes",
    ),
    "empty dataset": (lambda p: _empty_folder(p / "imgs"), "image_folder", "holds no images"),
    "missing folder": (lambda p: p / "nowhere", "image_folder", "is not a folder"),
}


@pytest.mark.parametrize("case", list(DATA_CASES), ids=list(DATA_CASES))
def test_data_mistakes(run_cli, tmp_path, capsys, case):
    make, source, expected = DATA_CASES[case]
    root = make(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        run_cli(
            [
                "fit",
                "--config",
                DIGITS,
                *shrink_args(tmp_path / "logs"),
                f"--data.source={source}",
                f"--data.root={root}",
            ]
        )
    assert exit_info.value.code == 2
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1 and expected in lines[0], lines
    assert str(root) in lines[0] or case == "labels out of range"
