"""The database phase's bind mounts, for real: a copy is seen only at the directory that was checked.

backup (root) binds each database copy over its datadir in a private mount
namespace.  The datadir's owner (the server's user) can replace it by a
symlink meanwhile; the copy must never then be seen at the link's target.
"""
from __future__ import annotations

import contextlib
import os
import subprocess
import time
import sys
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
sys.path.insert(0, str(Path(__file__).parent))
import byteback  # noqa: E402

pytestmark = pytest.mark.integration


@pytest.fixture
def dirs(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("needs root: bind mounts in a mount namespace")
    made = {}
    for name in ("datadir", "copy", "victim"):
        made[name] = tmp_path / name
        made[name].mkdir()
        (made[name] / name).write_text(name)
    st = os.stat(made["datadir"])
    return made, (st.st_dev, st.st_ino)


def seen(path):
    return sorted(os.listdir(path))


def test_the_copy_is_seen_at_the_datadir_it_was_made_of(dirs):
    made, identity = dirs
    with byteback.private_view([(str(made["copy"]), str(made["datadir"]), identity)]):
        assert seen(made["datadir"]) == ["copy"]
    assert seen(made["datadir"]) == ["datadir"]


def test_a_datadir_swapped_for_a_symlink_is_left_alone_and_its_target_too(dirs):
    made, identity = dirs
    os.rename(made["datadir"], made["datadir"].with_name("moved"))
    made["datadir"].symlink_to(made["victim"])
    with byteback.private_view([(str(made["copy"]), str(made["datadir"]), identity)]):
        assert seen(made["victim"]) == ["victim"]


def test_a_symlink_higher_up_is_not_followed_either(dirs):
    made, identity = dirs
    parent = made["datadir"].parent
    (parent / "up").symlink_to(parent)
    with byteback.private_view([(str(made["copy"]), str(parent / "up" / "datadir"), identity)]):
        assert seen(made["datadir"]) == ["datadir"]


def test_another_directory_at_the_datadirs_name_is_left_alone(dirs):
    made, identity = dirs
    os.rename(made["datadir"], made["datadir"].with_name("moved"))
    os.rename(made["victim"], made["datadir"])
    with byteback.private_view([(str(made["copy"]), str(made["datadir"]), identity)]):
        assert seen(made["datadir"]) == ["victim"]


@contextlib.contextmanager
def fake_mariadbd(*args: str, uid: int, gid: int) -> Iterator[subprocess.Popen]:
    """A process named mariadbd with these arguments, run as uid, until the block ends."""
    def as_that_user():
        os.setgid(gid)
        os.setuid(uid)

    fake = subprocess.Popen(
        ["/usr/bin/python3", "-c", "import ctypes, time; ctypes.CDLL(None).prctl(15, b'mariadbd'); time.sleep(60)",
         *args], preexec_fn=as_that_user, cwd="/")
    try:
        deadline = time.monotonic() + 10
        while Path(f"/proc/{fake.pid}/comm").read_text().strip() != "mariadbd":
            assert fake.poll() is None and time.monotonic() < deadline, "the fake server did not start"
            time.sleep(0.05)
        yield fake
    finally:
        fake.kill()
        fake.wait()


@pytest.mark.parametrize("who", ["a person", "a system account"])
def test_a_process_named_mariadbd_of_another_account_is_not_taken_for_a_server(tmp_path, who):
    """Any user (www-data too) can name a process mariadbd and give it --socket=<its own>:
    root must not log in there; only root's, mysql's and postgres's servers count."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs a process as another user")
    from sshd_env import server_user
    home = tmp_path / "home"
    home.mkdir()
    with server_user(home) as user:
        os.chown(home, user.uid, user.gid)
        # server_user makes a system account (uid below 1000); a person's uid is above.
        uid = user.uid if who == "a system account" else 54242

        with fake_mariadbd(f"--socket={home}/evil.sock", f"--datadir={home}", uid=uid, gid=user.gid) as fake:
            assert fake.pid not in [db.pid for db in byteback.find_databases()]


def test_restore_database_never_moves_aside_a_datadir_a_server_runs_on_through_a_symlink(tmp_path):
    """restore --database moves the live datadir aside only when no server runs on it; a server
    started with --datadir=<a symlink to it> runs on it just the same."""
    if os.geteuid() != 0:
        pytest.skip("needs root: runs a process as a system account")
    from sshd_env import server_user
    home = tmp_path / "home"
    home.mkdir()
    datadir = tmp_path / "mysql"
    datadir.mkdir()
    (tmp_path / "link").symlink_to(datadir)
    with server_user(home) as user:
        with fake_mariadbd(f"--datadir={tmp_path}/link", f"--socket={home}/s.sock", uid=user.uid, gid=user.gid):
            with pytest.raises(byteback.ByteBackError, match="stop it first"):
                byteback.move_datadir_aside(str(datadir), "2026-11-01T03:15+0000")
            assert datadir.is_dir()
