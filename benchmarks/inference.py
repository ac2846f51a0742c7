"""Inference speed of the exported Fashion-MNIST ConvNet: PyTorch eager vs TorchScript vs
onnxruntime, on the CPU, with 1 and 2 threads.

The model is what `trainer export` writes: the input normalization of configs/fashion_mnist.yaml
(fitted on real train images when Debian's dataset-fashion-mnist is installed) followed by the
config's net, in eval mode; the TorchScript and ONNX files are written by
dnn_tricks.export.export_model (so they passed its probability check) and loaded back as a
user would. Measured:

- batch-1 latency: median milliseconds of one single-image call (after warm-up);
- batch-256 throughput: images per second, from the median time of one 256-image call.

Engines are measured in interleaved rounds, so a change in the machine's load hits them
alike; ratios compare engines at the same thread count within this one run. The goal is
onnxruntime at least 1.5x eager at batch 1. The load average (`uptime`) is printed with the
numbers, since the dev machine is shared.

    .venv/bin/python benchmarks/inference.py [--rounds 5] [--calls 200] [--threads 1 2]
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import onnxruntime  # noqa: E402
import torch  # noqa: E402
import yaml  # noqa: E402
from jsonargparse import ArgumentParser  # noqa: E402
from torch import nn  # noqa: E402

from dnn_tricks.export import export_model  # noqa: E402
from dnn_tricks.models.backbones import NetFactory, build_net  # noqa: E402
from dnn_tricks.models.input_norm import InputNormalizer  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FASHION_MNIST = Path("/usr/share/datasets/fashion-mnist")
SHAPE = (1, 28, 28)
GOAL = 1.5


def build_model(config: Path) -> tuple[nn.Module, torch.Tensor]:
    """The config's input normalization and net as one eval-mode module, and real images."""
    model_cfg = yaml.safe_load(config.read_text())["model"]
    parser = ArgumentParser()
    parser.add_argument("--net", type=NetFactory)
    net_factory = parser.instantiate(parser.parse_object({"net": model_cfg["net"]})).net
    images = _images()
    norm = InputNormalizer(**model_cfg.get("input_norm", {}))
    norm.adapt(images[:10000].split(2000))
    torch.manual_seed(0)
    net = build_net(net_factory, SHAPE, 10)
    return nn.Sequential(norm, net).eval(), images


def _images() -> torch.Tensor:
    if (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
        from dnn_tricks.data.sources import load_source

        x = np.asarray(load_source("fashion_mnist", root=str(FASHION_MNIST)).x[:10000])
        return torch.as_tensor(x).permute(0, 3, 1, 2).float() / 255  # N x H x W x C -> NCHW
    print("(Fashion-MNIST not installed: random images)")
    return torch.rand(10000, *SHAPE)


def engines(model: nn.Module, example: torch.Tensor, folder: Path, threads: int) -> dict:
    """name -> function(batch) -> logits, each set to ``threads`` threads."""
    torch.set_num_threads(threads)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript is deprecated in torch
        scripted = torch.jit.load(folder / "model.torchscript.pt")
    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads, options.inter_op_num_threads = threads, 1
    session = onnxruntime.InferenceSession(
        str(folder / "model.onnx"), options, providers=["CPUExecutionProvider"]
    )

    def eager(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return model(x)

    def torchscript(x: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            return scripted(x)

    def ort(x: torch.Tensor) -> np.ndarray:
        return session.run(None, {"input": x.numpy()})[0]

    return {"eager": eager, "torchscript": torchscript, "onnxruntime": ort}


def _median_seconds(run: Callable, x: torch.Tensor, calls: int) -> float:
    for _ in range(max(3, calls // 10)):  # warm-up (allocations, lazy graph optimization)
        run(x)
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        run(x)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _load() -> str:
    return "load average " + " ".join(f"{v:.2f}" for v in os.getloadavg())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs/fashion_mnist.yaml")
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds per engine")
    parser.add_argument("--calls", type=int, default=200, help="timed batch-1 calls per round")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    args = parser.parse_args()

    model, images = build_model(args.config)
    single, big = images[:1], images[:256]
    print(f"{_load()} (start); torch {torch.__version__}, onnxruntime {onnxruntime.__version__}")
    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp)
        for fmt, name in (("onnx", "model.onnx"), ("torchscript", "model.torchscript.pt")):
            diff = export_model(model, images[:64], fmt, folder / name)
            print(f"exported {fmt}: max probability difference {diff:.1e}")
        results: dict[tuple[int, str], dict[str, list[float]]] = defaultdict(
            lambda: defaultdict(list)
        )
        for threads in args.threads:
            runs = engines(model, big, folder, threads)
            for _ in range(args.rounds):
                for name, run in runs.items():
                    latency = _median_seconds(run, single, args.calls)
                    throughput = 256 / _median_seconds(run, big, max(5, args.calls // 20))
                    results[(threads, name)]["latency"].append(latency)
                    results[(threads, name)]["throughput"].append(throughput)
    print(f"{_load()} (end)\n")
    print(
        f"{'threads':>7} {'engine':<12} {'batch-1 ms':>10} {'vs eager':>8} "
        f"{'batch-256 img/s':>15} {'vs eager':>8}"
    )
    verdicts = []
    for threads in args.threads:
        base = results[(threads, "eager")]
        base_ms = statistics.median(base["latency"]) * 1e3
        base_tp = statistics.median(base["throughput"])
        for name in ("eager", "torchscript", "onnxruntime"):
            r = results[(threads, name)]
            ms, tp = statistics.median(r["latency"]) * 1e3, statistics.median(r["throughput"])
            print(
                f"{threads:>7} {name:<12} {ms:>10.3f} {base_ms / ms:>7.2f}x "
                f"{tp:>15.0f} {tp / base_tp:>7.2f}x"
            )
            if name == "onnxruntime":
                verdicts.append((threads, base_ms / ms))
    for threads, ratio in verdicts:
        met = "met" if ratio >= GOAL else "NOT met"
        print(f"goal onnxruntime >= {GOAL}x eager at batch 1, {threads} thread(s): {met}")


if __name__ == "__main__":
    main()
