"""The learning-rate monitor, logging the rate each parameter group actually steps with."""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import LearningRateMonitor as LightningLearningRateMonitor


class LearningRateMonitor(LightningLearningRateMonitor):
    """Lightning's LearningRateMonitor, except that a parameter group carrying an
    ``lr_scale`` (a Backbone's ``backbone_lr_scale``) is logged at its scheduled rate times
    that scale: the rate its step uses. The scale is applied only around each optimizer step
    (models.backbones.apply_lr_scales), so Lightning's monitor would log the head's rate for
    the backbone's groups too. Arguments are Lightning's."""

    def _extract_lr(self, param_group: dict[str, Any], name: str) -> dict[str, Any]:
        rate = param_group["lr"] * param_group.get("lr_scale", 1.0)
        self.lrs[name].append(rate)
        return {name: rate}
