#!/usr/bin/env python3
"""byteback: maintenance-free client/server backups for Linux (one file, stdlib only).

Clients push with rsync over OpenSSH; the server keeps read-only snapshots
(btrfs, or hard-linked trees on any filesystem) and prunes old ones by itself
so the disc never fills.  See README.md for set-up and the trust model.

Sections (grep -n '^# === '):
    1 constants & errors        2 utilities (run, lock, log, files)
    3 configuration             4 destinations & names
    5 store backends            6 retention (pure)
    7 server commands           8 client commands
    9 CLI dispatch

Exit codes: 0 ok, 1 failure, 2 usage; `status` uses the Nagios codes
0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""
from __future__ import annotations

import argparse
import configparser
import contextlib
import datetime as dt
import errno
import fcntl
import json
import logging
import logging.handlers
import math
import os
import re
import shlex
import shutil
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, NamedTuple, Optional, Sequence

# === 1. Constants & errors ===================================================

VERSION = "0.1.0"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL, NAGIOS_UNKNOWN = 0, 1, 2, 3

DEFAULT_CONFIG_DIR = "/etc/byteback"
SNAPSHOT_FORMAT = "%Y-%m-%dT%H:%M%z"           # the original byteback's names
SNAPSHOT_FORMAT_SECONDS = "%Y-%m-%dT%H:%M:%S%z"  # only when a minute is taken
STATE_DIR_NAME = ".byteback"                   # <store>/.byteback: history, run/

# Where the original README's importance targets come from: "0, 1, 2, 3, 7,
# 14, 21, 28, 56, and 112 days".
ORIGINAL_TARGET_DAYS = (0, 1, 2, 3, 7, 14, 21, 28, 56, 112)
DEFAULT_TARGET_DAYS = ORIGINAL_TARGET_DAYS

# rsync exit codes that mean "the network or the peer went away": the client
# retries these (and ssh's own 255) after a delay.  24 is "some files vanished
# while we copied them", which is normal on a live system.
RSYNC_RETRY_CODES = frozenset({10, 11, 12, 20, 21, 22, 30, 35, 255})
RSYNC_OK_CODES = frozenset({0, 24})
RSYNC_EXIT_MEANINGS = {
    1: "syntax or usage error", 2: "protocol incompatibility",
    3: "errors selecting input/output files", 5: "error starting client-server protocol",
    10: "error in socket I/O", 11: "error in file I/O", 12: "error in rsync protocol data stream",
    13: "errors with program diagnostics", 20: "received SIGUSR1 or SIGINT",
    21: "some error returned by waitpid()", 22: "error allocating core memory buffers",
    23: "partial transfer due to error", 24: "partial transfer due to vanished source files",
    25: "the --max-delete limit stopped deletions", 30: "timeout in data send/receive",
    35: "timeout waiting for daemon connection", 255: "ssh could not connect",
}

# Which Debian package brings a program, for "X is not installed" messages.
PACKAGE_OF = {"rsync": "rsync", "btrfs": "btrfs-progs", "ssh": "openssh-client",
              "ssh-keygen": "openssh-client", "ssh-keyscan": "openssh-client",
              "sudo": "sudo", "visudo": "sudo"}


class ByteBackError(Exception):
    """An expected failure: main() prints 'byteback: <message>' and exits with exit_code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: Optional[int] = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(ByteBackError):
    """Bad command-line use (exit 2)."""

    exit_code = EXIT_USAGE


class CommandFailed(ByteBackError):
    """An external command exited non-zero."""

    def __init__(self, argv: Sequence[str], returncode: int, stderr: str = ""):
        tail = " ".join(stderr.strip().splitlines()[-3:]) if stderr else ""
        message = f"{argv[0]} failed with exit code {returncode}: {shlex.join(argv)}"
        if tail:
            message += f" ({tail})"
        super().__init__(message)
        self.argv, self.returncode, self.stderr = list(argv), returncode, stderr


# === 2. Utilities (running commands, locking, logging, files) ================

log = logging.getLogger("byteback")


def setup_logging(verbosity: int = 0, *, quiet: bool = True) -> None:
    """Log to stderr (WARNING for cron commands unless -v) and to syslog when /dev/log exists."""
    log.handlers.clear()
    log.setLevel(logging.DEBUG)
    log.propagate = False
    if verbosity >= 2:
        level = logging.DEBUG
    elif verbosity == 1 or not quiet:
        level = logging.INFO
    else:
        level = logging.WARNING
    err = logging.StreamHandler(sys.stderr)
    err.setLevel(level)
    err.setFormatter(logging.Formatter("byteback: %(message)s"))
    log.addHandler(err)
    # Without this check every record on a machine without syslog prints a
    # "--- Logging error ---" traceback (containers, minimal CI images).
    try:
        if stat.S_ISSOCK(os.stat("/dev/log").st_mode):
            sys_handler = logging.handlers.SysLogHandler(address="/dev/log")
            sys_handler.ident = "byteback: "
            sys_handler.setLevel(logging.INFO)
            log.addHandler(sys_handler)
    except OSError:
        pass


class Runner:
    """The one place external commands run: list argv only, never a shell."""

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run

    def run(self, argv: Sequence[str], *, destructive: bool = False, check: bool = True,
            input: Optional[str] = None, timeout: Optional[float] = None,
            capture: bool = True, env: Optional[Dict[str, str]] = None
            ) -> subprocess.CompletedProcess:
        """Run argv; under --dry-run skip it when destructive.  Raises CommandFailed."""
        assert isinstance(argv, (list, tuple)), "argv must be a list, never a shell string"
        argv = [str(a) for a in argv]
        log.debug("run: %s", shlex.join(argv))
        if destructive and self.dry_run:
            log.info("dry-run: would run %s", shlex.join(argv))
            return subprocess.CompletedProcess(argv, 0, "", "")
        run_env = dict(os.environ if env is None else env)
        run_env["LC_ALL"] = "C"          # output below is parsed
        try:
            proc = subprocess.run(
                argv, input=input, timeout=timeout, env=run_env,
                stdout=subprocess.PIPE if capture else None,
                stderr=subprocess.PIPE if capture else None,
                universal_newlines=True, errors="surrogateescape")
        except FileNotFoundError:
            raise missing_program(argv[0]) from None
        except subprocess.TimeoutExpired:
            raise ByteBackError(f"{shlex.join(argv)} did not finish within {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr or "")
        return proc


def missing_program(program: str) -> ByteBackError:
    """The error for a program that is not installed, saying how to install it."""
    name = os.path.basename(program)
    return ByteBackError(f"{name} is not installed; install it with: "
                         f"apt-get install {PACKAGE_OF.get(name, name)}")


class Lock:
    """An exclusive, non-blocking flock on a file; a second holder is refused."""

    def __init__(self, path: Path, what: str):
        self.path, self.what, self._fd = Path(path), what, -1

    def __enter__(self) -> "Lock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        try:
            self._fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise ByteBackError(f"cannot open lock file {self.path}: {e.strerror}; "
                                f"check the permissions of {self.path.parent}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = -1
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ByteBackError(f"another {self.what} is running (lock {self.path}); "
                                    "try again when it has finished") from None
            raise
        return self

    def __exit__(self, *exc) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def write_file_atomically(path: Path, text: str, mode: int = 0o644) -> None:
    """Write text to path so a crash leaves either the old or the new file, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, mode)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def write_json_atomically(path: Path, data: object) -> None:
    """Write data as JSON, atomically (see write_file_atomically)."""
    write_file_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n")


def read_json(path: Path, default: object) -> object:
    """Read a JSON file, or default when it does not exist; a corrupt file is an error."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        return default
    except (ValueError, UnicodeDecodeError) as e:
        raise ByteBackError(f"{path} is corrupt ({e}); move it aside "
                            f"(mv {path} {path}.bad) and byteback will start it afresh") from None
    except OSError as e:
        raise ByteBackError(f"cannot read {path}: {e.strerror}") from None


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_SIZE_UNITS = {"": 1, "b": 1, "k": 1024, "m": 1024 ** 2, "g": 1024 ** 3,
               "t": 1024 ** 4, "p": 1024 ** 5}


def parse_duration(text: str) -> float:
    """'90' or '90s', '10m', '6h', '2d', '1w' -> seconds.  Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([smhdw]?)\s*", str(text).lower())
    if not m:
        raise ValueError(f"{text!r} is not a duration (use a number with s, m, h, d or w, e.g. 6h)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2) or "s"]


def parse_size(text: str) -> int:
    """'500', '10k', '2.5G', '2T' (powers of 1024) -> bytes.  Raises ValueError."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([kmgtp]?)i?b?\s*", str(text).lower())
    if not m:
        raise ValueError(f"{text!r} is not a size (use a number with K, M, G, T or P, e.g. 2T)")
    return int(float(m.group(1)) * _SIZE_UNITS[m.group(2)])


def format_size(n: float) -> str:
    """Bytes as a short human figure: 0B, 512B, 1.5K, 3.1G."""
    n = float(n)
    for unit in ("B", "K", "M", "G", "T"):
        if abs(n) < 1024 or unit == "T":
            return f"{n:.0f}{unit}" if unit == "B" else f"{n:.1f}{unit}"
        n /= 1024
    return f"{n:.1f}P"   # pragma: no cover - unreachable


def format_duration(seconds: float) -> str:
    """Seconds as '45s', '12m', '5h 3m', '3d 4h'."""
    seconds = int(max(0, seconds))
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m"
    if seconds < 86400:
        return f"{seconds // 3600}h {seconds % 3600 // 60}m"
    return f"{seconds // 86400}d {seconds % 86400 // 3600}h"


def now_local() -> dt.datetime:
    """The clock, read in one place: an aware datetime in the machine's time zone."""
    return dt.datetime.now(dt.timezone.utc).astimezone()


def running_under_sudo() -> bool:
    """True when sudo started us for another user (root-side code trusts nothing then)."""
    return os.geteuid() == 0 and bool(os.environ.get("SUDO_USER"))


# === 3. Configuration ========================================================

class Option(NamedTuple):
    """One server.conf key: its default (as text) and a converter raising ValueError."""
    default: str
    convert: Callable[[str], object]
    help: str


def _positive_float(text: str) -> float:
    value = float(text)
    if not value > 0 or math.isinf(value):
        raise ValueError(f"{text!r} must be a number greater than 0")
    return value


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise ValueError(f"{text!r} must be a whole number of at least 1")
    return value


def _order(text: str) -> str:
    if text not in ("importance", "age"):
        raise ValueError(f"{text!r} is not an order; use 'importance' or 'age'")
    return text


def parse_targets(text: str) -> tuple:
    """'0,1,2,7' (days) -> (0.0, 1.0, 2.0, 7.0), sorted, no duplicates.  Raises ValueError."""
    parts = [p.strip() for p in str(text).replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError("the target list is empty; give days separated by commas, e.g. 0,1,2,7,28")
    try:
        days = sorted({float(p) for p in parts})
    except ValueError:
        raise ValueError(f"{text!r} is not a list of days, e.g. 0,1,2,7,28") from None
    if days[0] < 0 or any(math.isinf(d) or math.isnan(d) for d in days):
        raise ValueError(f"{text!r}: target ages must be 0 or more days")
    return tuple(days)


def _store_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} must be an absolute path")
    return text


# NOTE: README.md's "server.conf" section documents these keys; keep them in step.
SERVER_OPTIONS: Dict[str, Option] = {
    "store": Option("", _store_path, "the store root (default: the byteback user's home)"),
    "min_interval": Option("6h", parse_duration, "refuse a snapshot younger than this"),
    "order": Option("importance", _order, "prune order: importance or age"),
    "targets": Option(",".join(f"{d:g}" for d in DEFAULT_TARGET_DAYS), parse_targets,
                      "importance target ages, in days"),
    "headroom": Option("1.5", _positive_float, "free space kept = headroom x mean backup size"),
    "history": Option("10", _positive_int, "how many recent backups the mean is taken over"),
}


class ServerConfig(NamedTuple):
    """Server settings after defaults and server.conf are resolved."""
    store: str = ""
    min_interval: float = 6 * 3600.0
    order: str = "importance"
    targets: tuple = tuple(float(d) for d in DEFAULT_TARGET_DAYS)
    headroom: float = 1.5
    history: int = 10


def _line_of_key(lines: Sequence[str], section: str, key: str) -> int:
    """The 1-based line of key in section (configparser keeps no line numbers)."""
    current = None
    for number, line in enumerate(lines, 1):
        m = re.match(r"\s*\[([^\]]+)\]", line)
        if m:
            current = m.group(1).strip()
        elif current == section and re.match(rf"\s*{re.escape(key)}\s*[=:]", line, re.I):
            return number
    return 0


def parse_server_config(text: str, source: str = "server.conf") -> ServerConfig:
    """Parse server.conf text: one [server] section of SERVER_OPTIONS keys; unknown keys are errors."""
    parser = configparser.ConfigParser(interpolation=None)
    try:
        parser.read_string(text, source=source)
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise ByteBackError(f"{source}: cannot parse: {first}") from None
    lines = text.splitlines()
    values = {name: opt.convert(opt.default) if opt.default else "" for name, opt in SERVER_OPTIONS.items()}
    for section in parser.sections():
        if section != "server":
            line = next((n for n, l in enumerate(lines, 1) if l.strip() == f"[{section}]"), 0)
            raise ByteBackError(f"{source} line {line}: unknown section [{section}]; "
                                "put settings under [server]")
        for key, raw in parser.items(section):
            line = _line_of_key(lines, section, key)
            if key not in SERVER_OPTIONS:
                raise ByteBackError(f"{source} line {line}: unknown key '{key}'; "
                                    f"known keys: {', '.join(sorted(SERVER_OPTIONS))}")
            try:
                values[key] = SERVER_OPTIONS[key].convert(raw.strip())
            except ValueError as e:
                raise ByteBackError(f"{source} line {line}: bad value for {key}: {e}") from None
    return ServerConfig(**values)


def load_server_config(config_dir: str) -> ServerConfig:
    """Read <config_dir>/server.conf, or the defaults when there is none."""
    path = Path(config_dir) / "server.conf"
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return parse_server_config("", str(path))
    except (OSError, UnicodeDecodeError) as e:
        raise ByteBackError(f"cannot read {path}: {e}") from None
    return parse_server_config(text, str(path))


def _setting_lines(text: str) -> List[str]:
    """Non-empty lines of a one-value-per-file setting, without '#' comment lines."""
    return [line.strip() for line in text.splitlines()
            if line.strip() and not line.lstrip().startswith("#")]


def read_setting(config_dir: str, name: str, default=None, convert: Callable = str):
    """One value from the original byteback's one-file-per-setting layout, or default."""
    path = Path(config_dir) / name
    try:
        lines = _setting_lines(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return default
    except (OSError, UnicodeDecodeError) as e:
        raise ByteBackError(f"cannot read {path}: {e}") from None
    if not lines:
        return default
    try:
        return convert(lines[0])
    except ValueError as e:
        raise ByteBackError(f"{path} line 1: bad value: {e}") from None


def read_setting_lines(config_dir: str, name: str) -> List[str]:
    """Every value line of a setting file such as excludes (missing file: none)."""
    path = Path(config_dir) / name
    try:
        return _setting_lines(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return []
    except (OSError, UnicodeDecodeError) as e:
        raise ByteBackError(f"cannot read {path}: {e}") from None


def client_state_dir() -> Path:
    """Where the client keeps its lock and last-result file."""
    if os.environ.get("BYTEBACK_STATE_DIR"):
        return Path(os.environ["BYTEBACK_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/byteback")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "byteback"


# === 4. Destinations & names =================================================

# Host names become directory names on the server and words in authorized_keys:
# letters, digits, dots and dashes only, starting with a letter or digit, so a
# name can never be '..', contain '/', start an option ('-') or carry quotes.
HOSTNAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]*\Z")
SNAPSHOT_NAME_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}(?::\d{2})?(?:[+-]\d{2}:?\d{2}|Z)\Z")


def check_host_name(name: str) -> str:
    """Return name if it is a safe host name, else raise ByteBackError saying why."""
    if not isinstance(name, str) or not HOSTNAME_RE.match(name) or ".." in name or len(name) > 253:
        raise ByteBackError(f"{name!r} is not a valid host name: use letters, digits, dots and "
                            "dashes, starting with a letter or digit, no '..', at most 253 characters")
    return name


def format_snapshot_name(when: dt.datetime, seconds: bool = False) -> str:
    """A snapshot's directory name for an aware datetime (the original's format)."""
    return when.strftime(SNAPSHOT_FORMAT_SECONDS if seconds else SNAPSHOT_FORMAT)


def parse_snapshot_name(name: str) -> Optional[dt.datetime]:
    """The aware datetime a snapshot name stands for, or None if it is not one."""
    if not SNAPSHOT_NAME_RE.match(name):
        return None
    text = name[:-1] + "+0000" if name.endswith("Z") else name
    for fmt in (SNAPSHOT_FORMAT, SNAPSHOT_FORMAT_SECONDS):
        try:
            return dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


class Snapshot(NamedTuple):
    """A finished snapshot: host, directory name and the moment it stands for."""
    host: str
    name: str
    when: dt.datetime


class Destination(NamedTuple):
    """Where backups go: [user@]host:[path] for a server, or a local store path."""
    user: Optional[str]
    host: Optional[str]
    port: Optional[int]
    path: str

    @property
    def is_local(self) -> bool:
        return self.host is None


def parse_destination(text: str, port: Optional[int] = None) -> Destination:
    """Parse rsync-style 'user@host:path' (remote) or '/path' (local store)."""
    text = text.strip()
    if not text:
        raise ByteBackError("the destination is empty; give user@host: or a local path")
    colon, slash = text.find(":"), text.find("/")
    if colon == -1 or (slash != -1 and slash < colon):
        return Destination(None, None, None, os.path.abspath(os.path.expanduser(text)))
    login, path = text[:colon], text[colon + 1:]
    user, _, host = login.rpartition("@")
    if not host or not re.fullmatch(r"[A-Za-z0-9.:_-]+|\[[0-9A-Fa-f:.]+\]", host) or host.startswith("-"):
        raise ByteBackError(f"{text!r}: {host!r} is not a host name or address")
    if user and not re.fullmatch(r"[A-Za-z0-9._][A-Za-z0-9._-]*", user):
        raise ByteBackError(f"{text!r}: {user!r} is not a user name")
    return Destination(user or None, host.strip("[]"), port, path)


def default_host_name() -> str:
    """This machine's name as the server will know it: its FQDN."""
    return socket.getfqdn() or socket.gethostname()


# === 5. Store backends =======================================================

def _unescape_mount_field(field: str) -> str:
    """/proc/mounts writes space, tab, newline and backslash as octal escapes."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mounts(text: str) -> List[tuple]:
    """(mount point, filesystem type) pairs from /proc/mounts text, in file order."""
    mounts = []
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 3:
            mounts.append((_unescape_mount_field(fields[1]), fields[2]))
    return mounts


def filesystem_type(path: str, mounts: Sequence[tuple]) -> str:
    """The type of the filesystem holding path (the last, longest matching mount wins)."""
    best, best_type = "", "unknown"
    for point, fstype in mounts:
        inside = path == point or path.startswith(point.rstrip("/") + "/")
        if inside and len(point) >= len(best):
            best, best_type = point, fstype
    return best_type


def _read_mounts() -> List[tuple]:
    try:
        with open("/proc/mounts", encoding="utf-8", errors="surrogateescape") as f:
            return parse_mounts(f.read())
    except OSError:
        return []


def tree_size(root: Path) -> tuple:
    """(bytes in regular files, bytes in files not hard-linked elsewhere) below root.

    Files hard-linked within the tree count once.  Symlinks are never followed.
    """
    total = unique = 0
    seen = set()
    stack = [str(root)]
    while stack:
        top = stack.pop()
        try:
            entries = os.scandir(top)
        except OSError:
            continue
        with entries:
            for entry in entries:
                try:
                    st = entry.stat(follow_symlinks=False)
                except OSError:
                    continue
                if stat.S_ISDIR(st.st_mode):
                    stack.append(entry.path)
                elif stat.S_ISREG(st.st_mode):
                    if st.st_nlink > 1:
                        if st.st_ino in seen:
                            continue
                        seen.add(st.st_ino)
                    else:
                        unique += st.st_size
                    total += st.st_size
    return total, unique


class Store:
    """A store root: <root>/<host>/current, <root>/<host>/<snapshot>, <root>/.byteback/.

    Subclasses say how `current` is made, snapshotted and deleted.
    """

    kind = "store"
    protects_history = False

    def __init__(self, root, runner: Optional[Runner] = None):
        self.root = Path(root)
        self.runner = runner or Runner()

    # -- paths: always derived from the root and a checked host name --
    def host_dir(self, host: str) -> Path:
        return self.root / check_host_name(host)

    def current(self, host: str) -> Path:
        return self.host_dir(host) / "current"

    @property
    def state_dir(self) -> Path:
        return self.root / STATE_DIR_NAME

    @property
    def run_dir(self) -> Path:
        return self.state_dir / "run"

    def history_path(self, host: str) -> Path:
        return self.state_dir / "history" / f"{check_host_name(host)}.json"

    def lock(self) -> Lock:
        """The store-wide lock that snapshot and prune hold (root-owned directory on a server)."""
        return Lock(self.state_dir / "store.lock", "snapshot or prune on this store")

    # -- reading --
    def hosts(self) -> List[str]:
        """Host directories in the store (real directories with a valid name)."""
        try:
            names = sorted(os.listdir(self.root))
        except OSError as e:
            raise ByteBackError(f"cannot read the store {self.root}: {e.strerror}") from None
        return [n for n in names if HOSTNAME_RE.match(n) and ".." not in n
                and stat.S_ISDIR(os.lstat(self.root / n).st_mode)]

    def snapshots(self, host: Optional[str] = None) -> List[Snapshot]:
        """Finished snapshots, oldest first, of one host or of all."""
        found = []
        for h in ([check_host_name(host)] if host else self.hosts()):
            try:
                names = os.listdir(self.host_dir(h))
            except FileNotFoundError:
                continue
            for name in names:
                when = parse_snapshot_name(name)
                if when is not None and stat.S_ISDIR(os.lstat(self.host_dir(h) / name).st_mode):
                    found.append(Snapshot(h, name, when))
        return sorted(found, key=lambda s: (s.host, s.when, s.name))

    def snapshot_path(self, snap: Snapshot) -> Path:
        if parse_snapshot_name(snap.name) is None:
            raise ByteBackError(f"{snap.name!r} is not a snapshot name")
        return self.host_dir(snap.host) / snap.name

    def free_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_bavail * st.f_frsize

    def total_bytes(self) -> int:
        st = os.statvfs(self.root)
        return st.f_blocks * st.f_frsize

    # -- the per-host history of backup sizes --
    def read_history(self, host: str) -> List[dict]:
        data = read_json(self.history_path(host), {"backups": []})
        backups = data.get("backups") if isinstance(data, dict) else None
        if not isinstance(backups, list) or not all(isinstance(b, dict) for b in backups):
            path = self.history_path(host)
            raise ByteBackError(f"{path} is not a byteback history; move it aside "
                                f"(mv {path} {path}.bad) and byteback will start it afresh")
        return backups

    def write_history(self, host: str, backups: List[dict]) -> None:
        write_json_atomically(self.history_path(host),
                              {"host": host, "backups": backups[-HISTORY_KEEP:]})

    # -- the "dirty since" marker of a backup in progress --
    def dirty_path(self, host: str) -> Path:
        return self.run_dir / f"{check_host_name(host)}.dirty"

    def mark_dirty(self, host: str, when: dt.datetime) -> None:
        """Record that current is being written (kept from the first write until a snapshot)."""
        path = self.dirty_path(host)
        if not path.exists():
            write_json_atomically(path, {"since": when.isoformat()})

    def dirty_since(self, host: str) -> Optional[dt.datetime]:
        """When the unfinished backup in current began, or None.  run/ is untrusted input."""
        try:
            with open(self.dirty_path(host), encoding="utf-8") as f:
                since = dt.datetime.fromisoformat(str(json.load(f)["since"]))
            return since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)
        except (OSError, ValueError, KeyError, TypeError):
            return None

    def clear_dirty(self, host: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.dirty_path(host))

    # -- writing --
    def prepare_host(self, host: str, owner: Optional[tuple] = None) -> Path:
        """Create <host>/ and <host>/current if missing; return current."""
        host_dir = self.host_dir(host)
        if not host_dir.is_dir():
            host_dir.mkdir(mode=0o755, parents=True)
            if os.geteuid() == 0:
                # The owner of <host>/ could rename snapshots away: root keeps it.
                os.chown(host_dir, 0, 0)
        current = self.current(host)
        if os.path.islink(current):
            raise ByteBackError(f"{current} is a symlink; refusing to use it (move it away)")
        if not current.is_dir():
            self._create_current(current)
            if owner is not None:
                os.chown(current, *owner)
        return current

    def rsync_options(self, host: str) -> List[str]:
        """Options the receiving rsync needs for this backend."""
        raise NotImplementedError

    def take_snapshot(self, host: str, name: str, previous: Optional[dict]) -> dict:
        """Turn current into the read-only snapshot `name`; return its size record."""
        raise NotImplementedError

    def delete(self, snap: Snapshot) -> None:
        """Delete a snapshot; it disappears under its name before its data goes."""
        raise NotImplementedError

    def clean_leftovers(self) -> List[str]:
        """Remove half-made or half-deleted snapshots a crash left behind."""
        removed = []
        for host in self.hosts():
            for name in sorted(os.listdir(self.host_dir(host))):
                if name.startswith((".incomplete-", ".deleting-")):
                    path = self.host_dir(host) / name
                    log.warning("removing %s, left by an interrupted snapshot or prune", path)
                    self._remove_tree(path)
                    removed.append(str(path))
        return removed

    def _create_current(self, path: Path) -> None:
        raise NotImplementedError

    def _remove_tree(self, path: Path) -> None:
        raise NotImplementedError


HISTORY_KEEP = 100   # entries kept per host; the mean uses the last `history` of them


def _make_writable_and_retry(func, path, _exc_info) -> None:
    """shutil.rmtree onerror: a read-only directory in a snapshot blocks deletion as non-root."""
    parent = os.path.dirname(path)
    with contextlib.suppress(OSError):
        os.chmod(parent, stat.S_IRWXU)
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
    func(path)


class HardlinkStore(Store):
    """Any POSIX filesystem: each backup is linked to the newest snapshot, then renamed."""

    kind = "hardlink"

    def _create_current(self, path: Path) -> None:
        path.mkdir(mode=0o755)

    def rsync_options(self, host: str) -> List[str]:
        # Never --inplace here: current shares inodes with the newest snapshot,
        # and writing in place would change history through the shared inode.
        snaps = self.snapshots(host)
        if not snaps:
            return []
        return [f"--link-dest={self.snapshot_path(snaps[-1])}"]

    def take_snapshot(self, host: str, name: str, previous: Optional[dict]) -> dict:
        current = self.current(host)
        size, added = tree_size(current)   # files linked from the last snapshot are not new
        st = os.lstat(current)
        final = self.host_dir(host) / name
        # rename() is atomic: the snapshot appears whole under its name or not at all.
        os.rename(current, final)
        os.chmod(final, 0o555)
        if os.geteuid() == 0:
            os.chown(final, 0, 0)
        self._create_current(current)
        if os.geteuid() == 0:
            os.chown(current, st.st_uid, st.st_gid)   # the next backup writes as before
        return {"size": size, "added": added}

    def delete(self, snap: Snapshot) -> None:
        path = self.snapshot_path(snap)
        doomed = path.with_name(f".deleting-{snap.name}")
        os.rename(path, doomed)
        self._remove_tree(doomed)

    def _remove_tree(self, path: Path) -> None:
        with contextlib.suppress(OSError):
            os.chmod(path, stat.S_IRWXU)
        shutil.rmtree(path, onerror=_make_writable_and_retry)


class BtrfsStore(Store):
    """btrfs: current is a subvolume written in place; a snapshot is an O(1) read-only copy."""

    kind = "btrfs"
    protects_history = True

    def _btrfs(self, *args: str, destructive: bool = True) -> subprocess.CompletedProcess:
        return self.runner.run(["btrfs", *args], destructive=destructive)

    def _create_current(self, path: Path) -> None:
        self._btrfs("subvolume", "create", str(path))

    def rsync_options(self, host: str) -> List[str]:
        return ["--inplace"]   # only changed blocks are written, so snapshots share the rest

    def generation(self, path: Path) -> int:
        """The subvolume's current transaction id ('transid marker')."""
        out = self._btrfs("subvolume", "find-new", str(path), "9999999999", destructive=False).stdout
        m = re.search(r"transid marker was (\d+)", out)
        return int(m.group(1)) if m else 0

    def bytes_written_since(self, path: Path, generation: int) -> int:
        """Bytes of file extents in the subvolume written after `generation`."""
        out = self._btrfs("subvolume", "find-new", str(path), str(generation), destructive=False).stdout
        return sum(int(m.group(1)) for m in re.finditer(r"^inode \d+ file offset \d+ len (\d+)", out, re.M))

    def take_snapshot(self, host: str, name: str, previous: Optional[dict]) -> dict:
        current = self.current(host)
        if not is_btrfs_subvolume(current):
            raise ByteBackError(f"{current} is not a btrfs subvolume; move it aside and run "
                                "the backup again, which creates it as one")
        since = int(previous.get("generation", 0)) + 1 if previous else 0
        size, _ = tree_size(current)
        added = self.bytes_written_since(current, since)
        generation = self.generation(current)
        host_dir = self.host_dir(host)
        tmp = host_dir / f".incomplete-{name}"
        if tmp.exists():
            self._remove_tree(tmp)
        self._btrfs("subvolume", "snapshot", str(current), str(tmp))
        # Measured on this kernel: the owner of a subvolume can clear its
        # read-only flag and then delete what is in it.  So the snapshot's root
        # goes to root *before* the flag is set, and the flag is set last.
        os.chown(tmp, 0, 0)
        self._btrfs("property", "set", "-ts", str(tmp), "ro", "true")
        # Only now, complete and read-only, does it take its final name (atomic).
        os.rename(tmp, host_dir / name)
        return {"size": size, "added": added, "generation": generation}

    def delete(self, snap: Snapshot) -> None:
        path = self.snapshot_path(snap)
        doomed = path.with_name(f".deleting-{snap.name}")
        os.rename(path, doomed)   # gone under its name before anything is removed
        self._remove_tree(doomed)

    def _remove_tree(self, path: Path) -> None:
        if not is_btrfs_subvolume(path):      # a snapshot made by the hardlink backend
            HardlinkStore._remove_tree(self, path)
            return
        # A deleted subvolume's space comes back in the background.  Commit and
        # wait for the cleaner, or the next measurement sees no gain and the
        # pruner deletes far more history than it needs to.
        self._btrfs("subvolume", "delete", "--commit-each", str(path))
        self._btrfs("subvolume", "sync", str(self.root))


def is_btrfs_subvolume(path: Path) -> bool:
    """btrfs gives every subvolume root inode number 256."""
    try:
        return os.lstat(path).st_ino == 256
    except OSError:
        return False


def open_store(root, runner: Optional[Runner] = None, create: bool = False) -> Store:
    """The store at root, with the backend its filesystem calls for."""
    root = Path(os.path.abspath(root))
    if not root.exists() and create:
        try:
            root.mkdir(mode=0o755, parents=True)
        except OSError as e:
            raise ByteBackError(f"cannot create the store {root}: {e.strerror}") from None
    if not root.is_dir():
        raise ByteBackError(f"store {root} is not a directory; create it or fix the destination")
    fstype = filesystem_type(os.path.realpath(root), _read_mounts())
    if fstype == "btrfs" and os.geteuid() == 0:
        return BtrfsStore(root, runner)
    if fstype == "btrfs":
        log.info("store %s is on btrfs, but read-only snapshots need root: "
                 "using hard-linked snapshots instead", root)
    return HardlinkStore(root, runner)


# === 6. Retention (pure: values in, values out) ==============================
#
# Shared by `prune` and `simulate`: nothing here reads the clock, the disc or
# the environment.  `now` is always an argument.

DAY = 86400.0
MIN_HISTORY_FOR_SUSPICION = 3   # a host's first backups are large by nature


class Decision(NamedTuple):
    """One line of a prune plan: the snapshot, whether it goes, and the sentence why."""
    snapshot: Snapshot
    delete: bool
    reason: str


def age_days(snap: Snapshot, now: dt.datetime) -> float:
    return (now - snap.when).total_seconds() / DAY


def _describe_age(days: float) -> str:
    return format_duration(days * DAY) if days >= 1 / 24 else "under an hour"


def claim_targets(ages: Sequence[float], targets: Sequence[float]) -> Dict[int, int]:
    """Give each target age, most important (smallest) first, to the nearest unclaimed snapshot.

    ages are in days, youngest first.  Returns {index into ages: index into targets}.
    """
    claims: Dict[int, int] = {}
    for k, target in enumerate(sorted(targets)):
        best, best_distance = None, None
        for i, age in enumerate(ages):
            if i in claims:
                continue
            distance = abs(age - target)
            if best_distance is None or distance < best_distance:
                best, best_distance = i, distance
            elif age > target:
                break          # ages only grow from here: nothing nearer follows
        if best is None:
            break
        claims[best] = k
    return claims


def _importance_candidate(snaps: Sequence[Snapshot], now: dt.datetime,
                          targets: Sequence[float]) -> tuple:
    """(sort key, snapshot, reason) for the least important snapshot of one host.

    The newest is never a candidate.  Snapshots that hold no target age go
    first, the one whose loss leaves the smallest gap relative to its age
    first of all (this thins dense stretches into a spread that widens with
    age); then those holding targets, least important target first; the very
    oldest snapshot goes last of all.
    """
    youngest_first = list(reversed(snaps))
    ages = [age_days(s, now) for s in youngest_first]
    ordered_targets = sorted(targets)
    claims = claim_targets(ages, ordered_targets)
    best = None
    last = len(ages) - 1
    for i in range(1, len(ages)):
        age = ages[i]
        if i in claims:
            k = claims[i]
            key = (1, -k, -age)
            reason = (f"importance: nearest to the {ordered_targets[k]:g}-day mark, the least "
                      f"important target age still held ({k + 1} of {len(ordered_targets)})")
        elif i == last:
            key = (2, 0.0, -age)
            reason = "importance: the oldest snapshot, which goes only after every other"
        else:
            gap = ages[i + 1] - ages[i - 1]
            relative = gap / max(age, 1e-9)
            key = (0, relative, age)
            reason = (f"importance: nearest to no target age; without it the gap around "
                      f"{_describe_age(age)} ago is {_describe_age(gap)} ({relative:.2f} of its age)")
        if best is None or key < best[0]:
            best = (key, youngest_first[i], reason)
    return best


def _age_candidate(snaps: Sequence[Snapshot], now: dt.datetime) -> tuple:
    oldest = snaps[0]
    return ((0, -age_days(oldest, now)), oldest,
            f"age: the oldest snapshot of host {oldest.host} ({_describe_age(age_days(oldest, now))} old)")


def deletion_order(snapshots: Iterable[Snapshot], *, now: dt.datetime, order: str = "importance",
                   targets: Sequence[float] = DEFAULT_TARGET_DAYS) -> Iterator[Decision]:
    """Yield deletions, first to go first, until only each host's newest snapshot is left.

    Fair between hosts: the next deletion always comes from a host with the
    most snapshots left, so no host is stripped to its newest while another
    keeps many.  Each step assumes the deletions before it happened.
    """
    if order not in ("importance", "age"):
        raise ValueError(f"unknown prune order {order!r}")
    by_host: Dict[str, List[Snapshot]] = {}
    for snap in snapshots:
        by_host.setdefault(snap.host, []).append(snap)
    for snaps in by_host.values():
        snaps.sort(key=lambda s: s.when)
    several_hosts = len(by_host) > 1
    candidates: Dict[str, tuple] = {}

    def candidate(host: str) -> tuple:
        if host not in candidates:
            snaps = by_host[host]
            candidates[host] = (_age_candidate(snaps, now) if order == "age"
                                else _importance_candidate(snaps, now, targets))
        return candidates[host]

    while True:
        hosts = [h for h, snaps in by_host.items() if len(snaps) > 1]
        if not hosts:
            return
        most = max(len(by_host[h]) for h in hosts)
        host = min((h for h in hosts if len(by_host[h]) == most),
                   key=lambda h: (candidate(h)[0], candidate(h)[1].when, h))
        _, victim, reason = candidate(host)
        if several_hosts:
            reason += f"; host {host} has the most snapshots ({most})"
        by_host[host].remove(victim)
        del candidates[host]
        yield Decision(victim, True, reason)


def plan_prune(snapshots: Iterable[Snapshot], *, now: dt.datetime, order: str = "importance",
               targets: Sequence[float] = DEFAULT_TARGET_DAYS) -> List[Decision]:
    """Every snapshot with its place: deletions in order, then what is always kept."""
    snapshots = list(snapshots)
    plan = list(deletion_order(snapshots, now=now, order=order, targets=targets))
    gone = {d.snapshot for d in plan}
    for snap in sorted(snapshots, key=lambda s: (s.host, s.when)):
        if snap not in gone:
            plan.append(Decision(snap, False, f"kept: the newest snapshot of host {snap.host}"))
    return plan


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def counted_sizes(backups: Sequence[dict]) -> List[int]:
    """The sizes that speak for a host's normal backup: suspicious ones only once accepted."""
    return [int(b.get("added", 0)) for b in backups
            if not b.get("suspicious") or b.get("accepted")]


def free_space_target(sizes_by_host: Dict[str, Sequence[int]], *, headroom: float,
                      history: int) -> int:
    """Free space to keep: headroom x the sum over hosts of the mean of each one's last backups.

    Every host backs up again before the next prune, so the room must hold one
    more backup of each, sized by its own recent history.
    """
    return int(headroom * sum(mean(list(sizes)[-history:]) for sizes in sizes_by_host.values()))


def is_suspicious(added: int, prior_sizes: Sequence[int], *, headroom: float, history: int) -> bool:
    """True when a backup is larger than its host's history allows (more than its target).

    Pruning history to make room for such a backup is what a hostile client
    uploading junk would want, so the pruner refuses until an administrator
    has looked.  A host's first few backups are never suspicious.
    """
    prior = list(prior_sizes)[-history:]
    return len(prior) >= MIN_HISTORY_FOR_SUSPICION and added > headroom * mean(prior)


def interval_refusal(newest: Optional[Snapshot], now: dt.datetime, min_interval: float) -> Optional[str]:
    """Why a new snapshot must wait, or None when it may be taken."""
    if newest is None:
        return None
    elapsed = (now - newest.when).total_seconds()
    if elapsed >= min_interval:
        return None
    wait = min_interval - elapsed
    return (f"host {newest.host}: the newest snapshot {newest.name} is {format_duration(elapsed)} old "
            f"and the minimum interval is {format_duration(min_interval)}; "
            f"the next snapshot can be taken in {format_duration(math.ceil(wait))}")


# === 7. Server commands (snapshot, prune) ====================================

def _history_int(entry: Optional[dict], key: str) -> int:
    try:
        return max(0, int(entry.get(key, 0))) if entry else 0
    except (TypeError, ValueError):
        return 0


def snapshot_host(store: Store, host: str, config: ServerConfig, *, now: dt.datetime,
                  force: bool = False) -> Snapshot:
    """Turn host's current into a read-only snapshot and record its size.  Caller holds the lock."""
    current = store.current(host)
    if os.path.islink(current) or not current.is_dir():
        raise ByteBackError(f"host {host} has no backup in {current} to snapshot; run a backup first")
    snaps = store.snapshots(host)
    newest = snaps[-1] if snaps else None
    refusal = interval_refusal(newest, now, config.min_interval)
    if refusal and not force:
        raise ByteBackError(refusal)
    name = format_snapshot_name(now)
    if (store.host_dir(host) / name).exists():
        name = format_snapshot_name(now, seconds=True)
    if (store.host_dir(host) / name).exists():
        raise ByteBackError(f"a snapshot named {name} already exists for host {host}; try again in a second")
    when = parse_snapshot_name(name)
    if newest is not None and when <= newest.when:
        raise ByteBackError(f"the clock ({name}) is not after the newest snapshot {newest.name} of "
                            f"host {host}; check the system time")
    backups = store.read_history(host)
    previous = next((b for b in reversed(backups) if "generation" in b), backups[-1] if backups else None)
    record = store.take_snapshot(host, name, previous)
    suspicious = is_suspicious(record["added"], counted_sizes(backups),
                               headroom=config.headroom, history=config.history)
    entry = {"snapshot": name, "time": now.isoformat(), "suspicious": suspicious, **record}
    store.write_history(host, backups + [entry])
    store.clear_dirty(host)
    log.info("snapshot host=%s name=%s size=%s added=%s", host, name,
             format_size(record["size"]), format_size(record["added"]))
    if suspicious:
        log.warning("host %s: backup %s added %s, more than its history allows (mean %s); pruning "
                    "will not delete history for it until an administrator runs 'prune --force'",
                    host, name, format_size(record["added"]),
                    format_size(mean(counted_sizes(backups)[-config.history:])))
    return Snapshot(host, name, when)


class PruneResult(NamedTuple):
    """What a prune did (or, under --dry-run, would do)."""
    free: int
    target: int
    deleted: List[Decision]


def store_target(store: Store, config: ServerConfig, histories: Optional[Dict[str, List[dict]]] = None) -> int:
    """The free space this store should keep, from every host's history."""
    if histories is None:
        histories = {h: store.read_history(h) for h in store.hosts()}
    return free_space_target({h: counted_sizes(b) for h, b in histories.items()},
                             headroom=config.headroom, history=config.history)


def prune_store(store: Store, config: ServerConfig, *, now: dt.datetime, order: Optional[str] = None,
                force: bool = False, dry_run: bool = False) -> PruneResult:
    """Delete snapshots, one at a time, until free space reaches the target.  Caller holds the lock."""
    order = order or config.order
    if not dry_run:
        store.clean_leftovers()
    histories = {h: store.read_history(h) for h in store.hosts()}
    target = store_target(store, config, histories)
    free = store.free_bytes()
    if free >= target:
        log.info("prune: %s free, target %s: nothing to delete", format_size(free), format_size(target))
        return PruneResult(free, target, [])
    # A backup larger than its history allows is what a hostile client
    # uploading junk looks like: deleting history to make room for it is
    # exactly what such a client wants.  Leave everything for a person.
    held = sorted(h for h, b in histories.items()
                  if b and b[-1].get("suspicious") and not b[-1].get("accepted"))
    if held and not force:
        raise ByteBackError(
            f"refusing to prune: the last backup of {', '.join(held)} is larger than its history "
            f"allows, and the disc is short ({format_size(free)} free, target {format_size(target)}); "
            "history is left intact: check the host, then run 'byteback prune --force' to accept it")
    for host in held:
        if not dry_run:
            histories[host][-1]["accepted"] = True
            store.write_history(host, histories[host])
        log.warning("prune: accepting the large last backup of host %s (--force)", host)
    if held:
        target = store_target(store, config, histories)
    sizes = {(h, b.get("snapshot")): _history_int(b, "added") for h, bs in histories.items() for b in bs}
    deleted: List[Decision] = []
    for decision in deletion_order(store.snapshots(), now=now, order=order, targets=config.targets):
        snap = decision.snapshot
        if dry_run:
            free += sizes.get((snap.host, snap.name), 0)   # a rough estimate: its own new data
            print(f"would delete {snap.host}/{snap.name}: {decision.reason}")
        else:
            before = free
            store.delete(snap)
            free = store.free_bytes()
            log.info('prune host=%s deleted=%s reason="%s" freed=%s', snap.host, snap.name,
                     decision.reason, format_size(max(0, free - before)))
        deleted.append(decision)
        if free >= target:
            return PruneResult(free, target, deleted)
    raise ByteBackError(f"the disc is still short after deleting all but each host's newest snapshot "
                        f"({format_size(free)} free, target {format_size(target)}); add space to the "
                        "store, or lower 'headroom' in server.conf")


def _refuse_under_sudo(args: argparse.Namespace, *names: str) -> None:
    """Through sudo the caller may be a client that escaped its forced command: no overrides."""
    if not running_under_sudo():
        return
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None)]
    if os.environ.get("BYTEBACK_CONFIG_DIR"):
        given.append("BYTEBACK_CONFIG_DIR")
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used through sudo; an administrator runs "
                         "this command as root directly")


def _server_store(args: argparse.Namespace, config: ServerConfig, runner: Runner) -> Store:
    root = getattr(args, "store", None) or config.store
    if not root:
        try:
            import pwd
            root = pwd.getpwnam("byteback").pw_dir
        except KeyError:
            raise UsageError("no store given: use --store ROOT, or set 'store' in server.conf") from None
    return open_store(root, runner)


def cmd_snapshot(args: argparse.Namespace) -> int:
    """snapshot: make host's current a read-only snapshot (refused inside the interval), then prune."""
    _refuse_under_sudo(args, "store", "force", "config_dir")
    config = load_server_config(args.config_dir)
    store = _server_store(args, config, Runner())
    host = check_host_name(args.host)
    with store.lock():
        snap = snapshot_host(store, host, config, now=now_local(), force=args.force)
        print(f"snapshot {snap.host}/{snap.name} taken")
        try:
            prune_store(store, config, now=now_local())
        except ByteBackError as e:
            log.error("snapshot taken, but %s", e)
            return EXIT_FAILURE
    return EXIT_OK


def _print_plan(plan: Sequence[Decision], now: dt.datetime) -> None:
    rows = [("#", "host", "snapshot", "age", "place")]
    for n, d in enumerate(plan, 1):
        rows.append((str(n) if d.delete else "-", d.snapshot.host, d.snapshot.name,
                     _describe_age(age_days(d.snapshot, now)), d.reason))
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    for r in rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[4])


def cmd_prune(args: argparse.Namespace) -> int:
    """prune: delete snapshots, least important first, until the store has its target free space."""
    _refuse_under_sudo(args, "store", "force", "config_dir")
    config = load_server_config(args.config_dir)
    store = _server_store(args, config, Runner(dry_run=args.dry_run))
    order = args.order or config.order
    now = now_local()
    if args.list:
        target = store_target(store, config)
        print(f"store {store.root} ({store.kind}): {format_size(store.free_bytes())} free, "
              f"target {format_size(target)}; order of deletion ({order}):")
        _print_plan(plan_prune(store.snapshots(), now=now, order=order, targets=config.targets), now)
        return EXIT_OK
    with store.lock():
        result = prune_store(store, config, now=now, order=order, force=args.force, dry_run=args.dry_run)
    if args.dry_run and not result.deleted:
        print(f"nothing to delete: {format_size(result.free)} free, target {format_size(result.target)}")
    return EXIT_OK


# === 8. Client commands (backup) =============================================

# Filesystems whose contents are not data of this machine: kernel views,
# memory, network mounts.  Their mount points are excluded from a backup of /.
NONLOCAL_FSTYPES = frozenset({
    "proc", "sysfs", "tmpfs", "devtmpfs", "devpts", "ramfs", "cgroup", "cgroup2", "pstore",
    "securityfs", "debugfs", "tracefs", "configfs", "fusectl", "mqueue", "hugetlbfs",
    "binfmt_misc", "autofs", "rpc_pipefs", "efivarfs", "bpf", "nsfs", "selinuxfs",
    "nfs", "nfs4", "nfsd", "cifs", "smb3", "smbfs", "ceph", "glusterfs", "9p", "afs",
    "fuse", "sshfs", "squashfs", "iso9660", "overlay", "aufs",
})
# Paths that are never worth keeping (the seed README's list, plus the usual):
# directories keep their empty selves, files go altogether.
JUNK_DIRS = ("/tmp", "/var/tmp", "/var/cache/apt/archives", "/var/backups/localhost", "/lost+found")
JUNK_FILES = ("/swap.file", "/swapfile", "/swap.img", "/swap.filkeye")


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def automatic_excludes(sources: Sequence[str], mounts: Sequence[tuple],
                       extra: Sequence[str] = ()) -> List[str]:
    """rsync --exclude patterns for what a backup of sources should skip by itself.

    A path is excluded only inside a source: a source given explicitly (say
    /tmp/x) is never dropped because an automatic rule covers it.  Mount
    points and junk directories keep their empty directory, so a restored
    system can mount there; `extra` paths (the store, the key) go whole.
    """
    dirs = {p for p, fstype in mounts if fstype in NONLOCAL_FSTYPES or fstype.startswith("fuse.")}
    dirs.update(JUNK_DIRS)
    exact = set(JUNK_FILES) | set(extra)     # excluded whole, not just their contents
    patterns = []
    for path in sorted(dirs | exact):
        if not path.startswith("/") or path == "/":
            continue
        inside = any(_is_within(path, s) for s in sources)
        covers_source = any(_is_within(s, path) for s in sources)
        if inside and not covers_source:
            patterns.append(rsync_escape(path) + ("" if path in exact else "/*"))
    return patterns


def rsync_escape(path: str) -> str:
    """Escape rsync's wildcard characters so a pattern matches only this path."""
    return re.sub(r"([*?\[\\])", r"\\\1", path)


class BackupPlan(NamedTuple):
    """Everything a backup needs, resolved once from the command line and the config files."""
    destination: Destination
    host: str
    sources: List[str]
    excludes: List[str]
    filter_file: Optional[str]
    extra_flags: List[str]
    io_timeout: int
    retries: int
    retry_delay: float
    config_dir: str


def resolve_backup_plan(args: argparse.Namespace) -> BackupPlan:
    """Command-line options over the config files over the defaults."""
    config_dir = args.config_dir
    text = args.destination or read_setting(config_dir, "destination")
    if not text:
        raise UsageError(f"no destination: give --destination (a local path, or user@host:) "
                         f"or write one into {config_dir}/destination")
    destination = parse_destination(text)
    host = check_host_name(args.host or default_host_name())
    sources = [os.path.abspath(os.path.expanduser(s)).rstrip("/") or "/" for s in (args.source or ["/"])]
    for source in sources:
        if not os.path.lexists(source):
            raise ByteBackError(f"source {source} does not exist; check --source")
        if not os.access(source, os.R_OK):
            raise ByteBackError(f"source {source} cannot be read by this user; run as root or pick "
                                "another --source")
    excludes = read_setting_lines(config_dir, "excludes") + list(args.exclude or [])
    filter_file = Path(config_dir) / "rsync_filter"
    extra_flags = [f for line in read_setting_lines(config_dir, "rsync_flags") for f in shlex.split(line)]
    io_timeout = args.io_timeout or read_setting(config_dir, "io_timeout", 300, _positive_int)
    return BackupPlan(destination, host, sources, excludes,
                      str(filter_file) if filter_file.is_file() else None, extra_flags,
                      int(io_timeout), args.retry_number, args.retry_delay, config_dir)


def build_rsync_argv(plan: BackupPlan, target: str, *, backend_options: Sequence[str] = (),
                     auto_excludes: Sequence[str] = (), fake_super: bool = False,
                     progress: bool = False, dry_run: bool = False) -> List[str]:
    """The client's rsync command line (pure).

    NOTE: the server's receive allow-list must accept every option sent here.
    """
    argv = ["rsync", "--archive", "--hard-links", "--xattrs", "--numeric-ids",
            "--delete-excluded", "--delete-during", "--relative", "--partial",
            f"--timeout={plan.io_timeout}", "--stats"]
    argv += list(backend_options)
    if fake_super:
        argv.append("--fake-super")   # keep owners and modes in xattrs without root
    if progress:
        argv.append("--info=progress2")
    if dry_run:
        argv += ["--dry-run", "--itemize-changes"]
    argv += [f"--exclude={p}" for p in auto_excludes]
    argv += [f"--exclude={p}" for p in plan.excludes]
    if plan.filter_file:
        argv.append(f"--filter=merge {plan.filter_file}")
    argv += plan.extra_flags
    argv += ["--", *plan.sources, target]
    return argv


def run_hooks(config_dir: str, phase: str, env: Optional[Dict[str, str]] = None) -> None:
    """Run the executables in <config_dir>/<phase>.d/ in name order; a failure is an error."""
    hook_dir = Path(config_dir) / f"{phase}.d"
    try:
        names = sorted(os.listdir(hook_dir))
    except FileNotFoundError:
        return
    except OSError as e:
        raise ByteBackError(f"cannot read {hook_dir}: {e.strerror}") from None
    for name in names:
        path = hook_dir / name
        # run-parts' rule: skip hidden files, editor backups and package leftovers.
        if (name.startswith(".") or name.endswith(("~", ".dpkg-old", ".dpkg-dist", ".dpkg-new"))
                or not path.is_file() or not os.access(path, os.X_OK)):
            continue
        log.info("running %s hook %s", phase, path)
        try:
            rc = subprocess.run([str(path)], env={**os.environ, **(env or {})}).returncode
        except OSError as e:
            raise ByteBackError(f"{phase} hook {path} could not run: {e.strerror}") from None
        if rc != 0:
            raise ByteBackError(f"{phase} hook {path} failed with exit code {rc}"
                                + ("; the backup was not started" if phase == "pre-backup" else ""))


def run_rsync(argv: Sequence[str], *, show: bool) -> tuple:
    """Run rsync, passing its output through when show; return (exit code, output tail)."""
    log.debug("run: %s", shlex.join(argv))
    try:
        proc = subprocess.Popen(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    except FileNotFoundError:
        raise missing_program(argv[0]) from None
    tail = b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        if show:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        tail = (tail + chunk)[-65536:]
    proc.stdout.close()
    return proc.wait(), tail.decode("utf-8", "replace")


def parse_rsync_stats(output: str) -> Optional[int]:
    """'Total bytes sent: 1,234' from rsync --stats output, or None."""
    m = re.search(r"^Total bytes sent: ([\d,.]+)", output, re.M)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else None


def rsync_with_retries(argv: Sequence[str], *, retries: int, delay: float, show: bool) -> tuple:
    """Run rsync, again after `delay` on network-class failures; return (exit code, output)."""
    for attempt in range(1, retries + 1):
        rc, output = run_rsync(argv, show=show)
        if rc in RSYNC_OK_CODES:
            if rc == 24:
                log.info("some files vanished while they were copied (rsync exit 24): normal on a live system")
            return rc, output
        meaning = RSYNC_EXIT_MEANINGS.get(rc, "unknown error")
        last_lines = " | ".join(l for l in output.strip().splitlines()[-3:] if l.strip())
        if rc in RSYNC_RETRY_CODES and attempt < retries:
            log.warning("rsync exit %d (%s); trying again in %s (try %d of %d)", rc, meaning,
                        format_duration(delay), attempt + 1, retries)
            time.sleep(delay)
            continue
        raise ByteBackError(f"rsync failed with exit code {rc} ({meaning}) after {attempt} "
                            f"{'try' if attempt == 1 else 'tries'}: {last_lines}")
    raise AssertionError("unreachable")   # pragma: no cover


def record_backup_result(state_dir: Path, entry: dict) -> None:
    """Keep the last attempt (and the last success) for `status`."""
    path = state_dir / "last-backup.json"
    try:
        previous = read_json(path, {})
    except ByteBackError:
        previous = {}
    state = {"last_attempt": entry,
             "last_success": entry if entry["result"] == "ok" else
             (previous.get("last_success") if isinstance(previous, dict) else None)}
    write_json_atomically(path, state)


def backup_local(plan: BackupPlan, args: argparse.Namespace) -> Optional[int]:
    """Back up into a store on this machine: rsync, then the server's own snapshot and prune."""
    runner = Runner()
    store = open_store(plan.destination.path, runner, create=True)
    config = load_server_config(plan.config_dir)
    snaps = store.snapshots(plan.host)
    refusal = interval_refusal(snaps[-1] if snaps else None, now_local(), config.min_interval)
    if refusal and not args.dry_run:    # say so before copying anything, not after
        raise ByteBackError(refusal)
    current = store.prepare_host(plan.host)
    store.mark_dirty(plan.host, now_local())
    config_files = [str(Path(plan.config_dir) / "key")]
    auto = automatic_excludes(plan.sources, _read_mounts(), [str(store.root)] + config_files)
    argv = build_rsync_argv(plan, f"{current}/", backend_options=store.rsync_options(plan.host),
                            auto_excludes=auto, fake_super=os.geteuid() != 0,
                            progress=args.progress, dry_run=args.dry_run)
    rc, output = rsync_with_retries(argv, retries=plan.retries, delay=plan.retry_delay,
                                    show=args.verbose > 0 or args.progress or args.dry_run)
    if args.dry_run:
        return parse_rsync_stats(output)
    with store.lock():
        snap = snapshot_host(store, plan.host, config, now=now_local())
        log.info("backup of %s complete: snapshot %s", plan.host, store.snapshot_path(snap))
        prune_store(store, config, now=now_local())
    return parse_rsync_stats(output)


def cmd_backup(args: argparse.Namespace) -> int:
    """backup: copy this machine's files to the destination, then have a snapshot taken."""
    plan = resolve_backup_plan(args)
    if not plan.destination.is_local:
        raise UsageError(f"{plan.destination.host}: backups to a remote server are not supported "
                         "by this version yet; give a local store path as --destination")
    state_dir = client_state_dir()
    with Lock(state_dir / "backup.lock", "backup"):
        started = now_local()
        entry = {"start": started.isoformat(), "host": plan.host,
                 "destination": plan.destination.path, "result": "failed"}
        try:
            run_hooks(plan.config_dir, "pre-backup")
            entry["bytes_sent"] = backup_local(plan, args)
            entry["result"] = "ok"
        except ByteBackError as e:
            entry["error"] = str(e)
            raise
        finally:
            entry["end"] = now_local().isoformat()
            if not args.dry_run:
                record_backup_result(state_dir, entry)
            hook_error = None
            try:
                run_hooks(plan.config_dir, "post-backup", {"BYTEBACK_RESULT": entry["result"]})
            except ByteBackError as e:
                hook_error = e
        if hook_error:
            raise hook_error
    return EXIT_OK


# === 9. CLI dispatch =========================================================

CRON_COMMANDS = ("backup", "prune", "snapshot")   # quiet unless something is wrong


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="say what is done (-vv: also every command run)")
    parser.add_argument("--config-dir", default=argparse.SUPPRESS, metavar="DIR",
                        help="configuration directory (default: $BYTEBACK_CONFIG_DIR or /etc/byteback)")


def build_parser() -> argparse.ArgumentParser:
    """The command line: one subparser per command that works."""
    parser = argparse.ArgumentParser(
        prog="byteback", description="Maintenance-free client/server backups: rsync over "
        "OpenSSH into read-only snapshots that are pruned automatically.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage (status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).")
    parser.add_argument("--version", action="version", version=f"byteback {VERSION}")
    parser.add_argument("--config-dir", metavar="DIR",
                        help="configuration directory (default: $BYTEBACK_CONFIG_DIR or /etc/byteback)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("backup", help="back this machine up now (run it from cron)",
                       description="Copy files with rsync to the destination, then have a read-only "
                       "snapshot taken and old snapshots pruned.")
    _add_common(p)
    p.add_argument("--destination", metavar="DEST",
                   help="a local store path, or user@host: (default: <config-dir>/destination)")
    p.add_argument("--source", action="append", metavar="DIR",
                   help="what to back up; repeat for several (default: /)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="an rsync exclude pattern; repeat for several (adds to <config-dir>/excludes)")
    p.add_argument("--host", metavar="NAME", help="this machine's name in the store (default: its FQDN)")
    p.add_argument("--io-timeout", type=_positive_int, metavar="SECONDS",
                   help="rsync's I/O timeout (default: <config-dir>/io_timeout or 300)")
    p.add_argument("--retry-number", type=_positive_int, default=5, metavar="N",
                   help="tries before giving up on network failures (default: 5)")
    p.add_argument("--retry-delay", type=parse_duration, default=600.0, metavar="DURATION",
                   help="pause between tries, e.g. 600 or 10m (default: 10m)")
    p.add_argument("--progress", action="store_true", help="show rsync's overall progress")
    p.add_argument("--dry-run", action="store_true", help="show what would be copied; change nothing")
    p.set_defaults(func=cmd_backup)

    p = sub.add_parser("snapshot", help="(server) snapshot a host's current backup, then prune",
                       description="Make <store>/<host>/current a read-only snapshot named by the "
                       "time, refused inside the minimum interval; then prune.")
    _add_common(p)
    p.add_argument("--host", required=True, help="the host whose backup to snapshot")
    p.add_argument("--store", metavar="ROOT", help="the store root (default: from server.conf)")
    p.add_argument("--force", action="store_true",
                   help="take it even inside the minimum interval (administrators only)")
    p.set_defaults(func=cmd_snapshot)

    p = sub.add_parser("prune", help="(server) delete old snapshots until free space meets the target",
                       description="Delete snapshots one at a time, least important first, until the "
                       "store's free space reaches headroom x the mean size of recent backups.")
    _add_common(p)
    p.add_argument("--store", metavar="ROOT", help="the store root (default: from server.conf)")
    p.add_argument("--order", choices=("importance", "age"), help="order of deletion (default: server.conf, else importance)")
    p.add_argument("--list", action="store_true", help="print the order of deletion with reasons; delete nothing")
    p.add_argument("--dry-run", action="store_true", help="say what would be deleted; delete nothing")
    p.add_argument("--force", action="store_true",
                   help="accept a suspiciously large backup and prune for it (administrators only)")
    p.set_defaults(func=cmd_prune)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Parse, dispatch, and map failures to exit codes; the only place they are printed."""
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse: --help (0) or a usage error (2)
        return int(e.code or 0)
    if not getattr(args, "config_dir", None):
        args.config_dir = os.environ.get("BYTEBACK_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    setup_logging(getattr(args, "verbose", 0), quiet=args.command in CRON_COMMANDS)
    try:
        return int(args.func(args) or EXIT_OK)
    except ByteBackError as e:
        log.error("%s", e)
        return e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return 130
    except Exception:
        import traceback
        traceback.print_exc()
        log.critical("internal error in %s; please report it with the traceback above", args.command)
        return EXIT_FAILURE


if __name__ == "__main__":
    sys.modules.setdefault("byteback", sys.modules[__name__])
    sys.exit(main())
