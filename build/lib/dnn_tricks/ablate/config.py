"""The ablation config: base training configs, named variants of dotted-key overrides, seeds,
metrics and a baseline. Read by jsonargparse (a misspelt key is an error), then checked as a
whole before any run: every variant's training config is parsed, so an override of a key
that does not exist stops the ablation at once with one line."""

from __future__ import annotations

import hashlib
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from jsonargparse import ArgumentError

from dnn_tricks.search.config import YamlValue, parse_dataclass
from dnn_tricks.search.fit import resolve_config, training_args

LABEL = "ablate config"


@dataclass
class Variant:
    """One arm of the ablation.

    Args:
        name: a plain folder name, unique among the variants.
        overrides: dotted training-config key -> value, applied after ``base`` and the
            budget, e.g. ``{model.net.init_args.norm: group, data.batch_size: 2}``; empty
            for the base config as it is.
    """

    name: str
    overrides: dict[str, YamlValue] = field(default_factory=dict)


@dataclass
class Budget:
    """How long each run trains at one budget (``--budget quick``).

    Args:
        fixed: dotted key -> value for every run at this budget (epochs, batches, subset).
        seeds: the seeds at this budget; null for the config's ``seeds``.
    """

    fixed: dict[str, YamlValue] = field(default_factory=dict)
    seeds: list[int] | None = None


@dataclass
class AblateConfig:
    """Variants x seeds, each a normal fit; a table with confidence intervals at the end.

    Args:
        base: training configs composed in order, as repeated ``trainer fit --config``.
        variants: the arms, each a name and its overrides (see Variant).
        baseline: the variant the others are compared with, seed by seed.
        metrics: logged scalar -> ``higher`` or ``lower`` is better, e.g.
            ``{test/acc: higher, time/fit_s: lower}``. A metric is its last logged value;
            ``test/*`` come from testing the best checkpoint after the fit, ``best/<m>`` is
            the best value of a ModelCheckpoint's monitor ``m``, ``time/fit_s`` the fit's
            wall time in seconds.
        seeds: seeds of every variant (at least 2; 5 or more for tight intervals). The same
            seeds for every variant, so differences are paired.
        seed_keys: training-config keys set to the seed: the training seed, plus
            ``data.seed`` to redraw the train/val/test split too.
        fixed: dotted key -> value for every run (after base, before the budget).
        budgets: named budgets (e.g. ``quick``, ``full``); see Budget.
        budget: which budget to run; ``full`` needs no entry in ``budgets``.
        name: the ablation's folder and study name; default: the config file's name, with
            ``_<budget>`` appended for a budget other than ``full``.
        log_dir: parent folder: runs go to ``<log_dir>/<name>/<variant>/seed_<s>/version_N``,
            the report to ``<log_dir>/<name>/``.
        storage: database URL of the runs; default ``sqlite:///<log_dir>/<name>/study.db``.
            A server URL (``postgresql://user:pw@host/db``) lets several machines share them.
        workers: processes on this machine that share the runs, one torch thread each.
        run_timeout: seconds of training after which a run stops and reports what it
            reached (Lightning's ``trainer.max_time``); null for no limit.
        report_only: run nothing; write the report of the runs finished so far (while
            workers elsewhere go on, or after a long ablation was stopped part way).
    """

    base: list[str]
    variants: list[Variant]
    baseline: str
    metrics: dict[str, Literal["higher", "lower"]] = field(
        default_factory=lambda: {"test/acc": "higher"}
    )
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])
    seed_keys: list[str] = field(default_factory=lambda: ["seed_everything"])
    fixed: dict[str, YamlValue] = field(default_factory=dict)
    budgets: dict[str, Budget] = field(default_factory=dict)
    budget: str = "full"
    name: str | None = None
    log_dir: str = "logs/ablate"
    storage: str | None = None
    workers: int = 1
    run_timeout: float | None = None
    report_only: bool = False

    @property
    def folder(self) -> Path:
        return Path(self.log_dir) / str(self.name)

    @property
    def storage_url(self) -> str:
        return self.storage or f"sqlite:///{self.folder / 'study.db'}"

    @property
    def run_seeds(self) -> list[int]:
        chosen = self.budgets.get(self.budget)
        return list(chosen.seeds) if chosen and chosen.seeds is not None else list(self.seeds)

    @property
    def variant_names(self) -> list[str]:
        return [v.name for v in self.variants]

    def variant(self, name: str) -> Variant:
        return next(v for v in self.variants if v.name == name)

    def runs(self) -> list[tuple[str, int]]:
        """(variant, seed) in the order they are queued: seed by seed, baseline first, so
        that early results already compare every variant on the same seeds."""
        names = [self.baseline] + [n for n in self.variant_names if n != self.baseline]
        return [(name, seed) for seed in self.run_seeds for name in names]

    def training_args(self, variant: str, seed: int) -> list[str]:
        """``TrainerCLI`` arguments of one run (without where it logs)."""
        chosen = self.budgets.get(self.budget, Budget())
        seeded = {key: seed for key in self.seed_keys}
        overrides = self.variant(variant).overrides
        return training_args(self.base, self.fixed, chosen.fixed, overrides, seeded)


def one_line(error: BaseException) -> str:
    """jsonargparse's nested message as ``key: reason`` on one line."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if not lines:
        return type(error).__name__
    key = re.match(r'Parser key "([^"]+)":', lines[0])
    if key and len(lines) > 1:
        reason = re.sub(r"^Type .*? expects [^:]*: ", "", lines[1])
        reason = re.sub(r"\.? Got value: .*$", "", reason)
        return f"{key.group(1)}: {reason}"
    return lines[0]


def variant_fingerprints(config: AblateConfig) -> dict[str, str]:
    """Parse every variant's training config (the first seed's; seeds change only the seed
    keys): a bad override stops here, before any run. Returns a digest per variant, so
    a re-run can tell that a variant's config changed since its runs."""
    prints = {}
    for variant in config.variants:
        try:
            text = resolve_config(config.training_args(variant.name, config.run_seeds[0]))
        except (ArgumentError, ValueError, TypeError) as error:
            raise ValueError(f"{LABEL}: variant {variant.name!r}: {one_line(error)}") from None
        prints[variant.name] = hashlib.sha256(text.encode()).hexdigest()[:16]
    return prints


def check_config(config: AblateConfig) -> None:
    """What jsonargparse cannot check, each as one line naming the key and the fix."""
    if not config.base:
        raise ValueError(f"{LABEL}: base is empty; name at least one training config")
    for path in config.base:
        if not Path(path).is_file():
            raise FileNotFoundError(f"{LABEL}: base config {path!r} does not exist")
    names = config.variant_names
    if not names:
        raise ValueError(f"{LABEL}: variants is empty; list at least two")
    for name in names:
        if not re.fullmatch(r"[\w.-]+", name):
            raise ValueError(f"{LABEL}: variant name {name!r} must be a plain folder name")
    doubled = sorted({n for n in names if names.count(n) > 1})
    if doubled:
        raise ValueError(f"{LABEL}: two variants are named {doubled[0]!r}; rename one")
    if config.baseline not in names:
        raise ValueError(f"{LABEL}: baseline={config.baseline!r} is not a variant; one of {names}")
    if config.budget != "full" and config.budget not in config.budgets:
        known = ", ".join(["full", *config.budgets]) if config.budgets else "full"
        raise ValueError(f"{LABEL}: budget={config.budget!r} is not defined; one of {known}")
    seeds = config.run_seeds
    if len(seeds) < 2 or len(set(seeds)) != len(seeds):
        raise ValueError(
            f"{LABEL}: seeds={seeds} at budget {config.budget!r}: give at least 2 distinct "
            "seeds (a confidence interval needs 2; 5 or more make it useful)"
        )
    if not config.metrics:
        raise ValueError(f"{LABEL}: metrics is empty; name at least one, e.g. test/acc: higher")
    if not re.fullmatch(r"[\w.-]+", str(config.name)):
        raise ValueError(f"{LABEL}: name={config.name!r} must be a plain folder name")
    if config.workers < 1:
        raise ValueError(f"{LABEL}: workers={config.workers} must be >= 1")


def parse_ablate_config(argv: Sequence[str]) -> AblateConfig:
    """``trainer ablate`` arguments -> a checked AblateConfig (ValueError names the key)."""
    config, paths = parse_dataclass(AblateConfig, argv, "trainer ablate", LABEL)
    if config.name is None:
        stem = Path(paths[-1]).stem if paths else "ablate"
        config.name = stem if config.budget == "full" else f"{stem}_{config.budget}"
    check_config(config)
    return config
