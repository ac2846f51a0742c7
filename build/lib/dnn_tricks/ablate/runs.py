"""The ablation's runs on the search's machinery: one Optuna study per ablation, in the same
storage (SQLite by default, a server for several machines), each (variant, seed) a trial
that is a normal fit.

The runs are a fixed list, so they are queued with Optuna's ``enqueue_trial`` and workers take
them with ``study.optimize``, whose ``ask`` hands each waiting trial to exactly one worker.
Optuna's heartbeat fails the run of a worker that died and re-queues it
(``RetryHeartbeatStaleTrialCallback``). Re-running the command queues only the runs that have
not completed; a failed run is recorded with its error and queued again by the next re-run."""

from __future__ import annotations

import time

import optuna
from optuna.storages import RetryHeartbeatStaleTrialCallback
from optuna.trial import FrozenTrial, TrialState

from dnn_tricks.ablate.config import LABEL, AblateConfig, variant_fingerprints
from dnn_tricks.redact import redact
from dnn_tricks.search.fit import MetricMissing, fit, quiet, run_args
from dnn_tricks.search.storage import open_storage, worker_id

PENDING = (TrialState.RUNNING, TrialState.WAITING)
NOT_QUEUED = "not run: the queue was empty when this worker asked"


def run_key(variant: str, seed: int) -> str:
    return f"{variant}/seed_{seed}"


def open_study(config: AblateConfig) -> optuna.Study:
    # A run whose worker died is queued again, twice at most (a run that kills its worker
    # every time, e.g. out of memory, must not loop forever).
    storage = open_storage(config.storage_url, RetryHeartbeatStaleTrialCallback(max_retry=2))
    return optuna.create_study(
        study_name=config.name, storage=storage, direction="minimize", load_if_exists=True
    )


def trials_by_run(study: optuna.Study) -> dict[str, list[FrozenTrial]]:
    """Every trial that was queued for a run, oldest first."""
    out: dict[str, list[FrozenTrial]] = {}
    for trial in study.get_trials(deepcopy=False):
        key = trial.user_attrs.get("run")
        if key is not None:
            out.setdefault(key, []).append(trial)
    return out


def queue_runs(config: AblateConfig, study: optuna.Study) -> int:
    """Check every variant's config, then queue each run that has no complete, running or
    waiting trial; returns how many runs are queued now. A variant whose config changed
    since it completed runs is an error: its old and new runs would be mixed."""
    prints = variant_fingerprints(config)
    with quiet():  # stale trials of dead workers are failed (and re-queued) first
        optuna.storages.fail_stale_trials(study)
    existing = trials_by_run(study)
    for variant, seed in config.runs():
        trials = existing.get(run_key(variant, seed), [])
        done = [t for t in trials if t.state == TrialState.COMPLETE]
        stale = [t for t in done if t.user_attrs.get("fingerprint") != prints[variant]]
        if stale:
            raise ValueError(
                f"{LABEL}: variant {variant!r} changed since its run {run_key(variant, seed)} "
                f"completed; give the ablation another name or delete {config.folder}"
            )
        if done or any(t.state in PENDING for t in trials):
            continue
        study.enqueue_trial(
            {"variant": variant, "seed": seed},
            user_attrs={"run": run_key(variant, seed), "fingerprint": prints[variant]},
        )
    return len(study.get_trials(deepcopy=False, states=(TrialState.WAITING,)))


class _Objective:
    """One run per trial: the queued (variant, seed) as a normal fit; every scalar it logged
    is kept with the trial. The value Optuna records is the fit's wall time."""

    def __init__(self, config: AblateConfig, study: optuna.Study) -> None:
        self.config, self.study = config, study
        self.stop_error: MetricMissing | None = None
        self.test = any(metric.startswith("test/") for metric in config.metrics)

    def __call__(self, trial: optuna.Trial) -> float:
        key = trial.user_attrs.get("run")
        if key is None:  # another worker took the last queued run between check and ask
            self.study.stop()
            trial.set_user_attr("note", NOT_QUEUED)
            raise optuna.TrialPruned(NOT_QUEUED)
        other = self._taken(key, trial.number)
        if other is not None:  # two machines queued the same run at the same moment
            trial.set_user_attr("note", f"not run: trial {other} has this run")
            raise optuna.TrialPruned(f"trial {other} has this run")
        variant = trial.suggest_categorical("variant", self.config.variant_names)
        seed = int(trial.suggest_categorical("seed", self.config.run_seeds))
        trial.set_user_attr("worker", worker_id())
        save_dir = str(self.config.folder / variant)
        extra = run_args(save_dir, f"seed_{seed}", self.config.run_timeout)
        try:
            result = fit(self.config.training_args(variant, seed) + extra, test=self.test)
        except Exception as error:
            note = redact(f"{type(error).__name__}: {error}".splitlines()[0])[:500]
            trial.set_user_attr("error", note)  # -> the trials table: no storage password
            raise
        logger = result.trainer.logger
        trial.set_user_attr("log_dir", str(getattr(logger, "log_dir", "") or ""))
        trial.set_user_attr("metrics", result.metrics)
        self._check_metrics(key, result.metrics)
        return result.metrics["time/fit_s"]

    def _taken(self, key: str, number: int) -> int | None:
        """The trial that owns this run instead: a complete one, or an earlier one that is
        running or waiting (so of two copies exactly one runs, whoever starts first)."""
        for trial in trials_by_run(self.study).get(key, []):
            if trial.number == number:
                continue
            if trial.state == TrialState.COMPLETE or (
                trial.state in PENDING and trial.number < number
            ):
                return trial.number
        return None

    def _check_metrics(self, key: str, logged: dict[str, float]) -> None:
        """A metric this run did not log is an error if no completed run logged it: a
        misspelt name. The run itself is kept, so fixing the name needs no re-run."""
        missing = [m for m in self.config.metrics if m not in logged]
        if not missing:
            return
        complete = self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
        seen = {m for t in complete for m in t.user_attrs.get("metrics", {})}
        unknown = [m for m in missing if m not in seen]
        if unknown and self.stop_error is None:
            names = ", ".join(sorted(logged))
            self.stop_error = MetricMissing(
                f"{LABEL}: metrics: {unknown[0]!r} was not logged by run {key}; logged: {names}"
            )
            self.study.stop()

    def announce(self, study: optuna.Study, trial: FrozenTrial) -> None:
        """One line per run (an Optuna callback); stops this worker once the queue is empty."""
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            study.stop()
        metrics = trial.user_attrs.get("metrics", {})
        shown = ", ".join(f"{m}={metrics[m]:.4g}" for m in self.config.metrics if m in metrics)
        note = trial.user_attrs.get("error") or trial.user_attrs.get("note", "")
        print(
            f"ablate: {trial.user_attrs.get('run', f'trial {trial.number}')} "
            f"{trial.state.name}{f' {shown}' if shown else ''}"
            f"{f' in {trial.value:.1f} s' if trial.value is not None else ''}"
            f"{f' ({note})' if note else ''}",
            flush=True,
        )


def work(config: AblateConfig) -> None:
    """One worker: take queued runs until none is left (what each worker process runs)."""
    with quiet():
        study = open_study(config)
        if not study.get_trials(deepcopy=False, states=(TrialState.WAITING,)):
            return  # optimize would create a fresh trial before any callback could stop it
        objective = _Objective(config, study)
        start = time.monotonic()
        study.optimize(objective, catch=(Exception,), callbacks=[objective.announce])
        if objective.stop_error is not None:
            raise objective.stop_error
        print(f"ablate: worker {worker_id()} done in {time.monotonic() - start:.0f} s", flush=True)
