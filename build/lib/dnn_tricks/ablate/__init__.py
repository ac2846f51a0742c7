"""``trainer ablate``: does trick X help here? Variants x seeds, each a normal fit, reported
as means with Student t intervals and paired differences to a baseline.

    trainer ablate --config configs/ablate/bn_placement.yaml                 # run / continue
    trainer ablate --config configs/ablate/bn_placement.yaml --budget quick  # minutes
    trainer ablate --config ... --workers 2                                  # two processes
    trainer ablate --config ... --storage postgresql://u:pw@host/db          # one per machine

Runs go to ``logs/ablate/<name>/<variant>/seed_<s>/version_N`` (TensorBoard); the report to
``logs/ablate/<name>/{results.csv,summary.md,summary.png}``. The runs are scheduled on the
search's machinery (an Optuna study in the same storage), so re-running continues and
several machines can share them.
"""

from __future__ import annotations

from pathlib import Path

from dnn_tricks.ablate.config import AblateConfig, Budget, Variant, parse_ablate_config

__all__ = ["AblateConfig", "Budget", "Variant", "parse_ablate_config", "run_ablation"]


def run_ablation(config: AblateConfig) -> dict[str, Path]:
    """Queue the runs not yet complete, run them in ``config.workers`` processes here, then
    report every run of the ablation; returns the report's paths."""
    from dnn_tricks.ablate.report import report
    from dnn_tricks.ablate.runs import open_study, queue_runs, work
    from dnn_tricks.search.fit import quiet
    from dnn_tricks.search.workers import run_workers

    with quiet():
        if config.report_only:
            return report(config, open_study(config))
        queued = queue_runs(config, open_study(config))
        total = len(config.runs())
        print(f"ablate: {config.name}: {queued} of {total} runs to do", flush=True)
        if queued:
            run_workers(work, config, min(config.workers, queued))
        return report(config, open_study(config))
