"""An unfinished upload whose in-progress marker a shell as the backup user removed or garbled.

The marker lives in run/, which the backup user owns.  A shell as that user
fills one host's current with junk and takes the marker away: prune used to
see no unfinished upload, only a disc short of its goal, and deleted the
history of every host to make room.  On btrfs root asks the filesystem
instead: current written since its newest snapshot is an unfinished upload,
measured and, far past its host's normal size, rolled back.  A real btrfs
store, the real sshd, forced command and cron prune.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
import byteback  # noqa: E402
from remote_env import remote_byteback  # noqa: E402

pytestmark = pytest.mark.integration
MIB = 1 << 20


@pytest.fixture
def remote():
    with remote_byteback() as r:
        yield r


def _free(path: Path) -> int:
    subprocess.run(["btrfs", "filesystem", "sync", str(path)], check=True, stdout=subprocess.DEVNULL)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def _names(remote, host):
    return sorted(p.name for p in (remote.store / host).iterdir() if p.name[:1].isdigit())


@pytest.mark.parametrize("marker", ["removed", "garbled"])
def test_junk_in_current_without_its_marker_is_rolled_back_and_no_history_goes(remote, tmp_path, marker):
    # Room for the next backups: 300 x the two hosts' 256K each, about 150M of the 512M disc.
    remote.set_server_conf(min_interval="1s", accept_budget="0%", shares="equal", headroom="300")
    second = tmp_path / "client2-config"
    second.mkdir(mode=0o700)
    remote.setup_client(second, "client2")
    for host, config in (("client1", None), ("client2", second)):
        source = tmp_path / host
        source.mkdir()
        for n in range(4):
            (source / f"f{n}").write_bytes(os.urandom(256 * 1024))
            time.sleep(1.1)         # names carry seconds at most: one snapshot per host per second
            remote.run("backup", "--host", host, "--retry-delay", "1", "--source", str(source),
                       config_dir=config).check()
    store = byteback.open_store(remote.store)
    # After ordinary backups nothing looks unfinished: no push pays for a root prune it needs not.
    assert store.unfinished_hosts(["client1", "client2"]) == set()
    kept = {h: _names(remote, h) for h in ("client1", "client2")}

    # The shell: junk in client2's current until the disc is short of its goal, the marker gone.
    current = remote.store / "client2" / "current"
    junk = (_free(remote.store) - 60 * MIB) // MIB
    user = remote.env.user
    user.run(["dd", "if=/dev/urandom", f"of={current}/junk", "bs=1M", f"count={junk}", "status=none"]
             ).check_returncode()
    path = store.dirty_path("client2")
    if marker == "garbled":
        user.run(["sh", "-c", f"printf '{{\"since\": ' > {path}"]).check_returncode()
        assert store.dirty_since("client2") is None           # what root reads of it
    else:
        user.run(["rm", "-f", str(path)]).check_returncode()
    assert _free(remote.store) < 100 * MIB
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}

    result = remote.server("prune")                  # what cron runs, as root
    result.check()
    assert not (current / "junk").exists(), result.stderr            # rolled back
    assert _free(remote.store) > 300 * MIB
    assert {h: _names(remote, h) for h in kept} == kept               # no history went for it
