"""``trainer ablate``: the statistics against SciPy and published power tables, the one-line
errors before any run, runs as normal fits in their own folders, continuing, failures,
workers sharing the runs, and the shipped ablations."""

from __future__ import annotations

import csv
import math
import re
import time
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml
from scipy import stats as sps

from conftest import CONFIGS, FASHION_MNIST, REPO
from dnn_tricks.ablate import parse_ablate_config, run_ablation
from dnn_tricks.ablate.config import variant_fingerprints
from dnn_tricks.ablate.stats import mean_interval, paired, seeds_for_power
from dnn_tricks.search.fit import resolve_config

optuna.logging.set_verbosity(optuna.logging.WARNING)

NORM = "model.net.init_args.norm"
TINY = {  # digits in a few seconds per run
    "trainer.max_epochs": 2,
    "trainer.limit_train_batches": 4,
    "trainer.limit_val_batches": 2,
    "trainer.limit_test_batches": 2,
    "trainer.log_every_n_steps": 1,
    "trainer.callbacks": [],
    "model.scheduler": None,
}


# -- statistics -----------------------------------------------------------------------------


def reference_interval(x: np.ndarray) -> tuple[float, float]:
    """mean +- t_{0.975, n-1} s / sqrt(n), by hand with scipy.stats.t's quantile."""
    half = sps.t.ppf(0.975, len(x) - 1) * x.std(ddof=1) / math.sqrt(len(x))
    return x.mean() - half, x.mean() + half


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_mean_interval_is_students_t(n: int) -> None:
    x = np.random.default_rng(n).normal(0.9, 0.02, size=n)
    got = mean_interval(x)
    low, high = reference_interval(x)
    assert got.n == n and got.mean == pytest.approx(x.mean(), rel=1e-12)
    assert got.std == pytest.approx(np.std(x, ddof=1), rel=1e-12)
    assert (got.low, got.high) == (pytest.approx(low, rel=1e-10), pytest.approx(high, rel=1e-10))


def test_mean_interval_edge_cases() -> None:
    same = mean_interval([0.5, 0.5, 0.5])
    assert (same.low, same.high, same.std) == (0.5, 0.5, 0.0)
    one = mean_interval([0.7])
    assert one.mean == 0.7 and math.isnan(one.low) and math.isnan(one.std)


@pytest.mark.parametrize(("shift", "higher", "expected"), [
    (0.03, True, "better"), (0.03, False, "worse"), (-0.03, True, "worse"),
    (-0.03, False, "better"), (0.0, True, "no difference detected at 6 seeds"),
])  # fmt: skip
def test_paired_difference_matches_ttest_rel(shift: float, higher: bool, expected: str) -> None:
    rng = np.random.default_rng(1)
    seed_effect = rng.normal(0, 0.05, size=6)  # shared by both variants on a seed
    base = 0.8 + seed_effect + rng.normal(0, 0.005, size=6)
    variant = 0.8 + shift + seed_effect + rng.normal(0, 0.005, size=6)
    got = paired(list(variant), list(base), higher)
    reference = sps.ttest_rel(variant, base)
    low, high = reference_interval(variant - base)
    assert got.pvalue == pytest.approx(reference.pvalue, rel=1e-9)
    assert got.diff.mean == pytest.approx((variant - base).mean(), rel=1e-12)
    assert (got.diff.low, got.diff.high) == (pytest.approx(low), pytest.approx(high))
    assert got.verdict == expected
    # The verdict is the test's: the interval excludes 0 exactly when p < 0.05.
    assert (expected in ("better", "worse")) == (reference.pvalue < 0.05)
    # Unpaired, the seed-to-seed spread (0.05) hides a 0.03 shift; paired it does not.
    if shift:
        assert sps.ttest_ind(variant, base).pvalue > 0.05


def test_a_difference_at_float32_rounding_is_no_difference() -> None:
    """Accuracies logged as float32 (k / 360 test images): equal sums differ by ~1e-8."""
    variant = np.float64(np.float32([340, 341, 345]) / np.float32(360))
    base = np.float64(np.float32([341, 342, 343]) / np.float32(360))
    assert np.mean(variant - base) != 0  # the rounding is there
    got = paired(list(variant), list(base), True)
    assert got.diff.mean == 0.0 and got.seeds_needed is None
    assert got.verdict == "no difference detected at 3 seeds"


@pytest.mark.parametrize(("effect", "seeds"), [(0.5, 34), (0.8, 15), (1.0, 10), (0.2, 199)])
def test_seeds_for_80_percent_power_match_gpower(effect: float, seeds: int) -> None:
    """G*Power 3.1, t tests, "means: difference between two dependent means (matched
    pairs)", two tails, alpha 0.05, power 0.80: total sample size for effect size dz
    (Faul et al. 2007); dz 0.5 -> 34 is also Cohen's (1988) table 2.4.1 rounded up."""
    assert seeds_for_power(effect) == seeds
    assert seeds_for_power(-effect) == seeds
    assert seeds_for_power(0.0) is None


# -- configs and errors ----------------------------------------------------------------------


def write_ablation(folder: Path, **extra: object) -> Path:
    config = {
        "base": [str(CONFIGS / "digits.yaml")],
        "name": "tiny",
        "log_dir": str(folder / "ablate"),
        "baseline": "batch",
        "variants": [
            {"name": "batch", "overrides": {}},
            {"name": "layer", "overrides": {NORM: "layer"}},
        ],
        "seeds": [0, 1],
        "metrics": {"test/acc": "higher", "val/loss": "lower", "time/fit_s": "lower"},
        "fixed": TINY,
        **extra,
    }
    path = folder / f"ablate_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


BAD = [
    ({"variants": [{"name": "a", "overrides": {"model.net.init_args.normm": "layer"}}]},
     "variant 'a': model.net: .*normm"),
    ({"variants": [{"name": "a", "overrides": {"model.foo": 1}}]}, "variant 'a': .*model.foo"),
    ({"variants": [{"name": "batch"}, {"name": "batch", "overrides": {NORM: "layer"}}]},
     "two variants are named 'batch'"),
    ({"baseline": "bn"}, "baseline='bn' is not a variant"),
    ({"seeds": [0]}, "seeds=\\[0\\].*at least 2"),
    ({"seeds": [3, 3]}, "at least 2 distinct"),
    ({"budget": "quick"}, "budget='quick' is not defined"),
    ({"budgets": {"quick": {"seeds": [1]}}, "budget": "quick"}, "seeds=\\[1\\] at budget"),
    ({"metrics": {"test/acc": "up"}}, "metrics"),
    ({"variants": [{"name": "a/b"}], "baseline": "a/b"}, "plain folder name"),
]  # fmt: skip


@pytest.mark.parametrize(("extra", "message"), BAD)
def test_bad_input_is_one_line_before_any_run(
    tmp_path: Path, run_cli, capsys: pytest.CaptureFixture, extra: dict, message: str
) -> None:
    if "variants" in extra and "baseline" not in extra:
        extra = {**extra, "baseline": extra["variants"][0]["name"]}
    with pytest.raises(SystemExit) as exit_:
        run_cli(["ablate", "--config", write_ablation(tmp_path, **extra)])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("error: ")
    assert re.search(message, err), err
    assert not list(tmp_path.rglob("seed_*"))  # no run started


def test_budget_picks_overrides_seeds_and_name(tmp_path: Path) -> None:
    budgets = {"quick": {"fixed": {"trainer.max_epochs": 1}, "seeds": [5, 6, 7]}}
    path = write_ablation(tmp_path, budgets=budgets, name=None)
    full = parse_ablate_config(["--config", str(path)])
    quick = parse_ablate_config(["--config", str(path), "--budget=quick"])
    assert (full.name, quick.name) == (path.stem, f"{path.stem}_quick")
    assert full.run_seeds == [0, 1] and quick.run_seeds == [5, 6, 7]
    args = quick.training_args("layer", 6)
    assert args[-3:] == ["--trainer.max_epochs=1", f"--{NORM}=layer", "--seed_everything=6"]
    assert quick.runs()[:3] == [("batch", 5), ("layer", 5), ("batch", 6)]


# -- runs ------------------------------------------------------------------------------------


def read_rows(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def load_study(folder: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder / 'study.db'}")


def test_runs_are_fits_reported_with_scipy_statistics_and_continued(
    tmp_path: Path, run_cli
) -> None:
    variants = [
        {"name": "batch", "overrides": {}},
        {"name": "layer", "overrides": {NORM: "layer"}},
        {"name": "broken", "overrides": {"model.net.init_args.dropout": 1.5}},
    ]
    path = write_ablation(tmp_path, variants=variants, seeds=[0, 1, 2])
    run_cli(["ablate", "--config", path])
    folder = tmp_path / "ablate" / "tiny"
    rows = read_rows(folder / "results.csv")
    config = parse_ablate_config(["--config", str(path)])
    assert [(r["variant"], int(r["seed"])) for r in rows] == config.runs()
    for row in rows:
        if row["variant"] == "broken":
            assert row["state"] == "FAIL" and "dropout=1.5" in row["error"], row
            continue
        assert row["state"] == "COMPLETE" and row["error"] == ""
        run = Path(row["log_dir"])  # a normal fit's TensorBoard run, in the run's own folder
        assert run == folder / row["variant"] / f"seed_{row['seed']}" / "version_0"
        assert list(run.glob("events.out.tfevents.*"))
        saved = yaml.safe_load((run / "config.yaml").read_text())
        assert saved["seed_everything"] == int(row["seed"])
        assert saved["model"]["net"]["init_args"]["norm"] == row["variant"]
        assert float(row["time/fit_s"]) > 0

    # The summary's numbers are SciPy's on the values in results.csv.
    summary = (folder / "summary.md").read_text()
    for metric in ("test/acc", "val/loss"):
        values = {
            v: np.array([float(r[metric]) for r in rows if r["variant"] == v])
            for v in ("batch", "layer")
        }
        for v, x in values.items():
            low, high = reference_interval(x)
            name = f"{v} (baseline)" if v == "batch" else v
            expected = (
                f"| {name} | 3 | {x.mean():.4g} | {x.std(ddof=1):.4g} | [{low:.4g}, {high:.4g}] |"
            )
            assert expected in summary, expected
        d = values["layer"] - values["batch"]
        low, high = reference_interval(d)
        p = sps.ttest_rel(values["layer"], values["batch"]).pvalue
        assert f"| {d.mean():+.4g} | [{low:.4g}, {high:.4g}] | {p:.3g} |" in summary
    assert "## Failed runs" in summary and "| broken/seed_2 | ValueError" in summary
    assert "Runs: 6 complete, 3 failed, 0 not finished, of 9" in summary
    assert (folder / "summary.png").read_bytes()[:4] == b"\x89PNG"

    # Re-running repeats no complete run and queues the failed ones again.
    before = {t.number: t.state.name for t in load_study(folder).trials}
    run_cli(["ablate", "--config", path])
    after = load_study(folder).trials
    assert {t.number: t.state.name for t in after[: len(before)]} == before
    assert sorted(t.user_attrs["run"] for t in after[len(before) :]) == [
        f"broken/seed_{s}" for s in (0, 1, 2)
    ]
    assert not list(folder.glob("*/seed_*/version_1"))
    # --report_only runs nothing and reports the runs so far (seed 3 never ran).
    trials = len(load_study(folder).trials)
    more_seeds = write_ablation(tmp_path, variants=variants, seeds=[0, 1, 2, 3])
    run_cli(["ablate", "--config", more_seeds, "--report_only=true"])
    assert len(load_study(folder).trials) == trials
    states = {(r["variant"], r["seed"]): r["state"] for r in read_rows(folder / "results.csv")}
    assert states[("layer", "3")] == "NOT QUEUED" and states[("layer", "2")] == "COMPLETE"
    # A variant whose overrides change is not mixed with its old runs.
    changed = write_ablation(
        tmp_path, variants=[variants[0], {"name": "layer", "overrides": {NORM: "group"}}]
    )
    with pytest.raises(ValueError, match="variant 'layer' changed since its run layer/seed_0"):
        run_ablation(parse_ablate_config(["--config", str(changed)]))


def test_a_metric_no_run_logs_stops_after_the_first_run(tmp_path: Path, run_cli, capsys) -> None:
    path = write_ablation(tmp_path, metrics={"test/acc": "higher", "val/accuracy": "higher"})
    with pytest.raises(SystemExit) as exit_:
        run_cli(["ablate", "--config", path])
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # after Lightning's warnings
    assert err.startswith("error: ablate config: metrics: 'val/accuracy' was not logged by run")
    assert "batch/seed_0; logged: test/acc, test/loss, time/fit_s" in err
    folder = tmp_path / "ablate" / "tiny"
    states = [t.state.name for t in load_study(folder).trials]
    assert states == ["COMPLETE", "WAITING", "WAITING", "WAITING"]  # the others never started
    # Fixed, the finished run counts: it is not repeated.
    run_cli(["ablate", "--config", write_ablation(tmp_path)])
    trials = load_study(folder).trials
    assert len(trials) == 4 and all(t.state.name == "COMPLETE" for t in trials)


def test_two_workers_share_the_runs(tmp_path: Path, run_cli) -> None:
    run_cli(["ablate", "--config", write_ablation(tmp_path), "--workers=2"])
    trials = load_study(tmp_path / "ablate" / "tiny").trials
    complete = [t for t in trials if t.state.name == "COMPLETE"]
    runs = sorted(t.user_attrs["run"] for t in complete)
    assert runs == ["batch/seed_0", "batch/seed_1", "layer/seed_0", "layer/seed_1"]
    assert len({t.user_attrs["worker"] for t in complete}) == 2
    assert all(t.state.name in ("COMPLETE", "PRUNED") for t in trials)


def test_a_dead_workers_run_is_queued_again(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    from dnn_tricks.ablate.runs import open_study, queue_runs
    from dnn_tricks.search import storage

    monkeypatch.setattr(storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(storage, "GRACE_S", 1)
    path = write_ablation(tmp_path)
    config = parse_ablate_config(["--config", str(path)])
    study = open_study(config)
    queue_runs(config, study)

    def die(trial: optuna.Trial) -> float:
        raise SystemExit  # not caught by Optuna: the run stays RUNNING, its heartbeat stops

    with pytest.raises(SystemExit):
        study.optimize(die)
    time.sleep(2.5)
    run_cli(["ablate", "--config", path])
    rows = read_rows(tmp_path / "ablate" / "tiny" / "results.csv")
    assert [r["state"] for r in rows] == ["COMPLETE"] * 4
    trials = load_study(tmp_path / "ablate" / "tiny").trials
    assert trials[0].state.name == "FAIL" and trials[-1].user_attrs["run"] == "batch/seed_0"
    assert trials[-1].state.name == "COMPLETE"


# -- the shipped ablations -------------------------------------------------------------------

SHIPPED = sorted((CONFIGS / "ablate").glob("*.yaml"))
SMALLEST = CONFIGS / "ablate" / "wine_input_norm.yaml"


@pytest.mark.parametrize("path", SHIPPED, ids=lambda p: p.stem)
def test_shipped_ablation_parses_and_every_variant_resolves(
    path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(REPO)  # base paths are relative to the repository root
    full = parse_ablate_config(["--config", str(path)])
    quick = parse_ablate_config(["--config", str(path), "--budget=quick"])
    assert len(full.run_seeds) >= 5 and len(quick.run_seeds) >= 3
    assert full.baseline in full.variant_names and len(full.variants) >= 2
    variant_fingerprints(quick)  # every override names a key that exists
    resolve_config(full.training_args(full.baseline, full.run_seeds[0]))  # the full budget's keys


def test_smallest_shipped_ablation_runs_at_its_quick_budget(tmp_path: Path, run_cli) -> None:
    """wine input normalization as shipped (--budget quick): 5 variants x 3 seeds."""
    base = yaml.safe_load(SMALLEST.read_text())["base"]
    absolute = "[" + ",".join(str(REPO / b) for b in base) + "]"
    run_cli(["ablate", "--config", SMALLEST, "--budget=quick", f"--base={absolute}"])
    folder = tmp_path / "logs" / "ablate" / "wine_input_norm_quick"
    rows = read_rows(folder / "results.csv")
    assert len(rows) == 15 and {r["state"] for r in rows} == {"COMPLETE"}
    summary = (folder / "summary.md").read_text()
    # The lecture's claim at the smallest budget: plain SGD on raw wine features (proline
    # ~1e3) does far worse than on standardized ones.
    section = summary.split("## test/acc")[1].split("## ")[0]
    line = next(x for x in section.splitlines() if x.startswith("| standardize |"))
    assert line.split("|")[-3].strip() == "better", line


@pytest.mark.slow
@pytest.mark.parametrize("path", [p for p in SHIPPED if p != SMALLEST], ids=lambda p: p.stem)
def test_shipped_ablation_runs_at_its_quick_budget(path: Path, tmp_path: Path, run_cli) -> None:
    """Each of the others at --budget quick (minutes each; run with -m slow)."""
    if "fashion_mnist" in "".join(yaml.safe_load(path.read_text())["base"]):
        if not (FASHION_MNIST / "train-images-idx3-ubyte.gz").exists():
            pytest.skip("Debian's dataset-fashion-mnist is not installed")
    base = yaml.safe_load(path.read_text())["base"]
    absolute = "[" + ",".join(str(REPO / b) for b in base) + "]"
    run_cli(["ablate", "--config", path, "--budget=quick", f"--base={absolute}"])
    rows = read_rows(tmp_path / "logs" / "ablate" / f"{path.stem}_quick" / "results.csv")
    assert {r["state"] for r in rows} == {"COMPLETE"}
