"""A full measure of a subvolume (measure_subvolume(full=True)) on a real btrfs loop file,
where most leaves were written before `since` and the tally passes over their items with
only their sizes counted (SubvolumeTally): it must count what a measure from 0 counts,
and give a shared inode whose extents sit in such leaves the digest of all its items.
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


class LeafCounting(byteback.SubvolumeTally):
    """The tally, and how many records came from leaves written before `since`."""

    def __init__(self, since: int):
        super().__init__(since)
        self.old = self.new = 0

    def add(self, buf, count):
        pos = 0
        for _ in range(count):
            if pos + byteback._SEARCH_HEADER.size > len(buf):
                break
            transid, _objectid, _offset, _kind, length = byteback._SEARCH_HEADER.unpack_from(buf, pos)
            pos += byteback._SEARCH_HEADER.size + length
            if transid < self.since:
                self.old += 1
            else:
                self.new += 1
        return super().add(buf, count)


def test_a_full_measure_counts_old_leaves_as_a_measure_from_zero_does(btrfs_store):
    tree = btrfs_store / "measured"
    subprocess.run(["btrfs", "subvolume", "create", str(tree)], check=True, stdout=subprocess.DEVNULL)
    for d in range(30):                                   # many leaves: 30 directories, 1,500 files
        (tree / f"d{d}").mkdir()
        for i in range(50):
            (tree / f"d{d}" / f"f{i}").write_bytes(b"x" * (d + i))
        os.link(tree / f"d{d}" / "f0", tree / f"d{d}" / "f0-link")      # linked names in old leaves
    with open(tree / "d15" / "many", "wb") as f:          # 600 extents: its items span leaves
        for i in range(600):
            f.seek(i * 8192)
            f.write(b"e" * 4096)
    os.link(tree / "d15" / "many", tree / "d29" / "many-link")
    first, _ = byteback.measure_subvolume(tree, 0, full=True)
    since = first.generation + 1
    os.chmod(tree / "d15" / "many", 0o600)                # rewrites its inode's leaf alone
    tally = LeafCounting(since)
    later, _ = byteback.measure_subvolume(tree, since, full=True, tally=tally)
    assert tally.old > 10 * tally.new > 0, (tally.old, tally.new)      # the skip is what is tested
    assert (later.size, later.linked) == (first.size, first.linked)
    assert later.linked == 30 * 2 + 2
    (shared,) = later.shared
    fd = os.open(tree, os.O_RDONLY | os.O_DIRECTORY)
    try:
        whole = byteback.read_inode(fd, shared.inode)    # every item of the inode, no leaf passed over
    finally:
        os.close(fd)
    assert shared.inode == os.lstat(tree / "d15" / "many").st_ino
    assert (shared.items, shared.stat, shared.written) == (whole.items, whole.stat, False)
