"""Export: every shipped network and every input normalization kind, written as ONNX,
TorchScript and torch.export programs, loaded back independently (onnxruntime,
torch.jit.load, torch.export.load) and compared with PyTorch at a batch size the export never
saw; bad input gives one line and writes nothing."""

from __future__ import annotations

import warnings
from csv import DictReader

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor, nn

from dnn_tricks.export import TOLERANCE, export_model
from dnn_tricks.models.backbones import Backbone
from dnn_tricks.models.input_norm import KINDS, InputNormalizer
from dnn_tricks.models.nets import MLP, ConvNet
from dnn_tricks.models.resnet import ResNet

SHAPE = (1, 8, 8)
CONV_NORMS = ("none", "batch", "layer", "instance", "group", "weight", "iter")


def _digits() -> Tensor:
    """Real images: scikit-learn's 8x8 digits as float in [0, 1], N x 1 x 8 x 8."""
    images = load_digits().images.astype(np.float32) / 16.0
    return torch.from_numpy(images[:, None])


class Bank(nn.Module):
    """Several models side by side on one input: logits stacked as N x models x classes,
    so one export covers them all (softmax over the last axis is per model)."""

    def __init__(self, models: dict[str, nn.Module]) -> None:
        super().__init__()
        self.models = nn.ModuleDict(models)

    def forward(self, x: Tensor) -> Tensor:
        return torch.stack([model(x) for model in self.models.values()], dim=1)


def _trained_state(model: nn.Module, x: Tensor) -> nn.Module:
    """Fit the data-fitted layers, then move running statistics off their init values
    (a few train-mode passes), so eval-mode layers are not the identity."""
    for layer in model.modules():
        if hasattr(layer, "adapt"):
            inputs = x
            if isinstance(model, nn.Sequential) and layer is not model[0]:
                inputs = model[0](x)
            layer.adapt([inputs])
    model.train()
    with torch.no_grad():
        for chunk in x[:256].split(64):
            model(chunk)
    return model.eval()


def _normalized(net: nn.Module, x: Tensor, kind: str = "standardize", per_channel: bool = True):
    norm = InputNormalizer(kind=kind, per_channel=per_channel)
    return _trained_state(nn.Sequential(norm, net), x)


def _net_bank(x: Tensor) -> Bank:
    torch.manual_seed(0)
    conv = dict(channels=(8, 16), convs_per_stage=1, hidden=(16,), num_groups=4)
    models = {"mlp": _normalized(MLP(SHAPE, 10, hidden=(32, 16), norm="batch"), x)}
    for norm in CONV_NORMS:
        models[f"convnet_{norm}"] = _normalized(ConvNet(SHAPE, 10, norm=norm, **conv), x)
    models["resnet"] = _normalized(ResNet(SHAPE, 10, depth=8, width=8), x)
    stem = ConvNet(SHAPE, 10, stem="patch_whiten", **conv)
    models["patch_whiten_stem"] = _normalized(stem, x)
    return Bank(models).eval()


def _norm_bank(x: Tensor) -> Bank:
    torch.manual_seed(0)
    models = {}
    for kind in KINDS:
        for per_channel in (True, False) if kind in ("center", "standardize") else (True,):
            net = ConvNet(SHAPE, 10, channels=(8,), convs_per_stage=1, hidden=(16,))
            models[f"{kind}_{per_channel}"] = _normalized(net, x, kind, per_channel)
    return Bank(models).eval()


def _reload(fmt: str, path) -> callable:
    """Load an exported file the way a user would, independently of dnn_tricks.export."""
    if fmt == "onnx":
        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        name = session.get_inputs()[0].name
        return lambda x: torch.from_numpy(session.run(None, {name: x.numpy()})[0])
    if fmt == "torchscript":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)
            return torch.jit.load(str(path))
    with open(path, "rb") as file:
        return torch.export.load(file).module()


def _assert_matches(model: nn.Module, fmt: str, path, x: Tensor) -> None:
    """The file, at a batch size the export never saw (3), gives PyTorch's probabilities."""
    batch = x[-3:]
    with torch.no_grad():
        expected = torch.softmax(model(batch), dim=-1)
        got = torch.softmax(_reload(fmt, path)(batch), dim=-1)
    assert got.shape == expected.shape
    assert (got - expected).abs().max().item() <= TOLERANCE


@pytest.fixture(scope="module")
def digits() -> Tensor:
    return _digits()


@pytest.mark.parametrize("fmt", ["onnx", "torchscript", "exported_program"])
@pytest.mark.parametrize("bank", [_net_bank, _norm_bank], ids=["every_net", "every_norm_kind"])
def test_export_matches_pytorch(tmp_path, digits, fmt, bank):
    model = bank(digits)
    out = tmp_path / f"model.{fmt}"
    diff = export_model(model, digits[:32], fmt, out)
    assert 0.0 <= diff <= TOLERANCE
    assert [p.name for p in tmp_path.iterdir()] == [out.name]
    _assert_matches(model, fmt, out, digits)
    # the probabilities are not trivially equal: the models disagree with each other
    with torch.no_grad():
        probs = torch.softmax(model(digits[:32]), dim=-1)
    assert (probs - probs[:, :1]).abs().max() > 1e-3


def test_onnx_batch_dimension_is_symbolic(tmp_path, digits):
    model = _normalized(MLP(SHAPE, 10, hidden=(16,)), digits, "zca_whiten")
    export_model(model, digits[:16], "onnx", tmp_path / "m.onnx")
    graph = onnx.load(str(tmp_path / "m.onnx")).graph
    dims = [graph.input[0].type.tensor_type.shape.dim, graph.output[0].type.tensor_type.shape.dim]
    assert all(d[0].dim_param and not d[0].dim_value for d in dims)
    assert [d.dim_value for d in dims[0][1:]] == list(SHAPE)


def test_torchvision_backbone_exports_to_onnx(tmp_path):
    images = torch.rand(64, 1, 28, 28)
    torch.manual_seed(0)
    net = Backbone((1, 28, 28), 10, name="resnet18", small_input=True)
    model = _normalized(net, images)
    diff = export_model(model, images[:8], "onnx", tmp_path / "resnet18.onnx")
    assert diff <= TOLERANCE
    _assert_matches(model, "onnx", tmp_path / "resnet18.onnx", images)


# ---------------------------------------------------------------- bad input


class Branchy(nn.Module):
    """Python control flow on data: no static graph expresses it."""

    def forward(self, x: Tensor) -> Tensor:
        return x if x.sum() > 0 else -x


class Drifting(nn.Module):
    """Its output changes on every call, so what the exporter records differs from eager."""

    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x: Tensor) -> Tensor:
        self.calls += 1
        return x * self.calls


@pytest.mark.parametrize("fmt", ["onnx", "exported_program"])
def test_layer_that_cannot_be_exported_is_named_in_one_line(tmp_path, fmt):
    model = nn.Sequential(nn.Linear(6, 6), nn.Sequential(nn.ReLU(), Branchy()))
    with pytest.raises(ValueError) as error:
        export_model(model, torch.rand(4, 6), fmt, tmp_path / "m")
    message = str(error.value)
    assert "\n" not in message
    assert "layer '1.1' (Branchy)" in message and fmt in message
    assert list(tmp_path.iterdir()) == []


def test_probability_difference_above_tolerance_is_an_error(tmp_path):
    model = nn.Sequential(nn.Linear(6, 3), Drifting())
    with pytest.raises(ValueError, match="differs from PyTorch by .* in probability"):
        export_model(model, torch.rand(4, 6), "torchscript", tmp_path / "m.pt")
    assert list(tmp_path.iterdir()) == []


def test_unknown_format_and_missing_folder_write_nothing(tmp_path):
    model = nn.Linear(6, 3)
    with pytest.raises(ValueError, match="--format='tflite' is unknown; choose one of: onnx"):
        export_model(model, torch.rand(4, 6), "tflite", tmp_path / "m")
    with pytest.raises(FileNotFoundError, match="does not exist; create it first"):
        export_model(model, torch.rand(4, 6), "onnx", tmp_path / "missing" / "m.onnx")
    assert list(tmp_path.iterdir()) == []


# ---------------------------------------------------------------- trainer export


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """One short digits fit and its `trainer predict` CSV, shared by the command's tests."""
    from conftest import CONFIGS, shrink_args
    from dnn_tricks.cli import main

    root = tmp_path_factory.mktemp("run")
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(root)
        patch.setattr("sys.argv", ["trainer"])
        config = ["--config", str(CONFIGS / "digits.yaml")]
        main(["fit", *config, *shrink_args(root / "logs", batches=3), "--test_after_fit=false"])
        ckpt = next((root / "logs").rglob("last.ckpt"))
        csv = root / "predictions.csv"
        # (the logger's save_dir override of shrink_args is left out: predict refuses it)
        predict = [a for a in shrink_args(root / "logs", batches=3) if "logger" not in a]
        main(["predict", *config, *predict, f"--ckpt_path={ckpt}", f"--predictions.path={csv}"])
    return root, config, ckpt, csv


def test_export_command_writes_onnx_giving_predicts_probabilities(digits_run, run_cli, capsys):
    from dnn_tricks.app import TrainerCLI

    root, config, ckpt, csv = digits_run
    out = root / "digits.onnx"
    run_cli(["export", *config, f"--ckpt_path={ckpt}", "--format=onnx", f"--out={out}"])
    assert "max |p_onnx - p_torch| = " in capsys.readouterr().out
    # the file alone, on raw test images, gives the probabilities `trainer predict` wrote
    with open(csv, newline="") as handle:
        rows = list(DictReader(handle))
    datamodule = TrainerCLI(args=config, run=False).datamodule
    test_inputs = torch.cat(list(datamodule.raw_batches("test")))  # float, as the model takes
    raw = test_inputs[[int(row["index"]) for row in rows]]
    probs = torch.softmax(_reload("onnx", out)(raw), dim=-1)
    columns = [c for c in rows[0] if c.startswith("prob_")]
    expected = torch.tensor([[float(row[c]) for c in columns] for row in rows])
    assert len(rows) > 1
    torch.testing.assert_close(probs, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["--model.net.init_args.hidden=[32]"], "was trained with another model config"),
        (["--format=tflite"], "--format='tflite' is unknown"),
        (["--out=missing/m.onnx"], "does not exist; create it first"),
    ],
    ids=["other_network", "unknown_format", "missing_folder"],
)
def test_export_command_bad_input_exits_2_writing_nothing(
    digits_run, run_cli, capsys, args, message
):
    root, config, ckpt, _ = digits_run
    before = sorted(p for p in root.rglob("*"))
    with pytest.raises(SystemExit) as stop:
        run_cli(["export", *config, f"--ckpt_path={ckpt}", *args])
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and message in err[0]
    assert sorted(p for p in root.rglob("*")) == before


def test_commands_read_a_runs_saved_config(digits_run, run_cli, capsys, tmp_path):
    """export and lr-find take the config.yaml a fit saved (with the fit-only keys ckpt_path,
    weights_only, test_after_fit in it) as they take the experiment's own config."""
    root, _, ckpt, _ = digits_run
    saved = ckpt.parents[1] / "config.yaml"  # the fit's, next to its checkpoints folder
    assert "test_after_fit" in saved.read_text()
    out = tmp_path / "from_saved.onnx"
    run_cli(["export", "--config", saved, f"--ckpt_path={ckpt}", f"--out={out}"])
    assert out.is_file() and "max |p_onnx - p_torch|" in capsys.readouterr().out
    run_cli(["lr-find", "--config", saved, "--num_training=5", f"--out={tmp_path / 'lr'}"])
    assert (tmp_path / "lr" / "lr_find.json").is_file()
