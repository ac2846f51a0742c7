"""Safe checkpoints: written atomically, read without unpickling code, checked against the
model before a run starts so mistakes give one clear line instead of a deep traceback."""

from __future__ import annotations

import os
import pickle
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.plugins.io import TorchCheckpointIO
from torch import nn

_UMASK = os.umask(0)
os.umask(_UMASK)


# Test hook, read on every save: "<phase>,<name prefix>,<n>,<marker file>" stops the n-th save
# (in this process) of a file whose name starts with <name prefix> at <phase>, writes the
# marker file ("<pid> <save count> <temporary file>") and sleeps, so a test can SIGKILL the
# process at a known point inside a save (tests/test_kill_during_save.py). Unset, as always
# outside that test, it does nothing.
PAUSE_ENV = "DNN_TRICKS_TEST_SAVE_PAUSE"
# created: empty temporary file; writing: part of the data written; written: all written,
# not yet fsynced; fsync: announced just before os.fsync, without sleeping (the test kills
# while the system call runs); synced: before the rename; renamed: after it, before the
# folder's fsync.
PHASES = ("created", "writing", "written", "fsync", "synced", "renamed")
PARTIAL_SUFFIX = ".partial"  # never ".ckpt": no checkpoint lookup ever picks up a partial save
_saves_seen: dict[str, int] = {}


class _Pause:
    """The parsed test hook for one save (see PAUSE_ENV)."""

    def __init__(self, spec: str, target: Path) -> None:
        phase, prefix, n, marker = spec.split(",", 3)
        if phase not in PHASES:
            raise ValueError(f"{PAUSE_ENV}: phase {phase!r} is not one of {PHASES}")
        self.phase, self.marker = phase, Path(marker)
        matches = target.name.startswith(prefix)
        self.seen = _saves_seen[prefix] = _saves_seen.get(prefix, 0) + int(matches)
        # fsync is not paused, so a test may miss it: it is announced again at later saves
        self.armed = matches and (self.seen == int(n) or (phase == "fsync" and self.seen > int(n)))

    def at(self, phase: str, temporary: str) -> None:
        if not (self.armed and phase == self.phase):
            return
        # written whole, then renamed: the test never reads a half-written marker
        self.marker.with_suffix(".new").write_text(f"{os.getpid()} {self.seen} {temporary}\n")
        os.replace(self.marker.with_suffix(".new"), self.marker)
        if phase != "fsync":
            time.sleep(120)  # the test kills the process here


class _Announcing:
    """A binary file that stops at the "writing" phase once 1 MiB has been written."""

    def __init__(self, file: Any, pause: _Pause, temporary: str) -> None:
        self.file, self.pause, self.temporary, self.written = file, pause, temporary, 0

    def write(self, data: bytes) -> int:
        count = self.file.write(data)
        self.written += count
        if self.written >= 1 << 20:
            self.file.flush()  # the partial data is in the file when the kill comes
            self.pause.at("writing", self.temporary)
            self.written = -(1 << 62)  # once
        return count

    def flush(self) -> None:
        self.file.flush()


class AtomicCheckpointIO(TorchCheckpointIO):
    """Writes each checkpoint to a temporary file in the same folder, fsyncs it, renames it
    over the target and fsyncs the folder: a kill at any moment leaves either the old file or
    the new one, never a truncated ``last.ckpt``, and the rename survives a power cut.
    (Lightning's default stages the file in the system temp folder and then copies it, which
    is not atomic when that folder is on another filesystem.) A kill leaves the temporary
    ``.<name>.<random>.partial`` behind; nothing reads it, and it may be deleted."""

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any = None
    ) -> None:
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        spec = os.environ.get(PAUSE_ENV)
        pause = _Pause(spec, target) if spec else None
        handle, temporary = tempfile.mkstemp(
            prefix=f".{target.name}.", suffix=PARTIAL_SUFFIX, dir=target.parent
        )
        at = pause.at if pause else lambda phase, temporary: None
        try:
            with os.fdopen(handle, "wb") as file:
                at("created", temporary)
                torch.save(checkpoint, _Announcing(file, pause, temporary) if pause else file)
                file.flush()
                at("written", temporary)
                at("fsync", temporary)
                os.fsync(file.fileno())
            at("synced", temporary)
            os.chmod(temporary, 0o666 & ~_UMASK)  # mkstemp makes 0600; keep the usual mode
            os.replace(temporary, target)
        except BaseException:
            Path(temporary).unlink(missing_ok=True)
            raise
        at("renamed", temporary)
        _fsync_folder(target.parent)


def _fsync_folder(folder: Path) -> None:
    """Make a rename in ``folder`` durable (POSIX; a no-op where folders cannot be opened)."""
    try:
        handle = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(handle)
    except OSError:
        pass  # some filesystems refuse fsync on a folder; the rename itself is still atomic
    finally:
        os.close(handle)


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
        if key in saved
        and tuple(saved[key].shape) != tuple(expected[key].shape)
        # an unfitted data-fitted buffer (input normalization) is empty until loaded
        and expected[key].numel() > 0
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
