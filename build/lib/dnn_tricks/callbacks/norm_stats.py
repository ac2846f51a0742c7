"""Running statistics of normalization layers: finding them, checking their health and
measuring how far they drift from the statistics their inputs actually have.

Shared by RunningStatsCheck and PreciseBN. Which layers have running statistics, and which
buffers those are, is defined once in ``dnn_tricks.norm_layers`` (buffers named
``running_*``): BatchNorm that tracks them, IterNorm (running mean and whitening matrix),
or a layer of the user's that follows the same naming. Health checks read any of them; the
drift measure knows two kinds, a running variance (BatchNorm-like) and a running whitening
matrix (IterNorm-like).
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from dnn_tricks.norm_layers import running_buffers
from dnn_tricks.norm_layers import running_stat_layers as running_stat_layers  # re-exported

# ----------------------------------------------------------------------------- layers


def is_iternorm(module: nn.Module) -> bool:
    """IterNorm-like: its running statistics include a whitening matrix."""
    return "running_whiten" in running_buffers(module)


def has_batch_statistics(module: nn.Module) -> bool:
    """Whether the drift measure applies: a running variance or whitening matrix estimated
    from batch statistics over (N, H, W). InstanceNorm's tracked statistics average
    per-sample ones instead, which :class:`BatchStatistics` does not measure."""
    bufs = running_buffers(module)
    per_sample = (nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d)
    known = "running_mean" in bufs and ("running_var" in bufs or "running_whiten" in bufs)
    return known and not isinstance(module, per_sample)


def health_flags(layer: nn.Module) -> Tensor:
    """[finite, admissible] as a 2-vector without a host sync: a variance must be >= 0, a
    whitening matrix (an average of SPD matrices) needs a positive diagonal."""
    bufs = running_buffers(layer)
    finite = torch.stack([torch.isfinite(b).all() for b in bufs.values()]).all()
    admissible = torch.ones((), dtype=torch.bool, device=finite.device)
    if "running_whiten" in bufs:
        admissible = admissible & (bufs["running_whiten"].diagonal(dim1=-2, dim2=-1) > 0).all()
    if "running_var" in bufs:
        admissible = admissible & (bufs["running_var"] >= 0).all()
    return torch.stack([finite, admissible])


def describe_unhealthy(layers: list[tuple[str, nn.Module]]) -> list[str]:
    """One phrase per layer whose running statistics are non-finite or impossible."""
    if not layers:
        return []
    flags = torch.stack([health_flags(m) for _, m in layers]).tolist()  # one sync
    problems = []
    for (name, layer), (finite, admissible) in zip(layers, flags, strict=True):
        if finite and admissible:
            continue
        parts = []
        for key, buf in running_buffers(layer).items():
            nan, inf = int(torch.isnan(buf).sum()), int(torch.isinf(buf).sum())
            if nan or inf:
                parts.append(f"{key} has {nan} NaN and {inf} inf of {buf.numel()}")
        if not admissible:
            what = (
                "running_whiten has a non-positive diagonal entry"
                if is_iternorm(layer)
                else "running_var has negative entries"
            )
            parts.append(what)
        problems.append(f"{name}: {'; '.join(parts)}")
    return problems


# ----------------------------------------------------------------------------- drift


@dataclass
class Drift:
    """How far a layer's running statistics are from freshly measured ones, in units of the
    layer's eval-mode output: ``mean_shift`` is the mean and ``log_std_ratio`` the log of the
    std its output would have on the fresh inputs if the fresh statistics were the truth
    (both 0 when running = fresh), at the worst ``channel``; ``value`` is the larger of the
    two absolute values."""

    layer: str
    value: float
    channel: int
    mean_shift: float
    log_std_ratio: float


class BatchStatistics:
    """Forward pre-hook: averages per-batch statistics of a layer's input over batches.

    That average is what the running buffers estimate (an exponential average of batch
    statistics, PyTorch's batch norm storing the unbiased batch variance) and exactly what
    PreciseBN computes, so a healthy layer shows no drift however small its batches.
    """

    def __init__(self, layer: nn.Module) -> None:
        self.layer = layer
        self.sums: Tensor | None = None  # flat: [batches, sum of means, sum of var or W, Sigma]

    def __call__(self, module: nn.Module, args: tuple[Any, ...]) -> None:
        x = args[0].detach()
        flat = x.transpose(0, 1).reshape(x.shape[1], -1).double()  # C x samples
        mean = flat.mean(1)
        if is_iternorm(self.layer):
            from dnn_tricks.models.iternorm import newton_inverse_sqrt

            g, d, m = self.layer.num_groups, self.layer.group_size, flat.shape[1]
            centred = (flat - mean[:, None]).reshape(g, d, m)
            eye = torch.eye(d, dtype=flat.dtype, device=flat.device)
            # the covariance (biased, plus eps) the layer whitens in training, and its W
            sigma = centred @ centred.transpose(1, 2) / m + self.layer.eps * eye
            second = torch.cat(
                [newton_inverse_sqrt(sigma, self.layer.T).flatten(), sigma.flatten()]
            )
        else:
            second = flat.var(1, unbiased=True)
        batch = torch.cat([mean.new_ones(1), mean, second])
        self.sums = batch if self.sums is None else self.sums + batch

    def reference(self) -> dict[str, Tensor]:
        """Batch-averaged mean and variance (BN) or mean, W and Sigma (IterNorm)."""
        assert self.sums is not None, "no batch went through the layer"
        avg = self.sums[1:] / self.sums[0]
        c = self.layer.running_mean.numel()
        out = {"mean": avg[:c]}
        if is_iternorm(self.layer):
            g, d = self.layer.num_groups, self.layer.group_size
            out["whiten"], out["sigma"] = avg[c:].reshape(2, g, d, d).unbind(0)
        else:
            out["var"] = avg[c:]
        return out


def layer_drift(name: str, layer: nn.Module, ref: dict[str, Tensor]) -> Drift:
    """Compare a layer's running buffers with reference statistics (see :class:`Drift`).

    BatchNorm: shift (mu - mu_run) / sqrt(var_run + eps), log-std ratio
    0.5 log((var + eps) / (var_run + eps)). IterNorm: shift W_run (mu - mu_run), log-std
    ratio 0.5 log of diag(W_run Sigma W_run^T) / diag(W Sigma W^T) per channel.
    """
    run_mean = layer.running_mean.double()
    delta = ref["mean"] - run_mean
    if is_iternorm(layer):
        g, d = layer.num_groups, layer.group_size
        w_run, sigma = layer.running_whiten.double(), ref["sigma"]
        shift = torch.bmm(w_run, delta.reshape(g, d, 1)).flatten()
        var_run = (w_run @ sigma @ w_run.transpose(1, 2)).diagonal(dim1=-2, dim2=-1).flatten()
        w_ref = ref["whiten"]
        var_ref = (w_ref @ sigma @ w_ref.transpose(1, 2)).diagonal(dim1=-2, dim2=-1).flatten()
        log_std = 0.5 * (var_run.clamp_min(1e-300) / var_ref.clamp_min(1e-300)).log()
    else:
        run_var, eps = layer.running_var.double(), getattr(layer, "eps", 0.0)
        shift = delta / (run_var + eps).sqrt()
        log_std = 0.5 * ((ref["var"] + eps) / (run_var + eps)).log()
    worst = torch.maximum(shift.abs(), log_std.abs())
    channel = int(worst.argmax())
    return Drift(
        name, float(worst[channel]), channel, float(shift[channel]), float(log_std[channel])
    )


@contextmanager
def modes_restored(model: nn.Module) -> Iterator[nn.Module]:
    """Restore each submodule's own train/eval flag on exit (a model may mix them, e.g. a
    frozen stem kept in eval mode)."""
    flags = {m: m.training for m in model.modules()}
    try:
        yield model
    finally:
        for module, flag in flags.items():
            module.training = flag


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Every submodule in eval mode inside, each one's own flag restored on exit."""
    with modes_restored(model):
        yield model.eval()


def measure_drift(
    model: nn.Module,
    inputs: Iterable[Tensor],
    layers: list[tuple[str, nn.Module]],
    reduce: Any = None,
) -> list[Drift]:
    """Run ``inputs`` through ``model`` in eval mode without gradients (running buffers stay
    untouched) and compare each layer's running statistics with its inputs' statistics.
    Layers without batch statistics (:func:`has_batch_statistics`) are left out.

    ``reduce(tensor)`` sums a tensor over processes (DDP); None for one process.
    """
    layers = [(name, layer) for name, layer in layers if has_batch_statistics(layer)]
    hooks = [BatchStatistics(m) for _, m in layers]
    handles = [m.register_forward_pre_hook(h) for (_, m), h in zip(layers, hooks, strict=True)]
    try:
        with torch.no_grad(), eval_mode(model):
            for x in inputs:
                model(x)
    finally:
        for handle in handles:
            handle.remove()
    drifts = []
    for (name, layer), hook in zip(layers, hooks, strict=True):
        if hook.sums is None:  # a layer on a branch these inputs never reach
            continue
        if reduce is not None:
            hook.sums = reduce(hook.sums)
        drifts.append(layer_drift(name, layer, hook.reference()))
    return drifts
