"""What a checkpoint save costs the training that goes on around it: written in the training
thread (AtomicCheckpointIO, the default) or on a background thread (BackgroundCheckpointIO).

For each size: a checkpoint shaped like Lightning's (weights plus SGD momentum buffers, float32)
is saved, then the training thread runs a fixed number of small MLP steps and waits for the
file: "lost" is that stretch minus the steps alone (run just before), the training time the
save costs. Also printed: how long save_checkpoint itself blocks, and the write's own time
(save until fsynced and renamed, no steps). Medians of --repeats; torch runs one thread, so
a background writer has the other core.

    .venv/bin/python benchmarks/checkpoint_writes.py [--sizes-mb 2 40 200] [--repeats 5]
        [--steps 2000] [--dir logs/bench_checkpoints]

Measured numbers are in the README ("Speed").
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from dnn_tricks.background_checkpoints import BackgroundCheckpointIO
from dnn_tricks.checkpoints import AtomicCheckpointIO


def checkpoint_of(megabytes: float) -> dict:
    """Weights and as many momentum buffers: ``megabytes`` of float32 in all."""
    count = int(megabytes * 2**20 / 4 / 2 / 16)
    weights = {f"layer{i}.weight": torch.randn(count) for i in range(16)}
    momentum = {i: {"momentum_buffer": torch.randn(count)} for i in range(16)}
    return {"state_dict": weights, "optimizer_states": [{"state": momentum}], "epoch": 3}


class Steps:
    """A fixed amount of training: ``count`` SGD steps of a small MLP on random batches."""

    def __init__(self, count: int) -> None:
        torch.manual_seed(0)
        self.count = count
        self.net = nn.Sequential(nn.Linear(64, 256), nn.ReLU(), nn.Linear(256, 10))
        self.optimizer = torch.optim.SGD(self.net.parameters(), lr=0.01, momentum=0.9)
        self.x, self.y = torch.randn(32, 64), torch.randint(0, 10, (32,))

    def run(self) -> None:
        for _ in range(self.count):
            loss = F.cross_entropy(self.net(self.x), self.y)
            self.optimizer.zero_grad()
            loss.backward()
            self.optimizer.step()


def timed_save(io, checkpoint: dict, path: Path, steps: Steps | None) -> tuple[float, float]:
    """(seconds save_checkpoint blocked, seconds until the steps after it are done and the
    file is on disk); without steps the second is the write's own time."""
    start = time.perf_counter()
    io.save_checkpoint(checkpoint, path)
    blocked = time.perf_counter() - start
    if steps is not None:
        steps.run()
    io.teardown()  # waits for a background write
    return blocked, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[2, 40, 200])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--steps", type=int, default=2000, help="long enough to cover a write")
    parser.add_argument("--dir", type=Path, default=Path("logs/bench_checkpoints"))
    args = parser.parse_args()
    torch.set_num_threads(1)
    args.dir.mkdir(parents=True, exist_ok=True)
    steps = Steps(args.steps)
    steps.run()  # warm-up
    print(f"{args.steps} MLP steps after each save, {args.repeats} rotating runs, 1 torch thread")
    print(f"{'checkpoint':>10} {'writer':>10} {'blocked ms':>11} {'lost ms':>8} {'write ms':>8}")
    writers = {"in step": AtomicCheckpointIO, "background": BackgroundCheckpointIO}
    for size in args.sizes_mb:
        checkpoint = checkpoint_of(size)
        runs: dict[str, list[tuple[float, float, float]]] = {name: [] for name in writers}
        alone = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            steps.run()
            alone.append(time.perf_counter() - start)
            for name, writer in writers.items():
                path = args.dir / f"{name.replace(' ', '_')}.ckpt"
                blocked, with_steps = timed_save(writer(), checkpoint, path, steps)
                _, written = timed_save(writer(), checkpoint, path, None)
                runs[name].append((blocked, with_steps - alone[-1], written))
        for name, timings in runs.items():
            blocked, lost, written = (statistics.median(t[i] for t in timings) for i in range(3))
            row = f"{1e3 * blocked:11.1f} {1e3 * lost:8.1f} {1e3 * written:8.1f}"
            print(f"{size:8.0f}MB {name:>10} {row}")
    print(f"(the {args.steps} steps alone: {1e3 * statistics.median(alone):.1f} ms)")
    shutil.rmtree(args.dir)


if __name__ == "__main__":
    main()
