"""The in-progress marker survives a crash: mark_dirty's one-fsync write (write_new_json)
puts the new file on disc before it returns, on a real ext4 loop file (a hardlink store's).

The crash is ext4's shutdown ioctl without a journal flush (EXT4_GOING_FLAGS_NOLOGFLUSH,
as xfstests' godown): from then on nothing more reaches the disc, and what was only in
the page cache is gone after a remount.  A push cut by such a crash must still read as
unfinished to the next one (dirty_since), or prune cannot roll the upload back.
btrfs has no such ioctl on this kernel, so the claim for btrfs stays untested here.
"""
from __future__ import annotations

import contextlib
import datetime as dt
import errno
import fcntl
import os
import shutil
import struct
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from markers import needs_root  # noqa: E402
from sshd_env import run  # noqa: E402

import byteback  # noqa: E402

# mkfs.ext4 is e2fsprogs', which build.sh installs: missing, the test fails, never skips.
pytestmark = [pytest.mark.integration, needs_root,
              pytest.mark.skipif(not os.path.exists("/dev/loop-control"), reason="needs loop devices (/dev/loop-control)")]

EXT4_IOC_SHUTDOWN = 0x8004587D          # _IOR('X', 125, __u32)
EXT4_GOING_FLAGS_NOLOGFLUSH = 2         # stop at once: neither the journal nor dirty pages are written


@contextlib.contextmanager
def ext4_loop() -> Iterator[tuple]:
    """(device, mount point) of a fresh 32 MiB ext4 on a loop file; all of it goes on exit."""
    base = Path(tempfile.mkdtemp(prefix="bbtest-ext4-"))
    image, mnt = base / "image", base / "mnt"
    mnt.mkdir()
    device = None
    try:
        run(["truncate", "-s", "32M", image])
        run(["mkfs.ext4", "-q", "-F", image])
        device = subprocess.run(["losetup", "--find", "--show", str(image)], check=True,
                                stdout=subprocess.PIPE, universal_newlines=True).stdout.strip()
        run(["mount", "-t", "ext4", device, mnt])
        yield device, mnt
    finally:
        if os.path.ismount(mnt):
            subprocess.run(["umount", str(mnt)], check=False)
        if device:
            subprocess.run(["losetup", "-d", device], check=False)
        if not os.path.ismount(mnt):
            shutil.rmtree(base, ignore_errors=True)


def _crash(mnt: Path) -> None:
    fd = os.open(mnt, os.O_RDONLY | os.O_DIRECTORY)
    try:
        fcntl.ioctl(fd, EXT4_IOC_SHUTDOWN, struct.pack("<I", EXT4_GOING_FLAGS_NOLOGFLUSH))
    except OSError as e:
        if e.errno in (errno.ENOTTY, errno.EOPNOTSUPP):
            pytest.skip(f"this kernel's ext4 cannot be shut down (EXT4_IOC_SHUTDOWN: {e.strerror})")
        raise
    finally:
        os.close(fd)


def test_the_in_progress_marker_is_on_disc_when_mark_dirty_returns():
    when = dt.datetime(2026, 12, 2, 3, 15, tzinfo=dt.timezone.utc)
    with ext4_loop() as (device, mnt):
        store = byteback.open_store(mnt)
        assert store.kind == "hardlink"
        store.prepare_host("web1")
        os.sync()                                   # the store as it was before the push
        store.mark_dirty("web1", when)
        unsynced = mnt / "written-without-fsync"    # the control: the crash loses what is not
        unsynced.write_text('{"since": "x"}\n')
        _crash(mnt)
        run(["umount", mnt])
        run(["mount", "-t", "ext4", device, mnt])
        assert not unsynced.exists() or unsynced.read_bytes() == b"", "the crash kept a file never fsynced"
        assert byteback.open_store(mnt).dirty_since("web1") == when
