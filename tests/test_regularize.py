"""Regularizers against hand computations and exact autograd Jacobians, and the
regularizer objects wired into the classifier's loss and optimizer step."""

import numpy as np
import pytest
import torch
from torch import nn
from torch.nn.utils.parametrizations import weight_norm

from dnn_tricks.jacobian import jacobian_norm, jacobian_penalty
from dnn_tricks.regularize import (
    L1,
    L2,
    Jacobian,
    MaxNorm,
    apply_max_norm,
    decay_param_groups,
    l1_penalty,
    l2_penalty,
    penalized_weights,
)


class Mixed(nn.Module):
    """Every kind of layer the grouping must tell apart (no forward needed)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(6, 5)
        self.bn1 = nn.BatchNorm1d(5)
        self.conv = nn.Conv2d(3, 4, 3)
        self.bn2 = nn.BatchNorm2d(4)
        self.ln = nn.LayerNorm(5)
        self.wn = weight_norm(nn.Linear(5, 3))
        self.frozen = nn.Linear(3, 3)
        self.frozen.requires_grad_(False)


def _ids(params) -> set[int]:
    return {id(p) for p in params}


def test_decay_groups_membership() -> None:
    m = Mixed()
    groups = decay_param_groups(m)
    assert len(groups) == 2 and "weight_decay" not in groups[0]
    assert groups[1]["weight_decay"] == 0.0
    wn = m.wn.parametrizations.weight
    assert _ids(groups[0]["params"]) == _ids([m.fc.weight, m.conv.weight, wn.original1])
    exempt = [m.fc.bias, m.bn1.weight, m.bn1.bias, m.conv.bias, m.bn2.weight, m.bn2.bias]
    exempt += [m.ln.weight, m.ln.bias, m.wn.bias, wn.original0]
    assert _ids(groups[1]["params"]) == _ids(exempt)

    (everything,) = decay_param_groups(m, decay_norm_and_bias=True)
    trainable = [p for p in m.parameters() if p.requires_grad]
    assert _ids(everything["params"]) == _ids(trainable)
    assert len(everything["params"]) == len(trainable)


def test_sgd_weight_decay_skips_exempt_params() -> None:
    m = Mixed()
    groups = decay_param_groups(m)
    before = {id(p): p.detach().clone() for p in m.parameters()}
    for p in m.parameters():
        p.grad = torch.zeros_like(p)
    lr, wd = 0.1, 0.5
    torch.optim.SGD(groups, lr=lr, weight_decay=wd).step()
    for p in groups[1]["params"]:
        assert torch.equal(p, before[id(p)])
    for p in groups[0]["params"]:  # SGD: p <- p - lr * (grad + wd p) with grad = 0
        torch.testing.assert_close(p, before[id(p)] * (1 - lr * wd))


def test_l1_l2_match_hand_sums() -> None:
    m = Mixed()
    with torch.no_grad():
        m.bn1.weight.fill_(7.0)  # norm params must not count
    plain = [m.fc.weight, m.conv.weight, m.wn.weight]
    assert len(list(penalized_weights(m))) == 3
    l1 = sum(w.detach().abs().sum().item() for w in plain)
    l2 = sum((w.detach() ** 2).sum().item() for w in plain)
    assert l1_penalty(m).item() == pytest.approx(l1, rel=1e-6)
    assert l2_penalty(m).item() == pytest.approx(l2, rel=1e-6)


def test_l2_of_weight_norm_layer_is_sum_of_g_squared() -> None:
    layer = weight_norm(nn.Linear(4, 3))
    g = layer.parametrizations.weight.original0
    # every row of W = g v / ||v|| has norm |g|, so sum W^2 = sum g^2 whatever v is
    torch.testing.assert_close(l2_penalty(layer), (g.detach() ** 2).sum())
    l2_penalty(layer).backward()
    torch.testing.assert_close(g.grad, 2 * g.detach())


def _small_mlp() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 4)).double()


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(2, 3, 3, padding=1), nn.Tanh(), nn.Flatten(), nn.Linear(3 * 5 * 5, 5)
    ).double()


def _exact_sq_norms(net: nn.Module, x: torch.Tensor, create_graph: bool = False) -> torch.Tensor:
    """||J_i||_F^2 per sample from the full Jacobian (the independent reference)."""
    rows = []
    for xi in x:
        jac = torch.autograd.functional.jacobian(
            lambda z: net(z.unsqueeze(0)).squeeze(0), xi, create_graph=create_graph
        )
        rows.append(jac.pow(2).sum())
    return torch.stack(rows)


@pytest.mark.parametrize("make_net, shape", [(_small_mlp, (8, 6)), (_small_cnn, (4, 2, 5, 5))])
def test_jacobian_exact_and_projected(make_net, shape) -> None:
    net = make_net().eval()
    x = torch.randn(*shape, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    reference = _exact_sq_norms(net, x).mean()

    exact, logits = jacobian_penalty(net, x, projections=-1)
    torch.testing.assert_close(logits, net(x))
    assert exact.item() == pytest.approx(reference.item(), rel=1e-5)

    rng = torch.Generator().manual_seed(2)
    estimate, _ = jacobian_penalty(net, x, projections=2000, generator=rng)
    assert estimate.item() == pytest.approx(reference.item(), rel=0.03)
    assert not x.requires_grad  # the caller's batch is left alone


def test_jacobian_penalty_trains_through_exact_gradient() -> None:
    net = _small_mlp()
    x = torch.randn(5, 6, dtype=torch.float64)
    penalty, logits = jacobian_penalty(net, x, projections=-1)
    (penalty + logits.sum()).backward()  # the loss reuses the same forward pass
    ours = [p.grad.clone() for p in net.parameters()]

    net.zero_grad()
    (_exact_sq_norms(net, x, create_graph=True).mean() + net(x).sum()).backward()
    for got, want in zip(ours, (p.grad for p in net.parameters()), strict=True):
        torch.testing.assert_close(got, want)


def test_jacobian_penalty_refuses_inference_and_bad_projections() -> None:
    net = _small_mlp()
    x = torch.randn(3, 6, dtype=torch.float64)
    with torch.inference_mode(), pytest.raises(RuntimeError, match="jacobian_norm"):
        jacobian_penalty(net, x)
    with torch.no_grad(), pytest.raises(RuntimeError, match="no_grad"):
        jacobian_penalty(net, x)
    with pytest.raises(ValueError, match="projections=0"):
        jacobian_penalty(net, x, projections=0)


def test_jacobian_norm_under_inference_mode() -> None:
    net = _small_cnn().eval()
    with torch.inference_mode():
        x = torch.randn(4, 2, 5, 5, dtype=torch.float64)  # an inference tensor, as in validation
        value = jacobian_norm(net, x)
    reference = _exact_sq_norms(net, x.clone()).sqrt().mean()
    assert value.item() == pytest.approx(reference.item(), rel=1e-5)
    assert not value.requires_grad
    assert all(p.grad is None for p in net.parameters())


def _row_norms(w: torch.Tensor) -> torch.Tensor:
    return w.detach().flatten(1).norm(dim=1)


def test_max_norm_after_huge_sgd_step() -> None:
    torch.manual_seed(0)
    fc, conv, bn = nn.Linear(10, 6), nn.Conv2d(2, 4, 3), nn.BatchNorm1d(6)
    with torch.no_grad():
        bn.weight.fill_(10.0)
    c = 3.0
    assert _row_norms(fc.weight).max() < c and _row_norms(conv.weight).max() < c
    # only rows 0-2 and filters 0-1 receive gradient, the others must come out bit-identical
    loss = fc(torch.randn(8, 10))[:, :3].sum() + conv(torch.randn(2, 2, 5, 5))[:, :2].sum()
    loss.backward()
    model = nn.ModuleList([fc, conv, bn])
    torch.optim.SGD(model.parameters(), lr=1e3).step()
    stepped = [fc.weight.detach().clone(), conv.weight.detach().clone()]
    bias_after_step = fc.bias.detach().clone()
    assert _row_norms(stepped[0])[:3].min() > c  # the step did break the bound

    apply_max_norm(model, c)
    for w, before in zip([fc.weight, conv.weight], stepped, strict=True):
        norms = _row_norms(before)
        assert (_row_norms(w) <= c + 1e-6).all()
        big = norms > c
        expected = before[big] * (c / norms[big]).view(-1, *[1] * (before.dim() - 1))
        torch.testing.assert_close(w.detach()[big], expected)  # same direction, norm c
        assert torch.equal(w.detach()[~big], before[~big])
    assert torch.equal(fc.bias.detach(), bias_after_step)
    assert torch.all(bn.weight == 10.0)


def test_max_norm_weight_norm_and_transposed_conv() -> None:
    torch.manual_seed(0)
    wn = weight_norm(nn.Linear(5, 4))
    tconv = nn.ConvTranspose2d(4, 6, 3, groups=2)
    with torch.no_grad():
        wn.parametrizations.weight.original0.mul_(torch.tensor([[10.0], [0.1], [-10.0], [1.0]]))
        tconv.weight.mul_(20.0)
    c = 2.0
    apply_max_norm(nn.ModuleList([wn, tconv]), c)
    assert (_row_norms(wn.weight) <= c + 1e-6).all()
    assert _row_norms(wn.weight)[1] < c  # a unit inside the ball keeps its own norm
    # ConvTranspose (in, out/groups, k, k): output unit j of group g reads w[g's inputs, j]
    w = tconv.weight.detach()
    for g in range(2):
        for j in range(3):
            assert w[g * 2 : (g + 1) * 2, j].norm() <= c + 1e-6
            assert w[g * 2 : (g + 1) * 2, j].norm() >= c - 1e-5  # all were far above c
    with pytest.raises(ValueError, match="max_norm"):
        apply_max_norm(wn, 0.0)


@pytest.mark.filterwarnings("ignore::FutureWarning")
def test_legacy_weight_norm_hook_is_treated_like_the_parametrization() -> None:
    layer = torch.nn.utils.weight_norm(nn.Linear(4, 3))
    with torch.no_grad():
        layer.weight_g.copy_(torch.tensor([[10.0], [0.5], [-10.0]]))
    groups = decay_param_groups(layer)
    assert _ids(groups[0]["params"]) == _ids([layer.weight_v])
    assert _ids(groups[1]["params"]) == _ids([layer.weight_g, layer.bias])
    torch.testing.assert_close(l2_penalty(layer), (layer.weight_g.detach() ** 2).sum())
    apply_max_norm(layer, 2.0)
    layer(torch.zeros(1, 4))  # the hook form recomputes `weight` in the forward pre-hook
    norms = _row_norms(layer.weight)
    assert norms.tolist() == pytest.approx([2.0, 0.5, 2.0], rel=1e-6)


# ---------------------------------------------------------------- regularizer objects


# the classifier's steps are called here without a Trainer, which self.log() warns about
no_trainer = pytest.mark.filterwarnings("ignore:You are trying to `self.log")


def _classifier(regularizers, hidden=(16,)):
    from functools import partial

    from dnn_tricks.models.classifier import Classifier
    from dnn_tricks.models.input_norm import NormalizeConfig
    from dnn_tricks.models.nets import MLP

    torch.manual_seed(0)
    return Classifier(
        net=partial(MLP, hidden=list(hidden), activation="tanh"),
        input_norm=NormalizeConfig(kind="none"),
        input_shape=(6,),
        num_classes=4,
        regularizers=regularizers,
    ).double()


@no_trainer
def test_training_loss_is_data_loss_plus_each_weighted_term() -> None:
    regs = [L1(1e-3), L2(1e-2), Jacobian(0.5, projections=-1)]
    model = _classifier(regs)
    x = torch.randn(8, 6, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    calls = []
    model.net.register_forward_hook(lambda *_: calls.append(1))
    loss = model.training_step((x, y), 0)
    assert len(calls) == 1  # the Jacobian's forward also gives the loss its logits

    weights = [w.detach().numpy() for w in penalized_weights(model.net)]
    l1 = 1e-3 * sum(np.abs(w).sum() for w in weights)
    l2 = 1e-2 * sum((w**2).sum() for w in weights)
    jac = 0.5 * 0.5 * _exact_sq_norms(model.net, x).mean().item()
    data = torch.nn.functional.cross_entropy(model.net(x), y).item()
    assert loss.item() == pytest.approx(data + l1 + l2 + jac, rel=1e-10)
    assert [r.name for r in regs] == ["l1", "l2", "jacobian"]


@no_trainer
def test_max_norm_object_acts_after_the_optimizer_step_only() -> None:
    model = _classifier([MaxNorm(c=0.5)])
    x, y = torch.randn(8, 6, dtype=torch.float64), torch.tensor([0, 1, 2, 3] * 2)
    optimizer = torch.optim.SGD(model.parameters(), lr=50.0)

    def closure():
        optimizer.zero_grad()
        loss = model.training_step((x, y), 0)
        loss.backward()
        return loss

    terms, _ = model._penalties(x)
    assert terms == {}  # a constraint adds nothing to the loss
    unconstrained = _classifier([])
    unconstrained.load_state_dict(model.state_dict())
    plain = torch.optim.SGD(unconstrained.parameters(), lr=50.0)
    loss = unconstrained.training_step((x, y), 0)
    loss.backward()
    plain.step()
    assert max(_row_norms(w).max() for w in penalized_weights(unconstrained.net)) > 0.5

    model.optimizer_step(0, 0, optimizer, closure)
    for w, free in zip(
        penalized_weights(model.net), penalized_weights(unconstrained.net), strict=True
    ):
        norms = _row_norms(free)
        expected = free.detach() * (0.5 / norms).clamp(max=1.0)[:, None]  # renorm's rule
        torch.testing.assert_close(w.detach(), expected, rtol=1e-6, atol=1e-9)


def test_regularizer_list_errors_name_the_key() -> None:
    with pytest.raises(ValueError, match="more than one term named l2"):
        _classifier([L2(1e-3), L2(1e-4)])
    with pytest.raises(TypeError, match="model.regularizers entries must be"):
        _classifier([0.1])
    with pytest.raises(ValueError, match="L1 weight=-1"):
        L1(-1.0)
    with pytest.raises(ValueError, match="MaxNorm c=0"):
        MaxNorm(0.0)
    with pytest.raises(ValueError, match="Jacobian projections=0"):
        Jacobian(0.1, projections=0)
