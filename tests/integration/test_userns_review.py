"""Attacks on the userns receiver's root-side set-up (a security review; issue 8 class 9).

Real parts only, on the same server as test_userns_receiver (setup-server
--receiver userns on a btrfs loop store, a real sshd, real accounts and
/etc/subuid): what each test shows is in its docstring.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from sshd_env import run  # noqa: E402
from test_userns_receiver import owned_tree, userns  # noqa: E402,F401  (the module's fixture)

pytestmark = pytest.mark.integration


def _ranges(path: str) -> list:
    found = []
    for line in Path(path).read_text().splitlines():
        owner, first, count = line.split(":")
        found.append((owner, int(first), int(count)))
    return found


def test_hosts_set_up_at_the_same_time_get_ranges_of_their_own(userns, tmp_path):
    """setup-host of several clients at once (an administrator's parallel ssh or
    Ansible run of setup-client) must give each account ids no other holds: two
    hosts on one range are one kernel uid, whose namespace root can enter the
    other's session directory and, through /proc/<pid>/cwd of the other's
    running rsync, its host directory."""
    remote, _, _ = userns
    names = [f"par{i}" for i in range(4)]
    procs = []
    for name in names:
        key = tmp_path / name
        run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", str(key)])
        procs.append(subprocess.Popen(
            [str(remote.program), "--config-dir", str(remote.server_config), "setup-host", "--host", name,
             "--client-address", "127.0.0.1"], stdin=open(f"{key}.pub"), stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, universal_newlines=True))
    results = [(p.wait(timeout=120), p.stdout.read(), p.stderr.read()) for p in procs]
    for name, (code, out, err) in zip(names, results):
        assert code == 0, (name, out, err)
    accounts = {f"{remote.env.user.name}-{name}" for name in names}
    for path in ("/etc/subuid", "/etc/subgid"):
        entries = _ranges(path)
        ours = [e for e in entries if e[0] in accounts]
        assert {e[0] for e in ours} == accounts, path
        for owner, first, count in ours:
            for other, ofirst, ocount in entries:
                if other != owner:
                    assert first + count <= ofirst or ofirst + ocount <= first, \
                        f"{path}: {owner} {first}+{count} overlaps {other} {ofirst}+{ocount}"


def test_a_restore_from_a_finished_snapshot_gives_owners_back_unshifted(userns, tmp_path):
    """The other tests restore from current; a finished snapshot's top directory is
    root's (unmapped in the namespace), and what is below it must still come back
    with the client's own owners and modes, not shifted and not nobody's."""
    import os
    import stat
    import time
    remote, one, _ = userns
    src = tmp_path / "owned"
    src.mkdir()
    os.chmod(src, 0o700)
    (src / "www").write_text("www\n")
    os.chown(src / "www", 33, 34)
    os.chmod(src / "www", 0o600)
    (src / "suid").write_text("s\n")
    os.chmod(src / "suid", 0o4750)
    time.sleep(1.1)
    one.backup("--source", str(src)).check()
    snap = one.snapshots()[-1]
    out = tmp_path / "out"
    out.mkdir()
    remote.run("restore", "--host", one.name, "--snapshot", snap, "--restore", "--same-owner",
               "--to", str(out), f"{src}/**").check()
    back = out / str(src).lstrip("/")
    st = os.lstat(back / "www")
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (33, 34, 0o600)
    st = os.lstat(back / "suid")
    assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o4750)
    for parent in [back] + list(back.parents)[:len(back.relative_to(out).parts) - 1]:
        assert os.lstat(parent).st_uid in (0, os.lstat(src).st_uid), parent


def test_an_administrators_restore_on_the_server_never_gives_a_userns_hosts_owners_shifted(userns, tmp_path):
    """restore --destination <store> as root on the server reads the snapshot itself.
    A userns host's owners on disc are shifted by its range (www-data came back as
    uid 100033), and a user.rsync.%stat xattr its client uploaded (the userns
    receiver stores it as any other user.* xattr) was read as the file's owner and
    mode.  With --same-owner it is refused, saying where owners do come back;
    without, the files come back as the restorer's and nothing forged counts."""
    import os
    import time
    remote, one, _ = userns
    src = owned_tree(tmp_path / "local", {"www": ("www\n", 33, 34), "forged": ("f\n", 1000, 1000)})
    os.setxattr(src / "forged", "user.rsync.%stat", b"104755 0,0 0:0")
    time.sleep(1.1)
    one.backup("--source", str(src)).check()

    def restore(out: Path, *extra: str) -> subprocess.CompletedProcess:
        out.mkdir()
        argv = [str(remote.program), "--config-dir", str(remote.server_config), "restore", "--destination",
                str(remote.store), "--host", one.name, "--snapshot", one.snapshots()[-1], "--restore",
                *extra, "--to", str(out), f"{src}/**"]
        return subprocess.run(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                              timeout=120, stdin=subprocess.DEVNULL)

    kept = restore(tmp_path / "kept", "--same-owner")
    assert kept.returncode == 1 and "uid range of its own" in kept.stderr, kept
    assert "restore them on the client itself" in kept.stderr
    assert not (tmp_path / "kept" / str(src).lstrip("/")).exists()
    plain = restore(tmp_path / "plain")
    assert plain.returncode == 0, plain
    back = tmp_path / "plain" / str(src).lstrip("/")
    assert (back / "www").read_text() == "www\n"
    for name in ("www", "forged"):
        st = os.lstat(back / name)
        assert (st.st_uid, st.st_mode & 0o7000) == (0, 0), name


# A host's account, root of its own namespace, watching its host directory
# (its group may read it) for the snapshot being made, opening a file in it for
# writing while it is still writable, and writing through that descriptor once
# the snapshot is finished and read-only.
_TAMPER = r'''
import ctypes, os, re, struct, sys, time
sys.path.insert(0, sys.argv[1])
import byteback
byteback.enter_user_namespace(int(sys.argv[2]), int(sys.argv[3]))
host_dir, rel = sys.argv[4], sys.argv[5]
libc = ctypes.CDLL(None, use_errno=True)
ino = libc.inotify_init()
libc.inotify_add_watch(ino, host_dir.encode(), 0x100 | 0x80)      # IN_CREATE | IN_MOVED_TO
before = set(os.listdir(host_dir))
print("ready", flush=True)
held, finished, deadline = None, None, time.monotonic() + 90
while finished is None and time.monotonic() < deadline:
    data = os.read(ino, 65536)
    pos = 0
    while pos < len(data):
        _wd, _mask, _cookie, size = struct.unpack_from("iIII", data, pos)
        name = data[pos + 16:pos + 16 + size].split(b"\0", 1)[0].decode()
        pos += 16 + size
        if name.startswith(".incomplete") and held is None:
            for _ in range(20000):
                for inner in (f"{host_dir}/{name}/{rel}",):
                    try:
                        held = os.open(inner, os.O_RDWR)
                        break
                    except OSError:
                        pass
                if held is not None:
                    break
                try:
                    for sub in os.listdir(f"{host_dir}/{name}"):
                        held = os.open(f"{host_dir}/{name}/{sub}/{rel}", os.O_RDWR)
                        break
                except OSError:
                    pass
                if held is not None:
                    break
        elif re.match(r"\d{4}-", name) and name not in before:
            finished = name
if held is not None and finished is not None:
    time.sleep(0.5)
    os.pwrite(held, b"TAMPERED", 0)
    os.fsync(held)
print(f"held={held is not None} finished={finished}", flush=True)
'''


def test_a_host_account_cannot_keep_a_snapshot_writable_from_the_moment_it_is_made(userns):
    """btrfs lets a descriptor opened for writing before the read-only flag is set
    write on after it (measured: pwrite and mmap both reach the disc).  The
    snapshot was made writable as <host>/.incomplete-NAME, where the host's
    account (its group reads <host>/; its namespace root owns the files) could
    open a file in it and rewrite the finished snapshot whenever it liked."""
    import time
    remote, one, _ = userns
    rel = str(one.src / "secret.txt").lstrip("/")
    attacker = subprocess.Popen(
        ["/usr/sbin/runuser", "-u", one.account, "--", "/usr/bin/python3", "-c", _TAMPER, str(remote.program),
         str(one.uid_base), str(one.gid_base), str(one.dir), rel],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
        env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"}, cwd="/")
    try:
        assert attacker.stdout.readline().strip() == "ready", attacker.stderr.read()
        time.sleep(1.1)
        (one.src / "secret.txt").write_text(f"the secret of {one.name}, again\n")
        one.backup("--source", str(one.src)).check()
        said = attacker.stdout.read()
        attacker.wait(timeout=60)
    finally:
        if attacker.poll() is None:
            attacker.kill()
    snap = one.snapshots()[-1]
    assert (one.dir / snap / rel).read_text() == f"the secret of {one.name}, again\n", said
    assert "held=False" in said, said
