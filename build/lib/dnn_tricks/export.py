"""Write a trained model (raw inputs -> logits, input normalization included) as ONNX,
TorchScript or a ``torch.export`` program, and check the written file against PyTorch.

The check is what makes an export trustworthy: the file is loaded back the way a user would
load it (onnxruntime, ``torch.jit.load``, ``torch.export.load``) and run on real inputs, at
the example's batch size and at batch size 1 (so a batch size baked into the graph is caught);
its softmax probabilities must match the PyTorch module's within ``TOLERANCE``. The file only
appears at ``out`` once that check passes.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

FORMATS = ("onnx", "torchscript", "exported_program")
SUFFIXES = {"onnx": ".onnx", "torchscript": ".torchscript.pt", "exported_program": ".pt2"}
# Largest max |p_exported - p_torch| over the classes and the example batch (float32).
TOLERANCE = 1e-5
INPUT_NAME, OUTPUT_NAME = "input", "logits"
ONNX_PACKAGES = ("onnx", "onnxscript", "onnxruntime")


def check_format(fmt: str) -> None:
    """Refuse an unknown format, or ONNX without the packages that write and check it."""
    if fmt not in FORMATS:
        raise ValueError(f"--format={fmt!r} is unknown; choose one of: {', '.join(FORMATS)}")
    missing = [p for p in ONNX_PACKAGES if fmt == "onnx" and importlib.util.find_spec(p) is None]
    if missing:
        raise ValueError(
            f"--format=onnx needs {', '.join(missing)}: pip install 'dnn-tricks[export]'"
        )


def check_out_path(out: Path) -> None:
    """Refuse, before any work, an output path that cannot be written."""
    if not out.parent.is_dir():
        raise FileNotFoundError(
            f"--out={str(out)!r}: the folder {str(out.parent)!r} does not exist; create it first"
        )
    if out.is_dir():
        raise ValueError(f"--out={str(out)!r} is a folder; give a file name")


def export_model(module: nn.Module, example: Tensor, fmt: str, out: str | os.PathLike) -> float:
    """Write ``module`` to ``out`` in ``fmt`` with a dynamic batch dimension, load it back,
    and return the largest absolute difference of its softmax probabilities from the PyTorch
    module's on ``example`` (a batch of at least 2 real inputs).

    Raises ValueError (nothing written) for an unknown format, a layer the format cannot
    express (naming the layer) or a difference above ``TOLERANCE``; FileNotFoundError when
    the folder of ``out`` does not exist.
    """
    check_format(fmt)
    out = Path(out)
    check_out_path(out)
    if example.ndim < 2 or len(example) < 2:
        raise ValueError(f"the example batch needs at least 2 inputs, got {tuple(example.shape)}")
    module = module.eval()
    batches = [example, example[:1]]
    with torch.no_grad():
        expected = [torch.softmax(module(x), dim=-1) for x in batches]
    partial = out.with_name(f".{out.name}.partial")
    try:
        try:
            with _quiet():
                _write(module, example, fmt, partial)
        except Exception as error:  # exporters raise many kinds; each becomes one line
            partial.unlink(missing_ok=True)
            raise ValueError(_describe_failure(module, example, fmt, error)) from None
        run = _load(fmt, partial)
        diff = 0.0
        for x, p in zip(batches, expected, strict=True):
            got = torch.softmax(run(x), dim=-1)
            if got.shape != p.shape:
                raise ValueError(
                    f"the {fmt} file gives outputs of shape {tuple(got.shape)} for a batch of "
                    f"{len(x)}, PyTorch {tuple(p.shape)}: its batch size is not dynamic"
                )
            diff = max(diff, (got - p).abs().max().item())
        if not diff <= TOLERANCE:
            raise ValueError(
                f"the {fmt} file differs from PyTorch by {diff:.2e} in probability "
                f"(tolerance {TOLERANCE:g}); nothing was written"
            )
        os.replace(partial, out)
    finally:
        partial.unlink(missing_ok=True)
    return diff


# ---------------------------------------------------------------- writing and loading


def _write(module: nn.Module, example: Tensor, fmt: str, path: Path) -> None:
    batch = torch.export.Dim("batch", min=1)
    if fmt == "onnx":
        # The torch.export-based exporter (the maintained one; the TorchScript-based exporter
        # is deprecated). Weights inside the one file: our models are far below ONNX's 2 GB.
        torch.onnx.export(
            module,
            (example,),
            str(path),
            dynamo=True,
            external_data=False,
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=({0: batch},),
            verbose=False,
        )
    elif fmt == "exported_program":
        program = torch.export.export(module, (example,), dynamic_shapes=({0: batch},))
        with open(path, "wb") as file:  # a file object: the path need not end in .pt2
            torch.export.save(program, file)
    else:
        # Tracing records the operations run on the example; the batch-1 check in
        # export_model catches a batch size that tracing baked in.
        traced = torch.jit.trace(_untied(module), (example,), check_trace=False)
        traced.save(str(path))


def _untied(module: nn.Module) -> nn.Module:
    """A copy in which no tensor is shared by two parameter or buffer slots: tracing refuses
    shared ones ("TracedModules don't support parameter sharing"), and in an eval-mode
    export a shared tensor and its copies are the same constant."""
    module = copy.deepcopy(module)
    seen: set[int] = set()
    for sub in module.modules():
        for name, param in list(sub.named_parameters(recurse=False, remove_duplicate=False)):
            if id(param) in seen:
                setattr(sub, name, nn.Parameter(param.detach().clone(), param.requires_grad))
            seen.add(id(param))
        for name, buffer in list(sub.named_buffers(recurse=False, remove_duplicate=False)):
            if id(buffer) in seen:
                sub.register_buffer(name, buffer.clone())
            seen.add(id(buffer))
    return module


def _load(fmt: str, path: Path) -> Callable[[Tensor], Tensor]:
    """A function running the written file as a user would load it."""
    if fmt == "onnx":
        import onnxruntime

        session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])

        def run(x: Tensor) -> Tensor:
            return torch.from_numpy(session.run(None, {INPUT_NAME: x.numpy()})[0])

        return run
    if fmt == "exported_program":
        with open(path, "rb") as file:
            loaded: Any = torch.export.load(file).module()
    else:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch
            loaded = torch.jit.load(path)

    def run_torch(x: Tensor) -> Tensor:
        with torch.no_grad():
            return loaded(x)

    return run_torch


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Hide the exporters' progress lines, graph dumps and tracer warnings: the result is
    checked numerically instead, and failures are reported in one line."""
    # torch configures its loggers' levels itself, so lower records are disabled globally
    disabled = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with (
            warnings.catch_warnings(),
            open(os.devnull, "w") as sink,
            contextlib.redirect_stdout(sink),
            contextlib.redirect_stderr(sink),
        ):
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)


# ---------------------------------------------------------------- naming a failing layer


def _summary(error: BaseException) -> str:
    """The informative line of an exporter error (they wrap the cause in advice)."""
    text = re.sub(r"\x1b\[[0-9;]*m", "", str(error))
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    for index, line in enumerate(lines):
        if line.startswith("## Exception summary") and index + 1 < len(lines):
            return re.sub(r"^<class '[\w.]*?(\w+)'>", r"\1", lines[index + 1])
    return lines[0] if lines else type(error).__name__


def _describe_failure(module: nn.Module, example: Tensor, fmt: str, error: Exception) -> str:
    name = _failing_layer(module, example, fmt)
    cause = _summary(error)
    if len(cause) > 200:
        cause = cause[:197] + "..."
    if name is None:
        return f"cannot export to {fmt}: {cause}"
    layer = type(module.get_submodule(name)).__name__
    return (
        f"cannot export to {fmt}: layer {name!r} ({layer}) cannot be expressed ({cause}); "
        "replace that layer or try another --format"
    )


def _failing_layer(module: nn.Module, example: Tensor, fmt: str) -> str | None:
    """The deepest submodule that fails to export on its own, with the inputs it received
    in a forward pass of ``example``; None when no single layer is to blame."""
    inputs: dict[str, tuple] = {}
    hooks = [
        sub.register_forward_pre_hook(lambda m, args, name=name: inputs.setdefault(name, args))
        for name, sub in module.named_modules()
        if name
    ]
    try:
        with torch.no_grad():
            module(example)
    finally:
        for hook in hooks:
            hook.remove()

    def fails(name: str) -> bool:
        args = inputs[name]
        if len(args) != 1 or not isinstance(args[0], Tensor) or len(args[0]) < 2:
            return False
        with tempfile.TemporaryDirectory() as folder, _quiet():
            try:
                _write(module.get_submodule(name), args[0], fmt, Path(folder) / "layer")
            except Exception:
                return True
        return False

    current = ""
    while True:
        parent = module.get_submodule(current)
        children = [f"{current}.{n}" if current else n for n, _ in parent.named_children()]
        culprit = next((c for c in children if c in inputs and fails(c)), None)
        if culprit is None:
            return current or None
        current = culprit
