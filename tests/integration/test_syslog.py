"""syslog for real (issue 15, item 5): what byteback sends to /dev/log.

The test binds a datagram socket of its own and runs byteback in a private
mount namespace whose /dev is an overlay holding /dev/log -> that socket, so
the program under test uses its ordinary code path (the path is not
configurable, on purpose: root-side code takes nothing from its caller) and the
machine's own /dev is untouched.  Priorities are syslog's: facility user (1),
so <14> is info, <12> warning, <11> error.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
from pathlib import Path
from typing import List

import pytest

import scratch_root
from test_local_backup import tmpfs_mount

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
BYTEBACK = Path(os.environ.get("BYTEBACK_UNDER_TEST") or REPO / "byteback.py").resolve()
INFO, WARNING, ERROR = "<14>", "<12>", "<11>"

_ENTER = r'''
set -e
mount -t overlay overlay -o "lowerdir=/dev,upperdir=$BB_UPPER,workdir=$BB_WORK" /dev
ln -sfn "$BB_SOCKET" /dev/log
exec "$@"
'''


class Syslog:
    """A stand-in /dev/log: a bound datagram socket, and byteback run so that it logs there."""

    def __init__(self) -> None:
        self.dir = scratch_root.overlay_base("bbtest-syslog-")
        (self.dir / "upper").mkdir()
        (self.dir / "work").mkdir()
        self.path = self.dir / "log.sock"
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(self.path))
        self.sock.setblocking(False)

    def run(self, *args: str, env: dict) -> subprocess.CompletedProcess:
        """Run byteback with args under the stand-in /dev/log."""
        outer = dict(env, BB_UPPER=str(self.dir / "upper"), BB_WORK=str(self.dir / "work"),
                     BB_SOCKET=str(self.path))
        return subprocess.run(["unshare", "--mount", "--propagation", "private", "sh", "-c", _ENTER, "sh",
                               sys.executable, str(BYTEBACK), *args], env=outer, stdin=subprocess.DEVNULL,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=120)

    def lines(self) -> List[str]:
        """Every datagram received since the last call."""
        got = []
        while True:
            try:
                got.append(self.sock.recv(65536).decode())
            except BlockingIOError:
                return got

    def close(self) -> None:
        self.sock.close()
        scratch_root.remove_base(self.dir)


@pytest.fixture
def syslog():
    if os.geteuid() != 0:
        pytest.skip("needs root: a private mount namespace with an overlay on /dev")
    if shutil.which("unshare") is None or shutil.which("rsync") is None:
        pytest.skip("needs unshare (util-linux) and rsync")
    log = Syslog()
    yield log
    log.close()


def _env(work: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("BYTEBACK_", "SSH_"))}
    env["BYTEBACK_STATE_DIR"] = str(work / "state")
    return env


def test_a_backup_and_a_prune_each_log_their_line(syslog, tmp_path):
    cfg, src = tmp_path / "cfg", tmp_path / "src"
    cfg.mkdir()
    src.mkdir()
    env = _env(tmp_path)
    with tmpfs_mount("160M") as disc:
        store = disc / "store"
        # order = age: the older of two snapshots may go (importance keeps a host's first).
        (cfg / "server.conf").write_text(f"[server]\nstore = {store}\nmin_interval = 0\norder = age\n")
        # An ordinary host: 40 MiB that stay, and 2 MiB that change between the
        # two backups, so the older snapshot holds 2 MiB only it keeps.
        (src / "stable").write_bytes(os.urandom(40 << 20))
        (src / "old").write_bytes(os.urandom(2 << 20))
        backup = ["--config-dir", str(cfg), "backup", "--source", str(src), "--destination", str(store),
                  "--host", "web1"]
        first = syslog.run(*backup, env=env)
        assert first.returncode == 0, first.stderr
        (src / "old").unlink()
        (src / "new").write_bytes(os.urandom(2 << 20))
        syslog.lines()
        second = syslog.run(*backup, env=env)
        assert (second.returncode, second.stdout, second.stderr) == (0, "", "")
        lines = syslog.lines()
        done = [l for l in lines if "backup of web1 complete" in l]
        assert len(done) == 1 and done[0].startswith(INFO + "byteback: backup of web1 complete: snapshot "), lines
        assert all(l.startswith(INFO + "byteback: ") and l.endswith("\0") for l in lines), lines
        snapshots = sorted(p.name for p in (store / "web1").iterdir() if p.name[:1].isdigit())
        assert len(snapshots) == 2 and len([l for l in lines if f"name={snapshots[1]}" in l]) == 1, lines

        # Fill the disc until it is a little short of what prune aims at: deleting
        # the older snapshot (2 MiB of its own) is enough, and all prune may delete.
        status = json.loads(syslog.run("--config-dir", str(cfg), "status", "--store", str(store), "--json",
                                       env=env).stdout)
        goal = min(status["target_bytes"], status.get("goal_bytes", status["target_bytes"]))
        short = min(1 << 20, goal // 2)
        with open(disc / "filler", "wb") as f:
            f.write(b"\0" * (status["free_bytes"] - goal + short))
        syslog.lines()
        prune = syslog.run("--config-dir", str(cfg), "prune", env=env)
        assert (prune.returncode, prune.stdout, prune.stderr) == (0, "", "")
        lines = syslog.lines()
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"{INFO}byteback: prune host=web1 deleted={snapshots[0]} "), lines
        assert not (store / "web1" / snapshots[0]).exists()


def test_a_refusal_by_the_guard_logs_one_warning_with_the_command(syslog, tmp_path):
    env = dict(_env(tmp_path), SSH_ORIGINAL_COMMAND="rsync --server -e.LsfxC . /etc/shadow; rm -rf /",
               SSH_CONNECTION="192.0.2.7 50000 192.0.2.1 22")
    proc = syslog.run("--config-dir", str(tmp_path / "cfg"), "receive", "--host", "web1", env=env)
    assert proc.returncode == 1
    assert proc.stderr.startswith("byteback: refused: ") and proc.stderr.count("\n") == 1, proc.stderr
    lines = syslog.lines()
    assert len(lines) == 1, lines
    assert lines[0].startswith(f"{WARNING}byteback: REFUSED host=web1 client=192.0.2.7 command="), lines
    assert "rm -rf /" in lines[0]


def test_an_error_logs_one_error_line(syslog, tmp_path):
    proc = syslog.run("--config-dir", str(tmp_path / "cfg"), "backup", "--source", str(tmp_path / "missing"),
                      "--destination", str(tmp_path / "store"), env=_env(tmp_path))
    assert proc.returncode == 1
    assert syslog.lines() == [f"{ERROR}byteback: source {tmp_path / 'missing'} does not exist; check --source\0"]
