"""Real-sshd test environment for byteback's integration tests.

Builds, with real parts and root privileges, what DESIGN.md section 6 asks
for: a btrfs filesystem on a loop file, a throw-away server user whose home
is that filesystem, an ``sshd`` of our own on 127.0.0.1 and a free port, an
``ssh-agent`` holding an administrator key (for ``setup-client``), and small
helpers to run ``ssh``/``rsync`` as a client and commands as the server user.

Every piece is a context manager that cleans up even when the test fails,
and every subprocess has a timeout, so a broken test never hangs or leaves
mounts, loop devices, users or processes behind.

Sections:  1 constants, skip reason, running commands
           2 btrfs on a loop file          3 the server user
           4 sshd                          5 ssh keys and ssh-agent
           6 the client side (ssh, rsync)  7 the whole environment
           8 pytest fixtures

Use::

    from sshd_env import server_env, integration      # fixtures / marker
    @integration
    def test_x(server_env):
        key = server_env.new_key("client1")
        server_env.authorize(f'restrict,command="/bin/true" {key.public}')
        assert server_env.ssh("anything", key=key).returncode == 0

The fixtures are module-scoped: importing them into a test module gives that
module its own environment. Importing them into a ``conftest.py`` shares one
environment among the modules below it.
"""
from __future__ import annotations

import contextlib
import grp
import os
import pwd
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator, List, Mapping, Optional, Sequence, Union

import pytest

# === 1. Constants, skip reason, running commands ==============================

SSHD = "/usr/sbin/sshd"
LOCALHOST = "127.0.0.1"
DEFAULT_TIMEOUT = 60          # seconds, for any helper command
SSH_TIMEOUT = 30              # seconds, for one ssh/rsync client run
START_TIMEOUT = 15            # seconds to wait for sshd / ssh-agent to come up
Command = Union[str, Sequence[str]]

integration = pytest.mark.integration


def skip_reason() -> Optional[str]:
    """Why this machine cannot run the real-sshd tests, or None if it can."""
    if os.geteuid() != 0:
        return "needs root: mounts a btrfs loop file, adds a user, runs sshd"
    if not os.access(SSHD, os.X_OK):
        return f"{SSHD} missing: apt-get install -y openssh-server"
    if not os.path.exists("/dev/loop-control"):
        return "no loop devices (/dev/loop-control missing) to mount a btrfs file"
    return None


def require_tools() -> None:
    """Fail (not skip) with an install hint when a needed program is missing."""
    needed = {"ssh": "openssh-client", "ssh-keygen": "openssh-client",
              "ssh-agent": "openssh-client", "ssh-add": "openssh-client",
              "rsync": "rsync", "mkfs.btrfs": "btrfs-progs", "btrfs": "btrfs-progs",
              "losetup": "mount", "runuser": "util-linux",
              "useradd": "passwd", "userdel": "passwd"}
    missing = sorted({pkg for prog, pkg in needed.items() if shutil.which(prog) is None})
    if missing:
        pytest.fail("integration tests need: apt-get install -y " + " ".join(missing))


def run(argv: Sequence[str], *, timeout: float = DEFAULT_TIMEOUT, check: bool = True,
        input: Optional[Union[str, bytes]] = None, env: Optional[Mapping[str, str]] = None,
        cwd: Optional[Union[str, Path]] = None) -> subprocess.CompletedProcess:
    """Run argv (a list, never a shell) capturing text output, with a timeout.

    With check=True a non-zero exit raises AssertionError showing the command,
    its exit code and its output, which is what a failing test should print.
    """
    argv = [str(a) for a in argv]
    text = not isinstance(input, bytes)
    try:
        proc = subprocess.run(argv, input=input, capture_output=True, text=text,
                              timeout=timeout, env=None if env is None else dict(env),
                              cwd=cwd)
    except subprocess.TimeoutExpired as e:
        raise AssertionError(f"timed out after {timeout}s: {shlex.join(argv)}\n"
                             f"stdout: {e.stdout!r}\nstderr: {e.stderr!r}") from None
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {shlex.join(argv)}\n"
                             f"stdout: {proc.stdout}\nstderr: {proc.stderr}")
    return proc


def _tempdir(prefix: str, mode: int = 0o700) -> Path:
    """A new directory under the system temp dir with the given mode, owned by root."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, mode)
    return path


def wait_for(predicate, timeout: float, what: str) -> None:
    """Poll predicate() every 50 ms until it is true; fail after timeout seconds."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.05)


def _children_by_parent() -> dict:
    """Map ppid -> [pid] for every process, read from /proc."""
    tree: dict = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        # The command name may hold spaces or ')': ppid is the 2nd field after the last ')'.
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        tree.setdefault(ppid, []).append(int(entry))
    return tree


def descendants(pid: int) -> List[int]:
    """All processes below pid (children, grandchildren, ...)."""
    tree, found, todo = _children_by_parent(), [], [pid]
    while todo:
        for child in tree.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def pids_of_uid(uid: int) -> List[int]:
    """Live processes (not zombies) whose real uid is uid (read from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            status = dict(line.split(":", 1) for line in
                          Path(f"/proc/{entry}/status").read_text().splitlines() if ":" in line)
        except OSError:
            continue
        if int(status["Uid"].split()[0]) == uid and not status["State"].strip().startswith("Z"):
            pids.append(int(entry))
    return pids


def is_alive(pid: int) -> bool:
    """True if pid exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def kill_pids(pids: Iterable[int], timeout: float = 5) -> None:
    """SIGTERM the given processes, then SIGKILL those still alive after timeout."""
    pids = list(pids)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, sig)
        deadline = time.monotonic() + timeout
        while any(is_alive(p) for p in pids) and time.monotonic() < deadline:
            time.sleep(0.05)
        pids = [p for p in pids if is_alive(p)]
        if not pids:
            return


def stop_process(proc: subprocess.Popen, timeout: float = 5) -> None:
    """Terminate a Popen child we started (SIGTERM, then SIGKILL) and reap it."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


# === 2. btrfs on a loop file ==================================================

def mounted_at(path: Union[str, Path]) -> bool:
    """True if something is mounted exactly at path (from /proc/mounts)."""
    target = os.path.realpath(path)
    with open("/proc/mounts") as f:
        # /proc/mounts escapes spaces as \040; our temp paths have none.
        return any(line.split()[1] == target for line in f)


def loop_devices_of(image: Union[str, Path]) -> List[str]:
    """Loop devices currently backed by image (from losetup -j)."""
    out = run(["losetup", "-j", str(image)], check=False).stdout
    return [line.split(":", 1)[0] for line in out.splitlines() if line.strip()]


def free_bytes(path: Union[str, Path]) -> int:
    """The free space of the btrfs holding path, once what was written is on disc."""
    run(["btrfs", "filesystem", "sync", str(path)])
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


@contextlib.contextmanager
def btrfs_mount(size: Union[str, int] = "512M", *, mkfs_args: Sequence[str] = (),
                mount_options: str = "") -> Iterator[Path]:
    """Yield the mount point of a fresh btrfs on a sparse loop file of ``size``.

    ``size`` is bytes or a truncate(1) size such as "512M". The mount point is
    root:root 0755 and its parent directory is traversable, so it can be a
    user's home. On exit (also after a failure): unmount (lazily if busy),
    detach the loop device, forget it in btrfs, and delete the files.
    """
    base = _tempdir("bbtest-btrfs-", 0o755)
    image, mnt = base / "image", base / "mnt"
    mnt.mkdir(mode=0o755)
    device = None
    try:
        run(["truncate", "-s", str(size), image])
        os.chmod(image, 0o600)
        run(["mkfs.btrfs", "-q", "-f", *mkfs_args, image], timeout=120)
        device = run(["losetup", "--find", "--show", image]).stdout.strip()
        opts = ["-o", mount_options] if mount_options else []
        run(["mount", "-t", "btrfs", *opts, device, mnt])
        os.chown(mnt, 0, 0)
        os.chmod(mnt, 0o755)
        yield mnt
    finally:
        _teardown_btrfs(base, image, mnt, device)


def _teardown_btrfs(base: Path, image: Path, mnt: Path, device: Optional[str]) -> None:
    """Unmount, detach and delete; raise after trying everything if any step failed."""
    problems = []
    if mounted_at(mnt):
        if run(["umount", mnt], check=False).returncode != 0:
            # Busy (an open file, a process's cwd): detach it from the tree now,
            # the kernel frees it when the last user goes away.
            lazy = run(["umount", "-l", mnt], check=False)
            if lazy.returncode != 0:
                problems.append(f"umount -l {mnt}: {lazy.stderr.strip()}")
    for dev in set(filter(None, [device])) | set(loop_devices_of(image)):
        # On a still-busy device (lazy unmount) this sets autoclear instead.
        detach = run(["losetup", "-d", dev], check=False)
        if detach.returncode != 0 and dev in loop_devices_of(image):
            problems.append(f"losetup -d {dev}: {detach.stderr.strip()}")
        run(["btrfs", "device", "scan", "--forget", dev], check=False)
    if mounted_at(mnt):
        problems.append(f"{mnt} is still mounted")
    else:
        shutil.rmtree(base, ignore_errors=True)
    if problems:
        raise RuntimeError("btrfs_mount teardown: " + "; ".join(problems))


# === 3. The server user =======================================================

@dataclass(frozen=True)
class ServerUser:
    """A throw-away system user whose home is the store (DESIGN.md section 3)."""
    name: str
    uid: int
    gid: int
    home: Path

    @property
    def ssh_dir(self) -> Path:
        return self.home / ".ssh"

    @property
    def authorized_keys(self) -> Path:
        return self.ssh_dir / "authorized_keys"

    def add_authorized_key(self, line: str) -> None:
        """Append one authorized_keys line (see append_authorized_key)."""
        append_authorized_key(self, line)

    def run(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run argv as this user (see run_as)."""
        return run_as(self, argv, **kwargs)


def unique_user_name(prefix: str = "bbtest") -> str:
    """A user name that will not clash with a real ``byteback`` user."""
    return prefix + secrets.token_hex(4)


def _passwd_tool(argv: Sequence[str]) -> subprocess.CompletedProcess:
    """Run useradd/userdel/groupdel, retrying for up to 10 s while busy."""
    for _ in range(50):
        proc = run(argv, check=False)
        # Retry while another useradd holds /etc/passwd's lock, or while a
        # just-killed session of the user is still an unreaped zombie.
        busy = "lock" in proc.stderr.lower() or "currently used" in proc.stderr
        if proc.returncode == 0 or not busy:
            break
        time.sleep(0.2)
    if proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}: {shlex.join(argv)}: {proc.stderr.strip()}")
    return proc


@contextlib.contextmanager
def server_user(home: Path, name: Optional[str] = None,
                shell: str = "/bin/sh") -> Iterator[ServerUser]:
    """Create a system user with ``home`` (not created, made root:root 0755).

    Also creates ``home/.ssh/`` (root, 0755) and an empty
    ``authorized_keys`` (root, 0644), as setup-server would. The password
    field is ``*`` (no password but not locked): with ``UsePAM no`` sshd
    refuses every login to an account whose password starts with ``!``,
    which is what Debian's useradd sets. On exit the user's leftover
    processes are killed and the user and its group removed.
    """
    name = name or unique_user_name()
    _passwd_tool(["useradd", "--system", "--user-group", "--no-create-home",
                  "--home-dir", str(home), "--shell", shell, "--password", "*", name])
    try:
        entry = pwd.getpwnam(name)
        user = ServerUser(name, entry.pw_uid, entry.pw_gid, Path(home))
        os.chown(home, 0, 0)
        os.chmod(home, 0o755)
        user.ssh_dir.mkdir(mode=0o755, exist_ok=True)
        os.chown(user.ssh_dir, 0, 0)
        user.authorized_keys.touch(mode=0o644)
        os.chown(user.authorized_keys, 0, 0)
        os.chmod(user.authorized_keys, 0o644)
        yield user
    finally:
        remove_host_accounts(Path(home))
        with contextlib.suppress(KeyError):
            kill_pids(pids_of_uid(pwd.getpwnam(name).pw_uid))
        _passwd_tool(["userdel", name])
        with contextlib.suppress(KeyError):
            grp.getgrnam(name)
            _passwd_tool(["groupdel", name])


def remove_host_accounts(store: Path) -> None:
    """Remove the hosts' own accounts setup-host made for a store (receiver = userns): each
    user whose home is below it, with its processes, group, id ranges and sudo lines."""
    for entry in pwd.getpwall():
        if os.path.dirname(os.path.abspath(entry.pw_dir)) != os.path.abspath(store):
            continue
        kill_pids(pids_of_uid(entry.pw_uid))
        _passwd_tool(["userdel", entry.pw_name])      # its /etc/subuid, /etc/subgid lines go too
        with contextlib.suppress(KeyError):
            grp.getgrnam(entry.pw_name)
            _passwd_tool(["groupdel", entry.pw_name])
        with contextlib.suppress(FileNotFoundError):
            os.unlink(f"/etc/sudoers.d/byteback-host-{entry.pw_name}")


def append_authorized_key(user: ServerUser, line: str) -> None:
    """Append one line (e.g. ``restrict,command="..." ssh-ed25519 AAAA...``).

    Written as root; the file stays root-owned 0644 as in DESIGN.md section 3.
    """
    if "\n" in line.strip():
        raise ValueError("an authorized_keys entry is one line")
    with open(user.authorized_keys, "a") as f:
        f.write(line.strip() + "\n")


def run_as(user: Union[ServerUser, str], argv: Sequence[str], *,
           timeout: float = DEFAULT_TIMEOUT, check: bool = False,
           cwd: Optional[Union[str, Path]] = None,
           input: Optional[str] = None) -> subprocess.CompletedProcess:
    """Run argv as the user via ``runuser`` (a shell as the byteback user).

    For shell syntax pass ``["sh", "-c", "..."]``. The working directory
    defaults to the user's home. Returns the CompletedProcess (check=False by
    default, since these tests mostly expect refusals).
    """
    name = user.name if isinstance(user, ServerUser) else user
    if cwd is None and isinstance(user, ServerUser):
        cwd = user.home
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "LC_ALL": "C"}
    return run(["runuser", "-u", name, "--", *argv], timeout=timeout, check=check,
               cwd=cwd, env=env, input=input)


# === 4. sshd ==================================================================

def free_port(host: str = LOCALHOST) -> int:
    """A TCP port on host that nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass
class Sshd:
    """A running sshd of our own: where it listens, its host key, its log."""
    host: str
    port: int
    host_public_key: str        # "ssh-ed25519 AAAA..." (no comment)
    log_path: Path
    config_path: Path
    process: subprocess.Popen = field(repr=False)

    @property
    def pid(self) -> int:
        return self.process.pid

    def known_hosts_line(self) -> str:
        """The known_hosts entry that pins this server's host key."""
        return f"[{self.host}]:{self.port} {self.host_public_key}"

    def write_known_hosts(self, path: Union[str, Path]) -> Path:
        """Write a known_hosts file holding only this server's key; return path."""
        Path(path).write_text(self.known_hosts_line() + "\n")
        return Path(path)

    def log_text(self) -> str:
        """The whole sshd log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, lines: int = 30) -> str:
        """The last lines of the sshd log, for assertion messages."""
        return "--- sshd log (tail) ---\n" + "\n".join(self.log_text().splitlines()[-lines:])


# Newer sshd options that would bite tests making many failing connections
# quickly (OpenSSH >= 9.8 penalises such sources); used only if understood.
_OPTIONAL_SSHD_OPTIONS = ("PerSourcePenalties no", "PerSourceMaxStartups none")


def sshd_config_text(*, host: str, port: int, host_key: Path, pid_file: Path,
                     allow_users: Sequence[str], extra: Sequence[str] = ()) -> str:
    """The config of a test sshd: keys only, no PAM, no user environment."""
    lines = [
        f"ListenAddress {host}",
        f"Port {port}",
        f"HostKey {host_key}",
        f"PidFile {pid_file}",
        "UsePAM no",
        "PasswordAuthentication no",
        "KbdInteractiveAuthentication no",
        "PubkeyAuthentication yes",
        "PermitRootLogin no",
        "PermitUserEnvironment no",
        # The home and .ssh are root-owned (DESIGN.md section 3), which passes.
        "StrictModes yes",
        "AuthorizedKeysFile .ssh/authorized_keys",
        "AllowUsers " + " ".join(allow_users),
        "LogLevel VERBOSE",
        "UseDNS no",
        "PrintMotd no",
        "X11Forwarding no",
        "AcceptEnv none",
        "LoginGraceTime 30",
        # The hostile-client suite opens many connections in a row.
        "MaxStartups 100:30:200",
        *extra,
    ]
    return "\n".join(lines) + "\n"


def _sshd_understands(config: Path, option: str) -> bool:
    """True if this sshd accepts ``option`` (tested with sshd -t)."""
    key, value = option.split(None, 1)
    return run([SSHD, "-t", "-f", config, "-o", f"{key}={value}"], check=False).returncode == 0


def _banner_ready(host: str, port: int) -> bool:
    """True once something on host:port answers with an SSH banner."""
    try:
        with socket.create_connection((host, port), timeout=1) as s:
            return s.recv(64).startswith(b"SSH-")
    except OSError:
        return False


@contextlib.contextmanager
def sshd_server(allow_users: Sequence[str], *, host: str = LOCALHOST,
                port: Optional[int] = None,
                extra_config: Sequence[str] = ()) -> Iterator[Sshd]:
    """Run ``sshd -D -f cfg -E log`` on host and a free port; yield an Sshd.

    Its config, ed25519 host key, pid file and log live in a fresh temp
    directory. Waits until the port gives an SSH banner. On exit kills the
    listener and every session process below it.
    """
    os.makedirs("/run/sshd", mode=0o755, exist_ok=True)   # privilege separation dir
    work = _tempdir("bbtest-sshd-")
    host_key, config, log = work / "ssh_host_ed25519_key", work / "sshd_config", work / "sshd.log"
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", "bbtest-host", "-f", host_key])
    host_public_key = " ".join(Path(f"{host_key}.pub").read_text().split()[:2])
    proc = None
    try:
        for attempt in range(5):   # another process may take a "free" port first
            chosen = port or free_port(host)
            text = sshd_config_text(host=host, port=chosen, host_key=host_key,
                                    pid_file=work / "sshd.pid", allow_users=allow_users,
                                    extra=extra_config)
            config.write_text(text)
            optional = [o for o in _OPTIONAL_SSHD_OPTIONS if _sshd_understands(config, o)]
            config.write_text(text + "".join(o + "\n" for o in optional))
            checked = run([SSHD, "-t", "-f", config], check=False)
            if checked.returncode != 0:
                raise AssertionError(f"sshd -t rejects {config}:\n{checked.stderr}\n{text}")
            proc = subprocess.Popen([SSHD, "-D", "-f", str(config), "-E", str(log)],
                                    stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.PIPE)
            deadline = time.monotonic() + START_TIMEOUT
            while proc.poll() is None and not _banner_ready(host, chosen):
                if time.monotonic() > deadline:
                    raise AssertionError(f"sshd did not answer on {host}:{chosen} within "
                                         f"{START_TIMEOUT}s\n{log.read_text(errors='replace')}")
                time.sleep(0.05)
            if proc.poll() is None:
                break
            logged = log.read_text(errors="replace") if log.exists() else ""
            logged += proc.stderr.read().decode(errors="replace")
            proc.stderr.close()
            if port is not None or "Address already in use" not in logged or attempt == 4:
                raise AssertionError(f"sshd exited with {proc.returncode}\n{logged}")
            proc = None
        yield Sshd(host, chosen, host_public_key, log, config, proc)
    finally:
        if proc is not None:
            sessions = descendants(proc.pid)
            stop_process(proc)
            kill_pids(sessions)
            if proc.stderr is not None:
                proc.stderr.close()
        shutil.rmtree(work, ignore_errors=True)


# === 5. ssh keys and ssh-agent ================================================

@dataclass(frozen=True)
class SshKey:
    """An ssh key pair on disc: the private key file and the public line."""
    path: Path
    public: str      # "ssh-ed25519 AAAA... comment"


def generate_key(path: Union[str, Path], comment: str = "bbtest") -> SshKey:
    """Create an unencrypted ed25519 key at path (0600) and path.pub."""
    path = Path(path)
    run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", comment, "-f", path])
    return SshKey(path, Path(f"{path}.pub").read_text().strip())


@dataclass
class SshAgent:
    """A running ssh-agent: its socket (SSH_AUTH_SOCK) and process."""
    sock: Path
    process: subprocess.Popen = field(repr=False)

    def add(self, key: Union[SshKey, Path]) -> None:
        """Load a private key into the agent."""
        path = key.path if isinstance(key, SshKey) else key
        run(["ssh-add", "-q", path], env=self.env())

    def env(self, base: Optional[Mapping[str, str]] = None) -> dict:
        """An environment (default: os.environ) with SSH_AUTH_SOCK pointing here."""
        env = dict(os.environ if base is None else base)
        env["SSH_AUTH_SOCK"] = str(self.sock)
        return env


@contextlib.contextmanager
def ssh_agent() -> Iterator[SshAgent]:
    """Run ``ssh-agent -D -a SOCK`` in a private temp dir; kill it on exit."""
    work = _tempdir("bbtest-agent-")
    sock = work / "agent.sock"
    proc = subprocess.Popen(["ssh-agent", "-D", "-a", str(sock)], stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: sock.exists() or proc.poll() is not None, START_TIMEOUT,
                  "ssh-agent socket")
        if proc.poll() is not None:
            raise AssertionError(f"ssh-agent exited with {proc.returncode}")
        yield SshAgent(sock, proc)
    finally:
        stop_process(proc)
        shutil.rmtree(work, ignore_errors=True)


# === 6. The client side (ssh, rsync) ==========================================

def ssh_argv(*, port: int, known_hosts: Union[str, Path], key: Optional[Union[SshKey, Path]] = None,
             host: str = LOCALHOST, user: Optional[str] = None,
             options: Sequence[str] = ()) -> List[str]:
    """The ssh command line a byteback client uses, without the remote command.

    Ignores every ssh_config (-F /dev/null) and uses only ``key`` (or, without
    a key, the agent), the given known_hosts with StrictHostKeyChecking=yes and
    BatchMode=yes. With user=None the ``user@host`` argument is left off, as
    rsync's ``-e`` needs.
    """
    argv = ["ssh", "-F", "/dev/null", "-p", str(port),
            "-o", "BatchMode=yes", "-o", "StrictHostKeyChecking=yes",
            "-o", f"UserKnownHostsFile={known_hosts}", "-o", "GlobalKnownHostsFile=/dev/null",
            "-o", "UpdateHostKeys=no", "-o", "CheckHostIP=no",
            "-o", "ConnectTimeout=10", "-o", "ServerAliveInterval=5",
            "-o", "ControlMaster=no", "-o", "ControlPath=none"]
    if key is not None:
        path = key.path if isinstance(key, SshKey) else key
        argv += ["-o", "IdentitiesOnly=yes", "-i", str(path)]
    for option in options:
        argv += ["-o", option]
    if user is not None:
        argv.append(f"{user}@{host}")
    return argv


def _client_env(agent: Optional[SshAgent]) -> dict:
    """os.environ without the caller's own agent, plus ours if given."""
    env = {k: v for k, v in os.environ.items() if k != "SSH_AUTH_SOCK"}
    return agent.env(env) if agent is not None else env


def ssh_run(command: Command, *, port: int, user: str, known_hosts: Union[str, Path],
            key: Optional[Union[SshKey, Path]] = None, agent: Optional[SshAgent] = None,
            host: str = LOCALHOST, options: Sequence[str] = (), input: Optional[str] = None,
            timeout: float = SSH_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``ssh ... user@host command`` as a client; return the CompletedProcess.

    ``command`` is the string the server sees as SSH_ORIGINAL_COMMAND (a list
    is shell-joined). Authenticates with ``key`` or else ``agent``; the
    caller's own SSH_AUTH_SOCK is never used. Never raises on a non-zero exit.
    """
    if not isinstance(command, str):
        command = shlex.join(command)
    argv = ssh_argv(port=port, known_hosts=known_hosts, key=key, host=host, user=user,
                    options=options) + ["--", command]
    return run(argv, check=False, timeout=timeout, input=input, env=_client_env(agent))


def rsync_rsh(*, port: int, known_hosts: Union[str, Path], key: Optional[Union[SshKey, Path]] = None,
              options: Sequence[str] = ()) -> str:
    """The ``rsync -e`` value for the same ssh as ssh_run."""
    return shlex.join(ssh_argv(port=port, known_hosts=known_hosts, key=key, options=options))


# === 7. The whole environment =================================================

@dataclass
class ServerEnv:
    """A btrfs store, its server user, an sshd, and an admin key in an agent.

    ``known_hosts`` pins the sshd's host key; ``shared_dir`` (root-owned 0755)
    holds programs the server user must be able to execute, such as a test
    forced command; ``workdir`` (root-only) is scratch space for the client.
    """
    store: Path
    user: ServerUser
    sshd: Sshd
    agent: SshAgent
    admin_key: SshKey
    known_hosts: Path
    workdir: Path
    shared_dir: Path

    @property
    def host(self) -> str:
        return self.sshd.host

    @property
    def port(self) -> int:
        return self.sshd.port

    @property
    def destination(self) -> str:
        """``user@127.0.0.1:`` as given to ``setup-client --destination``."""
        return f"{self.user.name}@{self.sshd.host}:"

    def new_key(self, name: str) -> SshKey:
        """A fresh client key in workdir (not authorized anywhere yet)."""
        path = self.workdir / f"key-{name}-{secrets.token_hex(3)}"
        return generate_key(path, comment=f"bbtest-{name}")

    def authorize(self, line: str) -> None:
        """Append a line to the server user's authorized_keys."""
        append_authorized_key(self.user, line)

    def ssh(self, command: Command, *, key: Optional[Union[SshKey, Path]] = None,
            known_hosts: Optional[Union[str, Path]] = None, use_agent: bool = False,
            user: Optional[str] = None, **kwargs) -> subprocess.CompletedProcess:
        """ssh_run to this server as the server user, or `user` (key, or the agent)."""
        return ssh_run(command, port=self.port, user=user or self.user.name, host=self.host,
                       known_hosts=known_hosts or self.known_hosts, key=key,
                       agent=self.agent if use_agent else None, **kwargs)

    def admin_ssh(self, command: Command, **kwargs) -> subprocess.CompletedProcess:
        """ssh as the administrator: the unrestricted key, from the agent only."""
        return self.ssh(command, use_agent=True, **kwargs)

    def rsync_rsh(self, key: Union[SshKey, Path], **kwargs) -> str:
        """The ``rsync -e`` value for a client with ``key`` and the pinned host key."""
        return rsync_rsh(port=self.port, known_hosts=self.known_hosts, key=key, **kwargs)

    def rsync(self, args: Sequence[str], *, key: Union[SshKey, Path],
              timeout: float = SSH_TIMEOUT) -> subprocess.CompletedProcess:
        """Run ``rsync -e <ssh> args...``; remote paths are ``{env.destination}path``."""
        return run(["rsync", "-e", self.rsync_rsh(key), *args], check=False,
                   timeout=timeout, env=_client_env(None))

    def run_as_user(self, argv: Sequence[str], **kwargs) -> subprocess.CompletedProcess:
        """Run argv as the server user (see run_as)."""
        return run_as(self.user, argv, **kwargs)

    def env_for_client(self) -> dict:
        """os.environ with SSH_AUTH_SOCK set to the admin's agent (for setup-client)."""
        return self.agent.env(_client_env(None))


@contextlib.contextmanager
def server_environment(store_size: Union[str, int] = "512M",
                       user_name: Optional[str] = None,
                       sshd_extra_config: Sequence[str] = ()) -> Iterator[ServerEnv]:
    """Everything at once; torn down in reverse order (sshd first, mount last).

    The admin key is authorized without restrictions, so a later
    ``setup-client`` run with ``env_for_client()`` can log in and install the
    client's restricted key.
    """
    with contextlib.ExitStack() as stack:
        workdir = _tempdir("bbtest-client-")
        stack.callback(shutil.rmtree, workdir, ignore_errors=True)
        shared_dir = _tempdir("bbtest-shared-", 0o755)
        stack.callback(shutil.rmtree, shared_dir, ignore_errors=True)
        store = stack.enter_context(btrfs_mount(store_size))
        user = stack.enter_context(server_user(store, user_name))
        agent = stack.enter_context(ssh_agent())
        # <user>-*: the hosts' own accounts (receiver = userns), named after the backup user
        sshd = stack.enter_context(sshd_server([user.name, f"{user.name}-*"], extra_config=sshd_extra_config))
        admin_key = generate_key(workdir / "admin_key", comment="bbtest-admin")
        agent.add(admin_key)
        append_authorized_key(user, admin_key.public)
        known_hosts = sshd.write_known_hosts(workdir / "known_hosts")
        yield ServerEnv(store, user, sshd, agent, admin_key, known_hosts, workdir, shared_dir)


# === 8. pytest fixtures =======================================================

@contextlib.contextmanager
def _sigterm_as_interrupt() -> Iterator[None]:
    """Let SIGTERM (a CI timeout, ``timeout(1)``) unwind like Ctrl-C, so teardown runs."""
    import threading
    if (threading.current_thread() is not threading.main_thread()
            or signal.getsignal(signal.SIGTERM) is not signal.SIG_DFL):
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")
    signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)


def _skip_or_check() -> None:
    """Skip (with the reason) where the machine cannot run these; fail on missing tools."""
    reason = skip_reason()
    if reason:
        pytest.skip(reason)
    require_tools()


@pytest.fixture(scope="module")
def btrfs_store() -> Iterator[Path]:
    """A 512M btrfs mount (root:root 0755) for one test module."""
    _skip_or_check()
    with _sigterm_as_interrupt(), btrfs_mount("512M") as mnt:
        yield mnt


@pytest.fixture(scope="module")
def server_env() -> Iterator[ServerEnv]:
    """A full ServerEnv (store, user, sshd, admin agent) for one test module."""
    _skip_or_check()
    with _sigterm_as_interrupt(), server_environment() as env:
        yield env
