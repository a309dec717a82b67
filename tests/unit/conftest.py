"""Fixtures for the unit tests: a clean environment, a quiet logger, tiny real stores.

Every unit test runs without the environment of whoever runs the suite:
no SUDO_USER (which makes the privileged commands refuse overrides), no
BYTEBACK_CONFIG_DIR, and a client state directory inside tmp_path.
"""
from __future__ import annotations

import logging
import os
import time

import pytest

import byteback
from unit_helpers import TinyStore


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch, tmp_path):
    """No sudo, no config dir from the caller, state under tmp_path; reset the logger after."""
    monkeypatch.delenv("SUDO_USER", raising=False)
    monkeypatch.delenv("BYTEBACK_CONFIG_DIR", raising=False)
    monkeypatch.setenv("BYTEBACK_STATE_DIR", str(tmp_path / "client-state"))
    saved = dict(os.environ)
    yield
    # main() run as if under sudo scrubs the whole environment (issue 8, class 7).
    if os.environ != saved:
        os.environ.clear()
        os.environ.update(saved)
        time.tzset()
    # main() points the handler at the sys.stderr of its test (capsys); a later
    # test must not log into that closed stream.
    byteback.log.handlers.clear()
    byteback.log.setLevel(logging.NOTSET)


@pytest.fixture
def tiny(tmp_path) -> TinyStore:
    """An empty HardlinkStore under tmp_path/store, built up with real directories."""
    return TinyStore(tmp_path / "store")
