"""Named skip markers for tests that need real parts of the machine (STYLE.md #15).

Use as decorators, e.g. ``@needs_root @needs_btrfs def test_...``; each reason
says what is missing, and ``-ra`` prints it in the summary.
"""
from __future__ import annotations

import os
import shutil

import pytest

needs_root = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root: mounts a btrfs loop file, runs sshd, changes owners")
needs_btrfs = pytest.mark.skipif(
    shutil.which("mkfs.btrfs") is None or not os.path.exists("/dev/loop-control"),
    reason="needs btrfs-progs (mkfs.btrfs) and loop devices (/dev/loop-control)")
needs_rsync = pytest.mark.skipif(
    shutil.which("rsync") is None, reason="rsync not installed: apt-get install rsync")
needs_sshd = pytest.mark.skipif(
    not os.path.exists("/usr/sbin/sshd"),
    reason="/usr/sbin/sshd not found: apt-get install openssh-server")
