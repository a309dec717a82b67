"""The named pass's unsharing (give_names_own_inodes) against a hostile current, on real btrfs.

After an 'again:' the push gives only the names root listed an inode of their own,
before rsync writes them in place.  The names are the client's, and the backup
user or the host's own account owns current: between the listing and the push it
can rename them, link more names to them, or swap a directory on their way for a
symlink to anywhere it can write.  Whatever it does, nothing outside current is
touched, no snapshot changes, and anything unexpected is an OSError (the push then
walks current instead, as before the named pass).
"""
from __future__ import annotations

import errno
import os
import subprocess
import sys
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
