"""setup-server adopting an original store the backup user has planted things in, for real.

In the original byteback the backup user owns its whole home, so anything in it
may have been placed by a client that escaped the original's forced command.
setup-server runs as root over it: it must never chown or chmod through a
planted symlink, nor turn a line sshd ignores into a key it accepts.
"""
from __future__ import annotations

import datetime as dt
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from remote_env import _root_dir  # noqa: E402
from sshd_env import _skip_or_check, btrfs_mount, generate_key, server_user  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import byteback  # noqa: E402


@pytest.fixture
def original_store(tmp_path):
    """An original store: the user's home, .ssh and one host with a snapshot, all the user's."""
    _skip_or_check()
    config, prog = _root_dir("bbtest-srvcfg-"), _root_dir("bbtest-prog-")
    try:
        with btrfs_mount("256M") as store, server_user(store) as user:
            host = store / "legacy"
            host.mkdir()
            subprocess.run(["btrfs", "subvolume", "create", str(host / "current")], check=True,
                           stdout=subprocess.DEVNULL)
            subprocess.run(["btrfs", "subvolume", "snapshot", str(host / "current"),
                            str(host / "2026-11-01T03:15+0000")], check=True, stdout=subprocess.DEVNULL)
            for path in (store, host, host / "current", host / "2026-11-01T03:15+0000"):
                os.chown(path, user.uid, user.gid)
            user.ssh_dir.mkdir(exist_ok=True)
            os.chown(user.ssh_dir, user.uid, user.gid)
            user.authorized_keys.unlink(missing_ok=True)
            (store / ".disk_free_history").write_bytes(b"\x04\x08[\x00")
            try:
                yield store, user, config, prog, tmp_path
            finally:
                # what a setup-server that got that far wrote for the user, who is gone next
                (Path("/etc/sudoers.d") / f"byteback-{user.name}").unlink(missing_ok=True)
    finally:
        for path in (config, prog):
            shutil.rmtree(path, ignore_errors=True)


def setup_server(store, user, config, prog):
    argv = [sys.executable, str(REPO / "byteback.py"), "--config-dir", str(config), "setup-server",
            "--store", str(store), "--user", user.name, "--install-path", str(prog / "byteback.pyz"),
            "--cron-file", str(config / "cron.d-byteback-prune")]
    return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                          timeout=300)


def test_a_planted_authorized_keys_symlink_is_refused_and_its_target_left_alone(original_store):
    store, user, config, prog, tmp = original_store
    secret = tmp / "secret"
    secret.write_text("root's secret\n")
    os.chmod(secret, 0o600)
    os.chown(secret, 0, 42)
    user.authorized_keys.symlink_to(secret)
    p = setup_server(store, user, config, prog)
    st = os.stat(secret)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 42, 0o600), p.stdout + p.stderr
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "authorized_keys" in p.stderr and "move it away" in p.stderr


def test_a_line_sshd_ignores_never_becomes_a_key_it_accepts(original_store):
    store, user, config, prog, tmp = original_store
    key = generate_key(tmp / "client").public
    sneaky = generate_key(tmp / "sneaky").public
    # To sshd (lines end at '\n' only) the second line is one comment; Python's
    # splitlines() also ends lines at '\f', '\v', '\x1c'... and '\r'.
    user.authorized_keys.write_bytes(
        f'command="byteback-receive",from="127.0.0.1",environment="BYTEBACK_HOST=legacy" {key}\n'
        f"# old key\f{sneaky} sneaky\n# another\r{sneaky} sneaky2\n".encode())
    os.chown(user.authorized_keys, user.uid, user.gid)
    p = setup_server(store, user, config, prog)
    assert p.returncode == 0, p.stdout + p.stderr
    lines = user.authorized_keys.read_bytes().split(b"\n")
    active = [line for line in lines if line.strip() and not line.lstrip().startswith(b"#")]
    assert len(active) == 1 and b"receive --host legacy" in active[0], lines
    assert b"# old key\f" + sneaky.encode() + b" sneaky" in lines


def test_authorized_keys_that_is_not_utf8_is_a_one_line_error(original_store):
    store, user, config, prog, tmp = original_store
    user.authorized_keys.write_bytes(b"# \xff\n")
    p = setup_server(store, user, config, prog)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stderr
    assert "authorized_keys" in p.stderr


def test_lock_down_never_chmods_through_a_symlink_put_in_a_snapshots_place(tmp_path):
    """adopt_store lists a host's snapshots, then locks each down: one swapped for a
    symlink in between must not make its target root's and world-readable."""
    if os.geteuid() != 0:
        pytest.skip("needs root: chown")
    secret = tmp_path / "shadow"
    secret.write_text("x\n")
    os.chmod(secret, 0o640)
    os.chown(secret, 0, 42)
    (tmp_path / "store" / "h").mkdir(parents=True)
    name = "2026-11-01T03:15+0000"
    (tmp_path / "store" / "h" / name).symlink_to(secret)
    store = byteback.HardlinkStore(tmp_path / "store")
    snap = byteback.Snapshot("h", name, byteback.parse_snapshot_name(name))
    with pytest.raises(byteback.ByteBackError, match="not a directory"):
        store.lock_down(snap)
    st = os.stat(secret)
    assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 42, 0o640)


def test_a_planted_ssh_environment_file_is_refused(original_store):
    """With PermitUserEnvironment on (the original needed it) sshd would set LD_PRELOAD and the
    like from it for every client's forced command."""
    store, user, config, prog, tmp = original_store
    (user.ssh_dir / "environment").write_text(f"LD_PRELOAD={store}/.byteback/run/evil.so\n")
    os.chown(user.ssh_dir / "environment", user.uid, user.gid)
    p = setup_server(store, user, config, prog)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert "environment" in p.stderr and "remove it" in p.stderr


def test_a_history_file_the_user_planted_is_refused(original_store):
    """It would stay the user's to rewrite (and prune trusts it) after .byteback became root's."""
    store, user, config, prog, tmp = original_store
    history = store / ".byteback" / "history"
    history.mkdir(parents=True)
    (history / "legacy.json").write_text('{"backups": []}\n')
    for path in (store / ".byteback", history, history / "legacy.json"):
        os.chown(path, user.uid, user.gid)
    p = setup_server(store, user, config, prog)
    assert p.returncode != 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert "legacy.json is not root's" in p.stderr


def test_the_originals_state_as_a_directory_is_removed_without_a_traceback(original_store):
    store, user, config, prog, tmp = original_store
    (store / ".byteback.pruning" / "x").mkdir(parents=True)
    p = setup_server(store, user, config, prog)
    assert p.returncode == 0 and "Traceback" not in p.stderr, p.stdout + p.stderr
    assert not os.path.lexists(store / ".byteback.pruning")
