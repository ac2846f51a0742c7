"""The search config (a YAML file read by jsonargparse, so a misspelt key is an error, not a
silent default) and the translation of sampled values into ``trainer`` command-line overrides."""

from __future__ import annotations

import json
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import optuna
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser

PARAM_TYPES = ("uniform", "log_uniform", "int", "categorical")


@dataclass
class Param:
    """One dimension of the search space.

    Args:
        type: ``uniform`` or ``log_uniform`` (floats in [low, high]), ``int`` (integers in
            [low, high]) or ``categorical`` (one of ``choices``).
        low: lower bound (inclusive) of uniform, log_uniform and int.
        high: upper bound (inclusive) of uniform, log_uniform and int.
        step: spacing of the values of uniform and int; null for continuous floats (int: 1).
        log: sample an int on a log scale (log_uniform is the float version).
        choices: the values of a categorical: numbers, strings, booleans or lists
            (e.g. hidden widths ``[[128], [256, 128]]``).
    """

    type: Literal["uniform", "log_uniform", "int", "categorical"]
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: list[Any] | None = None


@dataclass
class SearchConfig:
    """A hyperparameter search: which training config, what to vary, what to optimize.

    Args:
        base: training configs composed in order, as repeated ``trainer fit --config``
            (paths relative to the working directory).
        space: dotted config key -> Param, e.g.
            ``model.optimizer.init_args.lr: {type: log_uniform, low: 1.0e-4, high: 0.1}``.
        fixed: dotted config key -> value applied to every trial (e.g. a shorter
            ``trainer.max_epochs``), after ``base`` and before the sampled values.
        metric: logged metric a trial is judged by. When a ModelCheckpoint monitors it,
            its best value over the epochs (the checkpoint that is kept and tested);
            otherwise its value at the end of the fit.
        direction: ``maximize`` or ``minimize`` the metric.
        n_trials: total trials of the study (finished, pruned, failed or running, over all
            runs and workers); re-running the command continues up to this number.
        sampler: ``random`` (default) or ``tpe`` (Tree-structured Parzen Estimator).
        seed: seed of the sampler; trial n samples with seed + n, so results do not depend
            on how many workers ran or in which order. null for a fresh seed each time.
        pruner: ``median`` stops a trial whose intermediate metric is worse than the median
            of earlier trials at the same epoch; ``none`` runs every trial to the end.
        prune_startup_trials: trials that always run to the end before pruning starts.
        prune_warmup_epochs: epochs of a trial that are never pruned.
        tpe_startup_trials: random trials before TPE starts modelling.
        study_name: name of the study and of its folder; default: the search config's
            file name.
        log_dir: parent folder of the study's folder (TensorBoard runs, tables, plots).
        storage: database URL; default ``sqlite:///<log_dir>/<study_name>/study.db``
            (one machine). A server URL (``postgresql://user:pw@host/db``) lets workers on
            several machines share the study.
        timeout: seconds after which this worker starts no new trial; null for no limit.
        trial_timeout: seconds of training after which a trial stops and reports what it
            reached (Lightning's ``trainer.max_time``); null for no limit.
        test_best: at the end, evaluate the best trial's kept checkpoint on the test split.
    """

    base: list[str]
    space: dict[str, Param] = field(default_factory=dict)
    fixed: dict[str, Any] = field(default_factory=dict)
    metric: str = "val/acc"
    direction: Literal["maximize", "minimize"] = "maximize"
    n_trials: int = 20
    sampler: Literal["random", "tpe"] = "random"
    seed: int | None = 0
    pruner: Literal["median", "none"] = "median"
    prune_startup_trials: int = 5
    prune_warmup_epochs: int = 3
    tpe_startup_trials: int = 10
    study_name: str | None = None
    log_dir: str = "logs/search"
    storage: str | None = None
    timeout: float | None = None
    trial_timeout: float | None = None
    test_best: bool = True

    @property
    def study_dir(self) -> Path:
        return Path(self.log_dir) / str(self.study_name)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.study_dir / 'study.db'}"


def _explain(error: ArgumentError) -> str:
    """jsonargparse's nested multi-line message as one line: the key chain and the reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    keys = [m.group(1) for line in lines for m in [re.match(r'Parser key "([^"]+)"', line)] if m]
    reason = lines[-1] if lines else type(error).__name__
    return f"search config: {'.'.join(keys) + ': ' if keys else ''}{reason}"


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="trainer search",
        description="Random (or TPE) hyperparameter search with Optuna.",
        exit_on_error=False,
    )
    parser.add_argument("--config", action=ActionConfigFile, help="Search config YAML.")
    parser.add_class_arguments(SearchConfig)
    return parser


def parse_search_config(argv: Sequence[str]) -> SearchConfig:
    """``trainer search`` arguments -> a checked SearchConfig (ValueError names the key)."""
    parser = build_parser()
    try:
        namespace = parser.parse_args(list(argv))
    except ArgumentError as error:
        raise ValueError(_explain(error)) from None
    paths = namespace.pop("config", None) or []
    config = SearchConfig(**vars(parser.instantiate(namespace)))
    if config.study_name is None:
        config.study_name = Path(str(paths[-1])).stem if paths else "search"
    check_config(config)
    return config


def check_config(config: SearchConfig) -> None:
    """Semantic checks jsonargparse cannot make, each naming the key and the fix."""
    if not config.base:
        raise ValueError("search config: base is empty; name at least one training config")
    for path in config.base:
        if not Path(path).is_file():
            raise FileNotFoundError(f"search config: base config {path!r} does not exist")
    if config.n_trials < 1:
        raise ValueError(f"search config: n_trials={config.n_trials} must be >= 1")
    if not re.fullmatch(r"[\w.-]+", str(config.study_name)):
        raise ValueError(
            f"search config: study_name={config.study_name!r} must be a plain folder name"
        )
    for key, param in config.space.items():
        check_param(key, param)
        if key in config.fixed:
            raise ValueError(f"search config: {key} is both in space and in fixed; keep one")


def check_param(key: str, param: Param) -> None:
    where = f"space.{key}"
    if param.type == "categorical":
        if not param.choices:
            raise ValueError(f"{where}: a categorical needs a non-empty list of choices")
        return
    if param.low is None or param.high is None:
        raise ValueError(f"{where}: type {param.type} needs low and high")
    if not param.low < param.high:
        raise ValueError(f"{where}: low={param.low} must be smaller than high={param.high}")
    if (param.type == "log_uniform" or param.log) and param.low <= 0:
        raise ValueError(f"{where}: a log scale needs low > 0 (got {param.low})")
    if param.type == "int":
        for name in ("low", "high", "step"):
            value = getattr(param, name)
            if value is not None and float(value) != int(value):
                raise ValueError(f"{where}: {name}={value} must be an integer for type int")
    if param.step is not None and (param.step <= 0 or param.type == "log_uniform"):
        raise ValueError(f"{where}: step={param.step} must be > 0 and not used with log_uniform")
    if param.step is not None and param.log:
        raise ValueError(f"{where}: use either step or log, not both")


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """Sample every parameter of ``space`` for ``trial`` -> {dotted key: value}.

    Optuna stores only plain categorical values, so choices that are lists (layer widths)
    are stored as their JSON text and decoded here."""
    values: dict[str, Any] = {}
    for key, p in space.items():
        if p.type == "categorical":
            choices = list(p.choices or [])
            encoded = all(_is_plain(c) for c in choices)
            stored = choices if encoded else [json.dumps(c) for c in choices]
            picked = trial.suggest_categorical(key, stored)
            values[key] = picked if encoded else json.loads(picked)
        elif p.type == "int":
            step = int(p.step) if p.step is not None else 1
            values[key] = trial.suggest_int(key, int(p.low), int(p.high), step=step, log=p.log)
        else:
            log = p.type == "log_uniform" or p.log
            values[key] = trial.suggest_float(key, p.low, p.high, step=p.step, log=log)
    return values


def representative(param: Param) -> Any:
    """A value inside the parameter's range, to check the config keys before any trial."""
    if param.type == "categorical":
        return (param.choices or [None])[0]
    if param.type == "int":
        return int(param.low)
    return math.sqrt(param.low * param.high) if param.type == "log_uniform" else param.low


def cli_value(value: Any) -> str:
    """A value as ``--key=VALUE`` text that jsonargparse reads back as the same value."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # JSON is YAML: numbers, booleans, null and lists round-trip


def override_args(values: dict[str, Any]) -> list[str]:
    return [f"--{key}={cli_value(value)}" for key, value in values.items()]
