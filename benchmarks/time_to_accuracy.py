"""Time to accuracy of a config (the speedruns under configs/speedrun/), against a plain
PyTorch loop run in the same invocation; on a CUDA GPU, also training throughput of the
CIFAR-10 ResNet config against a plain loop on the same card.

1. Per seed, `trainer fit --config C --seed_everything S` runs in a subprocess. The clock
   starts just before the subprocess does, so the interpreter, imports, data loading, the
   split and the fitted layers all count. After every training epoch (at the start of its
   validation, where an EMA callback has swapped in the averaged weights) a callback stops
   the clock, measures accuracy on the whole test split with the model as validation sees
   it (TTA included), and restarts the clock. The fit stops at --target unless --full. The
   median over seeds of the time to target is the result.
2. The plain-loop reference: a subprocess trains the same config's model, data, optimizer,
   schedule and EMA (torch's AveragedModel) with the LightningModule's own training_step but
   no Trainer, for as many epochs as the median seed needed, then measures the test split
   once. Its wall time, also from its start, gives the ratio: what the Trainer costs.
3. GPU throughput (only with CUDA): configs/cifar10_resnet.yaml with configs/trainer/gpu.yaml
   (bf16-mixed, channels_last) on CIFAR-shaped random images (images/s does not depend on
   pixel values; no download), against a hand-written loop with the same network, batches,
   autocast and memory format.

    .venv/bin/python benchmarks/time_to_accuracy.py
        [--config configs/speedrun/fashion_mnist_5min.yaml] [--target 0.935]
        [--seeds 0 1 2] [--full] [--skip-plain] [--skip-fit] [--gpu-steps 200]

The GPU speedrun, where CIFAR-10's python-version batches are at hand in DIR (nothing is
downloaded here):

    .venv/bin/python benchmarks/time_to_accuracy.py --config configs/speedrun/cifar10_gpu.yaml
        --target 0.94 --set=--data.root=DIR --set=--data.download=false

Wall times depend on what else runs on the machine: the script prints the load average
before and after; compare runs at a load below the core count.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
import yaml  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
HERE = Path(__file__).resolve().parent
SPEEDRUN = ROOT / "configs" / "speedrun" / "fashion_mnist_5min.yaml"
CIFAR_RESNET = ROOT / "configs" / "cifar10_resnet.yaml"
GPU_PRESET = ROOT / "configs" / "trainer" / "gpu.yaml"
SPEEDRUN_GPU = ROOT / "configs" / "speedrun" / "cifar10_gpu.yaml"
START_ENV = "DNN_TRICKS_CLOCK_START"  # time.monotonic() of the parent when it started us

# ----------------------------------------------------------------------------- shared


@torch.no_grad()
def test_accuracy(model: torch.nn.Module, data) -> float:
    """Top-1 accuracy of ``model`` (eval mode) on the whole test split of ``data``."""
    was_training = model.training
    model.eval()
    correct = total = 0
    device = next(model.parameters()).device
    for x, y in data.test_dataloader():
        x, y = data.to_float(x.to(device)), y.to(device)
        correct += int((model(x).argmax(1) == y).sum())
        total += len(y)
    model.train(was_training)
    return correct / total


def elapsed() -> float:
    """Seconds since the parent started this process (system-wide monotonic clock)."""
    return time.monotonic() - float(os.environ[START_ENV])


def _quiet_args(log_dir: str) -> list[str]:
    return [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={log_dir}",
    ]


# ----------------------------------------------------------------------------- trainer fit


class TestClock(Callback):
    """In the fit's process: after each training epoch, test accuracy and the time since
    the command started without the time spent measuring, one JSON line per epoch.

    Args:
        out: file the lines are appended to.
        target: stop the fit once the test accuracy reaches it.
        full: train every epoch of the config regardless.
    """

    def __init__(self, out: str, target: float, full: bool = False) -> None:
        self.out, self.target, self.full, self.paused = Path(out), target, full, 0.0

    def on_validation_epoch_start(self, trainer, pl_module) -> None:
        if trainer.sanity_checking:
            return
        pause = time.monotonic()
        seconds = elapsed() - self.paused
        accuracy = test_accuracy(pl_module, trainer.datamodule)
        row = {"epoch": trainer.current_epoch + 1, "seconds": seconds, "test_acc": accuracy}
        with self.out.open("a") as f:
            f.write(json.dumps(row) + "\n")
        if accuracy >= self.target and not self.full:
            trainer.should_stop = True
        self.paused += time.monotonic() - pause


def fit_seed(
    config: Path, seed: int, target: float, full: bool, overrides: list[str]
) -> list[dict]:
    """One `trainer fit` in a subprocess; its per-epoch rows."""
    with tempfile.TemporaryDirectory() as folder:
        out = Path(folder) / "clock.jsonl"
        command = [
            sys.executable,
            "-m",
            "dnn_tricks.cli",
            "fit",
            "--config",
            str(config),
            f"--seed_everything={seed}",
            "--test_after_fit=false",
            *_quiet_args(folder),
            "--trainer.callbacks+=time_to_accuracy.TestClock",
            f"--trainer.callbacks.out={out}",
            f"--trainer.callbacks.target={target}",
            f"--trainer.callbacks.full={full}",
            *overrides,
        ]
        env = {
            **os.environ,
            "PYTHONPATH": os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]),
        }
        env[START_ENV] = str(time.monotonic())
        done = subprocess.run(command, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            sys.exit(f"trainer fit failed (seed {seed}):\n{done.stderr[-3000:]}")
        return [json.loads(line) for line in out.read_text().splitlines()]


# ----------------------------------------------------------------------------- plain loop


def plain_child(config: Path, seed: int, epochs: int, overrides: list[str]) -> None:
    """The plain loop, in its own process (``--plain-child``): prints one JSON line."""
    from lightning.pytorch import seed_everything
    from torch.optim.swa_utils import AveragedModel

    from dnn_tricks.app import TrainerCLI
    from dnn_tricks.callbacks.allocator import HeapAllocator, keep_freed_memory
    from dnn_tricks.callbacks.averaging import EMA, ema_keeping_integers
    from dnn_tricks.models.backbones import apply_lr_scales, optimizer_groups
    from dnn_tricks.schedules import build_scheduler

    with tempfile.TemporaryDirectory() as folder:
        args = ["--config", str(config), f"--seed_everything={seed}", *_quiet_args(folder)]
        args += overrides
        cli = TrainerCLI(args=args, run=False)
    seed_everything(seed)
    data, model = cli.datamodule, cli.model
    data.setup("fit")
    model.adapt_layers(lambda: data.raw_batches("train"))
    hp = model.hparams
    optimizer = model.optimizer_factory(optimizer_groups(model.net, hp.decay_norm_and_bias))
    apply_lr_scales(optimizer)
    train = data.train_dataloader()
    per_step = hp.scheduler_interval == "step"
    schedule = None
    if model.scheduler_factory is not None:
        total = epochs * len(train) if per_step else epochs
        schedule = build_scheduler(model.scheduler_factory, optimizer, total)
    average = None
    for entry in cli.config["trainer"]["callbacks"] or []:  # the config's EMA and heap
        if entry.class_path.endswith(HeapAllocator.__name__):
            keep_freed_memory()
        if entry.class_path.endswith(EMA.__name__):
            decay = entry.as_dict().get("init_args", {}).get("decay", 0.999)
            # BatchNorm statistics averaged too, as the EMA callback does by default
            average = AveragedModel(
                model, multi_avg_fn=ema_keeping_integers(decay), use_buffers=True
            )
    precision = cli.trainer.precision_plugin  # the autocast Lightning would put around a step
    if cli.trainer.precision == "16-mixed":
        sys.exit("the plain loop has no GradScaler: no counterpart of trainer.precision=16-mixed")
    model.train()
    for epoch in range(epochs):
        train.sampler.set_epoch(epoch)
        for index, (x, y) in enumerate(train):
            with precision.forward_context():  # the step's forward, not backward
                loss = model.training_step((data.to_float(x), y), index)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if schedule is not None and per_step:
                schedule.step()
            if average is not None:
                average.update_parameters(model)
        if schedule is not None and not per_step:
            schedule.step()
    final = average.module if average is not None else model
    seconds = elapsed()
    print(json.dumps({"seconds": seconds, "test_acc": test_accuracy(final, data)}))


def plain_seed(config: Path, seed: int, epochs: int, overrides: list[str]) -> dict:
    command = [sys.executable, __file__, "--plain-child", "--config", str(config)]
    command += ["--seeds", str(seed), "--plain-epochs", str(epochs)]
    command += [f"--set={o}" for o in overrides]
    env = {**os.environ, START_ENV: str(time.monotonic())}
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        sys.exit(f"the plain loop failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------- report


def time_to_accuracy(args: argparse.Namespace) -> None:
    load = os.getloadavg()[0]
    print(
        f"{args.config.name} to {args.target:.1%} test accuracy, seeds {args.seeds}: "
        f"load average {load:.1f} on {os.cpu_count()} cores"
    )
    reached, epochs_needed, last_seconds = [], [], []
    for seed in args.seeds:
        rows = fit_seed(args.config, seed, args.target, args.full, args.set)
        for row in rows:
            print(
                f"  seed {seed} epoch {row['epoch']:3d} {row['seconds']:7.1f} s  "
                f"test {row['test_acc']:.4f}"
            )
        hit = next((r for r in rows if r["test_acc"] >= args.target), None)
        reached.append(hit["seconds"] if hit else float("inf"))
        epochs_needed.append(hit["epoch"] if hit else rows[-1]["epoch"])
        last_seconds.append(hit["seconds"] if hit else rows[-1]["seconds"])
        best = max(r["test_acc"] for r in rows)
        print(
            f"seed {seed}: "
            + (f"{hit['test_acc']:.4f} after {hit['seconds']:.1f} s" if hit else "not reached")
            + f" (best {best:.4f}, {rows[-1]['seconds']:.1f} s for {rows[-1]['epoch']} epochs)"
        )
    median = statistics.median(reached)
    epochs = int(statistics.median(epochs_needed))
    print(f"median time to {args.target:.1%}: {median:.1f} s ({median / 60:.2f} min)")
    if not args.skip_plain:
        plain = plain_seed(args.config, args.seeds[0], epochs, args.set)
        print(
            f"plain loop, {epochs} epochs: {plain['seconds']:.1f} s, test {plain['test_acc']:.4f}"
            f"; trainer fit / plain loop = {statistics.median(last_seconds) / plain['seconds']:.3f}"
            " (median fit time to the target, or over all epochs where it was not reached)"
        )
    print(f"load average after: {os.getloadavg()[0]:.1f}")


# ----------------------------------------------------------------------------- GPU throughput


def synthetic_cifar(path: Path, n: int = 20000) -> None:
    """CIFAR-10-shaped uint8 images and labels for the `arrays` source."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    np.savez(path, x=x, y=y, x_test=x[:1000], y_test=y[:1000])


def cifar_cli(npz: Path, log_dir: str, steps: int, *extra: str, config: Path = CIFAR_RESNET):
    """``config`` on CIFAR-shaped random images for ``steps`` steps; the ResNet config with
    the GPU preset (the speedrun config carries its own precision and memory format)."""
    from dnn_tricks.app import TrainerCLI

    preset = ["--config", str(GPU_PRESET)] if config == CIFAR_RESNET else []
    return TrainerCLI(
        args=[
            "--config",
            str(config),
            *preset,
            "--data.source=arrays",
            f"--data.root={npz}",
            "--data.download=false",
            "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={steps}",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            *_quiet_args(log_dir),
            *extra,
        ],
        run=False,
    )


class StepClock(Callback):
    """Synchronized time at the start of batch ``warmup`` and at the end of batch ``last``
    (only there: a sync every step would stall the GPU queue the loop keeps full)."""

    def __init__(self, warmup: int, last: int) -> None:
        self.warmup, self.last, self.begin, self.end = warmup, last, 0.0, 0.0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if batch_idx == self.warmup:
            torch.cuda.synchronize()
            self.begin = time.perf_counter()

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if batch_idx == self.last:
            torch.cuda.synchronize()
            self.end = time.perf_counter()


def trainer_rate(
    npz: Path, steps: int, warmup: int, *extra: str, config: Path = CIFAR_RESNET
) -> float:
    with tempfile.TemporaryDirectory() as log_dir:
        cli = cifar_cli(npz, log_dir, steps, *extra, config=config)
        clock = StepClock(warmup, last=steps - 1)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        batch = cli.datamodule.batch_size
    return (steps - warmup) * batch / (clock.end - clock.begin)


def plain_rate(npz: Path, steps: int, warmup: int) -> float:
    """The same model (input normalization + network), batches, bf16 autocast and
    channels_last, by hand."""
    from dnn_tricks.models.backbones import optimizer_groups

    with tempfile.TemporaryDirectory() as log_dir:
        cli = cifar_cli(npz, log_dir, steps)
    data, model, device = cli.datamodule, cli.model, torch.device("cuda")
    data.setup("fit")
    model.to(device)
    model.adapt_layers(lambda: data.raw_batches("train"))
    hp = model.hparams
    optimizer = model.optimizer_factory(optimizer_groups(model.net, hp.decay_norm_and_bias))
    model.train()
    begin = 0.0
    for step, (x, y) in enumerate(data.train_dataloader()):
        if step == warmup:
            torch.cuda.synchronize()
            begin = time.perf_counter()
        if step == steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(model(data.to_float(x)), y, label_smoothing=hp.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return (steps - warmup) * data.batch_size / (time.perf_counter() - begin)


def gpu_throughput(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("\nGPU throughput: skipped, no CUDA GPU here (run this script on a GPU machine)")
        return
    warmup = max(10, args.gpu_steps // 10)
    with tempfile.TemporaryDirectory() as folder:
        npz = Path(folder) / "cifar_shaped.npz"
        synthetic_cifar(npz)
        rates = {"plain": [], "trainer": []}
        for _ in range(2):  # alternate so clock and thermal drift hit both
            rates["plain"].append(plain_rate(npz, args.gpu_steps, warmup))
            rates["trainer"].append(trainer_rate(npz, args.gpu_steps, warmup))
        # The GPU speedrun's training rate on the same images; its accuracy needs CIFAR-10's
        # files (see the docstring). 19,600 train images at batch 512: 38 steps per epoch.
        speedrun_rate = trainer_rate(npz, 30, 8, config=SPEEDRUN_GPU)
    plain, lightning = max(rates["plain"]), max(rates["trainer"])
    print(f"\n{torch.cuda.get_device_name()}: {CIFAR_RESNET.name} + gpu.yaml (bf16, channels_last)")
    print(f"  plain loop     {plain:10.0f} images/s")
    print(
        f"  trainer fit    {lightning:10.0f} images/s   ({lightning / plain:.3f}x the plain loop)"
    )
    epochs = yaml.safe_load(SPEEDRUN_GPU.read_text())["trainer.max_epochs"]
    print(
        f"  {SPEEDRUN_GPU.name}: {speedrun_rate:.0f} training images/s on random images: "
        f"{epochs} epochs of CIFAR-10's 49,000 take ~{epochs * 49000 / speedrun_rate:.1f} s "
        "of training steps (no accuracy here: random images)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=SPEEDRUN, help="a config with a test split")
    parser.add_argument("--target", type=float, default=0.935)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--full", action="store_true", help="train all epochs of the config")
    parser.add_argument("--skip-plain", action="store_true", help="no plain-loop reference")
    parser.add_argument("--skip-fit", action="store_true", help="only the GPU throughput")
    parser.add_argument("--gpu-steps", type=int, default=200)
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="--KEY=VALUE",
        help="a config override for the fits and the plain loop, e.g. --set=--trainer.max_epochs=8",
    )
    parser.add_argument("--plain-child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--plain-epochs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.plain_child:
        plain_child(args.config, args.seeds[0], args.plain_epochs, args.set)
        return
    if not args.skip_fit:
        if not args.config.exists():
            sys.exit(f"{args.config} does not exist")
        time_to_accuracy(args)
    gpu_throughput(args)


if __name__ == "__main__":
    main()
