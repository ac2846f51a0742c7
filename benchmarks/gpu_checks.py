"""One short script for a CUDA machine: do the GPU switches work, and what do they buy?

1. Presets: `trainer fit` on digits with configs/trainer/gpu.yaml at bf16-mixed and
   16-mixed (Lightning's precision plugins, a GradScaler for float16), and with ddp.yaml
   as one process (SyncBatchNorm conversion inside Lightning's DDP).
2. AMP by hand: steps of the CIFAR ResNet-20 under autocast; the loss stays finite, the
   weights stay float32 and change, the logits come out in the autocast dtype.
3. SyncBatchNorm: torch.nn.SyncBatchNorm.convert_sync_batchnorm of a batch-norm net in a
   1-process NCCL group must compute exactly what BatchNorm computes (outputs and running
   statistics), since the "global" batch is the local one.
4. Speed: ms per training step (ResNet-20, CIFAR-shaped batch) for float32, bf16, bf16 +
   channels_last, and bf16 + channels_last + torch.compile (compile time reported apart).
5. Device-resident data (data.device_resident, data.batch_augment): the batched flip /
   translate / cutout give on the GPU exactly what they give on the CPU for the same draws;
   a digits fit on resident data ends with the loader path's weights, bitwise, and so does one
   with 8 optimizer steps per Lightning step (data.steps_per_batch); the training
   steps of a resident fit make no synchronizing CUDA call (torch's sync debug mode counts
   them; the model's input normalization and non-finite check included) except at log steps;
   and a ResNet-20 fit on CIFAR-shaped resident data against the same fit through the loader
   (images/s).

Prints numbers; exits 1 if a correctness check fails, 0 otherwise, and 0 with a message
when there is no GPU.

    python benchmarks/gpu_checks.py [--batch 256] [--steps 30] [--skip-compile]
        [--only resident]   # part 5 alone; with --device cpu it checks this script on a CPU
"""

from __future__ import annotations

import argparse
import copy
import math
import os
import socket
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F
from lightning.pytorch import Callback
from torch import nn

ROOT = Path(__file__).resolve().parents[1]
FAILURES: list[str] = []


def check(ok: bool, what: str) -> None:
    print(f"  [{'ok' if ok else 'FAIL'}] {what}")
    if not ok:
        FAILURES.append(what)


def resnet() -> nn.Module:
    from dnn_tricks.models.resnet import ResNet

    return ResNet((3, 32, 32), 10, depth=20)


def batch(size: int) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(size, 3, 32, 32, generator=generator)
    return x.cuda(), torch.randint(0, 10, (size,), generator=generator).cuda()


# ----------------------------------------------------------------------------- 1. presets


def presets() -> None:
    from dnn_tricks.app import TrainerCLI

    print("\n1. trainer presets on digits (in-process, 1 GPU)")
    runs = [
        ("gpu.yaml", "bf16-mixed"),
        ("gpu.yaml", "16-mixed"),
        ("ddp.yaml", "bf16-mixed"),
    ]
    if not torch.cuda.is_bf16_supported():
        runs = [(preset, "16-mixed") for preset, _ in runs]
    for preset, precision in runs:
        with tempfile.TemporaryDirectory() as log_dir:
            cli = TrainerCLI(
                args=[
                    "--config",
                    str(ROOT / "configs" / "digits.yaml"),
                    "--config",
                    str(ROOT / "configs" / "trainer" / preset),
                    f"--trainer.precision={precision}",
                    "--trainer.devices=1",
                    "--trainer.deterministic=false",
                    "--trainer.max_epochs=3",
                    "--trainer.enable_progress_bar=false",
                    "--trainer.enable_model_summary=false",
                    f"--trainer.logger.init_args.save_dir={log_dir}",
                ],
                run=False,
            )
            start = time.perf_counter()
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            seconds = time.perf_counter() - start
            accuracy = float(cli.trainer.callback_metrics["val/acc"])
            synced = any(isinstance(m, nn.SyncBatchNorm) for m in cli.model.modules())
        check(
            accuracy > 0.8 and synced == (preset == "ddp.yaml"),
            f"{preset} {precision}: val/acc {accuracy:.3f} after 3 epochs ({seconds:.1f} s), "
            f"SyncBatchNorm {'in' if synced else 'not in'} the model",
        )


# ----------------------------------------------------------------------------- 2. AMP


def amp(size: int) -> None:
    print("\n2. AMP training steps by hand (ResNet-20)")
    x, y = batch(size)
    for dtype in (torch.bfloat16, torch.float16):
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            print("  bf16: not supported on this GPU (needs Ampere or newer)")
            continue
        torch.manual_seed(0)
        net = resnet().cuda()
        before = [p.detach().clone() for p in net.parameters()]
        optimizer = torch.optim.SGD(net.parameters(), lr=0.05, momentum=0.9)
        scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
        losses = []
        for _ in range(5):
            with torch.autocast("cuda", dtype=dtype):
                logits = net(x)
                loss = F.cross_entropy(logits, y)
            optimizer.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(optimizer)
            scaler.update()
            losses.append(float(loss))
        moved = any(not torch.equal(a, b) for a, b in zip(before, net.parameters(), strict=True))
        fp32 = all(p.dtype == torch.float32 for p in net.parameters())
        check(
            all(math.isfinite(v) for v in losses) and moved and fp32 and logits.dtype == dtype,
            f"{dtype}: losses {losses[0]:.3f} -> {losses[-1]:.3f}, float32 weights updated, "
            f"logits {logits.dtype}",
        )


# ----------------------------------------------------------------------------- 3. SyncBatchNorm


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def sync_batchnorm(size: int) -> None:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel

    print("\n3. SyncBatchNorm in a 1-process NCCL group")
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(free_port()))
    started = not dist.is_initialized()
    if started:
        dist.init_process_group("nccl", rank=0, world_size=1)
    try:
        torch.manual_seed(0)
        plain = resnet().cuda()
        synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(plain))
        count = sum(isinstance(m, nn.SyncBatchNorm) for m in synced.modules())
        ddp = DistributedDataParallel(synced, device_ids=[torch.cuda.current_device()])
        x, _ = batch(size)
        out_plain, out_sync = plain(x), ddp(x)
        out_sync.sum().backward()
        diff = float((out_plain - out_sync).abs().max())
        bn = [m for m in plain.modules() if isinstance(m, nn.BatchNorm2d)]
        sbn = [m for m in synced.modules() if isinstance(m, nn.SyncBatchNorm)]
        stats = max(
            float((a.running_var - b.running_var).abs().max()) for a, b in zip(bn, sbn, strict=True)
        )
        check(
            count == len(bn) > 0 and diff < 1e-4 and stats < 1e-5,
            f"{count} BatchNorm2d layers converted; max |output diff| {diff:.2e}, "
            f"max |running_var diff| {stats:.2e}",
        )
    finally:
        if started:
            dist.destroy_process_group()


# ----------------------------------------------------------------------------- 4. speed


def step_time(net: nn.Module, x: torch.Tensor, y: torch.Tensor, dtype, steps: int) -> float:
    """Mean ms per training step after 5 warm-up steps, with the GPU synchronized."""
    optimizer = torch.optim.SGD(net.parameters(), lr=0.01, momentum=0.9)

    def step() -> None:
        with torch.autocast("cuda", dtype=dtype, enabled=dtype != torch.float32):
            loss = F.cross_entropy(net(x), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    for _ in range(5):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(steps):
        step()
    torch.cuda.synchronize()
    return 1e3 * (time.perf_counter() - start) / steps


def speed(size: int, steps: int, compile_too: bool) -> None:
    print(f"\n4. speed: ResNet-20 training step, batch {size}")
    x, y = batch(size)
    half = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    nhwc = x.contiguous(memory_format=torch.channels_last)

    def fresh(channels_last: bool) -> nn.Module:
        torch.manual_seed(0)
        net = resnet().cuda()
        return net.to(memory_format=torch.channels_last) if channels_last else net

    variants: list[tuple[str, Callable[[], float]]] = [
        ("float32", lambda: step_time(fresh(False), x, y, torch.float32, steps)),
        (f"{half}", lambda: step_time(fresh(False), x, y, half, steps)),
        (f"{half} + channels_last", lambda: step_time(fresh(True), nhwc, y, half, steps)),
    ]
    results = {}
    for name, measure in variants:
        results[name] = measure()
    if compile_too:
        net = torch.compile(fresh(True))
        start = time.perf_counter()
        try:
            step_time(net, nhwc, y, half, 1)  # compiles (forward and backward)
            compile_s = time.perf_counter() - start
            results[f"{half} + channels_last + compile"] = step_time(net, nhwc, y, half, steps)
            print(f"  torch.compile: {compile_s:.1f} s to compile before the first step")
        except Exception as error:  # no compiler toolchain in the image, etc.
            print(f"  torch.compile failed: {str(error).splitlines()[0][:120]}")
    reference = results["float32"]
    for name, ms in results.items():
        rate = size / ms * 1e3
        print(f"  {name:38} {ms:8.2f} ms/step {rate:10.0f} images/s {reference / ms:6.2f}x")


# ----------------------------------------------------------------------------- 5. resident


def _digits_cli(log_dir: str, device: str, *extra: str):
    from dnn_tricks.app import TrainerCLI

    return TrainerCLI(
        args=[
            "--config",
            str(ROOT / "configs" / "digits.yaml"),
            f"--trainer.accelerator={'gpu' if device == 'cuda' else 'cpu'}",
            "--trainer.devices=1",
            "--trainer.max_epochs=2",
            "--data.steps_per_batch=1",  # one Lightning step per optimizer step unless asked
            "--trainer.log_every_n_steps=10",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={log_dir}",
            *extra,
        ],
        run=False,
    )


class SyncCounter(Callback):
    """torch's CUDA sync debug mode "warn" from each training batch's start to its end,
    except at log steps (where reading a logged value syncs on purpose)."""

    def __init__(self) -> None:
        self.steps = 0

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        every = trainer.log_every_n_steps
        if not every or (trainer.global_step + 1) % every:
            torch.cuda.set_sync_debug_mode("warn")
            self.steps += 1

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        torch.cuda.set_sync_debug_mode("default")


def resident(device: str, size: int) -> None:
    import warnings

    from dnn_tricks.data.batch_augment import BatchAugment, BatchAugmentConfig
    from dnn_tricks.data.resident import epoch_generator

    print(f"\n5. device-resident data on {device}")
    # a. the batched augmentation is device-independent for the same draws
    x = torch.randint(0, 256, (size, 3, 32, 32), dtype=torch.uint8)
    config = BatchAugmentConfig(flip=0.5, translate=4, padding="reflect", cutout=8)
    augment = BatchAugment(config, (3, 32, 32))
    params = augment.draw(size, epoch_generator(0, 0, 0))
    on_cpu = augment(x, params)
    on_device = augment(x.to(device), {k: v.to(device) for k, v in params.items()}).cpu()
    check(torch.equal(on_cpu, on_device), f"flip + reflect translate + cutout: {device} == cpu")

    # b. resident and loader paths train to the same weights
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")  # deterministic cuBLAS
    weights = []
    for extra in ([], ["--data.device_resident=true"]):
        with tempfile.TemporaryDirectory() as log_dir:
            cli = _digits_cli(log_dir, device, *extra)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            weights.append({k: v.detach().cpu() for k, v in cli.model.state_dict().items()})
    same = all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])
    check(same, "digits, 2 epochs: resident data gives the loader path's weights bitwise")

    # b2. several optimizer steps per Lightning step (data.steps_per_batch) on the device
    with tempfile.TemporaryDirectory() as log_dir:
        cli = _digits_cli(
            log_dir, device, "--data.device_resident=true", "--data.steps_per_batch=8"
        )
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        grouped = {k: v.detach().cpu() for k, v in cli.model.state_dict().items()}
    same = all(torch.equal(weights[1][k], grouped[k]) for k in grouped)
    check(same, "digits, 2 epochs: 8 steps per Lightning step give the ungrouped weights bitwise")

    # c. no synchronizing CUDA call inside the training steps (log steps excepted)
    if device == "cuda":
        counter = SyncCounter()
        with tempfile.TemporaryDirectory() as log_dir, warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            cli = _digits_cli(
                log_dir,
                device,
                "--data.device_resident=true",
                "--data.batch_augment.flip=0.5",
                "--data.batch_augment.translate=1",
                "--trainer.deterministic=false",
            )
            cli.trainer.callbacks.append(counter)
            cli.trainer.fit(cli.model, datamodule=cli.datamodule)
            torch.cuda.set_sync_debug_mode("default")
        syncs = [w for w in seen if "synchroniz" in str(w.message)]
        for w in syncs[:3]:
            print(f"    sync: {str(w.message).splitlines()[0][:100]} ({w.filename}:{w.lineno})")
        check(not syncs, f"{counter.steps} training steps, {len(syncs)} synchronizing calls")

    # d. ResNet-20 on CIFAR-shaped data: the loader against resident data (+ batch augment)
    if device == "cuda":
        from time_to_accuracy import synthetic_cifar, trainer_rate

        with tempfile.TemporaryDirectory() as folder:
            npz = Path(folder) / "cifar_shaped.npz"
            synthetic_cifar(npz)
            resident_args = (
                "--data.device_resident=true",
                "--data.batch_augment.flip=0.5",
                "--data.batch_augment.translate=2",
            )
            loader = trainer_rate(npz, 200, 20)
            on_device = trainer_rate(npz, 200, 20, *resident_args)
        print(
            f"  ResNet-20 trainer fit, bf16 + channels_last: loader {loader:.0f} images/s, "
            f"resident + batch augment {on_device:.0f} images/s ({on_device / loader:.2f}x)"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--skip-compile", action="store_true")
    parser.add_argument("--only", choices=["resident"], help="run one part only")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    args = parser.parse_args()
    os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
    sys.path.insert(0, str(Path(__file__).resolve().parent))  # time_to_accuracy's helpers
    if args.only == "resident" and args.device == "cpu":
        resident("cpu", args.batch)  # the device-independent parts, to check this script
        return 1 if FAILURES else 0
    if not torch.cuda.is_available():
        print("gpu_checks: no CUDA GPU here, nothing to check; run it on a GPU machine.")
        return 0
    props = torch.cuda.get_device_properties(0)
    print(
        f"{props.name}, compute capability {props.major}.{props.minor}, "
        f"{props.total_memory / 2**30:.0f} GiB; torch {torch.__version__}, CUDA "
        f"{torch.version.cuda}, cuDNN {torch.backends.cudnn.version()}, "
        f"bf16 {'yes' if torch.cuda.is_bf16_supported() else 'no'}"
    )
    if args.only != "resident":
        presets()
    resident("cuda", args.batch)
    # The fits above leave Lightning's global flags behind; time with cuDNN's autotuner.
    torch.use_deterministic_algorithms(False)
    torch.backends.cudnn.deterministic = False
    torch.backends.cudnn.benchmark = True
    if args.only != "resident":
        amp(args.batch)
        sync_batchnorm(args.batch)
        speed(args.batch, args.steps, not args.skip_compile)
    if FAILURES:
        print(f"\n{len(FAILURES)} check(s) failed")
        return 1
    print("\nall checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
