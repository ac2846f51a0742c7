"""No silent skips in CI: under ``DNN_TRICKS_REQUIRE_ALL=1`` (set by ``.ci/run``) a skipped
test FAILS, unless it needs a GPU (marked ``gpu``, or skipped with a reason naming CUDA or a
GPU). A missing dataset, PostgreSQL server or optional dependency is then a red CI run
instead of a green one that tested less. Elsewhere skips stay skips, and pytest's ``-ra``
summary names them.

Loaded by tests/conftest.py (which imports the hook below); tests/test_reliability.py checks
it in a pytest session of its own (``-p skip_policy``)."""

from __future__ import annotations

import os
import re

import pytest

REQUIRE_ALL = "DNN_TRICKS_REQUIRE_ALL"
_GPU_REASON = re.compile(r"\b(CUDA|GPUs?)\b")


def require_all() -> bool:
    return os.environ.get(REQUIRE_ALL, "") not in ("", "0")


def _reason(report: pytest.TestReport) -> str:
    longrepr = report.longrepr
    if isinstance(longrepr, tuple) and len(longrepr) == 3:  # (file, line, "Skipped: why")
        return str(longrepr[2]).removeprefix("Skipped: ")
    return str(longrepr)


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    outcome = yield
    report = outcome.get_result()
    if not (report.skipped and require_all()) or hasattr(report, "wasxfail"):
        return
    reason = _reason(report)
    if item.get_closest_marker("gpu") is not None or _GPU_REASON.search(reason):
        return
    report.outcome = "failed"
    report.longrepr = f"skipped under {REQUIRE_ALL}=1, where only GPU tests may skip: {reason}"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (the only skip allowed in CI)")
