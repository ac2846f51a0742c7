"""Wall time for `trainer fit --config configs/fashion_mnist.yaml` to reach 93% test accuracy
and, on a CUDA GPU, training throughput of the CIFAR-10 ResNet config with bf16 and
channels_last against a plain PyTorch loop on the same card.

1. Time to accuracy: the config trains as `trainer fit` builds it. After every epoch a
   callback stops the clock, measures accuracy on the whole test split (10,000 images, model
   in eval mode), and restarts it; the clock starts before the CLI parses the config, so it
   includes loading, splitting and the normalizer fit. The run stops at the target unless
   --full. The project's plain-loop reference on this 2-core CPU (REFERENCES.md): 93.0%
   after 10 epochs, 241 s.
2. GPU throughput (only with CUDA and configs/cifar10_resnet.yaml): the ResNet config composed
   with configs/trainer/gpu.yaml (bf16-mixed, channels_last) on CIFAR-shaped random images
   (images/s does not depend on pixel values; no download), against a hand-written loop
   with the same network, loader, autocast and memory format. Steps between the warm-up and
   the end are timed with the GPU synchronized.

    .venv/bin/python benchmarks/time_to_accuracy.py [--config configs/fashion_mnist.yaml]
        [--target 0.93] [--threads 1] [--full] [--skip-fit] [--gpu-steps 200]

Measured on the shared 2-core dev machine (load average ~6 from other jobs, 1 thread, which
is 2-4x faster than 2 threads under that load): 10 epochs in 588 s, test accuracy 0.874,
0.890, 0.901, 0.906, 0.918, 0.915, 0.921, 0.923, 0.928, 0.929 -- 93% not reached (the
config before its diagnostic callbacks were added; PreciseBN alone adds 200 batches/epoch).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

START = time.perf_counter()
os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback  # noqa: E402

from dnn_tricks import regularize  # noqa: E402
from dnn_tricks.app import TrainerCLI  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION = ROOT / "configs" / "fashion_mnist.yaml"
CIFAR_RESNET = ROOT / "configs" / "cifar10_resnet.yaml"
GPU_PRESET = ROOT / "configs" / "trainer" / "gpu.yaml"

# ----------------------------------------------------------------------------- time to accuracy


class TestAccuracyClock(Callback):
    """After each training epoch: test accuracy, and the wall time so far without the time
    spent measuring it. Stops the fit at ``target`` unless ``full``."""

    def __init__(self, start: float, target: float, full: bool) -> None:
        self.start, self.target, self.full = start, target, full
        self.paused = 0.0
        self.rows: list[tuple[int, float, float, float]] = []

    @torch.no_grad()
    def test_accuracy(self, trainer, pl_module) -> float:
        data = trainer.datamodule
        was_training = pl_module.training
        pl_module.eval()
        correct = total = 0
        for x, y in data.test_dataloader():
            x, y = x.to(pl_module.device), y.to(pl_module.device)
            correct += int((pl_module(data.prepare_inputs(x)).argmax(1) == y).sum())
            total += len(y)
        pl_module.train(was_training)
        return correct / total

    def on_train_epoch_end(self, trainer, pl_module) -> None:
        pause = time.perf_counter()
        wall = pause - self.start - self.paused
        accuracy = self.test_accuracy(trainer, pl_module)
        val = float(trainer.callback_metrics.get("val/acc", float("nan")))
        self.rows.append((trainer.current_epoch + 1, wall, val, accuracy))
        epoch = trainer.current_epoch + 1
        print(f"epoch {epoch:3d}  {wall:7.1f} s  val {val:.4f}  test {accuracy:.4f}")
        if accuracy >= self.target and not self.full:
            trainer.should_stop = True
        self.paused += time.perf_counter() - pause


def time_to_accuracy(args: argparse.Namespace) -> None:
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(
        f"{args.config.name} to {args.target:.0%} test accuracy: {threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores"
    )
    fit_start = time.perf_counter()
    with tempfile.TemporaryDirectory() as log_dir:
        cli = TrainerCLI(
            args=[
                "--config",
                str(args.config),
                "--trainer.enable_progress_bar=false",
                "--trainer.enable_model_summary=false",
                f"--trainer.logger.init_args.save_dir={log_dir}",
            ],
            run=False,
        )
        clock = TestAccuracyClock(fit_start, args.target, args.full)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    reached = [row for row in clock.rows if row[3] >= args.target]
    print(f"imports before the clock started: {fit_start - START:.1f} s")
    if reached:
        epoch, wall, _, accuracy = reached[0]
        print(
            f"reached {accuracy:.4f} >= {args.target} after epoch {epoch}: {wall:.1f} s "
            f"({wall / 60:.1f} min; target under 5 min; plain-loop reference 241 s)"
        )
    else:
        best = max(row[3] for row in clock.rows)
        print(f"did not reach {args.target}: best test accuracy {best:.4f}")


# ----------------------------------------------------------------------------- GPU throughput


def synthetic_cifar(path: Path, n: int = 20000) -> None:
    """CIFAR-10-shaped uint8 images and labels for the `arrays` source."""
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, size=(n, 32, 32, 3), dtype=np.uint8)
    y = np.arange(n) % 10
    np.savez(path, x=x, y=y, x_test=x[:1000], y_test=y[:1000])


def resnet_cli(npz: Path, log_dir: str, steps: int) -> TrainerCLI:
    return TrainerCLI(
        args=[
            "--config",
            str(CIFAR_RESNET),
            "--config",
            str(GPU_PRESET),
            "--data.source=arrays",
            f"--data.root={npz}",
            "--data.download=false",
            "--trainer.max_epochs=1",
            f"--trainer.limit_train_batches={steps}",
            "--trainer.limit_val_batches=1",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={log_dir}",
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


def trainer_rate(npz: Path, steps: int, warmup: int) -> float:
    with tempfile.TemporaryDirectory() as log_dir:
        cli = resnet_cli(npz, log_dir, steps)
        clock = StepClock(warmup, last=steps - 1)
        cli.trainer.callbacks.append(clock)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        batch = cli.datamodule.batch_size
    return (steps - warmup) * batch / (clock.end - clock.begin)


def plain_rate(npz: Path, steps: int, warmup: int) -> float:
    """The same network, loader, bf16 autocast and channels_last, by hand."""
    with tempfile.TemporaryDirectory() as log_dir:
        cli = resnet_cli(npz, log_dir, steps)
    data, model, device = cli.datamodule, cli.model, torch.device("cuda")
    data.setup("fit")
    net = model.net.to(device, memory_format=torch.channels_last)
    hp = model.hparams
    optimizer = model.optimizer_factory(regularize.decay_param_groups(net, hp.decay_norm_and_bias))
    net.train()
    begin = 0.0
    for step, (x, y) in enumerate(data.train_dataloader()):
        if step == warmup:
            torch.cuda.synchronize()
            begin = time.perf_counter()
        if step == steps:
            break
        x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
        x = data.prepare_inputs(x).contiguous(memory_format=torch.channels_last)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = F.cross_entropy(net(x), y, label_smoothing=hp.label_smoothing)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    torch.cuda.synchronize()
    return (steps - warmup) * data.batch_size / (time.perf_counter() - begin)


def gpu_throughput(args: argparse.Namespace) -> None:
    if not torch.cuda.is_available():
        print("\nGPU throughput: skipped, no CUDA GPU here (run this script on a GPU machine)")
        return
    if not CIFAR_RESNET.exists():
        print(f"\nGPU throughput: skipped, {CIFAR_RESNET.relative_to(ROOT)} does not exist")
        return
    warmup = max(10, args.gpu_steps // 10)
    with tempfile.TemporaryDirectory() as folder:
        npz = Path(folder) / "cifar_shaped.npz"
        synthetic_cifar(npz)
        rates = {"plain": [], "trainer": []}
        for _ in range(2):  # alternate so clock and thermal drift hit both
            rates["plain"].append(plain_rate(npz, args.gpu_steps, warmup))
            rates["trainer"].append(trainer_rate(npz, args.gpu_steps, warmup))
    plain, lightning = max(rates["plain"]), max(rates["trainer"])
    print(f"\n{torch.cuda.get_device_name()}: {CIFAR_RESNET.name} + gpu.yaml (bf16, channels_last)")
    print(f"  plain loop     {plain:10.0f} images/s")
    print(
        f"  trainer fit    {lightning:10.0f} images/s   ({lightning / plain:.3f}x the plain loop)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=FASHION, help="any config with a test split")
    parser.add_argument("--target", type=float, default=0.93)
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--full", action="store_true", help="train all epochs of the config")
    parser.add_argument("--skip-fit", action="store_true", help="only the GPU throughput")
    parser.add_argument("--gpu-steps", type=int, default=200)
    args = parser.parse_args()
    if not args.skip_fit:
        if not args.config.exists():
            sys.exit(f"{args.config} does not exist")
        time_to_accuracy(args)
    gpu_throughput(args)


if __name__ == "__main__":
    main()
