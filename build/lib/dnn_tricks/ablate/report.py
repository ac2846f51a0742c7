"""What an ablation leaves in ``<log_dir>/<name>/``: results.csv (one row per run),
summary.md (per variant and metric: mean, std, 95% interval; paired difference to the
baseline with its interval and a verdict; the seeds a difference would need) and
summary.png (mean and interval per variant and metric)."""

from __future__ import annotations

import csv
import math
from dataclasses import dataclass, field
from pathlib import Path

import optuna
from optuna.trial import TrialState

from dnn_tricks.ablate.config import AblateConfig
from dnn_tricks.ablate.runs import PENDING, run_key, trials_by_run
from dnn_tricks.ablate.stats import CONFIDENCE, POWER, Interval, Paired, mean_interval, paired
from dnn_tricks.search.config import cli_value

WALL = "time/fit_s"


@dataclass
class Run:
    """The outcome of one (variant, seed): its complete trial if any, else its latest."""

    variant: str
    seed: int
    state: str
    metrics: dict[str, float] = field(default_factory=dict)
    error: str = ""
    log_dir: str = ""
    trial: int | None = None


def collect(config: AblateConfig, study: optuna.Study) -> list[Run]:
    by_run = trials_by_run(study)
    runs = []
    for variant, seed in config.runs():
        trials = by_run.get(run_key(variant, seed), [])
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        tried = [t for t in trials if t.state == TrialState.FAIL or t.state in PENDING]
        chosen = (done or tried or [None])[-1]
        if chosen is None:
            runs.append(Run(variant, seed, "NOT QUEUED"))
            continue
        metrics = {k: float(v) for k, v in chosen.user_attrs.get("metrics", {}).items()}
        runs.append(
            Run(
                variant,
                seed,
                chosen.state.name,
                metrics,
                chosen.user_attrs.get("error", ""),
                chosen.user_attrs.get("log_dir", ""),
                chosen.number,
            )
        )
    return runs


def write_csv(config: AblateConfig, runs: list[Run], path: Path) -> None:
    metrics = list(config.metrics) + ([WALL] if WALL not in config.metrics else [])
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["variant", "seed", "state", *metrics, "error", "log_dir", "trial"])
        for r in runs:
            values = [r.metrics.get(m, "") for m in metrics]
            trial = "" if r.trial is None else r.trial
            writer.writerow([r.variant, r.seed, r.state, *values, r.error, r.log_dir, trial])


@dataclass
class MetricTable:
    """One metric's statistics: an interval per variant, a paired comparison per
    non-baseline variant, and the runs left out for a non-finite value."""

    metric: str
    higher_is_better: bool
    intervals: dict[str, Interval]
    comparisons: dict[str, Paired]
    non_finite: list[str]


def _values(runs: list[Run], variant: str, metric: str) -> dict[int, float]:
    return {
        r.seed: r.metrics[metric]
        for r in runs
        if r.variant == variant and r.state == "COMPLETE" and metric in r.metrics
    }


def analyse(config: AblateConfig, runs: list[Run]) -> list[MetricTable]:
    tables = []
    for metric, better in config.metrics.items():
        higher = better == "higher"
        values = {v: _values(runs, v, metric) for v in config.variant_names}
        non_finite = [
            run_key(v, s) for v, by_seed in values.items() for s, x in by_seed.items()
            if not math.isfinite(x)
        ]  # fmt: skip
        finite = {v: {s: x for s, x in d.items() if math.isfinite(x)} for v, d in values.items()}
        intervals = {v: mean_interval(list(d.values())) for v, d in finite.items()}
        base = finite[config.baseline]
        comparisons = {}
        for variant in config.variant_names:
            if variant == config.baseline:
                continue
            seeds = sorted(set(base) & set(finite[variant]))
            a = [finite[variant][s] for s in seeds]
            comparisons[variant] = paired(a, [base[s] for s in seeds], higher)
        tables.append(MetricTable(metric, higher, intervals, comparisons, non_finite))
    return tables


def _num(x: float) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.4g}"


def _signed(x: float) -> str:
    return "nan" if not math.isfinite(x) else "0" if x == 0 else f"{x:+.4g}"


def _ci(i: Interval) -> str:
    return "—" if math.isnan(i.low) else f"[{_num(i.low)}, {_num(i.high)}]"


def metric_section(config: AblateConfig, table: MetricTable) -> list[str]:
    pct = round(CONFIDENCE * 100)
    lines = [
        f"## {table.metric} ({'higher' if table.higher_is_better else 'lower'} is better)",
        "",
        f"| variant | n | mean | std | {pct}% CI | Δ vs {config.baseline} (paired) "
        f"| {pct}% CI of Δ | p | verdict | seeds for {round(POWER * 100)}% power |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for variant in config.variant_names:
        i = table.intervals[variant]
        cells = [variant, str(i.n), _num(i.mean), _num(i.std), _ci(i)]
        c = table.comparisons.get(variant)
        if c is None:
            cells[0] += " (baseline)"
            cells += ["", "", "", "", ""]
        else:
            needed = "—" if c.seeds_needed is None else str(c.seeds_needed)
            p = "—" if math.isnan(c.pvalue) else f"{c.pvalue:.3g}"
            cells += [_signed(c.diff.mean), _ci(c.diff), p, c.verdict, needed]
        lines.append("| " + " | ".join(cells) + " |")
    lines.append("")
    lines += smallest_difference(table)
    if table.non_finite:
        lines.append(f"Left out for a non-finite value: {', '.join(table.non_finite)}.")
        lines.append("")
    return lines


def smallest_difference(table: MetricTable) -> list[str]:
    """The estimate for the smallest nonzero difference seen (the hardest to resolve)."""
    seen = [
        (abs(c.diff.mean), v, c)
        for v, c in table.comparisons.items()
        if c.diff.n >= 2 and math.isfinite(c.diff.std) and c.diff.std > 0 and c.diff.mean != 0
    ]
    if not seen:
        return []
    _, variant, c = min(seen, key=lambda item: item[0])
    needed = (
        f"about {c.seeds_needed} seeds" if c.seeds_needed is not None else "more than 10000 seeds"
    )
    return [
        f"Smallest difference seen: {variant}, Δ = {_signed(c.diff.mean)} (sd of the paired "
        f"differences {_num(c.diff.std)}). Detecting a difference of this size with "
        f"{round(POWER * 100)}% power (two-sided paired t-test, α = {1 - CONFIDENCE:.2g}) "
        f"would take {needed}: an estimate from the variance of these {c.diff.n} seeds, "
        "not a claim.",
        "",
    ]


def summary_text(config: AblateConfig, runs: list[Run], tables: list[MetricTable]) -> str:
    states = [r.state for r in runs]
    complete, failed = states.count("COMPLETE"), states.count("FAIL")
    pending = len(runs) - complete - failed
    wall = sum(r.metrics.get(WALL, 0.0) for r in runs if r.state == "COMPLETE")
    seeds = ", ".join(str(s) for s in config.run_seeds)
    lines = [
        f"# Ablation {config.name} (budget {config.budget})",
        "",
        f"Base: {', '.join(f'`{b}`' for b in config.base)}. Seeds {seeds} (set in "
        f"{', '.join(f'`{k}`' for k in config.seed_keys)}). Baseline: `{config.baseline}`.",
        "",
        "| variant | overrides |",
        "|---|---|",
    ]
    for v in config.variants:
        shown = ", ".join(f"`{k}={cli_value(x)}`" for k, x in v.overrides.items()) or "(base)"
        lines.append(f"| {v.name} | {shown} |")
    lines += [
        "",
        f"Runs: {complete} complete, {failed} failed, {pending} not finished, of {len(runs)}; "
        f"{wall:.0f} s of fitting in all.",
        "",
        f"Intervals are Student t over seeds; Δ is variant minus baseline on the same seeds, "
        f"and its interval is the paired t-test's. Each comparison is at "
        f"{round(CONFIDENCE * 100)}% on its own, with no correction for making several.",
        "",
    ]
    for table in tables:
        lines += metric_section(config, table)
    failures = [r for r in runs if r.state == "FAIL"]
    if failures:
        lines += ["## Failed runs", "", "| run | error |", "|---|---|"]
        lines += [
            f"| {run_key(r.variant, r.seed)} | {r.error or '(no error kept)'} |" for r in failures
        ]
        lines.append("")
    unfinished = [run_key(r.variant, r.seed) for r in runs if r.state not in ("COMPLETE", "FAIL")]
    if unfinished:
        lines += [f"Not finished (running elsewhere or queued): {', '.join(unfinished)}.", ""]
    return "\n".join(lines)


def save_plot(config: AblateConfig, tables: list[MetricTable], path: Path) -> None:
    """One panel per metric: each variant's mean with its interval, the baseline's mean as a
    dashed line."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt

    names = config.variant_names
    figure, axes = plt.subplots(
        1, len(tables), figsize=(max(4.0, 0.9 * len(names) + 1.5) * len(tables), 3.6)
    )
    for ax, table in zip(list(getattr(axes, "flat", [axes])), tables, strict=True):
        means = [table.intervals[n].mean for n in names]
        low = [m - table.intervals[n].low for m, n in zip(means, names, strict=True)]
        high = [table.intervals[n].high - m for m, n in zip(means, names, strict=True)]
        errors = [
            [0 if math.isnan(x) else x for x in low],
            [0 if math.isnan(x) else x for x in high],
        ]
        colors = ["black" if n == config.baseline else "tab:blue" for n in names]
        for x, (mean, color) in enumerate(zip(means, colors, strict=True)):
            ax.errorbar(
                x, mean, yerr=[[errors[0][x]], [errors[1][x]]], fmt="o", color=color, capsize=4
            )
        base = table.intervals[config.baseline].mean
        if math.isfinite(base):
            ax.axhline(base, color="grey", linestyle="--", linewidth=0.8)
        ax.set_xticks(range(len(names)), names, rotation=30, ha="right")
        ax.set_xlim(-0.6, len(names) - 0.4)
        arrow = "↑" if table.higher_is_better else "↓"
        ax.set_title(f"{table.metric} {arrow}  (mean, {round(CONFIDENCE * 100)}% CI)")
        ax.grid(axis="y", alpha=0.3)
    figure.suptitle(f"{config.name}: {len(config.run_seeds)} seeds per variant")
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def report(config: AblateConfig, study: optuna.Study) -> dict[str, Path]:
    """Write results.csv, summary.md and summary.png; print the summary."""
    folder = config.folder
    folder.mkdir(parents=True, exist_ok=True)
    runs = collect(config, study)
    tables = analyse(config, runs)
    out = {name: folder / name for name in ("results.csv", "summary.md", "summary.png")}
    write_csv(config, runs, out["results.csv"])
    text = summary_text(config, runs, tables)
    out["summary.md"].write_text(text + "\n")
    save_plot(config, tables, out["summary.png"])
    print(text)
    print(f"ablate: wrote {', '.join(str(p) for p in out.values())}", flush=True)
    return out
