"""What limits a config's training on this CPU: its training step under each speed switch
(channels_last, torch.compile, bf16 autocast), next to the machine's own float32 matrix
multiply rate measured in the same run.

The step is the config's network with its input normalization, cross-entropy, backward and
the config's optimizer, on random images of the config's shape and batch size (speed does
not depend on pixel values; nothing is downloaded). FLOPs per step come from
``torch.utils.flop_counter.FlopCounterMode`` (matrix multiplies and convolutions, forward
and backward; elementwise work uncounted), so GFLOP/s over the matmul rate says how much of
the arithmetic this CPU can sustain the step gets. Variants run in one process, one after
another, each on a fresh copy of the network; `torch.compile` also prints its compile time,
which a timed speedrun would pay once.

    .venv/bin/python benchmarks/cpu_speed.py [--config configs/speedrun/fashion_mnist_5min.yaml]
        [--steps 30] [--threads N] [--skip-compile] [--set=--model.net.init_args.KEY=VALUE]

Measured numbers are in the README ("Speed"). Run it on an idle machine.
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# compile from scratch, as a first run on a machine would: a warm cache hides the compile time
os.environ.setdefault("TORCHINDUCTOR_FORCE_DISABLE_CACHES", "1")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from dnn_tricks.app import TrainerCLI  # noqa: E402
from dnn_tricks.callbacks.allocator import HeapAllocator, keep_freed_memory  # noqa: E402
from dnn_tricks.models.backbones import optimizer_groups  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
SPEEDRUN = ROOT / "configs" / "speedrun" / "fashion_mnist_5min.yaml"


def matmul_rate(size: int = 1024, seconds: float = 2.0) -> float:
    """GFLOP/s of float32 ``size`` x ``size`` matrix multiplies: what the BLAS sustains here."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    count, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        torch.mm(a, b)
        count += 1
    return 2 * size**3 * count / (time.perf_counter() - start) / 1e9


def load(config: Path, overrides: list[str]):
    """The config's Classifier with its input normalization fitted on random images, a batch
    of the config's shape and size, and whether the config keeps freed memory in the heap."""
    with tempfile.TemporaryDirectory() as folder:
        cli = TrainerCLI(
            args=[
                "--config",
                str(config),
                f"--trainer.logger.init_args.save_dir={folder}",
                *overrides,
            ],
            run=False,
        )
    model, size = cli.model, cli.datamodule.batch_size
    shape = tuple(model.hparams.input_shape)
    generator = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (size, *shape), generator=generator).float() / 255
    y = torch.randint(0, model.hparams.num_classes, (size,), generator=generator)
    model.adapt_layers(lambda: [x])
    heap = any(
        entry.class_path.endswith(HeapAllocator.__name__)
        for entry in cli.config["trainer"]["callbacks"] or []
    )
    return model, x, y, heap


def train_step(model, bf16: bool) -> Callable[[torch.Tensor, torch.Tensor], None]:
    """One optimizer step of ``model`` (train mode) with the config's optimizer."""
    hp = model.hparams
    optimizer = model.optimizer_factory(optimizer_groups(model.net, hp.decay_norm_and_bias))
    model.train()

    def step(x: torch.Tensor, y: torch.Tensor) -> None:
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(model(x), y, label_smoothing=hp.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return step


def step_flops(model, x: torch.Tensor, y: torch.Tensor) -> int:
    """Matmul and convolution FLOPs of one forward + backward pass."""
    probe = copy.deepcopy(model).train()
    with FlopCounterMode(display=False) as counter:
        F.cross_entropy(probe(x), y).backward()
    return counter.get_total_flops()


def time_steps(step: Callable, x: torch.Tensor, y: torch.Tensor, steps: int) -> float:
    """Median seconds per step over ``steps`` steps, after 3 warm-up steps."""
    for _ in range(3):
        step(x, y)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step(x, y)
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


# profiler op name fragment -> the kind of work it is (first match wins)
OP_KINDS = {
    "convolution": "convolutions (forward + backward)",
    "mm": "matrix multiplies (fc layers)",
    "batch_norm": "batch norm (forward + backward)",
    "threshold": "activations (forward + backward)",
    "clamp": "activations (forward + backward)",
    "relu": "activations (forward + backward)",
    "gelu": "activations (forward + backward)",
    "pool": "pooling (forward + backward)",
    "copy_": "copies and fills (layout, zeroing)",
    "fill_": "copies and fills (layout, zeroing)",
    "zero_": "copies and fills (layout, zeroing)",
    "Optimizer": "optimizer step",
}


def op_shares(step: Callable, x: torch.Tensor, y: torch.Tensor, steps: int = 10) -> dict:
    """Share of the step's CPU time by kind of operator (torch.profiler, self time)."""
    for _ in range(3):
        step(x, y)
    with profile(activities=[ProfilerActivity.CPU]) as recorded:
        for _ in range(steps):
            step(x, y)
    shares: dict[str, float] = {}
    for event in recorded.key_averages():
        kind = next((k for part, k in OP_KINDS.items() if part in event.key), "other")
        shares[kind] = shares.get(kind, 0.0) + event.self_cpu_time_total
    total = sum(shares.values())
    return {kind: time / total for kind, time in sorted(shares.items(), key=lambda i: -i[1])}


def variants(channels_last: bool, compile_too: bool) -> dict[str, dict]:
    """Name -> how that variant changes the config's model (on a fresh copy)."""
    other = "NCHW (channels_last off)" if channels_last else "channels_last on"
    found = {"as configured": {}, other: {"channels_last": not channels_last}}
    found["bf16 autocast"] = {"bf16": True}
    if compile_too:
        found["torch.compile (inductor)"] = {"compile": True}
        found["torch.compile, max-autotune"] = {"compile": "max-autotune-no-cudagraphs"}
    return found


def build(model, channels_last: bool, compile: bool | str) -> torch.nn.Module:
    fresh = copy.deepcopy(model)
    fresh.channels_last = channels_last
    fresh.net = fresh.net.to(
        memory_format=torch.channels_last if channels_last else torch.contiguous_format
    )
    if compile:
        fresh.net.compile(mode=None if compile is True else compile)
    return fresh


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=SPEEDRUN)
    parser.add_argument("--steps", type=int, default=30, help="timed steps per variant")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument(
        "--set", action="append", default=[], help="a trainer fit argument, as --set=--key=value"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, x, y, heap = load(args.config, args.set)
    if heap:
        keep_freed_memory()  # as HeapAllocator does in the config's fit
    flops = step_flops(model, x, y)
    peak = matmul_rate()
    print(
        f"{args.config.name}: batch {len(x)} of {tuple(x.shape[1:])}, {args.threads} thread(s), "
        f"heap allocator {'on' if heap else 'off'}, load average {os.getloadavg()[0]:.1f}\n"
        f"{flops / 1e9:.2f} GFLOP per step (matmuls and convolutions, forward + backward); "
        f"float32 1024^2 matmul here: {peak:.0f} GFLOP/s"
    )
    configured = bool(model.hparams.channels_last)
    print(f"\n{'variant':32} {'ms/step':>8} {'x config':>8} {'GFLOP/s':>8} {'of matmul':>9}")
    baseline = None
    for name, change in variants(configured, not args.skip_compile).items():
        net = build(model, change.get("channels_last", configured), change.get("compile", False))
        step = train_step(net, change.get("bf16", False))
        started = time.perf_counter()
        try:
            step(x, y)  # compiles, where compiled
        except Exception as error:  # no compiler toolchain, an unsupported op
            print(f"{name:32} failed: {str(error).splitlines()[0][:80]}")
            continue
        first = time.perf_counter() - started
        seconds = time_steps(step, x, y, args.steps)
        baseline = baseline or seconds
        rate = flops / seconds / 1e9
        note = f"  (first step {first:.1f} s)" if change.get("compile") else ""
        print(
            f"{name:32} {1e3 * seconds:8.1f} {baseline / seconds:8.2f} {rate:8.1f} "
            f"{rate / peak:9.0%}{note}"
        )
    print("\nwhere the configured step's time goes (torch.profiler, self CPU time):")
    configured_step = train_step(build(model, configured, False), False)
    for kind, share in op_shares(configured_step, x, y).items():
        print(f"  {kind:36} {share:6.1%}")


if __name__ == "__main__":
    main()
