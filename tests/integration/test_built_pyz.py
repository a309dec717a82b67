"""The built byteback.pyz, run as a user runs it (issue 9: no CLI test ran the zipapp).

Everything else in the suite imports byteback.py or runs it as a script; this
module builds the zipapp with ./build.sh and runs that file alone, from a
directory that holds no copy of the source, so what is tested is what ships.
"""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from markers import needs_rsync
from remote_env import build_pyz

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pyz(tmp_path_factory) -> Path:
    return build_pyz(tmp_path_factory.mktemp("pyz"))


def run(pyz: Path, *args: str, cwd: Path, env: dict = None) -> subprocess.CompletedProcess:
    environment = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "BYTEBACK_CONFIG_DIR")}
    environment.update(env or {})
    return subprocess.run([str(pyz), *args], cwd=cwd, env=environment, capture_output=True,
                          text=True, timeout=120)


def test_help_names_every_command(pyz, tmp_path):
    proc = run(pyz, "--help", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    for command in ("backup", "restore", "status", "prune", "snapshot", "receive",
                    "setup-server", "setup-client", "simulate"):
        assert command in proc.stdout
    version = run(pyz, "--version", cwd=tmp_path)
    assert version.returncode == 0 and version.stdout.startswith("byteback ")


@pytest.mark.parametrize("args, code", [
    (("backup", "--retry-number", "zero"), 2),
    (("no-such-command",), 2),
    (("status", "--warning", "soon"), 3),      # Nagios: a bad argument is UNKNOWN, never CRITICAL
])
def test_a_bad_argument_is_one_usage_line_and_no_traceback(pyz, tmp_path, args, code):
    proc = run(pyz, *args, cwd=tmp_path)
    assert proc.returncode == code
    assert "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("byteback")


@needs_rsync
def test_a_local_backup_then_status_and_restore_listing(pyz, tmp_path):
    source = tmp_path / "source"
    (source / "etc").mkdir(parents=True)
    (source / "etc" / "motd").write_text("hello from the zipapp\n")
    store = tmp_path / "store"
    env = {"BYTEBACK_STATE_DIR": str(tmp_path / "state"), "BYTEBACK_CONFIG_DIR": str(tmp_path / "conf")}
    backup = run(pyz, "backup", "--source", str(source), "--destination", str(store),
                 "--host", "laptop", cwd=tmp_path, env=env)
    assert backup.returncode == 0, backup.stderr
    assert backup.stdout == "" and backup.stderr == ""     # cron mails nothing for a good run
    snapshots = [p for p in (store / "laptop").iterdir() if p.name != "current"]
    assert len(snapshots) == 1
    assert (snapshots[0] / str(source).lstrip("/") / "etc" / "motd").read_text() == "hello from the zipapp\n"

    status = run(pyz, "status", "--json", cwd=tmp_path, env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["last_result"] == "ok"

    listing = run(pyz, "restore", "--destination", str(store), "--host", "laptop",
                  f"{source}/etc/*", cwd=tmp_path, env=env)
    assert listing.returncode == 0, listing.stderr
    assert f"{source}/etc/motd" in listing.stdout and snapshots[0].name in listing.stdout
