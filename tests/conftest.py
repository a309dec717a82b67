"""Shared test plumbing: benchmarks only on request; in CI, no integration test may skip;
hypothesis runs few examples locally and many in CI.

Skip markers live in tests/markers.py (``from markers import needs_root``).
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

# Property tests: a quick profile for a developer's run, a thorough one in CI
# (.ci/run sets CI=true).  BYTEBACK_HYPOTHESIS_PROFILE picks one by name.
settings.register_profile("dev", max_examples=100, deadline=None, database=None)
settings.register_profile("ci", max_examples=1000, deadline=None, database=None)
settings.load_profile(os.environ.get("BYTEBACK_HYPOTHESIS_PROFILE")
                      or ("ci" if os.environ.get("CI") == "true" else "dev"))

INTEGRATION_DIR = Path(__file__).parent / "integration"
_skipped_integration_modules = []   # "path: reason", reported at the end of the run


def _require_integration() -> bool:
    """True when CI demands that every integration test really runs (.ci/run sets it)."""
    return os.environ.get("BYTEBACK_REQUIRE_INTEGRATION") == "1"


def _in_integration_dir(path) -> bool:
    path = Path(str(path))
    return path == INTEGRATION_DIR or INTEGRATION_DIR in path.parents


def _skip_reason(longrepr) -> str:
    # A skip's longrepr is (file, line, "Skipped: <reason>"); keep the reason.
    text = str(longrepr[2]) if isinstance(longrepr, tuple) and len(longrepr) == 3 else str(longrepr)
    return text[len("Skipped: "):] if text.startswith("Skipped: ") else text


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    """Mark everything under tests/integration `integration`; drop `bench` unless asked for.

    tryfirst: runs before `-m` deselects, so `-m "not integration"` sees the mark.
    Benchmarks are dropped here rather than by `-m "not bench"` in addopts, because
    any `-m` on the command line would replace that and let benchmarks in.
    """
    wants_bench = "bench" in (config.getoption("markexpr") or "")
    kept, dropped = [], []
    for item in items:
        if _in_integration_dir(item.path):
            item.add_marker(pytest.mark.integration)
        if not wants_bench and item.get_closest_marker("bench") is not None:
            dropped.append(item)
        else:
            kept.append(item)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """Turn the skip of an `integration` test into a failure that shows why (STYLE.md #16)."""
    outcome = yield
    report = outcome.get_result()
    if (_require_integration() and report.skipped and not hasattr(report, "wasxfail")
            and item.get_closest_marker("integration") is not None):
        report.outcome = "failed"
        report.longrepr = ("integration test skipped, but BYTEBACK_REQUIRE_INTEGRATION=1 "
                           "forbids it: " + _skip_reason(report.longrepr))


@pytest.hookimpl(hookwrapper=True)
def pytest_make_collect_report(collector):
    """Note an integration module skipped at import (importorskip, allow_module_level).

    Failing the collect report itself would abort the whole run, so the skip is
    recorded here and fails the session in pytest_sessionfinish instead.
    """
    outcome = yield
    report = outcome.get_result()
    if _require_integration() and report.skipped and _in_integration_dir(collector.path):
        _skipped_integration_modules.append(
            "%s: %s" % (report.nodeid, _skip_reason(report.longrepr)))


def pytest_sessionfinish(session):
    if _skipped_integration_modules and session.exitstatus == pytest.ExitCode.OK:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED


def pytest_terminal_summary(terminalreporter):
    if _skipped_integration_modules:
        terminalreporter.section("integration modules skipped, but BYTEBACK_REQUIRE_INTEGRATION=1 "
                                 "forbids it", red=True)
        for line in _skipped_integration_modules:
            terminalreporter.line(line, red=True)
