"""Remote backups end to end over a real sshd, and the faults a real network brings.

Everything here is real: the built byteback.pyz, setup-server and
setup-client through the CLI, OpenSSH, rsync, a btrfs store on a loop file.
Faults are injected from outside, as the world would: the client's ssh is
killed mid-transfer, the server's disc fills up, the client dies between
rsync and ``complete`` (an ``ssh`` wrapper early in PATH kills it there).

Tests share one server and store per module (remote_env's ``byteback_remote``),
so each backs up its own source and looks only at the snapshots it made; the
full-disc test gets a small store of its own.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Dict, List, Optional

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import treeutil  # noqa: E402
from remote_env import RemoteByteback, Result, byteback_remote, remote_byteback  # noqa: E402,F401 (fixture)
from sshd_env import _sigterm_as_interrupt, _skip_or_check, descendants, stop_process  # noqa: E402
from sshd_env import wait_for as wait_until  # noqa: E402

MUNGE_PREFIX = b"/rsyncd-munged/"     # what the server's --munge-links puts before a link target
MIB = 1 << 20
BULK_FILES, BULK_FILE_SIZE = 8, 20 * MIB          # per half of the bulk data (160 MiB each)


@pytest.fixture(scope="module")
def remote(request) -> RemoteByteback:
    """The module's server and set-up client (remote_env's byteback_remote)."""
    return request.getfixturevalue("byteback_remote")


# === Helpers ===================================================================

_last_snapshot_at = [0.0]


def snapshot_backup(remote: RemoteByteback, *args: str, env: Optional[dict] = None) -> Path:
    """Back up (min_interval 0) and return the one new snapshot's directory.

    Snapshot names have one-second resolution: two backups completing within
    the same second would collide, so keep them at least a second apart.
    """
    remote.set_server_conf(min_interval="0")
    time.sleep(max(0.0, _last_snapshot_at[0] + 1.1 - time.monotonic()))
    before = set(remote.snapshots())
    remote.backup(*args, env=env).check()
    _last_snapshot_at[0] = time.monotonic()
    return remote.host_dir / one_new_snapshot(remote, before)


def one_new_snapshot(remote: RemoteByteback, before: set) -> str:
    new = sorted(set(remote.snapshots()) - before)
    assert len(new) == 1, f"expected exactly one new snapshot, got {new}"
    return new[0]


def stored(snapshot: Path, source: Path) -> Path:
    """Where a source directory lands inside a snapshot (rsync --relative)."""
    return snapshot / str(source).lstrip("/")


def snapshot_manifest(tree: Path) -> treeutil.Manifest:
    """Scan a tree the server wrote, as the client had it: fake-super and munged links undone.

    Owner, mode and type come from the ``user.rsync.%stat`` xattr; a symlink
    is stored (Linux has no user xattrs on symlinks) as a small file holding
    its munged target.  A real symlink in a snapshot is a failure: nothing a
    client uploads may be followable on the server.
    """
    manifest = treeutil.scan(tree, fake_super=True)
    for rel, entry in manifest.items():
        path = os.path.join(bytes(tree), rel) if rel != b"." else bytes(tree)
        assert not os.path.islink(path), f"{treeutil.show(rel)} is a usable symlink on the server"
        if entry.kind == "symlink":
            with open(path, "rb") as f:
                munged = f.read()
            assert munged.startswith(MUNGE_PREFIX), f"{treeutil.show(rel)}: not munged: {munged!r}"
            manifest[rel] = entry._replace(target=munged[len(MUNGE_PREFIX):])
    return manifest


def assert_snapshot_matches(snapshot: Path, source: Path, expected: Optional[treeutil.Manifest] = None) -> None:
    treeutil.assert_same(expected if expected is not None else treeutil.scan(source),
                         snapshot_manifest(stored(snapshot, source)),
                         what=f"snapshot {snapshot.name} of {source}")


def assert_clean_failure(result: Result, *words: str) -> str:
    """Exit 1, no traceback, and a final one-line 'byteback: ...' message; return it."""
    result.check(1)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("byteback: "), result.stderr
    for word in words:
        assert word in lines[-1], f"{word!r} not in the final message: {lines[-1]}"
    return lines[-1]


def client_state(remote: RemoteByteback) -> dict:
    return json.loads((remote.client_state / "last-backup.json").read_text())


def write_tree(root: Path, files: Dict[str, bytes]) -> Path:
    for name, data in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
    return root


def bytes_below(path: Path) -> int:
    """Bytes the server has written below path so far (rsync --inplace grows files as it goes)."""
    total = 0
    for dirpath, _dirs, files in os.walk(path):
        for name in files:
            try:
                total += os.lstat(os.path.join(dirpath, name)).st_size
            except FileNotFoundError:
                pass
    return total


def spawn_backup(remote: RemoteByteback, *args: str) -> subprocess.Popen:
    """remote.backup(), but started in the background (same argv and environment)."""
    argv = [str(remote.pyz), "--config-dir", str(remote.client_config),
            "backup", "--host", remote.host, "--retry-delay", "1", *args]
    env = dict(os.environ, BYTEBACK_STATE_DIR=str(remote.client_state))
    env.pop("SSH_AUTH_SOCK", None)
    return subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            stdin=subprocess.DEVNULL, env=env)


def ssh_pids_below(pid: int) -> List[int]:
    found = []
    for child in descendants(pid):
        try:
            if Path(f"/proc/{child}/comm").read_text().strip() == "ssh":
                found.append(child)
        except OSError:
            pass
    return found


def logins(remote: RemoteByteback) -> int:
    """How many ssh connections the server has authenticated so far."""
    return remote.env.sshd.log_text().count("Accepted publickey for ")


def sessions(remote: RemoteByteback) -> int:
    """How many sessions (each a start of the forced command) the server has begun so far."""
    return remote.env.sshd.log_text().count("Starting session: forced-command")


def ssh_masters_left(tmp: Path) -> List[str]:
    """Command lines of byteback's shared-connection ssh masters still running below tmp."""
    found = []
    for entry in Path("/proc").iterdir():
        try:
            words = (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if "ControlMaster=yes" in words and any(f"{tmp}/byteback-ssh-" in w for w in words):
            found.append(" ".join(words))
    return found


@pytest.fixture(scope="module")
def bulk(tmp_path_factory):
    """320 MiB of incompressible data in two halves, a/ and b/ (8 files of 20 MiB each), once per module."""
    root = tmp_path_factory.mktemp("bulk")
    for half in ("a", "b"):
        (root / half).mkdir()
        for n in range(BULK_FILES):
            with open(root / half / f"bulk-{n}.bin", "wb") as f:
                for _ in range(BULK_FILE_SIZE // MIB):
                    f.write(os.urandom(MIB))
    yield root
    shutil.rmtree(root, ignore_errors=True)


# === 1. Set-up: idempotent, restricted, pinned ===================================

def _setup_client(remote: RemoteByteback) -> Result:
    return remote.run("setup-client", "--destination", remote.env.destination,
                      "--port", str(remote.env.port), "--hostname", remote.host,
                      "--server-program", str(remote.program),
                      "--server-config-dir", str(remote.server_config),
                      env={"SSH_AUTH_SOCK": str(remote.env.agent.sock)})


def test_setup_client_twice_adds_one_restricted_line_and_pins_the_host_key(remote):
    again = _setup_client(remote).check()
    assert "already set up" in again.stdout, again.stdout
    public = (remote.client_config / "key.pub").read_text().split()
    key_type, key_body = public[0], public[1]
    lines = remote.env.user.authorized_keys.read_text().splitlines()
    mine = [l for l in lines if key_body in l]
    assert len(mine) == 1, lines
    command = f"{remote.program} --config-dir {remote.server_config} receive --host {remote.host}"
    assert mine[0] == f'restrict,from="127.0.0.1",command="{command}" {key_type} {key_body}'
    # Only the administrator's key and this one: setup added nothing else.
    assert len([l for l in lines if l.strip()]) == 2, lines
    key_stat = os.lstat(remote.client_key())
    assert key_stat.st_mode & 0o777 == 0o600

    # The server's host key is pinned in the client's own config dir ...
    pinned = (remote.client_config / "known_hosts").read_text()
    assert remote.env.sshd.host_public_key.split()[1] in pinned, pinned
    # ... and the destination and port are written for later backups.
    assert (remote.client_config / "destination").read_text().strip() == remote.env.destination
    assert (remote.client_config / "port").read_text().strip() == str(remote.env.port)


def test_setup_server_twice_changes_nothing_and_sudoers_is_valid(remote):
    again = subprocess.run(
        [str(remote.pyz), "--config-dir", str(remote.server_config), "setup-server",
         "--store", str(remote.store), "--user", remote.env.user.name, "--install-path", str(remote.program),
         "--cron-file", str(remote.server_config / "cron.d-byteback-prune")],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert "nothing changed" in again.stdout, again.stdout
    assert not [l for l in again.stdout.splitlines() if l.startswith(("wrote", "created", "fixed"))], again.stdout

    sudoers = Path("/etc/sudoers.d") / f"byteback-{remote.env.user.name}"
    st = os.lstat(sudoers)
    assert (st.st_uid, st.st_mode & 0o777) == (0, 0o440)
    check = subprocess.run(["visudo", "-cf", str(sudoers)], stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, universal_newlines=True)
    assert check.returncode == 0, check.stdout
    # Exactly the two commands, nothing broader.
    rules = [l for l in sudoers.read_text().splitlines()
             if l.strip() and not l.startswith(("#", "Defaults"))]
    command = f"NOPASSWD: {remote.program} --config-dir {remote.server_config} "
    assert len(rules) == 2, rules
    assert all(l.startswith(remote.env.user.name + " ") and command in l for l in rules), rules
    # An older byteback's file, without secure_path (the zipapp's #! looks python3 up on the
    # PATH sudo keeps where sudoers sets none): setup-server on the existing store rewrites it.
    current = sudoers.read_text()
    assert f'Defaults:{remote.env.user.name} secure_path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"' in current.splitlines()
    sudoers.write_text("".join(l for l in current.splitlines(True) if "secure_path" not in l))
    rewritten = subprocess.run(again.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True, timeout=120)
    assert rewritten.returncode == 0 and f"wrote      {sudoers}" in rewritten.stdout, rewritten
    assert sudoers.read_text() == current
    assert sorted(l.split(command)[1] for l in rules) == ["setup-host *", "snapshot --host *"], rules


def test_backup_refuses_a_server_whose_host_key_changed(remote, tmp_path):
    """Later ssh runs use only the pinned key (StrictHostKeyChecking=yes): an impostor is refused."""
    config = tmp_path / "config"
    shutil.copytree(remote.client_config, config)
    impostor = subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(tmp_path / "hk")],
                              stdout=subprocess.DEVNULL)
    assert impostor.returncode == 0
    fake = (tmp_path / "hk.pub").read_text().split()
    (config / "known_hosts").write_text(f"[127.0.0.1]:{remote.env.port} {fake[0]} {fake[1]}\n")
    src = write_tree(tmp_path / "src", {"f": b"x"})
    before = remote.snapshots()
    result = remote.backup("--source", str(src), "--retry-number", "1", config_dir=config)
    assert_clean_failure(result, "cannot reach")
    assert "host key" in result.stderr.lower() or "host identification" in result.stderr.lower(), result.stderr
    assert remote.snapshots() == before


# === 2. A generated tree, kept exactly ===========================================

def test_snapshot_matches_a_generated_tree_exactly(remote, tmp_path):
    src = tmp_path / "tree"
    info = treeutil.generate_tree(src, seed=3)
    expected = treeutil.scan(src)
    counts = treeutil.summary(expected)
    # The generator really made what this test claims to check.
    assert counts["symlink"] >= 5 and counts["hard_linked"] >= 5 and counts["with_xattrs"] >= 5
    assert counts["owners"] >= 3 and counts["modes"] >= 5 and counts["fifo"] == 1

    snap = snapshot_backup(remote, "--source", str(src))
    assert_snapshot_matches(snap, src, expected)

    tree = stored(snap, src)
    # Hard links are hard links in the snapshot too: one inode per group.
    for group in info.hardlink_groups:
        inodes = {os.lstat(os.path.join(bytes(tree), name)).st_ino for name in group}
        assert len(inodes) == 1, f"{group} are not one inode in the snapshot"
    # Owners are kept by --fake-super: the file belongs to the server user, its
    # real owner and mode live in the user.rsync.%stat xattr ("mode rdev uid:gid").
    st_src, st_dst = os.lstat(src / "hard" / "one"), os.lstat(tree / "hard" / "one")
    assert st_dst.st_uid == remote.env.user.uid
    fake = os.getxattr(tree / "hard" / "one", "user.rsync.%stat").decode()
    assert fake == f"{st_src.st_mode:o} 0,0 {st_src.st_uid}:{st_src.st_gid}"
    # The snapshot is read-only, and its root belongs to root.
    assert os.lstat(snap).st_uid == 0
    ro = subprocess.run(["btrfs", "property", "get", "-ts", str(snap), "ro"],
                        stdout=subprocess.PIPE, universal_newlines=True)
    assert ro.stdout.strip() == "ro=true", ro.stdout


# === 3. The minimum interval ======================================================

@pytest.fixture(scope="module")
def interval_runs(remote, tmp_path_factory):
    """A snapshot, the same backup again inside the interval, then after it (interval 0)."""
    src = write_tree(tmp_path_factory.mktemp("interval"), {"one": b"first\n"})
    first = snapshot_backup(remote, "--source", str(src))
    names = remote.snapshots()
    (src / "one").write_bytes(b"second\n")
    remote.set_server_conf()          # the default interval (6 h): the next snapshot is too soon
    # The first backup learns it after the copy: the hint of the last one said 0 s.
    late = remote.backup("--source", str(src))
    refused = remote.backup("--source", str(src))          # now it pings first
    after_refusal = remote.snapshots()
    # Moving the clock past the interval (interval 0) lets the same backup through.
    second = snapshot_backup(remote, "--source", str(src))
    return SimpleNamespace(src=src, first=first, names=names, late=late, refused=refused,
                           after_refusal=after_refusal, second=second)


def test_second_backup_refused_inside_the_interval_and_accepted_after_it(interval_runs):
    runs = interval_runs
    assert "minimum interval" in assert_clean_failure(runs.late, "took no snapshot")
    message = assert_clean_failure(runs.refused, "minimum interval")
    assert "nothing was sent" in message     # the client learns it from ping, before rsync
    assert runs.after_refusal == runs.names, message
    assert (stored(runs.second, runs.src) / "one").read_bytes() == b"second\n"
    assert (stored(runs.first, runs.src) / "one").read_bytes() == b"first\n"


def test_interval_refusal_names_byteback_once(interval_runs):
    final = interval_runs.refused.stderr.strip().splitlines()[-1]
    assert final.count("byteback:") == 1, final


# === 4. A connection cut mid-transfer ==============================================

def test_connection_cut_mid_transfer_is_retried_and_resumed(remote, bulk):
    src = bulk / "a"
    total = BULK_FILES * BULK_FILE_SIZE
    expected = treeutil.scan(src)
    remote.set_server_conf(min_interval="0")
    before = set(remote.snapshots())
    receiving = remote.host_dir / "current" / str(src).lstrip("/")
    # ~40 MB/s: the transfer takes seconds, a window to cut it in.
    flags = remote.client_config / "rsync_flags"
    flags.write_text("--bwlimit=40000\n")
    logins_before = logins(remote)
    proc = spawn_backup(remote, "--source", str(src), "--retry-number", "3", "-v")
    try:
        deadline = time.monotonic() + 60
        while bytes_below(receiving) < total // 2:
            assert proc.poll() is None, "the backup ended before it could be cut: " + \
                proc.stderr.read().decode(errors="replace")
            assert time.monotonic() < deadline, "the server received too little in 60 s"
            time.sleep(0.02)
        received_at_cut = bytes_below(receiving)
        assert received_at_cut < total, "the transfer finished before it could be cut"
        victims = ssh_pids_below(proc.pid)
        assert victims, "no ssh below the backup to kill"
        for pid in victims:
            os.kill(pid, signal.SIGKILL)
        out, err = proc.communicate(timeout=120)
    finally:
        flags.unlink()
        stop_process(proc)
    stdout, stderr = out.decode(errors="replace"), err.decode(errors="replace")
    assert proc.returncode == 0, f"backup exited {proc.returncode}\n{stdout[-3000:]}\n{stderr[-3000:]}"
    assert "trying again" in stderr, stderr          # the cut was seen and retried by itself
    assert "Traceback" not in stderr
    # The cut killed the shared connection too: the retry logged in again, once.
    assert logins(remote) - logins_before == 2, remote.env.sshd.log_text()[-6000:] + stderr

    # The retry sent only what the server did not have yet.
    state = client_state(remote)["last_attempt"]
    assert state["result"] == "ok"
    sent = state["bytes_sent"]
    shown = re.findall(r"^Total bytes sent: ([\d,]+)", stdout, re.M)
    assert shown and int(shown[-1].replace(",", "")) == sent, stdout[-2000:]
    assert sent < total - received_at_cut // 2, (
        f"the retry sent {sent} bytes of {total}, though the server had {received_at_cut} already")

    snap = remote.host_dir / one_new_snapshot(remote, before)
    _last_snapshot_at[0] = time.monotonic()
    assert_snapshot_matches(snap, src, expected)


# === 5. A full disc on the server ====================================================

@pytest.fixture(scope="module")
def full_disc(bulk, tmp_path_factory):
    """A 300 MB store with one snapshot, then a 320 MiB backup that cannot fit."""
    _skip_or_check()
    with _sigterm_as_interrupt(), remote_byteback(store_size="300M") as remote:
        small = write_tree(tmp_path_factory.mktemp("small"), {"keep/me": b"history\n" * 100})
        first = snapshot_backup(remote, "--source", str(small))
        first_manifest = snapshot_manifest(first)
        names = remote.snapshots()
        free = shutil.disk_usage(remote.store).free
        assert free < 2 * BULK_FILES * BULK_FILE_SIZE, f"the store has {free} bytes free: the bulk data fits"
        started = time.monotonic()
        result = remote.backup("--source", str(bulk), "--retry-number", "2")
        yield SimpleNamespace(remote=remote, result=result, first=first, first_manifest=first_manifest,
                              names=names, seconds=time.monotonic() - started)


def test_full_disc_fails_with_one_clear_line_and_keeps_history(full_disc):
    remote, result = full_disc.remote, full_disc.result
    assert_clean_failure(result, "No space left on device")
    # No snapshot of the failed run, and nothing pruned to make room for it.
    assert remote.snapshots() == full_disc.names
    assert snapshot_manifest(full_disc.first) == full_disc.first_manifest
    state = client_state(remote)
    assert state["last_attempt"]["result"] == "failed"
    assert "No space left on device" in state["last_attempt"]["error"]


def test_full_disc_is_not_retried(full_disc):
    assert "trying again" not in full_disc.result.stderr, full_disc.result.stderr


# === 6. --dry-run ====================================================================

def test_dry_run_shows_what_would_be_sent_and_takes_no_snapshot(remote, tmp_path):
    src = write_tree(tmp_path / "src", {"same.txt": b"unchanged\n", "changed.txt": b"old\n"})
    snap = snapshot_backup(remote, "--source", str(src))
    state = client_state(remote)
    names = remote.snapshots()
    write_tree(src, {"changed.txt": b"new content\n", "added.txt": b"brand new\n"})

    dry = remote.backup("--source", str(src), "--dry-run").check()
    sent = [l for l in dry.stdout.splitlines() if l.startswith("<f")]
    assert any(l.endswith("/src/changed.txt") for l in sent), dry.stdout
    assert any(l.endswith("/src/added.txt") for l in sent), dry.stdout
    assert not any("same.txt" in l for l in sent), dry.stdout

    assert remote.snapshots() == names
    # Nothing was written on the server, and the dry run is not a backup result.
    current = stored(remote.host_dir / "current", src)
    assert (current / "changed.txt").read_bytes() == b"old\n"
    assert not (current / "added.txt").exists()
    assert (stored(snap, src) / "changed.txt").read_bytes() == b"old\n"
    assert client_state(remote) == state


# === 7. A run killed between rsync and complete =======================================

KILL_AFTER_PUSH = """#!/bin/sh
# Fault injection: the real ssh; once a push's session has ended (the server took
# the snapshot in it), the byteback run that started the rsync is killed, as a crash
# would, before it hears the result.
case "$*" in *" --server "*) ;; *) exec {ssh} "$@";; esac
{ssh} "$@"
rc=$?
kill -KILL "$(ps -o ppid= -p "$PPID" | tr -d ' ')"
exit $rc
"""


def test_backup_after_a_run_killed_after_its_push_completes(remote, tmp_path):
    src = write_tree(tmp_path / "src", {"a": b"one\n", "dir/b": b"two\n"})
    snapshot_backup(remote, "--source", str(src))
    names = remote.snapshots()
    write_tree(src, {"a": b"one, changed\n", "dir/c": b"three\n"})

    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    wrapper = bin_dir / "ssh"
    wrapper.write_text(KILL_AFTER_PUSH.format(ssh=shutil.which("ssh")))
    wrapper.chmod(0o755)
    tmp = short_tmp()
    time.sleep(1.1)                                  # snapshot names have one-second resolution
    killed = remote.backup("--source", str(src), env={"PATH": f"{bin_dir}:{os.environ['PATH']}",
                                                      "TMPDIR": str(tmp)})
    assert killed.returncode == -signal.SIGKILL, (killed.returncode, killed.stderr)
    # Its shared connection died with it (the kernel's parent-death signal).
    wait_until(lambda: not ssh_masters_left(tmp), 10, "the killed run's ssh master to exit")
    # The push's own session took the snapshot: the client's death lost nothing.
    new = one_new_snapshot(remote, set(names))
    assert (stored(remote.host_dir / new, src) / "dir" / "c").read_bytes() == b"three\n"

    # The next run (its lock freed by the kernel, the server's session over) completes.
    write_tree(src, {"dir/d": b"four\n"})
    time.sleep(1.1)                                  # the killed run's snapshot may be this second's
    snap = snapshot_backup(remote, "--source", str(src))
    assert_snapshot_matches(snap, src)
    assert client_state(remote)["last_attempt"]["result"] == "ok"


# === One ssh connection a backup ========================================================

def short_tmp() -> Path:
    """A TMPDIR of the test's own (the shared connection's socket goes below it)."""
    path = Path(tempfile.mkdtemp(prefix="bbt-"))
    _tmp_dirs.append(path)
    return path


_tmp_dirs: List[Path] = []


@pytest.fixture(autouse=True, scope="module")
def _remove_tmp_dirs():
    yield
    for path in _tmp_dirs:
        shutil.rmtree(path, ignore_errors=True)


def test_a_backup_and_a_restore_each_log_in_once(remote, tmp_path):
    src = write_tree(tmp_path / "src", {"a": b"one\n", "dir/b": b"two\n"})
    tmp = short_tmp()
    snapshot_backup(remote, "--source", str(src), env={"TMPDIR": str(tmp)})     # leaves the server's hint
    before, started = logins(remote), sessions(remote)
    snapshot_backup(remote, "--source", str(src), env={"TMPDIR": str(tmp)})
    assert logins(remote) - before == 1
    # One session, one start of the forced command: no ping (the hint says the interval
    # has passed), and the push takes its snapshot itself (no complete).
    assert sessions(remote) - started == 1
    assert not ssh_masters_left(tmp)
    assert not list(tmp.iterdir())                           # the socket's directory is gone

    before, started = logins(remote), sessions(remote)
    out = tmp_path / "out"
    remote.run("restore", "--host", remote.host, "--restore", "--to", str(out),
               str(src / "dir" / "b"), env={"TMPDIR": str(tmp)}).check()
    assert logins(remote) - before == 1
    assert sessions(remote) - started == 1                   # rsync alone: one path, no listing first
    assert (out / src.relative_to("/") / "dir" / "b").read_bytes() == b"two\n"
    assert not ssh_masters_left(tmp) and not list(tmp.iterdir())


def test_an_unreachable_server_is_retried_then_fails_in_one_line(remote, tmp_path):
    src = write_tree(tmp_path / "src", {"a": b"one\n"})
    tmp = short_tmp()
    result = remote.backup("--source", str(src), "--retry-number", "2", "--port", "1",
                           env={"TMPDIR": str(tmp)})
    message = assert_clean_failure(result, "cannot reach")
    assert "trying again" in result.stderr, result.stderr
    assert "Connection refused" in message, message
    assert not ssh_masters_left(tmp) and not list(tmp.iterdir())


# === Hard links split on the client ======================================================

def _history(remote: RemoteByteback) -> List[dict]:
    path = remote.store / ".byteback" / "history" / f"{remote.host}.json"
    return json.loads(path.read_text())["backups"]


def test_a_hard_link_group_split_on_the_client_is_stored_as_it_now_is(remote, tmp_path):
    """current is written in place (--inplace): a file split off from a hard-link group
    must not be written into the inode its old partners still share in current."""
    src = write_tree(tmp_path / "src", {"a": b"alone\n", "b": b"shared, old\n"})
    snapshot_backup(remote, "--source", str(src))
    assert _history(remote)[-1]["linked"] == 0        # the next run needs no walk over current
    os.link(src / "b", src / "b-link")
    linked = snapshot_backup(remote, "--source", str(src))
    assert os.stat(stored(linked, src) / "b").st_ino == os.stat(stored(linked, src) / "b-link").st_ino
    assert _history(remote)[-1]["linked"] == 2

    # Nothing changed: no walk gives the names new inodes, and no second pass.
    time.sleep(max(0.0, _last_snapshot_at[0] + 1.1 - time.monotonic()))
    same = remote.backup("-v", "--source", str(src)).check()
    _last_snapshot_at[0] = time.monotonic()
    assert "copying once more" not in same.stderr, same.stderr
    newest = remote.host_dir / remote.snapshots()[-1]
    assert os.stat(stored(newest, src) / "b").st_ino == os.stat(stored(linked, src) / "b").st_ino

    (src / "b").unlink()                               # as editors and package upgrades replace files
    (src / "b").write_bytes(b"b on its own, new\n")
    # The push writes b into the inode b-link shares in current; the snapshot
    # finds that inode written, refuses, and the client copies once more.
    time.sleep(max(0.0, _last_snapshot_at[0] + 1.1 - time.monotonic()))
    before = set(remote.snapshots())
    result = remote.backup("-v", "--source", str(src)).check()
    _last_snapshot_at[0] = time.monotonic()
    assert "again: 1 hard-linked files in current were changed" in result.stderr, result.stderr
    split = remote.host_dir / one_new_snapshot(remote, before)
    assert (stored(split, src) / "b").read_bytes() == b"b on its own, new\n"
    assert (stored(split, src) / "b-link").read_bytes() == b"shared, old\n"
    assert (stored(linked, src) / "b").read_bytes() == b"shared, old\n"
    assert (stored(linked, src) / "b-link").read_bytes() == b"shared, old\n"
    assert _history(remote)[-1]["linked"] == 0


# === The client's state file ===========================================================

def test_state_file_names_the_remote_destination(remote, tmp_path):
    src = write_tree(tmp_path / "src", {"f": b"x\n"})
    snapshot_backup(remote, "--source", str(src))
    state = client_state(remote)["last_success"]
    assert remote.env.user.name in state["destination"] and "127.0.0.1" in state["destination"], state
