"""What `trainer fit` costs over a plain PyTorch loop, and what each trick costs.

1. Overhead: the config's network, DataModule batches (same loader, same on-device
   normalization), optimizer, schedule and number of steps, trained (a) by a hand-written
   loop (forward, loss, backward, step, schedule, accuracy count; then a validation pass),
   (b) by Lightning through TrainerCLI as `trainer fit` builds it (logger, checkpoints,
   early stopping, LR monitor, torchmetrics; the project's diagnostic callbacks are left
   out here and timed in 2.), (c) by Lightning bare (no logger, checkpoints or
   callbacks) and (d) by a bare Trainer on a minimal LightningModule (the same model, loss
   and optimizer, nothing else): (d) - (a) is Lightning's own per-step floor, (c) - (d) what
   the project's training step adds, (b) - (c) what logging and checkpoints add. Runs
   rotate; one-time startup (parsing, data load and split, normalizer fit) is timed apart
   and the first epoch (warm-up) dropped; seconds per epoch are the median of the rest.
2. Tricks: `trainer fit` with one switch changed at a time (input normalization kind, hidden
   normalization kind, dropout, augmentation, each project callback with the config's
   arguments or its defaults, all of the config's callbacks), each against the base (b)
   run right next to it.

Whether the loader keeps ahead of the model: benchmarks/loader_throughput.py.

    .venv/bin/python benchmarks/overhead.py [--config configs/fashion_mnist.yaml]
        [--steps 60] [--epochs 3 (digits: 30)] [--repeats 3] [--threads 1] [--skip-tricks]
        [--clock cpu] [--profile] [--resident] [--heap]

Measured ratios are in the README ("Per-step overhead"); load on the machine moves wall-clock
ratios by more than the 5% being measured, so compare runs at a load below the core count or
with --clock cpu.
"""

from __future__ import annotations

import argparse
import importlib
import inspect
import json
import math
import os
import pkgutil
import re
import statistics
import tempfile
import time
import warnings
from collections import defaultdict
from pathlib import Path

os.environ.setdefault("NO_ALBUMENTATIONS_UPDATE", "1")
# this script passes LightningCLI its own arguments; its warning about sys.argv is noise here
warnings.filterwarnings("ignore", message=".*LightningCLI's args parameter")

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from lightning.pytorch import Callback, LightningModule, Trainer  # noqa: E402
from lightning.pytorch.callbacks import BasePredictionWriter  # noqa: E402
from lightning.pytorch.profilers import Profiler  # noqa: E402
from torch import nn  # noqa: E402

from dnn_tricks.app import TrainerCLI  # noqa: E402
from dnn_tricks.callbacks.allocator import HeapAllocator, keep_freed_memory  # noqa: E402
from dnn_tricks.callbacks.lr_monitor import LearningRateMonitor  # noqa: E402
from dnn_tricks.data.step_groups import ungrouped_reason  # noqa: E402
from dnn_tricks.models.backbones import optimizer_groups  # noqa: E402
from dnn_tricks.schedules import build_scheduler  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TARGET_RATIO = 1.05
# Small models pay Lightning's fixed per-step work on ~1 ms steps: a looser target there.
TARGETS = {"digits.yaml": 1.5}
# Timed epochs per run where a few would not stand for the fit: a digits epoch is ~25 ms,
# and its early epochs each rewrite the best checkpoint (~2.5 ms) that later ones rarely
# touch; its whole 30-epoch fit takes about a second.
EPOCHS = {"digits.yaml": 30}
# the project's versions of Lightning's own callbacks: timed with those, not as tricks
LIGHTNING_ROLES = {f"{LearningRateMonitor.__module__}.{LearningRateMonitor.__name__}"}
HEAP_ALLOCATOR = f"{HeapAllocator.__module__}.{HeapAllocator.__name__}"
# wall: elapsed time, what a user waits. cpu: this process's CPU seconds (all its threads,
# not loader worker processes), which other jobs on a loaded machine disturb far less.
CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
clock = CLOCKS["wall"]  # set by --clock

# ----------------------------------------------------------------------------- setup


def config_callbacks(config: Path) -> tuple[list[dict], list[dict]]:
    """The config's callbacks split into Lightning's own (checkpoints, early stopping, LR
    monitor) and the project's diagnostics, which the tricks table times one by one."""
    with tempfile.TemporaryDirectory() as log_dir:  # as parsed: configs compose their groups
        args = ["--config", str(config), f"--trainer.logger.init_args.save_dir={log_dir}"]
        cli = TrainerCLI(args=args, run=False)
    listed = [entry.as_dict() for entry in cli.config["trainer"]["callbacks"] or []]
    ours = [
        c
        for c in listed
        if c["class_path"].startswith("dnn_tricks.") and c["class_path"] not in LIGHTNING_ROLES
    ]
    return [c for c in listed if c not in ours], ours


def build_cli(
    args: argparse.Namespace, log_dir: str, *extra: str, callbacks: list[dict] | None = None
) -> TrainerCLI:
    """The config as `trainer fit` builds it, shortened to ``args.steps`` steps per epoch,
    with ``callbacks`` (default: the config's Lightning callbacks only)."""
    if callbacks is None:
        callbacks = config_callbacks(args.config)[0]
    return TrainerCLI(
        args=[
            "--config",
            str(args.config),
            f"--trainer.callbacks={json.dumps(callbacks)}",
            f"--trainer.max_epochs={args.epochs}",
            # a config that groups K steps per loader batch (data.steps_per_batch) takes as
            # many optimizer steps per epoch as the ungrouped arms
            f"--trainer.limit_train_batches={math.ceil(args.steps / args.group)}",
            f"--trainer.limit_val_batches={args.val_steps}",
            "--trainer.num_sanity_val_steps=0",
            "--trainer.enable_progress_bar=false",
            "--trainer.enable_model_summary=false",
            f"--trainer.logger.init_args.save_dir={log_dir}",
            f"--trainer.default_root_dir={log_dir}",
            *extra,
        ],
        run=False,
    )


def steps_per_epoch(args: argparse.Namespace) -> int:
    """Optimizer steps in one of this benchmark's epochs: --steps (rounded up to whole groups
    of data.steps_per_batch), or fewer on small data."""
    with tempfile.TemporaryDirectory() as log_dir:
        data = build_cli(args, log_dir).datamodule
    data.setup("fit")
    groups = min(math.ceil(args.steps / args.group), len(data.train_dataloader()))
    return data.optimizer_steps(groups)


# the plain loop and the minimal module step through the same batches one at a time
UNGROUPED = "--data.steps_per_batch=1"


class EpochClock(Callback):
    """The clock at each training-epoch start and at the end of training."""

    def __init__(self) -> None:
        self.marks: list[float] = []

    def on_train_epoch_start(self, trainer, pl_module) -> None:
        self.marks.append(clock())

    def on_train_end(self, trainer, pl_module) -> None:
        self.marks.append(clock())


def summarize(start: float, marks: list[float]) -> tuple[float, list[float]]:
    """(startup seconds, per-epoch seconds without the warm-up epoch)."""
    epochs = [b - a for a, b in zip(marks, marks[1:], strict=False)]
    return marks[0] - start, epochs[1:]


# ----------------------------------------------------------------------------- the two loops


def run_trainer(
    args: argparse.Namespace, *extra: str, callbacks: list[dict] | None = None
) -> tuple[float, list[float]]:
    start = clock()
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args, log_dir, *extra, callbacks=callbacks)
        if args.group > 1 and ungrouped_reason(cli.trainer) is not None:
            cli.trainer.limit_train_batches = args.steps  # the fit runs ungrouped: steps
        epochs = EpochClock()
        cli.trainer.callbacks.append(epochs)
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    return summarize(start, epochs.marks)


def run_plain(args: argparse.Namespace, *extra: str) -> tuple[float, list[float]]:
    """The same network, batches, optimizer and schedule in a loop written by hand."""
    steps = steps_per_epoch(args)
    start = clock()
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args, log_dir, *extra, UNGROUPED)
    data, model = cli.datamodule, cli.model
    data.setup("fit")
    model.adapt_layers(lambda: data.raw_batches("train"))  # the fitted input normalization
    hp = model.hparams
    optimizer = model.optimizer_factory(optimizer_groups(model.net, hp.decay_norm_and_bias))
    per_step = hp.scheduler_interval == "step"
    total = args.epochs * steps if per_step else args.epochs
    schedule = None  # a config without a schedule keeps its rate
    if model.scheduler_factory is not None:
        schedule = build_scheduler(model.scheduler_factory, optimizer, total)
    train, val = data.train_dataloader(), data.val_dataloader()
    marks = []
    for _ in range(args.epochs):
        marks.append(clock())
        model.train()
        correct = torch.zeros((), dtype=torch.long)
        for step, (x, y) in enumerate(train):
            if step == steps:
                break
            logits = model(data.to_float(x))  # raw inputs -> normalizer -> net
            loss = F.cross_entropy(logits, y, label_smoothing=hp.label_smoothing)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if per_step and schedule is not None:
                schedule.step()
            correct += (logits.argmax(1) == y).sum()
        if not per_step and schedule is not None:
            schedule.step()
        model.eval()
        with torch.no_grad():
            for step, (x, y) in enumerate(val):
                if step == args.val_steps:
                    break
                correct += (model(data.to_float(x)).argmax(1) == y).sum()
    marks.append(clock())
    return summarize(start, marks)


class MinimalModule(LightningModule):
    """The least a LightningModule can be: the config's fitted model, cross-entropy, and an
    accuracy count in validation, with the config's optimizer and schedule. Run by a bare
    Trainer it is Lightning's own per-step floor; the gap to the bare Classifier is what the
    project's training step adds."""

    def __init__(self, model: nn.Module, steps: int, epochs: int) -> None:
        super().__init__()
        self.model, self.steps, self.epochs = model, steps, epochs
        self.correct = torch.zeros((), dtype=torch.long)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        logits = self.model(x)
        self.correct += (logits.detach().argmax(1) == y).sum()
        return F.cross_entropy(logits, y, label_smoothing=self.model.hparams.label_smoothing)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int):
        x, y = batch
        self.correct += (self.model(x).argmax(1) == y).sum()

    def configure_optimizers(self):
        hp = self.model.hparams
        optimizer = self.model.optimizer_factory(
            optimizer_groups(self.model.net, hp.decay_norm_and_bias)
        )
        per_step = hp.scheduler_interval == "step"
        total = self.epochs * self.steps if per_step else self.epochs
        if self.model.scheduler_factory is None:
            return optimizer
        schedule = build_scheduler(self.model.scheduler_factory, optimizer, total)
        schedule_config = {"scheduler": schedule, "interval": "step" if per_step else "epoch"}
        return {"optimizer": optimizer, "lr_scheduler": schedule_config}


def run_minimal(args: argparse.Namespace) -> tuple[float, list[float]]:
    """MinimalModule under a bare Trainer (no logger, checkpoints, callbacks or progress bar)
    on the config's DataModule."""
    steps = steps_per_epoch(args)
    start = clock()
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args, log_dir, UNGROUPED)
        data, model = cli.datamodule, cli.model
        data.setup("fit")
        model.adapt_layers(lambda: data.raw_batches("train"))
        epochs = EpochClock()
        trainer = Trainer(
            accelerator="cpu",
            max_epochs=args.epochs,
            limit_train_batches=steps,
            limit_val_batches=args.val_steps,
            num_sanity_val_steps=0,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[epochs],
            default_root_dir=log_dir,
        )
        module = MinimalModule(model, steps, args.epochs)
        trainer.fit(module, datamodule=data)
    return summarize(start, epochs.marks)


# ----------------------------------------------------------------------------- per hook


class HookClock(Profiler):
    """Lightning's profiler interface timing every hook with this benchmark's clock (the
    SimpleProfiler reads the wall clock, which a loaded machine makes noise of)."""

    def __init__(self) -> None:
        super().__init__()
        self.open: dict[str, float] = {}
        self.spent: dict[str, list[float]] = defaultdict(list)

    def start(self, action_name: str) -> None:
        self.open[action_name] = clock()

    def stop(self, action_name: str) -> None:
        begun = self.open.pop(action_name, None)
        if begun is not None:
            self.spent[action_name].append(clock() - begun)


def profile_hooks(args: argparse.Namespace, rows: int = 25) -> None:
    """Per-hook time of one `trainer fit` run (the "trainer fit" arm), heaviest first, in ms
    per optimizer step, next to the plain loop's ms per step."""
    hooks = HookClock()
    with tempfile.TemporaryDirectory() as log_dir:
        cli = build_cli(args, log_dir)
        cli.trainer.profiler = hooks
        cli.trainer.fit(cli.model, datamodule=cli.datamodule)
        steps = cli.trainer.global_step
    _, plain = run_plain(args)
    per_step = statistics.median(plain) / steps_per_epoch(args)
    print(f"\nper hook, {steps} steps of trainer fit ({args.clock} clock; the whole run)")
    print(f"{'hook':64} {'calls':>6} {'ms':>8} {'ms/step':>8}")
    totals = sorted(((sum(t), len(t), name) for name, t in hooks.spent.items()), reverse=True)
    for total, calls, name in totals[:rows]:
        name = re.sub(r"\{.*\}", "", name)  # ModelCheckpoint{...}: its arguments
        print(f"{name[:64]:64} {calls:6d} {1e3 * total:8.1f} {1e3 * total / steps:8.3f}")
    label = "plain loop, one whole step (loader to schedule)"
    print(f"{label:64} {'':6} {'':8} {1e3 * per_step:8.3f}")


# ----------------------------------------------------------------------------- tricks


def project_callbacks() -> list[str]:
    """Class paths of the callbacks in dnn_tricks.callbacks that run with default arguments
    (prediction writers excluded: they act in `predict` only)."""
    import dnn_tricks.callbacks as package

    found = []
    for info in pkgutil.iter_modules(package.__path__):
        module = importlib.import_module(f"{package.__name__}.{info.name}")
        for _, cls in inspect.getmembers(module, inspect.isclass):
            if cls.__module__ != module.__name__ or not issubclass(cls, Callback):
                continue
            if (
                issubclass(cls, BasePredictionWriter)
                or f"{module.__name__}.{cls.__name__}" in LIGHTNING_ROLES
            ):
                continue
            required = [
                p
                for p in inspect.signature(cls).parameters.values()
                if p.default is p.empty and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)
            ]
            if not required:
                found.append(f"{cls.__module__}.{cls.__name__}")
    return sorted(found)


Variant = tuple[list[str], list[dict] | None]  # (overrides, callbacks or None for the base)


def trick_variants(config: Path, always_on: set[str]) -> dict[str, Variant]:
    """Row label -> one switch changed. Callbacks come with the config's arguments where the
    config lists them, else with their defaults; ``always_on`` (added by the CLI) are skipped."""
    net = "--model.net.init_args"
    variants: dict[str, Variant] = {
        "input norm: none": (["--model.input_norm.kind=none"], None),
        "input norm: zca_whiten": (["--model.input_norm.kind=zca_whiten"], None),
        "hidden norm: none": ([f"{net}.norm=none"], None),
        "hidden norm: layer": ([f"{net}.norm=layer"], None),
        "hidden norm: group (8)": ([f"{net}.norm=group", f"{net}.num_groups=8"], None),
        "hidden norm: iter (IterNorm)": ([f"{net}.norm=iter", f"{net}.num_groups=8"], None),
        "dropout: off": ([f"{net}.dropout=0"], None),
    }
    if "ConvNet" in config.read_text() or "ResNet" in config.read_text():
        medium = ROOT / "configs" / "augment" / "medium.yaml"
        variants["augment: medium (auto workers)"] = ([f"--data.augment={medium}"], None)
    lightning, configured = config_callbacks(config)
    entries = {c["class_path"]: c for c in configured}
    for path in project_callbacks():
        entries.setdefault(path, {"class_path": path})
    for path, entry in entries.items():
        name = path.rsplit(".", 1)[1]
        if name not in always_on:
            variants[f"callback: {name}"] = ([], [*lightning, entry])
    if configured:
        variants["all callbacks of the config"] = ([], [*lightning, *configured])
    return variants


# ----------------------------------------------------------------------------- main


# Lightning alone: no logger, checkpoints or callbacks; separates per-epoch work (saving
# checkpoints, writing events) from what every step costs.
BARE = ["--trainer.logger=false", "--trainer.enable_checkpointing=false"]
ARMS = {
    "plain loop": lambda args: run_plain(args),
    "trainer fit": lambda args: run_trainer(args),
    "trainer, bare": lambda args: run_trainer(args, *BARE, callbacks=[]),
    # Lightning's floor: a minimal LightningModule, bare Trainer (see MinimalModule)
    "minimal module": run_minimal,
}
# --resident: both loops again with the splits held on the device (data.device_resident)
RESIDENT = "--data.device_resident=true"
RESIDENT_ARMS = {
    "plain, resident": lambda args: run_plain(args, RESIDENT),
    "fit, resident": lambda args: run_trainer(args, RESIDENT),
}


def compare_loops(args: argparse.Namespace) -> None:
    arms = {**ARMS, **(RESIDENT_ARMS if args.resident else {})}
    startups: dict[str, list[float]] = {arm: [] for arm in arms}
    epochs: dict[str, list[float]] = {arm: [] for arm in arms}
    names = list(arms)
    for repeat in range(args.repeats):
        turn = repeat % len(names)
        for arm in names[turn:] + names[:turn]:  # rotate who goes first
            startup, times = arms[arm](args)
            startups[arm].append(startup)
            epochs[arm].extend(times)
    plain = statistics.median(epochs["plain loop"])
    steps = steps_per_epoch(args)
    header = f"{'startup s':>9} {'s/epoch':>8} {'min s/epoch':>11} {'x plain':>8} {'ms/step':>8}"
    print(f"\n{'':16} {header}")
    for arm in names:
        seconds = statistics.median(epochs[arm])
        extra_ms = 1e3 * (seconds - plain) / steps
        print(
            f"{arm:16} {statistics.median(startups[arm]):9.2f} {seconds:8.3f} "
            f"{min(epochs[arm]):11.3f} {seconds / plain:8.3f} {extra_ms:+8.2f}"
        )
    ratio = statistics.median(epochs["trainer fit"]) / plain
    target = args.target or TARGETS.get(args.config.name, TARGET_RATIO)
    verdict = "meets" if ratio <= target else "misses"
    print(f"trainer fit / plain loop = {ratio:.3f}: {verdict} the target <= {target}")
    if args.resident:
        median = {arm: statistics.median(times) for arm, times in epochs.items()}
        fit, res_fit, res_plain = (
            median[a] for a in ("trainer fit", "fit, resident", "plain, resident")
        )
        print(
            f"device-resident data: trainer fit takes {res_fit / fit:.3f}x the loader path's time, "
            f"the plain loop {res_plain / plain:.3f}x; fit / plain, both resident: "
            f"{res_fit / res_plain:.3f}"
        )


def compare_tricks(args: argparse.Namespace) -> None:
    """Each switch against the base config run right next to it (order alternating), so
    load that drifts over minutes hits both runs of a pair alike."""
    trick_args = argparse.Namespace(**{**vars(args), "epochs": args.trick_epochs})
    with tempfile.TemporaryDirectory() as log_dir:
        always_on = {type(c).__name__ for c in build_cli(trick_args, log_dir).trainer.callbacks}
    print(
        f"\ntricks: trainer fit with one switch changed, each paired with the base config "
        f"(its Lightning callbacks only; {args.trick_epochs - 1} timed epoch(s) of "
        f"{args.steps} steps per run)"
    )
    print(f"{'change':36} {'s/epoch':>8} {'base':>8} {'x base':>7} {'+s/epoch':>9}")
    for index, (label, (extra, callbacks)) in enumerate(
        trick_variants(args.config, always_on).items()
    ):
        base_run, trick_run = ((), None), (extra, callbacks)
        order = [trick_run, base_run] if index % 2 else [base_run, trick_run]
        try:
            measured = [
                statistics.median(run_trainer(trick_args, *o, callbacks=c)[1]) for o, c in order
            ]
        except Exception as error:  # one broken switch should not hide the others
            print(f"{label:36} failed: {str(error).splitlines()[0][:60]}")
            continue
        seconds, reference = measured if index % 2 else measured[::-1]
        print(
            f"{label:36} {seconds:8.3f} {reference:8.3f} {seconds / reference:7.2f} "
            f"{seconds - reference:+9.3f}"
        )
    print(
        "(callbacks cost per epoch or every n steps, not per step: with full epochs their "
        "ratio is smaller; +s/epoch is what they add to these short ones)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "fashion_mnist.yaml")
    parser.add_argument("--steps", type=int, default=60, help="train steps per epoch")
    parser.add_argument("--val-steps", type=int, default=3, help="validation batches per epoch")
    parser.add_argument(
        "--epochs", type=int, help="per run; the first is warm-up (default 3; digits: 30)"
    )
    parser.add_argument("--repeats", type=int, default=3, help="rotating runs of each loop")
    parser.add_argument("--trick-epochs", type=int, default=2, help="per trick run")
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads")
    parser.add_argument("--skip-tricks", action="store_true")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall")
    parser.add_argument("--profile", action="store_true", help="also a per-hook table")
    parser.add_argument("--target", type=float, help="ratio to meet (default per config)")
    parser.add_argument("--resident", action="store_true", help="also data.device_resident")
    parser.add_argument(
        "--heap",
        action="store_true",
        help="large blocks from the heap for every arm (HeapAllocator's setting; on by itself "
        "when the config lists the HeapAllocator): takes the page-fault noise of CPU "
        "convolutions out of the comparison",
    )
    args = parser.parse_args()
    args.epochs = args.epochs or EPOCHS.get(args.config.name, 3)
    if min(args.epochs, args.trick_epochs) < 2:
        parser.error("--epochs and --trick-epochs must be >= 2 (the first epoch is warm-up)")
    if min(args.steps, args.val_steps) < 2:
        parser.error("--steps and --val-steps must be >= 2 (Lightning reads 1 as 100%)")
    torch.set_num_threads(args.threads)
    args.group = 1
    with tempfile.TemporaryDirectory() as log_dir:
        args.group = build_cli(args, log_dir).datamodule.steps_per_batch
    # a config with the HeapAllocator runs `trainer fit` so: every arm then runs the same way
    listed = config_callbacks(args.config)[1]
    args.heap = args.heap or any(c["class_path"] == HEAP_ALLOCATOR for c in listed)
    if args.heap and not keep_freed_memory():
        parser.error("--heap: malloc is not glibc's here")
    global clock
    clock = CLOCKS[args.clock]
    print(
        f"{args.config.name}: {args.steps} steps + {args.val_steps} val batches per epoch, "
        f"{args.epochs} epochs x {args.repeats} rotating runs, {args.threads} thread(s), "
        f"load average {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores, {args.clock} clock"
        + (", large blocks from the heap" if args.heap else "")
    )
    compare_loops(args)
    if args.profile:
        profile_hooks(args)
    if not args.skip_tricks:
        compare_tricks(args)


if __name__ == "__main__":
    main()
