"""Image loading: our lazy ``image_folder`` against torchvision's ``ImageFolder`` with
``transforms.v2`` and against LitData streaming, and peak memory for 5k vs 50k images.

Speed: the same mixed-size JPEGs (Fashion-MNIST pictures, colourised and upscaled to
--min-side..--max-side pixels), the same work per image (decode, resize the short side and
crop the centre to --size, random horizontal flip, normalize with fixed mean/std) and the
same worker count, batch and epoch. Images/s over whole epochs after a warm-up epoch, with
every file in the page cache first. The streaming row reads chunks that ``trainer
prepare-data`` wrote at the evaluation size (decoding and resizing were paid once, there).

Memory: one epoch of our train loader over folders of 5k and 50k small JPEGs, each in a
fresh process; peak proportional set size (PSS: a page shared by n processes counts 1/n)
of the anonymous and shared memory of the loader process and its workers, sampled every
50 ms, for indexing and for the epoch; and the main process's peak RSS.

The machine may be shared: the load average is printed before and after.

    .venv/bin/python benchmarks/image_loader.py [--images 3000] [--workers 2] [--size 96]
        [--rss-sizes 5000 50000] [--skip-rss] [--skip-speed] [--dir /tmp/image_loader]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

MEAN, STD = (0.3, 0.3, 0.3), (0.35, 0.35, 0.35)


def write_jpegs(root: Path, count: int, min_side: int, max_side: int, seed: int = 0) -> Path:
    """``count`` JPEGs of random sizes in 10 class folders (reused when already written)."""
    from PIL import Image

    from dnn_tricks.data.sources import load_source

    done = root / f".done{count}"
    if done.exists():
        return root
    pictures = load_source("fashion_mnist")
    rng = np.random.default_rng(seed)
    tint = rng.uniform(0.5, 1.0, size=(10, 3))
    for i in range(count):
        label = int(pictures.y[i % len(pictures.y)])
        grey = pictures.x[i % len(pictures.y), :, :, 0].astype(np.float32)
        colour = (grey[..., None] * tint[label]).astype(np.uint8)
        height, width = rng.integers(min_side, max_side + 1, size=2)
        folder = root / f"class{label}"
        folder.mkdir(parents=True, exist_ok=True)
        image = Image.fromarray(colour).resize((int(width), int(height)), Image.Resampling.BILINEAR)
        image.save(folder / f"{i:06d}.jpg", quality=90)
    done.touch()
    return root


def warm_page_cache(root: Path) -> None:
    for path in root.rglob("*.jpg"):
        path.read_bytes()


def load_average() -> str:
    return " ".join(Path("/proc/loadavg").read_text().split()[:3])


def rate(loader, normalize, epochs: int) -> float:
    """Images/s over ``epochs`` epochs, after one warm-up epoch (workers started, caches)."""
    for x, _ in loader:
        normalize(x)
    start, n = time.perf_counter(), 0
    for _ in range(epochs):
        for x, _ in loader:
            normalize(x)
            n += len(x)
    return n / (time.perf_counter() - start)


def ours(root: Path, args: argparse.Namespace, streaming_root: Path | None = None):
    """Our DataModule's train loader (image_folder, or streaming chunks) + the normalize."""
    from dnn_tricks.data.datamodule import DataModule

    flip = {"transform": {"__class_fullname__": "HorizontalFlip", "p": 0.5}}
    keys = dict(batch_size=args.batch, num_workers=args.workers, augment=flip)
    if streaming_root is None:
        keys.update(source="image_folder", root=str(root), image_size=(args.size, args.size))
    else:
        keys.update(source="streaming", root=str(streaming_root))
    data = DataModule(**keys, val_fraction=0.05, test_fraction=0.05)
    data.setup("fit")
    mean = torch.tensor(MEAN).view(1, 3, 1, 1)
    std = torch.tensor(STD).view(1, 3, 1, 1)

    def normalize(x: torch.Tensor) -> torch.Tensor:
        return (x.float().div_(255) - mean) / std

    return data, data.train_dataloader(), normalize


def torchvision_loader(root: Path, args: argparse.Namespace):
    from torch.utils.data import DataLoader
    from torchvision.datasets import ImageFolder
    from torchvision.transforms import v2

    transform = v2.Compose(
        [
            v2.ToImage(),
            # the short side, bicubic as ours
            v2.Resize(args.size, interpolation=v2.InterpolationMode.BICUBIC, antialias=True),
            v2.CenterCrop(args.size),
            v2.RandomHorizontalFlip(),
            v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(MEAN, STD),
        ]
    )
    dataset = ImageFolder(str(root), transform=transform)
    return DataLoader(
        dataset,
        batch_size=args.batch,
        shuffle=True,
        drop_last=True,
        num_workers=args.workers,
        persistent_workers=args.workers > 0,
    )


def speed(args: argparse.Namespace) -> None:
    from dnn_tricks.data.streaming import write_chunks

    root = write_jpegs(args.dir / f"speed{args.images}", args.images, args.min_side, args.max_side)
    warm_page_cache(root)
    data, folder_loader, normalize = ours(root, args)
    chunks = args.dir / f"chunks{args.images}_{args.size}"
    if not (chunks / "dnn_tricks_chunks.json").exists():
        start = time.perf_counter()
        write_chunks(data, str(chunks), workers=args.workers)
        print(f"prepare-data wrote the chunks in {time.perf_counter() - start:.1f} s")
    _, streaming_loader, _ = ours(root, args, streaming_root=chunks)
    tv_loader = torchvision_loader(root, args)
    rows = [
        ("torchvision ImageFolder + transforms.v2", tv_loader, lambda x: x),
        ("dnn_tricks image_folder", folder_loader, normalize),
        ("dnn_tricks streaming (LitData chunks)", streaming_loader, normalize),
    ]
    print(
        f"{args.images} JPEGs {args.min_side}-{args.max_side} px -> {args.size}x{args.size}, "
        f"batch {args.batch}, {args.workers} workers, {args.epochs} timed epochs; "
        f"load average before: {load_average()}"
    )
    rates = {}
    for name, loader, norm in rows:
        rates[name] = rate(loader, norm, args.epochs)
    base, folder = rates[rows[0][0]], rates[rows[1][0]]
    print("| loader | images/s | vs torchvision | vs image_folder |")
    print("|---|---|---|---|")
    for name, value in rates.items():
        print(f"| {name} | {value:.0f} | {value / base:.2f}x | {value / folder:.2f}x |")
    print(f"load average after: {load_average()}")


# ----------------------------------------------------------------------------- memory


def _pss_kib(pid: int) -> int:
    """The process's own memory: its anonymous and shared-memory pages (batches travel
    from workers in shared memory), each split among the processes sharing it. File pages
    (torch's libraries) are left out: their PSS depends on how many OTHER processes on a
    shared machine map the same libraries."""
    try:
        rollup = Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()
    except OSError:
        return 0
    fields = dict(line.split(":", 1) for line in rollup[1:])
    return sum(int(fields.get(k, "0 kB").split()[0]) for k in ("Pss_Anon", "Pss_Shmem"))


def _tree(pid: int) -> list[int]:
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        try:
            children = Path(f"/proc/{current}/task/{current}/children").read_text().split()
        except OSError:
            children = []
        todo.extend(int(c) for c in children)
    return found


class _PeakPss:
    """Peak over time of the summed PSS of this process and its descendants (sampled)."""

    def __init__(self) -> None:
        self.peak_kib, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            total = sum(_pss_kib(p) for p in _tree(os.getpid()))
            self.peak_kib = max(self.peak_kib, total)
            time.sleep(0.05)

    def __enter__(self) -> _PeakPss:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def rss_child(root: Path, args: argparse.Namespace) -> None:
    """Run in a fresh process: index the folder, then one epoch of our loader; print the
    peaks of each phase as JSON."""
    start = time.perf_counter()
    with _PeakPss() as indexing:
        data, loader, normalize = ours(root, args)
    indexed = time.perf_counter() - start
    images = 0
    with _PeakPss() as epoch:
        for x, _ in loader:
            normalize(x)
            images += len(x)
    hwm = next(
        int(line.split()[1])
        for line in Path("/proc/self/status").read_text().splitlines()
        if line.startswith("VmHWM:")
    )
    result = {"index_pss_kib": indexing.peak_kib, "epoch_pss_kib": epoch.peak_kib}
    print(json.dumps({**result, "main_hwm_kib": hwm, "images": images, "index_s": indexed}))


def memory(args: argparse.Namespace) -> None:
    results = {}
    for count in args.rss_sizes:
        root = write_jpegs(args.dir / f"rss{count}", count, 24, 64)
        command = [sys.executable, __file__, "--rss-child", str(root)]
        command += ["--workers", str(args.workers), "--size", "32", "--batch", str(args.batch)]
        done = subprocess.run(command, capture_output=True, text=True, check=True)
        results[count] = json.loads(done.stdout.strip().splitlines()[-1])
    print(
        f"our image_folder: index the folder, then one epoch; {args.workers} workers, "
        f"batch {args.batch}, 32x32; anonymous + shared-memory PSS summed over the process "
        "and its workers"
    )
    print("| images | peak PSS, indexing | peak PSS, epoch | peak RSS, main process | indexing |")
    print("|---|---|---|---|---|")
    for count, r in results.items():
        print(
            f"| {count} | {r['index_pss_kib'] / 1024:.0f} MiB "
            f"| {r['epoch_pss_kib'] / 1024:.0f} MiB | {r['main_hwm_kib'] / 1024:.0f} MiB "
            f"| {r['index_s']:.1f} s |"
        )
    small, large = (results[c] for c in (min(results), max(results)))
    keys = ("index_pss_kib", "epoch_pss_kib", "main_hwm_kib")
    ratios = ", ".join(f"{k.rsplit('_', 1)[0]} {large[k] / small[k]:.3f}" for k in keys)
    print(f"ratio {max(results)} / {min(results)} images: {ratios} (target <= 1.10)")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=3000)
    parser.add_argument("--min-side", type=int, default=160)
    parser.add_argument("--max-side", type=int, default=480)
    parser.add_argument("--size", type=int, default=96)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--rss-sizes", type=int, nargs="+", default=[5000, 50000])
    parser.add_argument("--skip-rss", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    parser.add_argument("--dir", type=Path, default=Path("/tmp/dnn_tricks_image_loader"))
    parser.add_argument("--rss-child", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.rss_child is not None:
        rss_child(args.rss_child, args)
        return
    if not args.skip_speed:
        speed(args)
    if not args.skip_rss:
        memory(args)


if __name__ == "__main__":
    main()
