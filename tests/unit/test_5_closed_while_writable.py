"""Unit tests of ``_closed_while_writable`` and its crash repair in ``clean_leftovers`` (section 7d).

A descriptor opened for writing while a btrfs snapshot is writable writes on
after its read-only flag is set, so a server's <host>/ is root-only (0700)
while its snapshot is made (test_userns_review shows the attack for real).
"""
from __future__ import annotations

import os
import stat

import pytest

import byteback

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="the server layout (root's <host>/) needs root")


def _mode(path) -> int:
    return stat.S_IMODE(os.lstat(path).st_mode)


def test_a_servers_host_directory_is_root_only_while_the_snapshot_is_writable(tmp_path):
    host_dir = tmp_path / "web1"
    host_dir.mkdir()
    os.chown(host_dir, 0, 65534)
    os.chmod(host_dir, byteback.HOST_DIR_MODE)
    with byteback._closed_while_writable(host_dir):
        assert _mode(host_dir) == 0o700
    assert _mode(host_dir) == byteback.HOST_DIR_MODE
    with pytest.raises(RuntimeError), byteback._closed_while_writable(host_dir):
        raise RuntimeError("the snapshot failed")
    assert _mode(host_dir) == byteback.HOST_DIR_MODE


def test_clean_leftovers_opens_a_host_directory_a_crash_left_root_only(tiny):
    tiny.add_snapshot("web1", byteback.dt.datetime(2026, 1, 1, 3, 0, tzinfo=byteback.dt.timezone.utc))
    host_dir = tiny.root / "web1"
    os.chown(host_dir, 0, 65534)
    os.chmod(host_dir, 0o700)
    tiny.store.clean_leftovers()
    assert _mode(host_dir) == byteback.HOST_DIR_MODE
    os.chown(host_dir, 0, 0)          # a laptop's store (no group to open it to) is left as it is
    os.chmod(host_dir, 0o700)
    tiny.store.clean_leftovers()
    assert _mode(host_dir) == 0o700


def test_root_never_chmods_or_retries_by_a_path_a_client_could_have_swapped(tmp_path):
    """rmtree's error handler chmodded the parent of a path that failed, by name:
    as root, a symlink planted on the way made that any directory of the server."""
    system = tmp_path / "usr-bin"
    system.mkdir(mode=0o755)
    (system / "d").mkdir()
    tree = tmp_path / "current"
    tree.mkdir()
    (tree / "x").symlink_to(system)         # swapped in after rmtree went into the real x
    failure = OSError(39, "Directory not empty")
    with pytest.raises(OSError):
        byteback._make_writable_and_retry(os.rmdir, str(tree / "x" / "d"), (OSError, failure, None))
    assert _mode(system) == 0o755 and (system / "d").is_dir()
