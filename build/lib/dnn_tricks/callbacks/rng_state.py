"""Random-number-generator state in every checkpoint, so a resumed run draws the same dropout
masks (and other random numbers) as the uninterrupted run would have."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from lightning.pytorch.callbacks import Callback


class RNGState(Callback):
    """Saves the Python, NumPy and torch (CPU and CUDA) generator states with each checkpoint
    and restores them on resume. Lightning restores model, optimizer and loop state but not
    these; without them a resumed run diverges from an uninterrupted one at the first dropout.
    Stored as tensors and plain values only, so ``weights_only=True`` loading accepts them;
    Python's 625-word state as one tensor, not 625 ints (a third of a small model's save time
    went into pickling them one by one)."""

    def state_dict(self) -> dict[str, Any]:
        kind, keys, position, has_gauss, cached = np.random.get_state()
        state: dict[str, Any] = {
            "python": _python_state(),
            "numpy": [kind, torch.from_numpy(keys.astype(np.int64)), position, has_gauss, cached],
            "torch": torch.get_rng_state(),
        }
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        version, internal, gauss = state_dict["python"]
        words = internal.tolist() if isinstance(internal, torch.Tensor) else internal  # older
        random.setstate((version, tuple(words), gauss))
        kind, keys, position, has_gauss, cached = state_dict["numpy"]
        np.random.set_state((kind, keys.numpy().astype(np.uint32), position, has_gauss, cached))
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def _python_state() -> tuple[int, torch.Tensor, float | None]:
    version, internal, gauss = random.getstate()
    return version, torch.tensor(internal, dtype=torch.int64), gauss
