"""Safe checkpoints: written atomically, read without unpickling code, checked against the
model before a run starts so mistakes give one clear line instead of a deep traceback."""

from __future__ import annotations

import os
import pickle
import tempfile
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

_UMASK = os.umask(0)
os.umask(_UMASK)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it and renames it
    over the target: a kill at any moment leaves either the old file or the new one, never a
    truncated ``last.ckpt``. (Lightning's default stages the file in the system temp folder and
    then copies it, which is not atomic when that folder is on another filesystem.)"""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(prefix=f".{target.name}.", dir=target.parent)
        try:
            with os.fdopen(handle, "wb") as file:
                torch.save(checkpoint, file)
                file.flush()
                os.fsync(file.fileno())
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep the usual mode
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise


def read_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Load a checkpoint with ``weights_only=True``; a clear ValueError if it is unusable."""
    where = f"--ckpt_path={str(path)!r}"
    if not Path(path).is_file():
        raise FileNotFoundError(
            f"{where} is not a file; pass a .ckpt from logs/<name>/version_N/checkpoints/"
        )
    try:
        return torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as error:
        first = str(error).strip().splitlines()[0]
        if "Weights only load failed" in first or "weights_only" in first:
            raise ValueError(
                f"{where} refused: it holds pickled objects that could run code when loaded "
                "(only tensors and plain values are accepted); do not load files you do not trust"
            ) from None
        raise ValueError(f"{where} is corrupt or truncated ({first})") from None
    except (RuntimeError, EOFError, OSError, ValueError) as error:
        first = (str(error).strip().splitlines() or [type(error).__name__])[0]
        raise ValueError(f"{where} is corrupt or truncated ({first})") from None


def check_matches_model(checkpoint: dict[str, Any], model: nn.Module, path: str) -> None:
    """Fail with one line if the checkpoint's weights do not fit ``model`` (another config)."""
    saved = checkpoint.get("state_dict")
    if saved is None:
        raise ValueError(
            f"--ckpt_path={path!r} has no model weights; is it a Lightning checkpoint?"
        )
    expected = model.state_dict()
    missing = sorted(set(expected) - set(saved))
    unexpected = sorted(set(saved) - set(expected))
    mismatched = [
        f"{key} {tuple(saved[key].shape)} vs {tuple(expected[key].shape)}"
        for key in expected
        if key in saved and tuple(saved[key].shape) != tuple(expected[key].shape)
    ]
    problems = []
    if missing:
        problems.append(
            f"missing {missing[0]}" + (f" and {len(missing) - 1} more" if len(missing) > 1 else "")
        )
    if unexpected:
        problems.append(
            f"unexpected {unexpected[0]}"
            + (f" and {len(unexpected) - 1} more" if len(unexpected) > 1 else "")
        )
    if mismatched:
        problems.append(f"shape of {mismatched[0]}")
    if problems:
        raise ValueError(
            f"--ckpt_path={path!r} was trained with another model config ({'; '.join(problems)}); "
            "use the config.yaml saved next to its checkpoints/ folder"
        )
