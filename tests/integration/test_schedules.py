"""Scheduled jobs for real: setup-server's hourly prune and install-cron's daily backup,
as cron.d files and as systemd services and timers (issue 15 item 3, issue 10 item 5).

The server is one set up by setup-server through remote_env; the cron line is
run as cron would run it, and the systemd units pass `systemd-analyze verify`
(which works offline: no running systemd is needed).
"""
from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from remote_env import RemoteByteback, byteback_remote  # noqa: F401 (fixture)

pytestmark = pytest.mark.integration

HOURLY_RE = re.compile(r"(\d+) \* \* \* \* root (.*)")


@pytest.fixture(scope="module")
def remote(request) -> RemoteByteback:
    return request.getfixturevalue("byteback_remote")


def _setup_server(remote: RemoteByteback, *extra: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(remote.pyz), "--config-dir", str(remote.server_config), "setup-server",
         "--store", str(remote.store), "--user", remote.env.user.name, "--install-path", str(remote.program),
         "--cron-file", str(remote.server_config / "cron.d-byteback-prune"), *extra],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)


def _jobs(cron_file: Path) -> list:
    return [l for l in cron_file.read_text().splitlines()
            if l.strip() and not l.startswith("#") and "=" not in l.split()[0]]


def _verify(*units: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("needs systemd-analyze: apt-get install systemd")
    proc = subprocess.run(["systemd-analyze", "verify", *map(str, units)],
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT, universal_newlines=True)
    assert (proc.returncode, proc.stdout) == (0, ""), proc.stdout


def test_setup_server_installs_the_hourly_prune_once_and_it_runs(remote):
    cron_file = remote.server_config / "cron.d-byteback-prune"
    first = cron_file.read_text()
    jobs = _jobs(cron_file)
    assert len(jobs) == 1, jobs
    minute, command = HOURLY_RE.fullmatch(jobs[0]).groups()
    assert 0 <= int(minute) < 60
    assert shlex.split(command) == [str(remote.program), "--config-dir", str(remote.server_config), "prune", "--if-idle"]
    # Re-runs keep the line and its minute, byte for byte.
    for _ in range(2):
        again = _setup_server(remote)
        assert again.returncode == 0, again.stderr
        assert "nothing changed" in again.stdout, again.stdout
        assert cron_file.read_text() == first
    # The line's command, run as cron runs it: succeeds and prints nothing (cron would mail it),
    # also while a snapshot's own prune holds the store.
    def cron_run():
        return subprocess.run(["/bin/sh", "-c", command], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              universal_newlines=True, env={"PATH": "/usr/sbin:/usr/bin:/sbin:/bin"}, timeout=300)
    proc = cron_run()
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "", "")
    holder = subprocess.Popen(["flock", "--nonblock", str(remote.store / ".byteback" / "store.lock"),
                               "sleep", "30"])
    try:
        time.sleep(0.5)
        busy = cron_run()
        assert (busy.returncode, busy.stdout, busy.stderr) == (0, "", "")
        by_hand = remote.server("prune")
        assert by_hand.returncode == 1 and "another snapshot or prune on this store is running" in by_hand.stderr
    finally:
        holder.kill()
        holder.wait()


def test_setup_server_systemd_writes_a_verified_prune_timer_once(remote, tmp_path):
    name = f"byteback-prune-{remote.env.user.name}"
    first = _setup_server(remote, "--systemd", "--unit-dir", str(tmp_path))
    assert first.returncode == 0, first.stderr
    assert f"wrote      {tmp_path / name}.timer" in first.stdout
    service, timer = tmp_path / f"{name}.service", tmp_path / f"{name}.timer"
    assert f"ExecStart={remote.program} --config-dir {remote.server_config} prune --if-idle\n" in service.read_text()
    assert "Type=oneshot\n" in service.read_text()
    for line in ("OnCalendar=hourly", "RandomizedDelaySec=1h", "FixedRandomDelay=true", "Persistent=true"):
        assert line + "\n" in timer.read_text()
    _verify(service, timer)
    texts = (service.read_text(), timer.read_text())
    again = _setup_server(remote, "--systemd", "--unit-dir", str(tmp_path))
    assert "nothing changed" in again.stdout, again.stdout
    assert (service.read_text(), timer.read_text()) == texts


@pytest.mark.parametrize("hour", [None, "4"])
def test_install_cron_systemd_writes_a_verified_backup_timer_once(remote, tmp_path, hour):
    extra = ["--hour", hour] if hour else []
    first = remote.run("install-cron", "--systemd", "--unit-dir", str(tmp_path), *extra)
    first.check()
    service, timer = tmp_path / "byteback.service", tmp_path / "byteback.timer"
    assert f"ExecStart={remote.pyz} --config-dir {remote.client_config} backup\n" in service.read_text()
    calendar = "OnCalendar=*-*-* 04:00:00\nRandomizedDelaySec=1h\n" if hour else \
        "OnCalendar=daily\nRandomizedDelaySec=24h\n"
    assert calendar in timer.read_text()
    assert "Persistent=true\n" in timer.read_text()
    _verify(service, timer)
    again = remote.run("install-cron", "--systemd", "--unit-dir", str(tmp_path), *extra).check()
    assert "nothing changed" in again.stdout
