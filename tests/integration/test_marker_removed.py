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
    assert store.unfinished_hosts(["client1", "client2"]) == set()


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


DEEP = "d" * 250           # 20 of them: a path past PATH_MAX (4096) and INO_LOOKUP's 4080 bytes


def _plant_deep(at: Path, subvolume: str, junk_bytes: int) -> None:
    """As the backup user: subvolume `subvolume` 20 directories of 250 bytes below `at`, junk in it."""
    script = ("import os, subprocess\n"
              f"os.chdir({str(at)!r})\n"
              f"for _ in range(20):\n    os.mkdir({DEEP!r}); os.chdir({DEEP!r})\n"
              f"subprocess.run(['btrfs', 'subvolume', 'create', {subvolume!r}], check=True, stdout=subprocess.DEVNULL)\n"
              f"subprocess.run(['dd', 'if=/dev/urandom', 'of={subvolume}/junk', 'bs=1M', "
              f"'count={junk_bytes // MIB}', 'status=none'], check=True)\n")
    _as_user("python3", "-c", script).check_returncode()


def test_a_subvolume_planted_past_path_max_is_removed_and_the_upload_rolled_back(store):
    # Deletion by id builds the whole path in the kernel (PATH_MAX): ENAMETOOLONG, and this
    # host's current could never be rolled back.  Reached one name at a time, it is.
    current = store.current("client2")
    _plant_deep(current, "x", free_bytes(store.root) - 60 * MIB)
    kept = _kept(store)
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}
    byteback.prune_store(store, CONFIG, now=T0 + dt.timedelta(hours=10))
    assert not (current / DEEP).exists(), os.listdir(current)      # x and its junk went with it
    assert byteback.planted_subvolumes(current) == []
    assert store.pending_bytes("client2") < MIB          # nothing of the upload is left to measure
    assert store.unfinished_hosts(["client1", "client2"]) == set()
    assert free_bytes(store.root) > 300 * MIB
    assert _kept(store) == kept


def test_a_deep_subvolume_inside_a_planted_subvolume_is_removed(store):
    # The inner one is reached through the outer one's own tree, itself reached from current's.
    current = store.current("client2")
    _as_user("mkdir", str(current / "o")).check_returncode()
    _as_user("btrfs", "subvolume", "create", str(current / "o" / "p")).check_returncode()
    _plant_deep(current / "o" / "p", "x", 20 * MIB)
    planted = byteback.planted_subvolumes(current)
    assert len(planted) == 2
    assert store.remove_planted(current) == (2, sum(found[-1] for found in planted))
    assert byteback.planted_subvolumes(current) == []
    assert not (current / "o" / "p").exists()          # the outer subvolume's place: gone with it
    assert (current / "o").is_dir()                    # current's own directory stays (rsync's to put right)


@pytest.mark.parametrize("swap", ["symlink", "directory"])
def test_a_directory_swapped_on_the_way_is_not_followed(store, monkeypatch, swap):
    # The shell renames a directory on the way between the kernel's items being read and the
    # walk down, and puts a symlink to a subvolume elsewhere (or another directory) in its place.
    current = store.current("client2")
    _as_user("mkdir", "-p", str(current / "a" / "b")).check_returncode()
    _as_user("btrfs", "subvolume", "create", str(current / "a" / "b" / "x")).check_returncode()
    outside = store.root / "outside"
    (outside / "b").mkdir(parents=True)
    subprocess.run(["btrfs", "subvolume", "create", str(outside / "b" / "x")], check=True, stdout=subprocess.DEVNULL)
    chain = byteback._directory_chain
    swapped = []

    def then_swap(*args):
        found = chain(*args)
        if not swapped:
            swapped.append(True)
            _as_user("mv", str(current / "a"), str(current / "a.moved")).check_returncode()
            if swap == "symlink":
                _as_user("ln", "-s", str(outside), str(current / "a")).check_returncode()
            else:
                _as_user("mkdir", "-p", str(current / "a" / "b")).check_returncode()
        return found
    monkeypatch.setattr(byteback, "_directory_chain", then_swap)
    with pytest.raises(byteback.ByteBackError, match=r"cannot remove the subvolume .*/a/b/x \(id \d+\) planted in"):
        store.remove_planted(current)
    assert swapped
    assert byteback.is_btrfs_subvolume(outside / "b" / "x")             # nothing outside current deleted
    assert byteback.is_btrfs_subvolume(current / "a.moved" / "b" / "x")  # nor, silently, the planted one
    monkeypatch.undo()
    assert store.remove_planted(current)[0] == 1          # found again where it now is: the shell only delays
    assert not (current / "a.moved" / "b" / "x").exists()
    assert byteback.is_btrfs_subvolume(outside / "b" / "x")


@pytest.mark.parametrize("read_only", ["planted", "current"])
def test_a_subvolume_made_read_only_does_not_stop_the_roll_back(store, read_only):
    # Subvolumes planted in one the shell then made read-only (a subvolume's owner may): the
    # kernel refuses to delete one linked inside it (EROFS), and current could not be rolled
    # back.  Root clears the flag and takes that subvolume's root first.  In the fakesuper mode
    # one backup user owns every host's current: one shell did this to every host at once.
    current = store.current("client2")
    _as_user("btrfs", "subvolume", "create", str(current / "p")).check_returncode()
    _as_user("btrfs", "subvolume", "create", str(current / "p" / "x")).check_returncode()
    _fill(store, current / "p" / "x" / "junk")
    frozen = current / "p" if read_only == "planted" else current
    _as_user("btrfs", "property", "set", "-ts", str(frozen), "ro", "true").check_returncode()
    kept = _kept(store)
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}
    byteback.prune_store(store, CONFIG, now=T0 + dt.timedelta(hours=10))
    assert not (current / "p").exists(), os.listdir(current)          # rolled back, junk and all
    assert byteback.planted_subvolumes(current) == []
    assert not store.is_read_only(current)
    assert os.stat(current).st_uid == NOBODY                          # still its writer's
    assert free_bytes(store.root) > 300 * MIB
    assert _kept(store) == kept
    assert store.unfinished_hosts(["client1", "client2"]) == set()


def test_a_read_only_flag_set_again_while_root_clears_it_is_cleared_as_its_only_owner(store, monkeypatch):
    # The shell races root: it sets the flag again between root's clearing it and root's chown.
    current = store.current("client2")
    _as_user("btrfs", "subvolume", "create", str(current / "p")).check_returncode()
    _as_user("btrfs", "subvolume", "create", str(current / "p" / "x")).check_returncode()
    ioctl, raced = byteback.fcntl.ioctl, []

    def then_set_again(fd, request, *args):
        done = ioctl(fd, request, *args)
        if request == byteback.BTRFS_IOC_SUBVOL_SETFLAGS and not raced:
            raced.append(True)
            _as_user("btrfs", "property", "set", "-ts", str(current / "p"), "ro", "true").check_returncode()
        return done
    _as_user("btrfs", "property", "set", "-ts", str(current / "p"), "ro", "true").check_returncode()
    monkeypatch.setattr(byteback.fcntl, "ioctl", then_set_again)
    assert store.remove_planted(current)[0] == 2
    assert raced
    assert byteback.planted_subvolumes(current) == []


@pytest.mark.parametrize("times", [1, 2], ids=["once", "every-time"])
def test_a_read_only_flag_set_again_after_root_took_the_subvolume(store, monkeypatch, times):
    # A call of the shell's that passed its owner check before root's chown lands after it (here
    # root sets the flag, as that call would): cleared once more; set again each time, refused.
    current = store.current("client2")
    _as_user("btrfs", "subvolume", "create", str(current / "p")).check_returncode()
    _as_user("btrfs", "subvolume", "create", str(current / "p" / "x")).check_returncode()
    _as_user("btrfs", "property", "set", "-ts", str(current / "p"), "ro", "true").check_returncode()
    fchown, raced = os.fchown, []

    def then_set_again(fd, uid, gid):
        fchown(fd, uid, gid)
        if len(raced) < times:
            raced.append(True)
            subprocess.run(["btrfs", "property", "set", "-ts", str(current / "p"), "ro", "true"], check=True)
    monkeypatch.setattr(byteback.os, "fchown", then_set_again)
    if times == 1:
        assert store.remove_planted(current)[0] == 2
        assert byteback.planted_subvolumes(current) == []
    else:
        with pytest.raises(byteback.ByteBackError, match="writable to delete the ones inside it"):
            store.remove_planted(current)
        assert len(byteback.planted_subvolumes(current)) == 2       # nothing deleted half-way
    assert len(raced) == times


def test_a_rolled_back_current_is_unfinished_again_only_once_written(store):
    # The roll-back gives the new current its owner and mode: done on current itself, that
    # moved its generation past its making, and every later prune measured the host as holding
    # an unfinished upload until its next snapshot.
    current = store.current("client2")
    before = os.lstat(current)
    _fill(store, current / "junk")
    byteback.prune_store(store, CONFIG, now=T0 + dt.timedelta(hours=10))
    assert not (current / "junk").exists()
    after = os.lstat(current)
    assert (after.st_uid, after.st_gid, after.st_mode) == (before.st_uid, before.st_gid, before.st_mode)
    assert not (current.parent / ".incomplete-current").exists()
    assert store.unfinished_hosts(["client1", "client2"]) == set()
    _as_user("sh", "-c", f"printf x > {current}/one").check_returncode()
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}


def test_the_new_current_cannot_be_written_before_it_is_made(store, monkeypatch):
    # current is a snapshot of a writable one given the owner first: whatever the shell wrote
    # into that one would be in current from its making, never counted as written since.
    current = store.current("client2")
    _fill(store, current / "junk")
    create, tried = byteback.create_snapshot, []

    def then_write(source, parent, name, **kwargs):
        done = create(source, parent, name, **kwargs)
        staging = parent / ".incomplete-current"
        if staging.exists():
            tried.append(_as_user("sh", "-c", f"printf junk > {staging}/planted").returncode)
        return done
    monkeypatch.setattr(byteback, "create_snapshot", then_write)
    byteback.prune_store(store, CONFIG, now=T0 + dt.timedelta(hours=10))
    assert tried and all(code != 0 for code in tried)
    assert not (current / "planted").exists()
    assert store.unfinished_hosts(["client1", "client2"]) == set()


def test_a_roll_back_that_fails_leaves_the_upload_contained_not_paid_for(store, monkeypatch):
    # No real attack is known to stop a roll-back any more (read-only subvolumes are made
    # writable, deep ones reached by descriptors): a deletion failing for some other reason
    # stands in for one.  Prune must still run, and delete nobody's history for it.
    current = store.current("client2")
    _fill(store, current / "junk")
    kept = _kept(store)
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}

    def fail(*args):
        raise byteback.ByteBackError("cannot delete the subvolume (a stand-in)")
    monkeypatch.setattr(store, "_reset_current", fail)
    byteback.prune_store(store, CONFIG, now=T0 + dt.timedelta(hours=10))
    assert (current / "junk").exists()      # not rolled back
    assert store.unfinished_hosts(["client1", "client2"]) == {"client2"}
    assert _kept(store) == kept


def _unmarked_warnings(store):
    report = byteback.server_status(store, CONFIG, T0 + dt.timedelta(hours=10))
    return ({h: i["unmarked_upload_bytes"] for h, i in report["hosts"].items()},
            [w for w in report["warnings"] if "no in-progress marker" in w])


def test_status_warns_of_data_written_into_current_without_its_marker(store):
    assert _unmarked_warnings(store) == ({"client1": 0, "client2": 0}, [])      # ordinary backups
    current1, current2 = store.current("client1"), store.current("client2")
    # An inode written alone, as relatime writes an access time: current is written since its
    # snapshot (prune measures it), but it holds no data of an upload.
    _as_user("chmod", "600", f"{current1}/f0").check_returncode()
    assert store.unfinished_hosts(["client1"]) == {"client1"}
    assert _unmarked_warnings(store) == ({"client1": 0, "client2": 0}, [])
    _as_user("dd", "if=/dev/urandom", f"of={current2}/junk", "bs=1M", "count=3", "status=none").check_returncode()
    found, warnings = _unmarked_warnings(store)
    assert found["client1"] == 0 and 3 * MIB <= found["client2"] < 4 * MIB
    assert len(warnings) == 1 and warnings[0].startswith("host client2: 3.0M written into current")
    store.mark_dirty("client2", T0)       # a backup under way says so itself (incomplete_since)
    assert _unmarked_warnings(store) == ({"client1": 0, "client2": 0}, [])
