"""InputStatsCheck: does the model really see normalized inputs, with train statistics only?

Normalization bugs do not crash: a normalizer fitted on other data, applied twice or not
at all, or fitted on train+val (a leak that flatters validation) all train "fine". At fit
start this checks the statistics of the inputs the model receives against what the
configured normalization promises, and that validation batches went through statistics
fitted on the train split alone.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import numpy as np
import torch
from lightning.pytorch import Callback, LightningModule, Trainer
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch import Tensor

from dnn_tricks.callbacks.trainer_utils import batch_inputs, to_model

WHITENING = ("pca_whiten", "zca_whiten")
DECORRELATING = ("pca", *WHITENING)


def unit_rows(z: Tensor, channelwise: bool) -> Tensor:
    """Observations x units in float64: features, or channels pooled over positions."""
    if channelwise and z.ndim > 2:
        return z.movedim(1, -1).reshape(-1, z.shape[1]).double()
    return z.reshape(len(z), -1).double()


def off_diagonal_rms(rows: Tensor, keep: Tensor) -> float:
    """Root mean square of the off-diagonal correlations between the kept units."""
    x = rows[:, keep]
    k = x.shape[1]
    if k < 2:
        return 0.0
    xc = x - x.mean(0)
    cov = xc.T @ xc / (len(x) - 1)
    std = cov.diagonal().sqrt()
    off = cov / std[:, None] / std[None, :] - torch.eye(k, dtype=cov.dtype, device=cov.device)
    return float(off.square().sum().div(k * (k - 1)).sqrt())


def input_problems(
    z: Tensor,
    kind: str,
    channelwise: bool,
    promised_variance: float | None,
    mean_tol: float,
    var_tol: float,
    corr_tol: float,
) -> list[str]:
    """What is wrong with normalized train inputs ``z`` for normalization ``kind``.

    Means are measured in units of each unit's own std (so ``center`` is judged alike);
    ``standardize`` must give variance 1 on average over non-constant units; whitening must
    give the total variance the normalizer promises (``promised_variance``: the sum of
    lambda / (lambda + eps), below the unit count where eps damps small directions);
    ``pca`` and whitening must decorrelate.
    """
    if kind == "none":
        return []
    rows = unit_rows(z, channelwise)
    unit = "channel" if channelwise and z.ndim > 2 else "feature"
    mean, var = rows.mean(0), rows.var(0)
    keep = var > 1e-8 * float(var.max()) if float(var.max()) > 0 else var > 0
    if not bool(keep.any()):
        return ["every input feature is constant after normalization"]
    problems = []
    z_mean = mean[keep] / var[keep].sqrt()
    rms = float(z_mean.square().mean().sqrt())
    if rms > mean_tol:
        worst = int(keep.nonzero()[z_mean.abs().argmax()])
        problems.append(
            f"the {unit} means are {rms:.3g} standard deviations from 0 (RMS; worst {unit} "
            f"{worst}: {float(z_mean.abs().max()):.3g}), expected ~0 within mean_tol={mean_tol}"
        )
    if kind == "standardize":
        avg = float(var[keep].mean())
        if abs(avg - 1) > var_tol:
            problems.append(
                f"the average {unit} variance is {avg:.4g}, expected 1 within var_tol={var_tol}"
            )
    if kind in WHITENING and promised_variance:
        total = float(var.sum())
        if abs(total / promised_variance - 1) > var_tol:
            problems.append(
                f"the total variance is {total:.4g} where the fitted whitening promises "
                f"{promised_variance:.4g} (relative tolerance var_tol={var_tol})"
            )
    if kind in DECORRELATING:
        corr = off_diagonal_rms(rows, keep)
        if corr > corr_tol:
            problems.append(
                f"features stay correlated (RMS off-diagonal correlation {corr:.3g} > "
                f"corr_tol={corr_tol}): the decorrelation is not in effect"
            )
    return problems


class InputStatsCheck(Callback):
    """At train start (the model's data-fitted layers are fitted or restored by then), checks
    the normalized inputs the model receives.

    * Train statistics: ``num_samples`` train samples (seeded, unaugmented), normalized by
      the model's ``input_norm`` exactly as in training, must have mean ~0, variance ~1
      (``standardize``), the promised variance and no correlation (whitening), per channel
      where ``input_norm.per_channel`` pools channels; see
      :func:`input_problems`.
    * Val statistics (``check_val``): a validation batch from the val loader, normalized as
      in validation, must equal the same raw batch through a normalizer refitted on the
      train split only. Otherwise the message says whether the inputs match a refit on the
      val split instead (the normalizer saw validation data).

    Needs the project's Classifier (``input_norm``) and DataModule (``split``,
    ``raw_batches``, ``to_float``). Every process runs the same seeded check, so under DDP
    all raise alike.

    Example, under ``trainer.callbacks`` in a config::

        - class_path: dnn_tricks.callbacks.input_stats.InputStatsCheck
          init_args:
            num_samples: 10000
            mean_tol: 0.1
            var_tol: 0.1
            corr_tol: 0.1
            check_val: true
            action: raise

    Args:
        num_samples: train samples to check (the whole split when smaller; null for all).
        mean_tol: largest tolerated RMS over units of |mean| / std.
        var_tol: largest tolerated |average variance - 1| (standardize), or relative error
            of the total variance (whitening).
        corr_tol: largest tolerated RMS off-diagonal correlation (pca and whitening).
        check_val: check that validation inputs use train statistics (refits the normalizer
            on the train split once: the cost of one normalizer fit).
        action: ``raise`` (ValueError, so ``trainer`` exits with status 2) or ``warn``.
        seed: seed of the sample drawn.
    """

    def __init__(
        self,
        num_samples: int | None = 10000,
        mean_tol: float = 0.1,
        var_tol: float = 0.1,
        corr_tol: float = 0.1,
        check_val: bool = True,
        action: Literal["raise", "warn"] = "raise",
        seed: int = 0,
    ) -> None:
        if num_samples is not None and num_samples < 2:
            raise ValueError(f"InputStatsCheck num_samples={num_samples} must be >= 2 (or null)")
        for key, value in (("mean_tol", mean_tol), ("var_tol", var_tol), ("corr_tol", corr_tol)):
            if not value > 0:
                raise ValueError(f"InputStatsCheck {key}={value} must be > 0")
        if action not in ("raise", "warn"):
            raise ValueError(f"InputStatsCheck action={action!r} is unknown; choose raise or warn")
        self.num_samples, self.seed = num_samples, seed
        self.mean_tol, self.var_tol, self.corr_tol = mean_tol, var_tol, corr_tol
        self.check_val, self.action = check_val, action
        self.problems: list[str] = []

    def on_train_start(self, trainer: Trainer, pl_module: LightningModule) -> None:
        # This hook runs after a resume restored the RNG state: a check that drew random
        # numbers (a DataLoader's base seed, the refits) would shift the dropout masks and
        # a resumed run would no longer end like the uninterrupted one.
        cuda = [pl_module.device] if pl_module.device.type == "cuda" else []
        with torch.random.fork_rng(devices=cuda):
            self._check(trainer, pl_module)

    def _check(self, trainer: Trainer, pl_module: LightningModule) -> None:
        dm = trainer.datamodule
        needed = ("split", "raw_batches", "to_float")
        if dm is None or not all(hasattr(dm, name) for name in needed):
            raise ValueError(
                "InputStatsCheck needs the project's DataModule (dnn_tricks.data.datamodule); "
                "remove the callback for other data modules"
            )
        norm = pl_module.input_norm
        self.problems = input_problems(
            self._train_sample(dm, pl_module),
            norm.kind,
            norm.channelwise,
            float(norm.eigenvalues_after.sum()) if norm.kind in WHITENING else None,
            self.mean_tol,
            self.var_tol,
            self.corr_tol,
        )
        if self.check_val and norm.kind != "none":
            self.problems += self._val_problems(dm, pl_module)
        if not self.problems:
            rank_zero_info(f"InputStatsCheck: inputs normalized with '{norm.kind}' look right")
            return
        message = f"InputStatsCheck: with model.input_norm.kind={norm.kind!r}, " + "; ".join(
            self.problems
        )
        if self.action == "raise":
            raise ValueError(message)
        rank_zero_warn(message)

    def _train_sample(self, dm: Any, pl_module: LightningModule) -> Tensor:
        from dnn_tricks.data.datasets import ArrayDataset

        x, y = dm.split("train")
        n = len(x) if self.num_samples is None else min(self.num_samples, len(x))
        index = np.sort(np.random.default_rng(self.seed).choice(len(x), n, replace=False))
        batch = ArrayDataset(x, y).__getitems__(index)  # unaugmented, as the loader stacks it
        with torch.no_grad():
            return pl_module.input_norm(batch_inputs(to_model(pl_module, batch)))

    def _val_problems(self, dm: Any, pl_module: LightningModule) -> list[str]:
        raw = next(iter(dm.val_dataloader()), None)  # draws from the RNG: see on_train_start
        if raw is None:
            return []
        raw_x = batch_inputs(raw).clone()  # the transfer hook may work in place
        with torch.no_grad():
            seen = pl_module.input_norm(batch_inputs(to_model(pl_module, raw))).double()
            raw_x = dm.to_float(raw_x.to(seen.device))
            error = {}
            for split in ("train", "val"):
                ref = self._refit(pl_module.input_norm, dm, split).to(seen.device)
                expected = ref(raw_x.double())
                scale = max(1.0, float(expected.abs().max()))
                error[split] = float((seen - expected).abs().max()) / scale
                if error[split] <= 1e-3:
                    break
        if error["train"] <= 1e-3:
            return []
        if error.get("val", math.inf) <= 1e-3:
            return [
                "validation inputs match a normalizer refit on the val split, not one refit on "
                f"the train split (max relative difference {error['train']:.3g}): the "
                "normalizer saw validation data; fit it on the train split only"
            ]
        return [
            "validation inputs are not normalized with train-split statistics (max relative "
            f"difference {error['train']:.3g} from a refit on train, {error['val']:.3g} from "
            "a refit on val)"
        ]

    @staticmethod
    def _refit(norm: Any, dm: Any, split: str) -> Any:
        from dnn_tricks.models.input_norm import InputNormalizer

        # report_max_dim=0: the conditioning report is not needed here and costs O(N D^2)
        fresh = InputNormalizer(norm.kind, norm.eps, norm.per_channel, report_max_dim=0)
        return fresh.double().adapt(dm.raw_batches(split))

    def state_dict(self) -> dict[str, Any]:
        return {"problems": list(self.problems)}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.problems = list(state_dict.get("problems", []))
