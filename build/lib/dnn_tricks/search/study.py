"""The search study: Optuna's ``study.optimize`` running each trial as a normal fit.

Several workers (processes on one machine with SQLite, machines with PostgreSQL) may run the
same study at once. The storage numbers trials 0, 1, 2, ... under a row lock, so no two
workers share a number (and so a sampler seed). ``MaxTrialsCallback`` stops a worker once
the study holds ``n_trials`` trials; when two workers pass that check at the same instant,
the one that drew a number >= n_trials does not train (its trial is pruned with a note), so
exactly ``n_trials`` fits run. A dead worker's trial is failed by Optuna's heartbeat."""

from __future__ import annotations

import math
import time
from pathlib import Path

import optuna
from optuna.study import MaxTrialsCallback
from optuna.trial import FrozenTrial

from dnn_tricks.redact import redact
from dnn_tricks.search.config import SearchConfig, sample_point, suggest
from dnn_tricks.search.fit import (
    MetricMissing,
    fit,
    quiet,
    read_metric,
    resolve_config,
    run_args,
    training_args,
)
from dnn_tricks.search.storage import open_storage, worker_id

OVER_BUDGET = "not run: other workers had taken the study's n_trials"


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


def _stale(study: optuna.Study, trial: FrozenTrial) -> None:
    print(f"search: trial {trial.number} lost its worker (no heartbeat); marked FAIL", flush=True)


def open_study(config: SearchConfig) -> optuna.Study:
    """Create or load the study (racing workers load the one that won)."""
    study = optuna.create_study(
        study_name=config.study_name,
        storage=open_storage(config.storage_url, _stale),
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
    return study


def best_config_args(config: SearchConfig) -> list[str]:
    """Where a fresh ``trainer fit`` of a trial's config logs: logs/<study>_best."""
    return [
        "--trainer.logger.init_args.save_dir=logs",
        f"--trainer.logger.init_args.name={config.study_name}_best",
    ]


def check_keys(config: SearchConfig) -> None:
    """Parse (without fitting) a trial's config at one point of the space, so a misspelt
    key stops the search at once instead of failing every trial."""
    args = training_args(config.base, config.fixed, sample_point(config.space))
    resolve_config(args + run_args(str(config.study_dir), "trial_0"))


def run_trial(config: SearchConfig, trial: optuna.Trial) -> float:
    """One trial: a normal fit of the sampled config, pruned from its per-epoch metric.

    Optuna-integration's Lightning callback reports the metric after each validation epoch
    (skipping the sanity check) and raises TrialPruned, so it is used as is."""
    from optuna_integration import PyTorchLightningPruningCallback

    values = suggest(trial, config.space)
    args = training_args(config.base, config.fixed, values)
    # The config as this trial ran it, kept in the study: best_config.yaml stays exact even
    # if a base file changes later or the trial ran on another machine.
    trial.set_user_attr("config", resolve_config(args + best_config_args(config)))
    callbacks = []
    if config.pruner != "none":
        callbacks.append(PyTorchLightningPruningCallback(trial, config.metric))
    extra = run_args(str(config.study_dir), f"trial_{trial.number}", config.trial_timeout)
    result = fit(args + extra, callbacks)
    value = read_metric(result.metrics, config.metric, "search config")
    if not math.isfinite(value):
        raise FloatingPointError(f"{config.metric} is {value}")
    if result.checkpoint:
        trial.set_user_attr("checkpoint", str(Path(result.checkpoint).resolve()))
    return value


class _Objective:
    """What ``study.optimize`` calls per trial; a failure is recorded with its error (the
    search goes on), except an unlogged metric, which stops the search."""

    def __init__(self, config: SearchConfig, study: optuna.Study) -> None:
        self.config, self.study = config, study
        self.stop_error: MetricMissing | None = None
        self.started: dict[int, float] = {}

    def __call__(self, trial: optuna.Trial) -> float:
        if trial.number >= self.config.n_trials:
            self.study.stop()
            trial.set_user_attr("note", OVER_BUDGET)
            raise optuna.TrialPruned(OVER_BUDGET)
        trial.set_user_attr("worker", worker_id())
        self.started[trial.number] = time.monotonic()
        # Params are drawn at suggest time, so trial n samples with seed + n however many
        # workers run and in which order.
        self.study.sampler = make_sampler(self.config, trial.number)
        try:
            return run_trial(self.config, trial)
        except optuna.TrialPruned:
            raise
        except MetricMissing as error:
            self.stop_error = error
            self.study.stop()
            raise
        except Exception as error:
            note = redact(f"{type(error).__name__}: {error}".splitlines()[0])[:500]
            trial.set_user_attr("error", note)  # -> the trials table: no storage password
            raise

    def announce(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """One line per trial (an Optuna callback)."""
        value = f" {self.config.metric}={trial.value:.4f}" if trial.value is not None else ""
        note = trial.user_attrs.get("error") or trial.user_attrs.get("note", "")
        seconds = time.monotonic() - self.started.pop(trial.number, time.monotonic())
        print(
            f"search: trial {trial.number} {trial.state.name}{value} in {seconds:.1f} s"
            f"{f' ({note})' if note else ''}",
            flush=True,
        )


def optimize(config: SearchConfig) -> optuna.Study:
    """Run trials in this process until the study holds n_trials or ``timeout`` passes."""
    study = open_study(config)
    check_keys(config)
    if len(study.get_trials(deepcopy=False)) >= config.n_trials:
        return study  # MaxTrialsCallback only looks after a trial; this looks before the first
    objective = _Objective(config, study)
    study.optimize(
        objective,
        timeout=config.timeout,
        catch=(Exception,),
        callbacks=[MaxTrialsCallback(config.n_trials, states=None), objective.announce],
    )
    if objective.stop_error is not None:
        raise objective.stop_error
    return study


def work(config: SearchConfig) -> None:
    """One worker's share of the study (what each worker process runs)."""
    with quiet():
        optimize(config)
