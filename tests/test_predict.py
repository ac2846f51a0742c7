"""``trainer predict --data.predict_path P``: new, unlabelled images, arrays or CSV rows go
through the training statistics and the evaluation resize, and come out as a CSV that names
each file or row, its predicted class and every class's probability."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image, ImageOps

from conftest import CONFIGS, shrink_args
from dnn_tricks.app import TrainerCLI
from dnn_tricks.cli import main

SIZE = (12, 12)
RNG = np.random.default_rng(0)


def _image(light: bool, height: int, width: int) -> np.ndarray:
    base = 170 if light else 60
    return np.clip(base + RNG.normal(0, 30, size=(height, width, 3)), 0, 255).astype(np.uint8)


def _write(folder: Path, light: bool, n: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        pixels = _image(light, *RNG.integers(14, 40, size=2))
        Image.fromarray(pixels).save(folder / f"{i}.{'png' if i % 2 else 'jpg'}")


def _reference_input(path: Path) -> np.ndarray:
    """By the definition: scale the short side to cover 12 x 12, take the centre box."""
    image = ImageOps.exif_transpose(Image.open(path)).convert("RGB")
    width, height = image.size
    scale = max(SIZE[0] / height, SIZE[1] / width)
    box_w, box_h = SIZE[1] / scale, SIZE[0] / scale
    box = ((width - box_w) / 2, (height - box_h) / 2, (width + box_w) / 2, (height + box_h) / 2)
    return np.asarray(image.resize(SIZE[::-1], Image.Resampling.BICUBIC, box=box))


def _cli(args: list[str]) -> None:
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(sys, "argv", ["trainer"])
        main([str(a) for a in args])


@pytest.fixture(scope="module")
def image_run(tmp_path_factory):
    """A small ConvNet trained on an image folder of mixed sizes; (config, checkpoint, root)."""
    root = tmp_path_factory.mktemp("predict")
    for cls, light in (("dark", False), ("light", True)):
        _write(root / "images" / cls, light, 20)
    config = {
        "seed_everything": 0,
        "trainer": {
            "max_epochs": 2,
            "accelerator": "cpu",
            "enable_progress_bar": False,
            "enable_model_summary": False,
            "logger": {
                "class_path": "dnn_tricks.loggers.TensorBoardLogger",
                "init_args": {"save_dir": str(root / "logs"), "name": "images"},
            },
        },
        "model": {
            "input_norm": {"kind": "standardize", "per_channel": True},
            "net": {
                "class_path": "dnn_tricks.models.nets.ConvNet",
                "init_args": {"channels": [4], "convs_per_stage": 1, "hidden": [8]},
            },
        },
        "data": {
            "source": "image_folder",
            "root": str(root / "images"),
            "image_size": list(SIZE),
            "batch_size": 8,
            "num_workers": 0,
        },
    }
    path = root / "images.yaml"
    path.write_text(yaml.safe_dump(config))
    _cli(["fit", "--config", path, "--test_after_fit=false"])
    (checkpoint,) = (root / "logs" / "images" / "version_0" / "checkpoints").glob("epoch=1*.ckpt")
    return path, checkpoint, root


def _model(config: Path, checkpoint: Path, *extra: str) -> TrainerCLI:
    cli = TrainerCLI(args=["--config", str(config), *extra], run=False)
    cli.model.load_state_dict(torch.load(checkpoint, weights_only=True)["state_dict"])
    return cli


def _rows(path: Path) -> list[dict]:
    return list(csv.DictReader(path.open()))


def test_the_model_holds_the_train_statistics_at_the_evaluation_size(image_run):
    config, checkpoint, _ = image_run
    cli = _model(config, checkpoint)
    train, _ = cli.datamodule.split("train")
    pixels = np.stack([_reference_input(Path(train.path(i))) for i in range(len(train))]) / 255
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    np.testing.assert_allclose(state["input_norm.mean"].numpy(), pixels.mean((0, 1, 2)), atol=2e-3)


def test_a_folder_of_new_images_is_predicted_file_by_file(image_run, tmp_path):
    config, checkpoint, root = image_run
    new = tmp_path / "new"
    _write(new / "batch1", light=True, n=3)
    _write(new / "batch2" / "deeper", light=False, n=3)
    out = tmp_path / "pred.csv"
    predict = [f"--data.predict_path={new}", f"--predictions.path={out}"]
    _cli(["predict", "--config", config, "--ckpt_path", checkpoint, *predict])
    rows = _rows(out)
    files = sorted(str(p) for p in new.rglob("*.*"))
    assert sorted(r["path"] for r in rows) == files and "target" not in rows[0]
    probs = np.array([[float(r["prob_dark"]), float(r["prob_light"])] for r in rows])
    np.testing.assert_allclose(probs.sum(1), 1, atol=1e-5)
    assert [r["predicted"] for r in rows] == [("dark", "light")[p] for p in probs.argmax(1)]

    # What the model was given: the evaluation resize of each file, as defined by hand ...
    cli = _model(config, checkpoint, *predict)
    loader = cli.datamodule.predict_dataloader()
    given = torch.cat([x for x, _ in loader])
    reference = np.stack([_reference_input(Path(p)) for p in loader.dataset.ids])
    assert np.abs(given.permute(0, 2, 3, 1).numpy().astype(int) - reference).mean() < 2
    # ... and the CSV's probabilities are the trained model's on exactly those inputs.
    with torch.no_grad():
        expected = torch.softmax(cli.model.standalone()(given.float() / 255), 1).numpy()
    by_path = {r["path"]: [float(r["prob_dark"]), float(r["prob_light"])] for r in rows}
    got = np.array([by_path[p] for p in loader.dataset.ids])
    np.testing.assert_allclose(got, expected, atol=1e-5)


@pytest.mark.parametrize("kind", ["npz", "npy"])
def test_arrays_of_new_inputs_are_predicted_by_row(image_run, tmp_path, kind):
    config, checkpoint, _ = image_run
    x = np.stack([_image(i % 2 == 0, *SIZE) for i in range(6)])
    path = tmp_path / f"new.{kind}"
    np.savez(path, x=x) if kind == "npz" else np.save(path, x)
    out = tmp_path / "pred.csv"
    predict = [f"--data.predict_path={path}", f"--predictions.path={out}"]
    _cli(["predict", "--config", config, "--ckpt_path", checkpoint, *predict])
    rows = _rows(out)
    assert [int(r["index"]) for r in rows] == list(range(6))
    cli = _model(config, checkpoint)
    with torch.no_grad():
        inputs = torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255
        expected = torch.softmax(cli.model.standalone()(inputs), 1).numpy()
    got = np.array([[float(r["prob_dark"]), float(r["prob_light"])] for r in rows])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def test_a_csv_of_tabular_features(run_cli, tmp_path, capsys):
    from sklearn.datasets import load_wine

    wine = CONFIGS / "wine.yaml"
    logs = tmp_path / "logs"
    run_cli(["fit", "--config", wine, *shrink_args(logs, epochs=1), "--test_after_fit=false"])
    (checkpoint,) = logs.glob("*/version_0/checkpoints/last.ckpt")
    data = load_wine()
    rows = data.data[::20]
    table = tmp_path / "new.csv"
    with table.open("w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(data.feature_names)
        writer.writerows(rows.tolist())
    out = tmp_path / "pred.csv"
    predict = [f"--data.predict_path={table}", f"--predictions.path={out}"]
    run_cli(["predict", "--config", wine, "--ckpt_path", checkpoint, *predict])
    written = _rows(out)
    assert [int(r["index"]) for r in written] == list(range(len(rows)))
    cli = _model(wine, checkpoint)
    with torch.no_grad():
        expected = torch.softmax(cli.model.standalone()(torch.tensor(rows).float()), 1).numpy()
    got = np.array([[float(r[f"prob_{name}"]) for name in data.target_names] for r in written])
    np.testing.assert_allclose(got, expected, atol=1e-5)

    def one_line(path) -> str:
        with pytest.raises(SystemExit) as info:
            run_cli(
                [
                    "predict",
                    "--config",
                    wine,
                    "--ckpt_path",
                    checkpoint,
                    "--data.predict_path",
                    path,
                ]
            )
        assert info.value.code == 2
        lines = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")]
        assert len(lines) == 1, lines
        return lines[0]

    narrow = tmp_path / "narrow.csv"
    np.savetxt(narrow, rows[:, :12], delimiter=",")
    assert "has rows of 12 columns, but the model was trained on 13 features" in one_line(narrow)
    assert "does not exist" in one_line(tmp_path / "nowhere")
