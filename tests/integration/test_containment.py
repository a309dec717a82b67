"""Containment per host, end to end: a real btrfs store, the real sshd and forced command.

One host's suspicious backup must cost only that host: another host's backups
keep succeeding and being pruned.  An unfinished upload past the suspicion
line is rolled back when the host's next backup starts (the forced command's
`snapshot --prepare`), and its space comes back without a person.
"""
from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from remote_env import RemoteByteback, byteback_remote  # noqa: E402,F401 (fixture)

pytestmark = pytest.mark.integration
MIB = 1 << 20


@pytest.fixture(scope="module")
def remote(request) -> RemoteByteback:
    return request.getfixturevalue("byteback_remote")


@pytest.fixture(scope="module")
def second(remote, tmp_path_factory) -> Path:
    """A second client, client2, set up with setup-client into a config dir of its own."""
    config = tmp_path_factory.mktemp("client2-config")
    os.chmod(config, 0o700)
    env = remote.env
    remote.run("setup-client", "--destination", env.destination, "--port", str(env.port),
               "--hostname", "client2", "--server-program", str(remote.program),
               "--server-config-dir", str(remote.server_config),
               env={"SSH_AUTH_SOCK": str(env.agent.sock)}, config_dir=config).check()
    return config


def _write(path: Path, size: int, seed: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(os.urandom(size) if seed else b"\0" * size)


def _backup(remote, source: Path, host: str, config=None):
    time.sleep(1.1)       # names carry seconds at most: one snapshot per host per second
    return remote.run("backup", "--host", host, "--retry-delay", "1", "--source", str(source),
                      config_dir=config)


def _history(remote, host):
    path = remote.store / ".byteback" / "history" / f"{host}.json"
    return json.loads(path.read_text())["backups"]


def test_an_unfinished_upload_past_the_line_is_rolled_back_when_the_next_backup_starts(remote, tmp_path):
    remote.set_server_conf(min_interval="1s", accept_budget="0%")
    source = tmp_path / "src"
    for n in range(4):
        _write(source / f"f{n}", 256 * 1024, 1)
        _backup(remote, source, "client1").check()
    # What an upload cut off by a full disc leaves: 60M in current, marked dirty.
    current = remote.store / "client1" / "current"
    user = remote.env.user
    user.run(["dd", "if=/dev/urandom", f"of={current}/junk", "bs=1M", "count=60", "status=none"]).check_returncode()
    marker = remote.store / ".byteback" / "run" / "client1.dirty"
    user.run(["sh", "-c", f"echo '{{\"since\": \"{dt.datetime.now(dt.timezone.utc).isoformat()}\"}}' > {marker}"]
             ).check_returncode()
    subprocess.run(["sync"], check=True)
    free_before = os.statvfs(remote.store).f_bavail * os.statvfs(remote.store).f_frsize
    _backup(remote, source, "client1").check()
    subprocess.run(["btrfs", "filesystem", "sync", str(remote.store)], check=True, stdout=subprocess.DEVNULL)
    st = os.statvfs(remote.store)
    assert st.f_bavail * st.f_frsize > free_before + 40 * MIB       # the space came back
    assert not (current / "junk").exists()
    last = _history(remote, "client1")[-1]
    assert last["added"] < 10 * MIB and not last["suspicious"]      # the junk is in no snapshot


def test_one_hosts_suspicious_backup_does_not_stop_another_hosts_pruning(remote, second, tmp_path):
    # Room for client2's next backups is 16 x its 20M: the store is short for
    # client2's own sake, and it is pruned; client1's 100M is contained (left
    # out of the goal).  Equal shares: client1's few bytes are far within its own.
    remote.set_server_conf(min_interval="1s", headroom="16", accept_budget="0%", shares="equal")
    one, two = tmp_path / "one", tmp_path / "two"
    for n in range(4):
        _write(one / f"f{n}", 256 * 1024, 1)
        _backup(remote, one, "client1").check()
    _write(one / "huge", 100 * MIB, 1)
    _backup(remote, one, "client1").check()
    last = _history(remote, "client1")[-1]
    assert last["suspicious"] is True and last["added"] >= 100 * MIB
    kept_one = remote.snapshots("client1")
    for n in range(10):
        _write(two / f"g{n}", 20 * MIB, 1)
        _backup(remote, two, "client2", second).check()
    # client2 kept backing up, and the prunes after its snapshots deleted its own history
    assert len(_history(remote, "client2")) == 10
    assert len(remote.snapshots("client2")) < 10
    # client1 keeps its history: the shortage is client2's, and client1's excess is not pruned for
    assert remote.snapshots("client1") == kept_one
    status = remote.server("status", "--store", str(remote.store))
    assert "WARNING: host client1: backup" in status.stdout and "contained" in status.stdout
    assert status.returncode == 1, status.stdout                        # Nagios WARNING
