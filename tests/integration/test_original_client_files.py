"""The original byteback's client files, read as it read them, end to end over the real sshd.

rsync_flags with '--acls' (the original's man page example) and an exclude
with a space in it; an excludes line whose leading spaces are part of a name.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from remote_env import byteback_remote  # noqa: E402,F401


def getfacl(path: Path) -> str:
    return subprocess.run(["getfacl", "--omit-header", "--absolute-names", str(path)], check=True,
                          stdout=subprocess.PIPE, universal_newlines=True).stdout


def test_acls_excludes_and_flags_as_the_original_read_them(byteback_remote, tmp_path):
    remote = byteback_remote
    src = tmp_path / "src"
    (src / "My Files").mkdir(parents=True)
    (src / "My Files" / "skip").write_text("excluded by rsync_flags\n")
    (src / "My Files" / "keep").write_text("kept\n")
    (src / "  lead").write_text("excluded by excludes: its name starts with spaces\n")
    (src / "lead").write_text("kept: not the same name\n")
    acl_file = src / "shared"
    acl_file.write_text("read by nobody too\n")
    subprocess.run(["setfacl", "-m", "u:nobody:r--", str(acl_file)], check=True)
    flags = remote.client_config / "rsync_flags"
    excludes = remote.client_config / "excludes"
    flags.write_text(f"--acls\n--exclude={src}/My Files/skip\n")
    excludes.write_text("# the original's excludes\n  lead\n")
    try:
        remote.backup("--source", str(src)).check()
        snap = remote.snapshots()[-1]
        stored = remote.host_dir / snap / str(src).lstrip("/")
        assert (stored / "My Files" / "keep").is_file() and (stored / "lead").is_file()
        assert not (stored / "My Files" / "skip").exists() and not (stored / "  lead").exists()
        out = tmp_path / "out"
        # client1 is not this machine's name: --same-owner keeps what a restore elsewhere drops.
        remote.run("restore", "--host", remote.host, "--same-owner", "--restore", "--to", str(out),
                   str(acl_file)).check()
        restored = out / str(acl_file).lstrip("/")
        assert "user:nobody:r--" in getfacl(restored), getfacl(restored)
        assert getfacl(restored) == getfacl(acl_file)
    finally:
        flags.unlink()
        excludes.unlink()


def test_a_client_without_its_own_known_hosts_pins_the_key_root_trusted_once(byteback_remote, tmp_path):
    remote = byteback_remote
    pinned = remote.client_config / "known_hosts"
    saved = pinned.read_text()
    home = tmp_path / "home"
    (home / ".ssh").mkdir(parents=True)
    (home / ".ssh" / "known_hosts").write_text("# root's own\n" + remote.env.sshd.known_hosts_line() + "\n")
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_text("a\n")
    pinned.unlink()
    try:
        first = remote.run("restore", "--host", remote.host, str(src), env={"HOME": str(home)})
        assert f"byteback: pinned the host key of [{remote.env.host}]:{remote.env.port} from " \
               f"{home}/.ssh/known_hosts into {pinned}" in first.stderr, first.stderr
        assert "Host key verification failed" not in first.stderr
        assert pinned.read_text().split() == remote.env.sshd.known_hosts_line().split()
        second = remote.run("restore", "--host", remote.host, str(src), env={"HOME": str(home)})
        assert "pinned" not in second.stderr
    finally:
        pinned.write_text(saved)
