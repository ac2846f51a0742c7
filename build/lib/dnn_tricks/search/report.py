"""What a search leaves behind: the trial table (printed and trials.csv), the best trial's
config as a YAML that ``trainer fit --config`` runs as is, plots, and the best model's test."""

from __future__ import annotations

import csv
import math
import warnings
from pathlib import Path
from typing import Any

import optuna
from lightning.pytorch.cli import SaveConfigCallback as SaveConfig
from optuna.trial import FrozenTrial, TrialState

from dnn_tricks.app import TrainerCLI
from dnn_tricks.search.config import SearchConfig, decode
from dnn_tricks.search.fit import resolve_config, training_args
from dnn_tricks.search.study import best_config_args


def trial_rows(study: optuna.Study) -> list[dict[str, Any]]:
    """One row per trial: number, state, value, duration, each parameter, and a note (the
    error of a failed trial, why a trial did not run)."""
    trials = study.get_trials(deepcopy=False)
    keys = sorted({key for t in trials for key in t.params})
    rows = []
    for t in trials:
        row: dict[str, Any] = {
            "number": t.number,
            "state": t.state.name,
            "value": t.value if t.value is not None else "",
            "duration_s": round(t.duration.total_seconds(), 1) if t.duration else "",
        }
        row.update({key: t.params.get(key, "") for key in keys})
        row["note"] = t.user_attrs.get("error") or t.user_attrs.get("note", "")
        rows.append(row)
    return rows


def _short(key: str) -> str:
    return key.rsplit(".", 1)[-1] if "." in key else key


def format_table(rows: list[dict[str, Any]]) -> str:
    """Aligned text table; parameter columns are titled with the last part of their key."""
    if not rows:
        return "(no trials)"

    def text(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = [_short(key) for key in rows[0]]
    cells = [[text(v) for v in row.values()] for row in rows]
    widths = [max(len(h), *(len(c[i]) for c in cells)) for i, h in enumerate(header)]
    lines = ["  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True))]
    lines += ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def write_csv(rows: list[dict[str, Any]], path: Path) -> None:
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["number"])
        writer.writeheader()
        writer.writerows(rows)


def best_trial(study: optuna.Study) -> FrozenTrial | None:
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    return study.best_trial if complete else None


def write_best_config(config: SearchConfig, best: FrozenTrial, path: Path) -> None:
    """The config the best trial ran (stored with it), logging to logs/<study>_best."""
    text = best.user_attrs.get("config")
    if text is None:  # a study from before configs were stored: resolve it again
        values = decode(config.space, best.params)
        args = training_args(config.base, config.fixed, values)
        text = resolve_config(args + best_config_args(config))
    header = (
        f"# Best of search {config.study_name!r}: trial {best.number}, "
        f"{config.metric}={best.value:.6g}.\n# Run it: trainer fit --config {path}\n"
    )
    path.write_text(header + text)


def save_plots(study: optuna.Study, folder: Path) -> list[Path]:
    """Optimization history and parameter importances as PNG; a plot that cannot be made
    (importances need >= 2 complete trials with varying parameters) is skipped with a note."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as optuna_plots

    written = []
    for name, plot in (
        ("history", optuna_plots.plot_optimization_history),
        ("importances", optuna_plots.plot_param_importances),
    ):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                axes = plot(study)
            figure = axes.figure if hasattr(axes, "figure") else axes.flat[0].figure
            figure.tight_layout()
            figure.savefig(folder / f"{name}.png", dpi=100)
            written.append(folder / f"{name}.png")
        except (ValueError, RuntimeError, ZeroDivisionError, IndexError) as error:
            print(f"search: no {name} plot ({type(error).__name__}: {error})")
        finally:
            plt.close("all")
    return written


def test_best(best: FrozenTrial, best_config: Path) -> dict[str, float]:
    """Test metrics of the best trial's kept checkpoint (empty if it is not on this machine)."""
    checkpoint = best.user_attrs.get("checkpoint", "")
    if not checkpoint or not Path(checkpoint).is_file():
        print(f"search: best checkpoint {checkpoint!r} is not on this machine; no test")
        return {}
    extra = ["--trainer.enable_progress_bar=false", "--trainer.logger=false"]
    cli = TrainerCLI(args=["--config", str(best_config), *extra], run=False)
    # Without a logger the config would be saved into the working directory, once only.
    cli.trainer.callbacks = [c for c in cli.trainer.callbacks if not isinstance(c, SaveConfig)]
    results = cli.trainer.test(
        cli.model, datamodule=cli.datamodule, ckpt_path=checkpoint, weights_only=True
    )
    return {k: float(v) for k, v in (results[0] if results else {}).items()}


def report(config: SearchConfig, study: optuna.Study) -> dict[str, Any]:
    """Print and write the study's results under its folder; returns what it wrote."""
    folder = config.study_dir
    folder.mkdir(parents=True, exist_ok=True)
    rows = trial_rows(study)
    print(format_table(rows))
    write_csv(rows, folder / "trials.csv")
    out: dict[str, Any] = {"trials_csv": folder / "trials.csv", "plots": save_plots(study, folder)}
    best = best_trial(study)
    if best is None:
        print(f"search: no trial of {config.study_name!r} completed; nothing to recommend")
        return out
    write_best_config(config, best, folder / "best_config.yaml")
    out["best_config"] = folder / "best_config.yaml"
    test = test_best(best, out["best_config"]) if config.test_best else {}
    out["test"] = test
    tested = ", ".join(f"{k}={v:.4f}" for k, v in test.items() if math.isfinite(v))
    print(
        f"search: best trial {best.number}: {config.metric}={best.value:.4f}"
        f"{' (' + tested + ')' if tested else ''}; params {best.params}\n"
        f"search: wrote {folder / 'trials.csv'} and {out['best_config']}"
    )
    return out
