"""The snapshot's two kernel calls (BTRFS_IOC_SNAP_CREATE_V2, BTRFS_IOC_SUBVOL_SETFLAGS) on a
real btrfs loop file: what `btrfs subvolume snapshot` and `btrfs property set ro true` did
for take_snapshot, and that neither follows a symlink a shell as the backup user could plant.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from markers import needs_btrfs, needs_root  # noqa: E402
from sshd_env import btrfs_store  # noqa: E402,F401 (fixture)

import byteback  # noqa: E402

pytestmark = [pytest.mark.integration, needs_root, needs_btrfs]


def _ro(path: Path) -> str:
    return subprocess.run(["btrfs", "property", "get", "-ts", str(path), "ro"], check=True,
                          stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()


def _subvolume(btrfs_store: Path, name: str) -> Path:
    path = btrfs_store / name
    subprocess.run(["btrfs", "subvolume", "create", str(path)], check=True, stdout=subprocess.DEVNULL)
    (path / "dir").mkdir()
    (path / "dir" / "file").write_bytes(b"data")
    os.chown(path, 1234, 1234)
    return path


def test_create_snapshot_makes_a_writable_copy_that_set_read_only_closes(btrfs_store):
    source = _subvolume(btrfs_store, "src1")
    byteback.create_snapshot(source, btrfs_store, "snap1")
    snap = btrfs_store / "snap1"
    assert byteback.is_btrfs_subvolume(snap) and (snap / "dir" / "file").read_bytes() == b"data"
    assert os.lstat(snap).st_uid == 1234            # the root inode as in the source, as btrfs-progs left it
    assert _ro(snap) == "ro=false"
    (snap / "written").write_bytes(b"x")            # writable until the flag is set
    os.chown(snap, 0, 0)
    byteback.set_read_only(snap)
    assert _ro(snap) == "ro=true" and byteback.subvolume_info_at(snap).read_only
    with pytest.raises(OSError):
        (snap / "later").write_bytes(b"x")
    assert not (source / "written").exists()        # a copy: the source is untouched


@pytest.mark.parametrize("name", ["", ".", "..", "a/b", "a\0b", "x" * 4040])
def test_create_snapshot_takes_one_name_in_one_directory(btrfs_store, name):
    source = btrfs_store / "src1" if (btrfs_store / "src1").exists() else _subvolume(btrfs_store, "src1")
    before = sorted(os.listdir(btrfs_store))
    with pytest.raises(OSError):
        byteback.create_snapshot(source, btrfs_store, name)
    assert sorted(os.listdir(btrfs_store)) == before


def test_neither_call_follows_a_symlink(btrfs_store):
    source = _subvolume(btrfs_store, "src2")
    elsewhere = btrfs_store / "elsewhere"
    elsewhere.mkdir()
    (btrfs_store / "link-to-source").symlink_to(source)
    (btrfs_store / "link-to-dir").symlink_to(elsewhere)
    with pytest.raises(OSError):
        byteback.create_snapshot(btrfs_store / "link-to-source", btrfs_store, "via-link")
    with pytest.raises(OSError):
        byteback.create_snapshot(source, btrfs_store / "link-to-dir", "into-link")
    assert not (btrfs_store / "via-link").exists() and os.listdir(elsewhere) == []
    byteback.create_snapshot(source, btrfs_store, "snap2")
    (btrfs_store / "link-to-snap").symlink_to(btrfs_store / "snap2")
    with pytest.raises(OSError):
        byteback.set_read_only(btrfs_store / "link-to-snap")
    assert _ro(btrfs_store / "snap2") == "ro=false"


def test_set_read_only_refuses_a_directory_that_is_no_subvolume(btrfs_store):
    source = _subvolume(btrfs_store, "src3")
    with pytest.raises(OSError):
        byteback.set_read_only(source / "dir")
    assert _ro(source) == "ro=false"
    (source / "dir" / "still").write_bytes(b"writable")


def _data_on_disc(path: Path) -> int:
    """Bytes of data extents in the subvolume's tree: what has been written out (no sync)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        return byteback.search_subvolume(fd, byteback.SubvolumeTally(0), 0).data
    finally:
        os.close(fd)


def test_write_out_store_puts_a_push_s_data_on_disc_before_the_snapshot(btrfs_store):
    """What a waiting snapshot run does each WRITE_OUT_EVERY seconds while rsync writes."""
    current = _subvolume(btrfs_store, "src4")
    with open(current / "big", "wb") as f:
        f.write(os.urandom(8 << 20))
    before = _data_on_disc(current)
    byteback.write_out_store(str(btrfs_store))()
    assert before < 8 << 20 <= _data_on_disc(current)
