"""The study: its storage, the workers' shared trial budget, and each trial as a normal fit.

Several processes (on one machine with SQLite, on several with PostgreSQL) may run the same
study at once. Each takes the next trial under a lock that all workers share, counting the
trials already finished or running, so the study ends with exactly ``n_trials`` trials and no
two workers share a trial number (and so a sampler seed)."""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
import warnings
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import TrialState

from dnn_tricks.search.config import SearchConfig, override_args, representative, suggest

try:  # advisory file locks exist on POSIX only; elsewhere SQLite workers are not serialized
    import fcntl
except ImportError:  # pragma: no cover
    fcntl = None  # type: ignore[assignment]

# Budget = every trial that is or was used; a RUNNING trial whose worker died stops sending
# heartbeats and is failed after the grace period, so it cannot hold the budget forever.
BUDGET_STATES = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL, TrialState.RUNNING)
HEARTBEAT_S = 10
GRACE_S = 30


@contextmanager
def study_lock(url: str, study_name: str) -> Iterator[None]:
    """Mutual exclusion between the workers of one study: a file lock next to an SQLite
    file, a PostgreSQL advisory lock on a server; other databases run unlocked (a race may
    then add a trial or two beyond n_trials)."""
    if url.startswith("sqlite:///") and fcntl is not None:
        with open(url.removeprefix("sqlite:///") + ".lock", "a") as handle:
            fcntl.flock(handle, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(handle, fcntl.LOCK_UN)
    elif url.startswith("postgresql"):
        import sqlalchemy

        key = zlib.crc32(f"dnn_tricks.search:{study_name}".encode())
        engine = sqlalchemy.create_engine(url, poolclass=sqlalchemy.pool.NullPool)
        with engine.connect() as connection:
            connection.execute(sqlalchemy.text("SELECT pg_advisory_lock(:k)"), {"k": key})
            try:
                yield
            finally:
                connection.execute(sqlalchemy.text("SELECT pg_advisory_unlock(:k)"), {"k": key})
        engine.dispose()
    else:
        yield


def make_sampler(config: SearchConfig, trial_number: int) -> optuna.samplers.BaseSampler:
    """The sampler for one trial, seeded with seed + trial number (see SearchConfig.seed)."""
    seed = None if config.seed is None else config.seed + trial_number
    if config.sampler == "tpe":
        return optuna.samplers.TPESampler(seed=seed, n_startup_trials=config.tpe_startup_trials)
    # Random search by default: with a few important hyperparameters among many, it covers
    # each important one with as many distinct values as there are trials, where a grid
    # repeats values (Bergstra & Bengio 2012, "Random Search for Hyper-Parameter Optimization").
    return optuna.samplers.RandomSampler(seed=seed)


def make_pruner(config: SearchConfig) -> optuna.pruners.BasePruner:
    if config.pruner == "none":
        return optuna.pruners.NopPruner()
    return optuna.pruners.MedianPruner(
        n_startup_trials=config.prune_startup_trials, n_warmup_steps=config.prune_warmup_epochs
    )


def open_study(config: SearchConfig) -> tuple[optuna.Study, optuna.storages.RDBStorage]:
    """Create or load the study; under the lock, since workers starting together would
    otherwise race to create the same tables and study."""
    url = config.storage_url
    if url.startswith("sqlite:///"):
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    with study_lock(url, str(config.study_name)), warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        storage = optuna.storages.RDBStorage(
            url, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S
        )
        study = optuna.create_study(
            study_name=config.study_name,
            storage=storage,
            direction=config.direction,
            sampler=make_sampler(config, 0),
            pruner=make_pruner(config),
            load_if_exists=True,
        )
    if study.direction.name.lower() != config.direction:
        raise ValueError(
            f"search config: direction={config.direction!r} but study {config.study_name!r} "
            f"was created to {study.direction.name.lower()}; use another study_name"
        )
    return study, storage


def training_args(config: SearchConfig, values: dict[str, Any]) -> list[str]:
    """``TrainerCLI`` arguments of a fit with ``values``: base configs, fixed, sampled."""
    args = [arg for path in config.base for arg in ("--config", path)]
    return args + override_args(config.fixed) + override_args(values)


def trial_extra(config: SearchConfig, number: int) -> list[str]:
    """What makes a fit a trial: quiet, logging under the study's folder, time-limited."""
    args = [
        "--trainer.enable_progress_bar=false",
        "--trainer.enable_model_summary=false",
        f"--trainer.logger.init_args.save_dir={config.study_dir}",
        f"--trainer.logger.init_args.name=trial_{number}",
    ]
    if config.trial_timeout is not None:
        seconds = math.ceil(config.trial_timeout)
        days, rest = divmod(seconds, 86400)
        stamp = f"{days:02d}:{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"
        args.append(f"--trainer.max_time={stamp}")
    return args


def check_keys(config: SearchConfig) -> None:
    """Parse (without fitting) one trial's config with every key of the space, so a
    misspelt key stops the search at once instead of failing every trial."""
    from dnn_tricks.search.report import resolve_config

    values = {key: representative(p) for key, p in config.space.items()}
    resolve_config(config, values, trial_extra(config, 0))


class MetricMissing(ValueError):
    """The configured metric was never logged: a search config error, not a trial's."""


def read_metric(trainer: Any, metric: str) -> float:
    checkpoint = trainer.checkpoint_callback
    if (
        checkpoint is not None
        and getattr(checkpoint, "monitor", None) == metric
        and checkpoint.best_model_score is not None
    ):
        return float(checkpoint.best_model_score)
    if metric not in trainer.callback_metrics:
        logged = ", ".join(sorted(trainer.callback_metrics)) or "nothing"
        raise MetricMissing(f"search config: metric={metric!r} was not logged; logged: {logged}")
    return float(trainer.callback_metrics[metric])


def run_trial(config: SearchConfig, trial: optuna.Trial) -> float:
    """One trial: a normal fit of the sampled config, pruned from its per-epoch metric.

    Optuna-integration's Lightning callback imports ``lightning.pytorch`` and reports the
    metric after each validation epoch (skipping the sanity check), so it is used as is."""
    from optuna_integration import PyTorchLightningPruningCallback

    from dnn_tricks.app import TrainerCLI
    from dnn_tricks.search.report import best_config_args, resolve_config

    values = suggest(trial, config.space)
    # The config as this trial ran it, kept in the study: best_config.yaml stays exact even
    # if a base file changes later or the trial ran on another machine.
    trial.set_user_attr("config", resolve_config(config, values, best_config_args(config)))
    args = training_args(config, values) + trial_extra(config, trial.number)
    cli = TrainerCLI(args=args, run=False)
    if config.pruner != "none":
        cli.trainer.callbacks.append(PyTorchLightningPruningCallback(trial, config.metric))
    cli.trainer.fit(cli.model, datamodule=cli.datamodule)
    value = read_metric(cli.trainer, config.metric)
    if not math.isfinite(value):
        raise FloatingPointError(f"{config.metric} is {value}")
    best = getattr(cli.trainer.checkpoint_callback, "best_model_path", "")
    if best:
        trial.set_user_attr("checkpoint", str(Path(best).resolve()))
    return value


@contextmanager
def heartbeat(storage: optuna.storages.RDBStorage, trial: optuna.Trial) -> Iterator[None]:
    """Tell the other workers this trial is alive (see BUDGET_STATES)."""
    stop = threading.Event()

    def beat() -> None:
        while True:
            storage.record_heartbeat(trial._trial_id)  # Optuna exposes no public trial id
            if stop.wait(HEARTBEAT_S):
                return

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def next_trial(config: SearchConfig, study: optuna.Study) -> optuna.Trial | None:
    """Ask for a trial if the study's budget allows, atomically across workers."""
    with study_lock(config.storage_url, str(config.study_name)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            optuna.storages.fail_stale_trials(study)
        if len(study.get_trials(deepcopy=False, states=BUDGET_STATES)) >= config.n_trials:
            return None
        trial = study.ask()
    study.sampler = make_sampler(config, trial.number)  # params are sampled at suggest time
    return trial


def execute(config: SearchConfig, study: optuna.Study, storage: Any, trial: Any) -> None:
    """Run one trial and record it: COMPLETE, PRUNED, or FAIL with the error as user attr."""
    start = time.monotonic()
    value, note = None, ""
    trial.set_user_attr("worker", f"{socket.gethostname()}:{os.getpid()}")
    try:
        with heartbeat(storage, trial):
            value = run_trial(config, trial)
    except optuna.TrialPruned as pruned:
        state, note = TrialState.PRUNED, str(pruned)
    except MetricMissing:
        study.tell(trial, state=TrialState.FAIL)
        raise
    except Exception as error:  # a bad combination must not end the search
        state, note = TrialState.FAIL, f"{type(error).__name__}: {error}".splitlines()[0][:500]
        trial.set_user_attr("error", note)
    except BaseException:  # Ctrl-C: leave no RUNNING trial behind
        study.tell(trial, state=TrialState.FAIL)
        raise
    else:
        state = TrialState.COMPLETE
    study.tell(trial, value, state=state)
    shown = f" {config.metric}={value:.4f}" if value is not None else ""
    print(
        f"search: trial {trial.number} {state.name}{shown} in {time.monotonic() - start:.1f} s"
        f"{f' ({note})' if note else ''}",
        flush=True,
    )


def optimize(config: SearchConfig) -> optuna.Study:
    """Run trials in this process until the study holds n_trials or ``timeout`` passes."""
    study, storage = open_study(config)
    check_keys(config)
    start = time.monotonic()
    while config.timeout is None or time.monotonic() - start < config.timeout:
        trial = next_trial(config, study)
        if trial is None:
            break
        execute(config, study, storage, trial)
    return study


# Warnings that say nothing about the user's config: the search passes args while sys.argv
# holds "search"; the heartbeat is driven by this module, not by Study.optimize; the best
# trial's checkpoint is reloaded for testing from another folder on purpose.
_EXPECTED_WARNINGS = (
    "LightningCLI's args parameter is intended",
    "Heartbeat of storage is supposed to be used",
    "The dirpath has changed",
)


@contextmanager
def quiet() -> Iterator[None]:
    """Trials print one line each, not Lightning's per-fit banner and expected warnings."""
    loggers = [logging.getLogger(name) for name in ("lightning.pytorch", "lightning.fabric")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.WARNING)
    try:
        with warnings.catch_warnings():
            for message in _EXPECTED_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)
