"""The userns receiver (server.conf receiver = userns; issue 14 item 1, issue 8 class 9).

Real parts only: setup-server --receiver userns on a btrfs loop store, a real
sshd on 127.0.0.1, setup-client for two hosts (each then logs in as an
account of its own, <user>-<host>), real rsync receiving as root of a user
namespace mapped onto the host's range in /etc/subuid.  What is shown:

* owners, modes, set-id bits, hard links, FIFOs, user.* xattrs and file
  capabilities are kept for real on disc, shifted by the host's range, and a
  restore gives them back unshifted;
* a device node, and an owner outside the host's range, are a WARNING (backup,
  status on both sides) and the snapshot holds the rest, which a restore gives
  back; trusted.* and security.* xattrs never reach the disc;
* a shell as one host's account (in its namespace or not) can neither read
  nor write another host's current or snapshots, cannot map another host's
  range, cannot rewrite its own authorized_keys, and sudo gives it only its
  own host's snapshot; a shell as the shared backup user cannot read a
  userns host's files; no other local user reaches a set-uid file;
* a host set up before under fake-super keeps working beside userns hosts.
"""
from __future__ import annotations

import contextlib
import functools
import grp
import os
import pwd
import re
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Iterator

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from remote_env import REPO, RemoteByteback, remote_byteback  # noqa: E402
from sshd_env import _sigterm_as_interrupt, _skip_or_check, run, run_as  # noqa: E402

pytestmark = pytest.mark.integration

SNAPSHOT_RE = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d(:\d\d)?[+-]\d{4}$")
OTHER = "client2"
PYTHON = "/usr/bin/python3"       # the server's own (the forced command's); root's may be out of reach


def byteback_module():
    sys.path.insert(0, str(REPO))
    import byteback
    return byteback


def _subid_base(path: str, name: str) -> int:
    for line in Path(path).read_text().splitlines():
        owner, first, count = line.split(":")
        if owner == name and int(count) >= 65536:
            return int(first)
    raise AssertionError(f"{name} has no range in {path}")


class Host:
    def __init__(self, remote: RemoteByteback, name: str, config: Path):
        self.remote, self.name, self.config = remote, name, config
        self.account = f"{remote.env.user.name}-{name}"
        self.uid_base = _subid_base("/etc/subuid", self.account)
        self.gid_base = _subid_base("/etc/subgid", self.account)

    @property
    def dir(self) -> Path:
        return self.remote.store / self.name

    def backup(self, *args: str):
        return self.remote.run("backup", "--host", self.name, "--retry-delay", "1", "--retry-number", "1",
                               *args, config_dir=self.config)

    def snapshots(self):
        return sorted(p.name for p in self.dir.iterdir() if SNAPSHOT_RE.match(p.name))

    def shell(self, script: str) -> subprocess.CompletedProcess:
        """A shell as this host's account (a client that escaped its forced command)."""
        return run_as(self.account, ["sh", "-c", script], check=False, timeout=60)

    def namespace_shell(self, script: str) -> subprocess.CompletedProcess:
        """The same shell as root of the host's own namespace, entered by byteback's own code."""
        code = ("import os, sys; sys.path.insert(0, sys.argv[1]); import byteback; "
                "byteback.enter_user_namespace(int(sys.argv[2]), int(sys.argv[3])); "
                "os.execv('/bin/sh', ['sh', '-c', sys.argv[4]])")
        return run_as(self.account, [PYTHON, "-c", code, str(self.remote.program),
                                     str(self.uid_base), str(self.gid_base), script], check=False, timeout=60)


@pytest.fixture(scope="module")
def userns() -> Iterator[tuple]:
    """client1 and client2, each with its own account, and one snapshot each."""
    _skip_or_check()
    sys.path.insert(0, str(REPO))
    import byteback
    problem = byteback.userns_problem()
    if problem:
        pytest.skip(f"this machine cannot run userns receivers: {problem}")
    with _sigterm_as_interrupt(), remote_byteback(receiver="userns") as remote:
        remote.set_server_conf(min_interval="0", receiver="userns")
        config2 = remote.env.workdir / "config-client2"
        config2.mkdir(mode=0o700)
        remote.setup_client(config2, OTHER)
        hosts = Host(remote, remote.host, remote.client_config), Host(remote, OTHER, config2)
        for host in hosts:
            src = remote.env.workdir / f"src-{host.name}"
            src.mkdir()
            (src / "secret.txt").write_text(f"the secret of {host.name}\n")
            os.chmod(src / "secret.txt", 0o600)
            host.backup("--source", str(src)).check()
            host.src = src
        yield remote, hosts[0], hosts[1]



def owned_tree(root: Path, files: dict) -> Path:
    """A directory of files, each {name: (text, uid, gid)}, as a client's tree holds them."""
    root.mkdir()
    for name, (text, uid, gid) in files.items():
        (root / name).write_text(text)
        os.chown(root / name, uid, gid)
    return root

def test_setup_gives_each_host_its_own_account_key_file_range_and_sudo_lines(userns):
    remote, one, two = userns
    assert (remote.client_config / "destination").read_text().strip().startswith(f"{one.account}@")
    for host in (one, two):
        account = pwd.getpwnam(host.account)
        assert account.pw_dir == str(host.dir)
        st = os.lstat(host.dir)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, account.pw_gid, 0o750)
        st = os.lstat(host.dir / "current")
        assert (st.st_uid, st.st_gid) == (host.uid_base, host.gid_base)
        keys = host.dir / ".ssh" / "authorized_keys"
        assert os.lstat(keys).st_uid == 0 and os.lstat(host.dir / ".ssh").st_uid == 0
        assert f"receive --host {host.name}\"" in keys.read_text()
        assert f"--host {host.name}" not in (remote.store / ".ssh" / "authorized_keys").read_text()
        sudo = run(["sudo", "-l", "-U", host.account], check=False).stdout
        assert f"snapshot --host {host.name}" in sudo and "setup-host" not in sudo and "*" not in sudo
    assert abs(one.uid_base - two.uid_base) >= byteback_module().HOST_ID_COUNT
    for path in ("/etc/subuid", "/etc/subgid"):
        assert f"{one.account}:{_subid_base(path, one.account)}:{2 ** 21}" in Path(path).read_text()


def test_owners_modes_links_and_capabilities_are_kept_for_real_and_restored(userns, tmp_path):
    remote, one, _ = userns
    src = tmp_path / "tree"
    src.mkdir()
    for name, uid in (("root-file", 0), ("www-file", 33), ("user-file", 1000)):
        (src / name).write_text(name)
        os.chown(src / name, uid, uid + 1)
    tool = src / "suid-tool"
    tool.write_bytes(Path("/bin/true").read_bytes())
    os.chmod(tool, 0o4755)
    os.link(src / "user-file", src / "user-link")
    os.mkfifo(src / "fifo")
    run(["setfattr", "-n", "user.note", "-v", "kept", str(src / "user-file")])
    capped = src / "capped"
    capped.write_bytes(Path("/bin/true").read_bytes())
    run(["setcap", "cap_net_raw+ep", str(capped)])
    one.backup("--source", str(src)).check()
    stored = one.dir / "current" / str(src).lstrip("/")
    assert os.lstat(stored / "root-file").st_uid == one.uid_base
    assert (os.lstat(stored / "www-file").st_uid, os.lstat(stored / "www-file").st_gid) == \
        (one.uid_base + 33, one.gid_base + 34)
    assert os.lstat(stored / "user-file").st_uid == one.uid_base + 1000
    assert stat.S_IMODE(os.lstat(stored / "suid-tool").st_mode) == 0o4755
    assert os.lstat(stored / "user-file").st_ino == os.lstat(stored / "user-link").st_ino
    assert stat.S_ISFIFO(os.lstat(stored / "fifo").st_mode)
    names = run(["getfattr", "-d", "-m", "-", "--absolute-names", str(stored / "user-file")]).stdout
    assert "user.note" in names and "rsync" not in names         # no --fake-super xattr
    # The capability is stored tied to the namespace's root (a v3 capability):
    # honoured only inside this host's namespace.
    raw = os.getxattr(stored / "capped", "security.capability")
    assert raw[:4] == b"\x01\x00\x00\x03" and int.from_bytes(raw[20:24], "little") == one.uid_base
    out = tmp_path / "back"
    out.mkdir()
    remote.run("restore", "--host", one.name, "--snapshot", "current", "--restore", "--same-owner",
               "--to", str(out), f"{src}/**").check()
    back = out / str(src).lstrip("/")
    for name, uid in (("root-file", 0), ("www-file", 33), ("user-file", 1000)):
        st = os.lstat(back / name)
        assert (st.st_uid, st.st_gid) == (uid, uid + 1), name
    assert stat.S_IMODE(os.lstat(back / "suid-tool").st_mode) == 0o4755
    assert os.lstat(back / "user-file").st_ino == os.lstat(back / "user-link").st_ino
    assert "cap_net_raw" in run(["getcap", str(back / "capped")]).stdout


def test_what_the_namespace_cannot_keep_is_a_warning_and_the_snapshot_is_taken(userns, tmp_path):
    """A device node and an owner outside the host's range: the snapshot still holds the
    rest, backup and both statuses say WARNING (not CRITICAL), a restore gives back what was kept."""
    remote, one, _ = userns
    src = tmp_path / "gaps"
    (src / "rootfs" / "dev").mkdir(parents=True)
    (src / "plain").write_text("copied anyway\n")
    os.chown(src / "plain", 1000, 1000)
    os.mknod(src / "rootfs" / "dev" / "null", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (src / "rootfs" / "podman").write_text("a rootless container's file\n")
    os.chown(src / "rootfs" / "podman", 200000, 200001)     # a usual subuid: inside a new host's range
    outside = 4_000_000_000                       # no host's range reaches it
    (src / "rootfs" / "far").write_text("a container's file\n")
    os.chown(src / "rootfs" / "far", outside, outside)
    before = one.snapshots()
    result = one.backup("--source", str(src)).check()
    assert len(one.snapshots()) == len(before) + 1
    warning = [l for l in result.stderr.splitlines() if l.startswith("byteback: WARNING: ")]
    assert len(warning) == 1, result.stderr
    assert "2 files not kept as they are" in warning[0] and "1 device node left out" in warning[0]
    assert "1 file kept owned by root" in warning[0]
    assert f"{src}/rootfs/dev/null" in warning[0] and f"{src}/rootfs/far" in warning[0]
    newest = one.dir / one.snapshots()[-1] / str(src).lstrip("/")
    assert (newest / "plain").read_text() == "copied anyway\n"
    assert os.lstat(newest / "plain").st_uid == one.uid_base + 1000
    assert (newest / "rootfs" / "far").read_text() == "a container's file\n"
    assert os.lstat(newest / "rootfs" / "far").st_uid == one.uid_base          # kept, owned by root
    st = os.lstat(newest / "rootfs" / "podman")
    assert (st.st_uid, st.st_gid) == (one.uid_base + 200000, one.gid_base + 200001)
    assert not os.path.lexists(newest / "rootfs" / "dev" / "null")

    status = remote.run("status", "--nagios")
    assert status.returncode == 1 and status.stdout.startswith("BYTEBACK WARNING - "), status.stdout
    assert "2 files not kept as they are" in status.stdout
    server = remote.server("status", "--store", str(remote.store), "--nagios")
    assert server.returncode == 1, server.stdout + server.stderr
    assert f"with files not kept as they are ({one.name})" in server.stdout
    assert f"{src}/rootfs/dev/null" in remote.server("status", "--store", str(remote.store)).stdout

    out = tmp_path / "back"
    out.mkdir()
    remote.run("restore", "--host", one.name, "--snapshot", one.snapshots()[-1], "--restore",
               "--same-owner", "--to", str(out), f"{src}/**").check()
    back = out / str(src).lstrip("/")
    assert (back / "plain").read_text() == "copied anyway\n" and os.lstat(back / "plain").st_uid == 1000
    assert (back / "rootfs" / "far").read_text() == "a container's file\n"
    assert os.lstat(back / "rootfs" / "far").st_uid == 0
    st = os.lstat(back / "rootfs" / "podman")
    assert (st.st_uid, st.st_gid) == (200000, 200001)
    assert not os.path.lexists(back / "rootfs" / "dev" / "null")

    # The next backup without them: the warning is over, on both sides.
    one.backup("--source", str(one.src)).check()
    assert remote.run("status", "--nagios").returncode == 0
    server = remote.server("status", "--store", str(remote.store), "--nagios")
    assert "not kept" not in server.stdout, server.stdout


def test_trusted_and_security_xattrs_never_reach_the_disc(userns, tmp_path):
    remote, one, _ = userns
    src = tmp_path / "xattrs"
    src.mkdir()
    f = src / "labelled"
    f.write_text("x")
    for name in ("trusted.overlay.opaque", "security.evil", "user.kept"):
        run(["setfattr", "-n", name, "-v", "y", str(f)])
    one.backup("--source", str(src)).check()
    stored = one.dir / "current" / str(src).lstrip("/") / "labelled"
    names = run(["getfattr", "-d", "-m", "-", "--absolute-names", str(stored)]).stdout
    assert "user.kept" in names
    assert "trusted." not in names and "security.evil" not in names


def test_a_shell_as_one_hosts_account_cannot_reach_another_hosts_backups(userns):
    remote, one, two = userns
    theirs = two.dir / "current" / str(two.src).lstrip("/") / "secret.txt"
    snap = two.dir / two.snapshots()[-1] / str(two.src).lstrip("/") / "secret.txt"
    before = theirs.read_bytes(), snap.read_bytes()
    # Its own namespace reaches its own files (so the refusals below are the kernel's).
    mine = one.dir / "current" / str(one.src).lstrip("/") / "secret.txt"
    assert one.namespace_shell(f"cat {mine}").stdout == f"the secret of {one.name}\n"
    assert one.namespace_shell("id -u").stdout.strip() == "0"
    for shell in (one.shell, one.namespace_shell):
        for target in (theirs, snap):
            proc = shell(f"cat {target}")
            assert "Permission denied" in proc.stderr and "the secret" not in proc.stdout, proc
            assert shell(f"echo pwned > {target}").returncode != 0
            assert shell(f"ln {target} {one.dir}/current/stolen").returncode != 0
        assert shell(f"ls {two.dir}").returncode != 0
    assert (theirs.read_bytes(), snap.read_bytes()) == before
    assert not os.path.lexists(one.dir / "current" / "stolen")
    # Another host's range it cannot map.
    assert one.shell(f"newuidmap $$ 0 {two.uid_base} 65536").returncode != 0
    stolen = run_as(one.account, [PYTHON, "-c",
                                  "import os, sys; sys.path.insert(0, sys.argv[1]); import byteback; "
                                  "byteback.enter_user_namespace(int(sys.argv[2]), int(sys.argv[2]))",
                                  str(remote.program), str(two.uid_base)], check=False, timeout=60)
    assert stolen.returncode != 0


def test_setup_server_brings_a_host_accounts_older_sudo_lines_up_to_date(userns):
    """An older byteback wrote no secure_path (sudo kept the caller's PATH for the zipapp's
    #! line where sudoers sets none): setup-server on the existing store writes it."""
    remote, one, _ = userns
    path = Path("/etc/sudoers.d") / f"byteback-host-{one.account}"
    current = path.read_text()
    assert f"Defaults:{one.account} secure_path=" in current, current
    path.write_text("".join(l for l in current.splitlines(True) if "secure_path" not in l))
    again = remote.server("setup-server", "--store", str(remote.store), "--user", remote.env.user.name,
                          "--install-path", str(remote.program), "--receiver", "userns",
                          "--cron-file", str(remote.server_config / "cron.d-byteback-prune")).check()
    assert f"wrote      {path}" in again.stdout and path.read_text() == current, again.stdout
    assert stat.S_IMODE(os.lstat(path).st_mode) == 0o440
    twice = remote.server("setup-server", "--store", str(remote.store), "--user", remote.env.user.name,
                          "--install-path", str(remote.program), "--receiver", "userns",
                          "--cron-file", str(remote.server_config / "cron.d-byteback-prune")).check()
    assert "nothing changed" in twice.stdout, twice.stdout


def test_a_host_account_cannot_rewrite_its_key_or_run_more_than_its_snapshot(userns):
    remote, one, two = userns
    keys = one.dir / ".ssh" / "authorized_keys"
    before = keys.read_bytes()
    assert one.shell(f"echo ssh-ed25519 AAAA >> {keys}").returncode != 0
    assert one.shell(f"mv {one.dir}/.ssh {one.dir}/.ssh-old").returncode != 0
    assert one.namespace_shell(f"echo ssh-ed25519 AAAA >> {keys}").returncode != 0
    assert keys.read_bytes() == before
    program, config = remote.program, remote.server_config
    two_before = two.snapshots()
    allowed = one.shell(f"sudo -n -l {program} --config-dir {config} snapshot --host {one.name}")
    assert allowed.returncode == 0, allowed                   # its own snapshot it may ask for
    for words in (f"snapshot --host {two.name}", f"prune", f"setup-host --host evil --client-address 1.2.3.4",
                  f"snapshot --host {one.name} --force"):
        proc = one.shell(f"sudo -n {program} --config-dir {config} {words} </dev/null")
        assert proc.returncode != 0, words
    assert two.snapshots() == two_before


def test_the_shared_user_and_other_local_users_cannot_read_a_userns_host(userns):
    remote, one, _ = userns
    secret = one.dir / "current" / str(one.src).lstrip("/") / "secret.txt"
    proc = remote.env.run_as_user(["cat", str(secret)], check=False)
    assert "Permission denied" in proc.stderr and "the secret" not in proc.stdout
    proc = remote.env.run_as_user(["sh", "-c", f"echo pwned > {secret}"], check=False)
    assert "Permission denied" in proc.stderr
    assert secret.read_text() == f"the secret of {one.name}\n"
    tool = next(one.dir.glob("current/**/suid-tool"), None)
    assert tool is not None, "the set-uid tool of the test above"
    proc = run_as("nobody", [str(tool)], check=False)
    assert "Permission denied" in proc.stderr, proc     # the host directory (0750) stops them


def test_a_fake_super_host_keeps_working_beside_userns_hosts(userns, tmp_path):
    remote, one, _ = userns
    remote.set_server_conf(min_interval="0", receiver="fakesuper")
    config = remote.env.workdir / "config-legacy"
    config.mkdir(mode=0o700)
    try:
        remote.setup_client(config, "legacy")
    finally:
        remote.set_server_conf(min_interval="0", receiver="userns")
    assert (config / "destination").read_text().startswith(f"{remote.env.user.name}@")
    src = tmp_path / "legacy"
    src.mkdir()
    (src / "owned").write_text("legacy\n")
    os.chown(src / "owned", 1000, 1000)
    remote.run("backup", "--host", "legacy", "--retry-delay", "1", "--source", str(src),
               config_dir=config).check()
    stored = remote.store / "legacy" / "current" / str(src).lstrip("/") / "owned"
    assert os.lstat(stored).st_uid == remote.env.user.uid          # the shared user's, owner in xattrs
    assert "user.rsync.%stat" in run(["getfattr", "-d", "-m", "-", "--absolute-names", str(stored)]).stdout
    out = tmp_path / "out"
    out.mkdir()
    remote.run("restore", "--host", "legacy", "--snapshot", "current", "--restore", "--same-owner",
               "--to", str(out), f"{src}/**", config_dir=config).check()
    assert os.lstat(out / str(src).lstrip("/") / "owned").st_uid == 1000
    # A userns host set up again is unchanged and still backs up.
    one.backup("--source", str(one.src)).check()


def test_what_a_host_account_plants_in_its_session_directory_never_fails_a_backup(userns, tmp_path):
    remote, one, _ = userns
    sessions = remote.store / ".byteback" / "sessions" / one.name
    st = os.lstat(sessions)
    assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (one.uid_base, one.gid_base, 0o700)
    canary = tmp_path / "roots-own-file"            # a file of root's the planted link points at
    canary.write_text("root's\n")
    os.chmod(canary, 0o600)
    planted = one.namespace_shell(f"cd {sessions} && rm -f {one.name}.lock {one.name}.dirty && "
                                  f"ln -s {canary} {one.name}.lock && mkdir {one.name}.dirty")
    assert planted.returncode == 0, planted
    before = one.snapshots()
    time.sleep(1.1)                                  # snapshot names have one-second resolution
    one.backup("--source", str(one.src)).check()
    assert len(one.snapshots()) == len(before) + 1
    st = os.lstat(canary)
    assert canary.read_text() == "root's\n" and (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o600)
    assert not os.path.islink(sessions / f"{one.name}.lock")
    assert not os.path.lexists(sessions / f"{one.name}.dirty")


def test_a_raw_push_lands_in_its_own_current_and_a_restore_stays_in_its_host(userns, tmp_path):
    """The guard's path rules hold for a host's own account as for the shared user."""
    remote, one, two = userns
    rsh = remote.env.rsync_rsh(remote.client_key())
    login = f"{one.account}@{remote.env.host}:"
    src = tmp_path / "raw"
    src.mkdir()
    (src / "planted-by-raw-push").write_text("x")
    # fake-super's own xattr, which -XX sends: it would forge an owner and mode
    os.setxattr(src / "planted-by-raw-push", "user.rsync.%stat", b"104755 0,0 0:0")
    os.setxattr(src / "planted-by-raw-push", "user.plain", b"kept")
    for dest in (f"../{two.name}/current/", f"{remote.store}/{two.name}/current/", "../../"):
        proc = run(["rsync", "-e", rsh, "-rtXX", "--rsync-path", "rsync --fake-super", f"{src}/",
                    login + dest], check=False, timeout=120)
        assert proc.returncode == 0, proc
    assert (one.dir / "current" / "planted-by-raw-push").exists()
    assert os.listxattr(one.dir / "current" / "planted-by-raw-push") == ["user.plain"]
    assert not os.path.lexists(two.dir / "current" / "planted-by-raw-push")
    assert not os.path.lexists(remote.store / "planted-by-raw-push")
    for source in (f"current/../../{two.name}/current/", f"../{two.name}/current/", "/etc/shadow"):
        out = tmp_path / "out"
        proc = run(["rsync", "-e", rsh, "-rt", login + source, str(out)], check=False, timeout=120)
        assert proc.returncode != 0 and "refused" in proc.stderr, proc
        assert not os.path.lexists(out)
    one.backup("--source", str(one.src)).check()      # its next backup is as before


def test_a_host_set_up_with_65536_ids_keeps_working_and_grows_at_setup_client(userns, tmp_path):
    """A host of an earlier version (one range of 65536): its backups go on, an id above its
    range is a WARNING; setup-client run again adds a second range, and the next backup keeps
    that owner for real while the owners already on disc keep their meaning."""
    remote, _, _ = userns
    config = tmp_path / "config-old"
    config.mkdir(mode=0o700)
    remote.setup_client(config, "oldhost")
    old = Host(remote, "oldhost", config)
    for path, flag, base in (("/etc/subuid", "subuids", old.uid_base), ("/etc/subgid", "subgids", old.gid_base)):
        run(["usermod", f"--del-{flag}", f"{base}-{base + 2 ** 21 - 1}", old.account])
        run(["usermod", f"--add-{flag}", f"{base}-{base + 65535}", old.account])
        assert f"{old.account}:{base}:65536" in Path(path).read_text()
    src = owned_tree(tmp_path / "tree", {"user-file": ("a user's\n", 1000, 1000),
                                         "podman": ("a container's\n", 200000, 200000)})
    result = old.backup("--source", str(src)).check()
    assert "1 file kept owned by root" in result.stderr and f"{src}/podman" in result.stderr
    stored = old.dir / "current" / str(src).lstrip("/")
    assert os.lstat(stored / "user-file").st_uid == old.uid_base + 1000
    assert os.lstat(stored / "podman").st_uid == old.uid_base

    remote.setup_client(config, "oldhost")          # the administrator runs it again
    ranges = [l for l in Path("/etc/subuid").read_text().splitlines() if l.startswith(f"{old.account}:")]
    assert ranges[0] == f"{old.account}:{old.uid_base}:65536" and ranges[1].endswith(f":{2 ** 21 - 65536}")
    grown = int(ranges[1].split(":")[1])
    result = old.backup("--source", str(src)).check()
    assert "WARNING" not in result.stderr, result.stderr
    assert os.lstat(stored / "user-file").st_uid == old.uid_base + 1000          # unchanged meaning
    assert os.lstat(stored / "podman").st_uid == grown + 200000 - 65536         # the second range
    out = tmp_path / "back"
    out.mkdir()
    remote.run("restore", "--host", old.name, "--snapshot", old.snapshots()[-1], "--restore", "--same-owner",
               "--to", str(out), f"{src}/**", config_dir=config).check()
    back = out / str(src).lstrip("/")
    assert os.lstat(back / "user-file").st_uid == 1000 and os.lstat(back / "podman").st_uid == 200000


def test_what_a_host_account_plants_as_its_record_of_losses_root_reads_only_within_bounds(userns):
    """The record of what a backup could not keep is the host account's to write: root's status
    never follows a link or blocks on a FIFO there, never prints a forged escape, never lets a
    big file hide from prune's count, never believes a record from the future, and one within
    bounds speaks only for its own host, until its next snapshot."""
    remote, one, two = userns
    record = remote.store / ".byteback" / "sessions" / one.name / f"{one.name}.not-kept"
    newest = one.snapshots()[-1]

    def written(devices: int, owners: int, name: str, when: str = "$(date -Iseconds)") -> str:
        text = (f'{{"devices": {devices}, "owners": {owners}, "examples": ["{name}"], "time": "{when}", '
                f'"snapshot": "{newest}"}}')
        return 'echo "' + text.replace('"', '\\"') + f'" > {record}'

    plants = {"symlink": f"ln -s /etc/shadow {record}", "fifo": f"mkfifo {record}",
              "escape": written(1, 0, "\\u001b[2J\\u001b[31mOK"),
              "future": written(0, 7, "/forged", "2999-01-01T00:00:00+00:00"),
              "huge": f"head -c 1000000 /dev/zero > {record}"}
    try:
        for name, script in plants.items():
            assert one.namespace_shell(f"rm -f {record}; {script}").returncode == 0, name
            status = remote.server("status", "--store", str(remote.store))
            assert "not kept" not in status.stdout and "\x1b" not in status.stdout, (name, status.stdout)
            if name == "huge":     # not the record's size: counted, as anything else in sessions/
                assert "belongs to no host's backups" in status.stdout, status.stdout
        assert one.namespace_shell(f"rm -f {record}; {written(0, 7, '/forged')}").returncode == 0
        nagios = remote.server("status", "--store", str(remote.store), "--nagios")
        assert nagios.returncode == 1 and f"with files not kept as they are ({one.name})" in nagios.stdout
        assert one.snapshots()[-1] == newest                  # nothing else moved
        one.backup("--source", str(one.src)).check()         # its next snapshot ends it
        assert "not kept" not in remote.server("status", "--store", str(remote.store), "--nagios").stdout
    finally:
        one.namespace_shell(f"rm -f {record}")


NOT_TOLD = byteback_module().EXIT_NOT_TOLD


def _start_waiting_snapshot(remote: RemoteByteback, user: str, host: str) -> subprocess.Popen:
    """snapshot --when-told as user, through sudo, its stdin a pipe of ours."""
    return subprocess.Popen(["runuser", "-u", user, "--", "sudo", "-n", str(remote.program), "--config-dir",
                             str(remote.server_config), "snapshot", "--host", host, "--when-told"],
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            cwd="/", env={"PATH": "/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"})


def _wait_until_waiting(proc: subprocess.Popen, lock: Path) -> None:
    started = time.monotonic()
    while not byteback_module().flock_held(lock):
        assert proc.poll() is None and time.monotonic() - started < 30, proc.stderr.read()
        time.sleep(0.05)


def test_a_waiting_snapshot_ends_by_its_deadline_and_a_second_one_is_refused(userns):
    """snapshot --when-told through the real sudo, as a host's account and as the backup user,
    who may each start it themselves: a run never told ends by rsync_timeout, one other
    waiting run of the same host or one of a host the store has not ends at once, neither snapshots."""
    remote, one, _ = userns
    before = one.snapshots()
    lock = byteback_module().WHEN_TOLD_LOCK_DIR / f"{one.name}.lock"
    start = functools.partial(_start_waiting_snapshot, remote)
    remote.set_server_conf(min_interval="0", receiver="userns", rsync_timeout="4")
    waiting = start(one.account, one.name)
    try:
        started = time.monotonic()
        _wait_until_waiting(waiting, lock)
        for user, host in ((one.account, one.name), (remote.env.user.name, one.name),
                           (remote.env.user.name, "nosuchhost")):
            second = start(user, host)          # its stdin stays open, and says nothing
            assert second.wait(timeout=20) == NOT_TOLD, (user, host, second.stderr.read())
            assert second.stderr.read() == b""             # the reason is in the server's log only
            second.stdin.close()
        assert waiting.poll() is None                       # the first still waits
        assert waiting.wait(timeout=30) == NOT_TOLD         # and ends by its deadline, told nothing
        assert time.monotonic() - started < 4 + 20
        assert waiting.stdout.read() == b""
        assert not byteback_module().flock_held(lock)
        told_else = start(one.account, one.name)
        told_else.stdin.write(b"stop\n")
        told_else.stdin.flush()
        assert told_else.wait(timeout=20) == NOT_TOLD and told_else.stdout.read() == b""
        told_else.stdin.close()
        assert one.snapshots() == before
        st = os.lstat(lock.parent)
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (0, 0o700)
    finally:
        remote.set_server_conf(min_interval="0", receiver="userns")
        if waiting.poll() is None:
            waiting.stdin.close()
            waiting.wait(timeout=30)


def test_a_push_whose_waiting_snapshot_was_refused_gets_its_snapshot_from_a_fresh_run(userns):
    """Another waiting run holds the host's lock (one its account started itself): the push's
    own root run ends at once, and the guard has a run that does not wait take the snapshot."""
    remote, one, _ = userns
    before = one.snapshots()
    other = _start_waiting_snapshot(remote, one.account, one.name)
    try:
        _wait_until_waiting(other, byteback_module().WHEN_TOLD_LOCK_DIR / f"{one.name}.lock")
        done = one.backup("--source", str(one.src)).check()
        assert len(one.snapshots()) == len(before) + 1, (done.stdout, done.stderr)
        assert "waiting" not in done.stderr, done.stderr
        assert other.poll() is None
    finally:
        other.stdin.close()
        assert other.wait(timeout=30) == NOT_TOLD
    assert len(one.snapshots()) == len(before) + 1          # told nothing, it took none


def _prune_would_act_as(host: "Host") -> str:
    """prune_would_act as the forced command asks it at a push: as the host's own account."""
    remote = host.remote
    code = (f"import sys; sys.path.insert(0, {str(remote.program)!r}); import byteback; "
            f"print(byteback.prune_would_act(byteback.open_store({str(remote.store)!r}), "
            "byteback.ServerConfig(), byteback.now_local()))")
    result = run_as(host.account, ["python3", "-c", code], cwd="/")
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def test_a_push_asks_root_s_last_plan_where_other_hosts_are_closed_to_it(userns):
    # client1's account cannot list client2's snapshots (<host>/ is 0750 root:<its group>):
    # the plan could not be read, and every push of a store of several such hosts ran a root
    # prune first (sudo, a second start of the program as root, every host's state read).
    remote, one, two = userns
    assert run_as(one.account, ["ls", str(two.dir)]).returncode != 0
    assert _prune_would_act_as(one) == "False"        # the snapshots' prunes left it settled
    plan = remote.store / ".byteback" / "last-plan.json"
    saved = plan.read_bytes()
    try:
        plan.unlink()
        assert _prune_would_act_as(one) == "True"     # nothing of root's to go by: ask root
        plan.write_bytes(saved)
        os.chown(plan, pwd.getpwnam(one.account).pw_uid, -1)
        assert _prune_would_act_as(one) == "True"     # not root's: not believed
    finally:
        plan.write_bytes(saved)
        os.chown(plan, 0, 0)
