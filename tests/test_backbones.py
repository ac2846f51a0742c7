"""Any backbone as model.net: torchvision and timm models fitted to the data (head, first
conv, small-input stem), local pretrained weights, fine-tuning switches (frozen backbone,
backbone batch norm in eval, backbone learning-rate scale), and one-line errors."""

from __future__ import annotations

import csv
from functools import partial
from pathlib import Path

import pytest
import torch
import torchvision
import yaml
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from conftest import CONFIGS, shrink_args
from dnn_tricks import regularize
from dnn_tricks.callbacks.finetune import FreezeBackbone
from dnn_tricks.callbacks.lr_monitor import LearningRateMonitor
from dnn_tricks.models.backbones import Backbone, apply_lr_scales, optimizer_groups
from dnn_tricks.models.classifier import Classifier
from dnn_tricks.models.input_norm import NormalizeConfig
from dnn_tricks.models.nets import MLP

GRAY = (1, 16, 16)


def _save(state: dict, path) -> str:
    torch.save(state, path)
    return str(path)


def test_torchvision_resnet18_fits_one_channel_images_and_the_class_count():
    net = Backbone((1, 28, 28), 10, name="resnet18", small_input=True)
    assert net.model.conv1.in_channels == 1 and net.model.conv1.stride == (1, 1)
    assert isinstance(net.model.maxpool, nn.Identity)
    assert net.head_name == "fc" and net.head.out_features == 10
    assert net(torch.rand(3, 1, 28, 28)).shape == (3, 10)


def test_pretrained_rgb_weights_summed_over_channels_give_the_rgb_features(tmp_path):
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18()
    weights = _save(rgb.state_dict(), tmp_path / "resnet18.pth")
    net = Backbone(GRAY, 5, name="resnet18", weights=weights)
    # everything but the first conv and the head is the file's, unchanged
    adapted = net.model.state_dict()
    for key, value in rgb.state_dict().items():
        if not key.startswith(("conv1.", "fc.")):
            assert torch.equal(adapted[key], value), key
    # a gray image through the summed filters = the RGB model on that image in all 3 channels
    rgb.fc = nn.Identity()
    net.model.fc = nn.Identity()
    rgb.eval(), net.eval()
    x = torch.rand(4, *GRAY)
    with torch.no_grad():
        torch.testing.assert_close(net(x), rgb(x.repeat(1, 3, 1, 1)), rtol=1e-4, atol=1e-5)


def test_torchvision_weights_name_loads_through_torch_hub_cache(tmp_path, monkeypatch):
    """``weights: IMAGENET1K_V1`` takes torchvision's own download path, which reads torch
    hub's cache first: a file there under the weights URL's name is loaded, nothing fetched."""
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    torch.manual_seed(0)
    rgb = torchvision.models.resnet18()
    cache = tmp_path / "hub" / "checkpoints"
    cache.mkdir(parents=True)
    url = torchvision.models.ResNet18_Weights.IMAGENET1K_V1.url
    torch.save(rgb.state_dict(), cache / url.rsplit("/", 1)[1])
    net = Backbone(GRAY, 5, name="resnet18", weights="IMAGENET1K_V1")
    adapted = net.model.state_dict()
    for key, value in rgb.state_dict().items():
        if not key.startswith(("conv1.", "fc.")):
            assert torch.equal(adapted[key], value), key
    summed = rgb.conv1.weight.detach().sum(dim=1, keepdim=True)
    torch.testing.assert_close(net.model.conv1.weight.detach(), summed)
    assert net.head.out_features == 5


def test_timm_model_by_name_with_local_weights(tmp_path):
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model("test_resnet")
    weights = _save(source.state_dict(), tmp_path / "test_resnet.pth")
    net = Backbone(GRAY, 7, name="timm:test_resnet", weights=weights)
    assert net.model.get_classifier().out_features == 7
    first = net.model.conv1[0]
    torch.testing.assert_close(first.weight, source.conv1[0].weight.sum(1, keepdim=True))
    assert net(torch.rand(2, *GRAY)).shape == (2, 7)
    # without weights timm builds the model for the data itself
    assert Backbone((3, 32, 32), 4, name="timm:test_resnet")(torch.rand(2, 3, 32, 32)).shape == (
        2,
        4,
    )


def test_timm_pretrained_runs_timms_own_loader_on_a_local_file(tmp_path):
    """``weights: pretrained`` is timm's pretrained path (its own first-conv and classifier
    adaptation); ``pretrained_cfg_overlay: {file: ...}`` in model_args points it at a local
    file, so it runs offline."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(0)
    source = timm.create_model("test_resnet")
    path = _save(source.state_dict(), tmp_path / "test_resnet.pth")
    overlay = {"pretrained_cfg_overlay": {"file": path}}
    net = Backbone(GRAY, 7, name="timm:test_resnet", weights="pretrained", model_args=overlay)
    assert net.model.get_classifier().out_features == 7
    summed = source.conv1[0].weight.sum(1, keepdim=True)
    torch.testing.assert_close(net.model.conv1[0].weight, summed)
    body = {k: v for k, v in source.state_dict().items() if not k.startswith(("conv1.0", "fc."))}
    assert all(torch.equal(net.model.state_dict()[k], v) for k, v in body.items())


def test_weights_with_other_keys_name_the_first_missing_and_unexpected_key(tmp_path):
    state = torchvision.models.resnet18().state_dict()
    state["classifier.weight"] = state.pop("fc.weight")
    path = _save(state, tmp_path / "renamed.pth")
    with pytest.raises(ValueError) as error:
        Backbone(GRAY, 10, name="resnet18", weights=path)
    message = str(error.value)
    assert "\n" not in message
    assert "missing fc.weight" in message and "unexpected classifier.weight" in message


def test_weights_with_other_shapes_are_named(tmp_path):
    path = _save(torchvision.models.resnet18(num_classes=10).state_dict(), tmp_path / "w.pth")
    with pytest.raises(ValueError, match=r"does not fit resnet18: size mismatch for fc.weight"):
        Backbone(GRAY, 10, name="resnet18", weights=path)


@pytest.mark.parametrize(
    "name, match",
    [
        ("resnet1", "'resnet1' is not a torchvision classification model; did you mean resnet18"),
        ("timm:resnet1x", "'timm:resnet1x' is not a timm model; did you mean"),
        ("my_models.nope.Net", "'my_models.nope.Net' cannot be imported"),
    ],
)
def test_unknown_model_names_give_one_line(name, match):
    with pytest.raises(ValueError, match=match) as error:
        Backbone(GRAY, 10, name=name)
    assert "\n" not in str(error.value)


def test_weights_name_that_is_neither_file_nor_torchvision_weights():
    with pytest.raises(ValueError, match="neither a file nor weights of resnet18 .*IMAGENET1K_V1"):
        Backbone(GRAY, 10, name="resnet18", weights="IMAGENET_V9")


def test_small_input_needs_a_resnet_stem():
    with pytest.raises(ValueError, match="small_input=true needs a ResNet stem"):
        Backbone(GRAY, 10, name="mobilenet_v3_small", small_input=True)


# ---------------------------------------------------------------- model.net in the CLI


def _net_config(tmp_path, net: dict) -> str:
    path = tmp_path / "net.yaml"
    path.write_text(yaml.safe_dump({"model": {"net": net}}))
    return str(path)


def test_plain_torchvision_class_path_trains(run_cli, tmp_path):
    """`class_path: torchvision.models.resnet18` (a builder function) used to fail with
    "ResNet.forward() takes 2 positional arguments but 3 were given"."""
    net = _net_config(tmp_path, {"class_path": "torchvision.models.resnet18"})
    run_cli(
        [
            "fit",
            "--config",
            CONFIGS / "digits.yaml",
            "--config",
            net,
            *shrink_args(tmp_path / "logs", batches=2),
            "--test_after_fit=false",
        ]
    )
    checkpoint = next((tmp_path / "logs").rglob("last.ckpt"))
    state = torch.load(checkpoint, weights_only=True)["state_dict"]
    assert state["net.conv1.weight"].shape[1] == 1 and state["net.fc.weight"].shape[0] == 10


def test_torchvision_class_taking_num_classes_gets_it_by_name(tmp_path, monkeypatch):
    from dnn_tricks.app import TrainerCLI

    monkeypatch.chdir(tmp_path)
    net = _net_config(tmp_path, {"class_path": "torchvision.models.MobileNetV2"})
    cli = TrainerCLI(args=["--config", str(CONFIGS / "digits.yaml"), "--config", net], run=False)
    model = cli.model.net
    assert isinstance(model, torchvision.models.MobileNetV2)
    assert model.classifier[-1].out_features == 10 and model.features[0][0].in_channels == 1


def test_unknown_backbone_name_exits_2_with_one_line(run_cli, tmp_path, capsys):
    net = {"class_path": "dnn_tricks.models.backbones.Backbone", "init_args": {"name": "resnet1"}}
    with pytest.raises(SystemExit) as stop:
        run_cli(
            ["fit", "--config", CONFIGS / "digits.yaml", "--config", _net_config(tmp_path, net)]
        )
    assert stop.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is not a torchvision classification model" in err[0]
    assert not (tmp_path / "logs").exists()


# ---------------------------------------------------------------- fine-tuning switches


def test_backbone_lr_scale_scales_backbone_steps_under_any_schedule():
    torch.manual_seed(0)
    net = Backbone(GRAY, 3, name="resnet18", backbone_lr_scale=0.1)
    groups = optimizer_groups(net, decay_norm_and_bias=False)
    # the same decay / no-decay split as without the scale, only cut by backbone vs head
    reference = regularize.decay_param_groups(net)
    decayed = {id(p) for p in reference[0]["params"]}
    for group in groups:
        assert all((id(p) in decayed) == ("weight_decay" not in group) for p in group["params"])
    head = {id(p) for p in net.head.parameters()}
    for group in groups:
        in_head = {id(p) in head for p in group["params"]}
        assert len(in_head) == 1
        assert group.get("lr_scale", 1.0) == (1.0 if in_head == {True} else 0.1)
    optimizer = torch.optim.SGD(groups, lr=0.5)
    apply_lr_scales(optimizer)
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=0.5, total_steps=10, cycle_momentum=False
    )
    x, y = torch.rand(4, *GRAY), torch.tensor([0, 1, 2, 0])
    net.eval()  # fixed batch norm statistics: the step is a plain SGD step
    for _ in range(2):
        scheduled = optimizer.param_groups[0]["lr"]
        optimizer.zero_grad()
        nn.functional.cross_entropy(net(x), y).backward()
        before = {p: (p.detach().clone(), p.grad.clone()) for p in net.parameters()}
        optimizer.step()
        for p, (old, grad) in before.items():
            rate = scheduled * (1.0 if id(p) in head else 0.1)
            torch.testing.assert_close(p.detach(), old - rate * grad)
        assert all(g["lr"] == scheduled for g in optimizer.param_groups)  # schedule untouched
        schedule.step()


class _RatesUsed(Callback):
    """Each param group's rate inside every optimizer step, after apply_lr_scales' scaling
    (its pre-hook was registered first, in configure_optimizers)."""

    def __init__(self) -> None:
        self.rates: list[list[float]] = []

    def on_train_start(self, trainer, pl_module) -> None:
        record = lambda opt, args, kwargs: self.rates.append([g["lr"] for g in opt.param_groups])  # noqa: E731
        trainer.optimizers[0].register_step_pre_hook(record)


def test_lr_monitor_logs_the_rate_each_group_steps_with(tmp_path):
    """backbone_lr_scale 0.1 under one-cycle: every group's logged rate at each step is the
    rate its step used, the backbone's a tenth of the head's (Lightning's own monitor logs
    the scheduled, unscaled rate for both)."""
    torch.manual_seed(0)
    x, y = torch.rand(32, *GRAY), torch.arange(32) % 3
    model = Classifier(
        net=partial(Backbone, name="resnet18", backbone_lr_scale=0.1),
        input_norm=NormalizeConfig(kind="none"),
        input_shape=GRAY,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3),
        scheduler=partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.1, total_steps=None),
        scheduler_interval="step",
    )
    used = _RatesUsed()
    trainer = Trainer(
        max_epochs=2,
        limit_train_batches=3,
        limit_val_batches=0,
        callbacks=[LearningRateMonitor(logging_interval="step"), used],
        logger=CSVLogger(tmp_path),
        log_every_n_steps=1,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    with open(Path(trainer.logger.log_dir) / "metrics.csv") as file:
        rows = [r for r in csv.DictReader(file) if r.get("lr-SGD/pg1")]
    names = [n for n in rows[0] if n.startswith("lr-SGD/pg") and "-" not in n[7:]]
    scales = [g.get("lr_scale", 1.0) for g in trainer.optimizers[0].param_groups]
    assert sorted(set(scales)) == [0.1, 1.0] and len(names) == len(scales)
    assert len(rows) == len(used.rates) == 6
    for row, rates in zip(rows, used.rates, strict=True):
        logged = [float(row[f"lr-SGD/pg{i + 1}"]) for i in range(len(scales))]
        assert logged == pytest.approx(rates, rel=1e-6)
    assert len({r[0] for r in used.rates}) > 1  # the schedule moved the rates


def test_backbone_bn_eval_keeps_running_statistics():
    for bn_eval in (True, False):
        net = Backbone(GRAY, 3, name="resnet18", backbone_bn_eval=bn_eval).train()
        bn = net.model.bn1
        before = bn.running_mean.clone()
        net(torch.rand(8, *GRAY) + 1.0)
        assert net.training and bn.training is not bn_eval
        assert torch.equal(bn.running_mean, before) is bn_eval


class _Snapshots(Callback):
    def __init__(self) -> None:
        self.states: list[dict[str, torch.Tensor]] = []

    def on_fit_start(self, trainer, pl_module) -> None:
        self.on_train_epoch_end(trainer, pl_module)

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        state = pl_module.net.model.state_dict()
        self.states.append({k: v.detach().clone() for k, v in state.items()})


def _fit(net, callbacks: list[Callback], epochs: int = 2) -> Classifier:
    x, y = torch.rand(32, *GRAY), torch.arange(32) % 3
    model = Classifier(
        net=net,
        input_norm=NormalizeConfig(kind="none"),
        input_shape=GRAY,
        num_classes=3,
        optimizer=partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=1e-3),
    )
    trainer = Trainer(
        max_epochs=epochs,
        limit_train_batches=2,
        callbacks=callbacks,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        num_sanity_val_steps=0,
    )
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=8))
    return model


def test_freeze_backbone_trains_only_the_head_for_the_first_epochs():
    torch.manual_seed(0)
    snapshots = _Snapshots()
    model = _fit(partial(Backbone, name="resnet18"), [FreezeBackbone(epochs=1), snapshots])
    start, frozen, thawed = snapshots.states
    for key in start:
        if key.startswith("fc."):
            assert not torch.equal(frozen[key], start[key]), key
        elif key.endswith(("weight", "bias", "running_mean")):
            # frozen: no step (nor decay, nor momentum) and no batch-norm statistics update
            assert torch.equal(frozen[key], start[key]), key
    assert not torch.equal(thawed["conv1.weight"], frozen["conv1.weight"])
    assert not torch.equal(thawed["bn1.running_mean"], frozen["bn1.running_mean"])
    assert all(p.requires_grad for p in model.net.parameters())


def test_freeze_backbone_needs_the_adapter():
    with pytest.raises(ValueError, match="FreezeBackbone callback needs model.net"):
        _fit(partial(MLP, hidden=[8]), [FreezeBackbone(epochs=1)], epochs=1)
