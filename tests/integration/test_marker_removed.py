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

import datetime as dt
import os
import pwd
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[2]))
import byteback  # noqa: E402
from remote_env import remote_byteback  # noqa: E402
from sshd_env import _skip_or_check, btrfs_mount, free_bytes, run_as  # noqa: E402

pytestmark = pytest.mark.integration
MIB = 1 << 20


@pytest.fixture
def remote():
    with remote_byteback() as r:
        yield r


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
    kept = {h: remote.snapshots(h) for h in ("client1", "client2")}

    # The shell: junk in client2's current until the disc is short of its goal, the marker gone.
    current = remote.store / "client2" / "current"
    junk = (free_bytes(remote.store) - 60 * MIB) // MIB
    user = remote.env.user
    user.run(["dd", "if=/dev/urandom", f"of={current}/junk", "bs=1M", f"count={junk}", "status=none"]
             ).check_returncode()
    path = store.dirty_path("client2")
    if marker == "garbled":
        user.run(["sh", "-c", f"printf '{{\"since\": ' > {path}"]).check_returncode()
        assert store.dirty_since("client2") is None           # what root reads of it
    else:
        user.run(["rm", "-f", str(path)]).check_returncode()
    assert free_bytes(remote.store) < 100 * MIB
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}

    result = remote.server("prune")                  # what cron runs, as root
    result.check()
    assert not (current / "junk").exists(), result.stderr            # rolled back
    assert free_bytes(remote.store) > 300 * MIB
    assert {h: remote.snapshots(h) for h in kept} == kept               # no history went for it


# --- The same attack by other ways around the marker, on the store's own calls (the review's
# proofs of concept): root's side in this process, the backup user a uid of its own.

NOBODY = pwd.getpwnam("nobody").pw_uid       # the backup user of these tests, by runuser -u nobody
NOGROUP = pwd.getpwnam("nobody").pw_gid
T0 = dt.datetime(2026, 11, 1, 3, 0, tzinfo=dt.timezone.utc)
CONFIG = byteback.ServerConfig(min_interval=1, accept_budget=0.0, shares="equal", headroom=300, rsync_timeout=2)


def _as_user(*argv: str) -> subprocess.CompletedProcess:
    return run_as("nobody", argv)


@pytest.fixture
def store():
    """A btrfs store of two hosts, four ordinary backups each (marker, the user's write, root's snapshot)."""
    _skip_or_check()
    with btrfs_mount("512M") as root:
        store = byteback.open_store(root)
        assert isinstance(store, byteback.BtrfsStore)
        for place in (store.state_dir, store.state_dir / "history", store.run_dir):
            place.mkdir(mode=0o755, exist_ok=True)
        os.chown(store.run_dir, NOBODY, NOGROUP)
        for n in range(4):
            for host in ("client1", "client2"):
                current = store.prepare_host(host, owner=(NOBODY, NOGROUP))
                store.mark_dirty(host, T0)
                os.chown(store.dirty_path(host), NOBODY, NOGROUP)
                _as_user("sh", "-c", f"head -c 262144 /dev/urandom > {current}/f{n}").check_returncode()
                byteback.snapshot_host(store, host, CONFIG, now=T0 + dt.timedelta(hours=n), force=True)
        yield store


def _kept(store):
    return {h: [s.name for s in store.snapshots(h)] for h in ("client1", "client2")}


def _fill(store, path: Path) -> None:
    _as_user("dd", "if=/dev/urandom", f"of={path}", "bs=1M", f"count={(free_bytes(store.root) - 60 * MIB) // MIB}",
             "status=none").check_returncode()


def test_junk_in_a_subvolume_planted_before_the_snapshot_is_found(store, monkeypatch):
    # The race the shell runs (`btrfs subvolume create current/x` in a loop) won for certain:
    # x made again after take_snapshot's remove_planted, before the snapshot.
    current = store.current("client2")
    remove_planted = store.remove_planted

    def then_plant(path):
        done = remove_planted(path)
        _as_user("btrfs", "subvolume", "create", f"{path}/x").check_returncode()
        return done
    monkeypatch.setattr(store, "remove_planted", then_plant)
    byteback.snapshot_host(store, "client2", CONFIG, now=T0 + dt.timedelta(hours=9), force=True)
    monkeypatch.undo()
    kept = _kept(store)
    _fill(store, current / "x" / "junk")          # current's own generation never moves
    assert store.dirty_since("client2") is None
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}
    byteback.prune_store(store, CONFIG, now=T0 + dt.timedelta(hours=10))
    assert not (current / "x" / "junk").exists()        # rolled back (x is the snapshot's empty place)
    assert _kept(store) == kept


def test_a_session_that_ignores_sigterm_is_killed_and_its_junk_rolled_back(store):
    current, lock = store.current("client2"), store.session_lock_path("client2")
    kept = _kept(store)
    _fill(store, current / "junk")
    _as_user("sh", "-c", f"touch {lock}; chmod 600 {lock}").check_returncode()
    holder = subprocess.Popen(["runuser", "-u", "nobody", "--", "flock", "-n",
                               str(lock), "sh", "-c", "trap '' TERM; exec sleep 120"], stdin=subprocess.DEVNULL,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        time.sleep(3)         # idle past the I/O timeout (2 s here): stuck, not running
        assert byteback.session_state(lock, time.time(), CONFIG.rsync_timeout)[0] == "stuck"
        byteback.prune_store(store, CONFIG, now=byteback.now_local())    # the clock the session's idle time is on
        assert not byteback.lock_holders(lock)         # the sleep that ignored SIGTERM was killed
        assert not (current / "junk").exists()
        assert _kept(store) == kept
    finally:
        if holder.poll() is None:
            os.killpg(holder.pid, 9)
            holder.wait()


def test_a_roll_back_that_fails_leaves_the_upload_contained_not_paid_for(store):
    # A subvolume deeper than the kernel's path lookup reaches (4080 bytes) cannot be deleted by
    # id, so current cannot be rolled back: prune must still run, and delete nobody's history for it.
    current = store.current("client2")
    count = (free_bytes(store.root) - 60 * MIB) // MIB
    script = ("import os, subprocess\n"
              f"os.chdir({str(current)!r})\n"
              "for _ in range(20):\n    os.mkdir('d' * 250); os.chdir('d' * 250)\n"
              "subprocess.run(['btrfs', 'subvolume', 'create', 'x'], check=True, stdout=subprocess.DEVNULL)\n"
              f"subprocess.run(['dd', 'if=/dev/urandom', 'of=x/junk', 'bs=1M', 'count={count}', 'status=none'], "
              "check=True)\n")
    _as_user("python3", "-c", script).check_returncode()
    kept = _kept(store)
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}
    byteback.prune_store(store, CONFIG, now=T0 + dt.timedelta(hours=10))
    assert _kept(store) == kept
