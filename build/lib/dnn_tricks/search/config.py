"""The search config (a YAML file read by jsonargparse, so a misspelt key is an error, not a
silent default) and the translation of sampled values into ``trainer`` command-line overrides."""

from __future__ import annotations

import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import optuna
from jsonargparse import ActionConfigFile, ArgumentError, ArgumentParser
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

T = TypeVar("T")

# A value as YAML writes it. Not ``Any``: jsonargparse would turn a mapping with a class_path
# into a Namespace with every default of that class filled in, or even an instance.
YamlValue = Union[str, int, float, bool, None, list, dict]  # noqa: UP007 (a runtime union)


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
    choices: list[YamlValue] | None = None


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
        workers: processes on this machine that share the study, one torch thread each;
            more machines join by running the same command against a server ``storage``.
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
    fixed: dict[str, YamlValue] = field(default_factory=dict)
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
    workers: int = 1

    @property
    def study_dir(self) -> Path:
        return Path(self.log_dir) / str(self.study_name)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.study_dir / 'study.db'}"


def _explain(error: ArgumentError, label: str) -> str:
    """jsonargparse's nested multi-line message as one line: the key chain and the reason."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    keys = [m.group(1) for line in lines for m in [re.match(r'Parser key "([^"]+)"', line)] if m]
    reason = lines[-1] if lines else type(error).__name__
    return f"{label}: {'.'.join(keys) + ': ' if keys else ''}{reason}"


def parse_dataclass(
    cls: type[T], argv: Sequence[str], prog: str, label: str
) -> tuple[T, list[str]]:
    """Command-line arguments (``--config`` files, then ``--key=value``) -> an instance of
    the dataclass ``cls`` and the config paths given; ValueError names the key."""
    summary = (cls.__doc__ or "").strip().split("\n")[0]
    parser = ArgumentParser(prog=prog, description=summary, exit_on_error=False)
    parser.add_argument("--config", action=ActionConfigFile, help="Config YAML.")
    parser.add_class_arguments(cls)
    try:
        namespace = parser.parse_args(list(argv))
    except ArgumentError as error:
        raise ValueError(_explain(error, label)) from None
    paths = [str(path) for path in namespace.pop("config", None) or []]
    return cls(**vars(parser.instantiate(namespace))), paths


def parse_search_config(argv: Sequence[str]) -> SearchConfig:
    """``trainer search`` arguments -> a checked SearchConfig (ValueError names the key)."""
    config, paths = parse_dataclass(SearchConfig, argv, "trainer search", "search config")
    if config.study_name is None:
        config.study_name = Path(paths[-1]).stem if paths else "search"
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
    if config.workers < 1:
        raise ValueError(f"search config: workers={config.workers} must be >= 1")
    if not re.fullmatch(r"[\w.-]+", str(config.study_name)):
        raise ValueError(
            f"search config: study_name={config.study_name!r} must be a plain folder name"
        )
    distributions(config.space)
    for key in config.space:
        if key in config.fixed:
            raise ValueError(f"search config: {key} is both in space and in fixed; keep one")


def distribution(key: str, param: Param) -> BaseDistribution:
    """The Optuna distribution of one parameter; its constructor checks the bounds, step and
    log scale, and its message is prefixed with the key."""
    where = f"space.{key}"
    if param.type == "categorical":
        if not param.choices:
            raise ValueError(f"{where}: a categorical needs a non-empty list of choices")
        choices = list(param.choices)
        plain = all(_is_plain(c) for c in choices)
        # Optuna stores only plain categorical values: lists (layer widths) go as JSON text.
        return CategoricalDistribution(choices if plain else [json.dumps(c) for c in choices])
    if param.low is None or param.high is None:
        raise ValueError(f"{where}: type {param.type} needs low and high")
    if param.type == "int":
        for name in ("low", "high", "step"):
            value = getattr(param, name)
            # Optuna's IntDistribution truncates 1.5 to 1 silently; a typo should not.
            if value is not None and float(value) != int(value):
                raise ValueError(f"{where}: {name}={value} must be an integer for type int")
    try:
        if param.type == "int":
            step = int(param.step) if param.step is not None else 1
            return IntDistribution(int(param.low), int(param.high), log=param.log, step=step)
        log = param.type == "log_uniform" or param.log
        return FloatDistribution(param.low, param.high, log=log, step=param.step)
    except ValueError as error:
        raise ValueError(f"{where}: {error}") from None


def distributions(space: dict[str, Param]) -> dict[str, BaseDistribution]:
    return {key: distribution(key, param) for key, param in space.items()}


def _is_plain(value: Any) -> bool:
    return value is None or isinstance(value, (bool, int, float, str))


def decode(space: dict[str, Param], params: dict[str, Any]) -> dict[str, Any]:
    """Sampled Optuna params -> config values (JSON-encoded list choices decoded)."""
    values = {}
    for key, value in params.items():
        choices = space[key].choices or []
        encoded = space[key].type == "categorical" and not all(_is_plain(c) for c in choices)
        values[key] = json.loads(value) if encoded else value
    return values


def suggest(trial: optuna.Trial, space: dict[str, Param]) -> dict[str, Any]:
    """Sample every parameter of ``space`` for ``trial`` -> {dotted key: value}.

    (Optuna's public Trial API suggests by type, not by distribution object, hence the switch.)
    """
    params: dict[str, Any] = {}
    for key, dist in distributions(space).items():
        if isinstance(dist, CategoricalDistribution):
            params[key] = trial.suggest_categorical(key, dist.choices)
        elif isinstance(dist, IntDistribution):
            params[key] = trial.suggest_int(key, dist.low, dist.high, step=dist.step, log=dist.log)
        else:
            params[key] = trial.suggest_float(
                key, dist.low, dist.high, step=dist.step, log=dist.log
            )
    return decode(space, params)


def sample_point(space: dict[str, Param]) -> dict[str, Any]:
    """One point of the space, drawn by an in-memory study, to check the config keys
    before any trial."""
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    return decode(space, study.ask(distributions(space)).params)


def cli_value(value: Any) -> str:
    """A value as ``--key=VALUE`` text that jsonargparse reads back as the same value."""
    if isinstance(value, str):
        return value
    return json.dumps(value)  # JSON is YAML: numbers, booleans, null and lists round-trip


def override_args(values: dict[str, Any]) -> list[str]:
    return [f"--{key}={cli_value(value)}" for key, value in values.items()]
