"""TensorBoard logging whose run folders are reserved atomically."""

from __future__ import annotations

import os
import re
from pathlib import Path

from lightning.pytorch.loggers import TensorBoardLogger as LightningTensorBoardLogger
from lightning.pytorch.utilities import rank_zero_only


class TensorBoardLogger(LightningTensorBoardLogger):
    """Lightning's TensorBoardLogger, except that a new ``version_N`` folder is claimed with an
    atomic ``mkdir``: two runs of one config started in the same second get distinct folders
    (Lightning's own scan-then-create lets both pick the same N), and no run ever writes into
    an earlier run's folder. Arguments are those of Lightning's TensorBoardLogger."""

    def _get_next_version(self) -> int:
        if rank_zero_only.rank != 0:  # other DDP ranks do not write; rank 0's folder is broadcast
            return super()._get_next_version()
        root = Path(self.root_dir)
        root.mkdir(parents=True, exist_ok=True)
        taken = [
            int(m.group(1)) for p in root.iterdir() if (m := re.fullmatch(r"version_(\d+)", p.name))
        ]
        version = max(taken, default=-1) + 1
        while True:
            try:
                os.mkdir(root / f"version_{version}")
                return version
            except FileExistsError:
                version += 1
