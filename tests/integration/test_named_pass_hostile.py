"""The named pass's unsharing (give_names_own_inodes) against a hostile current, on real btrfs.

After an 'again:' the push gives only the names root listed an inode of their own,
before rsync writes them in place.  The names are the client's, and the backup
user or the host's own account owns current: between the listing and the push it
can rename them, link more names to them, or swap a directory on their way for a
symlink to anywhere it can write.  Whatever it does, nothing outside current is
touched, no snapshot changes, and anything unexpected is an OSError (the push then
walks current instead, as before the named pass).  The names come from root's record
of the last 'again:' (<host>/.byteback-again): only one that answers the newest
snapshot is used, and a listing past AGAIN_LIST_BYTES is neither sent nor recorded.
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sshd_env import btrfs_store  # noqa: E402,F401 (fixture)

import byteback  # noqa: E402

def btrfs(*args) -> None:
    subprocess.run(["btrfs", *map(str, args)], check=True, stdout=subprocess.DEVNULL)


@pytest.fixture
def current(btrfs_store, request) -> Path:
    path = btrfs_store / f"current-{request.node.name[:40]}"
    btrfs("subvolume", "create", path)
    (path / "d").mkdir()
    (path / "d" / "a").write_bytes(b"shared data\n")
    os.link(path / "d" / "a", path / "d" / "a-link")
    os.chown(path / "d" / "a", 1234, 5678)
    os.chmod(path / "d" / "a", 0o4750)
    os.setxattr(path / "d" / "a", "user.rsync.%stat", b"100644 0,0 0:0")
    os.utime(path / "d" / "a", ns=(1_000_000_000_123, 2_000_000_000_456))
    return path


def _snapshot(current: Path) -> Path:
    snap = current.with_name(current.name + "-snap")
    btrfs("subvolume", "snapshot", "-r", current, snap)
    return snap


def test_each_listed_name_gets_an_inode_of_its_own_with_all_it_had(current):
    snap = _snapshot(current)
    old = os.lstat(current / "d" / "a")
    assert byteback.give_names_own_inodes(current, [b"d/a", b"d/a-link"], as_root=True) == 2
    inodes = set()
    for name in ("a", "a-link"):
        st = os.lstat(current / "d" / name)
        assert (st.st_nlink, st.st_uid, st.st_gid, st.st_mode, st.st_mtime_ns) == (
            1, 1234, 5678, old.st_mode, old.st_mtime_ns)
        assert os.getxattr(current / "d" / name, "user.rsync.%stat") == b"100644 0,0 0:0"
        assert (current / "d" / name).read_bytes() == b"shared data\n"
        inodes.add(st.st_ino)
    assert old.st_ino not in inodes and len(inodes) == 2
    with open(current / "d" / "a", "r+b") as f:         # rsync --inplace writing one name
        f.write(b"NEW")
    assert (current / "d" / "a-link").read_bytes() == b"shared data\n"
    assert (snap / "d" / "a").read_bytes() == (snap / "d" / "a-link").read_bytes() == b"shared data\n"
    assert sorted(os.listdir(current / "d")) == ["a", "a-link"]     # no copy left behind


def test_a_directory_swapped_for_a_symlink_is_never_followed(current, btrfs_store):
    """The account's symlink points at a directory it may write, outside current (another
    host's current under the shared user): nothing there is touched."""
    outside = btrfs_store / f"outside-{current.name}"
    outside.mkdir()
    (outside / "a").write_bytes(b"elsewhere\n")
    os.link(outside / "a", outside / "a-link")
    before = os.lstat(outside / "a")
    os.rename(current / "d", current / "d-moved")
    os.symlink(outside, current / "d")
    with pytest.raises(OSError):
        byteback.give_names_own_inodes(current, [b"d/a", b"d/a-link"], as_root=True)
    after = os.lstat(outside / "a")
    assert (after.st_ino, after.st_nlink) == (before.st_ino, 2)
    assert sorted(os.listdir(outside)) == ["a", "a-link"]
    assert os.lstat(current / "d-moved" / "a").st_nlink == 2


def test_a_directory_swapped_for_a_symlink_within_current_is_never_followed(current):
    """The symlink points at a directory of the same subvolume, so the filesystem check
    passes it: only O_NOFOLLOW stops the walk there, and nothing it points at changes."""
    os.rename(current / "d", current / "d-moved")
    os.symlink("d-moved", current / "d")
    before = os.lstat(current / "d-moved" / "a")
    with pytest.raises(OSError) as raised:
        byteback.give_names_own_inodes(current, [b"d/a", b"d/a-link"], as_root=True)
    assert raised.value.errno in (errno.ELOOP, errno.ENOTDIR)
    for name in ("a", "a-link"):
        after = os.lstat(current / "d-moved" / name)
        assert (after.st_ino, after.st_nlink, after.st_mode) == (before.st_ino, 2, before.st_mode)
    assert sorted(os.listdir(current / "d-moved")) == ["a", "a-link"]


def test_a_name_swapped_after_its_listing_is_not_given_its_old_owner_and_mode(current, monkeypatch):
    """Between the stat of the listing and the clone, the account renames a file of its own
    over a listed name: root must not copy that file with the listed name's owner and
    setuid mode (a setuid file of 1234 with the account's bytes)."""
    (current / "mine").write_bytes(b"the account's own bytes\n")
    os.chown(current / "mine", 1000, 1000)
    os.chmod(current / "mine", 0o644)
    real_clone = byteback._clone_at

    def swapped_first(dir_fd, name, st, as_root):
        if name == b"a":
            os.rename(current / "mine", current / "d" / "a")
        return real_clone(dir_fd, name, st, as_root)

    monkeypatch.setattr(byteback, "_clone_at", swapped_first)
    with pytest.raises(OSError) as raised:
        byteback.give_names_own_inodes(current, [b"d/a", b"d/a-link"], as_root=True)
    assert raised.value.errno == errno.EAGAIN
    st = os.lstat(current / "d" / "a")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode), st.st_nlink) == (1000, 1000, 0o644, 1)
    assert (current / "d" / "a").read_bytes() == b"the account's own bytes\n"
    assert sorted(os.listdir(current / "d")) == ["a", "a-link"]     # no copy left behind


def test_a_symlink_at_the_name_itself_is_not_a_file(current, btrfs_store):
    os.unlink(current / "d" / "a-link")
    os.symlink(btrfs_store, current / "d" / "a-link")
    with pytest.raises(OSError):
        byteback.give_names_own_inodes(current, [b"d/a", b"d/a-link"], as_root=True)


def test_a_renamed_name_is_passed_over_and_a_planted_link_is_unshared(current):
    """Gone: rsync sends it again.  A link planted to a listed name's inode keeps the old
    inode, which the named pass does not write; the listed name gets one of its own."""
    os.rename(current / "d" / "a-link", current / "d" / "a-moved")
    os.link(current / "d" / "a", current / "planted")
    old = os.lstat(current / "d" / "a").st_ino
    assert byteback.give_names_own_inodes(current, [b"d/a", b"d/a-link"], as_root=True) == 1
    assert os.lstat(current / "d" / "a").st_ino != old
    assert os.lstat(current / "d" / "a").st_nlink == 1
    assert os.lstat(current / "planted").st_ino == os.lstat(current / "d" / "a-moved").st_ino == old


def test_a_subvolume_planted_on_the_way_is_another_filesystem(current):
    os.rename(current / "d", current / "d-moved")
    btrfs("subvolume", "create", current / "d")
    (current / "d" / "a").write_bytes(b"x")
    os.link(current / "d" / "a", current / "d" / "a-link")
    with pytest.raises(OSError) as raised:
        byteback.give_names_own_inodes(current, [b"d/a", b"d/a-link"], as_root=True)
    assert raised.value.errno == errno.EXDEV
    assert os.lstat(current / "d" / "a").st_nlink == 2
    btrfs("subvolume", "delete", current / "d")


def test_a_fifo_or_a_file_on_the_way_is_refused_without_blocking(current):
    os.unlink(current / "d" / "a-link")
    os.mkfifo(current / "d" / "a-link")
    with pytest.raises(OSError):
        byteback.give_names_own_inodes(current, [b"d/a-link"], as_root=True)
    with pytest.raises(OSError):
        byteback.give_names_own_inodes(current, [b"d/a/inside"], as_root=True)


# -- The record of the listed names (<host>/.byteback-again, root's) -----------

T0 = dt.datetime(2026, 12, 1, 3, 0, tzinfo=dt.timezone.utc)


@pytest.fixture
def store(btrfs_store):
    store = byteback.open_store(tempfile.mkdtemp(prefix="store-", dir=btrfs_store))
    assert store.kind == "btrfs"
    return store


def _again(store, hours: int) -> byteback.AnotherPass:
    """The snapshot at T0 + hours, which must refuse with 'again:'."""
    with pytest.raises(byteback.AnotherPass) as raised:
        byteback.snapshot_host(store, "web1", byteback.ServerConfig(), now=T0 + dt.timedelta(hours=hours),
                               force=True)
    return raised.value


@pytest.mark.parametrize("answers", ["the newest snapshot", "an older snapshot"])
def test_the_named_pass_walks_unless_the_record_answers_the_newest_snapshot(store, answers):
    """A record left from an 'again:' at an older snapshot lists names that were changed since
    another one: only the walk gives every hard-linked name an inode of its own then."""
    current = store.prepare_host("web1")
    for name in ("a", "b"):
        (current / name).write_bytes(name.encode() * 100)
        os.link(current / name, current / f"{name}-link")
    config = byteback.ServerConfig()
    older = byteback.snapshot_host(store, "web1", config, now=T0, force=True)
    byteback.snapshot_host(store, "web1", config, now=T0 + dt.timedelta(hours=7), force=True)
    with open(current / "a", "r+b") as f:       # in place: both names change
        f.write(b"A")
    assert byteback.again_names(str(_again(store, 14))) == [b"a", b"a-link"]
    path = store.host_dir("web1") / byteback.AGAIN_RECORD
    record = json.loads(path.read_text())
    assert record["snapshot"] == store.snapshots("web1")[-1].name
    if answers == "an older snapshot":
        record["snapshot"] = older.name
        path.write_text(json.dumps(record))
    b_before = os.lstat(current / "b").st_ino
    count = store.unshare_current("web1", resumed=True, again=True, named=True)
    if answers == "the newest snapshot":
        assert count == 2                                       # only the names listed
        assert os.lstat(current / "b").st_ino == os.lstat(current / "b-link").st_ino == b_before
    else:
        assert count == 4                                       # the walk: every hard-linked name
        assert len({os.lstat(current / name).st_ino for name in ("b", "b-link")} | {b_before}) == 3
    assert os.lstat(current / "a").st_ino != os.lstat(current / "a-link").st_ino


@pytest.mark.parametrize("links", [300, 400])
def test_names_past_the_listing_limit_are_neither_listed_nor_recorded(store, links):
    """Each name 250 bytes that encode as 742: 300 of them fit AGAIN_LIST_BYTES, 400 do not
    (still under AGAIN_NAMES_MAX).  Past it the 'again:' lists none and records none."""
    current = store.prepare_host("web1")
    (current / "f").write_bytes(b"shared\n")
    names = [b"%03d" % i + b"\xff" * 246 for i in range(links)]
    for name in names:
        os.link(bytes(current / "f"), bytes(current) + b"/" + name)
    assert links < byteback.AGAIN_NAMES_MAX
    fits = sum(len(w) + 1 for w in byteback.quote_names(names + [b"f"])) <= byteback.AGAIN_LIST_BYTES
    assert fits == (links == 300)
    byteback.snapshot_host(store, "web1", byteback.ServerConfig(), now=T0, force=True)
    with open(current / "f", "r+b") as f:
        f.write(b"S")
    refusal = _again(store, 7)
    assert str(refusal).startswith("again: 1 hard-linked files in current were changed")
    listed = byteback.again_names(str(refusal))
    recorded = store.host_dir("web1") / byteback.AGAIN_RECORD
    if fits:
        assert sorted(listed) == sorted(names + [b"f"]) and recorded.exists()
    else:
        assert listed is None and not os.path.lexists(recorded)
