"""Disc in the store's run/ and sessions/ (the backup user's, and each host account's) is counted
by unaccounted_bytes whatever shape it takes, on a real btrfs loop file, planted by an
unprivileged user: prune does not delete history for room that junk took.

btrfs keeps empty files, directories and xattrs in metadata, so their st_blocks is 0: counting
st_blocks of regular files alone counted such junk as nothing.
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
from sshd_env import btrfs_mount  # noqa: E402
from treeutil import NOBODY  # noqa: E402

import byteback  # noqa: E402

pytestmark = pytest.mark.integration
FILES, DIRS, PAD = 2000, 1000, 3000
BLOCK = 4096                # what each entry takes at least, whatever its type

PLANT = ("import os, sys\n"
         "d = sys.argv[1]; os.mkdir(d)\n"
         f"for i in range({FILES}):\n"
         "    p = f'{d}/e{i}'\n"
         "    open(p, 'wb').close()\n"
         f"    os.setxattr(p, 'user.pad', b'x' * {PAD})\n"
         f"for i in range({DIRS}):\n"
         "    os.mkdir(f'{d}/d{i}')\n")


@needs_root
@needs_btrfs
def test_empty_files_with_xattrs_and_directories_planted_in_run_are_counted():
    with btrfs_mount("300M") as root:
        store = byteback.open_store(root)
        assert store.kind == "btrfs"
        store.prepare_host("web1")
        store.run_dir.mkdir(parents=True)
        os.chown(store.run_dir, NOBODY, NOBODY)                 # as setup-server gives the backup user
        with store.session_lock("web1"):
            store.mark_dirty("web1", byteback.now_local())
            own = sum(os.lstat(p).st_blocks * 512 for p in (store.session_lock_path("web1"), store.dirty_path("web1")))
            assert store.unaccounted_bytes() == own, "a host's own lock and marker: their blocks, no more"
        junk = store.run_dir / "junk"
        subprocess.run(["/usr/bin/python3", "-I", "-c", PLANT, str(junk)], check=True, timeout=300,
                       user=NOBODY, group=NOBODY, cwd="/")
        os.sync()
        st = os.lstat(junk / "e0")
        assert st.st_blocks == 0 and os.getxattr(junk / "e0", "user.pad") == b"x" * PAD   # what hid it
        counted = store.unaccounted_bytes() - own
        at_least = (FILES + DIRS + 1) * BLOCK + FILES * PAD
        assert counted >= at_least, (counted, at_least)
        print(f"planted {FILES} empty files with {PAD}-byte xattrs and {DIRS} directories: "
              f"counted {counted} bytes")
