"""Cost of a training step with the Jacobian penalty, relative to a plain step.

Hoffman, Roberts & Yaida 2019 report about 1.3x the time of a plain step for one random
projection. This script times SGD steps of an MLP (784-512-512-10, batch 128, CPU by
default) without the penalty and with n = 1, 3 and all (exact, C = 10) projections,
interleaving the variants round by round so load from other processes hits all alike,
and prints the median step time of each and its ratio to the plain step.

Measured on the 2-core dev machine (1 thread): n=1 2.3x, n=3 4.4-4.6x, exact 12x. An MLP step
on CPU is matmul-bound and one projection adds a backward pass down to the input plus its
double backward (about 17 instead of 8 matmuls here), so about 2x is the floor for this net;
the paper's 1.3x was for its own networks and hardware.

    python benchmarks/jacobian_cost.py [--rounds 7] [--steps 20] [--threads 1]
"""

import argparse
import statistics
import time

import torch
from torch import nn

from dnn_tricks.regularize import jacobian_penalty

VARIANTS: dict[str, int | None] = {"none": None, "n=1": 1, "n=3": 3, "exact": -1}


def make_step(projections: int | None, device: torch.device, lam: float = 0.01):
    """A closure doing one full training step (forward, loss, backward, SGD update)."""
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 10)
    ).to(device)
    opt = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)
    x = torch.randn(128, 784, device=device)
    y = torch.randint(0, 10, (128,), device=device)

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        if projections is None:
            loss = nn.functional.cross_entropy(net(x), y)
        else:
            penalty, logits = jacobian_penalty(net, x, projections)
            loss = nn.functional.cross_entropy(logits, y) + lam / 2 * penalty
        loss.backward()
        opt.step()

    return step


def time_steps(step, steps: int, device: torch.device) -> float:
    """Seconds per step over `steps` steps."""
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=7, help="interleaved timing rounds")
    parser.add_argument("--steps", type=int, default=20, help="training steps per round")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="cpu or cuda")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    steps = {name: make_step(n, device) for name, n in VARIANTS.items()}
    for step in steps.values():  # warm-up: allocator, kernels, autograd caches
        time_steps(step, 3, device)
    times: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for _ in range(args.rounds):
        for name, step in steps.items():
            times[name].append(time_steps(step, args.steps, device))

    base = statistics.median(times["none"])
    print(f"MLP 784-512-512-10, batch 128, {device}, {args.threads} thread(s), "
          f"median of {args.rounds} rounds x {args.steps} steps")  # fmt: skip
    print(f"{'variant':<8} {'ms/step':>9} {'ratio':>7}")
    for name, values in times.items():
        median = statistics.median(values)
        print(f"{name:<8} {1e3 * median:9.2f} {median / base:7.2f}x")


if __name__ == "__main__":
    main()
