"""A hostile client, through the real sshd and the real forced command (issue 3, item 6).

A rogue root on a client owns that client's restricted key (``restrict,
from=..., command="byteback.pyz receive --host client1"``) and, should it ever
escape the forced command, a shell as the ``byteback`` user.  Every test here
is one attack it could try:

* shell syntax and other programs in the command; ssh's own side doors;
* every dangerous rsync option, sent with the real rsync client (``-M`` /
  ``--remote-option`` forwards anything to the server side) or spelt out;
* paths that lead to another host, a snapshot, or outside the store, on push
  (the server must ignore the client's path) and on restore (refused);
* symlinks uploaded in ``current`` and written through by a second push;
* ``complete`` flooding, and a second session while one is open;
* a host name, key or address with injected options at setup (``setup-host``
  through sudo, the door setup-client uses);
* ``--store``/``--force`` through sudo, and a shell as ``byteback`` going for
  the snapshots, the host directories, authorized_keys and the program.

Each test asserts the refusal (exit 1, not ssh's 255; ``byteback: refused:
...`` on stderr; nothing on stdout) or the harmlessness, and an autouse
fixture compares a fingerprint of every snapshot of every host (every file's
content, mode, owner, mtime, xattrs, the read-only flag, the subvolume), the
other hosts' ``current``, authorized_keys, sudoers and the installed program
before and after each test.  Known holes are ``xfail(strict=True)`` tests.

The attacks a client makes with its own key (``BOTH_RECEIVERS``: the refusals,
the rsync options, the paths, symlinks, modes, ``complete`` flooding and a
second session) run twice: against the shared user's fake-super receiver, and
against a server of userns receivers, where each host logs in as its own
account and its rsync is root of a user namespace of its own uid range.  The
attacks of a shell as the shared ``byteback`` user are the fake-super server's;
test_userns_receiver.py has those of a host's own account.
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import re
import secrets
import shutil
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import sshd_env  # noqa: E402
import treeutil  # noqa: E402
from remote_env import RemoteByteback, byteback_remote, remote_byteback  # noqa: E402,F401  (fixture)
from sshd_env import (_client_env, _sigterm_as_interrupt, _skip_or_check, free_bytes, pids_of_uid, run,  # noqa: E402
                      ssh_argv, stop_process, wait_for)

SNAPSHOT_RE = re.compile(r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?(?:[+-]\d{2}:?\d{2}|Z)\Z")
MUNGED = b"/rsyncd-munged/"
CAPS = "e.iLsfxCIvu"
PUSH = f"rsync --fake-super --server -lHogDtpXrR{CAPS} --timeout=300 --numeric-ids"
SEND = f"rsync --fake-super --server --sender -lHogDtpXrR{CAPS} --timeout=300 --numeric-ids"


# === The world: three hosts, snapshots, and what must never change ===============

@dataclass
class World:
    remote: RemoteByteback
    client2_config: Path
    client3_config: Path
    marker: Path                          # a file no attack may create
    receiver: str = "fakesuper"           # setup-server's --receiver
    login_user: str = ""                  # the account client1's key logs in as
    snapshot: str = ""                    # client1's newest snapshot
    client2_snapshot: str = ""
    stored_file: str = ""                 # a file in client1's snapshots, relative to one
    allowed_new: List[str] = field(default_factory=list)   # "host/" prefixes a test may add

    @property
    def env(self):
        return self.remote.env

    @property
    def store(self) -> Path:
        return self.remote.store

    @property
    def key(self) -> Path:
        return self.remote.client_key()

    def login(self, path: str = "") -> str:
        return f"{self.login_user}@{self.env.host}:{path}"

    def log(self) -> str:
        return self.env.sshd.log_tail(25)

    def ssh(self, command, key: Optional[Path] = None, **kwargs) -> subprocess.CompletedProcess:
        """ssh with the client's restricted key (or another); command is SSH_ORIGINAL_COMMAND."""
        return self.env.ssh(command, key=key or self.key, user=self.login_of(key), **kwargs)

    def login_of(self, key: Optional[Path]) -> str:
        """The account a client's key logs in as: client1's for its own key or any other but
        client2's and client3's (with userns each host has its own; else all share one)."""
        for config in (self.client2_config, self.client3_config):
            if key is not None and Path(key) == config / "key":
                return (config / "destination").read_text().strip().partition("@")[0]
        return self.login_user

    def rsync(self, *args: str, key: Optional[Path] = None, timeout: float = 60) -> subprocess.CompletedProcess:
        """The real rsync client over ssh with the restricted key."""
        return self.env.rsync(list(args), key=key or self.key, timeout=timeout)

    def sudo(self, *args: str, input: Optional[str] = None, server_config: bool = True,
             env_prefix: Sequence[str] = ()) -> subprocess.CompletedProcess:
        """A shell as the byteback user running the installed program through sudo -n."""
        config = ["--config-dir", str(self.remote.server_config)] if server_config else []
        argv = [*env_prefix, "sudo", "-n", str(self.remote.program), *config, *args]
        return self.env.run_as_user(argv, input=input, timeout=60)

    def as_user(self, script: str) -> subprocess.CompletedProcess:
        """A shell as the byteback user, in its home (the store)."""
        return self.env.run_as_user(["sh", "-c", script], timeout=60)


def _setup_client(remote: RemoteByteback, config: Path, host: str) -> None:
    remote.setup_client(config, host)


def _source_tree(root: Path, seed: int) -> Path:
    treeutil.generate_tree(root, seed=seed, small_files=12, big_files=(70_001,))
    (root / "secret.txt").write_text(f"the secret of tree {seed}\n")
    return root


BOTH_RECEIVERS = pytest.mark.both_receivers    # the attack runs against each receiver's server


def pytest_generate_tests(metafunc):
    """Every test's world is the fake-super server's; those marked BOTH_RECEIVERS run again
    against a server of userns receivers (each host its own account and uid range)."""
    if "world" in metafunc.fixturenames:
        both = metafunc.definition.get_closest_marker("both_receivers") is not None
        metafunc.parametrize("world", ["fakesuper", "userns"] if both else ["fakesuper"],
                             indirect=True, scope="module")


@pytest.fixture(scope="module")
def world(request) -> Iterator[World]:
    """client1 with two snapshots, client2 with one, client3 set up but never backed up, on a
    server whose receiver is request.param."""
    receiver = request.param
    if receiver == "fakesuper":
        yield from _world(request.getfixturevalue("byteback_remote"), receiver)
        return
    _skip_or_check()
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
    import byteback
    problem = byteback.userns_problem()
    if problem:
        pytest.skip(f"this machine cannot run userns receivers: {problem}")
    with _sigterm_as_interrupt(), remote_byteback(receiver=receiver) as remote:
        yield from _world(remote, receiver)


def _world(remote: RemoteByteback, receiver: str) -> Iterator[World]:
    work = remote.env.workdir
    configs = []
    for name in ("client2", "client3"):
        path = work / f"config-{name}"
        path.mkdir(mode=0o700)
        _setup_client(remote, path, name)
        configs.append(path)
    login_user = (remote.client_config / "destination").read_text().strip().partition("@")[0]
    w = World(remote, configs[0], configs[1], Path(f"/tmp/bbtest-pwned-{secrets.token_hex(4)}"),
              receiver, login_user)
    remote.set_server_conf(min_interval="0")
    src1 = _source_tree(work / "src1", seed=11)
    remote.backup("--source", str(src1)).check()
    time.sleep(1.1)                                  # snapshot names have one-second resolution
    (src1 / "secret.txt").write_text("changed for the second snapshot\n")
    remote.backup("--source", str(src1)).check()
    src2 = _source_tree(work / "src2", seed=22)
    remote.run("backup", "--host", "client2", "--retry-delay", "1", "--source", str(src2),
               config_dir=w.client2_config).check()
    remote.set_server_conf(min_interval="1h")        # from now on: at most one snapshot an hour
    snaps = sorted(p.name for p in (w.store / "client1").iterdir() if SNAPSHOT_RE.match(p.name))
    assert len(snaps) == 2, snaps
    w.snapshot = snaps[-1]
    w.client2_snapshot = next(p.name for p in (w.store / "client2").iterdir() if SNAPSHOT_RE.match(p.name))
    w.stored_file = str(src1 / "secret.txt").lstrip("/")
    assert (w.store / "client1" / w.snapshot / w.stored_file).read_text().startswith("changed")
    yield w
    with contextlib.suppress(FileNotFoundError):
        w.marker.unlink()


# === The fingerprint of history ====================================================

def _ro(path: Path) -> str:
    return run(["btrfs", "property", "get", "-ts", str(path), "ro"], check=False).stdout.strip()


def _file_digest(path: Path) -> str:
    try:
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except FileNotFoundError:
        return "missing"


def fingerprint(w: World) -> Dict[str, object]:
    """Everything no client and no byteback shell may change, by name."""
    prints: Dict[str, object] = {}
    store = w.store
    prints["store entries"] = sorted(os.listdir(store))
    for host_dir in sorted(store.iterdir()):
        if host_dir.name.startswith(".") or not host_dir.is_dir():
            continue
        host = host_dir.name
        st = os.lstat(host_dir)
        prints[f"{host}/"] = (sorted(os.listdir(host_dir)), st.st_uid, st.st_gid, st.st_mode, st.st_ino)
        for entry in sorted(host_dir.iterdir()):
            if SNAPSHOT_RE.match(entry.name):
                st = os.lstat(entry)
                prints[f"{host}/{entry.name}"] = (
                    st.st_dev, st.st_ino, st.st_uid, st.st_gid, st.st_mode, _ro(entry),
                    treeutil.scan(entry))
            elif entry.name == "current" and host != "client1":
                prints[f"{host}/current"] = treeutil.scan(entry)
        keys = host_dir / ".ssh" / "authorized_keys"           # a userns host's own account
        if keys.exists():
            prints[f"{host}/.ssh/authorized_keys"] = keys.read_text()
    prints["authorized_keys"] = w.env.user.authorized_keys.read_text()
    prints["sudoers"] = _file_digest(Path("/etc/sudoers.d") / f"byteback-{w.env.user.name}")
    for path in sorted(Path("/etc/sudoers.d").glob(f"byteback-host-{w.env.user.name}-*")):   # userns hosts'
        prints[f"sudoers {path.name}"] = _file_digest(path)
    prints["program"] = _file_digest(w.remote.program)
    prints["history dir"] = sorted(os.listdir(store / ".byteback" / "history"))
    return prints


def _differences(before: Dict[str, object], after: Dict[str, object], allowed_new: Sequence[str]) -> List[str]:
    problems = []
    for key in sorted(set(before) | set(after)):
        if key not in after:
            problems.append(f"{key}: gone")
        elif key not in before:
            if not any(key.startswith(prefix) for prefix in allowed_new):
                problems.append(f"{key}: new")
        elif before[key] != after[key]:
            if any(key.startswith(p) for p in allowed_new):
                continue          # the attacking host's own directory and backups
            if key in ("store entries", "history dir") and allowed_new:
                continue
            problems.append(f"{key}: changed")
    return problems


@pytest.fixture(autouse=True)
def history_unchanged(world):
    """Every test: every snapshot of every host, and the server's own files, as they were."""
    world.allowed_new = []
    before = fingerprint(world)
    yield
    assert not world.marker.exists(), f"an attack created {world.marker}\n{world.log()}"
    after = fingerprint(world)
    problems = _differences(before, after, world.allowed_new)
    assert not problems, "history or server files changed: " + "; ".join(problems) + "\n" + world.log()


# === How a refusal looks ===========================================================

def assert_refused(w: World, proc, *words: str) -> None:
    """exit 1 (not ssh's 255), nothing on stdout, `byteback: refused: ...` last on stderr."""
    what = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}\n{w.log()}"
    assert proc.returncode == 1, what
    assert proc.stdout == "", what
    lines = proc.stderr.strip().splitlines()
    assert lines and lines[-1].startswith("byteback: refused: "), what
    assert all(line.startswith("byteback: ") for line in lines), "no tracebacks: " + what
    for word in words:
        assert word in lines[-1], f"the refusal should name {word!r}: " + what


def assert_rsync_refused(w: World, proc, *words: str) -> None:
    """The real rsync client failed, and the server said it refused (and why)."""
    what = f"exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}\n{w.log()}"
    assert proc.returncode not in (0, 24), what
    assert "byteback: refused: " in proc.stderr, what
    refusal = next(l for l in proc.stderr.splitlines() if "byteback: refused: " in l)
    for word in words:
        assert word in refusal, f"the refusal should name {word!r}: " + what


def assert_failed(w: World, proc, what: str = "") -> None:
    text = f"{what}: exit {proc.returncode}\nstdout: {proc.stdout!r}\nstderr: {proc.stderr!r}\n{w.log()}"
    assert proc.returncode != 0, "should have failed: " + text


# === 1. Shell syntax and other programs in the command ===========================

SHELL_ATTACKS = [
    "ping; touch {m}", "ping && touch {m}", "ping || touch {m}", "ping | touch {m}",
    "ping & touch {m}", "`touch {m}`", "$(touch {m})", "ping $(touch {m})", "ping > {m}",
    "ping >> {m}", "complete; touch {m}", "ping\ntouch {m}", "ping\rtouch {m}",
    "{{ touch {m}; }}", "(touch {m})", "PATH=/tmp ping; touch {m}", "ping #; touch {m}",
    "sh -c 'touch {m}'", "/bin/sh -c 'touch {m}'", "bash -c 'touch {m}'", "/usr/bin/touch {m}",
    "/bin/rm -rf {store}/client1", "rm -rf {store}/client2", "scp -t {m}", "scp -f /etc/passwd",
    "internal-sftp", "/usr/lib/openssh/sftp-server", "sftp", "rsync --daemon",
    "rsync --daemon --config={m} --port=8873", "rsync -a /etc/ {m}/",
    "rsync /etc/passwd {m}", "/usr/bin/rsync --server -lHogDtpXrR" + CAPS + " . current/",
    "python3 -c 'open(\"{m}\", \"w\")'", "sudo -n {program} snapshot --host client2 --force",
    "{program} receive --host client2", "btrfs property set -ts {store}/client1/{snap} ro false",
    "complete --force", "complete client2", "ping client2",
]


@BOTH_RECEIVERS
@pytest.mark.parametrize("template", SHELL_ATTACKS)
def test_shell_syntax_and_other_programs_are_refused(world, template):
    command = template.format(m=world.marker, store=world.store, program=world.remote.program,
                              snap=world.snapshot)
    assert_refused(world, world.ssh(command))


@BOTH_RECEIVERS
def test_a_refusal_is_exactly_one_line_on_stderr(world):
    """Issue 3: "refuse ... with one line on stderr, exit 1"."""
    proc = world.ssh(f"ping; touch {world.marker}")
    assert_refused(world, proc)
    assert len(proc.stderr.strip().splitlines()) == 1, (
        f"bug: the REFUSED syslog record is also printed to stderr: {proc.stderr!r}")


@BOTH_RECEIVERS
def test_the_legitimate_verbs_still_work(world):
    proc = world.ssh("ping")
    assert proc.returncode == 0 and proc.stdout.startswith("pong") and "host=client1" in proc.stdout, (
        f"{proc}\n{world.log()}")
    listed = world.ssh(f"list --snapshot={world.snapshot} /{world.stored_file}")
    assert listed.returncode == 0 and world.stored_file in listed.stdout, f"{listed}\n{world.log()}"


@BOTH_RECEIVERS
def test_ssh_side_doors_are_shut(world):
    """restrict: no stdio/port forwarding, no subsystem that bypasses the forced command."""
    base = ssh_argv(port=world.env.port, known_hosts=world.env.known_hosts, key=world.key)
    login = f"{world.login_user}@{world.env.host}"
    forward = subprocess.run(base + ["-W", f"127.0.0.1:{world.env.port}", login],
                             stdin=subprocess.DEVNULL, capture_output=True, timeout=30, env=_client_env(None))
    assert forward.returncode != 0 and not forward.stdout.startswith(b"SSH-"), (
        f"{forward}\n{world.log()}")
    sftp = subprocess.run(base + ["-s", login, "sftp"], stdin=subprocess.DEVNULL, capture_output=True,
                          timeout=30, env=_client_env(None))
    # No sftp subsystem here; where there is one, the forced command still runs
    # (SSH_ORIGINAL_COMMAND is then the subsystem's program: refused above).
    assert sftp.returncode != 0 and not sftp.stdout, f"{sftp}\n{world.log()}"
    # The client's environment never reaches the forced command (AcceptEnv none,
    # PermitUserEnvironment no): ping still answers for client1.
    proc = world.ssh("ping", options=["SetEnv=SSH_ORIGINAL_COMMAND=sh BYTEBACK_CONFIG_DIR=/tmp"])
    assert proc.returncode == 0 and "host=client1" in proc.stdout, f"{proc}\n{world.log()}"


@BOTH_RECEIVERS
def test_list_patterns_that_climb_are_refused(world):
    for command in ("list /../../client2/**", "list ../client2/current", "list --snapshot=../client2 /",
                    f"list --snapshot=/{world.store}/client2/{world.client2_snapshot} /",
                    "list --store=/ /etc", "list --host=client2 /etc"):
        assert_refused(world, world.ssh(command))


@BOTH_RECEIVERS
def test_a_bad_glob_is_refused_not_a_traceback(world):
    proc = world.ssh("list '/[z-a]'")
    assert "Traceback" not in proc.stderr, proc.stderr
    assert_refused(world, proc)


# === 2. Every dangerous rsync option, sent with the real rsync client ============

def _small_tree(w: World, name: str) -> Path:
    root = w.env.workdir / f"{name}-{secrets.token_hex(3)}"
    root.mkdir()
    (root / f"pwned-{name}").write_text("written by an attack\n")
    return root


PUSH_OPTION_ATTACKS = [
    # (real rsync client arguments, word the refusal names)
    (["-M--rsh=/bin/sh"], "--rsh"),
    (["-M--rsync-path=/bin/sh"], "--rsync-path"),
    (["-M--log-file={m}"], "--log-file"),
    (["-M--write-batch={m}"], "--write-batch"),
    (["-M--only-write-batch={m}"], "--only-write-batch"),
    (["-M--read-batch=/etc/passwd"], "--read-batch"),
    (["--backup", "--backup-dir=../client2/current"], "-b"),
    (["-M--backup-dir=../client2/current"], "--backup-dir"),
    (["--partial-dir=../client2/current/x"], "--partial-dir"),
    (["--partial-dir={m}"], "--partial-dir"),
    (["--temp-dir=../client2/current"], ""),
    (["-M--temp-dir=/tmp"], "--temp-dir"),
    (["--link-dest=../client2/{snap2}"], "--link-dest"),
    (["--copy-dest=/etc"], "--copy-dest"),
    (["--compare-dest=../client2/current"], "--compare-dest"),
    (["-M--files-from=/etc/passwd"], "--files-from"),
    (["-M--remove-source-files"], "--remove-source-files"),
    (["-M--daemon"], "--daemon"),
    (["-M--config=/etc/passwd"], "--config"),
    (["-M--no-munge-links"], "--no-munge-links"),
    (["-M--copy-unsafe-links"], "--copy-unsafe-links"),
    (["--keep-dirlinks"], "-K"),
    (["-s"], "-s"),
    (["--secluded-args"], "-s"),
    (["--super"], "--super"),
    (["-M--chown=0:0"], "--chown"),
    (["-M--max-alloc=0"], "--max-alloc"),
    (["-M--iconv=utf8"], "--iconv"),
    (["-M--debug=ALL"], "--debug"),
    (["--preallocate"], "--preallocate"),
    (["-M--max-size=99999999999999999P"], "--max-size"),
    (["--max-size=1"], "--max-size"),
    (["-M--confine-root=/"], "--confine-root"),
    (["--rsync-path=sh -c 'touch {m}'; rsync"], "is not a command"),
    (["--rsync-path=rsync --log-file={m}"], "without --server"),
    (["--rsync-path=/usr/bin/rsync"], "is not a command"),
]


@BOTH_RECEIVERS
@pytest.mark.parametrize("args,word", PUSH_OPTION_ATTACKS, ids=[" ".join(a) for a, _ in PUSH_OPTION_ATTACKS])
def test_dangerous_rsync_options_on_push_are_refused(world, args, word):
    src = _small_tree(world, "option")
    args = [a.format(m=world.marker, snap2=world.client2_snapshot) for a in args]
    proc = world.rsync("-a", *args, f"{src}/", world.login("current/"))
    assert_rsync_refused(world, proc, *([word] if word else []))


RESTORE_OPTION_ATTACKS = [
    (["--files-from=:/etc/passwd"], "--files-from"),
    (["--remove-source-files"], "--remove-source-files"),
    (["-M--log-file={m}"], "--log-file"),
    (["-L"], "-L"),
    (["--copy-dirlinks"], "-k"),
    (["--copy-unsafe-links"], "--copy-unsafe-links"),
    (["-M--write-batch={m}"], "--write-batch"),
    (["-s"], "-s"),
    # -A is no longer here: ACLs restore with rsync >= 3.5.0 (CVE-2026-53799 fixed);
    # tests/integration/test_original_client_files.py restores them for real.
    (["--delete", "-M--delete"], "--delete"),
]


@BOTH_RECEIVERS
@pytest.mark.parametrize("args,word", RESTORE_OPTION_ATTACKS, ids=[" ".join(a) for a, _ in RESTORE_OPTION_ATTACKS])
def test_dangerous_rsync_options_on_restore_are_refused(world, args, word, tmp_path):
    args = [a.format(m=world.marker) for a in args]
    proc = world.rsync("-a", *args, world.login(f"{world.snapshot}/{world.stored_file}"), f"{tmp_path}/")
    assert_rsync_refused(world, proc, word)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


@BOTH_RECEIVERS
def test_remove_source_files_cannot_empty_current(world, tmp_path):
    current_file = world.store / "client1" / "current" / world.stored_file
    assert current_file.exists()
    proc = world.rsync("-a", "--remove-source-files", world.login(f"current/{world.stored_file}"),
                       f"{tmp_path}/")
    assert_rsync_refused(world, proc, "--remove-source-files")
    assert current_file.exists(), world.log()


@pytest.mark.parametrize("command,word", [
    (f"{PUSH} --rsh=/bin/sh . current/", "--rsh"),
    (f"{PUSH} --rsync-path /bin/sh . current/", "--rsync-path"),
    (f"{PUSH} --log-file /tmp/x . current/", "--log-file"),
    (f"{PUSH} --write-batch=/tmp/x . current/", "--write-batch"),
    (f"{PUSH} --read-batch /etc/passwd . current/", "--read-batch"),
    (f"{PUSH} --backup-dir=../client2/current . current/", "--backup-dir"),
    (f"{PUSH} --partial-dir /tmp . current/", "--partial-dir"),
    (f"{PUSH} --temp-dir=/tmp . current/", "--temp-dir"),
    (f"{PUSH} -T /tmp . current/", "-T"),
    (f"{PUSH} --link-dest /etc . current/", "--link-dest"),
    (f"{PUSH} --copy-dest=/etc . current/", "--copy-dest"),
    (f"{PUSH} --compare-dest /etc . current/", "--compare-dest"),
    (f"{PUSH} --files-from /etc/passwd . current/", "--files-from"),
    (f"{SEND} --remove-source-files . current/x", "--remove-source-files"),
    (f"{PUSH} --daemon . current/", "--daemon"),
    (f"{PUSH} --config /etc/passwd . current/", "--config"),
    (f"{PUSH} --server . current/", "--server"),
    ("rsync --server -e.iLs --sender . current/x", "--sender"),
    (f"{PUSH} . current/ ../client2/current/", "exactly one destination"),
    (f"{PUSH} .", "exactly one destination"),
    (f"{PUSH} -e.iLs . current/", "capability"),
])
@BOTH_RECEIVERS
def test_dangerous_rsync_options_spelt_out_are_refused(world, command, word):
    assert_refused(world, world.ssh(command), word)


# === 3. Paths: another host, a snapshot, outside the store =========================

@pytest.mark.parametrize("destination", [
    "../client2/current/", "client2/current/", "{store}/client2/current/", "{snap}/",
    "../client2/{snap2}/", "/etc/", "/tmp/", ".ssh/", "../.ssh/", "../.byteback/history/",
    "current/../../client2/current/",
])
@BOTH_RECEIVERS
def test_a_push_lands_in_its_own_current_whatever_path_it_names(world, destination):
    destination = destination.format(store=world.store, snap=world.snapshot, snap2=world.client2_snapshot)
    src = _small_tree(world, "path")
    name = next(src.iterdir()).name
    proc = world.rsync("-a", f"{src}/", world.login(destination))
    assert proc.returncode == 0, f"{proc}\n{world.log()}"
    own = world.store / "client1" / "current" / name
    assert own.read_text() == "written by an attack\n", world.log()
    own.unlink()
    for elsewhere in (world.store / "client2" / "current" / name, Path("/etc") / name, Path("/tmp") / name,
                      world.store / ".ssh" / name, world.store / "client1" / world.snapshot / name):
        assert not elsewhere.exists(), f"{elsewhere}\n{world.log()}"


@pytest.mark.parametrize("source", [
    "../client2/current/", "../client2/{snap2}/", "client2/{snap2}/", "{store}/client2/current/",
    "/etc/passwd", "{snap}/../../client2/{snap2}/", "current/../../client2/current/",
    "../.ssh/authorized_keys", ".ssh/authorized_keys", "../.byteback/history/",
    ".byteback/", "*/", "../*/current/", ".incomplete-{snap}/",
])
@BOTH_RECEIVERS
def test_a_restore_cannot_read_another_host_or_the_server(world, source, tmp_path):
    source = source.format(store=world.store, snap=world.snapshot, snap2=world.client2_snapshot)
    proc = world.rsync("-a", world.login(source), f"{tmp_path}/")
    assert_rsync_refused(world, proc)
    assert not any(tmp_path.iterdir()), list(tmp_path.iterdir())


@pytest.mark.parametrize("path", [
    "current/.\\./.\\./client2/current/", "current/[.][.]/[.][.]/client2/current/",
    "current/.*/.*/client2/current/", "current/*/../../client2/current/",
])
@BOTH_RECEIVERS
def test_escapes_and_globs_do_not_climb_out(world, path, tmp_path):
    """Backslashes and wildcards reach the server's rsync: they must not make a '..'."""
    got = world.rsync("-a", world.login(path), f"{tmp_path}/")
    assert got.returncode != 0, f"{got}\n{world.log()}"
    for p in tmp_path.rglob("*"):
        assert not (p.is_file() and "tree 22" in p.read_text(errors="replace")), p


@BOTH_RECEIVERS
def test_a_restore_of_its_own_snapshot_works(world, tmp_path):
    """The control: the same door, used as the client does, gives the file back."""
    proc = world.rsync("-a", world.login(f"{world.snapshot}/{world.stored_file}"), f"{tmp_path}/")
    assert proc.returncode == 0, f"{proc}\n{world.log()}"
    assert (tmp_path / "secret.txt").read_text().startswith("changed"), world.log()


# === 4. Symlinks uploaded in current, then written through =========================

@BOTH_RECEIVERS
def test_symlinks_in_current_cannot_be_written_through(world):
    src = world.env.workdir / f"links-{secrets.token_hex(3)}"
    src.mkdir()
    targets = {"to-etc": "/etc", "to-client2": "../../client2/current",
               "to-client2-abs": str(world.store / "client2" / "current"),
               "to-snapshot": f"../../{world.snapshot}", "to-tmp": "/tmp"}
    for name, target in targets.items():
        os.symlink(target, src / name)
    assert world.rsync("-a", f"{src}/", world.login("current/")).returncode == 0, world.log()
    current = world.store / "client1" / "current"
    for name in targets:
        stored = current / name
        st = os.lstat(stored)
        # fake-super keeps a symlink as a plain file holding its munged target,
        # and --munge-links would munge a real one: nothing here can be followed.
        if os.path.islink(stored):
            assert os.readlink(stored).encode().startswith(MUNGED), name
        else:
            assert stored.read_bytes().startswith(MUNGED), (name, stored.read_bytes())
        assert not (os.path.isdir(stored) and not os.path.islink(stored)), (name, st)
    token = secrets.token_hex(4)
    # Second push: directories of the same names, with a file in each; and the
    # same written "through" the link by naming it as the destination.
    src2 = world.env.workdir / f"through-{token}"
    for name in targets:
        (src2 / name).mkdir(parents=True)
        (src2 / name / f"pwned-{token}").write_text("through a planted link\n")
    world.rsync("-a", f"{src2}/", world.login("current/"))
    world.rsync("-aR", f"{src2}/./to-etc/pwned-{token}", world.login("current/"))
    for name in targets:
        single = world.env.workdir / f"single-{token}"
        single.mkdir(exist_ok=True)
        (single / f"pwned-{token}").write_text("named destination\n")
        world.rsync("-a", f"{single}/", world.login(f"current/{name}/"))
        world.rsync("-a", "--keep-dirlinks", f"{single}/", world.login(f"current/{name}/"))
    for outside in (Path("/etc"), Path("/tmp"), world.store / "client2" / "current",
                    world.store / "client1" / world.snapshot, world.store / "client1", world.store):
        assert not (outside / f"pwned-{token}").exists(), f"{outside}\n{world.log()}"
    found = [str(p) for p in world.store.rglob(f"pwned-{token}")]
    assert found, "the second push should have written its files (into current)"
    assert all(p.startswith(str(current) + "/") for p in found), found


@BOTH_RECEIVERS
def test_modes_a_client_uploads_do_not_open_its_backups_to_other_local_users(world):
    src = world.env.workdir / f"modes-{secrets.token_hex(3)}"
    (src / "open-dir").mkdir(parents=True)
    os.chmod(src / "open-dir", 0o1777)
    (src / "open-file").write_text("anyone may write this on the client\n")
    os.chmod(src / "open-file", 0o666)
    assert world.rsync("-a", f"{src}/", world.login("current/")).returncode == 0, world.log()
    current = world.store / "client1" / "current"
    snapshot_file = world.store / "client1" / world.snapshot / world.stored_file
    wrote = run(["runuser", "-u", "nobody", "--", "sh", "-c",
                 f"echo local >> {current}/open-file; echo local > {current}/open-dir/planted"], check=False)
    read = run(["runuser", "-u", "nobody", "--", "cat", str(snapshot_file)], check=False)
    assert wrote.returncode != 0 and not (current / "open-dir" / "planted").exists(), (
        f"another local user wrote into client1's current: {wrote}")
    assert read.returncode != 0, f"another local user read client1's snapshot: {read.stdout!r}"


# === 5. complete flooding, and one session per host ================================

@BOTH_RECEIVERS
def test_complete_flooding_gives_at_most_one_snapshot_per_interval(world):
    """min_interval is 1h.  client1 has a fresh snapshot: none; client3 has none: exactly one."""
    world.allowed_new = ["client3/"]
    key3 = world.client3_config / "key"
    before1 = sorted(os.listdir(world.store / "client1"))
    results = [world.ssh("complete").returncode for _ in range(4)]
    assert results == [1] * 4, world.log()
    results = [world.ssh("complete", key=key3) for _ in range(6)]
    assert results[0].returncode == 0, f"{results[0]}\n{world.log()}"
    for proc in results[1:]:
        assert proc.returncode == 1 and "minimum interval" in proc.stderr, f"{proc}\n{world.log()}"
    procs = [subprocess.Popen(ssh_argv(port=world.env.port, known_hosts=world.env.known_hosts, key=key,
                                       host=world.env.host, user=world.login_of(key)) + ["--", "complete"],
                              stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              env=_client_env(None))
             for key in [key3] * 4 + [world.key] * 4]
    codes = [p.wait(timeout=60) for p in procs]
    for p in procs:
        p.stdout.close()
        p.stderr.close()
    assert all(c == 1 for c in codes), codes
    snaps3 = [n for n in os.listdir(world.store / "client3") if SNAPSHOT_RE.match(n)]
    assert len(snaps3) == 1, snaps3
    assert sorted(os.listdir(world.store / "client1")) == before1


def _rsync_uid(w: World) -> int:
    """The uid client1's receiving rsync runs as: the shared user's, or with userns the first
    of its account's range (root of its namespace)."""
    if w.receiver != "userns":
        return w.env.user.uid
    for line in Path("/etc/subuid").read_text().splitlines():
        owner, first, count = line.split(":")
        if owner == w.login_user and int(count) >= 65536:
            return int(first)
    raise AssertionError(f"{w.login_user} has no range in /etc/subuid")


def _server_rsyncs(w: World) -> List[int]:
    pids = []
    for pid in pids_of_uid(_rsync_uid(w)):
        with contextlib.suppress(OSError):
            argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            if argv and argv[0].endswith(b"rsync") and b"--server" in argv:
                pids.append(pid)
    return pids


@contextlib.contextmanager
def open_session(w: World, command: str, key: Optional[Path] = None):
    """Hold a session of client1 (or key's host) open: a push whose client never speaks."""
    wait_for(lambda: not _server_rsyncs(w), 20, "earlier sessions to end")
    proc = subprocess.Popen(
        ssh_argv(port=w.env.port, known_hosts=w.env.known_hosts, key=key or w.key, host=w.env.host,
                 user=w.login_of(key)) + ["--", command],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=_client_env(None))
    try:
        wait_for(lambda: _server_rsyncs(w) or proc.poll() is not None, 20, "the server's rsync")
        assert proc.poll() is None, f"the session ended: {proc.returncode}\n{w.log()}"
        yield proc
    finally:
        stop_process(proc)
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        wait_for(lambda: not _server_rsyncs(w), 20, "the server's rsync to end with the session")


@BOTH_RECEIVERS
@pytest.mark.parametrize("held", ["push", "restore"])
def test_a_second_session_for_the_same_host_is_refused(world, held, tmp_path):
    command = f"{PUSH} . current/" if held == "push" else f"{SEND} . {world.snapshot}/{world.stored_file}"
    src = _small_tree(world, "second")
    with open_session(world, command):
        for verb in ("complete", "list /etc/**", f"{PUSH} . current/",
                     f"{SEND} . {world.snapshot}/{world.stored_file}"):
            proc = world.ssh(verb, timeout=30)
            what = f"{verb}: {proc}\n{world.log()}"
            assert proc.returncode == 1 and "another session" in proc.stderr, what
        pushed = world.rsync("-a", f"{src}/", world.login("current/"))
        assert pushed.returncode != 0 and "another session" in pushed.stderr, f"{pushed}\n{world.log()}"
        restored = world.rsync("-a", world.login(f"{world.snapshot}/{world.stored_file}"), f"{tmp_path}/")
        assert restored.returncode != 0 and "another session" in restored.stderr, world.log()
        # ping takes no lock: a client can always find out whether the server is there.
        assert world.ssh("ping").returncode == 0, world.log()
        # Another host is not held up by this one.
        assert world.ssh("list /x", key=world.client2_config / "key").returncode == 0, world.log()
    assert not (world.store / "client1" / "current" / "pwned-second").exists()


# === 6. Setup: host names, keys and addresses with injected options ================

def _public_key(w: World, name: str = "attacker") -> str:
    return w.env.new_key(name).public


def _setup_host(w: World, host: str, key_text: str, address: str = "127.0.0.1"):
    return w.sudo("setup-host", "--host", host, "--client-address", address, input=key_text)


@contextlib.contextmanager
def restore_keys_and_hosts(w: World):
    """For the xfail tests: whatever a successful injection added goes again."""
    keys = w.env.user.authorized_keys.read_text()
    hosts = set(os.listdir(w.store))
    try:
        yield
    finally:
        w.env.user.authorized_keys.write_text(keys)
        for name in set(os.listdir(w.store)) - hosts:
            current = w.store / name / "current"
            if current.exists():
                run(["btrfs", "subvolume", "delete", str(current)], check=False)
            shutil.rmtree(w.store / name, ignore_errors=True)


@pytest.mark.parametrize("host", [
    'a,command="/bin/sh"', "a\" b", "../x", "..", "x/..", "a/b", "-x", "--host", "a b", ".hidden",
    "a..b", "x" * 254, "", "client1;id", "$(id)", "a\nb", "café", "a\tb", "*",
])
def test_setup_host_refuses_bad_host_names(world, host):
    proc = _setup_host(world, host, _public_key(world))
    assert_failed(world, proc, f"setup-host --host {host!r}")


@pytest.mark.parametrize("make_key", [
    lambda k, o: f'command="/bin/sh" {k}',
    lambda k, o: f'restrict,command="/bin/sh" {k}',
    lambda k, o: f'from="*" {k}',
    lambda k, o: f'environment="LD_PRELOAD=/tmp/x.so" {k}',
    lambda k, o: f"{k}\n{o}",
    lambda k, o: f"{k}\ncommand=\"/bin/sh\" {o}",
    lambda k, o: "ssh-dss " + k.split()[1],
    lambda k, o: "ssh-foo " + k.split()[1],
    lambda k, o: "ssh-rsa " + k.split()[1],                      # the body says ed25519
    lambda k, o: "ssh-ed25519 AAAA!!!notbase64",
    lambda k, o: "ssh-ed25519 " + k.split()[1][:-8],
    lambda k, o: "ssh-ed25519",
    lambda k, o: "",
    lambda k, o: "-----BEGIN OPENSSH PRIVATE KEY-----\nb3BlbnNzaC1rZXktdjEAAAAA\n-----END OPENSSH PRIVATE KEY-----",
    lambda k, o: k.split()[0] + "\t" + k.split()[1] + "\x0bcommand=x",
], ids=["command", "restrict-command", "from", "environment", "two-lines", "second-line-options",
        "unknown-dss", "unknown-type", "mismatched-type", "bad-base64", "truncated", "no-body", "empty",
        "private-key", "vertical-tab"])
def test_setup_host_refuses_keys_with_options_or_garbage(world, make_key):
    key, other = _public_key(world), _public_key(world, "other")
    with restore_keys_and_hosts(world):
        proc = _setup_host(world, f"evil{secrets.token_hex(2)}", make_key(key, other))
        assert_failed(world, proc, "setup-host with a bad key")


def test_setup_host_writes_a_key_without_its_comment_whatever_the_comment_holds(world):
    """The original's keys say "byteback client key": spaces are fine, and no comment is kept."""
    key = _public_key(world)
    with restore_keys_and_hosts(world):
        host = f"spaced{secrets.token_hex(2)}"
        proc = _setup_host(world, host, key + ' comment with" quote" and,commas command="/bin/sh"')
        assert proc.returncode == 0, proc.stderr
        (line,) = [l for l in world.env.user.authorized_keys.read_text().splitlines() if host in l]
        assert line.endswith(f"--host {host}\" " + " ".join(key.split()[:2])), line


def test_setup_host_refuses_another_hosts_key_and_a_second_key_for_a_host(world):
    client1_key = Path(f"{world.key}.pub").read_text()
    assert_failed(world, _setup_host(world, "newhost", client1_key), "client1's key for a new host")
    assert_failed(world, _setup_host(world, "client2", _public_key(world)), "a new key for client2")


@pytest.mark.parametrize("address", [
    '127.0.0.1",command="/bin/sh', "127.0.0.1 ", "*", "127.0.0.1,*", "0.0.0.0/0", "::1/0",
    "localhost", "", "127.0.0.1\nssh-ed25519 AAAA",
])
def test_setup_host_refuses_bad_client_addresses(world, address):
    proc = _setup_host(world, f"evil{secrets.token_hex(2)}", _public_key(world), address)
    assert_failed(world, proc, f"setup-host --client-address {address!r}")


def test_setup_host_refuses_an_ipv6_scope_that_injects_options(world):
    with restore_keys_and_hosts(world):
        before = world.env.user.authorized_keys.read_text()
        proc = _setup_host(world, "evil-scope", _public_key(world),
                           '::1%x,127.0.0.1",port-forwarding,permitopen="127.0.0.1:22')
        after = world.env.user.authorized_keys.read_text()
        assert proc.returncode != 0 and after == before, f"authorized_keys now:\n{after}"


def _key_without_slash(w: World, name: str):
    for _ in range(40):
        key = w.env.new_key(name)
        if "/" not in key.public.split()[1]:
            return key
    pytest.fail("no ed25519 key without '/' in 40 tries")


def test_setup_host_refuses_an_ipv6_scope_that_adds_an_unrestricted_key(world):
    injected = _key_without_slash(world, "injected")
    body = " ".join(injected.public.split()[:2])
    with restore_keys_and_hosts(world):
        before = world.env.user.authorized_keys.read_text()
        proc = _setup_host(world, "evil-newline", _public_key(world), f"::1%x\n{body}\n#")
        shell = world.ssh("id -un", key=injected.path)
        after = world.env.user.authorized_keys.read_text()
        assert shell.stdout.strip() != world.env.user.name, (
            f"an unrestricted shell through the injected key:\n{after}\n{world.log()}")
        assert proc.returncode != 0 and after == before, f"authorized_keys now:\n{after}"


def test_setup_host_is_unreachable_from_the_client_key(world):
    assert_refused(world, world.ssh(f"sudo -n {world.remote.program} setup-host --host x "
                                    "--client-address 127.0.0.1"))
    assert_refused(world, world.ssh("setup-host --host x --client-address 127.0.0.1"))


# === 7. --store/--force through sudo, and a shell as byteback ======================

@pytest.mark.parametrize("args,kwargs,says", [
    (["snapshot", "--host", "client1", "--force"], {}, "cannot be used through sudo"),
    (["snapshot", "--host", "client1", "--fo"], {}, "cannot be used through sudo"),
    (["snapshot", "--force", "--host", "client1"], {}, "sudo:"),         # not the sudoers form
    (["snapshot", "--host", "client1", "--store", "/tmp"], {}, "cannot be used through sudo"),
    (["snapshot", "--host", "client1", "--st=/tmp"], {}, "cannot be used through sudo"),
    (["snapshot", "--host", "client2", "--force"], {}, "cannot be used through sudo"),
    (["snapshot", "--host", "client1", "--config-dir", "/tmp"], {}, "unrecognized arguments"),
    (["snapshot", "--host", "../client2"], {}, "not a valid host name"),
    (["snapshot", "--host", "client1"], {}, "minimum interval"),          # harmless: the interval holds
    (["snapshot", "--host", "client1"], {"env_prefix": ["env", "BYTEBACK_CONFIG_DIR=/tmp"]},
     "minimum interval"),                                                 # sudo drops the variable
    (["prune", "--force"], {}, "sudo:"),
    (["prune"], {}, "sudo:"),
    (["setup-server", "--store", "/tmp", "--user", "root"], {}, "sudo:"),
    (["--config-dir", "/tmp", "snapshot", "--host", "client1"], {"server_config": False}, "sudo:"),
    (["receive", "--host", "client2"], {}, "sudo:"),
])
def test_privileged_commands_through_sudo_take_no_overrides(world, args, kwargs, says):
    proc = world.sudo(*args, **kwargs)
    assert_failed(world, proc, f"sudo {args}")
    assert says in proc.stderr, f"{proc.stderr!r}\n{world.log()}"


def test_sudo_cannot_be_told_to_keep_the_environment(world):
    proc = world.env.run_as_user(["env", "BYTEBACK_CONFIG_DIR=/tmp", "sudo", "-n", "-E", str(world.remote.program),
                                  "--config-dir", str(world.remote.server_config), "snapshot", "--host",
                                  "client1", "--force"])
    assert_failed(world, proc, "sudo -E")
    proc = world.env.run_as_user(["sudo", "-n", "BYTEBACK_CONFIG_DIR=/tmp", str(world.remote.program),
                                  "--config-dir", str(world.remote.server_config), "snapshot", "--host",
                                  "client1"])
    assert_failed(world, proc, "sudo VAR=value")


def test_sudo_starts_the_systems_python_whatever_the_callers_path(world):
    """The zipapp's #! line looks python3 up on PATH, and sudo keeps the caller's PATH where
    sudoers sets no secure_path (as Arch's may not): byteback's own sudoers lines set it.  A
    file sorted before byteback's takes the system's secure_path away, as such a sudoers has."""
    user = world.env.user.name
    unset = Path("/etc/sudoers.d") / f"00-bbtest-no-secure-path-{user}"
    evil = world.as_user(f"d=$(mktemp -d) && printf '#!/bin/sh\\ntouch {world.marker}\\n' > $d/python3 && "
                         "chmod 755 $d/python3 && echo $d")
    assert evil.returncode == 0, evil
    bin_dir = evil.stdout.strip()
    try:
        unset.write_text(f"Defaults:{user} !secure_path\n")
        os.chmod(unset, 0o440)
        run(["visudo", "-cf", str(unset)])
        proc = world.sudo("snapshot", "--host", "client1", env_prefix=["env", f"PATH={bin_dir}:/usr/bin:/bin"])
        assert not world.marker.exists(), f"the caller's python3 ran as root: {proc}"
        assert "minimum interval" in proc.stderr, proc.stderr          # byteback itself ran
    finally:
        unset.unlink(missing_ok=True)
        shutil.rmtree(bin_dir, ignore_errors=True)
        world.marker.unlink(missing_ok=True)


SHELL_ON_HISTORY = [
    "btrfs property set -ts {s1} ro false",
    "btrfs property set -ts {s2} ro false",
    "btrfs property set -f -ts {s1} ro false",
    "btrfs subvolume delete {s1}",
    "btrfs subvolume delete {s2}",
    "rm -rf {s1}",
    "rm -f {s1}/{f}",
    "mv {s1} {h1}/renamed",
    "mv {s1} {h1}/current/moved",
    "mv {h1} {store}/client1-away",
    "mv {h2} {store}/.client2",
    "rmdir {h1}/current",
    "mv {h1}/current {h1}/old-current",
    "ln -sfT /tmp {h1}/current",
    "ln -s /tmp {store}/client4",
    "mkdir {store}/client4",
    "touch {s1}/new-file",
    "echo overwritten > {s1}/{f}",
    "echo appended >> {s1}/{f}",
    "truncate -s 0 {s1}/{f}",
    "chmod 777 {s1}/{f}",
    "touch -d 2000-01-01 {s1}/{f}",
    "python3 -c 'import os; os.setxattr(\"{s1}/{f}\", \"user.rsync.%stat\", b\"104755 0,0 0:0\")'",
    "python3 -c 'import os; os.removexattr(\"{s1}/{f}\", \"user.rsync.%stat\")'",
    "btrfs subvolume snapshot {s1} {h1}/2099-01-01T00:00+0000",
    "cp -a {h1}/current {h1}/2099-01-01T00:00+0000",
    "echo x >> {store}/.ssh/authorized_keys",
    "mv {store}/.ssh {store}/.ssh-away",
    "echo '[server]' > {cfg}/server.conf",
    "echo x >> {program}",
    "mv {program} {program}.away",
    "echo '{{}}' > {store}/.byteback/history/client1.json",
    "mv {store}/.byteback/run {store}/.byteback/run-away",
    "rm -f {store}/.byteback/store.lock",
    "mkdir -p {store}/.local/lib",                  # python's user site-packages, for root's sudo runs
    "ln -s /tmp {store}/.local",
    "touch {store}/.ssh/rc",
]


@pytest.mark.parametrize("template", SHELL_ON_HISTORY)
def test_a_shell_as_byteback_cannot_touch_history(world, template):
    h1, h2 = world.store / "client1", world.store / "client2"
    script = template.format(s1=h1 / world.snapshot, s2=h2 / world.client2_snapshot, h1=h1, h2=h2,
                             f=world.stored_file, store=world.store, cfg=world.remote.server_config,
                             program=world.remote.program)
    proc = world.as_user(script)
    assert_failed(world, proc, script)
    assert _ro(h1 / world.snapshot) == "ro=true" and _ro(h2 / world.client2_snapshot) == "ro=true"


# === 8. Issue 8: a second red team's attacks ========================================
#
# A host of the attacker's own ("evil1", set up like any client), so the
# autouse fingerprint checks that every other host's history and current
# stay byte-for-byte as they were whatever it uploads.

@dataclass
class Attacker:
    host: str
    config: Path

    @property
    def key(self) -> Path:
        return self.config / "key"


@pytest.fixture(scope="module")
def attacker(world) -> Attacker:
    config = world.env.workdir / "config-evil1"
    config.mkdir(mode=0o700)
    _setup_client(world.remote, config, "evil1")
    return Attacker("evil1", config)


@contextlib.contextmanager
def min_interval(w: World, value: str):
    """server.conf's min_interval for a while; back to the module's 1h afterwards."""
    w.remote.set_server_conf(min_interval=value)
    try:
        yield
    finally:
        w.remote.set_server_conf(min_interval="1h")


def attacker_backup(w: World, a: Attacker, src: Path):
    time.sleep(1.1)                      # snapshot names have one-second resolution
    return w.remote.run("backup", "--host", a.host, "--retry-delay", "1", "--source", str(src),
                        config_dir=a.config)


def history_of(w: World, host: str) -> List[dict]:
    import json
    return json.loads((w.store / ".byteback" / "history" / f"{host}.json").read_text())["backups"]


def disc_used(store: Path) -> int:
    """Bytes the store's filesystem uses, every copy counted (DUP metadata twice), after a sync."""
    run(["btrfs", "filesystem", "sync", str(store)])
    out = run(["btrfs", "filesystem", "df", "-b", str(store)]).stdout
    used = 0
    for kind, profile, number in re.findall(r"^(Data|Metadata|System)(?:\+\w+)?, (\w+): total=\d+, used=(\d+)",
                                            out, re.M):
        used += int(number) * (2 if profile in ("DUP", "RAID1", "RAID10") else 1)
    return used


FORGED_LINE = "\ninode 1 file offset 0 len {n} disk start 0 offset 0 gen 9 flags NONE"


def test_a_file_name_cannot_forge_what_a_backup_added(world, attacker):
    """Class 1: find-new printed names raw; a forged line made a 1-byte backup 10^15 bytes.

    The attacker's second to fourth backups each add one 1-byte file whose name
    forges a huge line, one just under the suspicion line, and one in a
    directory name; what they added must be their real, tiny cost, and the
    cron prune after them must delete nothing of any other host.
    """
    world.allowed_new = [f"{attacker.host}/"]
    src = world.env.workdir / f"forged-{secrets.token_hex(3)}"
    src.mkdir()
    (src / "one").write_bytes(b"x")
    names = [f"a{FORGED_LINE.format(n=10 ** 15)}",
             f"b{FORGED_LINE.format(n=2 * 10 ** 6)}\ninode 2 file offset 0 len {10 ** 9}",
             f"c{FORGED_LINE.format(n=10 ** 12)}/d"]
    with min_interval(world, "0"):
        attacker_backup(world, attacker, src).check()
        for name in names:
            (src / name).parent.mkdir(exist_ok=True)
            (src / name).write_bytes(b"y")
            attacker_backup(world, attacker, src).check()
    added = [b["added"] for b in history_of(world, attacker.host)[-len(names):]]
    assert all(0 < a < 1024 * 1024 for a in added), f"forged sizes were believed: {added}\n{world.log()}"
    prune = world.remote.server("prune")
    assert prune.returncode == 0, f"{prune}\n{world.log()}"
    status = world.remote.server("status", "--store", str(world.store), "--json")
    assert str(10 ** 15) not in status.stdout


def test_a_flood_of_xattrs_counts_in_what_the_backup_added(world, attacker):
    """Class 2 (the measure): empty files each with a 15 KB xattr used 212 MB, 'added' said 0."""
    world.allowed_new = [f"{attacker.host}/"]
    count, size = 1500, 15000
    with sshd_env.btrfs_mount("256M") as fs:          # ext4 keeps xattrs of at most a block
        src = fs / "flood"
        src.mkdir()
        for i in range(count):
            f = src / f"empty-{i}"
            f.touch()
            os.setxattr(f, "user.pad", bytes([i % 251]) * size)
        before = disc_used(world.store)
        with min_interval(world, "0"):
            attacker_backup(world, attacker, src).check()
        used = disc_used(world.store) - before
    added = history_of(world, attacker.host)[-1]["added"]
    assert added >= count * size, f"the xattrs were not counted: added {added}, the disc used {used} more"
    assert 0.6 * used <= added <= 1.6 * used, f"added {added} is far from what the disc used: {used}"


def test_a_list_pattern_cannot_keep_the_server_busy(world, attacker):
    """Class 3: two uploaded 255-character names and '*a*a*a*a' twice ran for weeks (~n^6)."""
    world.allowed_new = [f"{attacker.host}/"]
    src = world.env.workdir / f"long-names-{secrets.token_hex(3)}"
    (src / "d" / ("a" * 255)).mkdir(parents=True)
    (src / "d" / ("a" * 255) / ("a" * 254 + "z")).write_text("long\n")
    proc = world.rsync("-a", f"{src}/", world.login("current/"), key=attacker.key)
    assert proc.returncode == 0, f"{proc}\n{world.log()}"
    for pattern in ("/d/*a*a*a*a/*a*a*a*a/zz", "/d/**/*a*a*a*a/zz", "/**/*a*a?a*a/*a*a*a*z"):
        started = time.monotonic()
        listed = world.ssh(f"list --snapshot=current '{pattern}'", key=attacker.key, timeout=30)
        took = time.monotonic() - started
        assert listed.returncode == 0, f"{pattern}: {listed}\n{world.log()}"
        assert took < 10, f"{pattern}: the listing took {took:.1f}s"
    assert "a" * 254 + "z" in listed.stdout                 # the last one matches the file
    wait_for(lambda: not _server_processes(world, b"receive"), 10, "the listing processes to end")


def _server_processes(w: World, word: bytes) -> List[int]:
    """The byteback user's live processes with word in their command line."""
    return _processes_of(w.env.user.uid, word)


def _processes_of(uid: int, word: bytes) -> List[int]:
    """uid's live processes with word in their command line."""
    found = []
    for pid in pids_of_uid(uid):
        with contextlib.suppress(OSError):
            if word in Path(f"/proc/{pid}/cmdline").read_bytes():
                found.append(pid)
    return found



def test_a_snapshot_through_sudo_waits_for_the_push_of_its_host(world, attacker):
    """Class 8: `snapshot --host H` in the middle of H's push recorded half an upload as a backup."""
    world.allowed_new = [f"{attacker.host}/"]
    before = sorted(os.listdir(world.store / attacker.host))
    with min_interval(world, "0"), open_session(world, f"{PUSH} . current/", key=attacker.key):
        for _ in range(2):
            proc = world.sudo("snapshot", "--host", attacker.host)
            assert proc.returncode == 1 and "another session for host evil1" in proc.stderr, (
                f"{proc}\n{world.log()}")
        complete = world.ssh("complete", key=attacker.key)
        assert complete.returncode == 1 and "another session" in complete.stderr, f"{complete}\n{world.log()}"
    assert sorted(os.listdir(world.store / attacker.host)) == before


def test_the_callers_time_zone_never_reaches_a_snapshot_name(world, attacker):
    """Class 7: TZ=XXX-05:30:30 through sudo made names no pattern reads (invisible to everything)."""
    world.allowed_new = [f"{attacker.host}/"]
    before = set(os.listdir(world.store / attacker.host))
    with min_interval(world, "0"):
        for zone in ("XXX-05:30:30", "UTC+14", ":/etc/../tmp/zone"):
            time.sleep(1.1)
            proc = world.sudo("snapshot", "--host", attacker.host, env_prefix=["env", f"TZ={zone}", "LC_ALL=tr_TR"])
            assert proc.returncode == 0, f"TZ={zone}: {proc}\n{world.log()}"
    made = sorted(set(os.listdir(world.store / attacker.host)) - before)
    local = run(["date", "+%z"], env={"PATH": "/usr/bin:/bin"}).stdout.strip()   # /etc/localtime's zone
    assert len(made) == 3 and all(SNAPSHOT_RE.match(n) and n.endswith(local) for n in made), (made, local)


def test_an_unprivileged_local_user_cannot_hold_the_locks(world):
    """Class 6: the store lock was 0644; any local user could flock it and stop every snapshot and prune."""
    store_lock = world.store / ".byteback" / "store.lock"
    assert world.remote.server("prune").returncode == 0          # makes the lock file if need be
    session_lock = world.store / ".byteback" / "run" / "client1.lock"
    hold = ("import fcntl, os, sys\n"
            "for p in sys.argv[1:]:\n"
            "    try:\n"
            "        fd = os.open(p, os.O_RDONLY)\n"
            "        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
            "        print('held', p)\n"
            "    except OSError as e:\n"
            "        print('refused', p, e.strerror)\n")
    proc = run(["runuser", "-u", "nobody", "--", "python3", "-c", hold, str(store_lock), str(session_lock)],
               check=False)
    assert "held" not in proc.stdout, proc.stdout
    for lock in (store_lock, session_lock):
        if lock.exists():
            st = os.lstat(lock)
            assert stat.S_IMODE(st.st_mode) == 0o600, (lock, oct(st.st_mode))


def test_a_lock_file_someone_opened_while_it_was_0644_is_replaced(world):
    """An old store's 0644 lock, held open by a local user: the next prune makes a new one."""
    store_lock = world.store / ".byteback" / "store.lock"
    with contextlib.suppress(FileNotFoundError):
        store_lock.unlink()
    store_lock.touch(mode=0o644)
    os.chmod(store_lock, 0o644)
    holder = subprocess.Popen(["runuser", "-u", "nobody", "--", "python3", "-c",
                               "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(store_lock)!r}, os.O_RDONLY)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(120)\n"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        proc = world.remote.server("prune")
        assert proc.returncode == 0, f"{proc}\n{world.log()}"
        assert stat.S_IMODE(os.lstat(store_lock).st_mode) == 0o600
    finally:
        stop_process(holder)
        holder.stdout.close()


def test_what_a_byteback_shell_plants_in_run_never_fails_a_backup(world, attacker):
    """Class 11: a directory at run/<host>.dirty made the backup fail although its snapshot existed."""
    world.allowed_new = [f"{attacker.host}/"]
    run_dir = world.store / ".byteback" / "run"
    src = _small_tree(world, "planted")
    for plant in ("mkdir -p {r}/evil1.dirty/deep && touch {r}/evil1.dirty/deep/f",
                  "ln -sfn /etc/passwd {r}/evil1.dirty", "mkfifo {r}/evil1.dirty",
                  "rm -rf {r}/evil1.lock && mkdir {r}/evil1.lock", "ln -sfn /etc/shadow {r}/evil1.lock",
                  "rm -f {r}/evil1.lock && mkfifo {r}/evil1.lock"):
        world.as_user(f"rm -rf {run_dir}/evil1.dirty; " + plant.format(r=run_dir))
        before = len([n for n in os.listdir(world.store / attacker.host) if SNAPSHOT_RE.match(n)])
        with min_interval(world, "0"):
            proc = attacker_backup(world, attacker, src)
        after = len([n for n in os.listdir(world.store / attacker.host) if SNAPSHOT_RE.match(n)])
        assert proc.returncode == 0 and after == before + 1, f"{plant}: {proc}\n{world.log()}"
        assert not os.path.lexists(run_dir / "evil1.dirty"), plant
        assert stat.S_ISREG(os.lstat(run_dir / "evil1.lock").st_mode), plant
    assert Path("/etc/passwd").stat().st_uid == 0 and Path("/etc/shadow").stat().st_uid == 0


def test_a_session_lock_held_forever_shows_stuck_and_is_ended(world, attacker):
    """Classes 4 and 11: a silent push, or a shell holding the session lock, kept the host
    'running' (never late for Nagios) and stopped its backups for good."""
    world.allowed_new = [f"{attacker.host}/"]
    lock = world.store / ".byteback" / "run" / "evil1.lock"
    world.remote.set_server_conf(min_interval="1h", rsync_timeout="3")
    try:
        holder = subprocess.Popen(["runuser", "-u", world.env.user.name, "--", "flock", str(lock),
                                   "sleep", "300"], stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: lock.exists() and _lock_held(lock), 10, "the shell to hold the lock")
            time.sleep(4)
            status = world.remote.server("status", "--store", str(world.store), "--nagios",
                                         "--warning", "1000d", "--critical", "2000d")
            late = re.search(r"late \(([^)]*)\)", status.stdout)
            assert status.returncode >= 1 and "stuck (evil1)" in status.stdout, f"{status}"
            assert late and "evil1" in late.group(1).split(", "), f"{status}"     # never OK while stuck
            report = world.remote.server("status", "--store", str(world.store), "--json")
            import json
            host = json.loads(report.stdout)["hosts"]["evil1"]
            assert host["stuck"] and host["session_idle_seconds"] >= 3, host
            # The next session of the host ends the stuck one and goes ahead.
            listed = world.ssh("list --snapshot=current /x", key=attacker.key)
            assert listed.returncode == 0, f"{listed}\n{world.log()}"
            wait_for(lambda: not _lock_held(lock), 10, "the stuck holder to be gone")
        finally:
            stop_process(holder)
            for pid in _server_processes(world, b"sleep\x00300"):    # what the holder started
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)
        # A push whose client never speaks is ended by rsync's own --timeout.
        with open_session(world, f"{PUSH} . current/", key=attacker.key) as session:
            session.wait(15)
    finally:
        world.remote.set_server_conf(min_interval="1h")


def _lock_held(path: Path) -> bool:
    inode = str(os.stat(path).st_ino)
    return any(len(f) > 5 and f[1] == "FLOCK" and f[5].rsplit(":", 1)[-1] == inode
               for f in (line.split() for line in Path("/proc/locks").read_text().splitlines()))


def test_an_administrators_restore_elsewhere_drops_setuid_devices_and_owners(world, attacker, tmp_path):
    """Class 12: restoring a hostile client's files on the server brought a setuid-root binary
    and a 0666 device node back live."""
    world.allowed_new = [f"{attacker.host}/"]
    src = world.env.workdir / f"trojan-{secrets.token_hex(3)}"
    src.mkdir()
    shutil.copy("/bin/true", src / "rootshell")
    os.chown(src / "rootshell", 0, 0)
    os.chmod(src / "rootshell", 0o4755)
    os.mknod(src / "disk", 0o666 | stat.S_IFCHR, os.makedev(1, 3))
    (src / "shared").mkdir()
    os.chown(src / "shared", 1234, 0)
    os.chmod(src / "shared", 0o2777)
    with min_interval(world, "0"):
        attacker_backup(world, attacker, src).check()
    pattern = f"{src}/**"
    plain, same = tmp_path / "plain", tmp_path / "same"
    got = world.remote.server("restore", "--destination", str(world.store), "--host", attacker.host,
                              "--restore", "--to", str(plain), pattern)
    assert got.returncode == 0, f"{got}"
    assert "owners, set-id bits, device and special files" in got.stderr and "--same-owner" in got.stderr, got.stderr
    restored = plain / src.relative_to("/")
    st = os.lstat(restored / "rootshell")
    assert not st.st_mode & (stat.S_ISUID | stat.S_ISGID), oct(st.st_mode)
    assert not os.path.lexists(restored / "disk")
    assert os.lstat(restored / "shared").st_uid == 0 and not os.lstat(restored / "shared").st_mode & stat.S_ISGID
    kept = world.remote.server("restore", "--destination", str(world.store), "--host", attacker.host,
                               "--restore", "--same-owner", "--to", str(same), pattern)
    assert kept.returncode == 0 and "are not restored" not in kept.stderr, f"{kept}"
    again = same / src.relative_to("/")
    assert os.lstat(again / "rootshell").st_mode & stat.S_ISUID
    assert stat.S_ISCHR(os.lstat(again / "disk").st_mode)
    assert os.lstat(again / "shared").st_uid == 1234
    for tree in (plain, same):
        shutil.rmtree(tree)


# === 9. Issue 8, what was left: subvolumes planted in current, stuck roll-backs =====

@contextlib.contextmanager
def server_conf(w: World, **settings: str):
    """server.conf with these settings for a while; back to the module's min_interval 1h afterwards."""
    w.remote.set_server_conf(**settings)
    try:
        yield
    finally:
        w.remote.set_server_conf(min_interval="1h")


def _nested_ids(path: Path) -> List[str]:
    """The ids of the subvolumes inside the subvolume at path at any depth, as btrfs lists them."""
    top = re.search(r"Subvolume ID:\s*(\d+)", run(["btrfs", "subvolume", "show", str(path)]).stdout).group(1)
    parents = dict(re.findall(r"^ID (\d+) gen \d+ top level (\d+) ", run(["btrfs", "subvolume", "list", str(path)]
                                                                           ).stdout, re.M))
    inside, grown = set(), True
    while grown:
        more = {i for i, p in parents.items() if p == top or p in inside} - inside
        inside, grown = inside | more, bool(more)
    return sorted(inside)


def _plant_subvolumes(w: World, current: Path, junk_mib: int) -> None:
    """What a shell as byteback can do in a host's current: subvolumes, one inside another, with data."""
    proc = w.as_user(f"set -e; cd {current}; btrfs -q subvolume create hidden; "
                     "btrfs -q subvolume create hidden/deeper; mkdir -p 'odd\nname'; "
                     "btrfs -q subvolume create 'odd\nname/x'; "
                     f"dd if=/dev/urandom of=hidden/deeper/junk bs=1M count={junk_mib} status=none")
    assert proc.returncode == 0, f"the shell could not make subvolumes: {proc}"
    assert len(_nested_ids(current)) == 3


def test_subvolumes_planted_in_current_are_removed_at_the_snapshot_and_shown(world, attacker):
    """A subvolume in current was an empty directory in the snapshot while its data stayed in
    current, counted in no backup: the snapshot removes it (as root, by descriptors), counts it, warns."""
    world.allowed_new = [f"{attacker.host}/"]
    current = world.store / attacker.host / "current"
    src = _small_tree(world, "beside-planted")
    with min_interval(world, "0"):
        attacker_backup(world, attacker, src).check()
        _plant_subvolumes(world, current, 8)
        time.sleep(1.1)
        complete = world.ssh("complete", key=attacker.key)
    assert complete.returncode == 0, f"{complete}\n{world.log()}"
    assert complete.stderr.count("removed the subvolume") == 3 and "odd\\nname/x" in complete.stderr, complete
    assert _nested_ids(current) == [] and not (current / "hidden").exists(), os.listdir(current)
    newest = sorted(n for n in os.listdir(world.store / attacker.host) if SNAPSHOT_RE.match(n))[-1]
    assert not (world.store / attacker.host / newest / "hidden").exists()
    last = history_of(world, attacker.host)[-1]
    assert last["snapshot"] == newest and last["planted"] == 3 and last["planted_bytes"] >= 8 << 20, last
    status = world.remote.server("status", "--store", str(world.store), "--warning", "1000d",
                                 "--critical", "2000d")
    assert status.returncode >= 1, f"{status}"                               # at least a WARNING
    assert f"WARNING: host evil1: backup {newest}: 3 subvolumes in current" in status.stdout, f"{status}"
    # The next backup goes on as usual.
    with min_interval(world, "0"):
        attacker_backup(world, attacker, src).check()


def _small_backups(w: World, a: Attacker, name: str) -> None:
    """Small backups until the host has the history that makes a big upload stand out."""
    src = _small_tree(w, name)
    with min_interval(w, "0"):
        for n in range(max(1, 5 - len(history_of(w, a.host)) if (w.store / ".byteback" / "history" /
                                                                 f"{a.host}.json").exists() else 5)):
            (src / "step").write_text(f"{n}\n")
            attacker_backup(w, a, src).check()


def _dirty(w: World, host: str) -> None:
    """The marker an upload cut off half-way leaves (the backup user writes run/)."""
    marker = w.store / ".byteback" / "run" / f"{host}.dirty"
    proc = w.as_user(f"echo '{{\"since\": \"2026-01-01T00:00:00+00:00\"}}' > {marker}")
    assert proc.returncode == 0, proc


def test_an_upload_hidden_in_planted_subvolumes_is_rolled_back(world, attacker):
    """An unfinished upload whose bytes sit in subvolumes planted in current was invisible to
    prune (pending 0) and, once seen, current's deletion failed on them."""
    world.allowed_new = [f"{attacker.host}/"]
    current = world.store / attacker.host / "current"
    _small_backups(world, attacker, "before-hidden-upload")
    _plant_subvolumes(world, current, 120)
    _dirty(world, attacker.host)
    free = free_bytes(world.store)
    with server_conf(world, min_interval="1h", accept_budget="0%"):
        prune = world.remote.server("prune")
    assert prune.returncode == 0, f"{prune}\n{world.log()}"
    listing = world.remote.server("prune", "--list")
    assert "rolled back" in prune.stderr, prune.stderr + listing.stdout
    assert _nested_ids(current) == [] and not (current / "hidden").exists(), os.listdir(current)
    assert free_bytes(world.store) > free + (80 << 20), "the hidden upload's space did not come back"
    assert os.lstat(current).st_uid == world.env.user.uid


def test_a_session_lock_held_forever_does_not_stop_the_roll_back(world, attacker):
    """A shell holding a host's session lock forever kept an abandoned upload past the line on
    the disc: prune counted the host as running and never rolled it back."""
    world.allowed_new = [f"{attacker.host}/"]
    current = world.store / attacker.host / "current"
    lock = world.store / ".byteback" / "run" / f"{attacker.host}.lock"
    _small_backups(world, attacker, "before-held-upload")
    proc = world.as_user(f"dd if=/dev/urandom of={current}/junk bs=1M count=100 status=none")
    assert proc.returncode == 0, proc
    _dirty(world, attacker.host)
    with server_conf(world, min_interval="1h", accept_budget="0%", rsync_timeout="3"):
        holder = subprocess.Popen(["runuser", "-u", world.env.user.name, "--", "flock", str(lock),
                                   "sleep", "300"], stdin=subprocess.DEVNULL)
        try:
            wait_for(lambda: lock.exists() and _lock_held(lock), 10, "the shell to hold the lock")
            time.sleep(4)                                # idle past the I/O timeout: stuck
            prune = world.remote.server("prune")
            assert prune.returncode == 0, f"{prune}\n{world.log()}"
            assert "ending a stuck session" in prune.stderr and "rolled back" in prune.stderr, prune.stderr
            assert not (current / "junk").exists(), prune.stderr
            wait_for(lambda: not _lock_held(lock), 10, "the stuck holder to be gone")
        finally:
            stop_process(holder)
            for pid in _server_processes(world, b"sleep\x00300"):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, 9)


def test_complete_ends_within_its_time_limit_when_the_disc_stalls(world, attacker):
    """`complete` ran its snapshot and prune with no time limit: a stalled disc (here: frozen)
    or work without end kept the session, its root run and the host's locks for ever."""
    world.allowed_new = [f"{attacker.host}/"]
    host_dir = world.store / attacker.host
    before = set(os.listdir(host_dir))
    with server_conf(world, min_interval="0", rsync_timeout="3"):
        run(["fsfreeze", "--freeze", str(world.store)])
        try:
            started = time.monotonic()
            complete = world.ssh("complete", key=attacker.key, timeout=60)
            took = time.monotonic() - started
            sessions = _server_processes(world, b"receive")
        finally:
            run(["fsfreeze", "--unfreeze", str(world.store)])
        # 3 s for the root run, 10 s more for the session, then it ends without it.
        assert complete.returncode == 1 and "took longer than 13s" in complete.stderr, f"{complete}"
        assert took < 30 and not sessions, (took, sessions)
        wait_for(lambda: not _processes_of(0, f"snapshot\0--host\0{attacker.host}".encode()), 15,
                 "the root run to end once the disc moves again")
    made = {n for n in set(os.listdir(host_dir)) - before if SNAPSHOT_RE.match(n)}
    recorded = history_of(world, attacker.host) if (world.store / ".byteback" / "history" /
                                                    f"{attacker.host}.json").exists() else []
    assert made <= {b["snapshot"] for b in recorded}, made        # a snapshot whole, or not at all
    with min_interval(world, "0"):          # nothing of the stopped run stands in the way
        attacker_backup(world, attacker, _small_tree(world, "after-stall")).check()
