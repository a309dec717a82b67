"""Proves the real-sshd test environment (sshd_env.py) with real ssh and rsync.

(a) the admin key, from the agent only, logs in as the server user;
(b) a restricted key always gets its forced command, which sees
    SSH_ORIGINAL_COMMAND; (c) rsync over ssh writes into the btrfs home;
(d) a wrong pinned host key fails with ssh's 255; and teardown leaves no
mount, loop device, user or process behind, also after a failure.
"""
from __future__ import annotations

import os
import pwd
import grp
import subprocess
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent))   # until pytest.ini sets pythonpath

from sshd_env import (  # noqa: E402
    btrfs_mount, generate_key, loop_devices_of, mounted_at, pids_of_uid, run,
    server_environment, server_env, btrfs_store, skip_reason, ssh_argv, is_alive, wait_for,
)

pytestmark = [pytest.mark.integration,
              pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))]

__all__ = ["server_env", "btrfs_store"]   # fixtures, imported so pytest finds them here


def _explain(proc: subprocess.CompletedProcess, env) -> str:
    """What to print when an ssh assertion fails: the run and the sshd log."""
    return (f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}\n"
            f"{env.sshd.log_tail()}")


def _write_script(path: Path, body: str) -> Path:
    """A root-owned 0755 shell script the server user can run but not change."""
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)
    return path


# --- the store and the user --------------------------------------------------

def test_store_is_root_owned_btrfs_home(server_env):
    """DESIGN.md section 3: home and .ssh root-owned, authorized_keys root 0644."""
    env = server_env
    assert run(["stat", "-f", "-c", "%T", env.store]).stdout.strip() == "btrfs"
    entry = pwd.getpwnam(env.user.name)
    assert (entry.pw_dir, entry.pw_shell) == (str(env.store), "/bin/sh")
    for path, mode in [(env.store, 0o755), (env.user.ssh_dir, 0o755),
                       (env.user.authorized_keys, 0o644)]:
        st = path.stat()
        assert (st.st_uid, st.st_gid, st.st_mode & 0o7777) == (0, 0, mode), path
    # A shell as the server user cannot write the store root or authorized_keys.
    for target in [env.store / "planted", env.user.authorized_keys]:
        proc = env.run_as_user(["sh", "-c", f'echo x >> "{target}"'])
        assert proc.returncode != 0 and "Permission denied" in proc.stderr, proc
    assert env.run_as_user(["id", "-un"]).stdout.strip() == env.user.name


def test_btrfs_store_fixture_takes_subvolumes(btrfs_store):
    assert run(["stat", "-f", "-c", "%T", btrfs_store]).stdout.strip() == "btrfs"
    run(["btrfs", "subvolume", "create", btrfs_store / "sub"])
    run(["btrfs", "subvolume", "snapshot", "-r", btrfs_store / "sub", btrfs_store / "snap"])
    assert "readonly" in run(["btrfs", "subvolume", "show", btrfs_store / "snap"]).stdout


# --- (a) the administrator's credential through the agent ----------------------

def test_admin_key_from_agent_logs_in_unrestricted(server_env):
    env = server_env
    proc = env.admin_ssh("id -un")
    assert proc.returncode == 0 and proc.stdout.strip() == env.user.name, _explain(proc, env)
    # Without the agent (and with no key) the same login is refused: it was the agent.
    proc = env.ssh("id -un")
    assert proc.returncode == 255 and "Permission denied" in proc.stderr, _explain(proc, env)
    assert "Accepted publickey for " + env.user.name in env.sshd.log_text()


# --- (b) forced commands --------------------------------------------------------

def test_forced_command_runs_whatever_is_asked(server_env):
    env = server_env
    key = env.new_key("forced")
    env.authorize(f'restrict,command="/bin/echo forced" {key.public}')
    for asked in ["id -un", "rm -rf /", "sh -c 'cat /etc/shadow'", ""]:
        proc = env.ssh(asked, key=key)
        assert (proc.returncode, proc.stdout) == (0, "forced\n"), f"{asked!r}: {_explain(proc, env)}"


def test_forced_command_sees_original_command(server_env):
    env = server_env
    outdir = env.shared_dir / "record-out"
    outdir.mkdir()
    os.chown(outdir, env.user.uid, env.user.gid)
    record = _write_script(env.shared_dir / "record.sh",
                           f'printf "%s" "$SSH_ORIGINAL_COMMAND" > "{outdir}/command"\n'
                           f'env > "{outdir}/environ"\n'
                           "echo recorded\n")
    key = env.new_key("record")
    env.authorize(f'restrict,command="{record}" {key.public}')
    asked = "rsync --server -logDtprRe.iLsfxCIvu --fake-super . 'a b/$(reboot)'"
    proc = env.ssh(asked, key=key)
    assert (proc.returncode, proc.stdout) == (0, "recorded\n"), _explain(proc, env)
    assert (outdir / "command").read_text() == asked
    environ = (outdir / "environ").read_text()
    assert f"USER={env.user.name}" in environ and "SSH_CONNECTION=127.0.0.1 " in environ


# --- (c) rsync over ssh into the btrfs home ---------------------------------------

def test_rsync_over_ssh_writes_into_btrfs_home(server_env, tmp_path):
    env = server_env
    host_dir = env.store / "client1"
    host_dir.mkdir(mode=0o755)                       # root:root, as setup would make it
    run(["btrfs", "subvolume", "create", host_dir / "current"])
    os.chown(host_dir / "current", env.user.uid, env.user.gid)
    # Test-only forced command: runs what the client asks (the real one is receive).
    wrapper = _write_script(env.shared_dir / "exec-original.sh", 'exec $SSH_ORIGINAL_COMMAND\n')
    key = env.new_key("rsync")
    env.authorize(f'restrict,command="{wrapper}" {key.public}')

    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello over ssh\n")
    os.chmod(src / "hello.txt", 0o640)
    proc = env.rsync(["-a", f"{src}/", f"{env.destination}client1/current/"], key=key)
    assert proc.returncode == 0, _explain(proc, env)

    copied = host_dir / "current" / "hello.txt"
    assert copied.read_text() == "hello over ssh\n"
    st = copied.stat()
    assert (st.st_uid, st.st_mode & 0o777) == (env.user.uid, 0o640)
    shown = run(["btrfs", "subvolume", "show", host_dir / "current"])
    assert "Subvolume ID" in shown.stdout


# --- (d) host key pinning --------------------------------------------------------------

def test_wrong_or_missing_host_key_fails_with_255(server_env):
    env = server_env
    key = env.new_key("pinning")
    env.authorize(f'restrict,command="/bin/echo pinned" {key.public}')
    assert env.ssh("x", key=key).stdout == "pinned\n"

    impostor = generate_key(env.workdir / "impostor_host_key")
    wrong = env.workdir / "known_hosts.wrong"
    wrong.write_text(f"[{env.host}]:{env.port} {impostor.public}\n")
    proc = env.ssh("x", key=key, known_hosts=wrong)
    assert proc.returncode == 255, _explain(proc, env)
    assert "REMOTE HOST IDENTIFICATION HAS CHANGED" in proc.stderr, _explain(proc, env)

    empty = env.workdir / "known_hosts.empty"
    empty.write_text("")
    proc = env.ssh("x", key=key, known_hosts=empty)
    assert proc.returncode == 255 and "Host key verification failed" in proc.stderr, \
        _explain(proc, env)
    assert empty.read_text() == "", "StrictHostKeyChecking=yes must not learn keys"


# --- teardown ---------------------------------------------------------------------------

def test_teardown_after_failure_leaves_nothing_behind():
    """Even when the body raises, with a live ssh session: all gone afterwards."""
    class Boom(Exception):
        pass

    session = None
    try:
        with pytest.raises(Boom):
            with server_environment(store_size="256M") as env:
                seen = {"store": env.store, "user": env.user, "sshd": env.sshd.pid,
                        "agent": env.agent.process.pid,
                        "loops": loop_devices_of(env.store.parent / "image")}
                assert seen["loops"], "the store should be on a loop device"
                argv = ssh_argv(port=env.port, known_hosts=env.known_hosts, user=env.user.name)
                session = subprocess.Popen(argv + ["--", "sleep 120"], env=env.env_for_client(),
                                           stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                           stderr=subprocess.DEVNULL)
                wait_for(lambda: pids_of_uid(env.user.uid), 15, "the ssh session to start")
                raise Boom()
        assert session.wait(timeout=15) == 255, "client not cut off when sshd went away"
    finally:
        if session is not None and session.poll() is None:
            session.kill()
            session.wait()

    assert not mounted_at(seen["store"])
    assert not seen["store"].parent.exists()
    with open("/proc/mounts") as f:
        assert str(seen["store"]) not in f.read()
    for dev in seen["loops"]:
        assert run(["losetup", dev], check=False).returncode != 0, f"{dev} still attached"
    with pytest.raises(KeyError):
        pwd.getpwnam(seen["user"].name)
    with pytest.raises(KeyError):
        grp.getgrnam(seen["user"].name)
    assert not pids_of_uid(seen["user"].uid), "processes of the deleted user remain"
    assert not is_alive(seen["sshd"]) and not is_alive(seen["agent"])


def test_btrfs_mount_busy_at_teardown_is_lazily_unmounted():
    with btrfs_mount("256M") as mnt:
        (device,) = loop_devices_of(mnt.parent / "image")
        busy = open(mnt / "open-file", "w")
    try:
        assert not mounted_at(mnt), "a busy mount must still leave the tree"
        assert not mnt.parent.exists(), "the temp files should be gone"
    finally:
        busy.close()
    deadline = time.monotonic() + 10
    while run(["losetup", device], check=False).returncode == 0:
        assert time.monotonic() < deadline, f"{device} not released after the last close"
        time.sleep(0.1)
