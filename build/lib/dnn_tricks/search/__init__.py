"""``trainer search``: random (or TPE) hyperparameter search with Optuna, pruning bad trials,
resumable from an SQLite file and shared between workers through a database server.

    trainer search --config configs/search/digits.yaml              # run / continue
    trainer search --config configs/search/digits.yaml --n_trials 40  # extend the study
    trainer search --config ... --storage postgresql://u:pw@host/db   # one per machine

Each trial is a normal ``trainer fit`` of the base configs plus the sampled values; its
TensorBoard run is ``<log_dir>/<study>/trial_<n>/version_0``. At the end of each worker's run:
``trials.csv``, ``best_config.yaml`` (``trainer fit --config`` runs it as is), history.png and
importances.png in ``<log_dir>/<study>/``.
"""

from __future__ import annotations

from typing import Any

from dnn_tricks.search.config import Param, SearchConfig, parse_search_config

__all__ = ["Param", "SearchConfig", "parse_search_config", "run_search"]


def run_search(config: SearchConfig) -> dict[str, Any]:
    """Run the study (``config.workers`` processes here, each with its share), then report
    it; returns the report's paths and the best trial's test metrics."""
    from dnn_tricks.search.fit import quiet
    from dnn_tricks.search.report import report
    from dnn_tricks.search.study import check_keys, open_study, work
    from dnn_tricks.search.workers import run_workers

    with quiet():
        if config.workers > 1:  # created and checked once here; the workers only load it
            open_study(config)
            check_keys(config)
        run_workers(work, config, config.workers)
        return report(config, open_study(config))
