"""The second rsync pass (`again:`) over a real sshd, on a real btrfs store.

rsync writes a btrfs current in place (--inplace): a file the client split off
from a hard-link group would be written into the inode its old partners still
share there.  A client that said it copies again (AGAIN_WORD, after the pong
said the server knows it) skips the walk that gives every hard-linked name an
inode of its own before its push; the snapshot, as root, then refuses with
`again:` where the run changed such an inode, and the client copies once more.
A client that did not say so -- the previous release's, run here byte for byte
from git -- keeps the walk and gets its snapshot the same night.
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from remote_env import REPO, RemoteByteback, Result, byteback_remote  # noqa: E402,F401 (fixture)

# The last commit before eea9099 taught the client 'again:': its backup pings,
# pushes with --rsync-path "rsync --fake-super" and completes, and reports any
# refusal of the snapshot as a failed backup.
PREVIOUS_CLIENT = "86001e4"


@pytest.fixture(scope="module")
def remote(request) -> RemoteByteback:
    remote = request.getfixturevalue("byteback_remote")
    remote.set_server_conf(min_interval="0")
    return remote


@pytest.fixture(scope="module")
def previous_client(tmp_path_factory) -> Path:
    """byteback.py of PREVIOUS_CLIENT, from this checkout's git history."""
    proc = subprocess.run(["git", "-C", str(REPO), "show", f"{PREVIOUS_CLIENT}:byteback.py"],
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    if proc.returncode != 0:
        pytest.skip(f"needs this checkout's git history (commit {PREVIOUS_CLIENT}, the previous "
                    f"client): {proc.stderr.decode(errors='replace').strip()}")
    path = tmp_path_factory.mktemp("previous") / "byteback.py"
    path.write_bytes(proc.stdout)
    path.chmod(0o755)
    return path


_last_snapshot_at = [0.0]


def backup(remote: RemoteByteback, src: Path, program: Path = None) -> Result:
    """One backup of src (by the previous client's byteback.py if given), a second
    after the last one: snapshot names have one-second resolution."""
    time.sleep(max(0.0, _last_snapshot_at[0] + 1.1 - time.monotonic()))
    args = ("backup", "--host", remote.host, "--retry-delay", "1", "-v", "--source", str(src))
    if program is None:
        result = remote.run(*args)
    else:
        argv = [sys.executable, str(program), "--config-dir", str(remote.client_config), *args]
        env = dict(os.environ, BYTEBACK_STATE_DIR=str(remote.client_state))
        env.pop("SSH_AUTH_SOCK", None)
        proc = subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              errors="replace", env=env, timeout=300, stdin=subprocess.DEVNULL)
        result = Result(argv, proc.returncode, proc.stdout, proc.stderr)
    _last_snapshot_at[0] = time.monotonic()
    return result


def new_snapshot(remote: RemoteByteback, before: List[str]) -> Path:
    new = sorted(set(remote.snapshots()) - set(before))
    assert len(new) == 1, f"expected exactly one new snapshot, got {new}"
    return remote.host_dir / new[0]


def stored(snapshot: Path, src: Path) -> Path:
    return snapshot / str(src).lstrip("/")


def contents(root: Path) -> Dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_the_previous_client_gets_its_snapshot_the_same_night_when_a_group_is_split(
        remote, previous_client, tmp_path):
    """A client that never heard of 'again:' must not be refused: its push walks first."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "b").write_bytes(b"shared, old\n")
    os.link(src / "b", src / "b-link")
    (src / "c").write_bytes(b"alone\n")
    first = backup(remote, src, previous_client).check()
    assert "again:" not in first.stderr, first.stderr
    linked = remote.host_dir / remote.snapshots()[-1]
    assert os.stat(stored(linked, src) / "b").st_ino == os.stat(stored(linked, src) / "b-link").st_ino

    (src / "b").unlink()                            # as editors and package upgrades replace files
    (src / "b").write_bytes(b"b on its own, new\n")
    before = remote.snapshots()
    split = backup(remote, src, previous_client)
    split.check()                                   # the same night, first time
    assert "again:" not in split.stderr and "copying once more" not in split.stderr, split.stderr
    snap = new_snapshot(remote, before)
    assert contents(stored(snap, src)) == contents(src)
    assert contents(stored(linked, src)) == {"b": b"shared, old\n", "b-link": b"shared, old\n",
                                             "c": b"alone\n"}


def test_the_previous_client_reads_the_new_pong(remote, previous_client, tmp_path):
    """The pong's 'can: again' line is new: an older client passes over it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"a\n")
    before = remote.snapshots()
    result = backup(remote, src, previous_client).check()
    assert "server: pong byteback" in result.stderr, result.stderr
    assert contents(stored(new_snapshot(remote, before), src)) == {"a": b"a\n"}


def _stat_xattr(path: Path) -> bytes:
    """The owner and mode --fake-super keeps for a stored file."""
    return os.getxattr(path, "user.rsync.%stat", follow_symlinks=False)


def test_names_added_to_or_removed_from_a_group_cost_no_second_pass(remote, tmp_path):
    """rsync -H linking one more name, or --delete removing one, rewrites the inode's link
    count only: its data, xattrs and stat are as in the last snapshot."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "b").write_bytes(b"shared\n")
    os.link(src / "b", src / "b-link")
    backup(remote, src).check()
    first = remote.host_dir / remote.snapshots()[-1]

    os.link(src / "b", src / "b-link2")                 # a name added to the group
    before = remote.snapshots()
    added = backup(remote, src).check()
    assert "again:" not in added.stderr and "copying once more" not in added.stderr, added.stderr
    snap = new_snapshot(remote, before)
    inodes = {os.stat(stored(snap, src) / n).st_ino for n in ("b", "b-link", "b-link2")}
    assert len(inodes) == 1 and contents(stored(snap, src)) == contents(src)

    (src / "b-link").unlink()                           # and one removed
    before = remote.snapshots()
    removed = backup(remote, src).check()
    assert "again:" not in removed.stderr and "copying once more" not in removed.stderr, removed.stderr
    assert contents(stored(new_snapshot(remote, before), src)) == {"b": b"shared\n", "b-link2": b"shared\n"}
    assert contents(stored(first, src)) == {"b": b"shared\n", "b-link": b"shared\n"}


def test_a_group_edited_in_place_and_given_a_name_is_stored_in_one_pass_when_it_had_one_name(remote, tmp_path):
    """An inode of one name at the last snapshot: rsync -H writes it, then links the new name."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "a").write_bytes(b"old\n")
    backup(remote, src).check()
    (src / "a").write_bytes(b"new, and linked\n")
    os.link(src / "a", src / "a-link")
    before = remote.snapshots()
    result = backup(remote, src).check()
    assert "copying once more" not in result.stderr, result.stderr
    assert contents(stored(new_snapshot(remote, before), src)) == contents(src)


def test_a_file_split_off_with_only_a_new_mode_asks_for_the_second_pass(remote, tmp_path):
    """The same data and mtime, another mode: rsync sets the mode by name, into the xattr the
    old partner shares (replaced in place, its item's transid unchanged)."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "b").write_bytes(b"shared\n")
    (src / "b").chmod(0o644)
    os.link(src / "b", src / "b-link")
    backup(remote, src).check()
    linked = remote.host_dir / remote.snapshots()[-1]
    old_mode = _stat_xattr(stored(linked, src) / "b-link")

    subprocess.run(["cp", "-p", str(src / "b"), str(src / "b.new")], check=True)
    os.replace(src / "b.new", src / "b")
    (src / "b").chmod(0o600)
    before = remote.snapshots()
    result = backup(remote, src).check()
    assert "again: 1 hard-linked files in current were changed" in result.stderr, result.stderr
    snap = new_snapshot(remote, before)
    assert _stat_xattr(stored(snap, src) / "b-link") == old_mode
    assert _stat_xattr(stored(snap, src) / "b") != old_mode
    assert _stat_xattr(stored(linked, src) / "b") == old_mode


# -- The named pass: only the names an 'again:' lists are copied again ---------

def _ino(path: Path) -> int:
    return os.lstat(path).st_ino


def _linked_tree(src: Path) -> None:
    src.mkdir()
    (src / "b").write_bytes(b"shared, old\n")
    os.link(src / "b", src / "b-link")
    (src / "sub").mkdir()
    (src / "sub" / "c").write_bytes(b"another group\n")
    os.link(src / "sub" / "c", src / "sub" / "c-link")
    (src / "d").write_bytes(b"alone\n")


OLD_TREE = {"b": b"shared, old\n", "b-link": b"shared, old\n", "d": b"alone\n",
            "sub/c": b"another group\n", "sub/c-link": b"another group\n"}


def test_a_group_edited_in_place_is_copied_again_by_its_names_alone(remote, tmp_path):
    """The snapshot lists the names of the inode it found changed: the client sends only
    those once more, and its push gives only those an inode of their own, no walk."""
    src = tmp_path / "src"
    _linked_tree(src)
    backup(remote, src).check()
    first = remote.host_dir / remote.snapshots()[-1]
    current = stored(remote.host_dir / "current", src)
    other = _ino(current / "sub" / "c")

    with open(src / "b", "r+b") as f:               # in place: both names change
        f.write(b"SHARED")
    before = remote.snapshots()
    result = backup(remote, src).check()
    assert "again: 1 hard-linked files in current were changed" in result.stderr, result.stderr
    assert "copying only the 2 names the server listed" in result.stderr, result.stderr
    # The names go to the client alone (the system log has only their count, syslog_only).
    assert result.stderr.count("names listed to the client") == 0, result.stderr
    snap = new_snapshot(remote, before)
    assert contents(stored(snap, src)) == contents(src)
    assert _ino(stored(snap, src) / "b") == _ino(stored(snap, src) / "b-link")
    assert _ino(current / "sub" / "c") == _ino(current / "sub" / "c-link") == other   # not walked
    assert contents(stored(first, src)) == OLD_TREE
    assert not (remote.host_dir / ".byteback-again").exists()     # answered


def test_a_file_split_off_its_group_is_put_right_by_the_named_pass(remote, tmp_path):
    """rsync wrote b's new data into the inode b-link shares: the named pass gives each an
    inode of its own and copies both from the client."""
    src = tmp_path / "src"
    _linked_tree(src)
    backup(remote, src).check()
    first = remote.host_dir / remote.snapshots()[-1]
    (src / "b").unlink()
    (src / "b").write_bytes(b"b on its own, and longer\n")
    before = remote.snapshots()
    result = backup(remote, src).check()
    assert "copying only the 2 names the server listed" in result.stderr, result.stderr
    snap = new_snapshot(remote, before)
    assert contents(stored(snap, src)) == contents(src)
    assert _ino(stored(snap, src) / "b") != _ino(stored(snap, src) / "b-link")
    assert contents(stored(first, src)) == OLD_TREE


def test_a_name_linked_outside_the_sources_makes_the_pass_copy_everything(remote, tmp_path):
    """A shell as the receiving account linked a name of the group outside the client's
    sources: the listing names it, the client sends no path it does not back up, and copies
    the whole tree once more (the walk) instead; history is as it was."""
    src = tmp_path / "src"
    _linked_tree(src)
    backup(remote, src).check()
    first = remote.host_dir / remote.snapshots()[-1]
    current = remote.host_dir / "current"
    os.link(stored(current, src) / "b", current / "planted")        # rsync never deletes it there
    with open(src / "b", "r+b") as f:
        f.write(b"SHARED")
    before = remote.snapshots()
    result = backup(remote, src).check()
    assert "again: 1 hard-linked files" in result.stderr, result.stderr
    assert "copying only" not in result.stderr, result.stderr
    snap = new_snapshot(remote, before)
    assert contents(stored(snap, src)) == contents(src)
    assert contents(stored(first, src)) == OLD_TREE
    assert not os.path.lexists(first / "planted")


# Run as the shared backup user while the client's first pass goes on: once rsync has
# reached z/ (after lnk, in the file list's order), it writes into an old hard-linked
# inode of current (so the snapshot refuses with 'again:' and lists that inode's names)
# and gives the inode a new name below lnk, which is a symlink on the client.
_PLANT_BELOW_A_SYMLINK = r'''
import os, sys, time
current, base = sys.argv[1], os.path.join(sys.argv[1], sys.argv[2])
mark = os.path.join(base, "z", "f0")
before = os.lstat(mark).st_mtime_ns
print("watching", flush=True)
deadline = time.time() + 60
while time.time() < deadline:
    if os.lstat(mark).st_mtime_ns != before:
        with open(os.path.join(base, "a", "g1"), "r+b") as f:
            f.write(b"WRITTEN")
        planted = os.path.join(current, ".planted")
        os.mkdir(planted)
        os.link(os.path.join(base, "a", "g1"), os.path.join(planted, "key"))
        os.rename(os.path.join(base, "lnk"), os.path.join(current, ".lnk-was"))
        os.rename(planted, os.path.join(base, "lnk"))
        print("planted", flush=True)
        break
    time.sleep(0.001)
'''


def test_a_name_planted_below_a_client_symlink_makes_the_pass_copy_everything(remote, tmp_path):
    """fakesuper: the shared backup user can write current, so the names an 'again:' lists
    are its to choose.  rsync's sender follows a symlink on a --files-from entry's way
    (a whole pass never does): a name planted below one of the client's symlinks would
    send what that points at, outside the sources.  The client copies everything instead."""
    secret = tmp_path / "not-backed-up"
    secret.mkdir()
    (secret / "key").write_bytes(b"CLIENT SECRET\n")
    src = tmp_path / "src"
    (src / "a").mkdir(parents=True)
    (src / "a" / "g1").write_bytes(b"group\n")
    os.link(src / "a" / "g1", src / "a" / "g2")
    os.symlink(secret, src / "lnk")
    (src / "z").mkdir()
    for i in range(3000):                            # work for the pass after lnk
        (src / "z" / f"f{i}").write_bytes(os.urandom(2000))
    backup(remote, src).check()
    first = remote.host_dir / remote.snapshots()[-1]
    for i in range(3000):
        (src / "z" / f"f{i}").write_bytes(os.urandom(2000))
    watcher = subprocess.Popen(
        ["sudo", "-u", remote.env.user.name, "/usr/bin/python3", "-c", _PLANT_BELOW_A_SYMLINK,
         str(remote.host_dir / "current"), str(src).lstrip("/")], stdout=subprocess.PIPE, universal_newlines=True)
    try:
        assert watcher.stdout.readline().strip() == "watching"
        before = remote.snapshots()
        result = backup(remote, src)
        said = watcher.communicate(timeout=90)[0]
    finally:
        watcher.kill()
    assert "planted" in said, "the backup user's plant did not happen: the test proves nothing"
    assert "again: " in result.stderr and "copying only" not in result.stderr, result.stderr
    result.check()
    snap = new_snapshot(remote, before)
    assert os.path.islink(stored(snap, src) / "lnk") or (stored(snap, src) / "lnk").is_file()
    grep = subprocess.run(["grep", "-rl", "CLIENT SECRET", str(remote.host_dir)],
                          stdout=subprocess.PIPE, universal_newlines=True)
    assert (grep.returncode, grep.stdout) == (1, "")         # 1: read it all, found nothing
    assert (stored(first, src) / "a" / "g1").read_bytes() == b"group\n"
