"""``trainer search``: spaces, sampler, resumable SQLite studies, failing trials, the outputs
(trials.csv, best_config.yaml, plots) and several workers sharing one study."""

from __future__ import annotations

import csv
import math
import os
import subprocess
import sys
import uuid
from pathlib import Path

import numpy as np
import optuna
import pytest
import yaml

from conftest import CONFIGS
from dnn_tricks.search import SearchConfig
from dnn_tricks.search.config import parse_search_config, suggest
from dnn_tricks.search.study import OVER_BUDGET, _Objective, make_sampler

optuna.logging.set_verbosity(optuna.logging.WARNING)

LR = "model.optimizer.init_args.lr"
DROPOUT = "model.net.init_args.dropout"
HIDDEN = "model.net.init_args.hidden"
BATCH = "data.batch_size"


def write_search(folder: Path, n_trials: int, space: dict, **extra: object) -> Path:
    """A search over the digits config shrunk to seconds-long trials."""
    config = {
        "base": [str(CONFIGS / "digits.yaml")],
        "study_name": "tiny",
        "log_dir": str(folder / "search"),
        "n_trials": n_trials,
        "pruner": "none",
        "test_best": False,
        "fixed": {
            "trainer.max_epochs": 2,
            "trainer.limit_train_batches": 3,
            "trainer.limit_val_batches": 1,
            "trainer.log_every_n_steps": 1,
            "model.scheduler": None,
        },
        "space": space,
        **extra,
    }
    path = folder / f"search_{uuid.uuid4().hex[:6]}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


SMALL_SPACE = {
    LR: {"type": "log_uniform", "low": 1e-3, "high": 0.1},
    DROPOUT: {"type": "uniform", "low": 0.0, "high": 0.3},
    HIDDEN: {"type": "categorical", "choices": [[32], [64, 32]]},
}


def load_study(path: Path, name: str = "tiny") -> optuna.Study:
    return optuna.load_study(study_name=name, storage=f"sqlite:///{path}")


def test_space_parses_and_samples_in_range(tmp_path: Path) -> None:
    space = {
        "a": {"type": "log_uniform", "low": 1e-4, "high": 1e-1},
        "b": {"type": "uniform", "low": -1.0, "high": 3.0},
        "c": {"type": "int", "low": 16, "high": 256, "step": 16},
        "d": {"type": "int", "low": 1, "high": 1000, "log": True},
        "e": {"type": "categorical", "choices": [[128], [256, 128], "none", 0.5]},
    }
    config = parse_search_config(["--config", str(write_search(tmp_path, 1, space))])
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=0))
    draws = [suggest(study.ask(), config.space) for _ in range(400)]
    a = np.array([d["a"] for d in draws])
    assert a.min() >= 1e-4 and a.max() <= 1e-1
    # Log-uniform: log10(a) is uniform on [-4, -1], so its mean is -2.5 and a quarter of the
    # draws lie below 10^-3.25 (a plain uniform would put 99.9% of them above 1e-3).
    assert abs(np.log10(a).mean() + 2.5) < 0.15 and abs((a < 10**-3.25).mean() - 0.25) < 0.07
    b = np.array([d["b"] for d in draws])
    assert b.min() >= -1 and b.max() <= 3 and abs(b.mean() - 1.0) < 0.2
    c = {d["c"] for d in draws}
    assert c <= set(range(16, 257, 16)) and len(c) > 10
    assert all(isinstance(d["d"], int) and 1 <= d["d"] <= 1000 for d in draws)
    assert np.median([d["d"] for d in draws]) < 100  # log scale: median near sqrt(1000)
    picked = [d["e"] for d in draws]
    for choice in ([128], [256, 128], "none", 0.5):  # lists come back as lists
        assert choice in picked
    unnamed = write_search(tmp_path, 1, space, study_name=None)
    assert parse_search_config(["--config", str(unnamed)]).study_name == unnamed.stem


@pytest.mark.parametrize(
    ("space", "extra", "message"),
    [
        ({"x": {"type": "uniform", "lowe": 1}}, {}, "lowe"),
        ({"x": {"type": "unif", "low": 1, "high": 2}}, {}, "unif"),
        ({"x": {"type": "uniform", "low": 2, "high": 1}}, {}, "space.x: .*low <= high.*low=2"),
        ({"x": {"type": "log_uniform", "low": 0, "high": 1}}, {}, "space.x: .*low > 0.*log"),
        ({"x": {"type": "uniform", "low": 0, "high": 1, "step": -1}}, {}, "space.x: .*step > 0"),
        ({"x": {"type": "int", "low": 1.5, "high": 4}}, {}, "space.x: low=1.5"),
        ({"x": {"type": "categorical", "choices": []}}, {}, "space.x: a categorical"),
        ({}, {"n_trails": 3}, "n_trails"),
        ({}, {"sampler": "grid"}, "grid"),
    ],
)
def test_bad_search_config_is_one_clear_line(
    tmp_path: Path, space: dict, extra: dict, message: str
) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")) as error:
        parse_search_config(["--config", str(write_search(tmp_path, 1, space, **extra))])
    assert "\n" not in str(error.value)


def test_misspelt_space_key_stops_before_any_trial(tmp_path: Path, run_cli) -> None:
    space = {"model.optimizer.init_args.lrr": {"type": "uniform", "low": 0.1, "high": 0.2}}
    with pytest.raises(SystemExit) as exit_:
        run_cli(["search", "--config", write_search(tmp_path, 3, space)])
    assert exit_.value.code == 2
    study = load_study(tmp_path / "search" / "tiny" / "study.db")
    assert len(study.trials) == 0


def test_random_sampler_default_and_trial_n_seeded_with_seed_plus_n(tmp_path: Path) -> None:
    config = SearchConfig(base=["x.yaml"], space={}, seed=7)
    assert config.sampler == "random" and config.pruner == "median"
    sampler = make_sampler(config, 3)
    assert type(sampler) is optuna.samplers.RandomSampler
    # Reference: Optuna's RandomSampler seeded 7 + 3 by hand, on a fresh study.
    reference = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=10)).ask()
    mine = optuna.create_study(sampler=sampler).ask()
    assert mine.suggest_float("lr", 1e-4, 1.0, log=True) == reference.suggest_float(
        "lr", 1e-4, 1.0, log=True
    )
    assert type(make_sampler(SearchConfig(base=["x"], sampler="tpe"), 0)).__name__ == "TPESampler"


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as handle:
        return list(csv.DictReader(handle))


def test_resume_outputs_and_best_config_fits(tmp_path: Path, run_cli) -> None:
    base = tmp_path / "experiment.yaml"  # an overlay of the digits config, changed below
    base.write_text(f"config: {CONFIGS / 'digits.yaml'}\ndata.batch_size: 32\n")
    search = write_search(tmp_path, 2, SMALL_SPACE, test_best=True, base=[str(base)])
    folder = tmp_path / "search" / "tiny"
    run_cli(["search", "--config", search])
    assert len(load_study(folder / "study.db").trials) == 2
    run_cli(["search", "--config", search, "--n_trials=4"])  # continues the same study
    # The base changes after the trials: best_config.yaml still holds what the best ran.
    base.write_text(base.read_text().replace("batch_size: 32", "batch_size: 48"))
    run_cli(["search", "--config", search, "--n_trials=4"])  # budget spent: no new trial
    study = load_study(folder / "study.db")
    assert [t.number for t in study.trials] == [0, 1, 2, 3]
    assert all(t.state.name == "COMPLETE" for t in study.trials)
    space = parse_search_config(["--config", str(search)]).space
    for t in study.trials:  # trial n sampled with RandomSampler(seed=0 + n), as it would have
        ref = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=t.number)).ask()
        suggest(ref, space)  # in an uninterrupted run
        assert t.params == ref.params
        assert (folder / f"trial_{t.number}" / "version_0" / "checkpoints").is_dir()

    rows = read_csv(folder / "trials.csv")
    assert [int(r["number"]) for r in rows] == [t.number for t in study.trials]
    for row, t in zip(rows, study.trials, strict=True):
        assert row["state"] == "COMPLETE" and math.isclose(float(row["value"]), t.value)
        assert math.isclose(float(row[LR]), t.params[LR]) and row[HIDDEN] == t.params[HIDDEN]
        assert float(row["duration_s"]) == pytest.approx(t.duration.total_seconds(), abs=0.06)
    for name in ("history", "importances"):
        assert (folder / f"{name}.png").read_bytes()[:4] == b"\x89PNG"

    best_path = folder / "best_config.yaml"
    best = yaml.safe_load(best_path.read_text())
    chosen = study.best_trial.params
    assert best["model"]["optimizer"]["init_args"]["lr"] == chosen[LR]
    assert best["model"]["net"]["init_args"]["hidden"] == yaml.safe_load(chosen[HIDDEN])
    assert best["trainer"]["max_epochs"] == 2  # the fixed overrides the trial was judged by
    assert best["data"]["batch_size"] == 32
    assert best["trainer"]["logger"]["init_args"]["save_dir"] == "logs"
    assert "enable_progress_bar" not in best["trainer"]  # trial housekeeping is not kept
    run_cli(["fit", "--config", best_path])  # as is
    run = tmp_path / "logs" / "tiny_best" / "version_0"
    saved = yaml.safe_load((run / "config.yaml").read_text())
    assert saved["model"]["optimizer"]["init_args"]["lr"] == chosen[LR]
    assert list((run / "checkpoints").glob("best-*.ckpt"))


def test_failing_trials_are_recorded_and_the_search_goes_on(tmp_path: Path, run_cli) -> None:
    space = {  # dropout 1.5 is rejected by the MLP; lr 1e30 overflows the loss to inf/NaN
        DROPOUT: {"type": "categorical", "choices": [0.1, 1.5]},
        LR: {"type": "categorical", "choices": [0.05, 1.0e30]},
    }
    run_cli(["search", "--config", write_search(tmp_path, 5, space, seed=1)])
    study = load_study(tmp_path / "search" / "tiny" / "study.db")
    assert len(study.trials) == 5
    for t in study.trials:
        bad_dropout, bad_lr = t.params[DROPOUT] == 1.5, t.params[LR] == 1.0e30
        assert t.state.name == ("FAIL" if bad_dropout or bad_lr else "COMPLETE"), t.params
        if bad_dropout:
            assert "dropout=1.5" in t.user_attrs["error"]
        elif bad_lr:
            assert t.user_attrs["error"].startswith("FloatingPointError")
    states = {t.state.name for t in study.trials}
    assert states == {"FAIL", "COMPLETE"}, "seed 1 should draw good and bad trials"
    rows = read_csv(tmp_path / "search" / "tiny" / "trials.csv")
    assert [r["note"] for r in rows] == [t.user_attrs.get("error", "") for t in study.trials]


def test_unlogged_metric_stops_the_search(tmp_path: Path, run_cli) -> None:
    config = write_search(tmp_path, 3, SMALL_SPACE, metric="val/accuracy")
    with pytest.raises(ValueError, match="metric='val/accuracy' was not logged"):
        from dnn_tricks.search import run_search

        run_search(parse_search_config(["--config", str(config)]))
    study = load_study(tmp_path / "search" / "tiny" / "study.db")
    assert [t.state.name for t in study.trials] == ["FAIL"]


def run_workers(config: Path, cwd: Path, extra: list[str], workers: int = 2) -> None:
    """``workers`` separate ``trainer search`` commands at once, as on separate machines."""
    env = {**os.environ, "NO_ALBUMENTATIONS_UPDATE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "dnn_tricks.cli", "search", "--config", str(config)]
    procs = [
        subprocess.Popen(
            command + extra, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT
        )
        for _ in range(workers)
    ]
    outputs = [p.communicate(timeout=240)[0].decode() for p in procs]
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out[-3000:]


def check_shared_study(study: optuna.Study, n_trials: int, folder: Path) -> None:
    """Exactly n_trials fits, numbered 0..n-1, from both workers, none duplicated. A worker
    that lost the race for the last number records a pruned trial it did not train."""
    trials = [t for t in study.trials if t.number < n_trials]
    assert sorted(t.number for t in trials) == list(range(n_trials))
    assert all(t.state.name == "COMPLETE" for t in trials)
    assert len({tuple(sorted(t.params.items())) for t in trials}) == n_trials  # no duplicate
    assert len({t.user_attrs["worker"] for t in trials}) == 2, "both workers ran trials"
    for t in study.trials[n_trials:]:
        assert t.state.name == "PRUNED" and t.user_attrs["note"] == OVER_BUDGET
        assert not (folder / f"trial_{t.number}").exists()
    assert len(study.trials) <= n_trials + 1


def test_two_workers_share_one_sqlite_study(tmp_path: Path, run_cli) -> None:
    config = write_search(tmp_path, 4, {LR: SMALL_SPACE[LR]})
    run_cli(["search", "--config", config, "--workers=2"])
    folder = tmp_path / "search" / "tiny"
    check_shared_study(load_study(folder / "study.db"), 4, folder)


def test_a_dead_workers_trial_is_failed_by_the_heartbeat_and_counted(
    tmp_path: Path, run_cli, monkeypatch: pytest.MonkeyPatch
) -> None:
    import time

    from dnn_tricks.search import storage

    monkeypatch.setattr(storage, "HEARTBEAT_S", 1)
    monkeypatch.setattr(storage, "GRACE_S", 1)
    config = write_search(tmp_path, 2, {LR: SMALL_SPACE[LR]})
    url = f"sqlite:///{tmp_path / 'search' / 'tiny' / 'study.db'}"
    study = optuna.create_study(
        study_name="tiny", direction="maximize", storage=storage.open_storage(url)
    )

    def die(trial: optuna.Trial) -> float:
        raise SystemExit  # not caught by Optuna: trial 0 stays RUNNING, its heartbeat stops

    with pytest.raises(SystemExit):
        study.optimize(die)
    time.sleep(2.5)
    run_cli(["search", "--config", config])
    trials = load_study(tmp_path / "search" / "tiny" / "study.db").trials
    assert [t.state.name for t in trials] == ["FAIL", "COMPLETE"]  # n_trials=2 counts the dead


def test_a_trial_numbered_past_the_budget_does_not_train(tmp_path: Path) -> None:
    config = parse_search_config(["--config", str(write_search(tmp_path, 1, SMALL_SPACE))])
    study = optuna.create_study()
    study.ask()  # trial 0: another worker's, asked just before this worker's trial 1
    study.optimize(_Objective(config, study), n_trials=5)  # the objective stops the loop
    assert [t.state.name for t in study.trials] == ["RUNNING", "PRUNED"]
    assert study.trials[1].user_attrs == {"note": OVER_BUDGET}


POSTGRES = os.environ.get("DNN_TRICKS_TEST_POSTGRES_URL")


@pytest.mark.skipif(not POSTGRES, reason="DNN_TRICKS_TEST_POSTGRES_URL is not set")
def test_two_workers_share_one_postgres_study(tmp_path: Path) -> None:
    name = f"tiny_{uuid.uuid4().hex[:8]}"
    config = write_search(tmp_path, 5, {LR: SMALL_SPACE[LR]}, study_name=name, storage=POSTGRES)
    try:
        run_workers(config, tmp_path, [])
        folder = tmp_path / "search" / name
        check_shared_study(optuna.load_study(study_name=name, storage=POSTGRES), 5, folder)
    finally:
        optuna.delete_study(study_name=name, storage=POSTGRES)


def test_shipped_digits_search_runs_shrunk(tmp_path: Path, run_cli) -> None:
    """configs/search/digits.yaml as shipped, with two seconds-long trials."""
    fixed = {
        "trainer.max_epochs": 1,
        "trainer.limit_train_batches": 3,
        "trainer.limit_val_batches": 1,
        "trainer.log_every_n_steps": 1,
        "model.scheduler.init_args.T_max": 1,
    }
    shipped = CONFIGS / "search" / "digits.yaml"
    run_cli(
        ["search", "--config", shipped, f"--base=[{CONFIGS / 'digits.yaml'}]", "--n_trials=2"]
        + [f"--fixed={yaml.safe_dump(fixed, default_flow_style=True).strip()}"]
        + ["--log_dir=search"]
    )
    study = load_study(tmp_path / "search" / "digits" / "study.db", name="digits")
    assert len(study.trials) == 2 and study.direction.name == "MAXIMIZE"
    assert set(study.trials[0].params) == set(yaml.safe_load(shipped.read_text())["space"])
    assert (tmp_path / "search" / "digits" / "best_config.yaml").is_file()


def test_shipped_optimizer_lr_search_samples_whole_optimizers(tmp_path: Path, run_cli) -> None:
    """configs/search/optimizer_lr.yaml, two trials of a few batches: a categorical choice is a
    whole optimizer (class_path + init_args), and the sampled lr lands inside it."""
    shipped = CONFIGS / "search" / "optimizer_lr.yaml"
    spec = yaml.safe_load(shipped.read_text())
    fixed = {
        **spec["fixed"],
        "trainer.max_epochs": 1,
        "trainer.limit_train_batches": 3,
        "trainer.limit_val_batches": 1,
        "trainer.log_every_n_steps": 1,
    }
    run_cli(
        ["search", "--config", shipped, f"--base=[{CONFIGS / 'digits.yaml'}]", "--n_trials=2"]
        + [f"--fixed={yaml.safe_dump(fixed, default_flow_style=True, width=10**6).strip()}"]
        + ["--log_dir=search", "--seed=3"]
    )
    study = load_study(tmp_path / "search" / "optimizer_lr" / "study.db", name="optimizer_lr")
    assert [t.state.name for t in study.trials] == ["COMPLETE", "COMPLETE"]
    choices = spec["space"]["model.optimizer"]["choices"]
    for t in study.trials:
        ran = yaml.safe_load(t.user_attrs["config"])["model"]["optimizer"]
        chosen = yaml.safe_load(t.params["model.optimizer"])
        assert chosen in choices
        assert ran["class_path"] == chosen["class_path"]
        assert {k: ran["init_args"][k] for k in chosen["init_args"]} == chosen["init_args"]
        assert ran["init_args"]["lr"] == t.params[LR]


def test_two_workers_never_take_the_same_waiting_trial(tmp_path: Path) -> None:
    """The race behind a flaky two-worker ablation, replayed: worker A has read the waiting
    trial and stalls before setting it RUNNING; worker B asks meanwhile. Exactly one of them
    may get it (Optuna's own rule: RUNNING only from WAITING)."""
    import threading
    import time

    import sqlalchemy
    from optuna.trial import TrialState

    from dnn_tricks.search.storage import open_storage

    url = f"sqlite:///{tmp_path / 'study.db'}"
    first, second = open_storage(url), open_storage(url)
    study = optuna.create_study(study_name="race", storage=first)
    study.enqueue_trial({"x": 1.0})
    trial_id = study.get_trials(deepcopy=False)[0]._trial_id
    has_read, results = threading.Event(), {}

    @sqlalchemy.event.listens_for(first.engine, "after_cursor_execute")
    def stall(connection, cursor, statement, *args) -> None:
        if statement.lstrip().upper().startswith("SELECT") and "FROM trials" in statement:
            if not has_read.is_set():
                has_read.set()
                time.sleep(1.0)  # A holds what it read; B asks now

    def take(name: str, storage) -> None:
        results[name] = storage.set_trial_state_values(trial_id, TrialState.RUNNING)

    worker_a = threading.Thread(target=take, args=("a", first))
    worker_a.start()
    assert has_read.wait(10)
    take("b", second)
    worker_a.join()
    assert sorted(results.values()) == [False, True], results
