"""What counts as a normalization layer, and which of its buffers are running statistics.

One definition for the net builders (``models/``), the weight-decay groups
(``regularize.py``) and the running-statistics callbacks (``callbacks/``), so a norm layer
given by class path, the project's own IterNorm and torch's layers are recognised alike.
It imports torch only, so every layer of the package may use it.
"""

from __future__ import annotations

from torch import Tensor, nn

# torch's normalization layers; a layer of any other class counts through its running buffers.
TORCH_NORM_LAYERS: tuple[type[nn.Module], ...] = (
    nn.BatchNorm1d,
    nn.BatchNorm2d,
    nn.BatchNorm3d,
    nn.SyncBatchNorm,
    nn.InstanceNorm1d,
    nn.InstanceNorm2d,
    nn.InstanceNorm3d,
    nn.LayerNorm,
    nn.GroupNorm,
    nn.RMSNorm,
    nn.LocalResponseNorm,
)


def running_buffers(module: nn.Module) -> dict[str, Tensor]:
    """The statistics a layer keeps for eval mode: its own buffers named ``running_*``.

    That is torch's naming (BatchNorm's ``running_mean`` / ``running_var``), IterNorm's
    (``running_mean`` / ``running_whiten``), and any user layer that follows it. Empty for a
    layer without: a BatchNorm with ``track_running_stats=False`` registers them as None,
    and ``named_buffers`` skips None. ``num_batches_tracked`` is a counter, not a statistic.
    """
    return {
        name: buf
        for name, buf in module.named_buffers(recurse=False)
        if name.startswith("running_")
    }


def running_stat_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """(qualified name, layer) of every submodule of ``model`` with running statistics."""
    return [(name, module) for name, module in model.named_modules() if running_buffers(module)]


def is_norm_layer(module: nn.Module) -> bool:
    """A torch normalization layer, or any layer that keeps running statistics."""
    return isinstance(module, TORCH_NORM_LAYERS) or bool(running_buffers(module))
