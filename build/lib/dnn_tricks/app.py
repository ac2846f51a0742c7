"""The LightningCLI application: fit, validate, test and predict on a Classifier and a
DataModule, with the data's shape linked into the model, safe checkpoint loading and a test
of the best checkpoint after every fit. It knows no other subcommand (see ``cli.py``)."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import torch
from jsonargparse.typing import Path_fr
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.accelerators import CPUAccelerator
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.plugins.io import CheckpointIO
from lightning.pytorch.utilities import rank_zero_warn

from dnn_tricks.callbacks.hparams import HParamsConfig
from dnn_tricks.callbacks.predictions import PredictionWriter
from dnn_tricks.callbacks.rng_state import RNGState
from dnn_tricks.checkpoints import AtomicCheckpointIO, check_matches_model, read_checkpoint
from dnn_tricks.data.datamodule import DataModule
from dnn_tricks.models.classifier import Classifier


class TrainerCLI(LightningCLI):
    """LightningCLI with the data's input shape and class count linked into the model,
    a prediction CSV writer, safe checkpoint loading and a test of the best checkpoint
    after every fit."""

    def __init__(self, args: Any = None, run: bool = True) -> None:
        """``args`` as LightningCLI takes them (None reads sys.argv)."""
        super().__init__(
            Classifier,
            DataModule,
            seed_everything_default=0,
            parser_kwargs={"exit_on_error": False},
            auto_configure_optimizers=False,
            save_config_callback=HParamsConfig,  # config.yaml + the TensorBoard HParams row
            args=args,
            run=run,
        )

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.link_arguments("data.input_shape", "model.input_shape", apply_on="instantiate")
        parser.link_arguments("data.num_classes", "model.num_classes", apply_on="instantiate")
        parser.add_lightning_class_args(PredictionWriter, "predictions")

    def _prepare_subcommand_parser(
        self, klass: type, subcommand: str, **kwargs: Any
    ) -> LightningArgumentParser:
        parser = super()._prepare_subcommand_parser(klass, subcommand, **kwargs)
        # Checkpoints hold tensors and plain values only: never unpickle code from them.
        parser.set_defaults(weights_only=True)
        # Every subcommand accepts it (only fit acts on it) so a run's saved config.yaml
        # can be passed to validate/test/predict as it is.
        parser.add_argument(
            "--test_after_fit",
            type=bool,
            default=True,
            help="fit only: then evaluate the best checkpoint (not the last) on the test split.",
        )
        return parser

    def setup_parser(
        self, add_subcommands: bool, main_kwargs: dict[str, Any], subparser_kwargs: dict[str, Any]
    ) -> None:
        super().setup_parser(add_subcommands, main_kwargs, subparser_kwargs)
        if not add_subcommands:
            # Built without a subcommand (export, lr-find, preview-augment, prepare-data read
            # a config this way): a run's saved config.yaml also holds the fit subcommand's
            # own keys; they are accepted and ignored.
            self.parser.add_argument("--ckpt_path", type=str | None, default=None)
            self.parser.add_argument("--weights_only", type=bool | None, default=None)
            self.parser.add_argument("--test_after_fit", type=bool, default=True)

    def parse_arguments(self, parser: LightningArgumentParser, args: Any) -> None:
        self._experiment = _first_config(sys.argv[1:] if args is None else args)
        super().parse_arguments(parser, args)

    def before_instantiate_classes(self) -> None:
        # A pipeline path written relative to its config file is saved as an absolute path,
        # so the run's config.yaml works from its own folder too.
        config = self.config[self.subcommand] if self.subcommand else self.config
        augment = config.get("data", {}).get("augment")
        if isinstance(augment, Path_fr):
            config["data"]["augment"] = Path_fr(augment.absolute)
        _name_run_after_experiment(config, self._experiment)

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        # Always on: RNG state in checkpoints (exact resume) and atomic checkpoint writes.
        callbacks = [*callbacks, RNGState()]
        plugins = config.get("plugins") or []
        plugins = list(plugins) if isinstance(plugins, (list, tuple)) else [plugins]
        if not any(isinstance(p, CheckpointIO) for p in plugins):
            plugins.append(AtomicCheckpointIO())
        return super()._instantiate_trainer({**config, "plugins": plugins}, callbacks)

    def _latest_last_checkpoint(self) -> str | None:
        """``--ckpt_path last``: the newest last.ckpt among this config's earlier runs (each
        run has its own version folder, which Lightning's own "last" lookup does not search)."""
        logger = self.trainer.logger
        root = Path(getattr(logger, "root_dir", "") or self.trainer.default_root_dir)
        found = sorted(
            root.glob("version_*/checkpoints/last.ckpt"), key=lambda p: p.stat().st_mtime
        )
        return str(found[-1]) if found else None

    def _parse_ckpt_path(self) -> None:
        """Read the checkpoint safely and early, but keep the config as given.

        LightningCLI would overwrite the model part of the config with the checkpoint's
        hyperparameters; here the config you pass is the config that runs, and a checkpoint
        that does not fit it is reported (see _check_checkpoint) instead of silently winning.
        """
        subcommand = self.config.get("subcommand")
        path = self.config[subcommand].get("ckpt_path") if subcommand else None
        if path and str(path) not in ("last", "best", "hpc", "registry"):
            read_checkpoint(path)

    def _check_checkpoint(self, subcommand: str) -> None:
        """Resolve ``last`` and reject unreadable or mismatched checkpoints up front."""
        config = self.config_init[subcommand]
        path = config.get("ckpt_path")
        if path == "last":
            path = self._latest_last_checkpoint()
            if path is None:
                rank_zero_warn("--ckpt_path last: no earlier run has a last.ckpt; starting fresh")
            config["ckpt_path"] = path
        if path and str(path) not in ("best", "hpc", "registry"):
            check_matches_model(read_checkpoint(path), self.model, str(path))

    def before_fit(self) -> None:
        self._check_checkpoint("fit")
        warn_if_bf16_is_emulated(self.trainer)

    def before_validate(self) -> None:
        self._check_checkpoint("validate")

    def before_test(self) -> None:
        self._check_checkpoint("test")

    def before_predict(self) -> None:
        self._check_checkpoint("predict")

    def after_fit(self) -> None:
        if not self.config.fit.get("test_after_fit", True) or self.trainer.interrupted:
            return
        checkpoint = self.trainer.checkpoint_callback
        best = getattr(checkpoint, "best_model_path", "") if checkpoint else ""
        self.trainer.test(
            self.model, datamodule=self.datamodule, ckpt_path=best or None, weights_only=True
        )


def cpu_has_bf16() -> bool:
    """Whether this CPU computes in bfloat16 natively (AVX-512 BF16 or AMX); torch's probes
    are private, so a torch without them counts as yes (no warning rather than a false one)."""
    probes = [
        getattr(torch.cpu, name, None)
        for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    ]
    probes = [probe for probe in probes if probe is not None]
    return not probes or any(probe() for probe in probes)


def warn_if_bf16_is_emulated(trainer: Trainer) -> None:
    """bf16 autocast on a CPU without bf16 arithmetic is emulated, many times slower than
    float32 (README, "Speedruns on the 2-core CPU"), where the same config on a CPU with it
    runs faster: say so once, before the fit, instead of leaving a silently slow run."""
    if "bf16" in str(trainer.precision) and isinstance(trainer.accelerator, CPUAccelerator):
        if not cpu_has_bf16():
            rank_zero_warn(
                f"trainer.precision={trainer.precision} on a CPU without AVX-512 BF16 or AMX: "
                "bfloat16 is emulated here, several times slower than --trainer.precision=32-true"
            )


def run_app(args: list[str]) -> None:
    """Run a LightningCLI subcommand (fit, validate, test, predict) with these arguments."""
    import sys

    sys.argv = [sys.argv[0], *args]  # LightningCLI reads sys.argv
    TrainerCLI()


def _first_config(args: Any) -> str | None:
    """The first ``--config`` file of a command line: the experiment (later ones are presets)."""
    args = list(args) if isinstance(args, (list, tuple)) else []
    for i, arg in enumerate(args):
        if arg == "--config" and i + 1 < len(args):
            return str(args[i + 1])
        if str(arg).startswith("--config="):
            return str(arg).split("=", 1)[1]
    return None


def _name_run_after_experiment(config: Any, experiment: str | None) -> None:
    """A logger without a ``name`` gets the experiment file's name, so runs land in
    logs/<experiment>/version_N without the name copied by hand into each config file."""
    logger = config.get("trainer", {}).get("logger")
    init_args = getattr(logger, "init_args", None)
    if init_args is None or experiment is None:
        return
    if init_args.get("name") in (None, "lightning_logs"):
        init_args["name"] = Path(experiment).stem
