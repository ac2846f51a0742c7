"""The database that workers share (SQLite on one machine, a server such as PostgreSQL for
several), with Optuna's heartbeat: a running trial whose worker stops beating for GRACE_S
seconds is failed before the next trial is asked for, and handed to ``on_stale``."""

from __future__ import annotations

import os
import random
import socket
import time
import warnings
from collections.abc import Callable
from pathlib import Path

import optuna
import sqlalchemy
from optuna.trial import FrozenTrial

HEARTBEAT_S = 10
GRACE_S = 30

StaleCallback = Callable[[optuna.Study, FrozenTrial], None]


def open_storage(url: str, on_stale: StaleCallback | None = None) -> optuna.storages.RDBStorage:
    """The study database at ``url`` (its tables are created on first use).

    Workers started at the same moment race to create the tables, which Optuna does not
    retry (only trial creation), so opening is retried a few times before failing."""
    sqlite = url.startswith("sqlite:///")
    if sqlite:
        Path(url.removeprefix("sqlite:///")).parent.mkdir(parents=True, exist_ok=True)
    for attempt in range(4):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                storage = optuna.storages.RDBStorage(
                    url,
                    # writers wait for each other's short transactions instead of failing
                    engine_kwargs={"connect_args": {"timeout": 60}} if sqlite else None,
                    heartbeat_interval=HEARTBEAT_S,
                    grace_period=GRACE_S,
                    heartbeat_stale_trial_callback=on_stale,
                )
            if sqlite:
                _lock_on_begin(storage.engine)
            return storage
        except (sqlalchemy.exc.SQLAlchemyError, RuntimeError, AssertionError) as error:
            if attempt == 3:
                shown = sqlalchemy.engine.make_url(url).render_as_string(hide_password=True)
                first = str(error).strip().splitlines()[0] if str(error).strip() else ""
                raise ValueError(
                    f"storage: cannot open {shown}: {type(error).__name__}: {first}"
                ) from None
            time.sleep(0.2 + random.random())
    raise AssertionError("unreachable")


def _lock_on_begin(engine: sqlalchemy.engine.Engine) -> None:
    """Start every SQLite transaction with BEGIN IMMEDIATE (the write lock).

    Optuna hands a waiting trial to one worker by reading it ``FOR UPDATE`` and setting it
    RUNNING; SQLite has no ``FOR UPDATE``, and Python's sqlite3 opens the transaction only at
    the write, so two workers could both read WAITING and both run the trial (seen: "Cannot
    tell a COMPLETE trial"). Holding the lock from the read on makes the second worker see
    RUNNING and take the next trial. (SQLAlchemy's documented pysqlite recipe.)"""

    @sqlalchemy.event.listens_for(engine, "connect")
    def _no_implicit_begin(connection, record) -> None:
        connection.isolation_level = None  # sqlite3 issues no BEGIN of its own

    @sqlalchemy.event.listens_for(engine, "begin")
    def _begin_immediate(connection) -> None:
        connection.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections opened while creating the tables lack the listener


def worker_id() -> str:
    """Which process ran a trial: host:pid."""
    return f"{socket.gethostname()}:{os.getpid()}"
