#!/usr/bin/env python3
"""byteback: maintenance-free client/server backups for Linux (one file, stdlib only).

Clients push with rsync over OpenSSH; the server keeps read-only snapshots
(btrfs, or hard-linked trees on any filesystem) and prunes old ones by itself
so the disc never fills.  See README.md for set-up and the trust model.

Sections (grep -n '^# [=-][=-][=-] '), pure ones first; each uses only what
stands above it (tests/unit/test_structure.py):
    1 constants & errors      2 utilities: values as text; 2b running commands,
      logging; 2c locks and files
    3 destinations & names    4 configuration
    5 retention (pure): the order of deletion; 5b backup sizes, the target,
      suspicion; 5c the prune plan's values; 5d plan_prune
    6 the receive policy (pure): rsync's options, the server's command line;
      6b listing patterns; 6c the commands a client may send
    7 store backends: files and trees; 7b btrfs through the kernel; 7c the
      store; 7d the two backends
    8 server commands: snapshot, prune; 8b listing files in snapshots; 8c host
      accounts and the userns receiver; 8d the forced command (receive);
      8e setup-host and keys; 8f scheduled jobs; 8g setup-server and adoption
    9 client: what a backup sends (excludes, rsync's argv, hooks, retries)
    10 databases (consistent copies of running MariaDB/MySQL, PostgreSQL);
      10b pure parts; 10c finding servers; 10d talking to them; 10e the methods;
      10f restore --database and the private view
    11 client commands: backing up; 11b setup-client, install-cron, backup;
      11c restore
    12 status                 13 CLI dispatch

Exit codes: 0 ok, 1 failure, 2 usage; `status` uses the Nagios codes
0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
"""
from __future__ import annotations

import argparse
import bisect
import configparser
import contextlib
import datetime as dt
import errno
import fcntl
import functools
import gc
import heapq
import itertools
import json
import logging
import math
import operator
import os
import pwd
import re
import select
import shlex
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path
from typing import (Callable, Container, Dict, Iterable, Iterator, List, NamedTuple, NoReturn, Optional, Sequence,
                    Set, Union)

# Every command starts Python afresh, the server's several times a backup (issue 14):
# modules only some commands need (ctypes, hashlib, logging.handlers, socket,
# tempfile) are imported where they are used, not here.


# === 1. Constants & errors ===================================================

VERSION = "0.1.0"

EXIT_OK, EXIT_FAILURE, EXIT_USAGE = 0, 1, 2
# snapshot --when-told that did nothing: not told to go (in time), or another run of
# its host was waiting already.  Not 0, so the guard that told it can tell (sysexits' EX_TEMPFAIL).
EXIT_NOT_TOLD = 75
NAGIOS_OK, NAGIOS_WARNING, NAGIOS_CRITICAL, NAGIOS_UNKNOWN = 0, 1, 2, 3

DEFAULT_CONFIG_DIR = "/etc/byteback"
SNAPSHOT_FORMAT = "%Y-%m-%dT%H:%M%z"           # the original byteback's names
SNAPSHOT_FORMAT_SECONDS = "%Y-%m-%dT%H:%M:%S%z"  # only when a minute is taken
STATE_DIR_NAME = ".byteback"                   # <store>/.byteback: history, run/, sessions/
# How a server keeps a client's owners (server.conf: receiver; README "Receivers"):
# fakesuper  the shared backup user's rsync --fake-super (owners in xattrs)
# userns     each host's own account, its rsync root of a user namespace over the
#            host's own uid range (real owners on disc, shifted)
RECEIVERS = ("fakesuper", "userns")
# Paths that go into sudoers, authorized_keys and cron lines: nothing to quote there.
SAFE_PATH_RE = re.compile(r"/[A-Za-z0-9/._+-]*\Z")

# Importance target ages, in days, by name (server.conf: targets = week).
# "original" is the original README's list: "0, 1, 2, 3, 7, 14, 21, 28, 56,
# and 112 days".  simulate measured that it can miss a day of the last week;
# "week" keeps every one, while thinning by relative gap (section 5) spaces
# the older snapshots on a widening scale by itself (README: "Choosing the
# targets" has the figures).
ORIGINAL_TARGET_DAYS = (0, 1, 2, 3, 7, 14, 21, 28, 56, 112)
TARGET_PRESETS = {"original": ORIGINAL_TARGET_DAYS, "week": (0, 1, 2, 3, 4, 5, 6, 7)}
DEFAULT_TARGET_DAYS = TARGET_PRESETS["week"]

# rsync exit codes that mean "the network or the peer went away": the client
# retries these (and ssh's own 255) after a delay.  24 is "some files vanished
# while we copied them", which is normal on a live system.
RSYNC_RETRY_CODES = frozenset({10, 11, 12, 20, 21, 22, 30, 35, 255})
RSYNC_OK_CODES = frozenset({0, 24})
# What `snapshot --when-told` waits for on stdin before it takes the snapshot:
# at most server.conf's rsync_timeout, the limit of all a client's session asks
# root for; for a push that outlasts it a fresh run takes the snapshot
# (_push_then_complete).
GO_WORD = "go"
# How often a waiting run has the store write out what the push has written so far
# (write_out_store): the snapshot must have every byte on disc before it is taken,
# and a full backup's 1.4 GiB took 1.7 s to write after rsync, while the client
# waited; while rsync runs the disc is otherwise idle.
WRITE_OUT_EVERY = 1.0
# Root's own directory of the waiting runs' locks (one waiting run per host):
# /run is root's alone, so nobody else can make it or plant anything in it.
WHEN_TOLD_LOCK_DIR = Path("/run/byteback")
# ping's answer when a snapshot now would be refused (the minimum interval).
WAIT_PREFIX = "wait: "
# How a push that took its snapshot itself ends its stderr (_push_then_complete):
# complete's exit code, and when the next snapshot may be taken.
COMPLETE_LINE = "complete: exit {code}, next snapshot in {wait}s"
COMPLETE_LINE_RE = re.compile(r"^byteback: complete: exit (\d+), next snapshot in (\d+)s$", re.M)
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
              "sudo": "sudo", "visudo": "sudo", "newuidmap": "uidmap", "newgidmap": "uidmap",
              "useradd": "passwd", "usermod": "passwd"}


class ByteBackError(Exception):
    """An expected failure: main() prints 'byteback: <message>' and exits with exit_code."""

    exit_code = EXIT_FAILURE

    def __init__(self, message: str, exit_code: Optional[int] = None, *, logged: bool = False):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code
        # True when syslog already has the full story (the guard's REFUSED
        # line): main() then prints the message on stderr only, not twice to syslog.
        self.logged = logged


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


DEFAULT_INSTALL_PATH = "/usr/local/bin/byteback.pyz"
PACKAGED_PATH = "/usr/bin/byteback"        # where the Debian package (./build.sh deb) puts it
DEFAULT_UNIT_DIR = "/etc/systemd/system"


# === 2. Utilities: values as text (durations, sizes, tables, escaped names), the clock ===

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


def format_table(rows: Sequence[Sequence[str]]) -> str:
    """Rows of cells as aligned columns two spaces apart; the last column runs free."""
    return format_columns(list(zip(*rows)))


def format_columns(columns: Sequence[Sequence[str]]) -> str:
    """format_table of the table whose columns (of cells, each column as long) are given.

    Each column is padded and the lines joined by the interpreter's own loops,
    none of Python's a cell: prune --list writes a line for each of 100,000 snapshots."""
    if not columns or not columns[0]:
        return ""
    *aligned, free = columns
    padded = [map(str.ljust, column, itertools.repeat(max(map(len, column)) + 2)) for column in aligned]
    return "\n".join(map(str.rstrip, map("".join, zip(*padded, free))))


_ESCAPES = {"\\": "\\\\", "\n": "\\n", "\r": "\\r", "\t": "\\t"}


def printable(text: str) -> str:
    """text as it may go to a terminal or a log: every character a terminal would act on escaped.

    File names come from clients: ESC sequences, newlines (a forged row or
    log line), bidi overrides.  Controls and other unprintable characters
    show as \\xNN or \\uNNNN, a byte that was not UTF-8 as \\xNN, and a
    backslash as two, so what is shown reads back unambiguously.  JSON
    output never goes through here: it stays exact.
    """
    if text.isprintable() and "\\" not in text:
        return text
    out = []
    for c in text:
        code = ord(c)
        if c in _ESCAPES:
            out.append(_ESCAPES[c])
        elif 0xDC80 <= code <= 0xDCFF:          # surrogateescape: a byte that was not UTF-8
            out.append(f"\\x{code - 0xDC00:02x}")
        elif c.isprintable():
            out.append(c)
        else:
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000
                       else f"\\U{code:08x}")
    return "".join(out)


class _PrintableFormatter(logging.Formatter):
    """Log lines hold file names and client words: escape them (the traceback stays as it is)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        record.message = printable(record.message)
        return super().formatMessage(record)


def now_local() -> dt.datetime:
    """The clock, read in one place: an aware datetime in the machine's time zone."""
    return dt.datetime.now(dt.timezone.utc).astimezone()


class RunStopped(ByteBackError):
    """A time limit passed, or the run was asked to stop (time_limit)."""


class _Stop:
    """A time limit (SIGALRM) or a request to stop (SIGTERM, SIGHUP: sudo relays them from
    the session that started us) ends a run with a ByteBackError, except inside
    uninterrupted(), which finishes first: a snapshot and its history entry are
    written together, and current is never left deleted half-way through a roll-back."""
    why: Optional[str] = None
    held = 0


@contextlib.contextmanager
def time_limit(limit: float, what: str) -> Iterator[None]:
    """The block ends after `limit` seconds, or when this process is asked to stop."""
    def stop(signum: int, _frame) -> None:
        why = (f"{what} did not finish within {limit:.0f}s (server.conf rsync_timeout) and was stopped"
               if signum == signal.SIGALRM else f"{what} was stopped: its client went away")
        if _Stop.held:
            _Stop.why = _Stop.why or why
        else:
            raise RunStopped(why)
    signals = (signal.SIGALRM, signal.SIGTERM, signal.SIGHUP)
    before = [signal.signal(signum, stop) for signum in signals]
    signal.alarm(max(1, math.ceil(limit)))
    try:
        yield
    finally:
        signal.alarm(0)          # an alarm left pending would outlive exec (rsync, after a prepare)
        for signum, handler in zip(signals, before):
            signal.signal(signum, handler)


@contextlib.contextmanager
def uninterrupted() -> Iterator[None]:
    """time_limit's stop waits until the block is done."""
    _Stop.held += 1
    try:
        yield
    finally:
        _Stop.held -= 1
        why, _Stop.why = (_Stop.why, None) if not _Stop.held else (None, _Stop.why)
        if why:
            raise RunStopped(why)


# --- 2b. Running commands, logging, the process around a command -------------

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
    # Records for the administrator's log only (the guard's REFUSED line with
    # the client's own command) stay off stderr, which the client reads.
    err.addFilter(lambda record: not getattr(record, "syslog_only", False))
    err.setFormatter(_PrintableFormatter("byteback: %(message)s"))
    log.addHandler(err)
    # Without this check every record on a machine without syslog prints a
    # "--- Logging error ---" traceback (containers, minimal CI images).
    try:
        if stat.S_ISSOCK(os.stat("/dev/log").st_mode):
            from logging.handlers import SysLogHandler
            sys_handler = SysLogHandler(address="/dev/log")
            sys_handler.ident = "byteback: "
            sys_handler.setFormatter(_PrintableFormatter())
            sys_handler.setLevel(logging.INFO)
            sys_handler.addFilter(lambda record: not getattr(record, "stderr_only", False))
            log.addHandler(sys_handler)
    except OSError:
        pass


def end_process(code: int) -> NoReturn:
    """Exit with `code` at once: the log's handlers, stdout and stderr flushed, then
    os._exit, without the interpreter's teardown of every module (~10 ms a process; a
    backup waits for three to end: the client, the forced command, the root snapshot
    run; issue 14).  Nothing of byteback's waits for the exit: its files, locks and
    temporary directories are closed and removed by their own `with`."""
    logging.shutdown()
    for stream in (sys.stdout, sys.stderr):
        with contextlib.suppress(OSError, ValueError):     # a closed pipe: nothing more to say
            stream.flush()
    os._exit(code)


class Runner:
    """The one place external commands run: list argv only, never a shell.

    Destructive by default: under --dry-run a command runs only when its
    caller says it changes nothing (destructive=False).
    """

    def __init__(self, dry_run: bool = False):
        self.dry_run = dry_run

    def run(self, argv: Sequence[str], *, destructive: bool = True, check: bool = True,
            input: Optional[str] = None, timeout: Optional[float] = None,
            capture: bool = True, env: Optional[Dict[str, str]] = None,
            stdin=None, stdout=None, stderr=None, errors: str = "surrogateescape"
            ) -> subprocess.CompletedProcess:
        """Run argv to its end.  capture: stdout and stderr come back as text (unless
        stdout/stderr name another file or subprocess.DEVNULL); else they are ours.
        Raises CommandFailed (check), or ByteBackError for a missing program or a timeout."""
        argv = self._argv(argv)
        if destructive and self.dry_run:
            log.info("dry-run: would run %s", shlex.join(argv))
            return subprocess.CompletedProcess(argv, 0, "", "")
        pipe = subprocess.PIPE if capture else None
        try:
            proc = subprocess.run(
                argv, input=input, timeout=timeout, env=self._env(env, capture), stdin=stdin,
                stdout=pipe if stdout is None else stdout, stderr=pipe if stderr is None else stderr,
                universal_newlines=True, errors=errors)
        except FileNotFoundError:
            raise missing_program(argv[0]) from None
        except subprocess.TimeoutExpired:
            raise ByteBackError(f"{shlex.join(argv)} did not finish within {timeout:.0f}s") from None
        if check and proc.returncode != 0:
            raise CommandFailed(argv, proc.returncode, proc.stderr or "")
        return proc

    def start(self, argv: Sequence[str], *, env: Optional[Dict[str, str]] = None,
              parsed: bool = False, **popen) -> subprocess.Popen:
        """Start argv and hand back the process, for output streamed as it comes or a
        session kept open on a pipe.  parsed: its output is read, so in the C locale."""
        argv = self._argv(argv)
        try:
            return subprocess.Popen(argv, env=self._env(env, parsed), **popen)
        except FileNotFoundError:
            raise missing_program(argv[0]) from None

    @staticmethod
    def _argv(argv: Sequence[str]) -> List[str]:
        if not isinstance(argv, (list, tuple)):
            raise TypeError("argv must be a list, never a shell string")
        argv = [str(a) for a in argv]
        log.debug("run: %s", shlex.join(argv))
        return argv

    @staticmethod
    def _env(env: Optional[Dict[str, str]], parsed: bool) -> Dict[str, str]:
        run_env = dict(os.environ if env is None else env)
        if parsed:
            run_env["LC_ALL"] = "C"      # messages and numbers as this code parses them
        return run_env


class Context(NamedTuple):
    """What a command takes from the process it runs in, passed in (a test picks its own)."""
    euid: int                           # whose rights it has: 0 is root
    sleep: Callable[[float], None]      # waiting between tries


def process_context() -> Context:
    """This process's own: its effective user id and the real clock's sleep."""
    return Context(os.geteuid(), time.sleep)


def install_hint(packages: Sequence[str], *, root: bool) -> str:
    """The command that installs these Debian packages, as this user would type it (pure)."""
    return ("" if root else "sudo ") + "apt-get install " + " ".join(packages)


def missing_program(program: str) -> ByteBackError:
    """The error for a program that is not installed, saying how to install it."""
    name = os.path.basename(program)
    return ByteBackError(f"{name} is not installed; install it with: "
                         f"{install_hint([PACKAGE_OF.get(name, name)], root=os.geteuid() == 0)}")


def _confirm(question: str) -> bool:
    """Ask on the terminal; anything but y or yes is a no."""
    try:
        answer = input(f"byteback: {question} [y/N] ")
    except EOFError:
        return False
    return answer.strip().lower() in ("y", "yes")


def ensure_programs(programs: Sequence[str], *, install: bool, euid: int) -> None:
    """Make sure the programs are on PATH, else install their packages or say how.

    As root with apt-get, byteback installs them when told to (--install-missing)
    or when a person at a terminal says yes.  cron has no terminal, so a backup
    from cron never installs anything unasked; it fails with the command to type.
    """
    missing = [p for p in programs if not shutil.which(p)]
    if not missing:
        return
    packages = sorted({PACKAGE_OF.get(p, p) for p in missing})
    root = euid == 0
    argv = ["apt-get", "install", "-y", *packages]
    can_install = root and shutil.which("apt-get") is not None
    interactive = sys.stdin.isatty() and sys.stderr.isatty()
    not_installed = f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} not installed"
    if can_install and (install or (interactive and _confirm(f"{not_installed}; run '{shlex.join(argv)}' now?"))):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        proc = Runner().run(argv, check=False, capture=not interactive, env=env)
        if proc.returncode != 0:
            # A machine that never ran apt-get update has no package lists.
            Runner().run(["apt-get", "update"], capture=not interactive, env=env)
            Runner().run(argv, capture=not interactive, env=env)
        still = [p for p in missing if not shutil.which(p)]
        if still:
            raise ByteBackError(f"{shlex.join(argv)} ran, but {', '.join(still)} is still not on "
                                f"PATH ({os.environ.get('PATH', '')}); check the PATH")
        log.warning("installed %s (%s)", " ".join(packages), shlex.join(argv))
        return
    message = (f"{not_installed}; install {'it' if len(missing) == 1 else 'them'} with: "
               f"{install_hint(packages, root=root)}")
    if can_install:
        message += " (or run this again with --install-missing)"
    raise ByteBackError(message)


def program_path() -> str:
    """This program's path as it was started: sudoers and authorized_keys lines name it so."""
    return os.path.abspath(sys.argv[0])


def default_server_program() -> str:
    """byteback's path on a server: the package's when this copy is the package's, else the zipapp's."""
    return PACKAGED_PATH if os.path.realpath(sys.argv[0]) == PACKAGED_PATH else DEFAULT_INSTALL_PATH


def running_under_sudo(euid: int) -> bool:
    """True when sudo started us for another user (root-side code trusts nothing then)."""
    return euid == 0 and bool(os.environ.get("SUDO_USER"))


# What a root-side command keeps of its caller's environment under sudo:
# sudo itself passes TZ and the locale on, and a zone of the caller's
# choosing made snapshot names no pattern reads back (issue 8, class 7).
SUDO_KEPT_ENV = ("SUDO_USER", "SUDO_UID", "SUDO_GID", "SUDO_COMMAND")
SAFE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"}


def scrub_environment(environ) -> None:
    """Under sudo: drop everything the caller chose, so the clock's zone is /etc/localtime's."""
    kept = {k: environ[k] for k in SUDO_KEPT_ENV if k in environ}
    environ.clear()
    environ.update(kept, **SAFE_ENV)
    time.tzset()


# Mount-namespace calls (linux/sched.h, linux/mount.h), through libc.
CLONE_NEWNS, MS_BIND, MS_REC, MS_PRIVATE = 0x00020000, 4096, 16384, 1 << 18


def _libc_call(name: str, *args) -> None:
    import ctypes
    libc = ctypes.CDLL(None, use_errno=True)
    func = getattr(libc, name)
    if name == "mount":
        func.argtypes = [ctypes.c_char_p, ctypes.c_char_p, ctypes.c_char_p, ctypes.c_ulong, ctypes.c_void_p]
    if func(*args) != 0:
        err = ctypes.get_errno()
        raise OSError(err, f"{name}: {os.strerror(err)}")


def sync_filesystem(path: str) -> None:
    """Write out the dirty data of the filesystem holding path (syncfs(2))."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        _libc_call("syncfs", fd)
    except OSError as e:
        log.info("syncfs %s: %s", path, e)
    finally:
        os.close(fd)


# --- 2c. Locks and files -----------------------------------------------------

class LockBusy(ByteBackError):
    """Another process holds the lock."""


class Lock:
    """An exclusive, non-blocking flock on a file; a second holder is refused.

    A lock file anyone else can open is a lock anyone can hold forever
    (flock needs only a read-only descriptor: issue 8, class 6).  So a lock
    file is a plain 0600 file of `owner` (default: whoever takes the lock;
    root may also own a session lock); anything else found at its path (a
    0644 file someone may still hold open, a directory, a FIFO, a link) is
    removed with a log line and a fresh file made in its place.
    """

    def __init__(self, path: Path, what: str, owner: Optional[tuple] = None):
        self.path, self.what, self.owner, self._fd = Path(path), what, owner, -1

    def __enter__(self) -> "Lock":
        if self._fd >= 0:
            return self          # taken already (take_session hands back a held lock)
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._fd = self._open()
        except OSError as e:
            raise ByteBackError(f"cannot open lock file {self.path}: {e.strerror}; "
                                f"check the permissions of {self.path.parent}") from None
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(self._fd)
            self._fd = -1
            if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise LockBusy(f"another {self.what} is running (lock {self.path}); "
                                    "try again when it has finished") from None
            raise
        return self

    def _open(self) -> int:
        uid, gid = self.owner or (os.geteuid(), os.getegid())
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK,
                             0o600)
            except OSError as e:
                if e.errno not in (errno.ELOOP, errno.EISDIR, errno.ENXIO, errno.EACCES):
                    raise
            else:
                st = os.fstat(fd)
                if (stat.S_ISREG(st.st_mode) and st.st_nlink == 1 and not st.st_mode & 0o077
                        and st.st_uid in (uid, 0)):
                    if st.st_uid != uid and os.geteuid() == 0:
                        os.fchown(fd, uid, gid)      # root made it: the backup user takes it too
                    return fd
                os.close(fd)
            remove_hostile_entry(self.path, "lock files are 0600 files of their user")
        raise OSError(errno.EPERM, "it keeps being replaced by something that is not a lock file")

    def keep_across_exec(self) -> None:
        """Let a program we exec into hold the lock until it exits."""
        os.set_inheritable(self._fd, True)

    def __exit__(self, *exc) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def lock_holders(path: Path) -> List[int]:
    """The processes holding a flock on path (read from /proc/locks, taking nothing)."""
    holders = []
    try:
        inode = os.stat(path).st_ino
        with open("/proc/locks") as f:
            for line in f:
                fields = line.split()
                # "1: FLOCK ADVISORY WRITE <pid> <maj:min:inode> 0 EOF"; waiters have a "->" field.
                if len(fields) > 5 and fields[1] == "FLOCK" and fields[5].rsplit(":", 1)[-1] == str(inode):
                    with contextlib.suppress(ValueError):
                        holders.append(int(fields[4]))
    except OSError:
        pass
    return holders


def flock_held(path: Path) -> bool:
    """Whether any process holds a flock on path."""
    return bool(lock_holders(path))


def write_file_atomically(path: Path, text: str, mode: int = 0o644, *, durable: bool = True) -> None:
    """Write text to path so a crash leaves either the old or the new file, never half.

    durable=False: without its two fsyncs, for a file whose loss or garbling in a
    crash costs only a question asked again (the client's server hint): a crash may
    then leave the old file, the new one, or on some filesystems an empty one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    # A new file, never one found at the (predictable) name: in a directory
    # others can write (status --textfile's), a hard link planted there would
    # have root truncate and rewrite whatever it points to.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(tmp)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, mode)
    try:
        _write_to_new_file(fd, text, mode, durable)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    if not durable:
        return
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _write_to_new_file(fd: int, text: str, mode: int, durable: bool) -> None:
    """Write text into the file just created at fd, and close it: its data on disc
    first where durable, then its mode set on the file itself (its name may be
    another's by now)."""
    with os.fdopen(fd, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        if durable:
            os.fsync(f.fileno())
        os.fchmod(f.fileno(), mode)


def write_json_atomically(path: Path, data: object, *, durable: bool = True) -> None:
    """Write data as JSON, atomically (see write_file_atomically)."""
    write_file_atomically(path, json.dumps(data, indent=1, sort_keys=True) + "\n", durable=durable)


def write_new_json(path: Path, data: object, mode: int = 0o644) -> None:
    """Write data as JSON into a new file at path, on disc before this returns.  Where
    anything is at path already (a symlink, say), write_json_atomically replaces it.

    One fsync, no rename: for a file whose absence means the same as a half-written
    one (a reader takes either as no file), which write_file_atomically's second
    fsync, of the directory, would only make slower.  The fsync of a new file makes
    its name durable too on btrfs (the log records a new inode's name) and on
    journalling filesystems (the create is in the same transaction)."""
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except FileExistsError:
        write_file_atomically(path, text, mode)
        return
    try:
        _write_to_new_file(fd, text, mode, durable=True)
    except BaseException:
        # A full disc, say: what was created goes, or it would stand, empty, for the
        # file (a reader takes it as none, and a writer that only writes where nothing
        # is would never write it again).
        with contextlib.suppress(OSError):
            os.unlink(path)
        raise


def remove_hostile_entry(path: Path, rule: str) -> None:
    """Remove what was planted at path (a file, a link, a FIFO, a whole directory), saying so.

    For the places the backup user can write into (.byteback/run/): root
    treats what it finds there as hostile, and recovers instead of failing.
    Raises OSError only when the entry cannot be removed.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    kind = ("directory" if stat.S_ISDIR(st.st_mode) else "symlink" if stat.S_ISLNK(st.st_mode)
            else "file" if stat.S_ISREG(st.st_mode) else "special file")
    log.warning("removing %s: a %s of uid %d, mode %04o, %d bytes, modified %s; %s", path, kind, st.st_uid,
                stat.S_IMODE(st.st_mode), st.st_size,
                dt.datetime.fromtimestamp(st.st_mtime, dt.timezone.utc).isoformat(timespec="seconds"), rule)
    if stat.S_ISDIR(st.st_mode):
        shutil.rmtree(path)         # fd-based on Linux: never follows a link planted inside
    else:
        os.unlink(path)


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


def read_untrusted_json(path: Path, limit: int, owner: Optional[int] = None) -> object:
    """The JSON in a regular file that someone else may have written, or None: never through
    a symlink, never blocking on a FIFO, at most `limit` bytes read, nothing raised.
    owner: None too unless the file opened belongs to this uid."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or owner is not None and st.st_uid != owner:
            return None
        return json.loads(os.read(fd, limit).decode("utf-8"))
    except (OSError, ValueError, RecursionError):       # RecursionError: '[' nested thousands deep
        return None
    finally:
        os.close(fd)


def _is_within(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def open_dir_no_symlinks(path: str) -> int:
    """An O_PATH descriptor of the directory at absolute path, reached without following a symlink.

    OSError (ENOTDIR, ELOOP) if any component is a symlink: whoever owns a
    component could otherwise point root's bind mount or chown elsewhere.
    """
    flags = os.O_PATH | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open("/", flags)
    try:
        for part in path.split("/"):
            if part in ("", "."):
                continue
            if part == "..":
                raise OSError(errno.EINVAL, "a path with '..'", path)
            try:
                inner = os.open(part, flags, dir_fd=fd)
            except OSError as e:
                raise OSError(e.errno, f"{e.strerror} (a symlink on the way?)", path) from None
            os.close(fd)
            fd = inner
        return fd
    except BaseException:
        os.close(fd)
        raise


# === 3. Destinations & names =================================================

# Host names become directory names on the server, words in authorized_keys and
# sudoers lines, and file names in .byteback/: letters, digits, dots, dashes and
# underscores (real host names have them: db_1), starting with a letter or
# digit, so a name can never be '.' or '..', hide among dot-files, contain '/',
# start an option ('-'), or carry quotes, spaces, glob or shell characters.
# NOTE: the one rule for every host name; is_host_name is its only reader.
HOST_NAME_CHARS = "A-Za-z0-9._-"
HOSTNAME_RE = re.compile(rf"[A-Za-z0-9][{HOST_NAME_CHARS}]{{0,252}}\Z")
SNAPSHOT_NAME_RE = re.compile(
    r"[0-9]{4}-[0-9]{2}-[0-9]{2}T[0-9]{2}:[0-9]{2}(?::[0-9]{2})?(?:[+-][0-9]{2}:?[0-9]{2}|Z)\Z")


def is_host_name(name: object) -> bool:
    """True if name is a safe host name (the one rule: HOSTNAME_RE, no '..', at most 253)."""
    return isinstance(name, str) and bool(HOSTNAME_RE.match(name)) and ".." not in name


def check_host_name(name: str) -> str:
    """Return name if it is a safe host name, else raise ByteBackError saying why."""
    if not is_host_name(name):
        raise ByteBackError(f"{name!r} is not a valid host name: use letters, digits, dots, dashes "
                            "and underscores, starting with a letter or digit, no '..', "
                            "at most 253 characters")
    return name


def format_snapshot_name(when: dt.datetime, seconds: bool = False) -> str:
    """A snapshot's directory name for an aware datetime (the original's format).

    A zone whose offset is not whole minutes (TZ=XXX-05:30:30) would give a
    '+053030' that no name pattern reads back: such a moment is named in UTC.
    """
    offset = when.utcoffset()
    if offset is None or offset.total_seconds() % 60:
        when = when.astimezone(dt.timezone.utc)
    return when.strftime(SNAPSHOT_FORMAT_SECONDS if seconds else SNAPSHOT_FORMAT)


def new_snapshot_name(now: dt.datetime, latest: Optional[dt.datetime], taken: Container[str]) -> Optional[str]:
    """The name of a snapshot taken now: whole minutes, or with seconds when the minute's
    name is taken or would not be after `latest`; None when no name is after it."""
    for seconds in (False, True):
        name = format_snapshot_name(now, seconds)
        when = parse_snapshot_name(name)
        if name not in taken and when is not None and (latest is None or when > latest):
            return name
    return None


@functools.lru_cache(maxsize=1 << 17)
def parse_snapshot_name(name: str) -> Optional[dt.datetime]:
    """The aware datetime a snapshot name stands for, or None if it is not one.

    What strptime with SNAPSHOT_FORMAT or SNAPSHOT_FORMAT_SECONDS reads, read from
    the places SNAPSHOT_NAME_RE fixes: the first strptime of a process costs ~3 ms
    (it compiles the locale's patterns), and every server command lists snapshots.
    Remembered for the names seen lately (a datetime is immutable): a prune, and the
    backup user's look at every push (prune_would_act), list each host's snapshots two
    or three times, 100,000 names on a server of 1,000 hosts."""
    if not SNAPSHOT_NAME_RE.match(name):
        return None
    seconds = name[16] == ":"
    zone = name[19:] if seconds else name[16:]
    try:
        offset = dt.timedelta(0)
        if zone != "Z":
            minutes = int(zone[-2:])
            if minutes > 59:        # strptime's %z takes minutes 00-59 only
                return None
            offset = (-1 if zone[0] == "-" else 1) * dt.timedelta(hours=int(zone[1:3]), minutes=minutes)
        return dt.datetime(int(name[0:4]), int(name[5:7]), int(name[8:10]), int(name[11:13]),
                           int(name[14:16]), int(name[17:19]) if seconds else 0, tzinfo=dt.timezone(offset))
    except ValueError:          # no such day or time, or an offset of a day or more
        return None


class Snapshot(NamedTuple):
    """A finished snapshot: host, directory name and the moment it stands for."""
    host: str
    name: str
    when: dt.datetime


_SNAPSHOT_ORDER = operator.attrgetter("host", "when", "name")      # Store.snapshots' order


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
    login = text
    if "[" in text:                       # user@[2001:db8::1]:path
        m = re.fullmatch(r"((?:[^@/\[]+@)?\[[0-9A-Fa-f:.]+\]):(.*)", text, re.S)
        if not m:
            raise ByteBackError(f"{text!r}: write an IPv6 server as user@[address]:")
        login, path = m.group(1), m.group(2)
    else:
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
    """This machine's name as the server will know it: its FQDN, else its host name.

    getfqdn() answers 'localhost' on machines whose name resolves only through
    /etc/hosts' loopback line; every such client would then share one name.
    """
    import socket
    short = socket.gethostname()
    fqdn = socket.getfqdn()
    return fqdn if fqdn.split(".")[0] == short.split(".")[0] else short


# === 4. Configuration ========================================================

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


def _port(text: str) -> int:
    value = int(text)
    if not 0 < value < 65536:
        raise ValueError(f"{text!r} is not a port number")
    return value


def _one_of(what: str, *choices: str) -> Callable[[str], str]:
    """A converter that takes one of the choices, else says which there are."""
    def convert(text: str) -> str:
        if text not in choices:
            raise ValueError(f"{text!r} is not {what}; use {' or '.join(map(repr, choices))}")
        return text
    return convert


_order = _one_of("an order", "importance", "age")
_shares = _one_of("a way to share", "normal", "equal")


def _percent(text: str, high: float = 1.0) -> float:
    """'2%' or '0.02' -> 0.02, from 0 to high (1: a fraction)."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if not 0 <= value <= high:
        raise ValueError(f"{text!r} must be a fraction from 0 to {high:g}, or a percentage such as 2%")
    return value


def _fraction(text: str) -> float:
    return _percent(text)


def _growth(text: str) -> float:
    return _percent(text, 100.0)


_receiver = _one_of("a receiver", *RECEIVERS)


def _weights(text: str) -> Dict[str, float]:
    return parse_weights(text)


def parse_targets(text: str) -> tuple:
    """'0,1,2,7' (days) or a preset name -> (0.0, 1.0, 2.0, 7.0), sorted, unique.  Raises ValueError."""
    if str(text).strip() in TARGET_PRESETS:
        return tuple(float(d) for d in TARGET_PRESETS[str(text).strip()])
    parts = [p.strip() for p in str(text).replace(" ", ",").split(",") if p.strip()]
    if not parts:
        raise ValueError("the target list is empty; give days separated by commas, e.g. 0,1,2,7,28")
    try:
        days = sorted({float(p) for p in parts})
    except ValueError:
        raise ValueError(f"{text!r} is not a list of days (e.g. 0,1,2,7,28) nor one of "
                         f"{', '.join(sorted(TARGET_PRESETS))}") from None
    if days[0] < 0 or any(math.isinf(d) or math.isnan(d) for d in days):
        raise ValueError(f"{text!r}: target ages must be 0 or more days")
    return tuple(days)


def _absolute_path(text: str) -> str:
    if not text.startswith("/"):
        raise ValueError(f"{text!r} must be an absolute path")
    return text


# NOTE: README.md's "server.conf" section documents these keys; keep them in step.
SERVER_OPTIONS: Dict[str, Option] = {
    "store": Option("", _absolute_path, "the store root (default: the byteback user's home)"),
    "min_interval": Option("6h", parse_duration, "refuse a snapshot younger than this"),
    "order": Option("importance", _order, "prune order: importance or age"),
    "targets": Option("week", parse_targets,
                      "importance target ages: days, or a preset (week, original)"),
    "headroom": Option("1.5", _positive_float, "free space kept = headroom x mean backup size"),
    "history": Option("10", _positive_int, "how many recent backups the mean is taken over"),
    "suspicion": Option("3", _positive_float,
                        "a backup over this many times the median of recent ones is suspicious"),
    "suspicion_floor": Option("2%", _fraction,
                              "a backup adding less than this share of its host's data is never suspicious"),
    "accept_budget": Option("15%", _fraction, "share of a host's share of the disc accepted past the "
                            "suspicion line automatically, per 30 days"),
    "shares": Option("normal", _shares, "a host's share of the disc: in proportion to its normal "
                     "backup (normal), or the same for every host (equal)"),
    "normal_growth": Option("25%", _growth, "how fast a host's normal backup may raise the free-space "
                            "target, per 30 days"),
    "share_growth": Option("10%", _growth, "how fast a host's share of the disc may grow, per 30 days"),
    "weights": Option("", _weights, "host:weight pairs multiplying hosts' shares, e.g. web1:2 db1:0.5"),
    "rsync_timeout": Option("600", _positive_int, "the server rsync's I/O timeout; also the time limit of a list, snapshot or prune a client asks for, in seconds"),
    "receiver": Option("fakesuper", _receiver, "how setup-host keeps a new host's owners: fakesuper "
                       "(in xattrs, as the shared backup user) or userns (real owners, shifted into "
                       "a uid range of the host's own account; README: 'Receivers')"),
}


class ServerConfig(NamedTuple):
    """Server settings after defaults and server.conf are resolved."""
    store: str = ""
    min_interval: float = 6 * 3600.0
    order: str = "importance"
    targets: tuple = tuple(float(d) for d in DEFAULT_TARGET_DAYS)
    headroom: float = 1.5
    history: int = 10
    suspicion: float = 3.0
    suspicion_floor: float = 0.02
    accept_budget: float = 0.15
    shares: str = "normal"
    normal_growth: float = 0.25
    share_growth: float = 0.1
    weights: Dict[str, float] = {}
    rsync_timeout: int = 600
    receiver: str = "fakesuper"


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
    parser = configparser.ConfigParser(interpolation=None, default_section="\0none",
                                       inline_comment_prefixes=("#", ";"))
    try:
        parser.read_string(text, source=source)
    except configparser.MissingSectionHeaderError as e:
        raise ByteBackError(f"{source} line {e.lineno}: a setting before any section; "
                            "put settings under a [server] line") from None
    except configparser.ParsingError as e:
        line = e.errors[0][0] if e.errors else 0
        raise ByteBackError(f"{source} line {line}: not a 'key = value' line") from None
    except configparser.DuplicateOptionError as e:
        raise ByteBackError(f"{source} line {e.lineno}: '{e.option}' is set twice") from None
    except configparser.DuplicateSectionError as e:
        raise ByteBackError(f"{source} line {e.lineno}: [{e.section}] appears twice") from None
    except configparser.Error as e:
        first = str(e).splitlines()[0]
        raise ByteBackError(f"{source}: cannot parse: {first}") from None
    lines = text.splitlines()
    values = {name: opt.convert(opt.default) if opt.default else ServerConfig._field_defaults[name]
              for name, opt in SERVER_OPTIONS.items()}
    for section in parser.sections():
        if section != "server":
            line = next((n for n, l in enumerate(lines, 1) if l.strip() == f"[{section}]"), 0)
            raise ByteBackError(f"{source} line {line}: unknown section [{section}]; "
                                "put settings under [server]")
        for key, raw in parser.items(section):
            where = f"{source} line {_line_of_key(lines, section, key)}"
            values[key] = convert_option(SERVER_OPTIONS, key, raw, where)
    return ServerConfig(**values)


def convert_option(options: Dict[str, Option], key: str, raw: str, where: str) -> object:
    """A setting's value from its text, or a one-line error that names where it stands."""
    if key not in options:
        raise ByteBackError(f"{where}: unknown key '{key}'; known keys: {', '.join(sorted(options))}")
    try:
        return options[key].convert(raw.strip())
    except ValueError as e:
        raise ByteBackError(f"{where}: bad value for {key}: {e}") from None


def read_config_file(path: Path) -> str:
    """A configuration file's text; '' when there is none (the defaults then hold)."""
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return ""
    except (OSError, UnicodeDecodeError) as e:
        raise ByteBackError(f"cannot read {path}: {e}") from None


def load_server_config(config_dir: str) -> ServerConfig:
    """Read <config_dir>/server.conf, or the defaults when there is none."""
    path = Path(config_dir) / "server.conf"
    return parse_server_config(read_config_file(path), str(path))


def _setting_lines(text: str) -> List[tuple]:
    """(line number, value) of each non-empty, non-comment line of a one-value-per-file setting."""
    return [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1)
            if line.strip() and not line.lstrip().startswith("#")]


def _read_setting_file(config_dir: str, name: str) -> List[tuple]:
    return _setting_lines(read_config_file(Path(config_dir) / name))


def read_setting(config_dir: str, name: str, default=None, convert: Callable = str):
    """One value from the original byteback's one-file-per-setting layout, or default."""
    lines = _read_setting_file(config_dir, name)
    if not lines:
        return default
    number, value = lines[0]
    try:
        return convert(value)
    except ValueError as e:
        raise ByteBackError(f"{Path(config_dir) / name} line {number}: bad value: {e}") from None


def read_setting_text(config_dir: str, name: str) -> str:
    """A setting file read whole, as it is (excludes, rsync_flags); '' when it is missing.
    Bytes that are not UTF-8 are kept (surrogateescape): file names may hold them."""
    path = Path(config_dir) / name
    try:
        return path.read_text(encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return ""
    except OSError as e:
        raise ByteBackError(f"cannot read {path}: {e.strerror}") from None


def config_dir_args(config_dir: str) -> List[str]:
    """The words that hand a configuration directory on to another byteback run."""
    if config_dir == DEFAULT_CONFIG_DIR:
        return []
    if not SAFE_PATH_RE.match(config_dir):
        raise UsageError(f"config dir {config_dir!r} must be an absolute path of plain characters")
    return ["--config-dir", config_dir]


def client_state_dir() -> Path:
    """Where the client keeps its lock and last-result file."""
    if os.environ.get("BYTEBACK_STATE_DIR"):
        return Path(os.environ["BYTEBACK_STATE_DIR"])
    if os.geteuid() == 0:
        return Path("/var/lib/byteback")
    base = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    return Path(base) / "byteback"


def parse_weights(text: str) -> Dict[str, float]:
    """'web1:2 db1:0.5' -> {'web1': 2.0, 'db1': 0.5}.  Raises ValueError."""
    weights = {}
    for word in str(text).replace(",", " ").split():
        host, sep, value = word.partition(":")
        if not sep or not HOSTNAME_RE.match(host):
            raise ValueError(f"{word!r} is not host:weight (e.g. web1:2)")
        number = float(value)
        if not number > 0 or math.isinf(number):
            raise ValueError(f"{word!r}: a weight must be a number greater than 0")
        weights[host] = number
    return weights


# === 5. Retention (pure: values in, values out): the order of deletion =======
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


_DECISION_SNAPSHOT, _DECISION_DELETE, _DECISION_REASON = map(operator.itemgetter, range(3))


def age_days(snap: Snapshot, now: dt.datetime) -> float:
    return (now - snap.when).total_seconds() / DAY


_DAYS_TEXT: Dict[int, str] = {}     # whole hours -> format_duration's text for them ('3d 4h')
_HOURS_TEXT: Dict[int, str] = {}    # whole minutes under a day -> format_duration's text for them ('5h 3m')


def _describe_age(days: float) -> str:
    """An age in days as a person reads it: format_duration's text, or 'under an hour'.

    prune --list writes two or three of these a line for every snapshot: past
    a day the text depends on the whole hours only, under it (from an hour) on
    the whole minutes, so each is formatted once."""
    if days >= 1.0:                              # the usual case first: the text of its hour, known
        text = _DAYS_TEXT.get(int(days * DAY) // 3600)
        if text is not None:
            return text
    if days < 1 / 24:
        return "under an hour"
    seconds = int(max(0, days * DAY))
    if seconds < 86400:
        text = _HOURS_TEXT.get(seconds // 60)
        if text is None:
            text = _HOURS_TEXT[seconds // 60] = format_duration(seconds)
        return text
    text = _DAYS_TEXT.get(seconds // 3600)
    if text is None:
        if len(_DAYS_TEXT) > 1 << 17:
            _DAYS_TEXT.clear()
        text = _DAYS_TEXT[seconds // 3600] = format_duration(seconds)
    return text


def _describe_ages(ages: Sequence[float]) -> List[str]:
    """_describe_age of each of ages (days): those whose hour is known looked up, in one pass
    of the interpreter's own loops, only the others through _describe_age."""
    texts = list(map(_DAYS_TEXT.get, map((3600).__rfloordiv__, map(int, map(DAY.__mul__, ages)))))
    # A key is a whole number of hours past a day (_describe_age's only entries): an age
    # under a day, or a negative one, finds none and is described below.
    for i in [i for i, text in enumerate(texts) if text is None]:
        texts[i] = _describe_age(ages[i])
    return texts


def claim_targets(ages: Sequence[float], targets: Sequence[float]) -> Dict[int, int]:
    """Give each target age, most important (smallest) first, to the nearest unclaimed snapshot.

    ages are in days, youngest first.  Returns {index into ages: index into targets}.
    On a tie the younger snapshot wins.
    """
    n = len(ages)
    claims: Dict[int, int] = {}
    # ages are sorted, so the nearest unclaimed snapshot is the first
    # unclaimed one on either side of where the target falls.  To find those
    # without walking past every claimed one (simulate has schedules of a
    # hundred targets), each claimed index points to its neighbour, and path
    # halving keeps the chains short: below[i + 1] leads to the nearest
    # unclaimed index <= i (0 for none), above[i] to the nearest one >= i (n for none).
    below = list(range(n + 1))
    above = list(range(n + 1))
    bisect_left = bisect.bisect_left
    # Each target claims one snapshot while any is unclaimed: the first n claim them all.
    for k, target in enumerate(sorted(targets)[:n]):
        split = bisect_left(ages, target)
        i = split
        while below[i] != i:
            below[i] = below[below[i]]
            i = below[i]
        left = i - 1
        i = split
        while above[i] != i:
            above[i] = above[above[i]]
            i = above[i]
        right = i
        if left > 0 and ages[left - 1] == ages[left]:
            # Equal ages: the youngest unclaimed of them, as a scan from the young end finds.
            j = left
            while j > 0 and ages[j - 1] == ages[left]:
                j -= 1
            left = min(i for i in range(j, left + 1) if i not in claims)
        if right >= n or (left >= 0 and target - ages[left] <= ages[right] - target):
            chosen = left
        else:
            chosen = right
        claims[chosen] = k
        below[chosen + 1] = chosen
        above[chosen] = chosen + 1
    return claims


class Reason(NamedTuple):
    """Why a snapshot goes, kept as values: text() writes the sentence.

    simulate decides hundreds of thousands of times and reads none of them,
    so nothing is formatted until someone prints or logs it.
    """
    explain: Callable[..., str]
    values: tuple

    def text(self) -> str:
        return self.explain(*self.values)


class HostStep(NamedTuple):
    """One deletion within one host: the candidate key, the snapshot, and why.

    key compares steps of different hosts (smaller goes first on a tie of the
    fairness rule): (class, score, age) in importance order, (0, -age) in age order.
    """
    key: tuple
    snapshot: Snapshot
    reason: Reason


def _gap_reason(younger: float, older: float, interval: float, score: float) -> str:
    # gap_score's terms: the backup one interval older than the younger neighbour looks back to the older one.
    moment = younger + interval
    if older - moment <= 0:
        return (f"importance: nearest to no target age; without it no backup is further than "
                f"the backup interval ({_describe_age(interval)}) from the snapshot before it")
    # _describe_age's usual case (a day or more, its hour's text known) looked up here: prune
    # --list writes this for nearly every snapshot (a key of no such hour finds nothing).
    gap = older - moment
    known = _DAYS_TEXT.get
    return (f"importance: nearest to no target age; without it the backup of "
            f"{known(int(moment * DAY) // 3600) or _describe_age(moment)} ago is "
            f"{known(int(gap * DAY) // 3600) or _describe_age(gap)} after the snapshot before it "
            f"({score:.2f} of its age)")


def _target_reason(target: float, k: int, count: int) -> str:
    return (f"importance: holds the {target:g}-day mark (the nearest snapshot to it), "
            f"the least important target still held ({k + 1} of {count})")


def _oldest_reason() -> str:
    return "importance: the oldest snapshot, which goes only after every other"


def _age_reason(host: str, age: float) -> str:
    return f"age: the oldest snapshot of host {host} ({_describe_age(age)} old)"


def gap_score(younger: float, age: float, older: float, interval: float) -> float:
    """The cost to the spacing of deleting a snapshot `age` days old whose kept neighbours are
    `younger` and `older` days old: the smaller, the sooner it goes (ages in days).

    Without it, the backup one `interval` (the host's, backup_interval) older
    than the younger neighbour is the youngest whose nearest snapshot at or
    before it is the older neighbour: the score is that distance relative to
    that backup's age, the worst relative gap the deletion leaves (the measure
    simulate reports).  The rule before issue 11 divided the gap by the
    snapshot's own age, (older - younger) / age: on a disc holding 30
    snapshots per host it kept every band within 0.35 of its age on 76% of
    the days, this one on 90-95% (tests/bench/gap_scores.py compares them,
    and other candidates, on the README's scenarios).  `age` is unused here;
    the signature is the candidates'.
    """
    moment = younger + interval
    return (older - moment) / (moment if moment > 1e-9 else 1e-9)


BACKUP_INTERVAL_SPAN = 8   # the youngest snapshots whose spacing tells a host's backup interval


def backup_interval(ages: Sequence[float]) -> float:
    """A host's backup interval in days, as its snapshots tell it: the median spacing of the
    youngest BACKUP_INTERVAL_SPAN (ages youngest first; 0 for fewer than two).

    The youngest are the ones prune thins last (the default targets hold
    each of the last 7 days), so they still show how often the host backs up;
    the median passes over a failed night or an extra backup by hand.
    """
    young = ages[:BACKUP_INTERVAL_SPAN]
    spacing = sorted(map(operator.sub, young[1:], young))      # each older less the younger
    return spacing[len(spacing) // 2] if spacing else 0.0


def _ages(snaps: Sequence[Snapshot], now: dt.datetime) -> List[float]:
    """Each snapshot's age in days, the very floats age_days gives.

    A comprehension, not a chain of map: now.__sub__ is a method wrapper, slower to call
    than the comprehension's own subtraction (13.4 us against 17.9 us for 100 snapshots,
    4.1 against 5.7 for 30, on 3.11 and 3.8 alike)."""
    return [(now - s.when).total_seconds() / DAY for s in snaps]


def _importance_candidate(snaps: Sequence[Snapshot], now: dt.datetime,
                          targets: Sequence[float], interval: float) -> Optional[HostStep]:
    """The least important snapshot of one host (oldest first in snaps), or None for one snapshot.

    The newest is never a candidate.  Snapshots that hold no target age go
    first, the one whose loss leaves the smallest gap relative to the age of the
    backup it reaches (gap_score) first of all (this thins dense stretches into a spread that widens with
    age); then those holding targets, least important target first; the very
    oldest snapshot goes last of all.
    """
    youngest_first = snaps[::-1]
    found = _importance_step(youngest_first, _ages(youngest_first, now), sorted(targets), interval)
    return found[1] if found else None


def _importance_step(youngest_first: Sequence[Snapshot], ages: Sequence[float],
                     ordered_targets: Sequence[float], interval: float,
                     claims: Optional[Dict[int, int]] = None) -> Optional[tuple]:
    """_importance_candidate of the snapshots youngest_first, whose ages (days) are given:
    (its index in youngest_first, the HostStep), or None for one snapshot.
    claims: claim_targets(ages, ordered_targets), when the caller has it already."""
    if claims is None:
        claims = claim_targets(ages, ordered_targets)
    last = len(ages) - 1
    if last < 1:
        return None
    # Any snapshot that holds no target goes before every one that holds
    # one, and those before the oldest, so a class is looked at only when the
    # one before is empty; within a class ties go to the younger, as a scan
    # from the young end would.
    unclaimed = [(gap_score(ages[i - 1], ages[i], ages[i + 1], interval), ages[i], i)
                 for i in range(1, last) if i not in claims] if len(claims) <= last else None
    if unclaimed:
        relative, age, best = min(unclaimed)
        return best, HostStep((0, relative, age), youngest_first[best],
                              Reason(_gap_reason, (ages[best - 1], ages[best + 1], interval, relative)))
    held = [(-k, -ages[i], i) for i, k in claims.items() if 0 < i < last]
    if held:
        minus_k, minus_age, best = min(held)
        return best, HostStep((1, minus_k, minus_age), youngest_first[best],
                              Reason(_target_reason, (ordered_targets[-minus_k], -minus_k, len(ordered_targets))))
    return last, HostStep((2, 0.0, -ages[last]), youngest_first[last], Reason(_oldest_reason, ()))


_SNAPSHOT_TIME = operator.attrgetter("when")
_SNAPSHOT_NAME = operator.attrgetter("name")
_SNAPSHOT_HOST = operator.attrgetter("host")
_NO_GAP = float("inf")
_new_step = tuple.__new__    # HostStep and Reason without their Python-level __new__: simulate's hot loop


def _thinning_steps(youngest_first: Sequence[Snapshot], ages: Sequence[float],
                    claims: Dict[int, int], interval: float) -> Iterator[HostStep]:
    """The snapshots that hold no target, least relative gap first, until none is left.

    Deleting a snapshot that holds no target changes no claim (each target
    keeps the nearest snapshot it had: it was nearer than the one deleted),
    and changes the gap of its two neighbours only, so a heap of the gaps,
    with those two pushed again after each deletion, gives every step in
    O(log n).  Stale entries (a deleted snapshot, a gap since changed) are
    skipped when they come up.  Ties go to the younger, as a scan from the
    young end would: ages grow with the index, so (gap, index) orders as
    (gap, age, index) does.
    """
    last = len(ages) - 1
    score = gap_score
    # gap[i]: the score of deleting snapshot i (gap_score); infinite for one that is no candidate
    gap = [_NO_GAP, *map(score, ages, ages[1:last], ages[2:], itertools.repeat(interval)), _NO_GAP]
    for i in claims:
        gap[i] = _NO_GAP
    # A prune often takes one step of each host and stops: the first one
    # needs only the smallest gap (the first index of it: the youngest), and
    # its neighbours are the snapshots beside it.
    i = gap.index(min(gap))
    if gap[i] == _NO_GAP:
        return
    y, o = i - 1, i + 1
    heap: Optional[list] = None           # built at the second step, with the neighbours' lists
    pop, push = heapq.heappop, heapq.heappush
    while True:
        relative = gap[i]
        age = ages[i]
        yield _new_step(HostStep, ((0, relative, age), youngest_first[i],
                                   _new_step(Reason, (_gap_reason, (ages[y], ages[o], interval, relative)))))
        if heap is None:
            heap = [(g, j) for j, g in enumerate(gap) if g != _NO_GAP and j != i]
            heapq.heapify(heap)
            younger = list(range(-1, last))        # the nearest kept neighbour on each side, by index
            older = list(range(1, last + 2))
        gap[i] = _NO_GAP
        older[y], younger[o] = o, y
        if gap[y] != _NO_GAP:
            gap[y] = relative = score(ages[younger[y]], ages[y], ages[o], interval)
            push(heap, (relative, y))
        if gap[o] != _NO_GAP:
            gap[o] = relative = score(ages[y], ages[o], ages[older[o]], interval)
            push(heap, (relative, o))
        while heap:
            relative, i = pop(heap)
            if gap[i] == relative:
                break
        else:
            return
        y, o = younger[i], older[i]


def host_deletion_order(snaps: Iterable[Snapshot], *, now: dt.datetime, order: str = "importance",
                        targets: Sequence[float] = DEFAULT_TARGET_DAYS) -> Iterator[HostStep]:
    """Yield one host's snapshots in the order they would go, never its newest.

    Each step assumes the ones before it are gone, and costs O(log n): the
    caller may stop at any step (prune stops when the disc has room).  The
    fairness between hosts is the caller's: it compares each host's next key.
    """
    if order not in ("importance", "age"):
        raise ValueError(f"unknown prune order {order!r}")
    left = sorted(snaps, key=_SNAPSHOT_TIME)
    if order == "age":
        for oldest in left[:-1]:
            age = age_days(oldest, now)
            yield HostStep((0, -age), oldest, Reason(_age_reason, (oldest.host, age)))
        return
    if len(left) < 2:
        return
    youngest_first = left[::-1]
    ages = _ages(youngest_first, now)
    ordered_targets = sorted(targets)
    claims = claim_targets(ages, ordered_targets)
    # One interval for every step: each step's scores are those of the store as given.
    interval = backup_interval(ages)
    known: Optional[Dict[int, int]] = claims
    young = youngest_first
    if len(claims) < len(ages):
        # Some snapshot holds no target (simulate's schedule of a hundred targets has every one
        # held, and nothing to thin or to move).
        yield from _thinning_steps(youngest_first, ages, claims, interval)
        # Every snapshot left holds a target, or is the newest or the oldest: at
        # most len(targets) + 2 of them, so each step may start afresh.
        kept = sorted({0, len(ages) - 1, *claims})
        young, ages = [youngest_first[i] for i in kept], [ages[i] for i in kept]
        # The thinning changed no claim (see _thinning_steps): the first step's claims are the
        # ones above, at the kept snapshots' new places (the schedule's would otherwise be
        # worked out twice for every host it deletes from).
        place = {i: p for p, i in enumerate(kept)}
        known = {place[i]: k for i, k in claims.items()}
    while len(young) > 1:
        i, step = _importance_step(young, ages, ordered_targets, interval, known)
        known = None
        yield step
        del young[i], ages[i]


def deletion_order(snapshots: Iterable[Snapshot], *, now: dt.datetime, order: str = "importance",
                   targets: Sequence[float] = DEFAULT_TARGET_DAYS) -> Iterator[Decision]:
    """Yield deletions, first to go first, until only each host's newest snapshot is left.

    Fair between hosts: the next deletion always comes from a host with the
    most snapshots left, so no host is stripped to its newest while another
    keeps many; among those, the smallest key, then the oldest snapshot,
    then the host's name.  Each step assumes the deletions before it happened.
    """
    if order not in ("importance", "age"):
        raise ValueError(f"unknown prune order {order!r}")
    by_host: Dict[str, List[Snapshot]] = {}
    for snap in snapshots:
        by_host.setdefault(snap.host, []).append(snap)
    several_hosts = len(by_host) > 1
    # One heap entry per host with a step to offer: only the host that just
    # lost a snapshot changes its entry, so each deletion costs O(log hosts).
    queue = []
    for host, snaps in by_host.items():
        steps = host_deletion_order(snaps, now=now, order=order, targets=targets)
        step = next(steps, None)
        if step is not None:
            queue.append((-len(snaps), step.key, step.snapshot.when, host, step, steps))
    heapq.heapify(queue)
    while queue:
        minus_left, _, _, host, step, steps = heapq.heappop(queue)
        reason = step.reason.text()
        if several_hosts:
            reason += f"; host {host} has the most snapshots ({-minus_left})"
        yield Decision(step.snapshot, True, reason)
        step = next(steps, None)
        if step is not None:
            heapq.heappush(queue, (minus_left + 1, step.key, step.snapshot.when, host, step, steps))


# --- 5b. Backup sizes (pure): the history, the free-space target, suspicion ---

def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else 0.0


def _remembered(func: Callable) -> Callable:
    """func(backups, **options), remembered for the tuples of history entries it was given lately.

    simulate plans after every backup, and every host's history but one is
    the same tuple as the time before (entries are never changed in place:
    record_acceptances makes new ones).  A store's prune reads its histories
    afresh, so nothing is ever served stale.  Lists are never remembered.
    Options that are tuples count by identity too, others by value.  The
    tuples are kept alive beside the answer, so no other object can take
    their ids meanwhile.  What is returned is shared: callers do not change it.
    """
    memo: Dict[tuple, tuple] = {}

    @functools.wraps(func)
    def remembered(backups, **options):
        if type(backups) is not tuple:
            return func(backups, **options)
        key = (id(backups), *[id(o) if type(o) is tuple else o for o in options.values()])
        hit = memo.get(key)
        if hit is not None:
            return hit[1]
        if len(memo) >= 4096:
            memo.clear()
        result = func(backups, **options)
        memo[key] = ((backups, *options.values()), result)
        return result
    return remembered


@_remembered
def counted_sizes(backups: Sequence[dict], *, last: Optional[int] = None) -> List[int]:
    """The sizes that speak for a host's normal backup: suspicious ones only once accepted.

    A host's first backup is a full copy, not a change: counted, it would make
    the free-space target 1.5 x the whole data set for the next backups, and
    prune would strip every host to its newest snapshot (the first one too).
    last: only the last `last` of them (the same as [-last:]), found from the
    newest entry back: the mean needs 10 of a history of 100 (HISTORY_KEEP).
    """
    if last is None:
        return [int(b.get("added", 0)) for b in backups
                if not b.get("first") and (not b.get("suspicious") or b.get("accepted"))]
    tail: List[int] = []
    if last > 0:
        for b in reversed(backups):
            if not b.get("first") and (not b.get("suspicious") or b.get("accepted")):
                tail.append(int(b.get("added", 0)))
                if len(tail) == last:
                    break
    tail.reverse()
    return tail


def free_space_target(sizes_by_host: Dict[str, Sequence[int]], *, headroom: float,
                      history: int) -> int:
    """Free space to keep: headroom x the sum over hosts of the mean of each one's last backups.

    Every host backs up again before the next prune, so the room must hold one
    more backup of each, sized by its own recent history.
    """
    return int(headroom * sum(mean(list(sizes)[-history:]) for sizes in sizes_by_host.values()))


def is_suspicious(added: int, prior_sizes: Sequence[int], *, factor: float, history: int,
                  floor: float = 0.0) -> bool:
    """True when a backup is far larger than its host's recent ones: factor x their median.

    Pruning history to make room for such a backup is what a hostile client
    uploading junk would want, so it is contained (section 5c, plan_prune).
    The median, not the mean: one earlier big backup must not open the door
    wider, and a run of ordinary noisy days must not close it on an honest
    client (simulate measured 7.7% of ordinary backups flagged at 1.5 x the
    mean).  But a median of quiet days is 0, and then every ordinary backup
    would be suspicious: nothing under `floor` bytes (suspicion_floor_bytes)
    ever is.  A host's first few backups are never suspicious.
    """
    prior = sorted(list(prior_sizes)[-history:])
    if len(prior) < MIN_HISTORY_FOR_SUSPICION:
        return False
    middle = len(prior) // 2
    median = prior[middle] if len(prior) % 2 else (prior[middle - 1] + prior[middle]) / 2
    return added > max(factor * median, floor)


def suspicion_floor_bytes(backups: Sequence[dict], *, fraction: float, history: int) -> float:
    """The floor of is_suspicious: `fraction` of the host's data, the smallest of its recent sizes.

    The smallest, so that one backup of a huge sparse file (its apparent size
    costs the client nothing) does not lift the floor for the next ones.
    """
    recent = backups[-history:] if type(backups) in (tuple, list) else list(backups)[-history:]
    sizes = [_num(b, "size") for b in recent if "size" in b and not b.get("baseline")]
    return fraction * min(sizes) if sizes else 0.0


def history_entry(backups: Sequence[dict], record: dict, *, name: str, now: dt.datetime, first: bool,
                  config: "ServerConfig") -> dict:
    """The history entry of a new snapshot (snapshot_host's and simulate's bookkeeping).

    first: the host's first snapshot, a full copy: counted_sizes leaves it out
    of the mean.  A host taken over with history starts from adopt's baseline
    entry instead, so its next backup is a change, never 'first'.
    """
    prior = counted_sizes(backups, last=config.history)
    suspicious = is_suspicious(record["added"], prior, factor=config.suspicion,
                               history=config.history, floor=suspicion_floor_bytes(
                                   backups, fraction=config.suspicion_floor, history=config.history))
    entry = {"snapshot": name, "time": now.isoformat(), "suspicious": suspicious, **record}
    if first:
        entry["first"] = True
    # The host's normal backup for its share of the disc, kept in the entry so that
    # plan_prune reads it instead of walking the history every time (normal_backup).
    if prior or counted_sizes([entry]):              # a full copy alone has no normal yet
        normal, share = _normal_backups(backups, history=config.history, floor=config.suspicion_floor / 4,
                                        keys=(("normal", config.normal_growth), ("share", config.share_growth)),
                                        then=entry, counted=prior)
        entry["normal"], entry["share"] = int(normal), int(share)
    return entry


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


def _history_int(entry: Optional[dict], key: str) -> int:
    """A number from a history entry, 0 when it is missing or not a number."""
    try:
        return max(0, int(entry.get(key, 0))) if entry else 0
    except (TypeError, ValueError):
        return 0


SHARE_WINDOW_DAYS = 30.0


@functools.lru_cache(maxsize=1 << 17)
def _entry_time(text) -> Optional[dt.datetime]:
    if not isinstance(text, str):
        return None
    try:
        when = dt.datetime.fromisoformat(text)
    except (TypeError, ValueError):
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def _num(entry: dict, key: str) -> int:
    """_history_int, quickly for the usual case (plan_prune reads every entry of every host)."""
    value = entry.get(key, 0)
    return value if type(value) is int and value >= 0 else _history_int(entry, key)


@_remembered
def normal_backup(backups: Sequence[dict], *, history: int, growth: float, floor: float = 0.02,
                  key: str = "normal") -> float:
    """A host's normal backup for its share of the disc: the mean of its counted sizes, which
    may grow by at most `growth` per 30 days (a flood just under the suspicion line must not
    buy a bigger share in days), from no less than `floor` of the host's smallest recent
    size (after quiet days it would never grow again); it follows a fall at once."""
    return _normal_backups(backups, history=history, floor=floor, keys=((key, growth),))[0]


def _recorded_at(backups: Sequence[dict], key: str) -> Optional[int]:
    """The index of the newest entry but the last that has `key`'s normal recorded, or None."""
    for i in range(len(backups) - 2, -1, -1):
        value = backups[i].get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return i
    return None


@functools.lru_cache(maxsize=64)
def _growth_rates(growths: tuple) -> tuple:
    """Each growth per 30 days as a rate per second (what _normal_backups caps by): the same
    few for every entry of a run."""
    return tuple(math.log1p(growth) / (SHARE_WINDOW_DAYS * DAY) for growth in growths)


def _normal_backups(backups: Sequence[dict], *, history: int, floor: float,
                    keys: Sequence[tuple], then: Optional[dict] = None,
                    counted: Optional[Sequence[int]] = None) -> List[float]:
    """normal_backup for each (key, growth) of keys, in one walk where they resume from the
    same entry (history_entry records both in every entry).

    then: one more entry after backups (history_entry's new one); counted:
    counted_sizes(backups, last=history), which history_entry has.  When the
    newest of backups has every normal recorded, they resume from it with
    counted as the sizes before it: one step, whatever the history's length."""
    if then is not None:
        b = backups[-1] if backups else None
        if (b is None or counted is None or (counted and min(counted) < 0)
                or any(type(b.get(key)) is not int for key, _ in keys)):
            # counted_sizes keeps a negative size that the walk reads as 0, and an
            # entry without every normal resumes further back: the whole walk decides.
            return _normal_backups(list(backups) + [then], history=history, floor=floor, keys=keys)
        resume = [len(backups) - 1]
    else:
        resume = [_recorded_at(backups, key) for key, _ in keys]
        if len(set(resume)) > 1:
            return [_normal_backups(backups, history=history, floor=floor, keys=(k,))[0] for k in keys]
    window: List[int] = []
    total = 0
    normals: List[Optional[float]] = [None] * len(keys)
    last = None
    per_second = _growth_rates(tuple(growth for _, growth in keys))
    start = 0
    # Resume from the newest entry that has its normal recorded (history_entry writes it).
    i = resume[0]
    if i is not None:
        b = backups[i]
        normals = [float(b[key]) for key, _ in keys]
        last, start = _entry_time(b.get("time")), i + 1
        if then is not None:
            window = list(counted)       # the same sizes as the walk below, all >= 0 (checked above)
        else:
            # The last `history` counted sizes up to it, from it back (not the whole history).
            for j in range(i, -1, -1):
                if len(window) >= history:
                    break
                e = backups[j]
                if not e.get("first") and (not e.get("suspicious") or e.get("accepted")):
                    window.append(_num(e, "added"))
            window.reverse()
        total = sum(window)
    sizes = [_num(e, "size") for e in backups[max(0, start - history):start] if not e.get("baseline")]
    for b in (then,) if then is not None else backups[start:]:
        if not b.get("baseline"):
            sizes.append(_num(b, "size"))
            if len(sizes) > history:
                sizes.pop(0)
        if b.get("first") or (b.get("suspicious") and not b.get("accepted")):
            continue
        added = _num(b, "added")
        window.append(added)
        total += added
        if len(window) > history:
            total -= window.pop(0)
        value = total / len(window)
        when = _entry_time(b.get("time"))
        if when is None or last is None:
            normals = [value] * len(keys)     # no times recorded (an old history): nothing to cap by
        else:
            elapsed = max(0.0, (when - last).total_seconds())
            smallest = floor * min(sizes, default=0)
            normals = [value if normal is None else
                       min(value, max(normal, smallest, 1.0) * math.exp(rate * elapsed))
                       for normal, rate in zip(normals, per_second)]
        if when is not None:
            last = when
    return [normal or 0.0 for normal in normals]


# --- 5c. The prune plan: everything prune decides, as one pure function ------
#
# prune_store (section 8) and simulate both call plan_prune on plain values
# and carry out what it says: acceptances to record, uploads to roll back,
# then deletions in order until the free space reaches the plan's goal.
#
# The rules, and the attack each one stops:
# - Containment.  A suspicious backup (is_suspicious) still kept, or an
#   unfinished upload past the same line, is counted at its host's normal
#   size: its excess is left out of the goal, so no host's history is deleted
#   for it, and pruning for every other host goes on.  An unfinished upload
#   past the line that no session is writing is rolled back to the host's
#   newest snapshot, so its space comes back without a person.  So is an
#   accepted one while the disc is short if its host would still be over its
#   share with all its history given back: deletions stop at that host, and a
#   fill (junk that never completes) accepted from the budget kept the free
#   space, every other host's backups failing until the attacker's next push.
# - Acceptance.  Excess is accepted automatically from a growth budget: each
#   host earns accept_budget (15%) of its share of the disc per 30 days
#   (saved up to its whole share, counted from its oldest history entry),
#   that share taken by its normal backup as the target counts it (below).
#   Real growth (a new VM image) is backed up within a bounded time; junk
#   cannot buy more than the budget.  An honest host can have several huge
#   backups in a month (simulate --accept-after never seed 3: five of 10x
#   its normal in 45 days on its smallest host); at 10% it then waited 26
#   days, every upload rolled back (1.13% of all backups failed).
# - Two caps on a host's normal backup (normal_backup: the mean of its last
#   counted sizes, following a fall at once).  For the free-space target it
#   may grow by normal_growth (25%) per 30 days: a flood just under the
#   suspicion line must not raise the target as it pleases, but a host whose
#   data really grows must find room (capped at 10%, unattended seed 3 failed
#   1.03% of its backups and kept none of its last week).  For its share of
#   the disc it may grow by share_growth (10%) only.  Shares are relative: a
#   host whose weight grows by g takes it from the others, whose share falls
#   to 1 / (1 + g x the grower's part of the weights), never below
#   1 / (1 + g): 91% of what they had after a month of flooding at 10%, 80% at
#   25% (simulate --hostile flood seed 1 kept 83% of the others' history).
# - Fairness by bytes.  Each host claims the bytes its deletable snapshots
#   hold, its newest snapshot's accepted excess, its accepted pending upload
#   and its room in the target; its share of the disc is in proportion to its
#   weight: its share normal times its server.conf weight.  The next deletion
#   comes from the host most over its share, and only a host over its share
#   loses anything: a flooding host evicts its own history, and what it
#   cannot give back is never paid by the others.
# - The first snapshot stays.  In the importance order a host's oldest
#   snapshot (its first, the full copy, while it has it) is never deleted,
#   nor counted in what the host can give back: a flood evicts its own host's
#   history down to the first and the newest, never the first itself.  The
#   age order deletes the oldest first by definition.
# - Unaccounted space (run/, outside every host's backups) is not pruned for.

class HostFacts(NamedTuple):
    """What the plan knows of one host: plain values read from the store (or simulate's model)."""
    snapshots: Sequence[Snapshot]          # oldest first
    history: Sequence[dict]                # as snapshot_host records it
    pending: Optional[int] = None          # bytes in an unfinished current; None when there is none
    running: bool = False                  # a session is writing current now: never rolled back


class PruneState(NamedTuple):
    """The store as plan_prune sees it."""
    hosts: Dict[str, HostFacts]
    free: int
    total: int
    unaccounted: int = 0                   # bytes in run/, outside every host's backups


class Acceptance(NamedTuple):
    """Excess the plan accepts: `snapshot` names the history entry ('' for an unfinished upload);
    complete when nothing of it is left contained."""
    host: str
    snapshot: str
    bytes: int
    complete: bool
    reason: str


class PlanStep(NamedTuple):
    """One deletion of the plan, and whether its host is over its share when it comes
    (decision None: the host most over its share has nothing left to give: stop)."""
    decision: Optional[Decision]
    over_share: bool
    estimate: int                          # bytes it is expected to free


class PrunePlan(NamedTuple):
    """What prune does: record `accepted`, roll back `rollbacks`, then delete in `steps`
    order while the free space is below `goal` and the step's host is over its share."""
    target: int                            # free space to keep (free_space_target)
    goal: int                              # what deletions aim at: the target less contained/unaccounted
    free: int
    accepted: List[Acceptance]
    contained: Dict[str, int]              # host -> excess bytes not pruned for
    rollbacks: List[str]
    notes: List[str]                       # WARNING lines for the log and status
    steps: Iterator[PlanStep]              # a _FairSteps (section 5d): its all() takes every one at once
    # The clock played no part (no growth budget was asked, nor force): with the same
    # histories and pending uploads, and only snapshots deleted, a later plan accepts,
    # contains and rolls back nothing either, and has the same goal.
    timeless: bool = False

    def short(self, free: int) -> bool:
        return free < self.goal


def _window_factor(growth: float, seconds: float) -> float:
    return (1.0 + growth) ** (max(0.0, seconds) / (SHARE_WINDOW_DAYS * DAY))


def _recorded_normal(backups: Sequence[dict], config: "ServerConfig", key: str = "normal") -> float:
    """normal_backup (key 'normal', growth normal_growth; key 'share', growth share_growth) as
    history_entry recorded it in the newest entry, else walked afresh."""
    if backups:
        value = backups[-1].get(key)
        if isinstance(value, int) and not isinstance(value, bool) and not backups[-1].get("acceptances"):
            return float(value)
    growth = config.share_growth if key == "share" else config.normal_growth
    return normal_backup(backups, history=config.history, growth=growth, floor=config.suspicion_floor / 4, key=key)


def accept_tokens(backups: Sequence[dict], *, now: dt.datetime, rate: float, cap: float) -> float:
    """Bytes a host may still have accepted past the suspicion line: it earns `rate` per 30
    days from its first backup, saves up to `cap`, and spends what was accepted before."""
    events = []
    for b in backups:
        for when, amount in b.get("acceptances", ()) or ():
            t = _entry_time(when)
            if t is not None:
                events.append((t, max(0, int(amount))))
    start = next((t for t in (_entry_time(b.get("time")) for b in backups) if t), now)
    tokens, last = min(cap, rate), start
    for t, amount in sorted(events):
        tokens = min(cap, tokens + rate * (t - last).total_seconds() / (SHARE_WINDOW_DAYS * DAY)) - amount
        last = max(last, t)
    return max(0.0, min(cap, tokens + rate * max(0.0, (now - last).total_seconds()) / (SHARE_WINDOW_DAYS * DAY)))


def snapshot_bytes(backups: Sequence[dict]) -> Dict[str, int]:
    """What deleting each recorded snapshot is expected to free: what it added, but no more
    than what left by the next backup (what that one rewrote or removed), so data that
    stays (a new VM image) is not counted as if its first snapshot held it alone."""
    return _history_entries(backups).held


def _entry_bytes(added: int, size: int, after: Optional[tuple]) -> int:
    """snapshot_bytes of one entry, given (added, size) of the entry after it (None: the newest)."""
    if after is None:
        return added
    after_added, after_size = after
    left = after_added + size - after_size if size > after_size else after_added
    return added if added < left else left


def _entry_numbers(b: dict) -> tuple:
    added, size = b.get("added", 0), b.get("size", 0)
    if type(added) is not int or added < 0:
        added = _history_int(b, "added")
    if type(size) is not int or size < 0:
        size = _history_int(b, "size")
    return added, size


class HistoryEntries:
    """What the plan reads of one host's history, worked out once per history tuple.

    by_name: {snapshot name: its entries}; unaccepted: the suspicious entries not
    accepted; held: snapshot_bytes; all in history order.  A host's next history is
    usually the last one with an entry appended (and the oldest trimmed), so
    _history_entries works it out from the last one in O(entries changed) when it can:
    the next one takes this one's tables over and changes them in place, and this one,
    should anything read it again (an older plan's lazy steps), works its own out afresh
    from its history.
    """
    __slots__ = ("history", "_by_name", "unaccepted", "_names", "_numbers", "_freed", "_held", "unique")

    def __init__(self, history: tuple, by_name: dict, unaccepted: list, names: list,
                 numbers: list, freed: list, held: Optional[dict] = None) -> None:
        self.history = history            # kept alive: the answer belongs to these very entries
        self._by_name = by_name
        self.unaccepted = unaccepted
        self._names = names               # per entry: its "snapshot"
        self._numbers = numbers           # per entry: (added, size)
        self._freed = freed               # per entry: _entry_bytes
        if held is not None:              # worked out from the last one (unique names only)
            self._held, self.unique = held, True
        elif set(map(type, names)) <= {str}:
            # the oldest entry of a name wins, as snapshot_bytes's walk from the newest back has it
            self._held = dict(zip(reversed(names), reversed(freed)))
            self.unique = len(self._held) == len(names)     # every entry names a snapshot of its own
        else:
            self._held = {n: v for n, v in zip(reversed(names), reversed(freed)) if isinstance(n, str)}
            self.unique = False

    @property
    def held(self) -> dict:
        if self._held is None:
            self._rescan()
        return self._held

    @property
    def by_name(self) -> dict:
        if self._held is None:
            self._rescan()
        return self._by_name

    def _rescan(self) -> None:
        """Its tables were handed to the next history's (_take): worked out afresh."""
        fresh = _scan_history(self.history)
        self._by_name, self._names, self._numbers = fresh._by_name, fresh._names, fresh._numbers
        self._freed, self._held = fresh._freed, fresh._held

    def _take(self) -> tuple:
        """(by_name, names, numbers, freed, held), for the next history's entries to change."""
        if self._held is None:
            self._rescan()
        tables = self._by_name, self._names, self._numbers, self._freed, self._held
        self._by_name = self._names = self._numbers = self._freed = self._held = None
        return tables


def _scan_history(history: tuple) -> HistoryEntries:
    if not history:                  # a host taken over, or a benchmark's store: nothing to walk
        return HistoryEntries(history, {}, [], [], [], [], {})
    by_name: Dict[object, List[dict]] = {}
    for b in history:
        by_name.setdefault(b.get("snapshot"), []).append(b)
    numbers = [_entry_numbers(b) for b in history]
    freed = [_entry_bytes(a, s, after) for (a, s), after in zip(numbers, numbers[1:] + [None])]
    return HistoryEntries(history, by_name, [b for b in history if b.get("suspicious") and not b.get("accepted")],
                          [b.get("snapshot") for b in history], numbers, freed)


def _unaccepted(b: dict) -> bool:
    return bool(b.get("suspicious")) and not b.get("accepted")


def _history_entries(history: Sequence[dict], previous: Optional[HistoryEntries] = None) -> HistoryEntries:
    """HistoryEntries of `history`, from `previous` when history is its entries less the
    oldest `dropped` with new ones appended (the same entry objects: nothing is ever
    changed in place, record_acceptances makes new ones), else from scratch."""
    if type(history) is not tuple:
        history = tuple(history)
    old = previous.history if previous is not None else None
    if old is None or not old:
        return _scan_history(history)
    if old is history:
        return previous
    first = history[0] if history else None
    dropped = 0 if old[0] is first else next((d for d in range(1, min(len(old), 4)) if old[d] is first), None)
    if dropped is None:
        return _scan_history(history)
    common = len(old) - dropped
    if common > len(history) or not all(map(operator.is_, old[dropped:], history[:common])):
        return _scan_history(history)
    gone, added = old[:dropped], history[common:]
    unique = previous.unique
    by_name, names, numbers, freed, held = previous._take()
    for b in gone:                   # each is the first of its name's entries (history order)
        name = b.get("snapshot")
        rest = by_name[name][1:]
        if rest:
            by_name[name] = rest
        else:
            del by_name[name]
    added_names = [b.get("snapshot") for b in added]
    for name, b in zip(added_names, added):
        by_name[name] = by_name.get(name, []) + [b]
    unaccepted = previous.unaccepted[sum(1 for b in gone if _unaccepted(b)):] if gone else previous.unaccepted
    unaccepted = unaccepted + [b for b in added if _unaccepted(b)] if added else unaccepted
    del numbers[:dropped], freed[:dropped]
    numbers += [_entry_numbers(b) for b in added]
    if unique:
        # Every name its own entry's: only the names that came, went, or lost their newest place change.
        for name in names[:dropped]:
            del held[name]
    else:
        held = None
    del names[:dropped]
    names += added_names
    if added:
        # the old newest has an entry after it now; the new ones are worked out afresh
        tail = numbers[common - 1:]
        freed[common - 1:] = [_entry_bytes(a, s, after) for (a, s), after in zip(tail, tail[1:] + [None])]
        if held is not None:
            held[names[common - 1]] = freed[common - 1]
            for name, value in zip(added_names, freed[common:]):
                if type(name) is not str or name in held:
                    held = None          # a name twice, or none: the whole walk decides
                    break
                held[name] = value
    return HistoryEntries(history, by_name, unaccepted, names, numbers, freed, held)


def _normal_mean(counted: Sequence[int], normal: float, history: int) -> float:
    """A host's normal backup as the target counts it (plan_prune's means): the mean of its
    counted sizes, never more than its recorded normal."""
    return min(mean(counted[-history:]), max(normal, 1.0)) if counted else 0.0


class _HostView:
    """What plan_prune works out of one host's facts that does not depend on the clock:
    kept for the same facts (simulate hands the same HostFacts while a host is unchanged),
    and the next history's entries are worked out from these (HistoryEntries)."""
    __slots__ = ("facts", "settings", "entries", "counted", "normal", "share", "mean", "deletable", "part")

    def __init__(self, facts: HostFacts, settings: tuple, entries: HistoryEntries,
                 counted: List[int], normal: float, share: float) -> None:
        self.facts, self.settings, self.entries = facts, settings, entries
        self.counted, self.normal, self.share = counted, normal, share     # share: its share's normal
        self.mean = _normal_mean(counted, normal, settings[0])
        self.deletable: Optional[tuple] = None     # (unit, keep_oldest, _view_deletable), when asked
        self.part: Optional[tuple] = None          # (mean, force, _host_part), when the clock played no part


_HOST_VIEWS: Dict[str, _HostView] = {}     # host -> the view of the facts plan_prune saw last


def _host_views(hosts: Dict[str, HostFacts], config: "ServerConfig") -> Dict[str, _HostView]:
    """{host: _HostView}: the last one while a host's facts are the same objects, else anew.

    Facts holding lists (which can change in place) are worked out afresh every time."""
    settings = (config.history, config.normal_growth, config.share_growth, config.suspicion_floor)
    views = {}
    if len(_HOST_VIEWS) > 4096:
        _HOST_VIEWS.clear()
    for h, f in hosts.items():
        v = _HOST_VIEWS.get(h)
        if v is not None and v.facts is f and v.settings == settings:
            views[h] = v
            continue
        frozen = type(f.history) is tuple and type(f.snapshots) is tuple
        entries = _history_entries(f.history, v.entries if v is not None and frozen else None)
        part = None
        if v is not None and frozen and v.entries is entries and v.settings == settings:
            counted, normal, share = v.counted, v.normal, v.share
            # Only snapshots went (prune) or came: the host's part reads of them only the
            # newest's name, and which are kept where an entry is contained, and the pending upload.
            if (v.part is not None and not entries.unaccepted and f.pending == v.facts.pending
                    and f.running == v.facts.running and f.snapshots and v.facts.snapshots
                    and f.snapshots[-1].name == v.facts.snapshots[-1].name):
                part = v.part
        elif not f.history:
            counted, normal, share = [], 0.0, 0.0        # what the walks below give for no entries
        else:
            counted = counted_sizes(f.history, last=config.history)
            normal = _recorded_normal(f.history, config)
            share = _recorded_normal(f.history, config, "share")
        views[h] = view = _HostView(f, settings, entries, counted, normal, share)
        view.part = part
        if frozen:
            _HOST_VIEWS[h] = view
    return views


def _view_deletable(view: _HostView, unit: int, keep_oldest: bool = False) -> int:
    """What the host's snapshots can give back: the bytes deleting each would free, summed over
    every snapshot but the newest (and the oldest where it is kept).

    A snapshot's bytes are its entry's in view.entries.held, or, with no size recorded
    (taken over, or its entry was lost), a normal backup (unit); with no history at all,
    fairness by bytes is fairness by count."""
    if view.deletable is None or view.deletable[:2] != (unit, keep_oldest):
        held, snaps = view.entries.held, view.facts.snapshots[1 if keep_oldest else 0:-1]
        total = sum(map(held.get, map(_SNAPSHOT_NAME, snaps), itertools.repeat(unit))) if held else unit * len(snaps)
        view.deletable = (unit, keep_oldest, total)
    return view.deletable[2]


def _excess(entry: dict, normal: float) -> int:
    return max(0, int(_history_int(entry, "added") - normal))


def _accepted_bytes(entry: dict) -> int:
    return sum(max(0, int(a)) for _, a in entry.get("acceptances", ()) or ())


def _host_part(h: str, f: HostFacts, view: _HostView, normal: float, counted: List[int],
               budget: Callable[[str], float], config: "ServerConfig", force: bool) -> tuple:
    """One host's part of the plan: (its claim beyond its snapshots, the excess contained,
    acceptances, notes, whether current is rolled back, whether the clock played no part:
    the growth budget was never asked, so the same facts give the same part)."""
    tokens: Optional[float] = None
    accepted: List[Acceptance] = []
    notes: List[str] = []
    rolled_back = False
    newest = f.snapshots[-1].name if f.snapshots else None
    by_name, unaccepted = view.entries.by_name, view.entries.unaccepted
    claim = 0.0
    held_back = 0
    for b in by_name.get(newest, ()):
        if not b.get("first") and not b.get("suspicious"):
            claim += _excess(b, normal)           # a big but ordinary newest: its own to pay
    kept = {s.name for s in f.snapshots} if unaccepted else set()
    for b in unaccepted:
        name = b.get("snapshot")
        if name not in kept:
            continue
        left = _excess(b, normal) - _accepted_bytes(b)
        tokens = budget(h) if tokens is None else tokens
        grant = int(min(left, tokens))
        if grant > 0:
            tokens -= grant
            left -= grant
            why = ("accepted by an administrator (prune --force)" if force else
                   f"accepted from its growth budget ({config.accept_budget:.0%} of its share per 30 days)")
            accepted.append(Acceptance(h, name, grant, grant >= left + grant, f"host {h}: {format_size(grant)} of backup {name} "
                                                        f"past the suspicion line {why}"))
            if name == newest:
                claim += grant
        if left > 0:
            held_back += left
            notes.append(f"host {h}: backup {name} added {format_size(_history_int(b, 'added'))}, far over "
                         f"its normal {format_size(normal)}: contained, {format_size(left)} not pruned "
                         "for; other hosts are pruned as usual")
    if f.pending is not None:
        floor = suspicion_floor_bytes(f.history, fraction=config.suspicion_floor, history=config.history)
        if is_suspicious(f.pending, counted, factor=config.suspicion, history=config.history, floor=floor):
            left = max(0, int(f.pending - normal))
            tokens = budget(h) if tokens is None else tokens
            grant = int(min(left, tokens))
            if grant >= left:
                claim += left
                accepted.append(Acceptance(h, "", left, True, f"host {h}: the unfinished upload of "
                                           f"{format_size(f.pending)} accepted from its growth budget"))
            elif f.running:
                held_back += left
                notes.append(f"host {h}: an upload in progress holds {format_size(f.pending)}, far over its "
                             f"normal {format_size(normal)}: contained, not pruned for")
            else:
                rolled_back = True
                notes.append(f"host {h}: an unfinished upload of {format_size(f.pending)}, far over its "
                             f"normal {format_size(normal)} and its growth budget: current is rolled "
                             "back to its newest snapshot")
    if newest and f.history and newest not in by_name:
        notes.append(f"host {h}: snapshot {newest} has no history entry (the disc filled while it was "
                     "recorded?): counted at the host's normal size")
    return claim, held_back, accepted, notes, rolled_back, tokens is None


# --- 5d. plan_prune, and the order of deletion between hosts -----------------

# The last plan's parts that did not depend on the clock (the growth budget was never asked):
# (what they were worked out from, the parts).  simulate plans again before every backup with
# nothing changed but the clock and the free space since the plan after the one before.
_LAST_PLAN: List[Optional[tuple]] = [None]
_TARGETS = ServerConfig._fields.index("targets")     # read by the order within a host only


def pause_collector() -> bool:
    """Pause the cyclic garbage collector if it runs: whether it did (the caller enables it again).

    The plan makes no cycles, but a store just read holds a few containers a snapshot, and
    the plan's own allocations set off collections that walk them all."""
    if gc.isenabled():
        gc.disable()
        return True
    return False


def plan_prune(state: PruneState, *, now: dt.datetime, config: "ServerConfig", order: Optional[str] = None,
               force: bool = False) -> PrunePlan:
    """Everything prune decides, from plain values.  force: an administrator accepts every excess.

    The collector waits meanwhile (pause_collector): at 1,000 hosts the views' allocations set
    off ~18 collections a plan, now and then a full one."""
    paused = pause_collector()
    try:
        return _plan_prune(state, now=now, config=config, order=order, force=force)
    finally:
        if paused:
            gc.enable()


def _plan_prune(state: PruneState, *, now: dt.datetime, config: "ServerConfig", order: Optional[str],
                force: bool) -> PrunePlan:
    order = order or config.order
    if order not in ("importance", "age"):
        raise ValueError(f"unknown prune order {order!r}")
    hosts = state.hosts
    # The same facts (the very objects, frozen) and settings as the last plan, whose parts the
    # clock played no part in: the same parts, so only the free space and the order are new.
    names = tuple(hosts)
    key = (names, state.total, state.unaccounted, order, force, config[:_TARGETS], config[_TARGETS + 1:])
    last = _LAST_PLAN[0]
    if last is not None and last[0] == key and all(map(operator.is_, hosts.values(), last[1])):
        target, goal, notes, views, weights, extra, room, means = last[2]
        steps = _fair_steps(state, views, weights, extra, room, means, state.free + max(0, state.unaccounted),
                            now=now, order=order, targets=config.targets)
        return PrunePlan(target, goal, state.free, [], {}, [], list(notes), steps, True)
    _LAST_PLAN[0] = None
    clock = []                                   # the growth budget was asked: the clock played a part
    views = _host_views(hosts, config)
    counted = {h: v.counted for h, v in views.items()}
    # A host's normal backup: the mean of its counted sizes, but never more than its
    # normal (normal_backup), whose growth is capped at normal_growth: backups just under
    # the suspicion line, one after another (a flood), would otherwise raise the target as
    # they please.  Its share of the disc follows the same normal capped at share_growth.
    normals = {h: v.normal for h, v in views.items()}
    share_normals = {h: v.share for h, v in views.items()}
    means = {h: v.mean for h, v in views.items()}         # _normal_mean
    target = int(config.headroom * sum(means.values()))
    notes: List[str] = []
    accepted: List[Acceptance] = []
    contained: Dict[str, int] = {}
    rollbacks: List[str] = []
    memo: Dict[str, Dict[str, float]] = {}

    def weighted(key: str, normals: Dict[str, float]) -> Dict[str, float]:
        """Each host's normal backup (shares = normal; 1 for equal) times its server.conf weight."""
        if key not in memo:
            memo[key] = {h: (1.0 if config.shares == "equal" else max(1.0, normals[h]))
                         * config.weights.get(h, 1.0) for h in names}
        return memo[key]

    def weights() -> Dict[str, float]:
        """The shares deletions follow: normals whose growth is capped at share_growth."""
        return weighted("share", share_normals)

    def budget(h: str) -> float:
        """What h may still have accepted: accept_budget of its share of the disc by its normal
        (growth capped at normal_growth), the same normal that sizes its room in the target."""
        if force:
            return float("inf")
        clock.append(h)
        w = weighted("normal", normals)
        share_of_disc = state.total * w[h] / (sum(w.values()) or 1.0)
        return accept_tokens(hosts[h].history, now=now, rate=config.accept_budget * share_of_disc,
                             cap=share_of_disc)

    extra: Dict[str, float] = {}
    for h, f in hosts.items():
        # A host whose facts are the same as last time has the same part, unless the clock
        # played a part (its growth budget, an unfinished upload).
        view = views[h]
        part = view.part
        if part is None or part[0] != means[h] or part[1] != force:
            part = _host_part(h, f, view, means[h], counted[h], budget, config, force)
            view.part = (means[h], force, part) if part[-1] and f.pending is None else None
        else:
            part = part[2]
        claim, held_back, host_accepted, host_notes, rolled_back, _ = part
        accepted += host_accepted
        notes += host_notes
        if rolled_back:
            rollbacks.append(h)
        if held_back:
            contained[h] = held_back
        extra[h] = claim
    if state.unaccounted > 0:
        notes.append(f"{format_size(state.unaccounted)} in the store's run/ and sessions/ belongs to no host's backups: "
                     "not pruned for")
    if any(a.complete and a.snapshot for a in accepted):
        # What is accepted counts in its host's normal size from now on (counted_sizes).
        counted = {h: counted_sizes(record_acceptances(f.history, accepted, now), last=config.history)
                   for h, f in hosts.items()}
        means = {h: min(mean(c[-config.history:]), max(normals[h], float(max(c[-1:] or [0]))))
                 if c else 0.0 for h, c in counted.items()}
        target = int(config.headroom * sum(means.values()))
    room = {h: config.headroom * means[h] for h in counted}
    goal = target - sum(contained.values()) - max(0, state.unaccounted)
    # The disc the claims share: the free space and everything the claims count, with the
    # contained and unaccounted bytes as if they were free (they are not pruned for).
    free_for_claims = state.free + sum(contained.values()) + max(0, state.unaccounted)
    pending = [a for a in accepted if not a.snapshot and not hosts[a.host].running]
    if pending and state.free < goal:
        unpaid = _unpaid_uploads(pending, views, weights(), extra, room, means, free_for_claims,
                                 keep_oldest=order == "importance")
        for a in unpaid:
            accepted.remove(a)
            extra[a.host] -= a.bytes
            rollbacks.append(a.host)
            notes.append(f"host {a.host}: an unfinished upload of {format_size(hosts[a.host].pending)}, "
                         "more than its own history can give back while the others need the space: "
                         "current is rolled back to its newest snapshot")
    timeless = not (clock or force or accepted or contained or rollbacks)
    if timeless and all(type(f.history) is tuple and type(f.snapshots) is tuple for f in hosts.values()):
        _LAST_PLAN[0] = (key, tuple(hosts.values()), (target, goal, tuple(notes), views, weights, extra, room, means))
    steps = _fair_steps(state, views, weights, extra, room, means, free_for_claims, now=now, order=order,
                        targets=config.targets)
    return PrunePlan(target, goal, state.free, accepted, contained, rollbacks, notes, steps, timeless)


def _unpaid_uploads(pending: List[Acceptance], views: Dict[str, _HostView], w: Dict[str, float],
                    extra: Dict[str, float], room: Dict[str, float], means: Dict[str, float],
                    free_for_claims: float, *, keep_oldest: bool) -> List[Acceptance]:
    """The accepted unfinished uploads whose host would still be over its share of the disc
    with all its history given back: the deletions would stop at that host (_fair_steps)
    while the disc is short, and an upload that never completes (a fill) would keep the
    free space every other host needs."""
    held = {h: _view_deletable(v, max(1, int(means[h])), keep_oldest) for h, v in views.items()}
    disc = free_for_claims + sum(extra[h] + held[h] for h in views)
    fair = disc / (sum(w.values()) or 1.0)
    return [a for a in pending if extra[a.host] + room[a.host] > fair * w[a.host]]


def _fair_steps(state: PruneState, views: Dict[str, _HostView], weights: Callable[[], Dict[str, float]],
                extra: Dict[str, float],
                room: Dict[str, float], means: Dict[str, float], free_for_claims: float, *,
                now: dt.datetime, order: str, targets: Sequence[float]) -> "_FairSteps":
    """Deletions, the host most over its share (claim / weight) first; within a host its order.

    Lazy: nothing is measured until the first deletion is asked for (simulate plans far
    more often than it deletes)."""
    return _FairSteps((state, views, weights, extra, room, means, free_for_claims, now, order, targets))


class _FairSteps:
    """A plan's deletions (PlanStep): an iterator that works a host's order out only when that
    host comes to the top, and all(), the same steps, every host's order worked out at once
    (prune --list takes every step: see _FairOrder.everything)."""
    __slots__ = ("_args", "_steps")

    def __init__(self, args: tuple) -> None:
        self._args = args
        self._steps: Optional[Iterator[PlanStep]] = None

    def __iter__(self) -> Iterator[PlanStep]:
        if self._steps is None:
            self._steps = _FairOrder(*self._args).taken(lazily=True)
        return self._steps

    def __next__(self) -> PlanStep:
        return next(iter(self))

    def close(self) -> None:
        """A prune that stops here: the lazy order's generator is closed (as a generator's close)."""
        if self._steps is not None:
            self._steps.close()

    def all(self) -> List[PlanStep]:
        """Every step not yet taken, in order."""
        if self._steps is None:
            self._steps = _FairOrder(*self._args).taken(lazily=False)
        return list(self._steps)


class _FairOrder:
    """The order of deletion between hosts (_fair_steps), worked out as entries that sort in it.

    A host's entries start with -claim / weight and what the entry is.  A host's own
    entries come out of its host_deletion_order in a doubling batch at a time (the first
    batch is one step; everything(), for prune --list, takes each whole order in one), made at once: a host's claim, hence its ratio at each of its steps,
    changes with its own deletions only.  Working through one host's order for a while,
    instead of one step of each host in turn, keeps its data in the processor's cache, and
    a prune that stops early has worked out at most twice the steps it took.  A step's entry
    is (ratio, resolved, *its key, its snapshot's time, host, the step, the bytes it frees,
    whether the host then has no step left to give): the key spread out in the entry, which
    compares as the key itself did (all a plan's keys are as long) in one tuple comparison,
    not two.  A host with nothing left to give, (ratio, nothing, host, whether it still
    counted as giving), ends its entries, and goes before the steps of its ratio (an empty
    key did, before: the same order)."""
    UNRESOLVED, NOTHING, RESOLVED = 0, 1, 2

    def __init__(self, state: PruneState, views: Dict[str, _HostView], weights: Callable[[], Dict[str, float]],
                 extra: Dict[str, float], room: Dict[str, float], means: Dict[str, float],
                 free_for_claims: float, now: dt.datetime, order: str, targets: Sequence[float]) -> None:
        hosts = self.hosts = state.hosts
        self.views, self.now, self.order, self.targets = views, now, order, targets
        w = self.w = weights()
        keep_oldest = self.keep_oldest = order == "importance"
        units = self.units = {h: max(1, int(means[h])) for h in hosts}  # a snapshot with no size recorded
        claims = self.claims = {h: extra[h] + _view_deletable(views[h], units[h], keep_oldest) + room[h]
                                for h in hosts}
        disc = free_for_claims + sum(c - room[h] for h, c in claims.items())
        self.fair = disc / (sum(w.values()) or 1.0)      # claim per unit of weight at a fair share
        # A host has a step while 2 are left, its oldest not counted where it is kept; `giving`
        # counts the hosts whose entries have one.
        self.left = {h: len(f.snapshots) - (keep_oldest and len(f.snapshots) > 1) for h, f in hosts.items()}

    def _entries(self, h: str, steps: Iterator[HostStep], size: int, claim: float, count: int) -> tuple:
        """h's entries for the next `size` steps of its order, ended by its nothing entry if
        the order ends (or comes to the oldest) among them: (the entries, claim, count after)."""
        weight, held, unit = self.w[h], self.views[h].entries.held, self.units[h]
        snaps = self.hosts[h].snapshots
        last = snaps[-1].name if snaps else None
        oldest = snaps[0] if self.keep_oldest and snaps else None
        resolved = self.RESOLVED
        entries = []
        for step in itertools.islice(steps, size):
            snap = step.snapshot
            if snap == oldest:
                break                                 # the oldest (the first) stays
            name = snap.name
            # what deleting it frees (_view_deletable's count: nothing for the newest)
            freed = 0 if name == last else held.get(name, unit)
            count -= 1
            entries.append((-claim / weight, resolved, *step.key, snap.when, h, step, freed, count == 1))
            claim -= freed
        if len(entries) < size:                       # the order has ended (or come to the oldest)
            entries.append((-claim / weight, self.NOTHING, h, count >= 2))
        return entries, claim, count

    def _order_of(self, h: str) -> Iterator[HostStep]:
        return host_deletion_order(self.hosts[h].snapshots, now=self.now, order=self.order, targets=self.targets)

    def lazily(self) -> Iterator[tuple]:
        """The entries in order, each host's worked out only once its entry comes to the top
        UNRESOLVED, (ratio, unresolved, host): unresolved entries go before the others of the
        same ratio, so every tie is resolved before it is broken, and a prune that deletes one
        snapshot orders the hosts that tie for the first deletion, not every host."""
        ahead: Dict[str, list] = {}      # host -> [its host_deletion_order, next batch's size, claim, left]
        queued: Dict[str, Iterator[tuple]] = {}     # host -> its batch's entries not yet in the heap

        def refill(h: str) -> tuple:
            """h's next entry, the rest of its next batch queued behind it."""
            todo = ahead[h]
            steps, size, claim, count = todo
            entries, claim, count = self._entries(h, steps, size, claim, count)
            todo[1:] = 2 * size, claim, count
            queued[h] = batch = iter(entries)
            return next(batch)

        unresolved, resolved = self.UNRESOLVED, self.RESOLVED
        heap = [(-c / self.w[h], unresolved, h) for h, c in self.claims.items()]
        heapq.heapify(heap)
        replace, pop = heapq.heapreplace, heapq.heappop
        while heap:
            entry = heap[0]
            kind = entry[1]
            if kind == unresolved:
                h = entry[2]
                ahead[h] = [self._order_of(h), 1, self.claims[h], self.left[h]]
                replace(heap, refill(h))
                continue
            yield entry
            if kind == resolved:
                h = entry[-4]
                replace(heap, next(queued[h], None) or refill(h))
            else:
                pop(heap)

    def everything(self) -> Iterable[tuple]:
        """The entries in order, every host's whole order worked out at once: the merge of
        every host's entries, as lazily() takes them (the least of the hosts' next entries
        first).  Where each host's entries come in increasing order (its ratio rises at each
        step: each frees something), that merge is the sorted whole, which sorted() makes of
        the runs in C; else heapq.merge, the very merge lazily() does."""
        runs = [self._entries(h, self._order_of(h), sys.maxsize, self.claims[h], self.left[h])[0]
                for h in self.hosts]
        lt, first = operator.lt, operator.itemgetter(0)
        if all(all(map(lt, ratios, ratios[1:])) for ratios in (list(map(first, run)) for run in runs)):
            return sorted(itertools.chain.from_iterable(runs))
        return heapq.merge(*runs)

    def taken(self, *, lazily: bool) -> Iterator[PlanStep]:
        """The PlanSteps of the entries in order (lazily() or everything()): a step's reason is
        written as it is taken; a host with nothing left leaves, and the plan says stop there
        if it is over its share, or ends if no host has a step left."""
        fair, several, new = self.fair, len(self.hosts) > 1, tuple.__new__
        giving = sum(n >= 2 for n in self.left.values())
        resolved = self.RESOLVED
        # The cyclic garbage collector waits while a step is worked out, never across a yield
        # (so never while anyone else runs): a store just read holds a few containers a
        # snapshot, and the resolution of the hosts that tie made the collector walk all of
        # them (one first deletion in three of the benchmark's: 0.04 s more at either size).
        paused = pause_collector()
        try:
            for entry in (self.lazily() if lazily else self.everything()):
                if entry[1] == resolved:
                    ratio = entry[0]
                    h, step, freed, ends = entry[-4:]
                    explain, values = step.reason
                    reason = explain(*values)
                    if several:
                        reason += (f"; host {h} is the most over its share of the disc ({-ratio / fair:.0%} of it)"
                                   if fair > 0 else f"; host {h} claims the most of the disc")
                    giving -= ends
                    taken = new(PlanStep, (new(Decision, (step.snapshot, True, reason)), -ratio > fair, freed))
                else:
                    # A host with nothing to give back comes in its place all the same: while it is the
                    # most over its share, what the disc lacks is its doing, and nobody else pays for it.
                    giving -= entry[3]
                    if not giving:
                        return                                # nothing left anywhere: exhausted
                    if -entry[0] <= fair:
                        continue
                    taken = PlanStep(None, False, 0)        # the executor stops here
                if paused:
                    paused = False
                    gc.enable()
                yield taken
                paused = pause_collector()
        finally:
            if paused:
                gc.enable()


def plan_listing(plan: PrunePlan, state: PruneState) -> List[Decision]:
    """Every snapshot with its place: the plan's deletions in order, then what is always kept.

    state is the one the plan was made from: its deletions are those very snapshot objects."""
    listed = [s.decision for s in plan.steps.all() if s.decision is not None]
    gone = set(map(id, map(_DECISION_SNAPSHOT, listed))).__contains__
    not_ = operator.not_
    for h in sorted(state.hosts):
        snaps = state.hosts[h].snapshots
        # Those the plan does not delete (two a host, mostly), found by the interpreter's own
        # loops: a Python one for each of a big server's 100,000 snapshots took 0.04 s.
        for snap in itertools.compress(snaps, map(not_, map(gone, map(id, snaps)))):
            why = "oldest" if snap == snaps[0] and snap != snaps[-1] else "newest"
            listed.append(Decision(snap, False, f"kept: the {why} snapshot of host {h}"))
    return listed


def record_acceptances(backups: Sequence[dict], accepted: Sequence[Acceptance], now: dt.datetime) -> List[dict]:
    """The history with the plan's acceptances written into their entries (a new list)."""
    grants = {a.snapshot: a for a in accepted if a.snapshot}
    out = []
    for b in backups:
        a = grants.get(b.get("snapshot"))
        if a is not None:
            b = dict(b)
            b["acceptances"] = list(b.get("acceptances", ()) or ()) + [[now.isoformat(), a.bytes]]
            if a.complete:
                b["accepted"] = True
        out.append(b)
    return out


# === 6. The receive policy (pure): rsync's options and the server's command line ===
#
# authorized_keys runs `byteback.pyz receive --host NAME` for every client key;
# the client's own command arrives in SSH_ORIGINAL_COMMAND.  Everything in it
# is hostile until proven otherwise.  The option policy is the tables below;
# each refusal names the attack it stops.  This section and the next two only
# decide (values in, a Request or a refusal out); section 8d acts on it.

RSYNC_PROGRAM = "/usr/bin/rsync"
MIN_RSYNC = (3, 4, 0)           # CVE-2024-12084/12085: hostile client on restore
CONFINE_RSYNC = (3, 5, 0)       # --confine-root (refuses operator paths outside the host)
COMPRESS_PUSH_RSYNC = (3, 4, 3)  # CVE-2026-43618: a hostile sender's compressed data overflows
ACL_RSYNC = (3, 5, 0)            # CVE-2026-53799: ACLs applied by path, through a raced symlink


class Letter(NamedTuple):
    """A single-letter rsync option the guard allows, and the directions it may come in."""
    push: bool          # on a backup (rsync --server)
    send: bool          # on a restore (rsync --server --sender)


# Single-letter options, by direction.  NOTE: build_rsync_argv (section 9) and
# the restore client send these; keep the tables and the client in step.
LETTERS = {
    #  letter        push   send     long form
    "v": Letter(True,  True),    # --verbose
    "l": Letter(True,  True),    # --links (stored munged, see server_rsync_argv)
    "o": Letter(True,  True),    # --owner (kept in xattrs under --fake-super)
    "g": Letter(True,  True),    # --group
    "D": Letter(True,  True),    # --devices --specials (kept in xattrs, never made)
    "t": Letter(True,  True),    # --times
    "p": Letter(True,  True),    # --perms
    "X": Letter(True,  True),    # --xattrs
    "r": Letter(True,  True),    # --recursive
    "R": Letter(True,  True),    # --relative
    "H": Letter(True,  True),    # --hard-links
    "n": Letter(True,  True),    # --dry-run
    "z": Letter(True,  True),    # --compress (a backup's needs rsync 3.4.3, server_rsync_argv)
    "q": Letter(True,  True),    # --quiet
    "A": Letter(True,  True),    # --acls (needs rsync 3.5.0, server_rsync_argv)
    "S": Letter(True,  False),   # --sparse
    "x": Letter(True,  False),   # --one-file-system
    "c": Letter(True,  False),   # --checksum
    "W": Letter(True,  False),   # --whole-file
    "I": Letter(True,  False),   # --ignore-times
    "u": Letter(True,  False),   # --update
    "d": Letter(True,  False),   # --dirs: what --files-from implies (a named pass, NAMED_WORD)
}
PUSH_LETTERS = frozenset(letter for letter, row in LETTERS.items() if row.push)
SEND_LETTERS = frozenset(letter for letter, row in LETTERS.items() if row.send)
REFUSED_LETTERS = {
    "s": "secluded args hide the real options from this check",
    "L": "--copy-links follows symlinks a client planted, out of the host's tree",
    "k": "--copy-dirlinks follows symlinks a client planted",
    "K": "--keep-dirlinks writes through symlinks a client planted",
    "b": "--backup makes the server write files by name",
    "T": "--temp-dir names a server path",
    "P": "--partial --progress: progress output is not for the server",
}


class LongOption(NamedTuple):
    """A long rsync option the guard allows: its value, its directions, who decides it."""
    value: Optional[str]    # the regex a value must match; None: the option takes no value
    push: bool              # on a backup
    send: bool              # on a restore
    keep: bool              # the server passes the client's word on (False: it sets its own)


# Long options the byteback client sends, with a value check, the directions
# they may come in, and whether the server keeps the client's value or uses
# its own.  Values must come joined (--opt=value): the client always does.
_NONE, _INT, _LEVEL, _ITEMIZE = None, r"[0-9]{1,9}", r"[0-9]", r"%i"
LONG_OPTIONS = {
    #  option                         value      push   send   keep
    "--timeout":         LongOption(_INT,      True,  True,  False),  # the server sets its own
    "--inplace":         LongOption(_NONE,     True,  True,  False),  # the backend decides
    "--fake-super":      LongOption(_NONE,     True,  True,  False),  # the server always adds it
    "--delete":          LongOption(_NONE,     True,  False, True),
    "--delete-during":   LongOption(_NONE,     True,  False, True),
    "--delete-excluded": LongOption(_NONE,     True,  False, True),
    "--numeric-ids":     LongOption(_NONE,     True,  True,  True),
    "--partial":         LongOption(_NONE,     True,  False, True),
    "--bwlimit":         LongOption(_INT,      True,  True,  True),
    "--compress-level":  LongOption(_LEVEL,    True,  True,  True),
    "--size-only":       LongOption(_NONE,     True,  False, True),
    "--ignore-times":    LongOption(_NONE,     True,  False, True),
    "--stats":           LongOption(_NONE,     True,  True,  True),
    "--log-format":      LongOption(_ITEMIZE,  True,  True,  True),   # only what --itemize-changes sends
    "--modify-window":   LongOption(r"-1",     True,  False, True),   # nanosecond mtimes (sent as -@-1)
    "--no-implied-dirs": LongOption(_NONE,     False, True,  True),   # restore keeps existing directories
    "--no-r":            LongOption(_NONE,     True,  False, True),   # a named pass: only the names sent
}
# Refused by name so the refusal says why.  Everything not in LONG_OPTIONS is
# refused anyway; these are the ones an attacker would reach for.
REFUSED_LONG_OPTIONS = {
    "--rsh": "runs a program of the client's choosing",
    "--rsync-path": "runs a program of the client's choosing",
    "--daemon": "would start an rsync daemon",
    "--config": "reads a server file of the client's choosing",
    "--log-file": "writes a server file of the client's choosing (CVE-2026-53802)",
    "--write-batch": "writes a server file of the client's choosing",
    "--only-write-batch": "writes a server file of the client's choosing",
    "--read-batch": "reads a server file of the client's choosing",
    "--backup": "writes files outside current",
    "--backup-dir": "writes into a server path (CVE-2026-70460)",
    "--suffix": "goes with --backup",
    "--partial-dir": "writes into a server path (CVE-2026-70460)",
    "--temp-dir": "writes into a server path (CVE-2026-53795)",
    "--link-dest": "links from a server path; only the server picks one (CVE-2026-53795)",
    "--copy-dest": "copies from a server path (CVE-2026-53795)",
    "--compare-dest": "reads a server path (CVE-2026-53795)",
    "--files-from": "reads a list from a server path",
    "--include-from": "reads a server file", "--exclude-from": "reads a server file",
    "--filter": "merge files can read outside the host's tree",
    "--remove-source-files": "deletes files on the sending side (CVE-2026-53800)",
    "--remove-sent-files": "deletes files on the sending side",
    "--copy-links": "follows symlinks a client planted", "--copy-dirlinks": "follows planted symlinks",
    "--keep-dirlinks": "writes through planted symlinks",
    "--copy-unsafe-links": "follows symlinks out of the tree",
    "--safe-links": "not needed: every symlink is munged (CVE-2024-12088)",
    "--no-munge-links": "would store usable symlinks", "--munge-links": "the server sets it",
    "--secluded-args": "hides the real options from this check",
    "--protect-args": "hides the real options from this check",
    "--super": "would act as root on the server", "--no-super": "the server decides",
    "--iconv": "character conversion is attack surface byteback does not need",
    "--chmod": "changes what is stored", "--chown": "changes what is stored",
    "--usermap": "changes what is stored", "--groupmap": "changes what is stored",
    "--debug": "writes server debug output", "--max-alloc": "can lift the memory cap (CVE-2026-53794)",
    "--compress-threads": "unbounded threads (CVE-2026-70455)",
    "--preallocate": "reserves disc beyond the data",
    "--max-size": "huge values overflow (CVE-2026-70457)", "--min-size": "not needed",
    "--confine-root": "the server sets it", "--write-devices": "writes to devices",
    "--copy-devices": "reads devices", "--sender": "only in the restore form",
    "--server": "only once, at the start",
}


class Refused(ByteBackError):
    """The guard's verdict on a command it will not run."""


class Request(NamedTuple):
    """A client command the guard accepted: verb, and for rsync the checked parts."""
    verb: str                   # ping | complete | list | push | restore
    letters: str = ""           # rsync short options, without the capability blob
    capabilities: str = ""      # the 'e<ver>.<flags>' blob rsync passes to its server
    options: tuple = ()         # long options the server keeps, as given
    paths: tuple = ()           # restore: paths below the host directory; list: patterns
    any_snapshot: str = ""      # an original client's restore from '*': "newest" or "every"
    again: bool = False         # push: the client runs rsync once more when complete says 'again:'
    named: bool = False         # push: the pass after 'again:' that sends only the names it listed
    completes: bool = False     # push: the client asks the push to take the snapshot too


# A push's word before --server (the client's --rsync-path) by which a client
# says it handles complete's 'again:' (BtrfsStore.take_snapshot).  A client
# that does not say so, older ones and the original's among them, would report
# a refused snapshot as a failed backup: its push keeps the walk that makes the
# refusal needless (unshare_walk_needed).  The server says in its pong that it
# knows the word (PONG_CAN), and the client sends it only then: an older
# server's guard refuses words it does not know.
AGAIN_WORD = "--byteback-again"
PONG_CAN = "can: again"
# The word of the pass after an 'again:' that listed its names (again_message): the
# client sends only those (--files-from), and the push gives only the names root
# recorded an inode of their own, not every hard-linked name (unshare_current).
# A client learns that the server knows it from the listing itself.
NAMED_WORD = "--byteback-named"


NEWEST_SNAPSHOT = "newest"   # a restore path's first component: the host's newest snapshot
# The destination a push names when its session is to take the snapshot once rsync
# has succeeded (what `complete` does): a server ignores the destination otherwise.
PUSH_THEN_COMPLETE = "current/+complete"


def _check_restore_path(path: str) -> str:
    """A restore path: relative, no '..', first component a snapshot or current."""
    if "\0" in path or "\n" in path:
        raise Refused("a path with a NUL or newline")
    if path.startswith("/"):
        raise Refused(f"absolute path {path!r}: restore paths start with a snapshot name")
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        # Climbing out of the host's tree to another host or the store's state.
        raise Refused(f"path {path!r} climbs with '..'")
    if not parts or (parts[0] not in ("current", NEWEST_SNAPSHOT) and parse_snapshot_name(parts[0]) is None):
        raise Refused(f"path {path!r} does not start with a snapshot name, 'newest' or 'current'")
    return path


def _check_rsync_words(words: List[str]) -> Request:
    """The rsync server command line, option by option, against the tables above."""
    options = list(words)
    again = named = False
    # From --rsync-path "rsync --fake-super [--byteback-again [--byteback-named]]".
    while options and options[0] in ("--fake-super", AGAIN_WORD, NAMED_WORD):
        word = options.pop(0)
        again, named = again or word == AGAIN_WORD, named or word == NAMED_WORD
    if not options or options[0] != "--server":
        # Without --server rsync would act as a client: any transfer anywhere.
        raise Refused("rsync without --server")
    options.pop(0)
    sender = bool(options) and options[0] == "--sender"
    if sender:
        options.pop(0)
        if again or named:
            raise Refused(f"{AGAIN_WORD if again else NAMED_WORD} goes with a backup, not a restore")
    letters, capabilities, kept = "", "", []
    while options and options[0] != ".":
        word = options.pop(0)
        if word.startswith("--"):
            name, has_value, value = word.partition("=")
            if name in REFUSED_LONG_OPTIONS:
                raise Refused(f"rsync option {name}: {REFUSED_LONG_OPTIONS[name]}")
            if name not in LONG_OPTIONS:
                raise Refused(f"rsync option {name} is not on byteback's allow-list")
            row = LONG_OPTIONS[name]
            if not (row.send if sender else row.push):
                raise Refused(f"rsync option {name} is not allowed when "
                              f"{'restoring' if sender else 'backing up'}")
            if (row.value is None) != (not has_value):
                raise Refused(f"rsync option {name} {'takes no' if row.value is None else 'needs a'} value")
            if row.value is not None and not re.fullmatch(row.value, value):
                raise Refused(f"rsync option {name} has a bad value {value!r}")
            if row.keep:
                kept.append(word)
        elif word == "-@-1" and not sender:
            # --modify-window=-1 (compare nanoseconds) travels as this word;
            # the server passes it on in its long, unambiguous spelling.
            kept.append("--modify-window=-1")
        elif word.startswith("-") and len(word) > 1:
            cluster, e, blob = word[1:].partition("e")
            if e:
                # The capability blob rsync always ends its cluster with:
                # 'e' + protocol sub-version + '.' + capability letters.
                if not re.fullmatch(r"\d*\.[A-Za-z]*", blob) or capabilities:
                    raise Refused(f"bad rsync capability string in {word!r}")
                capabilities = "e" + blob
            for letter in cluster:
                if letter in REFUSED_LETTERS:
                    raise Refused(f"rsync option -{letter}: {REFUSED_LETTERS[letter]}")
                if letter not in LETTERS:
                    raise Refused(f"rsync option -{letter} is not on byteback's allow-list")
                if not (LETTERS[letter].send if sender else LETTERS[letter].push):
                    raise Refused(f"rsync option -{letter} is not allowed when "
                                  f"{'restoring' if sender else 'backing up'}")
                if letter not in letters:
                    letters += letter
        else:
            raise Refused(f"unexpected word {word!r} before '.'")
    if not options:
        raise Refused("rsync command without the '.' that separates options from paths")
    paths = options[1:]
    if not sender:
        # The client's destination is ignored: the server writes into this
        # host's current, whatever path was asked for.  Only its spelling says
        # whether the client wants the snapshot at the push's end (servers that
        # ignore it entirely are asked `complete` after the push).
        if len(paths) != 1:
            raise Refused("a backup names exactly one destination")
        return Request("push", letters, capabilities, tuple(kept), again=again, named=named,
                       completes=paths[0] == PUSH_THEN_COMPLETE)
    if not paths:
        raise Refused("a restore names at least one path")
    return Request("restore", letters, capabilities, tuple(kept),
                   tuple(_check_restore_path(p) for p in paths))


def rsync_version(text: str) -> tuple:
    """(3, 5, 0) from `rsync --version` output; (0,) when unknown."""
    m = re.search(r"rsync\s+version\s+v?(\d+)\.(\d+)\.(\d+)", text)
    return tuple(int(x) for x in m.groups()) if m else (0,)


# The kernel lets only real root set trusted.* and security.* xattrs, so the
# namespace's rsync leaves them out rather than fail on every such file;
# security.capability it stores tied to the namespace's root (honoured only
# inside that namespace), so file capabilities are kept.  user.rsync.%*
# are fake-super's own (a client's rsync sends them only when told -XX):
# kept, they would forge an owner and mode for whatever reads the store
# with --fake-super, or lists it.  --numeric-ids: the server's user names
# must never decide a stored owner.
USERNS_RSYNC_OPTIONS = ("--numeric-ids", "--filter=+x security.capability",
                        "--filter=-x security.*", "--filter=-x trusted.*", "--filter=-x user.rsync.%*")


def server_rsync_argv(request: Request, *, host_dir: str, current: str, backend_options: Sequence[str],
                      timeout: int, version: tuple, fake_super: bool = True) -> List[str]:
    """The rsync command the server runs for an accepted request, built from scratch.

    fake_super: the shared backup user's rsync; else root of the host's user
    namespace (section 8c), which keeps owners for real."""
    if request.verb == "push" and "z" in request.letters and version < COMPRESS_PUSH_RSYNC:
        raise Refused("compression (-z) on a backup needs rsync 3.4.3 on the server "
                      "(CVE-2026-43618); drop -z from rsync_flags, or upgrade the server's rsync")
    if "A" in request.letters and version < ACL_RSYNC:
        # --acls (rsync_flags; the original's man page suggests it): under
        # --fake-super the ACLs are kept in xattrs, applied safely from 3.5.0.
        raise Refused("ACLs (-A, --acls) need rsync 3.5.0 on the server (CVE-2026-53799); drop "
                      "--acls from rsync_flags, or upgrade the server's rsync")
    argv = [RSYNC_PROGRAM, "--server"]
    if request.verb == "restore":
        argv.append("--sender")
    if request.letters or request.capabilities:
        argv.append("-" + request.letters + request.capabilities)
    argv += list(request.options)
    # --fake-super: owners and modes live in xattrs, so the byteback user keeps
    # them without root.  --munge-links: a symlink a client uploads is stored
    # harmless, so neither rsync nor any server tool ever follows it (and a
    # restore un-munges it again on the way out).
    argv += ["--fake-super"] if fake_super else list(USERNS_RSYNC_OPTIONS)
    argv += ["--munge-links", f"--timeout={timeout}"]
    if version >= CONFINE_RSYNC:
        argv.append(f"--confine-root={host_dir}")
    if request.verb == "push":
        argv += list(backend_options)
        return argv + ["--", ".", current + "/"]
    return argv + ["--", ".", *request.paths]


# --- 6b. Listing patterns (pure): restore's globs, checked and matched -------

FAKE_SUPER_XATTR = "user.rsync.%stat"
MUNGED_PREFIX = "/rsyncd-munged/"
_GLOB_CHARS_RE = re.compile(r"[*?\[]")


class Glob(NamedTuple):
    """A compiled shell-style glob over absolute paths: * ? [...] within a name, ** across names.

    Matching is by name (path component) without backtracking: a name is
    matched with the two-pointer '*' algorithm (at most len(name) x
    len(part) steps), and a '**' part, which stands for any number of whole
    names, by keeping the set of parts a path can have reached.  A client
    chooses both the pattern and the names it is matched against; a
    backtracking regex over them ran for weeks (issue 8, class 3).
    """
    pattern: str
    parts: tuple        # per name: None for '**', a str without wildcards, or tokens (_glob_tokens)

    def match(self, path: str) -> bool:
        parts = self.parts
        names = path.split("/")
        if parts and parts[-1] is not None and not _match_part(parts[-1], names[-1]):
            return False                                  # most paths fail here, at once
        reached = _after_any_depth(parts, {0})
        for name in names:
            step = set()
            for k in reached:
                if k < len(parts):
                    if parts[k] is None:
                        step.add(k)                       # '**' takes this name too
                    elif _match_part(parts[k], name):
                        step.add(k + 1)
            if not step:
                return False
            reached = _after_any_depth(parts, step)
        return len(parts) in reached


def _after_any_depth(parts: tuple, reached: set) -> set:
    """reached, plus the parts after each '**' that may stand for no name at all."""
    more = set(reached)
    for k in reached:
        while k < len(parts) and parts[k] is None:
            k += 1
            more.add(k)
    return more


_GLOB_STAR, _GLOB_ONE = None, ""    # tokens: '*', '?'; a one-character str is that character


def _glob_tokens(part: str, pattern: str) -> tuple:
    """A name's tokens: _GLOB_STAR, _GLOB_ONE, a character, or a class (negated, characters, ranges)."""
    tokens: list = []
    i, n = 0, len(part)
    while i < n:
        c = part[i]
        if c == "*":
            if not tokens or tokens[-1] is not _GLOB_STAR:    # '**' inside a name is one '*'
                tokens.append(_GLOB_STAR)
        elif c == "?":
            tokens.append(_GLOB_ONE)
        elif c == "[":
            first = i + 2 if part[i + 1:i + 2] in ("!", "^") else i + 1
            end = part.find("]", first + 1 if part[first:first + 1] == "]" else first)
            if end == -1:
                tokens.append(c)                              # an unclosed '[' is itself
            else:
                tokens.append(_glob_class(part[first:end], part[i + 1:i + 2] in ("!", "^"), pattern))
                i = end
        else:
            tokens.append(c)
        i += 1
    return tuple(tokens)


def _glob_class(body: str, negated: bool, pattern: str) -> tuple:
    chars, ranges, i = set(), [], 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            low, high = body[i], body[i + 2]
            if low > high:
                raise ByteBackError(f"{pattern!r} is not a pattern byteback understands "
                                    f"(bad character range {low}-{high})")
            ranges.append((low, high))
            i += 3
        else:
            chars.add(body[i])
            i += 1
    return negated, frozenset(chars), tuple(ranges)


def _match_one(token, c: str) -> bool:
    if token == _GLOB_ONE:
        return True
    if isinstance(token, str):
        return token == c
    negated, chars, ranges = token
    return (c in chars or any(low <= c <= high for low, high in ranges)) != negated


def _match_part(part, name: str) -> bool:
    return part == name if isinstance(part, str) else _match_name(part, name)


def _match_name(tokens: tuple, name: str) -> bool:
    """Whether one name matches one part's tokens: greedy, going back only to the last '*'."""
    t = n = 0
    star, resume = -1, 0
    while n < len(name):
        if t < len(tokens) and tokens[t] is _GLOB_STAR:
            star, resume = t, n
            t += 1
        elif t < len(tokens) and _match_one(tokens[t], name[n]):
            t += 1
            n += 1
        elif star >= 0:
            resume += 1             # the last '*' takes one more character; earlier ones stay
            t, n = star + 1, resume
        else:
            return False
    while t < len(tokens) and tokens[t] is _GLOB_STAR:
        t += 1
    return t == len(tokens)


def compile_glob(pattern: str) -> Glob:
    """The Glob for a pattern; a bad class (such as [z-a]) is a ByteBackError."""
    def compiled(part: str):
        if part == "**":
            return None
        tokens = _glob_tokens(part, pattern)
        literal = all(isinstance(t, str) and t != _GLOB_ONE for t in tokens)
        return "".join(tokens) if literal else tokens
    return Glob(pattern, tuple(compiled(part) for part in pattern.split("/")))


def glob_base(pattern: str) -> tuple:
    """(the directory a glob can only match below, how deep it reaches: None for any depth)."""
    parts = pattern.strip("/").split("/")
    for k, part in enumerate(parts):
        if _GLOB_CHARS_RE.search(part):
            deep = any("**" in p for p in parts[k:])
            return "/" + "/".join(parts[:k]), (None if deep else len(parts) - k)
    return pattern, 0


def check_list_pattern(pattern: str) -> str:
    """A listing pattern from a client: an absolute glob that does not climb."""
    if "\0" in pattern or "\n" in pattern:
        raise Refused("a pattern with a NUL or newline")
    if not pattern.startswith("/"):
        raise Refused(f"pattern {pattern!r} must be absolute")
    if ".." in pattern.split("/"):
        raise Refused(f"pattern {pattern!r} climbs with '..'")
    # Matching takes at most len(name) x len(part) steps a name (compile_glob);
    # the limits keep that, and the number of parts a path is tried against, small.
    if len(pattern) > 1024 or pattern.count("**") > 2 or any(
            part.replace("**", "").count("*") + part.count("?") > 4 for part in pattern.split("/")):
        raise Refused(f"pattern {pattern[:80]!r} is too complex: at most 4 wildcards in one name "
                      "and 2 '**', 1024 characters")
    try:
        compile_glob(pattern)
    except ByteBackError as e:
        raise Refused(str(e)) from None
    return pattern


class Entry(NamedTuple):
    """One file in one snapshot, with the owner and mode it had on the client."""
    snapshot: str
    path: str
    kind: str          # f d l o (file, directory, symlink, other)
    mode: int
    size: int
    uid: int
    gid: int
    mtime: int
    target: str = ""


def parse_list_words(words: Sequence[str]) -> Request:
    """`list [--all] [--snapshot=NAME] PATTERN...` from a client, checked."""
    options, patterns = [], []
    for word in words:
        if word == "--all" and not patterns:
            options.append(word)
        elif word.startswith("--snapshot=") and not patterns:
            name = word.partition("=")[2]
            if name != "current" and parse_snapshot_name(name) is None:
                raise Refused(f"{name!r} is not a snapshot name")
            options.append(word)
        elif word.startswith("-"):
            raise Refused(f"list option {word!r} is not allowed")
        else:
            patterns.append(check_list_pattern(word))
    if not patterns or len(patterns) > 100:
        raise Refused("list takes from 1 to 100 patterns")
    return Request("list", options=tuple(options), paths=tuple(patterns))


# --- 6c. The commands a client may send, original clients' too (pure) --------

# The original byteback's clients (Ruby) say the same things in other words.
# Each is mapped onto one of ours and then checked exactly as ours is:
#   byteback-receive --ping [--verbose]                        -> ping
#   byteback-receive --complete [--verbose]                    -> complete
#   byteback-receive --snapshot S --list [--all] [--verbose] QP-GLOB...   -> list
#   byteback-restore --fake-super --snapshot S [--all] --server --sender ... . QP-PATH...
#                                                              -> restore (rsync --server --sender)
# S is a snapshot name or '*' (any snapshot).  Paths and globs come quoted-
# printable ('=20' for a space); they are decoded once, then checked.
ORIGINAL_ANY = "*"
ORIGINAL_TABLE = "--original-table"   # list: the original client prints what it gets: a table
ORIGINAL_NEWEST = "--newest-of-each"  # list/restore over '*': each path's newest version only


def decode_original_arg(word: str) -> str:
    """A quoted-printable word from an original client, decoded once (Ruby's pack('M'))."""
    import binascii
    if not re.fullmatch(r"[!-~]*", word):
        raise Refused(f"{word[:80]!r} is not quoted-printable")
    try:
        return os.fsdecode(binascii.a2b_qp(word.encode("ascii")))
    except (binascii.Error, ValueError):
        raise Refused(f"{word[:80]!r} is not quoted-printable") from None


def _original_snapshot(name: str) -> str:
    if name != ORIGINAL_ANY and parse_snapshot_name(name) is None:
        raise Refused(f"{name!r} is not a snapshot name or '*'")
    return name


def _check_original_receive(rest: List[str]) -> Request:
    """An original client's byteback-receive, as ping, complete or list.  Raises Refused."""
    flags = [w for w in rest if w != "--verbose"]       # --verbose changes nothing here
    if flags in (["--ping"], ["--complete"]):
        return Request(flags[0][2:])
    if len(flags) < 4 or flags[0] != "--snapshot" or flags[2] != "--list":
        raise Refused("byteback-receive: only --ping, --complete and --snapshot S --list are allowed")
    snapshot, flags = _original_snapshot(flags[1]), flags[3:]
    every = bool(flags) and flags[0] == "--all"
    patterns = flags[1:] if every else flags
    options = [ORIGINAL_TABLE]
    if snapshot == ORIGINAL_ANY:
        options += ["--all"] + ([] if every else [ORIGINAL_NEWEST])
    else:
        options.append(f"--snapshot={snapshot}")
    if not patterns or len(patterns) > 100:
        raise Refused("list takes from 1 to 100 patterns")
    return Request("list", options=tuple(options),
                   paths=tuple(check_list_pattern(decode_original_arg(p)) for p in patterns))


def _check_original_restore(rest: List[str]) -> Request:
    """An original client's byteback-restore, as an rsync sender.  Raises Refused.

    What --rsync-path "byteback-restore --fake-super --snapshot S [--all]" makes
    of the rsync server command line."""
    rest = list(rest)
    if rest[:1] == ["--fake-super"]:
        rest.pop(0)
    if len(rest) < 2 or rest[0] != "--snapshot":
        raise Refused("byteback-restore needs --snapshot NAME first")
    snapshot = _original_snapshot(rest[1])
    rest = rest[2:]
    every = rest[:1] == ["--all"]
    if every:
        rest.pop(0)
    if rest[:2] != ["--server", "--sender"]:
        raise Refused("byteback-restore runs only an rsync sender")
    if "." not in rest:
        raise Refused("rsync command without the '.' that separates options from paths")
    dot = rest.index(".")
    paths = [decode_original_arg(word) for word in rest[dot + 1:]]
    if not all(p.startswith("/") for p in paths):
        raise Refused("an original client's restore paths are absolute")
    # '*': which snapshots hold each path is known only on the server's disc.
    # The paths are checked here as if in current (the same rules), and
    # cmd_receive checks again what resolve_any_snapshot makes of them.
    request = _check_rsync_words(rest[:dot + 1] + [
        _original_source("current" if snapshot == ORIGINAL_ANY else snapshot, p) for p in paths])
    if request.verb != "restore":
        raise Refused("byteback-restore runs only an rsync sender")
    if snapshot == ORIGINAL_ANY:
        return request._replace(paths=tuple(paths), any_snapshot="every" if every else "newest")
    return request


def _original_source(snapshot: str, path: str, every: bool = False) -> str:
    """What the sender is given for one path.  'S/./path' sends it under the name the
    client asked for: rsync >= 3.2.5 rejects any other name (CVE-2022-29154), so the
    original's own layout, './S/path' in the client's directory, is kept only for
    --all, where one name would have several versions (the client needs
    --trust-sender in rsync_flags for that)."""
    return _check_restore_path(f"{snapshot}{path}" if every else f"{snapshot}/.{path}")


def resolve_any_snapshot(request: Request, snapshots: Sequence[str], exists: Callable) -> Request:
    """An original client's restore from '*': each path in its newest snapshot, or in every one.

    exists(snapshot, path) says whether a snapshot holds a path; every result
    is checked again as a path of ours.
    """
    if not request.any_snapshot:
        return request
    found = []
    for path in request.paths:
        holders = [s for s in reversed(snapshots) if exists(s, path)]
        chosen = holders if request.any_snapshot == "every" else holders[:1]
        found += [_original_source(s, path, every=request.any_snapshot == "every") for s in reversed(chosen)]
    if not found:
        raise ByteBackError("no snapshot holds " + ", ".join(map(repr, request.paths[:5])))
    return request._replace(paths=tuple(found), any_snapshot="")


def resolve_newest(request: Request, snapshots: Sequence[str]) -> Request:
    """A restore's paths with 'newest' (the client did not list first) as the newest snapshot's name."""
    named = [p for p in request.paths if p.split("/", 1)[0] == NEWEST_SNAPSHOT]
    if not named:
        return request
    if not snapshots:
        raise ByteBackError("this host has no snapshots yet; take a backup first")
    newest = snapshots[-1]
    return request._replace(paths=tuple(
        _check_restore_path(newest + p[len(NEWEST_SNAPSHOT):] if p in named else p) for p in request.paths))


# What a user-namespace receiver (section 8c) could not keep of a backup: the
# client's rsync says so, a line a file, and goes on.  `complete` carries the
# counts and a few names to the server (--not-kept=DEVICES,OWNERS, then
# --example=NAME, each name already escaped by printable()), where the host's
# account records them and status shows them.  A client can lie here only
# about its own backup, so root believes nothing beyond these bounds.
NOT_KEPT_OPTION, NOT_KEPT_EXAMPLE = "--not-kept=", "--example="
NOT_KEPT_EXAMPLES = 5                  # names carried, of however many
NOT_KEPT_NAME_MAX = 300                # characters of each, escaped
NOT_KEPT_COUNT_MAX = 10 ** 12
NOT_KEPT_SUFFIX = ".not-kept"          # <host>.not-kept beside the host's session lock
NOT_KEPT_RECORD_MAX = 8192             # bytes of it that root reads


class NotKept(NamedTuple):
    """Files of one backup a user-namespace receiver could not keep as they are (pure value)."""
    devices: int = 0            # device nodes: left out (mknod is not permitted in a user namespace)
    owners: int = 0             # owner or group outside the host's id range: kept, owned by root
    examples: tuple = ()        # a few of their names, escaped (printable)
    time: str = ""              # when the server recorded them (ISO 8601), server side only
    snapshot: str = ""          # the snapshot they are of (its name), server side only

    @property
    def total(self) -> int:
        return self.devices + self.owners


def checked_not_kept(devices: object, owners: object, examples: object, time: object = "",
                     snapshot: object = "") -> NotKept:
    """A NotKept within the bounds above, from values a client or a file gave.  Raises ValueError."""
    counts = [devices, owners]
    if not all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= NOT_KEPT_COUNT_MAX for c in counts):
        raise ValueError("counts must be whole numbers from 0 to 10^12")
    if not isinstance(examples, (list, tuple)) or len(examples) > NOT_KEPT_EXAMPLES or not all(
            isinstance(e, str) and e and len(e) <= NOT_KEPT_NAME_MAX and e.isprintable() for e in examples):
        raise ValueError(f"at most {NOT_KEPT_EXAMPLES} names of printable characters, "
                         f"{NOT_KEPT_NAME_MAX} at most each")
    if not isinstance(time, str) or (time and _entry_time(time) is None):
        raise ValueError("not a time")
    if not isinstance(snapshot, str) or len(snapshot) > NOT_KEPT_NAME_MAX:
        raise ValueError("not a snapshot's name")
    return NotKept(devices, owners, tuple(examples), time, snapshot)


def not_kept_words(gaps: NotKept) -> List[str]:
    """complete's words for what was not kept (pure); none when everything was."""
    if not gaps.total:
        return []
    return [f"{NOT_KEPT_OPTION}{gaps.devices},{gaps.owners}", *(NOT_KEPT_EXAMPLE + e for e in gaps.examples)]


def _check_complete(rest: List[str]) -> Request:
    """complete, bare or with what the namespace receiver could not keep.  Raises Refused."""
    if not rest:
        return Request("complete")
    m = re.fullmatch(re.escape(NOT_KEPT_OPTION) + r"([0-9]{1,13}),([0-9]{1,13})", rest[0])
    if not m or not all(w.startswith(NOT_KEPT_EXAMPLE) for w in rest[1:]):
        raise Refused(f"{'complete ' + rest[0][:80]!r} is not a command byteback runs (complete takes "
                      f"only {NOT_KEPT_OPTION}DEVICES,OWNERS and then {NOT_KEPT_EXAMPLE}NAME)")
    try:
        gaps = checked_not_kept(int(m.group(1)), int(m.group(2)),
                                [w[len(NOT_KEPT_EXAMPLE):] for w in rest[1:]])
    except ValueError as e:
        raise Refused(f"complete {NOT_KEPT_OPTION}: {e}") from None
    return Request("complete", options=(rest[0],), paths=gaps.examples)


def request_not_kept(request: Request) -> NotKept:
    """What a checked complete says was not kept (pure)."""
    if not request.options:
        return NotKept()
    devices, owners = request.options[0][len(NOT_KEPT_OPTION):].split(",")
    return NotKept(int(devices), int(owners), request.paths)


def not_kept_text(gaps: NotKept) -> str:
    """The WARNING sentence about what a backup could not keep (pure)."""
    parts = []
    if gaps.devices:
        parts.append(f"{gaps.devices} device node{'s' if gaps.devices != 1 else ''} left out "
                     "(a user namespace cannot make them)")
    if gaps.owners:
        parts.append(f"{gaps.owners} file{'s' if gaps.owners != 1 else ''} kept owned by root, as "
                     "their owner or group is outside the host's id range")
    examples = ", ".join(gaps.examples) + (", ..." if gaps.total > len(gaps.examples) else "")
    return (f"{gaps.total} file{'s' if gaps.total != 1 else ''} not kept as they are by the server's "
            f"user-namespace receiver: {'; '.join(parts)}; e.g. {examples}. The snapshot holds everything "
            "else. To keep them: exclude what need not be kept; a host set up with 65536 ids by an earlier "
            "version gets 2^21 when setup-client is run for it again; or have the server's administrator "
            "set the host up with receiver = fakesuper")


def _check_no_arguments(verb: str) -> Callable[[List[str]], Request]:
    """ping and complete: the bare word, nothing after it."""
    def check(rest: List[str]) -> Request:
        if rest:
            raise Refused(f"{verb!r} with arguments is not a command byteback runs")
        return Request(verb)
    return check


# What a client may ask for: the first word of its command, and the check
# that makes a Request of the rest (or refuses it).
CLIENT_VERBS: Dict[str, Callable[[List[str]], Request]] = {
    "ping": _check_no_arguments("ping"),          # the client's first question
    "complete": _check_complete,                  # the end of a push: take the snapshot
    "list": parse_list_words,                     # restore's listing
    "rsync": _check_rsync_words,                  # a push, or a restore's sender
    "byteback-receive": _check_original_receive,  # the original client's ping, complete, list
    "byteback-restore": _check_original_restore,  # the original client's restore
}


def check_receive_command(original: str) -> Request:
    """Decide what a client may run, from SSH_ORIGINAL_COMMAND alone.  Raises Refused.

    Pure: it never touches the disc, so a table of hostile strings can test it.
    """
    if not original or not original.strip():
        raise Refused("no command given; byteback clients send ping, complete or rsync")
    if len(original) > 65536:
        raise Refused("command too long")
    if "\0" in original or "\n" in original or "\r" in original:
        # A second line would be a second command to anything that reads lines.
        raise Refused("control characters in the command")
    try:
        # Split like a POSIX shell would quote, but never run one: there is no
        # expansion, substitution or redirection, so ';', '|', '$(...)' stay
        # plain words, and those words are then refused as unknown.
        words = shlex.split(original, comments=False, posix=True)
    except ValueError as e:
        raise Refused(f"unparsable command ({e})") from None
    if not words:
        raise Refused("empty command")
    if words[0] not in CLIENT_VERBS:
        raise Refused(f"{words[0]!r} is not a command byteback runs")
    return CLIENT_VERBS[words[0]](words[1:])


# === 7. Store backends: files and trees on the store's disc ==================

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


def scandir_entries(path: str) -> List[os.DirEntry]:
    """A directory's entries; none when it vanished or cannot be read."""
    try:
        with os.scandir(path) as it:
            return list(it)
    except OSError:
        return []


def walk_entries(root: Path) -> Iterator[tuple]:
    """(path, lstat) of everything below root, directories too; links never followed.

    Entries that vanish or cannot be read while walking are passed over.
    """
    stack = [str(root)]
    while stack:
        for entry in scandir_entries(stack.pop()):
            try:
                st = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if stat.S_ISDIR(st.st_mode):
                stack.append(entry.path)
            yield entry.path, st


def walk_files(root: Path) -> Iterator[tuple]:
    """(path, lstat) of everything below root that is not a directory (see walk_entries)."""
    return ((path, st) for path, st in walk_entries(root) if not stat.S_ISDIR(st.st_mode))


UNACCOUNTED_ENTRY_MIN = 4096           # what any file, directory or link takes at least


def entry_xattr_bytes(path: str) -> int:
    """Bytes of an entry's extended attributes, names and values, never following a link; 0 when
    it vanished (the kernel bounds both lists at 64 KiB, so this is bounded too).  Not the
    security.* labels the kernel's LSM puts on every file: small, and not a user's to grow."""
    try:
        names = os.listxattr(path, follow_symlinks=False)
    except OSError:
        return 0
    total = 0
    for name in (n for n in names if not n.startswith("security.")):
        try:
            total += len(name.encode()) + 1 + len(os.getxattr(path, name, follow_symlinks=False))
        except OSError:
            pass
    return total


def tree_size(root: Path) -> tuple:
    """(bytes in regular files, bytes in files not hard-linked elsewhere) below root."""
    return tree_stats(root)[:2]


def tree_stats(root: Path) -> tuple:
    """tree_size's two figures, and how many names below root share an inode with another.

    Files hard-linked within the tree count once.
    """
    total = unique = linked = 0
    seen = set()
    for _, st in walk_files(root):
        if not stat.S_ISREG(st.st_mode):
            continue
        if st.st_nlink > 1:
            linked += 1
            if st.st_ino in seen:
                continue
            seen.add(st.st_ino)
        else:
            unique += st.st_size
        total += st.st_size
    return total, unique, linked


def _is_real_dir(path: Path) -> bool:
    """A directory, not a symlink to one; False if it vanished meanwhile."""
    try:
        return stat.S_ISDIR(os.lstat(path).st_mode)
    except OSError:
        return False


def _is_real_dir_entry(entry: os.DirEntry) -> bool:
    """_is_real_dir of a directory entry, from the type its directory gave (a stat only where
    the filesystem gives none)."""
    try:
        return entry.is_dir(follow_symlinks=False)
    except OSError:
        return False


FICLONE = 0x40049409   # ioctl: make a file share another's extents (btrfs reflink)


def _give_own_inode(path: str, st: os.stat_result, reflink: bool, as_root: bool) -> None:
    """Replace path by a file of the same content and attributes that shares no inode.

    On btrfs a reflinked copy costs no data blocks and keeps --inplace's delta
    basis (_clone_at, in path's directory).  Elsewhere, or when that fails, dropping
    the name is safe too: rsync sends the file again, or --link-dest links it again
    if unchanged.
    """
    if reflink and stat.S_ISREG(st.st_mode):
        head, tail = os.path.split(path)
        try:
            fd = os.open(head or ".", os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass
        else:
            try:
                _clone_at(fd, os.fsencode(tail), st, as_root)
                return
            except OSError:
                pass                 # no longer that file: its name goes
            finally:
                os.close(fd)
    os.unlink(path)


def _directory_below(dirs: Dict[bytes, Optional[int]], path: bytes, dev: int) -> Optional[int]:
    """A descriptor of directory `path` below dirs[b""] (cached in dirs), each step opened
    with O_NOFOLLOW and on filesystem `dev`; None where a step is gone.  OSError where a
    step is a symlink, not a directory or on another filesystem (a planted subvolume)."""
    done = path
    while done not in dirs:
        done = done.rpartition(b"/")[0]
    for part in path[len(done):].lstrip(b"/").split(b"/") if path != done else ():
        fd = dirs[done]
        done = done + b"/" + part if done else part
        if fd is None:
            dirs[done] = None
            continue
        try:
            inner = os.open(part, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
        except FileNotFoundError:
            dirs[done] = None
            continue
        dirs[done] = inner
        if os.fstat(inner).st_dev != dev:
            raise OSError(errno.EXDEV, "another filesystem on the way", done)
    return dirs[path]


def _clone_at(dir_fd: int, name: bytes, st: os.stat_result, as_root: bool) -> None:
    """Replace file `name` in dir_fd, found as st, by a reflinked copy of it with its owner,
    xattrs, mode and times (_give_own_inode's, by descriptor); where the copy fails, drop
    the name (rsync sends the file again).  OSError where it is no longer that file."""
    src = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC, dir_fd=dir_fd)
    tmp = b".byteback-own-%d" % os.getpid()
    try:
        found = os.fstat(src)
        if (found.st_ino, found.st_dev) != (st.st_ino, st.st_dev):
            raise OSError(errno.EAGAIN, "replaced while it was given an inode of its own", name)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp, dir_fd=dir_fd)
        try:
            dst = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600,
                          dir_fd=dir_fd)
            try:
                fcntl.ioctl(dst, FICLONE, src)
                if as_root:
                    os.fchown(dst, st.st_uid, st.st_gid)     # first: a chown drops capabilities
                for attr in os.listxattr(src):
                    os.setxattr(dst, attr, os.getxattr(src, attr))
                os.fchmod(dst, stat.S_IMODE(st.st_mode))
                os.utime(dst, ns=(st.st_atime_ns, st.st_mtime_ns))
            finally:
                os.close(dst)
            os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
        except OSError:
            with contextlib.suppress(OSError):
                os.unlink(tmp, dir_fd=dir_fd)
            os.unlink(name, dir_fd=dir_fd)
    finally:
        os.close(src)


def give_names_own_inodes(root: Path, names: Sequence[bytes], as_root: bool) -> int:
    """Give each of `names` (paths below root) that shares its inode an inode of its own
    (_clone_at); returns how many.  Each is reached from root's descriptor through real
    directories on root's filesystem only: the names are a client's, and the backup
    user or the host's account can have swapped a directory on the way for a symlink
    to anywhere it can write.  A name that is gone is passed over (rsync sends it).
    OSError at anything else unexpected: a step that is a symlink or on another
    filesystem, a name that is not a regular file."""
    top = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    dirs: Dict[bytes, Optional[int]] = {b"": top}
    found = []
    try:
        dev = os.fstat(top).st_dev
        for name in names:
            parent, _, base = name.rpartition(b"/")
            fd = _directory_below(dirs, parent, dev)
            try:
                st = os.stat(base, dir_fd=fd, follow_symlinks=False) if fd is not None else None
            except FileNotFoundError:
                st = None
            if st is None:
                continue
            if not stat.S_ISREG(st.st_mode) or st.st_dev != dev:
                raise OSError(errno.EINVAL, "not a regular file", name)
            if st.st_nlink > 1:
                found.append((fd, base, st))
        # Every name, the last of an inode's too: one left on the old inode would be
        # linked back to it by rsync -H, and the old inode would count as changed.
        for fd, base, st in found:
            _clone_at(fd, base, st, as_root)
    finally:
        for fd in dirs.values():
            if fd is not None:
                os.close(fd)
    return len(found)


def _make_writable_and_retry(func, path, exc_info) -> None:
    """shutil.rmtree onerror: a read-only directory in a snapshot blocks deletion as non-root.

    Never as root, who needs no mode to delete: the chmod and the retry go by
    path, and a client's namespace root or the backup user, who own the tree
    (a hardlink store's current), can swap a directory on that path for a
    symlink (a directory kept filling makes rmdir fail on purpose): root
    would chmod /usr/bin 0700."""
    if os.geteuid() == 0:
        raise exc_info[1]
    parent = os.path.dirname(path)
    with contextlib.suppress(OSError):
        os.chmod(parent, stat.S_IRWXU)
    with contextlib.suppress(OSError):
        if os.path.isdir(path) and not os.path.islink(path):
            os.chmod(path, stat.S_IRWXU)
    func(path)


def remove_tree(path: Path) -> None:
    """Delete a directory tree, read-only parts too (a snapshot is read-only)."""
    with contextlib.suppress(OSError):
        os.chmod(path, stat.S_IRWXU)
    shutil.rmtree(path, onerror=_make_writable_and_retry)


def is_btrfs_subvolume(path: Path) -> bool:
    """btrfs gives every subvolume root inode number 256."""
    try:
        return os.lstat(path).st_ino == 256
    except OSError:
        return False


def unshare_walk_needed(backups: Sequence[dict], resumed: bool, again: bool) -> bool:
    """Whether a btrfs current needs its hard-linked names given inodes of their own (pure).

    again: this run's client runs rsync once more when the snapshot refuses
    with 'again:' (AGAIN_WORD).  Then only a resumed run walks (an earlier one
    wrote into current since its snapshot), or one where the newest snapshot
    was not measured by root from the kernel's tree ('linked' missing).  A
    measured one is followed by a snapshot that is measured too: if a run
    changed an inode that names of the previous snapshot share,
    BtrfsStore.take_snapshot refuses it and the next push, resumed, walks.
    A client that does not say so would fail that night instead: its push
    walks wherever the newest snapshot holds hard-linked names, or is not
    known not to.  rsync --hard-links makes links only after it has written a
    group's first file, which it never writes again in the same run, so the
    links a run makes itself are no risk.
    """
    last = backups[-1] if backups else None
    linked = last.get("linked") if isinstance(last, dict) else None
    measured = isinstance(linked, int) and not isinstance(linked, bool)
    return resumed or not measured or (linked != 0 and not again)


# -- The names an 'again:' lists (issue 14) ------------------------------------
#
# The pass after an 'again:' need not copy the whole tree: only the names of the
# inodes the snapshot found changed can hold another name's data.  The snapshot
# lists them (again_message) and records them (AGAIN_RECORD); a client that reads
# them sends only those (--files-from) and says so (NAMED_WORD), and its push gives
# only those an inode of their own.  Nothing here is trusted: the snapshot after
# the pass checks every shared inode the run wrote, as after any push.
AGAIN_NAMES_MAX = 1000                  # past it the pass copies everything, as before
AGAIN_RECORD = ".byteback-again"        # in <host>/, root's
AGAIN_NAMES_MARK = "; only these names need it: "
AGAIN_LIST_BYTES = 256 * 1024           # the listing's encoded names: one stderr line, and the record
AGAIN_RECORD_BYTES = AGAIN_LIST_BYTES + 4096


def quote_names(names: Sequence[bytes]) -> List[str]:
    """Names as percent-encoded text: one word each, any byte (pure)."""
    from urllib.parse import quote_from_bytes
    return [quote_from_bytes(n, safe="/") for n in names]


def check_names(words: Sequence[object]) -> Optional[List[bytes]]:
    """The names quote_names made, decoded, or None if any is not a plain relative path
    (empty, absolute, '.', '..', a NUL) or there are more than AGAIN_NAMES_MAX (pure)."""
    from urllib.parse import unquote_to_bytes
    if len(words) > AGAIN_NAMES_MAX or not all(isinstance(w, str) and w and w.isascii() for w in words):
        return None
    names = [unquote_to_bytes(w) for w in words]
    for name in names:
        if b"\0" in name or any(part in (b"", b".", b"..") for part in name.split(b"/")):
            return None
    return names


def again_message(count: int, names: Optional[Sequence[bytes]]) -> str:
    """An 'again:' refusal's words after 'again: ' (pure): with the names, where listed."""
    text = (f"{count} hard-linked files in current were changed by this backup; rsync must copy "
            "once more, each name on an inode of its own (the next backup does that by itself)")
    return text + (AGAIN_NAMES_MARK + " ".join(quote_names(names)) if names else "")


def again_names(line: str) -> Optional[List[bytes]]:
    """The names an 'again:' line lists (again_message), or None (pure)."""
    _, mark, words = line.partition(AGAIN_NAMES_MARK)
    return check_names(words.split(" ")) if mark else None


# --- 7b. Reading btrfs through the kernel (binary tree searches, no tool's text) ---

# -- Reading a subvolume's own tree (binary, through the kernel) --------------
#
# What a backup cost must come from a source a client cannot write into.
# `btrfs subvolume find-new` prints client-chosen file names raw: a name
# holding "\ninode 1 file offset 0 len 1000000000000000" forged a line and a
# 10^15-byte backup (issue 8, class 1).  The kernel's tree search hands back
# fixed-size binary records instead, in which a name is only ever bytes
# inside one item.  Layouts from linux include/uapi/linux/btrfs.h and
# btrfs_tree.h (all little-endian, packed).
BTRFS_IOC_TREE_SEARCH_V2 = 0xC0709411   # _IOWR(0x94, 17, btrfs_ioctl_search_args_v2: 112 bytes)
BTRFS_IOC_SPACE_INFO = 0xC0109414       # _IOWR(0x94, 20, btrfs_ioctl_space_args: 16 bytes)
BTRFS_IOC_SYNC = 0x9408                 # _IO(0x94, 8): write out delayed data and inodes, commit
BTRFS_IOC_START_SYNC = 0x80089418       # _IOR(0x94, 24, __u64): commit the running transaction; its id
BTRFS_IOC_WAIT_SYNC = 0x40089416        # _IOW(0x94, 22, __u64): wait until that transaction is on disc
_SEARCH_KEY = struct.Struct("<7Q4I4Q")  # btrfs_ioctl_search_key: 104 bytes
_SEARCH_HEADER = struct.Struct("<3Q2I")  # btrfs_ioctl_search_header: transid objectid offset type len
_SEARCH_BUFFER = 256 * 1024             # items per ioctl call: a few thousand
_U64_MAX = 2 ** 64 - 1
BTRFS_INODE_ITEM, BTRFS_INODE_REF, BTRFS_INODE_EXTREF = 1, 12, 13
BTRFS_XATTR_ITEM, BTRFS_DIR_ITEM, BTRFS_DIR_INDEX, BTRFS_EXTENT_DATA = 24, 84, 96, 108
BTRFS_ITEM_OVERHEAD = 25    # struct btrfs_item: the key and place of every item in its leaf
# btrfs_inode_item: generation, transid, size, nbytes, block_group, nlink, uid, gid, mode
_INODE_ITEM = struct.Struct("<QQQQQIIII")
_DIR_ITEM_TRANSID = struct.Struct("<17xQ")          # btrfs_dir_item: location key, then transid
# btrfs_dir_item whole: location key (objectid, type, offset), transid, data_len, name_len, type
_DIR_ITEM = struct.Struct("<QBQQHHB")
_EXTENT_ITEM = struct.Struct("<Q12xBQQ")            # generation, (ram_bytes..), type, disk_bytenr, disk_num_bytes
BTRFS_FILE_EXTENT_INLINE = 0
_NAME_ITEMS = frozenset({BTRFS_XATTR_ITEM, BTRFS_DIR_ITEM, BTRFS_DIR_INDEX})   # all a btrfs_dir_item
BTRFS_BLOCK_GROUP_DATA, BTRFS_BLOCK_GROUP_METADATA = 1, 4
# Block group profile bits -> copies of every byte on disc.
BTRFS_PROFILE_COPIES = {16: 2, 32: 2, 64: 2, 512: 3, 1024: 4}   # RAID1 DUP RAID10 RAID1C3 RAID1C4


class SubvolumeUsage(NamedTuple):
    """What a subvolume's tree says about it, counted from the kernel's binary items."""
    size: int          # bytes in regular files, hard-linked files once (full walks only)
    data: int          # disc bytes of data extents written after `since`, each extent once
    metadata: int      # bytes of tree items (inodes, names, xattrs, inline data) changed after `since`
    generation: int    # the newest transaction any of its leaves was written in
    linked: int        # names of regular files that share their inode (full walks only)
    shared: tuple = ()  # SharedInode: inodes of more than one name, made before `since`, written after it
    committed: int = 0  # the transaction on disc before the search: all of it up to here was read
    # directories written after `since` whose access time is still written (UNTIMED_LIMIT at
    # most; None past it): keep_directories_timeless
    untimed: Optional[tuple] = ()


# btrfs_inode_item past _INODE_ITEM: rdev, flags (@56), mtime (@136: seconds, nanoseconds)
_INODE_REST = struct.Struct("<56xQQ64xQI")


class SharedInode:
    """One inode's items as a change of its names alone leaves them: its stat (not its
    link count, change or access time), and a digest of its xattr and data extent items,
    whole (a constant size however many a client gave it).

    written: one of those xattrs or extents was written at `since` or later.
    Pure: made from the kernel's buffers.  BtrfsStore.take_snapshot compares an
    inode of current with the same inode in the last snapshot (shared_inode_changed).
    """
    __slots__ = ("inode", "made", "nlink", "stat", "_items", "written")

    def __init__(self, inode: int, buf, item: int, length: int):
        import hashlib
        made, _written, size, nbytes, _bg, nlink, uid, gid, mode = _INODE_ITEM.unpack_from(buf, item)
        rest = _INODE_REST.unpack_from(buf, item) if length >= _INODE_REST.size else None
        self.inode, self.made, self.nlink = inode, made, nlink
        self.stat = (size, nbytes, uid, gid, mode, rest)
        self._items = hashlib.sha256()
        self.written = False

    @property
    def items(self) -> str:
        return self._items.hexdigest()

    def add(self, kind: int, offset: int, buf, item: int, length: int, since: int) -> None:
        """Take one of the inode's xattr or extent items (others change with its names)."""
        if kind == BTRFS_EXTENT_DATA and length >= 8:
            self.written = self.written or struct.unpack_from("<Q", buf, item)[0] >= since
        elif kind == BTRFS_XATTR_ITEM and length >= _DIR_ITEM_TRANSID.size:
            # An xattr replaced in place keeps its item's transid: its bytes tell.
            self.written = self.written or _DIR_ITEM_TRANSID.unpack_from(buf, item)[0] >= since
        else:
            return
        self._items.update(struct.pack("<BQI", kind, offset, length))
        self._items.update(buf[item:item + length])


def shared_inode_changed(now: SharedInode, before: Optional[SharedInode]) -> bool:
    """Whether a run's writes to an inode that several names share in current may have
    reached a name the client did not change (pure; BtrfsStore.take_snapshot).

    before: the same inode in the last snapshot, which current was when the run
    began (an unfinished run's walk gave every hard-linked name an inode of its
    own).  Not when it had one name there: rsync -H links a group's other names
    only after it wrote the first.  Not when only names were added or removed
    (rsync -H linking a new name, --delete, a package upgrade): its data,
    xattrs and stat are as they were.  An inode not found there is counted.
    """
    if before is None or before.made != now.made:
        return True
    if before.nlink < 2:
        return False
    return now.written or now.stat != before.stat or now.items != before.items


class SubvolumeTally:
    """Adds up a subvolume's tree items, buffer by buffer: its size, and what changed since.

    Pure: it reads only the kernel's buffers.  Every item carries the
    transaction that last wrote it (an inode's transid, a name's or an
    xattr's transid, an extent's generation), except an inode's back
    references, which go with their inode.  Data extents count at their disc
    size, once each even when several files share them (a reflinked copy keeps
    its extent's old generation, so it costs nothing).  A file name is only
    ever bytes inside one item: nothing here reads it.
    """

    def __init__(self, since: int):
        self.since = since
        self.size = self.data = self.metadata = self.generation = self.linked = 0
        self._inode, self._inode_changed = -1, False
        self._extents: set = set()
        self._shared: List[SharedInode] = []
        self._this_shared: Optional[SharedInode] = None     # the inode being read, if one of them
        self._untimed: Optional[List[int]] = []
        # Told of each inode written since (its mode) and each data extent (None), with the
        # buffer and the item's place in it; False ends the search.
        self.watch: Optional[Callable[[int, Optional[int], bytes, int, int], bool]] = None

    def add(self, buf, count: int) -> Optional[tuple]:
        """Take `count` records of a search buffer; return the last key (objectid, type, offset).

        A record that claims more bytes than the buffer holds ends the buffer
        (the kernel never writes one).
        """
        since, end, pos, last, watch = self.since, len(buf), 0, None, self.watch
        header, inode_item, name_transid, extent = (_SEARCH_HEADER.unpack_from, _INODE_ITEM.unpack_from,
                                                    _DIR_ITEM_TRANSID.unpack_from, _EXTENT_ITEM.unpack_from)
        for _ in range(count):
            if pos + _SEARCH_HEADER.size > end:
                break
            transid, objectid, offset, kind, length = header(buf, pos)
            pos += _SEARCH_HEADER.size
            item, pos = pos, pos + length
            if pos > end:
                break
            last = objectid, kind, offset
            if transid > self.generation:
                self.generation = transid
            if objectid != self._inode:
                self._inode, self._inode_changed, self._this_shared = objectid, False, None
            elif self._this_shared is not None and kind in (BTRFS_EXTENT_DATA, BTRFS_XATTR_ITEM):
                self._this_shared.add(kind, offset, buf, item, length, since)
            if transid < since:
                # A leaf last written before `since` (the header's transid is its
                # leaf's generation): none of its items is, so only their sizes
                # count.  Most of a full measure's leaves (issue 14: ~40 % of its time).
                if kind == BTRFS_INODE_ITEM and length >= _INODE_ITEM.size:
                    _made, _written, isize, _nbytes, _bg, nlink, _uid, _gid, mode = inode_item(buf, item)
                    if mode & 0o170000 == 0o100000 and nlink:
                        self.size += isize
                        if nlink > 1:
                            self.linked += nlink
                continue
            changed = False
            if kind == BTRFS_INODE_ITEM and length >= _INODE_ITEM.size:
                made, written, isize, _nbytes, _bg, nlink, _uid, _gid, mode = inode_item(buf, item)
                if mode & 0o170000 == 0o100000 and nlink:   # a regular file with a name:
                    # one unlinked but still open has none, and no restore gives it back
                    self.size += isize
                    if nlink > 1:
                        self.linked += nlink
                changed = self._inode_changed = written >= since
                if (changed and mode & 0o170000 == 0o040000 and length >= INODE_ITEM_BYTES
                        and self._untimed is not None and not inode_flags(buf, item) & BTRFS_INODE_NOATIME):
                    self._untimed.append(objectid)
                    if len(self._untimed) > UNTIMED_LIMIT:
                        self._untimed = None
                if changed and watch is not None and not watch(objectid, mode, buf, item, length):
                    return None
                if changed and nlink > 1 and made < since and mode & 0o170000 != 0o040000:
                    # An inode the names of an older backup share, written by this one:
                    # see BtrfsStore.take_snapshot.
                    self._this_shared = SharedInode(objectid, buf, item, length)
                    self._shared.append(self._this_shared)
            elif kind == BTRFS_EXTENT_DATA and length >= 21:
                changed = struct.unpack_from("<Q", buf, item)[0] >= since
                if changed and watch is not None and not watch(objectid, None, buf, item, length):
                    return None
                if changed and length >= _EXTENT_ITEM.size:
                    _gen, form, bytenr, disc_bytes = extent(buf, item)
                    # bytenr 0 is a hole; an inline extent's bytes are the item's own.
                    if form != BTRFS_FILE_EXTENT_INLINE and bytenr and bytenr not in self._extents:
                        self._extents.add(bytenr)
                        self.data += disc_bytes
            elif kind in _NAME_ITEMS and length >= _DIR_ITEM_TRANSID.size:
                changed = name_transid(buf, item)[0] >= since
            elif kind in (BTRFS_INODE_REF, BTRFS_INODE_EXTREF):
                changed = self._inode_changed
            if changed:
                self.metadata += length + BTRFS_ITEM_OVERHEAD
        return last

    def usage(self) -> SubvolumeUsage:
        return SubvolumeUsage(self.size, self.data, self.metadata, self.generation, self.linked,
                              tuple(self._shared), 0, None if self._untimed is None else tuple(self._untimed))


def _next_key(objectid: int, kind: int, offset: int) -> Optional[tuple]:
    """The smallest (objectid, type, offset) after the given one, or None at the end."""
    if offset < _U64_MAX:
        return objectid, kind, offset + 1
    if kind < 255:
        return objectid, kind + 1, 0
    return (objectid + 1, 0, 0) if objectid < _U64_MAX else None


def search_tree(fd: int, take: Callable[[memoryview, int], Optional[tuple]], *, tree: int = 0,
                first: tuple = (0, 0, 0), last: tuple = (_U64_MAX, 255, _U64_MAX), min_transid: int = 0,
                buffer: int = _SEARCH_BUFFER) -> None:
    """Hand every item of a btrfs tree from key `first` to key `last` (objectid, type, offset),
    in leaves written at min_transid or later, to take(buffer, count), which returns the last
    key it read.  tree 0: the subvolume fd is in.  Needs root (CAP_SYS_ADMIN).  Raises OSError."""
    args = bytearray(_SEARCH_KEY.size + 8 + buffer)
    records = memoryview(args)[_SEARCH_KEY.size + 8:]
    key: Optional[tuple] = first
    while key is not None:
        # The key range is compound (objectid, type, offset), so it resumes after the last item.
        _SEARCH_KEY.pack_into(args, 0, tree, key[0], last[0], key[2], last[2], min_transid, _U64_MAX,
                              key[1], last[1], 1 << 20, 0, 0, 0, 0, 0)
        struct.pack_into("<Q", args, _SEARCH_KEY.size, buffer)
        fcntl.ioctl(fd, BTRFS_IOC_TREE_SEARCH_V2, args, True)
        count = struct.unpack_from("<I", args, 64)[0]      # nr_items: how many came back
        end = take(records, count) if count else None
        key = _next_key(*end) if end and end < last else None


def _search_records(buf, count: int) -> Iterator[tuple]:
    """(objectid, type, offset, item's position, item's length) of a search buffer's records.

    A record that claims more bytes than the buffer holds ends the buffer
    (the kernel never writes one)."""
    pos, end = 0, len(buf)
    for _ in range(count):
        if pos + _SEARCH_HEADER.size > end:
            return
        _transid, objectid, offset, kind, length = _SEARCH_HEADER.unpack_from(buf, pos)
        item, pos = pos + _SEARCH_HEADER.size, pos + _SEARCH_HEADER.size + length
        if pos > end:
            return
        yield objectid, kind, offset, item, length


class InodeReader:
    """search_tree's take for the items of one inode: the SharedInode they make (pure)."""

    def __init__(self):
        self.inode: Optional[SharedInode] = None

    def take(self, buf, count: int) -> Optional[tuple]:
        last = None
        for objectid, kind, offset, item, length in _search_records(buf, count):
            last = objectid, kind, offset
            if self.inode is not None:
                self.inode.add(kind, offset, buf, item, length, _U64_MAX)
            elif kind == BTRFS_INODE_ITEM and length >= _INODE_ITEM.size:
                self.inode = SharedInode(objectid, buf, item, length)
        return last


def read_inode(fd: int, inode: int) -> Optional[SharedInode]:
    """One inode of the subvolume holding fd, as SharedInode (None: there is none).
    Root only.  Raises OSError."""
    reader = InodeReader()
    search_tree(fd, reader.take, first=(inode, BTRFS_INODE_ITEM, 0), last=(inode, BTRFS_EXTENT_DATA, _U64_MAX),
                buffer=64 * 1024)
    return reader.inode


_INODE_REF_HEAD = struct.Struct("<QH")       # btrfs_inode_ref: index, name_len; the name follows
_INODE_EXTREF_HEAD = struct.Struct("<QQH")   # btrfs_inode_extref: parent, index, name_len; the name


def _inode_refs(buf, kind: int, offset: int, item: int, length: int) -> Iterator[tuple]:
    """(parent directory, name) of each name in one INODE_REF or INODE_EXTREF item (pure).
    A name that claims more bytes than its item holds ends the item."""
    pos, end = item, item + length
    head = _INODE_REF_HEAD if kind == BTRFS_INODE_REF else _INODE_EXTREF_HEAD
    while pos + head.size <= end:
        fields = head.unpack_from(buf, pos)
        parent, name_len = (offset, fields[1]) if kind == BTRFS_INODE_REF else (fields[0], fields[2])
        pos += head.size
        if pos + name_len > end:
            return
        yield parent, bytes(buf[pos:pos + name_len])
        pos += name_len


def back_references(fd: int, inode: int, tree: int = 0) -> List[tuple]:
    """(parent directory, name) of every name of file `inode` in subvolume `tree` (0: the one
    holding fd): its INODE_REF and INODE_EXTREF items.  Root only.  Raises OSError."""
    refs: List[tuple] = []

    def take(buf, count: int) -> Optional[tuple]:
        last = None
        for objectid, kind, offset, item, length in _search_records(buf, count):
            last = objectid, kind, offset
            if objectid == inode and kind in (BTRFS_INODE_REF, BTRFS_INODE_EXTREF):
                refs.extend(_inode_refs(buf, kind, offset, item, length))
        return last

    search_tree(fd, take, tree=tree, first=(inode, BTRFS_INODE_REF, 0),
                last=(inode, BTRFS_INODE_EXTREF, _U64_MAX), buffer=64 * 1024)
    return refs


def inode_names(fd: int, inode: int, limit: int) -> Optional[List[bytes]]:
    """Every name of file `inode` in the subvolume holding fd, as a path below its root
    (its back references; each parent's path from BTRFS_IOC_INO_LOOKUP), or None past
    `limit` names.  The kernel's items, never a walk.  Root only.  Raises OSError."""
    refs = back_references(fd, inode)
    if len(refs) > limit:
        return None
    tree, paths = subvolume_info(fd).id, {}
    for parent, _ in refs:
        if parent not in paths:
            paths[parent] = _directory_path(fd, tree, parent)
    return [paths[parent] + name for parent, name in refs]


# A run's snapshot is sized without a walk of current's whole tree (issue 14:
# the walk was most of a snapshot's time, and it grows with the tree, not with
# the run): only an inode the run wrote, or one a name it removed pointed to,
# can count differently in current than in its last snapshot, so current's
# size and linked names are that snapshot's, plus what each such inode counts
# now, less what it counted there (the same inode number, read in both trees).
# Bounds, near where the walk costs as much (tests/bench/test_measure_bench.py,
# a tree of 30,000 files in directories of 100): about 300 directories written
# and about 600 other inodes (600 files rewritten in place took 0.7-1.1 of the
# walk's time from run to run, 300 of them 0.4-0.8).  Fixed, not a share of
# the tree, whose count of files no record holds: in a small tree a run that
# writes many files costs up to ~0.1 s more than its walk.
QUIET_DIRECTORIES = 300
QUIET_FILES = 600


# -- Directories that never take an access time ------------------------------
#
# rsync reads every directory of current (its --delete scan), and on a store
# mounted without noatime that writes each one's access time: relatime does it
# once a day, so every nightly backup copied the inode item of every directory
# away from the snapshot before (8 MiB a night for the benchmark's 30,000
# files, kept as long as that snapshot).  The inode flag FS_NOATIME_FL
# (chattr +A) stops it for one directory whatever the mount says, and btrfs
# does not pass it to the directories made in one: after each snapshot root
# sets it on every directory of current whose inode item, written since the
# run began, lacks it (a new one, or an older one whose access time was just
# written), as the snapshot's measure read them in the leaves written since
# (SubvolumeUsage.untimed: no walk, no second search); past UNTIMED_LIMIT of
# them, by a walk of current's directories (a first backup, a store from
# before).  rsync never copies inode flags, so no restore gets it.
FS_IOC_GETFLAGS = 0x80086601            # _IOR('f', 1, long); the kernel reads and writes an int
FS_IOC_SETFLAGS = 0x40086602            # _IOW('f', 2, long)
FS_NOATIME_FL = 0x80
BTRFS_INODE_NOATIME = 1 << 9            # the same, in a btrfs_inode_item's flags (@64)
UNTIMED_LIMIT = 1000


def inode_flags(buf, item: int) -> int:
    """The flags of the btrfs_inode_item at `item` in buf (a whole one: INODE_ITEM_BYTES)."""
    return _INODE_REST.unpack_from(buf, item)[1]


def file_flags(fd: int) -> int:
    """The inode flags (chattr's, FS_IOC_GETFLAGS) of the file open as fd.  Raises OSError."""
    buf = bytearray(8)          # the kernel writes an int where the ioctl's number says long
    fcntl.ioctl(fd, FS_IOC_GETFLAGS, buf)
    return int.from_bytes(buf[:4], "little")


def set_file_flags(fd: int, flags: int) -> None:
    """Make flags the inode flags of the file open as fd (FS_IOC_SETFLAGS).  Raises OSError."""
    fcntl.ioctl(fd, FS_IOC_SETFLAGS, bytearray(flags.to_bytes(4, "little") + bytes(4)))


def _set_no_atime(fd: int) -> bool:
    """Set FS_NOATIME_FL on the directory (or file) open as fd, keeping its other flags:
    whether it was not set yet.  Raises OSError."""
    flags = file_flags(fd)
    if flags & FS_NOATIME_FL:
        return False
    set_file_flags(fd, flags | FS_NOATIME_FL)
    return True


NO_ATIME_DEPTH = 256    # deeper directories keep their access times: only space, and a bound on descriptors
NO_ATIME_NAMES = 1 << 18    # names the walk holds at once (~25 MiB): the directories past it keep theirs too


def _no_atime_below(top: int) -> int:
    """FS_NOATIME_FL on every directory below (and at) the directory open as top, in its
    subvolume, NO_ATIME_DEPTH levels deep at most: each opened by name from its parent's
    descriptor with O_NOATIME, never through a symlink or into another subvolume, with a
    descriptor open for each level above it only, and the names of the subdirectories
    still to visit on each level (NO_ATIME_NAMES of them at most, all levels together:
    a hostile client chooses how wide its directories are).  Returns how many were set."""
    device = os.fstat(top).st_dev
    held = 0            # names in the lists along the path

    def subdirectories(fd: int) -> List[str]:
        """The names to visit below fd, last first (taken with pop: a name visited is let go)."""
        nonlocal held
        with os.scandir(fd) as entries:
            names = list(itertools.islice((e.name for e in entries if e.is_dir(follow_symlinks=False)),
                                          NO_ATIME_NAMES - held))
        held += len(names)
        names.reverse()
        return names
    done = _set_no_atime(top)
    path = [(os.dup(top), subdirectories(top))]
    try:
        while path:
            fd, names = path[-1]
            if not names:
                os.close(path.pop()[0])
                continue
            name = names.pop()
            held -= 1
            try:
                below = os.open(name, _DIRECTORY_FLAGS | os.O_NOATIME, dir_fd=fd)
            except OSError:
                continue                               # gone, or replaced meanwhile
            try:
                if os.fstat(below).st_dev != device:
                    raise OSError(errno.EXDEV, "another subvolume")
                done += _set_no_atime(below)
                deeper = subdirectories(below) if len(path) < NO_ATIME_DEPTH else []
            except OSError:
                os.close(below)
                continue
            path.append((below, deeper))
    finally:
        for fd, _ in path:
            os.close(fd)
    return done


def keep_directories_timeless(path: Path, untimed: Optional[Sequence[int]]) -> int:
    """FS_NOATIME_FL on each directory `untimed` names (inode numbers in the subvolume at path,
    SubvolumeUsage.untimed), each reached by its names from the root (_directory_chain); on
    every directory by a walk (_no_atime_below) where untimed is None (too many to name).
    Returns how many were set.  Root only.  Raises OSError."""
    top = os.open(path, _DIRECTORY_FLAGS | os.O_NOATIME)
    try:
        if untimed is None:
            return _no_atime_below(top)
        done = 0
        for inode in untimed:
            with contextlib.suppress(OSError):       # moved or gone since: the next run sees it
                fd = (os.dup(top) if inode == BTRFS_FIRST_FREE_OBJECTID else
                      _walk_down(top, _directory_chain(top, 0, inode)))
                try:
                    done += _set_no_atime(fd)
                finally:
                    os.close(fd)
        return done
    finally:
        os.close(top)


class QuietTally(SubvolumeTally):
    """A tally of the leaves written since `since` that also lists the inodes written:
    directories (at most QUIET_DIRECTORIES) and the others (at most QUIET_FILES), and
    checks that no data was written but into those (pure: the kernel's buffers only).

    quiet turns False, and the search stops, at the first item past a bound or of data
    whose inode was not written.  Every change btrfs makes to an inode writes its
    inode item with the transaction's id (its transid), and every name added or
    removed writes its directory's inode item: BtrfsStore._measure_quiet compares
    the names of those directories, and the inodes, with the last snapshot's.

    before(inode): that inode's item in the newest snapshot (bytes), None where it has
    none.  A directory whose item differs from it in its access time alone is left out:
    its names are the snapshot's (same_names_as_before).  On a store mounted without
    noatime, rsync's reading of every directory writes each one's (relatime: once a
    day), and each nightly backup of a tree past QUIET_DIRECTORIES was walked.
    """

    def __init__(self, since: int, limit: int = QUIET_DIRECTORIES, file_limit: int = QUIET_FILES,
                 before: Optional[Callable[[int], Optional[bytes]]] = None):
        super().__init__(since)
        self.limit, self.file_limit, self.quiet, self.directories = limit, file_limit, True, []
        self.files: Set[int] = set()         # the other inodes written
        self.before = before
        self.watch = self._written

    def _written(self, inode: int, mode: Optional[int], buf: bytes, item: int, length: int) -> bool:
        if mode is None:                     # data: of a file whose inode was written, as rsync's is
            if inode in self.files:
                return True
        elif mode & 0o170000 == 0o040000:
            # The item as long as its record says (a short one is never whole), and looked
            # up in the snapshot only if it was made before `since`: a directory this run
            # made is in no snapshot (its number, if used again there, is another's).
            now = buf[item:item + length]
            if (self.before is not None and struct.unpack_from("<Q", now)[0] < self.since
                    and same_names_as_before(now, self.before(inode))):
                return True
            if len(self.directories) < self.limit:
                self.directories.append(inode)
                return True
        elif len(self.files) < self.file_limit:
            self.files.add(inode)
            return True
        self.quiet = False
        return False


BTRFS_FT_DIR = 2                                    # btrfs_dir_item's type of a directory


INODE_ITEM_BYTES = 160                  # a whole btrfs_inode_item
# in it: generation and transid (0-16), size to the reserved words (16-112), then
# atime (112-124), ctime, mtime, otime (124-160).  Its sequence (@72) is the inode's
# i_version, which each name added to, removed from or renamed in a directory raises,
# but for a snapshot made inside it (create_pending_snapshot), which raises its size:
# both are compared, and neither is the caller's to set.


def same_names_as_before(now: bytes, before: Optional[bytes]) -> bool:
    """Whether a directory's inode item, written since `before` (the same directory's in the
    newest snapshot), changed in nothing but its access time and transid: then no name
    was added, removed or renamed in it (each raises its sequence or its size; its
    generation and otime tell a number used again).  Pure."""
    return (before is not None and len(now) == len(before) == INODE_ITEM_BYTES
            and now[:8] == before[:8] and now[16:112] == before[16:112] and now[124:] == before[124:])


def inode_item_bytes(fd: int, inode: int) -> Optional[bytes]:
    """The inode item of `inode` in the subvolume holding fd, whole; None where it has none.
    Root only.  Raises OSError."""
    found: List[bytes] = []

    def take(buf, count: int) -> None:          # one item at most: no second call
        for objectid, kind, _offset, item, length in _search_records(buf, count):
            if objectid == inode and kind == BTRFS_INODE_ITEM and length >= _INODE_ITEM.size:
                found.append(bytes(buf[item:item + length]))

    search_tree(fd, take, first=(inode, BTRFS_INODE_ITEM, 0), last=(inode, BTRFS_INODE_ITEM, _U64_MAX),
                buffer=4096)
    return found[0] if found else None


def _inode_item_or_none(fd: int, inode: int) -> Optional[bytes]:
    """inode_item_bytes, None where it cannot be read (QuietTally then compares the names)."""
    try:
        return inode_item_bytes(fd, inode)
    except OSError:
        return None


def read_inode_item(fd: int, inode: int) -> Optional[tuple]:
    """(size, names, mode) of `inode` in the subvolume holding fd, from its inode item; None
    where it has none.  Root only.  Raises OSError."""
    raw = inode_item_bytes(fd, inode)
    if raw is None:
        return None
    _made, _written, size, _nbytes, _bg, nlink, _uid, _gid, mode = _INODE_ITEM.unpack_from(raw)
    return size, nlink, mode


def _is_directory(item: Optional[tuple]) -> bool:
    return item is not None and item[2] & 0o170000 == 0o040000


def inode_counts(item: Optional[tuple]) -> tuple:
    """What an inode (read_inode_item) adds to a measure's (size, linked), as SubvolumeTally
    counts them: a regular file with a name its size, with several names their count (pure)."""
    if item is None or item[2] & 0o170000 != 0o100000 or not item[1]:
        return 0, 0
    return item[0], item[1] if item[1] > 1 else 0


def read_written_inode(fd: int, inode: int, since: int) -> Optional[SharedInode]:
    """The SharedInode a full measure makes of `inode` (every item of it, whichever leaf
    holds it), or None where it makes none.  Root only.  Raises OSError."""
    tally = SubvolumeTally(since)
    search_tree(fd, tally.add, first=(inode, BTRFS_INODE_ITEM, 0), last=(inode, BTRFS_EXTENT_DATA, _U64_MAX),
                buffer=64 * 1024)
    return next(iter(tally.usage().shared), None)


def directory_entries(fd: int, inode: int) -> Dict[int, bytes]:
    """Directory `inode`'s names in the subvolume holding fd: index -> its DIR_INDEX item
    (a btrfs_dir_item, whole: dir_entry reads one).  Root only.  Raises OSError."""
    entries: Dict[int, bytes] = {}
    header, header_size = _SEARCH_HEADER.unpack_from, _SEARCH_HEADER.size

    def take(buf, count: int) -> Optional[tuple]:
        pos, end, last = 0, len(buf), None
        for _ in range(count):          # _search_records, inline: a directory has thousands
            if pos + header_size > end:
                break
            _transid, objectid, offset, kind, length = header(buf, pos)
            item, pos = pos + header_size, pos + header_size + length
            if pos > end:
                break
            last = objectid, kind, offset
            if objectid == inode and kind == BTRFS_DIR_INDEX:
                entries[offset] = bytes(buf[item:pos])
        return last

    search_tree(fd, take, first=(inode, BTRFS_DIR_INDEX, 0), last=(inode, BTRFS_DIR_INDEX, _U64_MAX),
                buffer=64 * 1024)
    return entries


def changed_names(now: Dict[int, bytes], before: Dict[int, bytes]) -> Iterator[tuple]:
    """(whether it is now's, the item) of each of a directory's names (directory_entries) that
    one side has and the other has not, the same (pure)."""
    if now == before:
        return
    for mine, theirs, side in ((now, before, True), (before, now, False)):
        for index, item in mine.items():
            if theirs.get(index) != item:
                yield side, item


def dir_entry(item: bytes) -> Optional[tuple]:
    """(what it names: objectid, key type; its file type) of a btrfs_dir_item, or None if it
    is too short to be one (pure)."""
    if len(item) < _DIR_ITEM.size:
        return None
    child, child_kind, _offset, _transid, _data_len, _name_len, file_type = _DIR_ITEM.unpack_from(item)
    return child, child_kind, file_type


def search_subvolume(fd: int, tally: SubvolumeTally, min_transid: int = 0, tree: int = 0) -> SubvolumeUsage:
    """Feed every item of a subvolume's tree (tree 0: the one holding fd) to tally, from
    leaves written at min_transid or later.  Needs root (CAP_SYS_ADMIN).  Raises OSError."""
    search_tree(fd, tally.add, tree=tree, min_transid=min_transid)
    return tally.usage()


# -- Subvolumes themselves: what the kernel says, never a tool's text --------
#
# A shell as the backup user can `btrfs subvolume create` inside a host's
# current (it owns the directory).  rsync never makes one.  A snapshot does
# not descend into it (the snapshot shows an empty directory while the data
# stays in current), its bytes are in no backup's measure, and it makes the
# deletion of current fail.  The root tree's ROOT_REF items name every
# subvolume linked inside another: (parent id, ROOT_REF, child id).
BTRFS_IOC_INO_LOOKUP = 0xD0009412        # _IOWR(0x94, 18, btrfs_ioctl_ino_lookup_args: 4096 bytes)
BTRFS_IOC_GET_SUBVOL_INFO = 0x81F8943C   # _IOR(0x94, 60, btrfs_ioctl_get_subvol_info_args: 504 bytes)
BTRFS_ROOT_TREE_OBJECTID, BTRFS_ROOT_REF = 1, 156
BTRFS_FIRST_FREE_OBJECTID = 256          # a subvolume's root directory
BTRFS_ROOT_SUBVOL_RDONLY = 1       # btrfs_root_item flags, as GET_SUBVOL_INFO hands them back
_ROOT_REF = struct.Struct("<QQH")        # btrfs_root_ref: dirid, sequence, name_len; the name follows
# btrfs_ioctl_get_subvol_info_args: treeid @0, parent_id @264, generation @280, flags @288, otransid @352
_SUBVOL_INFO = struct.Struct("<Q256xQQQQ56xQ144x")


class SubvolumeInfo(NamedTuple):
    id: int            # its tree id
    parent: int        # the tree id of the subvolume it is linked in
    generation: int    # the newest transaction that wrote it
    created: int       # the transaction it was made (a snapshot: taken) in, "Gen at creation"
    read_only: bool


def subvolume_info(fd: int) -> SubvolumeInfo:
    """BTRFS_IOC_GET_SUBVOL_INFO of the subvolume holding fd (any user may ask).  Raises OSError."""
    args = bytearray(_SUBVOL_INFO.size)
    fcntl.ioctl(fd, BTRFS_IOC_GET_SUBVOL_INFO, args, True)
    tree, parent, _dirid, generation, flags, created = _SUBVOL_INFO.unpack(args)
    return SubvolumeInfo(tree, parent, generation, created, bool(flags & BTRFS_ROOT_SUBVOL_RDONLY))


def _directory_path(fd: int, tree: int, inode: int) -> bytes:
    """The path of directory `inode` below the root of subvolume `tree`, with a trailing '/'
    unless it is the root itself (BTRFS_IOC_INO_LOOKUP; root only)."""
    if inode == BTRFS_FIRST_FREE_OBJECTID:
        return b""
    args = bytearray(4096)
    struct.pack_into("<QQ", args, 0, tree, inode)
    fcntl.ioctl(fd, BTRFS_IOC_INO_LOOKUP, args, True)
    return bytes(args[16:]).split(b"\0", 1)[0]


def _child_subvolumes(fd: int, parent: int) -> List[tuple]:
    """(id, directory inode, name) of the subvolumes linked directly inside subvolume `parent`."""
    found: List[tuple] = []

    def take(buf, count: int) -> Optional[tuple]:
        last = None
        for objectid, kind, offset, item, length in _search_records(buf, count):
            last = objectid, kind, offset
            if kind == BTRFS_ROOT_REF and objectid == parent and length >= _ROOT_REF.size:
                dirid, _sequence, name_len = _ROOT_REF.unpack_from(buf, item)
                name = bytes(buf[item + _ROOT_REF.size:item + min(length, _ROOT_REF.size + name_len)])
                found.append((offset, dirid, name))
        return last

    search_tree(fd, take, tree=BTRFS_ROOT_TREE_OBJECTID, first=(parent, BTRFS_ROOT_REF, 0),
                last=(parent, BTRFS_ROOT_REF, _U64_MAX), buffer=64 * 1024)
    return found


def subvolume_info_at(path: Path) -> SubvolumeInfo:
    """subvolume_info of the subvolume at path, never through a symlink."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ByteBackError(f"cannot open {path}: {e.strerror}") from None
    try:
        return subvolume_info(fd)
    except OSError as e:
        raise ByteBackError(f"cannot read the btrfs subvolume {path}: {e.strerror}") from None
    finally:
        os.close(fd)


class NestedSubvolume(NamedTuple):
    """A subvolume inside another, as its ROOT_REF links it: what reaches it one name at a
    time (delete_nested_subvolume), and a path for log lines."""
    id: int
    parent: int        # the id of the subvolume it is linked in
    dirid: int         # the inode, in the parent's tree, of the directory that holds it
    name: bytes
    path: bytes        # below the outer subvolume, for log lines only

    def shown(self, outer: Path) -> str:
        """Its path for a log line or an error, below the outer subvolume at `outer`."""
        return f"{outer}/{self.path.decode('utf-8', 'surrogateescape')}"


def nested_subvolumes(fd: int) -> List[NestedSubvolume]:
    """Every subvolume inside the subvolume holding fd, at any depth, parents before their
    children.  From the kernel's own items; root only.  Raises OSError."""
    found: List[NestedSubvolume] = []
    todo = [(subvolume_info(fd).id, b"")]
    while todo:
        parent, prefix = todo.pop()
        for child, dirid, name in _child_subvolumes(fd, parent):
            try:
                below = _directory_path(fd, parent, dirid)
            except OSError as e:
                if e.errno != errno.ENAMETOOLONG:
                    raise
                # Deeper than INO_LOOKUP's 4080 bytes (a shell's doing, never rsync's): named by
                # its directory's inode in the log; deletion reaches it by descriptors.
                below = b"<directory inode %d>/" % dirid
            path = prefix + below + name
            found.append(NestedSubvolume(child, parent, dirid, name, path))
            todo.append((child, path + b"/"))
    return found


def profile_copies(spaces: Sequence[tuple]) -> tuple:
    """(copies of data, copies of metadata) from BTRFS_IOC_SPACE_INFO's (flags, total, used)."""
    def copies(kind: int) -> int:
        found = [max([n for bit, n in BTRFS_PROFILE_COPIES.items() if flags & bit] or [1])
                 for flags, _total, _used in spaces if flags & kind]
        return max(found or [1])
    return copies(BTRFS_BLOCK_GROUP_DATA), copies(BTRFS_BLOCK_GROUP_METADATA)


def _space_info(fd: int) -> List[tuple]:
    """(flags, total, used) of each kind of block group on the filesystem holding fd."""
    head = bytearray(16)
    fcntl.ioctl(fd, BTRFS_IOC_SPACE_INFO, head, True)     # space_slots 0: how many are there?
    slots = struct.unpack_from("<QQ", head)[1]
    args = bytearray(16 + 24 * slots)
    struct.pack_into("<Q", args, 0, slots)
    fcntl.ioctl(fd, BTRFS_IOC_SPACE_INFO, args, True)
    found = min(slots, struct.unpack_from("<QQ", args)[1])
    return [struct.unpack_from("<3Q", args, 16 + 24 * i) for i in range(found)]


def disc_bytes(usage: SubvolumeUsage, copies: tuple) -> int:
    """What a tally's data and metadata take on disc, every copy the profiles keep (pure)."""
    return usage.data * copies[0] + usage.metadata * copies[1]


def planted_subvolumes(path: Path) -> List[tuple]:
    """(NestedSubvolume, bytes on disc) of every subvolume inside the subvolume at path,
    parents before their children.  Root only (the kernel's root tree)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ByteBackError(f"cannot open {path}: {e.strerror}") from None
    try:
        nested = nested_subvolumes(fd)
        if not nested:
            return []
        fcntl.ioctl(fd, BTRFS_IOC_SYNC)      # their data in the page cache has no extent yet
        copies = profile_copies(_space_info(fd))
        return [(sub, disc_bytes(search_subvolume(fd, SubvolumeTally(0), tree=sub.id), copies)) for sub in nested]
    except OSError as e:
        raise ByteBackError(f"cannot read the subvolumes inside {path}: {e.strerror} "
                            "(byteback reads them as root on btrfs)") from None
    finally:
        os.close(fd)


# Deleting a nested subvolume one name at a time, from descriptors.  By id
# (btrfs-progs' --subvolid, BTRFS_IOC_SNAP_DESTROY_V2) the kernel builds the
# subvolume's whole path in a PATH_MAX buffer, and a shell can plant one
# deeper than that: ENAMETOOLONG, and current could never be rolled back.
BTRFS_IOC_SNAP_DESTROY = 0x5000940F      # _IOW(0x94, 15, btrfs_ioctl_vol_args: 4096 bytes)
_VOL_ARGS = struct.Struct("<q4088s")     # btrfs_ioctl_vol_args: fd (s64, unused here), name[4088]
_DIRECTORY_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def _directory_chain(fd: int, tree: int, inode: int) -> List[tuple]:
    """(name, inode) of each directory from the root of subvolume `tree` down to directory
    `inode`, walked up by their INODE_REF items (a directory has exactly one name).
    Root only.  Raises OSError."""
    chain: List[tuple] = []
    seen = {inode}
    while inode != BTRFS_FIRST_FREE_OBJECTID:
        refs = back_references(fd, inode, tree)
        if len(refs) != 1:
            raise OSError(errno.ESTALE, f"directory inode {inode} of subvolume {tree} has {len(refs)} names")
        parent, name = refs[0]
        # Items read one search at a time while a shell renames can, in between, say a loop.
        if parent in seen:
            raise OSError(errno.ESTALE, f"directory inode {inode} of subvolume {tree} is inside itself")
        chain.append((name, inode))
        seen.add(parent)
        inode = parent
    chain.reverse()
    return chain


def _walk_down(root: int, chain: Sequence[tuple]) -> int:
    """A new descriptor of the last directory of chain (from _directory_chain), opened one
    name at a time from the subvolume root `root`, never through a symlink, each the inode
    the chain says in root's subvolume.  Raises OSError (ESTALE: something was moved)."""
    device = os.fstat(root).st_dev       # btrfs gives each subvolume a device of its own
    here = os.dup(root)
    try:
        for name, inode in chain:
            below = os.open(name, _DIRECTORY_FLAGS, dir_fd=here)
            os.close(here)
            here = below
            st = os.fstat(here)
            if (st.st_dev, st.st_ino) != (device, inode):
                raise OSError(errno.ESTALE, f"{os.fsdecode(name)!r} is no longer directory inode {inode}")
    except BaseException:
        os.close(here)
        raise
    return here


def _reach_subvolume(fd: int, sub: NestedSubvolume, nested: Dict[int, NestedSubvolume]) -> tuple:
    """(a descriptor of the directory holding sub, one of sub's root), reached from fd (the
    root of the outer subvolume) one name at a time: a subvolume nested in a nested one
    through its parent first.  nested: every nested subvolume by id.  Raises OSError."""
    parent = nested.get(sub.parent)
    if parent is None:                   # linked in the outer subvolume itself
        if subvolume_info(fd).id != sub.parent:
            raise OSError(errno.ESTALE, f"the subvolume opened is not subvolume {sub.parent}")
        start = os.dup(fd)
    else:
        holder, start = _reach_subvolume(fd, parent, nested)
        os.close(holder)
    try:
        holder = _walk_down(start, _directory_chain(start, sub.parent, sub.dirid))
    finally:
        os.close(start)
    try:
        root = os.open(sub.name, _DIRECTORY_FLAGS, dir_fd=holder)
        try:
            if os.fstat(root).st_ino != BTRFS_FIRST_FREE_OBJECTID or subvolume_info(root).id != sub.id:
                raise OSError(errno.ESTALE, f"{os.fsdecode(sub.name)!r} is no longer subvolume {sub.id}")
        except BaseException:
            os.close(root)
            raise
    except BaseException:
        os.close(holder)
        raise
    return holder, root


# A subvolume's owner may set its read-only flag, and the kernel then refuses to
# delete any subvolume linked inside it (EROFS): a shell as the backup user made
# current, or a subvolume it planted there, read-only, and current could never
# be rolled back.  Root clears the flag and takes the root inode, so that the
# shell can no longer set it again.
BTRFS_IOC_SUBVOL_GETFLAGS = 0x80089419   # _IOR(0x94, 25, __u64)
BTRFS_IOC_SUBVOL_SETFLAGS = 0x4008941A   # _IOW(0x94, 26, __u64)
BTRFS_SUBVOL_RDONLY = 2                  # the flag these and SNAP_CREATE_V2 take (not the root item's)


def _flagged_read_only(fd: int) -> bool:
    flags = bytearray(8)
    fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_GETFLAGS, flags, True)
    return bool(struct.unpack("<Q", flags)[0] & BTRFS_SUBVOL_RDONLY)


def take_read_only_subvolume(fd: int) -> bool:
    """If the subvolume whose root directory fd is has its read-only flag set, clear it and
    give that root inode to root, so its owner cannot set the flag again.  Returns whether
    the flag was set.  Root only.  Raises OSError (EROFS: the flag stayed set)."""
    if not _flagged_read_only(fd):
        return False
    # Twice at most: until the chown the owner can set the flag again (the chown then fails,
    # EROFS), even in a call that lands after it; the second round clears it as the only owner.
    for _ in range(2):
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, bytearray(8))
        try:
            os.fchown(fd, 0, 0)
        except OSError as e:
            if e.errno != errno.EROFS:
                raise
            continue
        if not _flagged_read_only(fd):
            return True
    raise OSError(errno.EROFS, "its read-only flag was set again each time it was cleared")


def take_read_only_nested(fd: int, sub: NestedSubvolume, nested: Dict[int, NestedSubvolume]) -> bool:
    """take_read_only_subvolume of sub, reached from fd, the outer subvolume's root, as
    delete_nested_subvolume reaches it.  Raises OSError."""
    holder, root = _reach_subvolume(fd, sub, nested)
    os.close(holder)
    try:
        return take_read_only_subvolume(root)
    finally:
        os.close(root)


def delete_nested_subvolume(fd: int, sub: NestedSubvolume, nested: Dict[int, NestedSubvolume]) -> None:
    """Delete subvolume sub (it holds none) by its name in the directory that holds it,
    reached from fd, the outer subvolume's root, with no path longer than one name
    (BTRFS_IOC_SNAP_DESTROY, uncommitted).  Root only.  Raises OSError."""
    holder, root = _reach_subvolume(fd, sub, nested)
    os.close(root)
    try:
        # The name could be swapped for another subvolume between the check above and this
        # call.  Harmless: all that is reachable below the outer subvolume is its own tree
        # and the subvolumes planted in it (a rename across subvolumes is EXDEV; other
        # hosts' snapshots are read-only and outside it), and all of those go anyway.
        fcntl.ioctl(holder, BTRFS_IOC_SNAP_DESTROY, bytearray(_VOL_ARGS.pack(0, sub.name)))
    finally:
        os.close(holder)


# Making a snapshot and setting its read-only flag, by the kernel's own calls: two
# runs of btrfs-progs were ~5-25 ms each (a start, and a path that `btrfs` opens
# following symlinks) after rsync, while the client waited (issue 14).
BTRFS_IOC_SNAP_CREATE_V2 = 0x50009417    # _IOW(0x94, 23, btrfs_ioctl_vol_args_v2: 4096 bytes)
# btrfs_ioctl_vol_args_v2: fd (s64), transid, flags, 32 bytes of union, name[4040]
_VOL_ARGS_V2 = struct.Struct("<qQQ32x4040s")


def create_snapshot(source: Path, parent: Path, name: str, *, read_only: bool = False) -> None:
    """A snapshot of the subvolume at `source`, as `name` in directory `parent`, writable
    unless read_only (BTRFS_IOC_SNAP_CREATE_V2, which commits it).  Neither path is
    followed through a symlink.  Root only.  Raises OSError."""
    encoded = os.fsencode(name)
    if not encoded or b"/" in encoded or b"\0" in encoded or encoded in (b".", b"..") or len(encoded) >= 4040:
        raise OSError(errno.EINVAL, f"{name!r} is not a name in one directory")
    flags = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
    src = os.open(source, flags)
    try:
        dst = os.open(parent, flags)
        try:
            # A mutable buffer: fcntl copies an immutable one only up to 1024 bytes.
            args = _VOL_ARGS_V2.pack(src, 0, BTRFS_SUBVOL_RDONLY if read_only else 0, encoded)
            fcntl.ioctl(dst, BTRFS_IOC_SNAP_CREATE_V2, bytearray(args))
        finally:
            os.close(dst)
    finally:
        os.close(src)


def set_read_only(path: Path) -> None:
    """Set the read-only flag of the subvolume at path (BTRFS_IOC_SUBVOL_SETFLAGS, which
    commits it), never through a symlink.  Root, or the owner of its root inode.  Raises OSError."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    try:
        if os.fstat(fd).st_ino != BTRFS_FIRST_FREE_OBJECTID:
            raise OSError(errno.EINVAL, f"{path} is not a btrfs subvolume")
        fcntl.ioctl(fd, BTRFS_IOC_SUBVOL_SETFLAGS, bytearray(struct.pack("<Q", BTRFS_SUBVOL_RDONLY)))
    finally:
        os.close(fd)


def committed_transaction(fd: int) -> int:
    """The id of a transaction that is on disc, with every one before it, by the time this
    returns: the running one, committed now, or the last committed if none is running.
    Root only.  Raises OSError."""
    buf = bytearray(8)
    fcntl.ioctl(fd, BTRFS_IOC_START_SYNC, buf)
    fcntl.ioctl(fd, BTRFS_IOC_WAIT_SYNC, buf)
    return struct.unpack("<Q", buf)[0]


def measure_subvolume(path: Path, since: int, *, full: bool, tally: Optional[SubvolumeTally] = None) -> tuple:
    """(SubvolumeUsage, bytes added on disc) of the subvolume at path, since transaction `since`.

    full=False reads only leaves written since then (size is then partial).
    tally: the one to feed (a QuietTally), a SubvolumeTally(since) if none.
    The added bytes count every copy the filesystem keeps (DUP metadata
    stores each xattr twice), and never more than the filesystem uses.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ByteBackError(f"cannot open {path}: {e.strerror}") from None
    try:
        if os.fstat(fd).st_ino != 256:
            raise ByteBackError(f"{path} is not a btrfs subvolume; move it aside and run the backup "
                                "again, which creates it as one")
        # Data still in the page cache has no extent yet, and inode updates
        # wait for the commit: without this the tree says a fresh backup is empty.
        fcntl.ioctl(fd, BTRFS_IOC_SYNC)
        committed = committed_transaction(fd)
        usage = search_subvolume(fd, tally or SubvolumeTally(since), 0 if full else since)
        copies = profile_copies(_space_info(fd))
        st = os.fstatvfs(fd)
    except OSError as e:
        raise ByteBackError(f"cannot read the btrfs tree of {path}: {e.strerror} "
                            "(byteback measures backups as root on btrfs)") from None
    finally:
        os.close(fd)
    if usage.generation > committed:
        # Written after the commit, while the search read: the backup user owns
        # current and may write into it at any moment, and what it writes now
        # may land in the snapshot half seen or not at all.  So the generation
        # recorded is the committed one, and the next backup measures from
        # just after it: anything written since is counted then, never lost
        # (a part counted twice is the price).
        usage = usage._replace(generation=committed)
    usage = usage._replace(committed=committed)
    added = disc_bytes(usage, copies)
    used = (st.f_blocks - st.f_bfree) * st.f_frsize
    if added > used:
        # The kernel's own items cannot say more than the disc holds; if they
        # seem to, trust the disc and say so.
        log.warning("%s: measured %s added, more than the %s the filesystem uses; counting %s",
                    path, format_size(added), format_size(used), format_size(used))
        added = used
    return usage, added


def written_after(path: Path, transaction: int) -> bool:
    """Whether any leaf of the subvolume at path was written after `transaction`.  Root only."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as e:
        raise ByteBackError(f"cannot open {path}: {e.strerror}") from None
    try:
        return search_subvolume(fd, SubvolumeTally(transaction + 1), transaction + 1).generation > transaction
    except OSError as e:
        raise ByteBackError(f"cannot read the btrfs tree of {path}: {e.strerror}") from None
    finally:
        os.close(fd)


def last_measured(backups: Sequence[dict]) -> Optional[dict]:
    """The newest history entry that recorded a btrfs generation: the next backup's writes come after it."""
    return next((b for b in reversed(backups) if "generation" in b), None)


def written_since(previous: Optional[dict]) -> int:
    """The first transaction that belongs to the next backup (0: everything is new)."""
    return _history_int(previous, "generation") + 1 if previous else 0


# --- 7c. The store: paths, history, the in-progress marker, one session per host ---

def process_idle_seconds(pid: int, now: float) -> Optional[float]:
    """How long a session process has moved no data, from the kernel's own clocks; None if unknown.

    An ssh session's stdin and stdout are pipes, and the kernel stamps a
    pipe at every read and write.  A holder whose stdio are not pipes (a
    shell holding the lock by hand) is idle for as long as it has lived.
    """
    stamps = []
    for fd in (0, 1):
        with contextlib.suppress(OSError):
            st = os.stat(f"/proc/{pid}/fd/{fd}")
            if stat.S_ISFIFO(st.st_mode):
                stamps.append(max(st.st_mtime, st.st_atime))
    if stamps:
        return max(0.0, now - max(stamps))
    try:
        with open(f"/proc/{pid}/stat") as f:
            started_ticks = int(f.read().rsplit(")", 1)[1].split()[19])
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
    except (OSError, ValueError, IndexError, StopIteration):
        return None
    return max(0.0, now - (boot + started_ticks / os.sysconf("SC_CLK_TCK")))


def _process_uid(pid: int) -> Optional[int]:
    try:
        return os.stat(f"/proc/{pid}").st_uid
    except OSError:
        return None


def session_state(path: Path, now: float, timeout: float) -> tuple:
    """("idle", "running" or "stuck", the holders, seconds without data) of a host's session lock.

    A session that has moved no data for longer than the I/O timeout is
    stuck, not running: rsync's own --timeout should have ended it.
    """
    holders = lock_holders(path)
    if not holders:
        return "idle", [], None
    idle = [process_idle_seconds(pid, now) for pid in holders]
    quiet = min((i for i in idle if i is not None), default=None)
    if quiet is not None and all(i is not None and i > timeout for i in idle):
        return "stuck", holders, quiet
    return "running", holders, quiet


def processes_with_open(path: Path, uid: int) -> List[int]:
    """uid's processes that have path open (from /proc/<pid>/fd)."""
    try:
        st = os.stat(path)
    except OSError:
        return []
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or _process_uid(int(entry)) != uid or int(entry) == os.getpid():
            continue
        with contextlib.suppress(OSError):
            for fd in os.listdir(f"/proc/{entry}/fd"):
                with contextlib.suppress(OSError):
                    target = os.stat(f"/proc/{entry}/fd/{fd}")
                    if (target.st_dev, target.st_ino) == (st.st_dev, st.st_ino):
                        found.append(int(entry))
                        break
    return found


def take_session(store: Store, host: str, timeout: float,
                 sleep: Callable[[float], None] = time.sleep) -> Lock:
    """This host's session lock.  A stuck session holding it (no data for longer than the
    I/O timeout) is ended first: it would otherwise stop the host's backups for good."""
    try:
        return store.session_lock(host).__enter__()
    except ByteBackError:
        state, holders, quiet = session_state(store.session_lock_path(host), time.time(), timeout)
        if state != "stuck":
            raise
    # The lock belongs to an open file, which children inherit: end every
    # process of the backup user that has it open, not only the one that took
    # it.  Root (a roll-back) ends the backup user's, never a process of root's.
    path = store.session_lock_path(host)
    user = os.geteuid()
    if user == 0:
        with contextlib.suppress(OSError):
            user = os.lstat(path).st_uid
    holders = sorted(pid for pid in set(holders) | set(processes_with_open(path, user))
                     if user != 0 and _process_uid(pid) == user)
    log.warning("host %s: ending a stuck session (process %s, no data for %s)", host,
                ", ".join(map(str, holders)), format_duration(quiet or 0))
    for sig in (signal.SIGTERM, signal.SIGKILL):
        # Asked first; one that ignores it (a shell's, holding the lock to keep its junk
        # from a roll-back) is killed after the grace.
        for pid in holders:
            with contextlib.suppress(OSError):     # only the backup user's own processes can be ended
                os.kill(pid, sig)
        deadline = time.monotonic() + 5
        while lock_holders(path) and time.monotonic() < deadline:
            sleep(0.1)
        if not lock_holders(path):
            break
    return store.session_lock(host).__enter__()


class Store:
    """A store root: <root>/<host>/current, <root>/<host>/<snapshot>, <root>/.byteback/.

    Subclasses say how `current` is made, snapshotted and deleted.  Whether the
    store acts as root (owns snapshots as root, hands current back to its
    owner) is decided once, by open_store; the default is this process's own.
    """

    kind = "store"

    def __init__(self, root, runner: Optional[Runner] = None, *, as_root: Optional[bool] = None):
        self.root = Path(root)
        self.runner = runner or Runner()
        self.as_root = os.geteuid() == 0 if as_root is None else as_root

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

    def host_run_dir(self, host: str) -> Path:
        """Where a host's session lock and in-progress marker live.

        A host with an account of its own (receiver = userns) has its own
        directory, sessions/<host>, root-made and owned by its namespace's root;
        the others share run/, the backup user's.  Not in run/: the backup user
        could rename a directory there away and put its own in its place.
        """
        own = self.state_dir / "sessions" / check_host_name(host)
        return own if _is_real_dir(own) else self.run_dir

    def session_lock_path(self, host: str) -> Path:
        return self.host_run_dir(host) / f"{check_host_name(host)}.lock"

    def session_lock(self, host: str) -> Lock:
        """One session per host (a push, restore or list, and the snapshot that ends a push).

        Its file belongs to the owner of its directory (the backup user, or the
        host's namespace root), even when root makes it.
        """
        run_dir = self.host_run_dir(host)
        st = os.lstat(run_dir) if _is_real_dir(run_dir) else None
        owner = (st.st_uid, st.st_gid) if st is not None else None
        return Lock(self.session_lock_path(host), f"session for host {host}", owner=owner)

    # -- reading --
    def hosts(self) -> List[str]:
        """Host directories in the store (real directories with a valid name)."""
        try:
            with os.scandir(self.root) as entries:
                return sorted(e.name for e in entries if is_host_name(e.name) and _is_real_dir_entry(e))
        except OSError as e:
            raise ByteBackError(f"cannot read the store {self.root}: {e.strerror}") from None

    def snapshots(self, host: Optional[str] = None) -> List[Snapshot]:
        """Finished snapshots, oldest first, of one host or of all.

        Each directory read once, its entries' types from it (no stat of each): a
        server of 1,000 hosts holds 100,000 snapshots, listed by every prune."""
        found = []
        parse, is_dir, new = parse_snapshot_name, _is_real_dir_entry, tuple.__new__
        for h in ([check_host_name(host)] if host else self.hosts()):
            try:
                entries = os.scandir(self.host_dir(h))
            except FileNotFoundError:
                continue
            with entries:
                for entry in entries:
                    name = entry.name
                    when = parse(name)
                    if when is not None and is_dir(entry):
                        found.append(new(Snapshot, (h, name, when)))     # Snapshot's __new__, in C
        return sorted(found, key=_SNAPSHOT_ORDER)

    def newest_snapshot(self, host: str) -> Optional[Snapshot]:
        snaps = self.snapshots(host)
        return snaps[-1] if snaps else None

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
        # A whole number of bytes each, or none: a JSON number is an int or a float, and
        # true and false are no int here (type, not isinstance: a prune reads 100,000 entries).
        if not isinstance(backups, list) or not all(
                type(b) is dict and type(b.get("added", 0)) is int and b.get("added", 0) >= 0
                and type(b.get("size", 0)) is int and b.get("size", 0) >= 0 for b in backups):
            path = self.history_path(host)
            raise ByteBackError(f"{path} is not a byteback history; move it aside "
                                f"(mv {path} {path}.bad) and byteback will start it afresh")
        return backups

    def write_history(self, host: str, backups: List[dict]) -> None:
        write_json_atomically(self.history_path(host),
                              {"host": host, "backups": backups[-HISTORY_KEEP:]})

    # -- the "dirty since" marker of a backup in progress --
    def dirty_path(self, host: str) -> Path:
        return self.host_run_dir(host) / f"{check_host_name(host)}.dirty"

    def mark_dirty(self, host: str, when: dt.datetime) -> None:
        """Record that current is being written (kept from the first write until a snapshot)."""
        path = self.dirty_path(host)
        if os.path.lexists(path) and not os.path.islink(path) and not path.is_file():
            remove_hostile_entry(path, "the in-progress marker is a small file")
        if self.dirty_since(host) is None:
            # Before rsync writes anything (issue 14: this was two fsyncs on the push's
            # critical path): a crash that leaves no marker, or half of one, which
            # dirty_since reads as none, left current as the last snapshot had it.
            # One that cannot be read (half written, or garbled) is written anew, so
            # that this run, if it is cut, is known as unfinished to the next one.
            write_new_json(path, {"since": when.isoformat()})

    def dirty_since(self, host: str) -> Optional[dt.datetime]:
        """When the unfinished backup in current began, or None.  run/ is untrusted input:
        the backup user could have put a symlink or a FIFO there for root to trip over."""
        data = read_untrusted_json(self.dirty_path(host), 4096)
        try:
            since = dt.datetime.fromisoformat(str(data["since"]))
        except (ValueError, KeyError, TypeError):
            return None
        return since if since.tzinfo else since.replace(tzinfo=dt.timezone.utc)

    def last_plan_path(self) -> Path:
        return self.state_dir / "last-plan.json"

    def note_plan(self, plan: "PrunePlan", hosts: Iterable[str]) -> None:
        """Keep what root's prune just planned, for the backup user's prune_would_act: whether
        it was settled (timeless: nothing contained, accepted or rolled back) and its goal."""
        if not self.as_root:
            return
        path = self.last_plan_path()
        try:
            write_json_atomically(path, {"hosts": sorted(hosts), "goal": plan.goal,
                                         "settled": bool(plan.timeless)}, durable=False)
        except (ByteBackError, OSError) as e:
            # A full disc must not stop the prune that makes room; an old plan must not stand.
            log.info("prune: %s not written (%s): pushes ask root's prune first", path, e)
            with contextlib.suppress(OSError):
                os.unlink(path)

    def forget_plan(self) -> None:
        """root's last plan no longer describes the store (a snapshot just changed a history):
        gone until the next prune notes its own."""
        if self.as_root:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.last_plan_path())

    def last_plan_settled(self, hosts: Sequence[str]) -> bool:
        """Whether root's last plan, made for these very hosts, was settled and the disc still
        has its goal free: a prune now would do nothing that one did not.  Only a file of
        root's counts (it is in root's directory; a store without sudo has no such file)."""
        data = read_untrusted_json(self.last_plan_path(), 1 << 20, owner=0)
        if not isinstance(data, dict) or data.get("settled") is not True or data.get("hosts") != sorted(hosts):
            return False
        goal = data.get("goal")
        return type(goal) is int and self.free_bytes() >= goal

    def unfinished_hosts(self, hosts: Iterable[str],
                         newest: Optional[Dict[str, Optional[Snapshot]]] = None) -> Set[str]:
        """The hosts whose current may hold an unfinished upload: here, those whose in-progress
        marker says so (the hardlink backend has nothing else to go by: the backup user owns
        every file of current and of its snapshots alike).  newest: each host's newest
        snapshot (None for none), where the caller has listed them already."""
        return {h for h in hosts if self.dirty_since(h) is not None}

    def clear_dirty(self, host: str) -> None:
        """The backup is finished.  Whatever sits at the marker's path goes, a planted directory too."""
        path = self.dirty_path(host)
        try:
            if stat.S_ISREG(os.lstat(path).st_mode):
                os.unlink(path)
            else:
                remove_hostile_entry(path, "the in-progress marker is a small file")
        except FileNotFoundError:
            pass

    def unaccounted_bytes(self) -> int:
        """Disc used in run/ and sessions/, which belongs to no host's backups (the backup user
        and each host's account can write there).

        lstat only, never following a link: both are untrusted input.  Each entry counts its
        xattrs (entry_xattr_bytes), and, unless it is one of a known host's own (its lock, its
        in-progress marker, its sessions directory), at least one block whatever its type, so
        empty files and directories are not free.  A known host's record of what its receiver
        could not keep (not_kept_path, that exact path) is its backups' and not counted, within
        NOT_KEPT_RECORD_MAX bytes."""
        hosts = self.hosts()
        records = {str(self.not_kept_path(h)) for h in hosts}
        own = {str(p) for h in hosts for p in (self.session_lock_path(h), self.dirty_path(h),
                                                self.host_run_dir(h))}
        total = 0
        for place in (self.run_dir, self.state_dir / "sessions"):
            for path, st in walk_entries(place):
                blocks = 0 if stat.S_ISDIR(st.st_mode) else st.st_blocks * 512
                if path in records and stat.S_ISREG(st.st_mode) and st.st_size <= NOT_KEPT_RECORD_MAX:
                    blocks = 0
                elif path not in own:
                    blocks = max(blocks, UNACCOUNTED_ENTRY_MIN)
                total += blocks + entry_xattr_bytes(path)
        return total

    def not_kept_path(self, host: str) -> Path:
        """Where a host's complete records what its receiver could not keep (section 8c)."""
        return self.host_run_dir(host) / f"{check_host_name(host)}{NOT_KEPT_SUFFIX}"

    def roll_back(self, host: str, timeout: float) -> bool:
        """Put current back to the host's newest snapshot (an unfinished upload past the
        suspicion line), unless a session is writing it now.  Returns whether it did.

        A session that has moved no data for `timeout` seconds (the I/O timeout)
        is stuck, not writing: it is ended, as the host's next session would end
        it, or a lock held forever would keep the upload on the disc for good."""
        snaps = self.snapshots(host)
        current = self.current(host)
        if not snaps or not _is_real_dir(current):
            return False
        try:
            with take_session(self, host, timeout), uninterrupted():   # never left without current
                self._reset_current(current, self.snapshot_path(snaps[-1]), os.lstat(current))
                self.clear_dirty(host)
        except RunStopped:
            raise
        except ByteBackError as e:
            log.warning("prune: host %s: current not rolled back: %s", host, e)
            return False
        log.warning("prune: host %s: current rolled back to snapshot %s; the unfinished upload "
                    "in it was far over the host's normal size and its growth budget", host, snaps[-1].name)
        return True

    def _reset_current(self, current: Path, newest: Path, owner: os.stat_result) -> None:
        """Make current anew, with the old one's owner (root's store) and mode."""
        # hardlink: the next run links unchanged files from the newest snapshot again
        self._remove_tree(current)
        self._create_current(current)
        self._give_as_before(current, owner)

    def _give_as_before(self, path: Path, owner: os.stat_result) -> None:
        if self.as_root:
            os.chown(path, owner.st_uid, owner.st_gid)
        os.chmod(path, stat.S_IMODE(owner.st_mode))

    # -- writing --
    def prepare_host(self, host: str, owner: Optional[tuple] = None, group: Optional[int] = None) -> Path:
        """Create <host>/ and <host>/current if missing; return current.

        owner: current's (uid, gid); <host>/ is root's with that gid, or `group`
        (a host's own account: its namespace root owns current)."""
        host_dir = self.host_dir(host)
        if not host_dir.is_dir():
            host_dir.mkdir(mode=0o755, parents=True)
            if self.as_root:
                # The owner of <host>/ could rename snapshots away: root keeps it.
                os.chown(host_dir, 0, 0)
        if owner is not None and self.as_root:
            # On a server only root and the backup user's group may enter: the
            # modes a client uploads would otherwise let other local users of
            # the server read its files, or write into current.
            os.chown(host_dir, 0, owner[1] if group is None else group)
            os.chmod(host_dir, HOST_DIR_MODE)
        current = self.current(host)
        if os.path.islink(current):
            raise ByteBackError(f"{current} is a symlink; refusing to use it (move it away)")
        if not current.is_dir():
            self._create_current(current)
            if owner is not None:
                os.chown(current, *owner)
        return current

    def unshare_current(self, host: str, resumed: bool = True, again: bool = False, named: bool = False) -> int:
        """Make sure rsync cannot change anything outside current through a shared inode.

        resumed: current may hold an unfinished run's files (its dirty marker
        was there before this run began).  again: the client copies once more
        when the snapshot says 'again:' (unshare_walk_needed).  named: this is
        the pass after an 'again:' that listed its names, and sends only those
        (NAMED_WORD): only they are given an inode of their own (_unshare_named).

        A file in current with more than one link may share its inode with a
        snapshot (hardlink backend: an interrupted run leaves --link-dest
        links behind, and rsync would chmod them in place) or with other names
        in current (btrfs: rsync --inplace writes a file whose source was split
        off from a hard-link group into the inode the others still share).  So
        every such file gets an inode of its own first; rsync --hard-links then
        links again what is still linked on the client.  Returns how many.
        """
        current = self.current(host)
        if not _is_real_dir(current):
            return 0
        reflink = is_btrfs_subvolume(current)
        if reflink and named and resumed:
            count = self._unshare_named(host, current)
            if count is not None:
                return count
        if reflink:
            # btrfs (also where the backup user sees a HardlinkStore): a
            # snapshot never shares an inode with current, and the snapshot
            # after this run finds any shared inode it changed (take_snapshot),
            # so where the client copies again then, only a resumed run walks
            # (unshare_walk_needed).
            try:
                backups = self.read_history(host)
            except ByteBackError:
                backups = []            # unreadable: walk, as if nothing were known
            if not unshare_walk_needed(backups, resumed, again):
                return 0
        # Every name of a shared inode, listed before any is changed: the last
        # name left on an old inode would otherwise keep it, and rsync may link
        # the group's other names back to it (BtrfsStore.take_snapshot counts
        # any old shared inode a run wrote).
        linked = [(path, st) for path, st in walk_files(current) if st.st_nlink > 1]
        for path, st in linked:
            _give_own_inode(path, st, reflink, self.as_root)
        count = len(linked)
        if count:
            log.info("host %s: gave %d hard-linked files in current an inode of their own", host, count)
        return count

    def _unshare_named(self, host: str, current: Path) -> Optional[int]:
        """give_names_own_inodes for the names root recorded at the last 'again:'
        (AGAIN_RECORD, <host>/), where they answer the newest snapshot; None where
        they do not, or something about them is unexpected: then the tree is walked.

        Enough for the named pass: it sends only those names, and the snapshot
        refused was root's check of every shared inode written since the newest
        snapshot, whose names these are; what the pass itself links is its own
        (unshare_walk_needed).  A client that sends other names under the word
        can mix up only its own backup, as it can by sending wrong data."""
        record = read_untrusted_json(self.host_dir(host) / AGAIN_RECORD, AGAIN_RECORD_BYTES)
        words = record.get("names") if isinstance(record, dict) else None
        names = check_names(words) if isinstance(words, list) else None
        snaps = self.snapshots(host)
        if names is None or not snaps or record.get("snapshot") != snaps[-1].name:
            log.info("host %s: no names recorded for this pass; walking current", host)
            return None
        try:
            count = give_names_own_inodes(current, names, self.as_root)
        except OSError as e:
            log.warning("host %s: a hard-linked name to copy again is not what it was (%s: %s); "
                        "walking current", host, os.fsdecode(e.filename or b"?"), e.strerror)
            return None
        log.info("host %s: gave %d of the %d names to copy again an inode of their own", host, count, len(names))
        return count

    def pending_bytes(self, host: str) -> int:
        """New data in an unfinished current: files not shared with the newest snapshot."""
        return tree_size(self.current(host))[1] if _is_real_dir(self.current(host)) else 0

    def unmarked_upload_bytes(self, host: str) -> int:
        """Data written into host's current since its newest snapshot with no in-progress marker
        (a shell as the backup user's doing); 0 where there is none, or no way to tell."""
        return 0

    def rsync_options(self, host: str) -> List[str]:
        """Options the receiving rsync needs, decided by what current is.

        The forced command runs as the byteback user, which may not be able to
        tell the backend from the filesystem alone; current itself says it.
        """
        if is_btrfs_subvolume(self.current(host)):
            return ["--inplace"]   # only changed blocks are written; snapshots share the rest
        # Never --inplace here: current shares inodes with the newest snapshot,
        # and writing in place would change history through the shared inode.
        snaps = self.snapshots(host)
        return [f"--link-dest={self.snapshot_path(snaps[-1])}"] if snaps else []

    def take_snapshot(self, host: str, name: str, previous: Optional[dict]) -> dict:
        """Turn current into the read-only snapshot `name`; return its size record."""
        raise NotImplementedError

    def baseline_entry(self, snap: Snapshot) -> dict:
        """A history entry for a snapshot byteback did not take (the original's).

        The next backup of its host is measured from it, like from one of ours;
        it is no change itself, so it never counts in the free-space target
        ('first': counted_sizes leaves it out).
        """
        return {"snapshot": snap.name, "time": snap.when.isoformat(), "baseline": True,
                "first": True, "suspicious": False, "added": 0, "size": 0, **self._measure_from(snap)}

    def lock_down(self, snap: Snapshot, dry_run: bool = False) -> bool:
        """Make a snapshot byteback did not take root-owned and read-only; True if it was not."""
        path = self.snapshot_path(snap)
        try:
            # Its own descriptor, never the name: the name may have been swapped
            # for a symlink after it was listed (the user owned the host's directory).
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            raise ByteBackError(f"{path} is not a directory (a symlink?); move it away and run "
                                "setup-server again") from None
        try:
            st = os.fstat(fd)
            if st.st_uid == 0 and st.st_gid == 0 and not st.st_mode & 0o222:
                return False
            if not dry_run:
                os.fchown(fd, 0, 0)
                os.fchmod(fd, 0o555)
        finally:
            os.close(fd)
        return True

    def _measure_from(self, snap: Snapshot) -> dict:
        return {}    # hardlink: the next backup's new data is what it does not link from here

    def delete(self, snap: Snapshot) -> None:
        """Delete a snapshot; it disappears under its name before its data goes."""
        path = self.snapshot_path(snap)
        doomed = path.with_name(f".deleting-{snap.name}")
        os.rename(path, doomed)   # a crash now leaves a leftover, never half a snapshot
        self._remove_tree(doomed)

    def clean_leftovers(self) -> List[str]:
        """Remove half-made or half-deleted snapshots a crash left behind."""
        removed = []
        for host in self.hosts():
            st = os.lstat(self.host_dir(host))
            if os.geteuid() == 0 and st.st_uid == 0 and st.st_gid != 0 and stat.S_IMODE(st.st_mode) == 0o700:
                # a snapshot's _closed_while_writable, cut short by a crash
                log.warning("host %s: its directory was left root-only by an interrupted snapshot; "
                            "opening it to its group again", host)
                os.chmod(self.host_dir(host), HOST_DIR_MODE)
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


HOST_DIR_MODE = 0o750   # <host>/ on a server: root:<backup group>; see Store.prepare_host


HISTORY_KEEP = 100   # entries kept per host; the mean uses the last `history` of them


# --- 7d. The two backends, and which one a store gets ------------------------

class HardlinkStore(Store):
    """Any POSIX filesystem: each backup is linked to the newest snapshot, then renamed."""

    kind = "hardlink"

    def _create_current(self, path: Path) -> None:
        path.mkdir(mode=0o755)

    def take_snapshot(self, host: str, name: str, previous: Optional[dict]) -> dict:
        current = self.current(host)
        size, added = tree_size(current)   # files linked from the last snapshot are not new
        st = os.lstat(current)
        tmp = self.host_dir(host) / f".incomplete-{name}"
        # Locked down under a temporary name, then renamed (atomic): the
        # snapshot appears under its name whole and read-only, or not at all.
        os.rename(current, tmp)
        os.chmod(tmp, 0o555)
        if self.as_root:
            os.chown(tmp, 0, 0)
        os.rename(tmp, self.host_dir(host) / name)
        self._create_current(current)
        if self.as_root:
            os.chown(current, st.st_uid, st.st_gid)   # the next backup writes as before
        return {"size": size, "added": added}

    def _remove_tree(self, path: Path) -> None:
        remove_tree(path)


class BtrfsStore(Store):
    """btrfs: current is a subvolume written in place; a snapshot is an O(1) read-only copy."""

    kind = "btrfs"

    def _btrfs(self, *args: str, destructive: bool = True) -> subprocess.CompletedProcess:
        return self.runner.run(["btrfs", *args], destructive=destructive)

    def _create_current(self, path: Path) -> None:
        self._btrfs("subvolume", "create", str(path))

    def pending_bytes(self, host: str) -> int:
        """Bytes written into current since the last snapshot (btrfs knows exactly), and
        every byte of the subvolumes planted in it."""
        current = self.current(host)
        if not is_btrfs_subvolume(current):
            return Store.pending_bytes(self, host)
        _usage, added, planted = self._written_since_record(host)
        return added + planted

    def _written_since_record(self, host: str) -> tuple:
        """(SubvolumeUsage, bytes added, bytes of planted subvolumes) of host's current since
        the last measured snapshot, from the leaves written since.  Root only."""
        current = self.current(host)
        planted = sum(size for _, size in planted_subvolumes(current))
        usage, added = measure_subvolume(current, written_since(last_measured(self.read_history(host))), full=False)
        return usage, added, planted

    def unmarked_upload_bytes(self, host: str) -> int:
        """Root, on btrfs, after a commit (unfinished_hosts' sync): the data and planted
        subvolumes a current written since its newest snapshot holds, where its marker is
        gone.  Data, not metadata: an access time that relatime writes (a shell's `ls`, a
        nightly updatedb) writes an inode alone, and is no upload."""
        if (not self.as_root or self.dirty_since(host) is not None
                or not self._written_since_snapshot(host, self.newest_snapshot(host))):
            return 0
        try:
            usage, _added, planted = self._written_since_record(host)
        except ByteBackError as e:
            log.debug("host %s: %s", host, e)
            return 0
        return usage.data + planted

    def unfinished_hosts(self, hosts: Iterable[str],
                         newest: Optional[Dict[str, Optional[Snapshot]]] = None) -> Set[str]:
        """Those whose marker says so, and those whose current the filesystem says was written
        since its newest snapshot was taken from it (newest: as Store.unfinished_hosts).

        The marker is in run/ (or sessions/<host>), which the upload's own writer owns: a
        shell as the backup user fills current with junk and removes or garbles the marker,
        and prune, seeing no unfinished upload, deleted every other host's history for the
        space.  A snapshot leaves current's generation at the snapshot's own; any later write
        raises it once committed, hence root's one sync first (for every host at once).  The
        backup user's look (prune_would_act, at every push) is a hint and spares the wait:
        root's own prune after the snapshot settles first."""
        hosts = list(hosts)
        found = Store.unfinished_hosts(self, hosts)
        if self.as_root and len(found) < len(hosts):
            sync_filesystem(str(self.root))
        for h in hosts:
            if h not in found and self._written_since_snapshot(h, newest[h] if newest is not None else
                                                               self.newest_snapshot(h)):
                log.info("host %s: current was written since its newest snapshot and has no in-progress "
                         "marker: measured as an unfinished upload", h)
                found.add(h)
        return found

    def _written_since_snapshot(self, host: str, newest: Optional[Snapshot]) -> bool:
        """Whether host's current was written since newest, its newest snapshot (None: it has none)."""
        current = self.current(host)
        if newest is None or not is_btrfs_subvolume(current):
            return False
        try:
            info = subvolume_info_at(current)
            newest = self.snapshot_path(newest)
            # A current made after the newest (a roll-back's, from a copy of it) counts
            # from its own making; a newest that is no subvolume (hardlink-made) tells nothing.
            since = max(info.created, subvolume_info_at(newest).created if is_btrfs_subvolume(newest) else 0)
            if info.generation > since:
                return True
            # A subvolume planted in current (between take_snapshot's remove_planted and the
            # snapshot itself) takes writes that never move current's own generation; rsync
            # never makes one, so one there is an unfinished upload too.  Root only reads them.
            return self.as_root and bool(planted_subvolumes(current))
        except ByteBackError as e:
            log.warning("host %s: %s; its current counts as holding an unfinished upload", host, e)
            return True

    def remove_planted(self, path: Path, *, deleting: bool = False) -> tuple:
        """Delete, as root, every subvolume inside the subvolume at path, deepest first, each
        with a log line: (how many, the bytes they held).  deleting: path itself goes next,
        so it too is made writable and root's if it is read-only and holds one.

        rsync never makes a subvolume, so one in current is tampering by a shell
        as the backup user: a snapshot would hold an empty directory in its
        place while its data stayed in current, counted in no backup, and the
        deletion of current (a roll-back) would fail on it.  Reached one name at
        a time from descriptors, each directory checked to be the inode the kernel's
        items name, never by a path: the shell could swap a directory on the way
        for a symlink, or plant one deeper than any path reaches.
        """
        planted = planted_subvolumes(path)
        if not planted:
            return 0, 0
        nested = {sub.id: sub for sub, _ in planted}
        try:
            fd = os.open(path, _DIRECTORY_FLAGS)
        except OSError as e:
            raise ByteBackError(f"cannot open {path}: {e.strerror}") from None
        try:
            self._take_read_only_holders(path, fd, planted, nested, deleting)
            for sub, size in reversed(planted):
                below = sub.shown(path)
                try:
                    delete_nested_subvolume(fd, sub, nested)
                except OSError as e:
                    raise ByteBackError(f"cannot remove the subvolume {below} (id {sub.id}) planted in {path}: "
                                        f"{e.strerror}; the next snapshot or prune tries again (if it keeps failing, "
                                        "stop the backup user's shells and delete that subvolume as root)") from None
                log.warning("removed the subvolume %s (id %d, %s): a shell as the backup user made it "
                            "(rsync never does); its data was in no backup", below, sub.id, format_size(size))
        finally:
            os.close(fd)
        return len(planted), sum(size for _, size in planted)

    @staticmethod
    def _take_read_only_holders(path: Path, fd: int, planted: Sequence[tuple], nested: Dict[int, NestedSubvolume],
                                deleting: bool) -> None:
        """Make writable, and root's, each read-only subvolume that holds a planted one (the
        kernel refuses to delete a subvolume linked in a read-only one), parents first.  path
        itself only when deleting: current stays its writer's after a snapshot."""
        holders = {sub.parent for sub, _ in planted}
        try:
            if deleting and subvolume_info(fd).id in holders and take_read_only_subvolume(fd):
                log.warning("made %s writable and root's: a shell as the backup user set it read-only, "
                            "which stopped the deletion of the subvolumes planted in it", path)
        except OSError as e:
            raise ByteBackError(f"cannot make {path} writable to delete the subvolumes planted in it: "
                                f"{e.strerror}") from None
        for sub, _ in planted:
            if sub.id not in holders:
                continue
            below = sub.shown(path)
            try:
                taken = take_read_only_nested(fd, sub, nested)
            except OSError as e:
                raise ByteBackError(f"cannot make the subvolume {below} (id {sub.id}) planted in {path} writable "
                                    f"to delete the ones inside it: {e.strerror}") from None
            if taken:
                log.warning("made the subvolume %s (id %d) writable and root's: a shell as the backup user set "
                            "it read-only, which stopped the deletion of the subvolumes inside it", below, sub.id)

    def take_snapshot(self, host: str, name: str, previous: Optional[dict]) -> dict:
        current = self.current(host)
        planted, planted_bytes = self.remove_planted(current)
        measured = None if planted else self._measure_quiet(host, current, previous)
        usage, added = measured or measure_subvolume(current, written_since(previous), full=True)
        changed = self._shared_changed(host, usage.shared)
        if changed:
            # rsync writes current in place (--inplace), and writes a file's
            # attributes by name: a file the client split off from a hard-link
            # group was written into the inode its old partners still share
            # here, so one of them may now hold the other's data.  This
            # run's push did not walk current to give each such name an inode
            # of its own first (unshare_current: only a resumed run does);
            # the next push is resumed and does, and its rsync then puts
            # right every name that differs from the client.  The names of
            # those inodes are listed, and recorded here, so that a client's
            # next pass sends only them and its push gives only them an inode
            # of their own (NAMED_WORD), not the whole tree and every
            # hard-linked name; whatever the pass does, this check is made
            # again at its snapshot.
            names = self._record_again(host, current, changed)
            if names:
                # The names are the client's to choose, up to AGAIN_LIST_BYTES: the
                # client reads them; the system log, on every such push, only their count.
                log.warning("host %s: again: %s; %d names listed to the client", host,
                            again_message(len(changed), None), len(names), extra={"syslog_only": True})
            raise AnotherPass(again_message(len(changed), names), logged=bool(names))
        self._forget_again(host)
        host_dir = self.host_dir(host)
        tmp = host_dir / f".incomplete-{name}"
        if tmp.exists():
            self._remove_tree(tmp)
        with _closed_while_writable(host_dir):
            try:
                create_snapshot(current, host_dir, tmp.name)
            except OSError as e:
                raise ByteBackError(f"cannot snapshot {current} as {tmp}: {e.strerror}") from None
            # The backup user may have written into current since the measurement
            # (deleted a file, say): then this snapshot is not what was measured, and
            # the next run must not take its size from this record (_measure_quiet).
            # A tree of one leaf, whose root the snapshot itself rewrites, is always
            # so: its next run walks it, which costs little there.
            unsettled = usage.committed > 0 and written_after(tmp, usage.committed)
            # Measured on this kernel: the owner of a subvolume can clear its
            # read-only flag and then delete what is in it.  So the snapshot's root
            # goes to root *before* the flag is set, and the flag is set last.
            os.chown(tmp, 0, 0)
            try:
                set_read_only(tmp)
            except OSError as e:
                raise ByteBackError(f"cannot make the snapshot {tmp} read-only: {e.strerror}") from None
            # Only now, complete and read-only, does it take its final name (atomic).
            os.rename(tmp, host_dir / name)
        if self.as_root and usage.untimed != ():       # "Directories that never take an access time"
            try:
                keep_directories_timeless(current, usage.untimed)
            except OSError as e:       # their access times are written as before: only space
                log.info("host %s: cannot stop the access times of current's directories: %s", host, e)
        record = {"size": usage.size, "added": added, "generation": usage.generation, "linked": usage.linked}
        if planted:
            record.update(planted=planted, planted_bytes=planted_bytes)    # status warns of it
        if unsettled:
            record["unsettled"] = True
        return record

    def _measure_quiet(self, host: str, current: Path, previous: Optional[dict]) -> Optional[tuple]:
        """measure_subvolume(full=True)'s (usage, added) from the leaves this run wrote alone
        (QuietTally), against the newest snapshot, which `previous` measured: its size and
        linked names, plus what each inode the run wrote or unnamed counts in current less
        what it counted there (inode_counts).  Those are the inodes QuietTally lists and
        those that the names which the run removed from the directories it wrote pointed
        to.  None where it cannot tell (a directory removed: the names in it are gone
        unseen; a subvolume named): then the whole tree is walked."""
        size, linked = (previous or {}).get("size"), (previous or {}).get("linked")
        if (previous is None or previous.get("baseline") or previous.get("unsettled")
                or type(size) is not int or type(linked) is not int or size < 0 or linked < 0):
            return None
        snaps = self.snapshots(host)
        if not snaps or snaps[-1].name != previous.get("snapshot"):
            return None
        newest = self.snapshot_path(snaps[-1])
        if not is_btrfs_subvolume(newest):
            return None
        since = written_since(previous)
        fds: List[int] = []
        try:
            for path in (current, newest):
                fds.append(os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC))
            tally = QuietTally(since, before=functools.partial(_inode_item_or_none, fds[1]))
            usage, added = measure_subvolume(current, since, full=False, tally=tally)
            if not tally.quiet or tally.generation > usage.generation:
                return None     # past a bound, or something was written after the commit
            touched = set(tally.files)
            for directory in tally.directories:
                now, before = directory_entries(fds[0], directory), directory_entries(fds[1], directory)
                for in_current, item in changed_names(now, before):
                    entry = dir_entry(item)
                    if entry is None or entry[1] != BTRFS_INODE_ITEM:
                        return None             # a subvolume (remove_planted took those), or no dir item
                    child, _kind, file_type = entry
                    if file_type != BTRFS_FT_DIR:
                        touched.add(child)
                    elif not in_current and not _is_directory(read_inode_item(fds[0], child)):
                        # A directory removed, all in it unseen (or its number is now a new
                        # file's: btrfs hands out the highest numbers again after a mount).
                        return None
            if len(touched) > QUIET_FILES:
                return None
            for inode in touched:
                now_size, now_linked = inode_counts(read_inode_item(fds[0], inode))
                old_size, old_linked = inode_counts(read_inode_item(fds[1], inode))
                size += now_size - old_size
                linked += now_linked - old_linked
            # The search read only the leaves written since: a shared inode's items in
            # older ones are missing from its digest, which is compared with the
            # snapshot's whole one (take_snapshot's check); read each whole.
            shared = tuple(read_written_inode(fds[0], s.inode, since) for s in usage.shared)
        except OSError:
            return None
        finally:
            for fd in fds:
                os.close(fd)
        if size < 0 or linked < 0 or None in shared:
            return None
        generation = max(usage.generation, _history_int(previous, "generation"))
        return usage._replace(size=size, linked=linked, generation=generation, shared=shared), added

    def _shared_changed(self, host: str, shared: Sequence[SharedInode]) -> List[int]:
        """The shared inodes a run wrote that changed more than their names, against the
        same inodes in the newest snapshot (shared_inode_changed); all where it cannot tell."""
        everything = [s.inode for s in shared]
        snaps = self.snapshots(host) if shared else []
        if not snaps or not is_btrfs_subvolume(self.snapshot_path(snaps[-1])):
            return everything
        try:
            fd = os.open(self.snapshot_path(snaps[-1]), os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return everything
        try:
            return [now.inode for now in shared if shared_inode_changed(now, read_inode(fd, now.inode))]
        except OSError as e:
            log.warning("host %s: cannot read snapshot %s's tree (%s): every hard-linked file this "
                        "backup wrote counts as changed", host, snaps[-1].name, e.strerror)
            return everything
        finally:
            os.close(fd)

    def _record_again(self, host: str, current: Path, inodes: Sequence[int]) -> Optional[List[bytes]]:
        """Every name in current of the inodes an 'again:' is for (inode_names), recorded in
        <host>/AGAIN_RECORD for the next push (unshare_current) and returned; None, and no
        record, where there are more than AGAIN_NAMES_MAX, they take more than
        AGAIN_LIST_BYTES encoded, or they cannot be read as root.

        Only root writes the record, into <host>/, which is root's: the backup user and
        the host's account can neither write nor replace it.  The names are the
        client's own (bytes, any but NUL and '/'), percent-encoded."""
        self._forget_again(host)
        snaps = self.snapshots(host)
        if os.geteuid() != 0 or not snaps or os.lstat(self.host_dir(host)).st_uid != 0:
            return None
        names: List[bytes] = []
        try:
            fd = os.open(current, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return None
        try:
            for inode in inodes:
                found = inode_names(fd, inode, AGAIN_NAMES_MAX - len(names))
                if found is None:
                    return None
                names += found
        except OSError as e:
            log.info("host %s: the names of the hard-linked files to copy again are not listed: %s",
                     host, e.strerror)
            return None
        finally:
            os.close(fd)
        words = quote_names(names)
        if sum(len(w) + 1 for w in words) > AGAIN_LIST_BYTES:
            return None
        write_file_atomically(self.host_dir(host) / AGAIN_RECORD,
                              json.dumps({"snapshot": snaps[-1].name, "names": words}))
        return names

    def _forget_again(self, host: str) -> None:
        """The last 'again:' is answered (a snapshot was taken) or another replaces it."""
        with contextlib.suppress(FileNotFoundError, PermissionError):
            os.unlink(self.host_dir(host) / AGAIN_RECORD)

    def is_read_only(self, path: Path) -> bool:
        return subvolume_info_at(path).read_only

    def lock_down(self, snap: Snapshot, dry_run: bool = False) -> bool:
        path = self.snapshot_path(snap)
        # btrfs takes a name and follows links: only a real directory in a
        # root-owned host directory (adopt_store takes that first) is handed to it.
        if not _is_real_dir(path) or not is_btrfs_subvolume(path):   # as the hardlink backend does
            return Store.lock_down(self, snap, dry_run)
        st = os.lstat(path)
        read_only = self.is_read_only(path)
        if st.st_uid == 0 and st.st_gid == 0 and read_only:
            return False
        if dry_run:
            return True
        # The owner of a subvolume can clear its read-only flag and then change
        # it (measured; DESIGN 3): root takes the root inode *before* the flag
        # is set.  A read-only one still owned by the backup user is opened for
        # that one chown (a read-only subvolume refuses even root's).
        if read_only:
            self._btrfs("property", "set", "-ts", str(path), "ro", "false")
        os.chown(path, 0, 0)
        self._btrfs("property", "set", "-ts", str(path), "ro", "true")
        return True

    def _measure_from(self, snap: Snapshot) -> dict:
        # The generation the snapshot was made at, not its present one: chown
        # and the read-only flag (adoption) move that on, and writes to current
        # between the two would then go uncounted.
        path = self.snapshot_path(snap)
        if not is_btrfs_subvolume(path):
            return {}
        return {"generation": subvolume_info_at(path).created}

    def _reset_current(self, current: Path, newest: Path, owner: os.stat_result) -> None:
        if not is_btrfs_subvolume(current):
            Store._reset_current(self, current, newest, owner)
            return
        self._delete_subvolume(current)
        # A writable snapshot of the newest: --inplace then resumes from it, as after a snapshot.
        # A snapshot's root is its source's (root's, and its mode), and a chown of current's
        # root would move current's generation past its making: an unfinished upload
        # (_written_since_snapshot) until the next snapshot, measured at every prune.  So the
        # owner and mode go to a first snapshot, and current is a snapshot of that one.
        staging = current.with_name(".incomplete-current")       # clean_leftovers' after a crash
        if _is_real_dir(staging):
            self._remove_tree(staging)
        # Root-only while staging is writable: what the shell wrote there would be in current
        # from its making, never counted as written since.
        with _closed_while_writable(current.parent):
            try:
                create_snapshot(newest, current.parent, staging.name)
                self._give_as_before(staging, owner)
                create_snapshot(staging, current.parent, current.name)
            except OSError as e:
                raise ByteBackError(f"cannot make {current} again from {newest}: {e.strerror}") from None
            finally:
                if _is_real_dir(staging):
                    self._delete_subvolume(staging)
        self._btrfs("subvolume", "sync", str(self.root))

    def _remove_tree(self, path: Path) -> None:
        if not is_btrfs_subvolume(path):      # a snapshot made by the hardlink backend
            remove_tree(path)
            return
        # A deleted subvolume's space comes back in the background.  Commit and
        # wait for the cleaner, or the next measurement sees no gain and the
        # pruner deletes far more history than it needs to; then commit what
        # the cleaner freed, or statvfs counts it only at the next deletion
        # (measured: test_prune_equivalence).
        self._delete_subvolume(path)
        self._btrfs("subvolume", "sync", str(self.root))
        self._btrfs("filesystem", "sync", str(self.root))

    def _delete_subvolume(self, path: Path) -> None:
        """Delete the subvolume at path, the subvolumes planted inside it first (they stop it)."""
        self.remove_planted(path, deleting=True)
        self._btrfs("subvolume", "delete", "--commit-each", str(path))


class AnotherPass(ByteBackError):
    """The snapshot was not taken: current needs one more rsync run (a resumed one) first.

    Its message begins 'again: ', which the client looks for."""

    def __init__(self, message: str, *, logged: bool = False):
        super().__init__(f"again: {message}", logged=logged)


@contextlib.contextmanager
def _closed_while_writable(host_dir: Path) -> Iterator[None]:
    """Keep a server's <host>/ root-only (0700) while a snapshot in it is still writable.

    Measured on this kernel: a descriptor opened for writing while a subvolume
    is writable writes on after its read-only flag is set (pwrite and mmap
    both reach the disc).  The backup user or the host's own account (the
    group of <host>/, the owner of the files) opened a file of
    <host>/.incomplete-NAME so, and rewrote the finished snapshot whenever it
    liked.  Every lookup below <host>/ needs its search bit, even from a
    descriptor or working directory already inside it.  A crash in between
    leaves 0700, which clean_leftovers puts back."""
    st = os.lstat(host_dir)
    closed = os.geteuid() == 0 and st.st_uid == 0 and stat.S_IMODE(st.st_mode) & 0o077
    if closed:
        os.chmod(host_dir, 0o700)
    try:
        yield
    finally:
        if closed:
            os.chmod(host_dir, stat.S_IMODE(st.st_mode))


def open_store(root, runner: Optional[Runner] = None, create: bool = False, *,
               euid: Optional[int] = None) -> Store:
    """The store at root, with the backend its filesystem and this user call for.

    The one decision of both: read-only btrfs snapshots need root (euid, this
    process's unless given), and the store acts as root exactly when it is."""
    root = Path(os.path.abspath(root))
    if not root.exists() and create:
        try:
            root.mkdir(mode=0o755, parents=True)
        except OSError as e:
            raise ByteBackError(f"cannot create the store {root}: {e.strerror}") from None
    if not root.is_dir():
        raise ByteBackError(f"store {root} is not a directory; create it or fix the destination")
    as_root = (os.geteuid() if euid is None else euid) == 0
    fstype = filesystem_type(os.path.realpath(root), _read_mounts())
    if fstype == "btrfs" and as_root:
        return BtrfsStore(root, runner, as_root=True)
    if fstype == "btrfs":
        log.debug("store %s is on btrfs, but read-only snapshots need root: "
                 "using hard-linked snapshots instead", root)
    return HardlinkStore(root, runner, as_root=as_root)


# === 8. Server commands (snapshot, prune) ====================================

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
    backups = store.read_history(host)
    # Names never go backwards, not even past a snapshot prune has deleted:
    # the newest ever recorded counts, not only the newest still there.
    recorded = [w for w in (parse_snapshot_name(str(b.get("snapshot", ""))) for b in backups) if w]
    latest = max(recorded + ([newest.when] if newest else []), default=None)
    name = new_snapshot_name(now, latest, {s.name for s in snaps})
    if name is None:
        stamp = format_snapshot_name(now, seconds=True)
        if latest is not None and now <= latest:
            raise ByteBackError(f"the clock ({stamp}) is not after the newest snapshot "
                                f"{format_snapshot_name(latest, seconds=True)} of host {host}; "
                                "check the system time")
        raise ByteBackError(f"a snapshot named {stamp} already exists for host {host}; try again in a second")
    when = parse_snapshot_name(name)
    if not backups and newest is not None:
        # NOTE(adopt): snapshots but no history: a host taken over from the
        # original byteback.  Measure this backup from its newest snapshot (as
        # setup-server's adoption records), never as a whole new copy, which
        # would make prune delete the inherited history to make room for it.
        backups = [store.baseline_entry(newest)]
    # A time limit ends the run before or after, never between the snapshot and its entry.
    with uninterrupted():
        record = store.take_snapshot(host, name, last_measured(backups))
        entry = history_entry(backups, record, name=name, now=now, first=newest is None, config=config)
        suspicious = entry["suspicious"]
        store.write_history(host, backups + [entry])
        store.forget_plan()
        store.clear_dirty(host)
    log.info("snapshot host=%s name=%s size=%s added=%s", host, name,
             format_size(record["size"]), format_size(record["added"]))
    if suspicious:
        log.warning("host %s: backup %s added %s, over %g times what its recent backups added: "
                    "contained (prune deletes no history for it beyond the host's growth budget; "
                    "'prune --force' accepts it now)", host, name, format_size(record["added"]), config.suspicion)
    return Snapshot(host, name, when)


class PruneResult(NamedTuple):
    """What a prune did (or, under --dry-run, would do)."""
    free: int
    target: int
    deleted: List[Decision]
    plan: Optional[PrunePlan] = None


def store_target(store: Store, config: ServerConfig, histories: Optional[Dict[str, List[dict]]] = None) -> int:
    """The free space this store should keep, from every host's history."""
    if histories is None:
        histories = {h: store.read_history(h) for h in store.hosts()}
    return free_space_target({h: counted_sizes(b) for h, b in histories.items()},
                             headroom=config.headroom, history=config.history)


def read_prune_state(store: Store, now: Optional[dt.datetime] = None,
                     timeout: float = ServerConfig().rsync_timeout) -> PruneState:
    """The plain values plan_prune decides on, read from the store.

    A session idle for longer than the I/O timeout is stuck, not running
    (session_state): its upload is rolled back like any abandoned one."""
    hosts = {}
    clock = now.timestamp() if now is not None else time.time()
    names = store.hosts()
    snapshots = {h: tuple(store.snapshots(h)) for h in names}
    # Each host's snapshots listed once: unfinished_hosts looks at the newest of them.
    unfinished = store.unfinished_hosts(names, {h: snaps[-1] if snaps else None for h, snaps in snapshots.items()})
    for h in names:
        pending = store.pending_bytes(h) if h in unfinished else None
        running = pending is not None and session_state(store.session_lock_path(h), clock, timeout)[0] == "running"
        hosts[h] = HostFacts(snapshots[h], tuple(store.read_history(h)), pending, running)
    return PruneState(hosts, store.free_bytes(), store.total_bytes(), store.unaccounted_bytes())


def execute_plan(plan: PrunePlan, free: int, *, delete: Callable[[PlanStep], None],
                 measure: Callable[[], int], on_step: Optional[Callable[[PlanStep, int, int], None]] = None) -> tuple:
    """Carry out a plan's deletions: one at a time, re-measuring, until the plan says stop.

    Returns (free, deleted decisions, why it stopped: 'enough', 'share' or 'exhausted').
    The one loop prune_store and simulate both run.
    """
    deleted: List[Decision] = []
    steps = iter(plan.steps)
    # The next step is asked for only while the disc is short: working out a step
    # nobody takes (another host's order, often) is most of a small prune's cost.
    while plan.short(free):
        step = next(steps, None)
        if step is None:
            return free, deleted, "exhausted"
        if not step.over_share:
            return free, deleted, "share"
        before = free
        delete(step)
        free = measure()
        deleted.append(step.decision)
        if on_step is not None:
            on_step(step, before, free)
    return free, deleted, "enough"


def prune_store(store: Store, config: ServerConfig, *, now: dt.datetime, order: Optional[str] = None,
                force: bool = False, dry_run: bool = False) -> PruneResult:
    """Carry out plan_prune on a store: acceptances, roll-backs, deletions.  Caller holds the lock."""
    if not dry_run:
        store.clean_leftovers()
    state = read_prune_state(store, now, config.rsync_timeout)
    plan = plan_prune(state, now=now, config=config, order=order, force=force)
    for note in plan.notes:
        log.warning("prune: %s", note)
    for a in plan.accepted:
        log.warning("prune: %s", a.reason)
    if not dry_run:
        for host in sorted({a.host for a in plan.accepted if a.snapshot}):
            store.write_history(host, record_acceptances(store.read_history(host), plan.accepted, now))
        refused = [host for host in plan.rollbacks if not store.roll_back(host, config.rsync_timeout)]
        if refused:
            # Its upload is still on the disc (a session that would not end, a subvolume that
            # cannot be deleted): planned again as one in progress, contained, or the deletions
            # below would make room for it with every other host's history.
            hosts = dict(state.hosts)
            for host in refused:
                hosts[host] = hosts[host]._replace(running=True)
                log.warning("prune: host %s: its unfinished upload stays (not rolled back): contained, "
                            "not pruned for", host)
            state = state._replace(hosts=hosts, free=store.free_bytes())
            plan = plan_prune(state, now=now, config=config, order=order, force=force)
    free = store.free_bytes() if plan.rollbacks and not dry_run else plan.free
    if not dry_run:
        store.note_plan(plan, state.hosts)
    if not plan.short(free):
        log.info("prune: %s free, goal %s (target %s): nothing to delete", format_size(free),
                 format_size(plan.goal), format_size(plan.target))
        return PruneResult(free, plan.target, [], plan)
    if dry_run:
        estimate = [free]

        def pretend(step: PlanStep) -> None:
            estimate[0] += step.estimate          # a rough estimate: what it alone holds
            snap = step.decision.snapshot
            print(f"would delete {snap.host}/{snap.name}: {step.decision.reason}")
        free, deleted, why = execute_plan(plan, free, delete=pretend, measure=lambda: estimate[0])
    else:
        def logged(step: PlanStep, before: int, after: int) -> None:
            snap = step.decision.snapshot
            log.info('prune host=%s deleted=%s reason="%s" freed=%s', snap.host, snap.name,
                     step.decision.reason, format_size(max(0, after - before)))
        free, deleted, why = execute_plan(plan, free, delete=lambda step: store.delete(step.decision.snapshot),
                                          measure=store.free_bytes, on_step=logged)
    if why == "share":
        log.warning("prune: %s free, goal %s: what is left is over the share of hosts that have "
                    "only their newest (and oldest) snapshot; no other host's history is deleted for it",
                    format_size(free), format_size(plan.goal))
    elif why == "exhausted":
        raise ByteBackError(f"the disc is still short after deleting all but each host's newest snapshot "
                            f"and, in the importance order, its oldest ({format_size(free)} free, goal {format_size(plan.goal)}); add space to the "
                            "store, or lower 'headroom' in server.conf")
    return PruneResult(free, plan.target, deleted, plan)


def _refuse_under_sudo(args: argparse.Namespace, *names: str) -> None:
    """Through sudo the caller may be a client that escaped its forced command: no overrides."""
    if not running_under_sudo(args.context.euid):
        return
    given = [f"--{n.replace('_', '-')}" for n in names if getattr(args, n, None)]
    if os.environ.get("BYTEBACK_CONFIG_DIR"):
        given.append("BYTEBACK_CONFIG_DIR")
    if given:
        raise UsageError(f"{', '.join(given)} cannot be used through sudo; an administrator runs "
                         "this command as root directly")


def _server_store(store: Optional[str], config: ServerConfig, runner: Runner) -> Store:
    """The store an administrator named, else server.conf's, else the byteback user's home."""
    return open_store(_server_store_root(store, config), runner)


def _server_store_root(store: Optional[str], config: ServerConfig) -> str:
    """Where _server_store's store is."""
    root = store or config.store
    if not root:
        try:
            root = pwd.getpwnam("byteback").pw_dir
        except KeyError:
            raise UsageError("no store given: use --store ROOT, or set 'store' in server.conf") from None
    return root


def cmd_snapshot(args: argparse.Namespace) -> int:
    """snapshot: make host's current a read-only snapshot (refused inside the interval), then prune."""
    _refuse_under_sudo(args, "store", "force")
    host = check_host_name(args.host)
    if args.when_told and not _told_to_go(args, host):
        return EXIT_NOT_TOLD    # nothing done: the push it was started for failed, or no longer waits
    config = load_server_config(args.config_dir)
    store = _server_store(args.store, config, Runner())
    # For a client's session (complete, or the start of a push), through sudo:
    # it must end even should the disc stall or the work grow without bound.
    under_sudo = running_under_sudo(args.context.euid)
    with (_client_run_limit(config, args.prepare) if under_sudo else contextlib.nullcontext()):
        if args.prepare:
            return prepare_backup(store, host, config)
        snap = snapshot_and_prune(store, host, config, force=args.force)
    print(f"snapshot {snap.host}/{snap.name} taken")
    return EXIT_OK


def _told_to_go(args: argparse.Namespace, host: str) -> bool:
    """`snapshot --when-told`: wait, bounded in time and in what is read, for the word.

    Anyone sudo lets run it may start it (the backup user, a host's account)
    and root's processes escape the caller's limits: so only for a host the
    store has, one waiting run per host (a second ends at once), and never
    past rsync_timeout.  The config read here only finds the store and that
    limit: the run reads it again once told, and acts on the settings of then."""
    config = load_server_config(args.config_dir)
    root = _server_store_root(args.store, config)
    if not _is_real_dir(Path(root) / host):
        log.warning("snapshot --when-told: no host %s in %s; nothing done", host, root,
                    extra={"syslog_only": True})
        return False
    try:
        with Lock(_when_told_lock_dir() / f"{host}.lock", f"waiting snapshot of host {host}"):
            return wait_for_word(sys.stdin.fileno(), config.rsync_timeout, idle=write_out_store(root))
    except LockBusy as e:
        log.warning("snapshot --when-told: %s; nothing done", e, extra={"syslog_only": True})
        return False


def write_out_store(root: str) -> Callable[[], None]:
    """What a waiting run does while rsync writes: the store's filesystem writes out its
    dirty data and commits (BTRFS_IOC_SYNC), which the snapshot's measurement would
    otherwise do all at once after rsync.  Nothing on another filesystem (the call
    fails there) or where the store cannot be opened: the snapshot then writes it all."""
    def write_out() -> None:
        with contextlib.suppress(OSError):
            fd = os.open(root, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                fcntl.ioctl(fd, BTRFS_IOC_SYNC)
            finally:
                os.close(fd)
    return write_out


def _when_told_lock_dir() -> Path:
    """WHEN_TOLD_LOCK_DIR, made 0700 by this process (root) where missing; refused unless
    it is a real directory of this user that nobody else may write."""
    path = WHEN_TOLD_LOCK_DIR
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700)
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.geteuid() or st.st_mode & 0o022:
        raise ByteBackError(f"{path} is not a directory of {pwd.getpwuid(os.geteuid()).pw_name} "
                            "that only it may write; remove it and try again")
    return path


def wait_for_word(fd: int, timeout: float, clock: Callable[[], float] = time.monotonic, *,
                  idle: Optional[Callable[[], None]] = None, every: float = WRITE_OUT_EVERY) -> bool:
    """Whether exactly GO_WORD and a newline arrive on fd within timeout seconds.

    Reads at most that many bytes: whatever else arrives (another word, a
    flood without a newline), the end of input, or the deadline is a no.
    idle: called each `every` seconds without input while it waits."""
    want = (GO_WORD + "\n").encode()
    deadline = clock() + timeout
    next_idle = clock() + every
    got = b""
    while len(got) < len(want) and want.startswith(got):
        now = clock()
        left = deadline - now
        # Past the deadline, only what is there already is read: a word that came
        # while idle ran (a sync can block) is still a go.
        wait = 0.0 if left <= 0 else max(0.0, min(left, next_idle - now)) if idle else left
        if not select.select([fd], [], [], wait)[0]:
            if left <= 0:
                return False
            if idle is not None and clock() >= next_idle and deadline - clock() > every:
                idle()
                next_idle = clock() + every
            continue
        chunk = os.read(fd, len(want) - len(got))
        if not chunk:
            return False
        got += chunk
    return got == want


def _client_run_name(prepare: bool) -> str:
    return "the prune before the backup" if prepare else "the snapshot"


def _client_run_limit(config: ServerConfig, prepare: bool):
    """The time limit of a snapshot or prune a client's session asked for."""
    return time_limit(config.rsync_timeout, _client_run_name(prepare))


def prepare_backup(store: Store, host: str, config: ServerConfig) -> int:
    """The start of a push (`snapshot --prepare`): a prune under the store's lock."""
    with store.lock():
        try:
            prune_store(store, config, now=now_local())
        except (ByteBackError, OSError) as e:
            log.error("before a backup of %s: %s", host, e)
            return EXIT_FAILURE
    return EXIT_OK


def prune_would_act(store: Store, config: ServerConfig, now: dt.datetime) -> bool:
    """Whether a prune now would change anything (plan_prune, on what the backup user can read).

    An unfinished upload anywhere counts: only root can measure it.  Then the
    push's own prune (prepare_backup) would roll back, accept or delete
    nothing: the last snapshot's prune, or the scheduled one, did it already.
    """
    hosts = store.hosts()
    if store.unfinished_hosts(hosts):
        return True
    # Root's last plan answers for the store where it was settled, for these very hosts,
    # and the disc still has its goal free: every snapshot forgets the one before and its
    # prune notes its own, so it was made from the histories the store holds.  That spares
    # each push of a big server a read of every host's history and a plan (~0.6 s at 1,000
    # hosts), and hosts with accounts of their own (receiver = userns), who cannot list
    # each other's snapshots, a root prune before every push.
    if store.last_plan_settled(hosts):
        return False
    try:
        state = read_prune_state(store, now, config.rsync_timeout)
    except PermissionError:
        return True         # nothing else to go by: ask root
    plan = plan_prune(state, now=now, config=config)
    return bool(plan.rollbacks or plan.accepted or plan.short(plan.free))


def snapshot_and_prune(store: Store, host: str, config: ServerConfig, *, force: bool = False) -> Snapshot:
    """What `complete` and a local backup end with: the snapshot, then a prune, under the lock.

    The snapshot stands whatever the prune says: a refused or short prune is
    the administrator's to see (syslog, status), not a failed backup.
    """
    # The host's session lock only for the snapshot: no push may be half-way
    # through what it records.  The prune after it waits for nobody's session.
    with store.session_lock(host), store.lock():
        snap = snapshot_host(store, host, config, now=now_local(), force=force)
    try:
        with store.lock():
            prune_store(store, config, now=now_local())
    except (ByteBackError, OSError) as e:
        log.error("snapshot %s/%s taken, but %s", host, snap.name, e)
    return snap


def list_plan(state: PruneState, config: ServerConfig, *, now: dt.datetime,
              order: Optional[str] = None) -> tuple:
    """What `prune --list` works out: (the plan, its steps spent; the table of plan_listing).

    The cyclic garbage collector waits meanwhile: the listing keeps a line for
    every snapshot and makes no cycles, and the collector walked the growing
    listing again and again (a fifth of the time at 100,000 snapshots)."""
    paused = pause_collector()
    try:
        plan = plan_prune(state, now=now, config=config, order=order)
        table = plan_table(plan_listing(plan, state), now)
    finally:
        if paused:
            gc.enable()
    return plan, table


def plan_table(listing: Sequence[Decision], now: dt.datetime) -> str:
    """The table `prune --list` prints of a plan_listing: number, host, snapshot, age, place."""
    snaps = list(map(_DECISION_SNAPSHOT, listing))
    numbers = list(map(str, range(1, len(listing) + 1)))
    for i in itertools.compress(range(len(listing)), map(operator.not_, map(_DECISION_DELETE, listing))):
        numbers[i] = "-"                      # kept
    return format_columns([["#", *numbers], ["host", *map(_SNAPSHOT_HOST, snaps)],
                           ["snapshot", *map(_SNAPSHOT_NAME, snaps)],
                           ["age", *_describe_ages(_ages(snaps, now))],
                           ["place", *map(_DECISION_REASON, listing)]])


def cmd_prune(args: argparse.Namespace) -> int:
    """prune: delete snapshots, least important first, until the store has its target free space."""
    _refuse_under_sudo(args, "store", "force")
    config = load_server_config(args.config_dir)
    store = _server_store(args.store, config, Runner(dry_run=args.dry_run))
    order = args.order or config.order
    now = now_local()
    if args.list:
        state = read_prune_state(store, now, config.rsync_timeout)
        plan, table = list_plan(state, config, now=now, order=order)
        print(f"store {store.root} ({store.kind}): {format_size(state.free)} free, "
              f"target {format_size(plan.target)}, goal {format_size(plan.goal)}; order of deletion ({order}):")
        for note in plan.notes + [a.reason for a in plan.accepted]:
            print(f"WARNING: {note}")
        print(table)
        return EXIT_OK
    lock = store.lock()
    try:
        lock.__enter__()
    except LockBusy as e:
        if not args.if_idle:
            raise
        # The scheduled prune: a snapshot's own prune is running, which does the same.
        log.info("prune skipped: %s", e)
        return EXIT_OK
    try:
        result = prune_store(store, config, now=now, order=order, force=args.force, dry_run=args.dry_run)
    finally:
        lock.__exit__(None, None, None)
    if args.dry_run and not result.deleted:
        print(f"nothing to delete: {format_size(result.free)} free, target {format_size(result.target)}")
    return EXIT_OK


# --- 8b. Listing files in snapshots (restore's server half) ------------------

def _stored_attributes(path: str, st: os.stat_result) -> tuple:
    """(mode, uid, gid) as the client had them: --fake-super keeps them in an xattr."""
    try:
        raw = os.getxattr(path, FAKE_SUPER_XATTR, follow_symlinks=False).decode("ascii", "replace")
        m = re.match(r"(\d+) \d+,\d+ (\d+):(\d+)", raw)
        if m:
            return int(m.group(1), 8), int(m.group(2)), int(m.group(3))
    except OSError:
        pass
    return st.st_mode, st.st_uid, st.st_gid


def _kind(mode: int) -> str:
    return ("d" if stat.S_ISDIR(mode) else "f" if stat.S_ISREG(mode)
            else "l" if stat.S_ISLNK(mode) else "o")


def _entry(snapshot: str, root: str, path: str, st: os.stat_result) -> Entry:
    """One listing entry as the client had it.  The stored mode says what the file was:
    under --fake-super a symlink is kept as a small file holding its target."""
    mode, uid, gid = _stored_attributes(path, st)
    kind = _kind(mode)
    target = ""
    if kind == "l":
        try:
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(path)
            else:
                with open(path, "rb") as f:
                    target = os.fsdecode(f.read(4096))
        except OSError:
            target = "?"
        target = target[len(MUNGED_PREFIX):] if target.startswith(MUNGED_PREFIX) else target
    return Entry(snapshot, path[len(root):] or "/", kind, mode, st.st_size if kind == "f" else 0,
                 uid, gid, int(st.st_mtime), target)


def _no_links_between(root: str, path: str) -> bool:
    """True when every directory on the way from root to path is a real one.

    A symlink kept in a snapshot (a local store keeps real ones) must not lead
    a listing, or a restore, to live files outside the snapshot.
    """
    here = root
    for part in [p for p in path.split("/") if p][:-1]:
        here = os.path.join(here, part)
        if not _is_real_dir(Path(here)):
            return False
    return True


def _no_check() -> None:
    pass


def list_snapshot(snapshot: str, root: str, patterns: Sequence[str], *,
                  check: Callable[[], None] = _no_check) -> List[Entry]:
    """Entries of one snapshot tree (root) whose client path matches any pattern.

    check() runs before each directory is read; it raises to stop the walk.
    """
    found: Dict[str, Entry] = {}
    for pattern in patterns:
        glob = compile_glob(pattern)
        base, depth = glob_base(pattern)
        start = root + base.rstrip("/")
        if not _no_links_between(root, base):
            continue
        try:
            st = os.lstat(start or "/")
        except OSError:
            continue
        if depth == 0 or glob.match(base):
            found.setdefault(base, _entry(snapshot, root, start, st))
        if depth == 0 or not stat.S_ISDIR(st.st_mode):
            continue
        stack = [(start, 1)]
        while stack:
            top, level = stack.pop()
            check()
            for child in scandir_entries(top):
                client_path = child.path[len(root):]
                if glob.match(client_path) and client_path not in found:
                    try:
                        found[client_path] = _entry(snapshot, root, child.path,
                                                    child.stat(follow_symlinks=False))
                    except OSError:
                        continue
                if (depth is None or level < depth) and child.is_dir(follow_symlinks=False):
                    stack.append((child.path, level + 1))
    return [found[p] for p in sorted(found)]


def fold_versions(entries: Iterable[Entry], order: Sequence[str]) -> List[Entry]:
    """Each path's distinct versions, oldest first: the same kind, size and mtime is one version."""
    rank = {name: i for i, name in enumerate(order)}
    by_path: Dict[str, List[Entry]] = {}
    for e in entries:
        by_path.setdefault(e.path, []).append(e)
    result = []
    for path in sorted(by_path):
        last = None
        for e in sorted(by_path[path], key=lambda e: rank.get(e.snapshot, len(rank))):
            if last is None or _version_key(e) != _version_key(last):
                result.append(e)
                last = e
    return result


def _version_key(e: Entry) -> tuple:
    return e.kind, e.size, e.mtime, e.target


def list_store(store: Store, host: str, patterns: Sequence[str], *, snapshot: Optional[str] = None,
               every: bool = False, check: Callable[[], None] = _no_check) -> List[Entry]:
    """Match patterns in the newest snapshot, one named snapshot, or (every) all of them."""
    names = [s.name for s in store.snapshots(host)]
    if snapshot:
        if snapshot != "current" and snapshot not in names:
            raise ByteBackError(f"host {host} has no snapshot {snapshot}; "
                                f"the newest is {names[-1] if names else 'none yet'}")
        chosen = [snapshot]
    elif every:
        chosen = names
    else:
        chosen = names[-1:]
    if not chosen:
        raise ByteBackError(f"host {host} has no snapshots yet; take a backup first")
    if not every:
        return list_snapshot(chosen[0], str(store.host_dir(host) / chosen[0]), patterns, check=check)
    # Fold as each snapshot is read, not after: --all '**' over 100 snapshots
    # of 100,000 files would otherwise hold 10M entries at once.
    folded: List[Entry] = []
    for name in chosen:
        folded = fold_versions(folded + list_snapshot(name, str(store.host_dir(host) / name), patterns,
                                                      check=check), chosen)
    return folded


def _mode_string(kind: str, mode: int) -> str:
    chars = "".join(c if mode & (1 << (8 - i)) else "-" for i, c in enumerate("rwxrwxrwx"))
    return {"f": "-", "d": "d", "l": "l"}.get(kind, "?") + chars


def format_entries(entries: Sequence[Entry]) -> str:
    """A table a person reads: snapshot, mode, size, owner, mtime, path."""
    rows = [("snapshot", "mode", "size", "owner", "modified", "path")]
    for e in entries:
        when = dt.datetime.fromtimestamp(e.mtime).strftime("%Y-%m-%d %H:%M")
        path = e.path + (f" -> {e.target}" if e.kind == "l" else "")
        name = e.snapshot + (" (incomplete)" if e.snapshot == "current" else "")
        rows.append((printable(name), _mode_string(e.kind, e.mode), str(e.size), f"{e.uid}:{e.gid}", when,
                     printable(path)))
    return format_table(rows)


def listing_watch(limit: float, out_fd: int, clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """session_watch for list_snapshot."""
    return session_watch(limit, out_fd, "the listing", "list less at a time (a narrower pattern, or --snapshot)",
                         clock)


def session_watch(limit: float, out_fd: int, what: str, advice: str,
                  clock: Callable[[], float] = time.monotonic) -> Callable[[], None]:
    """A check that raises once `limit` seconds have passed, or the client went away.

    Work for a client that writes nothing until it is done would not notice a
    client that hung up; the write end of its stdout shows it (POLLERR on a
    pipe whose reader is gone, POLLHUP on a socket).
    """
    deadline = clock() + limit
    poller = select.poll()
    poller.register(out_fd, 0)          # POLLERR, POLLHUP and POLLNVAL are always reported

    def check() -> None:
        if clock() > deadline:
            raise ByteBackError(f"{what} took longer than {limit:.0f}s and was stopped; {advice}")
        if poller.poll(0):
            raise ByteBackError(f"the client went away; {what} was stopped")
    return check


CLIENT_RUN_GRACE = 10     # seconds the session waits past the root run's own time limit


def wait_for_client_run(proc: subprocess.Popen, check: Callable[[], None]) -> int:
    """Wait for the root run a client's session started (through sudo), pass its output
    on, and return its exit code.

    The run ends itself at its time limit (time_limit).  Should it not (a
    process blocked on a stalled disc) or should the client go away, the
    session asks it to stop (sudo relays SIGTERM) and ends without it: the
    run writes to pipes of this process only, so the client's connection
    closes with it.
    """
    stop: Optional[ByteBackError] = None
    while True:
        try:
            out, err = proc.communicate(timeout=5 if stop else 0.2)
            break
        except subprocess.TimeoutExpired:
            if stop:
                raise stop from None
        try:
            check()
        except ByteBackError as e:
            stop = e
            with contextlib.suppress(OSError):
                proc.terminate()
    with contextlib.suppress(OSError):
        sys.stdout.write(out or "")
        sys.stderr.write(err or "")
    if stop:
        raise stop
    return proc.returncode


def serve_list(store: Store, host: str, request: Request, *, limit: float) -> int:
    """Answer a client's list with one JSON object a line (the client formats it).

    It ends within `limit` seconds, or as soon as the client goes away; the
    alarm ends it even should one directory take that long to read.
    """
    signal.alarm(int(limit) + 30)
    snapshot = next((o.partition("=")[2] for o in request.options if o.startswith("--snapshot=")), None)
    entries = list_store(store, host, request.paths, snapshot=snapshot, every="--all" in request.options,
                         check=listing_watch(limit, sys.stdout.fileno()))
    if ORIGINAL_NEWEST in request.options:
        entries = list({e.path: e for e in entries}.values())      # oldest first: the last stays
    try:
        if ORIGINAL_TABLE in request.options:
            # The original client prints what it gets, so it gets what a person reads.
            print(format_entries(entries) if entries else "** Sorry.  There were no files matching:\n--> "
                  + "\n--> ".join(printable(p) for p in request.paths))
        else:
            for e in entries:
                sys.stdout.write(json.dumps(e._asdict(), ensure_ascii=True, separators=(",", ":")) + "\n")
        sys.stdout.flush()
    except BrokenPipeError:
        raise ByteBackError("the client went away; the listing was stopped") from None
    return EXIT_OK


# --- 8c. Host accounts and the user-namespace receiver (receiver = userns) ---
#
# With receiver = userns, setup-host gives each new host a system account of
# its own: home <store>/<host> (root's, 0750, the account's group), a
# root-owned <host>/.ssh/authorized_keys holding that host's one key, sudo
# lines naming only that host, and a range of HOST_ID_COUNT uids and gids of
# its own in /etc/subuid and /etc/subgid.  Its forced command enters a new
# user namespace whose ids 0.. are that range (newuidmap and newgidmap, from
# the uidmap package, map only what /etc/subuid gives the caller), becomes
# the namespace's root, and runs the listing and rsync there: owners, modes
# and set-id bits are kept for real, shifted by the range's base, without
# --fake-super.  Outside the namespace the process has no privilege; inside
# it, root has power only over inodes of its own range, so no other host's
# files (another range, or root's) can be read or written from it.
#
# How many ids.  A client's own users are below 65536, but real servers hold
# files of ids above it that byteback did not make: rootless podman's
# subuids (100000 + 65536 a user), LXC's (100000-165535), LXD's and Incus's
# (1000000-1065535), systemd-nspawn's (524288 + 65536 a container).  Those
# need a namespace of 2^21 ids.  An id range costs nothing but ids (the
# kernel maps one extent, whatever its length), and 1,023 hosts of 2^21 fit
# between 100000 and 2^31, above which some tools still read ids as signed.
# Hosts set up with 65536 ids (earlier versions) keep them as their
# namespace's 0-65535, so the owners on disc keep their meaning; setup-client
# run again adds a second range, mapped as 65536 and up (host_id_map).

SUBID_COUNT = 65536                # the least a host's first range holds: ids 0-65535, a client's own users
HOST_ID_COUNT = 2 ** 21            # what a host's namespace holds in all: containers' subuids too
SUBID_START = 100000               # where ranges start (login.defs' SUB_UID_MIN)
SUBID_END = 2 ** 31                # ranges end below it: above, some tools read ids as signed
LOGIN_DEFS = "/etc/login.defs"
SUBID_FILES = ("/etc/subuid", "/etc/subgid")
ID_MAPPERS = ("/usr/bin/newuidmap", "/usr/bin/newgidmap")
CLONE_NEWUSER = 0x10000000
PR_SET_DUMPABLE = 4           # prctl(2)


class HostAccount(NamedTuple):
    """A host's own system account and the first ids of its namespace's range."""
    name: str
    uid: int
    gid: int
    uid_base: int
    gid_base: int
    uid_map: tuple = ()         # host_id_map's extents
    gid_map: tuple = ()


def host_account_name(user: str, host: str) -> str:
    """The account of a host of the backup user `user` (pure): '<user>-<host>' where
    that is a plain user name of at most 32 characters, else '<user>-h<hash of host>'."""
    name = f"{user}-{host}"
    if len(name) <= 32 and re.fullmatch(r"[a-z_][a-z0-9_-]*", name):
        return name
    import hashlib
    return f"{user[:13]}-h{hashlib.sha256(host.encode()).hexdigest()[:16]}"


def parse_subids(text: str) -> List[tuple]:
    """(owner, first, count) of each well-formed line of /etc/subuid or /etc/subgid (pure)."""
    found = []
    for line in text.splitlines():
        m = re.fullmatch(r"\s*([^:#\s][^:\s]*):(\d{1,10}):(\d{1,10})\s*", line)
        if m:
            found.append((m.group(1), int(m.group(2)), int(m.group(3))))
    return found


def host_id_map(entries: Sequence[tuple], name: str, uid: int) -> tuple:
    """The account's namespace, as (inside, outside, count) extents, from its ranges (pure).

    Its first range of at least SUBID_COUNT ids (in the file's order: the one
    earlier versions chose) is ids 0 and up; its other ranges follow, lowest
    first, up to HOST_ID_COUNT ids in all.  () where it has no such first range."""
    own = [(first, count) for owner, first, count in entries if owner in (name, str(uid)) and first > 0]
    base = next(((first, count) for first, count in own if count >= SUBID_COUNT), None)
    if base is None:
        return ()
    extents, inside = [], 0
    for first, count in [base] + sorted(r for r in own if r != base):
        count = min(count, max(HOST_ID_COUNT, base[1]) - inside)
        if count <= 0:
            break
        extents.append((inside, first, count))
        inside += count
    return tuple(extents)


def subid_base(entries: Sequence[tuple], name: str, uid: int) -> Optional[int]:
    """The first id of the account's namespace (host_id_map), or None (pure)."""
    extents = host_id_map(entries, name, uid)
    return extents[0][1] if extents else None


def subid_sharers(entries: Sequence[tuple], name: str, uid: int, base: int,
                  count: int = SUBID_COUNT) -> List[str]:
    """Who else holds an id of the account's range base..base+count-1 (pure).

    Two hosts on one range are one kernel uid: each one's namespace root owns
    the other's files, enters its session directory, and reaches its host
    directory through /proc/<pid>/cwd of its running rsync."""
    return sorted({owner for owner, first, n in entries
                   if owner not in (name, str(uid)) and first < base + count and base < first + n})


def free_subid_base(taken: Iterable[tuple], ids: Iterable[int], start: int = SUBID_START,
                    size: int = HOST_ID_COUNT, end: int = SUBID_END) -> int:
    """The lowest range of `size` ids from start, on a `size` step, that overlaps
    no (first, count) range already given, holds no id of a real user or group,
    and ends at or below `end` (pure).  Raises ByteBackError when none is left."""
    ranges = sorted(taken)
    real = sorted(i for i in ids if i >= start)
    base = start
    while base + size <= end:
        stop = base + size
        clash = [first + count for first, count in ranges if first < stop and base < first + count]
        clash += [i + 1 for i in real[bisect.bisect_left(real, base):bisect.bisect_left(real, stop)]]
        if not clash:
            return base
        base += size * max(1, -(-(max(clash) - base) // size))
    raise ByteBackError(f"no free range of {size} ids is left for a host's account between {start} and "
                        f"{end - 1} (/etc/subuid, /etc/subgid are full there; {LOGIN_DEFS}'s SUB_UID_MIN, "
                        "SUB_UID_MAX, SUB_GID_MIN, SUB_GID_MAX set the bounds, at most 2^31 - 1)")


def subid_bounds(login_defs: str) -> tuple:
    """(start, end) of where new ranges may lie (pure): login.defs' SUB_UID_MIN/SUB_GID_MIN
    and SUB_UID_MAX/SUB_GID_MAX where set (uids and gids share their ranges: both bounds
    hold), else SUBID_START; never past SUBID_END."""
    found: Dict[str, int] = {}
    for line in login_defs.splitlines():
        m = re.fullmatch(r"\s*(SUB_[UG]ID_(?:MIN|MAX))\s+([0-9]{1,10})\s*", line)
        if m:
            found[m.group(1)] = int(m.group(2))
    mins = [found[k] for k in ("SUB_UID_MIN", "SUB_GID_MIN") if k in found]
    maxes = [found[k] + 1 for k in ("SUB_UID_MAX", "SUB_GID_MAX") if k in found]
    return max(mins or [SUBID_START]), min(maxes + [SUBID_END])


def host_sudoers_text(account: str, host: str, program: str, config_args: Sequence[str]) -> str:
    """/etc/sudoers.d lines of a host's own account: its snapshot, and nothing else (pure)."""
    return _sudoers_text(account, program, config_args,
                         (f"snapshot --host {host}", f"snapshot --host {host} --prepare",
                          f"snapshot --host {host} --when-told"),
                         f"host {host}'s snapshot that ends its backup (--when-told: started with "
                         "the push), and the prune that starts one",
                         "setup-host")


def host_sudoers_path(account: str) -> Path:
    # sudo skips files in sudoers.d whose names hold a '.'
    return Path("/etc/sudoers.d") / f"byteback-host-{account.replace('.', '_')}"


def _child_exit_code(pid: int) -> int:
    """Wait for a forked child; its exit code, 128 + N for signal N (os.waitstatus_to_exitcode
    is 3.9+)."""
    status = os.waitpid(pid, 0)[1]
    return os.WEXITSTATUS(status) if os.WIFEXITED(status) else 128 + os.WTERMSIG(status)


def _child_succeeded(pid: int) -> bool:
    """Wait for a forked child; True if it exited 0."""
    return _child_exit_code(pid) == 0


def userns_problem(probe_uid: int = 65534) -> Optional[str]:
    """Why this server cannot run userns receivers, or None: the mappers are missing, or
    the kernel refuses an unprivileged user (probe_uid) a user namespace.  Root only."""
    for mapper in ID_MAPPERS:
        try:
            st = os.stat(mapper)
        except OSError:
            return f"{mapper} is missing ({install_hint(['uidmap'], root=True)})"
        if st.st_uid != 0 or not st.st_mode & stat.S_ISUID:
            with contextlib.suppress(OSError):
                if os.getxattr(mapper, "security.capability"):
                    continue
            return f"{mapper} is not setuid root (reinstall the uidmap package)"
    # Making the namespace is not enough: where AppArmor restricts unprivileged
    # user namespaces (Ubuntu 24.04) unshare succeeds and every capability in it
    # is then denied, so rsync could set no owner.  The probe uses one: as root
    # of its namespace it reads a file of its own whose mode forbids that.
    import tempfile
    with tempfile.TemporaryDirectory(prefix="byteback-userns-") as scratch:
        probe = Path(scratch) / "probe"
        probe.write_bytes(b"")
        os.chmod(probe, 0)
        os.chown(probe, probe_uid, probe_uid)
        os.chmod(scratch, 0o711)
        # Imported here (_libc_call's import is lazy): the child, another user by
        # then, may not be able to read Python's own library.
        import ctypes  # noqa: F401
        pid = os.fork()
        if pid == 0:            # pragma: no cover - the child
            code = 1
            try:
                os.setgroups([])
                os.setgid(probe_uid)
                os.setuid(probe_uid)
                _libc_call("prctl", PR_SET_DUMPABLE, 1)      # else /proc/self/ stays root's
                _libc_call("unshare", CLONE_NEWUSER)
                Path("/proc/self/setgroups").write_text("deny")
                Path("/proc/self/uid_map").write_text(f"0 {probe_uid} 1")
                Path("/proc/self/gid_map").write_text(f"0 {probe_uid} 1")
                os.close(os.open(probe, os.O_RDONLY))       # CAP_DAC_OVERRIDE in the namespace
                code = 0
            except BaseException:
                pass
            os._exit(code)
        succeeded = _child_succeeded(pid)
    if not succeeded:
        return ("this kernel does not let an unprivileged user be root of a user namespace "
                "(sysctl user.max_user_namespaces, kernel.unprivileged_userns_clone, or AppArmor's "
                "kernel.apparmor_restrict_unprivileged_userns)")
    return None


def ensure_host_account(store: Store, user: str, host: str, runner: Runner, done: List[str]) -> HostAccount:
    """The host's own account, with its range of ids, made where missing (root).

    One setup-host at a time chooses a range: two at once (setup-client run on
    many clients in parallel) read the same /etc/subuid and gave two hosts the
    same range."""
    lock = Lock(store.state_dir / "accounts.lock", "setup-host choosing a host's ids")
    deadline = time.monotonic() + 120
    while True:
        try:
            lock.__enter__()
            break
        except LockBusy:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)
    try:
        return _ensure_host_account(store, user, host, runner, done)
    finally:
        lock.__exit__(None, None, None)


def _ensure_host_account(store: Store, user: str, host: str, runner: Runner, done: List[str]) -> HostAccount:
    import grp
    name, home = host_account_name(user, host), str(store.host_dir(host))
    try:
        account = pwd.getpwnam(name)
    except KeyError:
        runner.run(["useradd", "--system", "--user-group", "--home-dir", home, "--no-create-home",
                    "--shell", "/bin/sh", "--comment", f"byteback host {host}", name])
        # '*' rather than useradd's locked '!': sshd without PAM refuses locked accounts.
        runner.run(["usermod", "--password", "*", name])
        account = pwd.getpwnam(name)
        done.append(f"created    user {name} for host {host} (home {home})")
    if os.path.realpath(account.pw_dir) != os.path.realpath(home):
        raise ByteBackError(f"user {name} exists with home {account.pw_dir}, not {home}: it is not "
                            f"host {host}'s; remove it (userdel {name}) or rename it, and run setup-client again")
    entries = [parse_subids(Path(path).read_text() if os.path.exists(path) else "") for path in SUBID_FILES]
    # A new account gets HOST_ID_COUNT ids, one of before with fewer a second
    # range for the rest (its first keeps its meaning: the owners on disc).
    need = [HOST_ID_COUNT - sum(n for _, _, n in m) if m else HOST_ID_COUNT
            for m in (host_id_map(e, name, account.pw_uid) for e in entries)]
    if max(need) > 0:
        ids = [p.pw_uid for p in pwd.getpwall()] + [g.gr_gid for g in grp.getgrall()]
        bounds = subid_bounds(Path(LOGIN_DEFS).read_text(errors="replace") if os.path.exists(LOGIN_DEFS) else "")
        taken = [(first, count) for e in entries for _, first, count in e]
        words, bases = [], {}
        for i, size in enumerate(need):
            if size > 0:
                if size not in bases:       # uids and gids alike where they can be
                    bases[size] = free_subid_base(taken, ids, bounds[0], size=size, end=bounds[1])
                    taken.append((bases[size], size))
                words += [("--add-subuids", "--add-subgids")[i], f"{bases[size]}-{bases[size] + size - 1}"]
        runner.run(["usermod", *words, name])
        done.append(f"gave       user {name} the ids {' '.join(words[1::2])} (its namespace's "
                    f"{HOST_ID_COUNT - max(need)}-{HOST_ID_COUNT - 1})")
        entries = [parse_subids(Path(path).read_text()) for path in SUBID_FILES]
    maps = [host_id_map(e, name, account.pw_uid) for e in entries]
    for path, found, extents in zip(SUBID_FILES, entries, maps):
        _refuse_shared_range(path, found, name, account.pw_uid, extents)
    return HostAccount(name, account.pw_uid, account.pw_gid, maps[0][0][1], maps[1][0][1], maps[0], maps[1])


def _refuse_shared_range(path: str, entries: Sequence[tuple], name: str, uid: int, extents: tuple) -> None:
    """Refuse a host's range that others share, or that reaches 2^31 (SUBID_END)."""
    for _, base, count in extents:
        if base + count > SUBID_END:
            raise ByteBackError(f"{path} gives {name} the ids {base}-{base + count - 1}, past 2^31 - 1, which "
                                "some tools read as negative: an administrator must give it a range below "
                                "(usermod --del-subuids/--add-subuids, --del-subgids/--add-subgids)")
        sharers = subid_sharers(entries, name, uid, base, count)
        if sharers:
            raise ByteBackError(f"{path} gives ids of {name}'s range {base}-{base + count - 1} to "
                                f"{', '.join(sharers)} too: hosts sharing ids can reach each other's backups. "
                                f"An administrator must give one of them another range (usermod --del-subuids/"
                                f"--add-subuids, --del-subgids/--add-subgids)")


def _is_host_account_group(gid: int, host_dir: Path) -> bool:
    """Whether gid is the group of an account whose home is host_dir (only root makes one)."""
    return any(p.pw_gid == gid and os.path.realpath(p.pw_dir) == os.path.realpath(host_dir)
               for p in pwd.getpwall())


def host_namespace(store: Store, host: str) -> Optional[tuple]:
    """(uid map, gid map) of the namespace this host's receive runs in: when this process
    is the host's own account (home: the host's directory, which only root sets), else
    None (the shared backup user: --fake-super)."""
    account = pwd.getpwuid(os.getuid())
    if os.path.realpath(account.pw_dir) != os.path.realpath(store.host_dir(host)):
        return None
    return _account_bases(account)


def host_id_bases(store: Store, host: str) -> Optional[tuple]:
    """(uid base, gid base) of the range a host's files are kept in on disc, shifted, when it
    has an account of its own (receiver = userns), else None: whoever reads its snapshots
    directly (a restore on the server) must not take those owners as the client's."""
    home = os.path.realpath(store.host_dir(host))
    account = next((p for p in pwd.getpwall() if os.path.realpath(p.pw_dir) == home), None)
    return tuple(m[0][1] for m in _account_bases(account)) if account is not None else None


def _account_bases(account: "pwd.struct_passwd") -> tuple:
    """(uid map, gid map) of the account's namespace (host_id_map), refused where it has
    none or shares one."""
    maps = []
    for path in SUBID_FILES:
        try:
            text = Path(path).read_text()
        except OSError:
            text = ""
        entries = parse_subids(text)
        extents = host_id_map(entries, account.pw_name, account.pw_uid)
        if not extents:
            raise ByteBackError(f"account {account.pw_name} has no range of {SUBID_COUNT} ids in {path}; "
                                "an administrator must run setup-client for this host again")
        _refuse_shared_range(path, entries, account.pw_name, account.pw_uid, extents)
        maps.append(extents)
    return tuple(maps)


def enter_user_namespace(uid_map: Union[int, tuple], gid_map: Union[int, tuple]) -> None:
    """Become root of a new user namespace over these maps (host_id_map's extents, or a
    first id, for ids 0-65535 from it).

    A helper child writes the maps with newuidmap/newgidmap (they check
    /etc/subuid and /etc/subgid); this process keeps its pid, descriptors and
    locks, so rsync exec'd afterwards is still the forced command.
    """
    maps = [((0, m, SUBID_COUNT),) if isinstance(m, int) else m for m in (uid_map, gid_map)]
    me = os.getpid()
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:            # pragma: no cover - the child
        code = 1
        try:
            os.close(ready_w)
            if os.read(ready_r, 1) == b"x":      # nothing: the parent could not unshare
                # Both at once: each is a set-id program's start, in the way of rsync's (issue 14).
                # stdout is rsync's protocol channel: the mappers' words go to stderr only.
                mappers = [Runner().start([mapper, str(me), *(str(n) for e in extents for n in e)],
                                          stdin=subprocess.DEVNULL, stdout=2)
                           for mapper, extents in zip(ID_MAPPERS, maps)]
                codes = [proc.wait() for proc in mappers]
                code = next((c for c in codes if c), 0)
        finally:
            os._exit(code)
    os.close(ready_r)
    try:
        _libc_call("unshare", CLONE_NEWUSER)
    except OSError as e:
        os.close(ready_w)
        os.waitpid(pid, 0)
        raise ByteBackError(f"cannot make this host's user namespace ({e.strerror}): the server's "
                            "kernel refuses it now; an administrator must allow unprivileged user "
                            "namespaces again, or set this host up with receiver = fakesuper") from None
    os.write(ready_w, b"x")
    os.close(ready_w)
    if not _child_succeeded(pid):
        raise ByteBackError(f"newuidmap/newgidmap could not map ids {maps[0][0][1]}- and {maps[1][0][1]}- for this "
                            "host (see above); an administrator must run setup-client for it again")
    try:
        os.setresgid(0, 0, 0)
        os.setresuid(0, 0, 0)
    except OSError as e:
        raise ByteBackError(f"cannot become root of this host's user namespace ({e.strerror}): the "
                            "server's kernel or AppArmor denies it; an administrator must allow it, "
                            "or set this host up with receiver = fakesuper") from None


def record_not_kept(store: Store, host: str, gaps: NotKept, namespace: Optional[tuple]) -> None:
    """After complete's snapshot: record, as the host's account, what its receiver could not
    keep, and log it.  Nothing to record leaves the last record, which the newer snapshot
    makes old (read_not_kept).  Never fails the backup: its snapshot is taken."""
    if not gaps.total:
        return
    log.warning("host %s: %s", host, not_kept_text(gaps), extra={"syslog_only": True})
    try:
        snaps = store.snapshots(host)
        gaps = gaps._replace(time=now_local().isoformat(), snapshot=snaps[-1].name if snaps else "")
        if namespace:
            enter_user_namespace(*namespace)    # sessions/<host> is its namespace root's
        write_file_atomically(store.not_kept_path(host), not_kept_record(gaps))
    except (OSError, ByteBackError) as e:
        log.warning("host %s: what its receiver could not keep was not recorded: %s", host, e)


def not_kept_record(gaps: NotKept) -> str:
    """The record's JSON, within the NOT_KEPT_RECORD_MAX bytes of UTF-8 that root reads (pure).

    Names unescaped (ensure_ascii=False): escaped, five names of 300 non-ASCII characters
    took up to 12 bytes a character, past what read_not_kept reads, and the warning was lost.
    Within checked_not_kept's bounds they take at most 4 bytes a character (2 for '"' or
    '\\'); past the bound anyway, the counts are kept without the names."""
    for kept in (gaps, gaps._replace(examples=())):
        text = json.dumps(kept._asdict(), ensure_ascii=False, indent=1, sort_keys=True) + "\n"
        if len(text.encode("utf-8")) <= NOT_KEPT_RECORD_MAX:
            break
    return text


def read_not_kept(store: Store, host: str, newest: Optional[Snapshot], now: dt.datetime) -> Optional[NotKept]:
    """What the host's newest snapshot lacks, as its complete recorded (root reads what the
    host's account wrote: a regular file of NOT_KEPT_RECORD_MAX bytes, checked_not_kept's bounds,
    naming that snapshot, recorded after it was taken and not in the future), else None: a
    record ends with the next snapshot, forged or not.  The name, not only the time: names
    have a minute's resolution, and a record planted before the next snapshot of that same
    minute would have spoken for it too."""
    data = read_untrusted_json(store.not_kept_path(host), NOT_KEPT_RECORD_MAX) if newest else None
    try:
        gaps = checked_not_kept(data["devices"], data["owners"], data["examples"], data["time"],
                                data["snapshot"])
    except (ValueError, KeyError, TypeError):
        return None
    recorded = _entry_time(gaps.time)
    fresh = (gaps.snapshot == newest.name and recorded is not None
             and newest.when <= recorded <= now + dt.timedelta(minutes=5))
    return gaps if gaps.total and fresh else None


# Debian's own PATH for root's jobs, sudo's secure_path and the cron lines byteback
# writes: a server whose Python 3.8+ is in /usr/local/bin (built from source beside an
# older system python3) keeps finding it under sudo and from cron.
SYSTEM_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _sudoers_text(user: str, program: str, config_args: Sequence[str],
                  commands: Sequence[str] = ("snapshot --host *", "setup-host *"),
                  what: str = "taking a snapshot of a host, and adding a client host (setup-client)",
                  by: str = "setup-server") -> str:
    """The /etc/sudoers.d file that lets user run exactly these byteback commands as root (pure).

    secure_path: the zipapp's #! line looks python3 up on PATH, and sudo keeps the caller's
    PATH where sudoers sets none (SYSTEM_PATH)."""
    prefix = " ".join([program, *config_args])
    return (f"# Written by byteback {by}.  {user} may run exactly these as root:\n# {what}.\n"
            f"Defaults:{user} !requiretty\n"
            f'Defaults:{user} secure_path="{SYSTEM_PATH}"\n'
            + "".join(f"{user} ALL = (root) NOPASSWD: {prefix} {words}\n" for words in commands))


# --- 8d. The forced command: receive -----------------------------------------
#
# What the policy above accepted, done: in this host's session, as this
# host's user.  Nothing here may write to stdout before rsync runs: stdout is
# rsync's protocol channel.

def _ssh_client_address() -> str:
    return (os.environ.get("SSH_CONNECTION") or "local").split(" ")[0]


def _store_for_user(config: ServerConfig, runner: Optional[Runner] = None) -> Store:
    """The store of the user running the forced command: server.conf's, else its home."""
    import pwd
    return open_store(config.store or pwd.getpwuid(os.getuid()).pw_dir, runner)


class Receive(NamedTuple):
    """What the forced command knows once it has accepted a request: who, and where."""
    args: argparse.Namespace
    host: str                   # from authorized_keys (our own argv), never from the client
    config: ServerConfig
    store: Store
    host_dir: Path
    current: Path
    namespace: Optional[tuple] = None   # (uid map, gid map): the host's own account (section 8c)


def _refuse(host: str, original: str, reason: object) -> NoReturn:
    """The guard's one refusal: a REFUSED line for syslog, one line on stderr, exit 1."""
    log.warning("REFUSED host=%s client=%s command=%r: %s", host, _ssh_client_address(),
                original[:500], reason, extra={"syslog_only": True})
    raise ByteBackError(f"refused: {reason}", logged=True) from None


def cmd_receive(args: argparse.Namespace) -> int:
    """receive: the forced command.  Checks SSH_ORIGINAL_COMMAND and runs only what is allowed."""
    host = check_host_name(args.host)
    original = os.environ.get("SSH_ORIGINAL_COMMAND", "")
    try:
        request = check_receive_command(original)
        log.info("ACCEPTED host=%s client=%s verb=%s command=%r", host, _ssh_client_address(),
                 request.verb, original[:500])
        return RECEIVE_VERBS[request.verb](_open_receive(args, host), request)
    except Refused as e:
        _refuse(host, original, e)


def _open_receive(args: argparse.Namespace, host: str) -> Receive:
    """This user's store, and the host's directories in it, checked."""
    config = load_server_config(args.config_dir)
    store = _store_for_user(config)
    host_dir, current = store.host_dir(host), store.current(host)
    # lstat, not stat: a symlinked host directory or current would send the
    # client's data (or its restore) somewhere else entirely.
    for path in (host_dir, current):
        try:
            if not stat.S_ISDIR(os.lstat(path).st_mode):
                raise OSError(errno.ENOTDIR, "not a directory")
        except OSError:
            raise ByteBackError(f"host {host} is not set up on this server ({path} is missing or "
                                "not a directory); run setup-client again") from None
    return Receive(args, host, config, store, host_dir, current, host_namespace(store, host))


def _snapshot_refusal(r: Receive) -> Optional[str]:
    """Why a snapshot of this host now would be refused (the minimum interval), or None."""
    return interval_refusal(r.store.newest_snapshot(r.host), now_local(), r.config.min_interval)


def _receive_ping(r: Receive, request: Request) -> int:
    """ping: pong, and a warning now (not after the upload) when a snapshot would be refused.

    A client asks it only while the last push's complete said the interval has
    not passed (the hint _push_then_complete gives), or where it has no hint."""
    print(f"pong byteback {VERSION} host={r.host}")
    print(PONG_CAN)         # a push may say AGAIN_WORD
    refusal = _snapshot_refusal(r)
    if refusal:
        print(f"wait: {refusal}")
    return EXIT_OK


def _receive_complete(r: Receive, request: Request) -> int:
    """complete: the snapshot.  It takes this host's session lock itself (as root): it
    must never record half of an upload that is still running.  What the client says its
    receiver could not keep is recorded once the snapshot is taken (section 8c).

    A push that asks for it (PUSH_THEN_COMPLETE) takes its snapshot itself
    (_push_then_complete) instead, where rsync kept everything (exit 0 or 24)."""
    code = _snapshot_for_client(r)
    if code == EXIT_OK:
        record_not_kept(r.store, r.host, request_not_kept(request), r.namespace)
    return code


def _enter_session(r: Receive) -> Lock:
    """This host's session, as whoever receives for it: the host's own account becomes
    root of its user namespace first (section 8c; sudo is out of reach from there)."""
    if r.namespace:
        enter_user_namespace(*r.namespace)
    # One session per host: a second one racing the first is how symlink and
    # rename races are won (CVE-2024-12747, CVE-2026-53797).
    return take_session(r.store, r.host, r.config.rsync_timeout, r.args.context.sleep)


def _receive_list(r: Receive, request: Request) -> int:
    """list: restore's listing, inside this host's session."""
    _enter_session(r)
    return serve_list(r.store, r.host, request, limit=r.config.rsync_timeout)


def _receive_rsync(r: Receive, request: Request) -> int:
    """push or restore: rsync's server half, run in this host's session, by exec."""
    writes = request.verb == "push" and "n" not in request.letters   # a dry run writes nothing
    if writes:
        # The start of a backup: prune first, as root, so that an upload abandoned past
        # the suspicion line is rolled back and the room an accepted one needs is made
        # before this one writes (plan_prune).  Its failure never stops the backup.
        # Where the plan says that prune would do nothing, sudo and a second start of
        # this program are spared.
        try:
            prepared = _snapshot_for_client(r, prepare=True) if _prune_needed(r) else EXIT_OK
        except ByteBackError as e:       # its time limit passed
            log.warning("host %s: %s", r.host, e)
            prepared = EXIT_FAILURE
        if prepared != EXIT_OK:
            log.warning("host %s: the prune before this backup failed (see the log); backing up anyway",
                        r.host)
        if request.completes:
            return _push_then_complete(r, request)
    _serve_rsync(r, request, writes)
    return EXIT_FAILURE     # pragma: no cover - execve does not return


def _push_then_complete(r: Receive, request: Request) -> int:
    """A push that asked for it (PUSH_THEN_COMPLETE): rsync's server half in a child,
    then, once it succeeded, the snapshot (complete) in this same session, which
    spares the client another session and this program another start (issue 14).

    The child enters the host's session (and its user namespace): this process
    stays outside it, where sudo is in reach, and holds no lock of the session.
    The client's rsync waits for the session's end, so it reads what follows on
    stderr (stdout was rsync's protocol channel): the snapshot's words, then
    COMPLETE_LINE.  Returns rsync's exit code."""
    sys.stdout.flush()
    sys.stderr.flush()
    # Closed on exec: its end is read once the child is rsync (or has ended).
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:            # pragma: no cover - the child
        os.close(started_r)
        _serve_rsync(r, request, writes=True)   # a refusal raises: main says it, the child exits
    os.close(started_w)
    with contextlib.suppress(OSError):
        os.read(started_r, 1)
    os.close(started_r)
    # The snapshot's root run starts now, and waits for the word while rsync runs:
    # its start (sudo, Python) costs the client nothing then, and is no longer in
    # the way of the child's until rsync runs (issue 14).  Sudoers lines from
    # before --when-told (a host account's are exact) do not allow it: then it
    # starts once rsync has ended, as complete's does.  The child never holds
    # its input: only this process may tell it to go.
    try:
        root_run = _start_root_run(r, when_told=True)
    except (OSError, ByteBackError) as e:
        # rsync runs already: leaving now would abandon it.  The snapshot is then
        # taken as without sudo's --when-told, once rsync has ended.
        log.warning("host %s: could not start the snapshot's root run beside rsync: %s", r.host, e)
        root_run = None
    rc = _child_exit_code(pid)
    if rc not in RSYNC_OK_CODES:
        _dismiss_root_run(root_run)
        return rc
    try:
        with contextlib.redirect_stdout(sys.stderr):
            code = _finish_root_run(r, root_run) if root_run is not None else EXIT_NOT_TOLD
            if code == EXIT_NOT_TOLD:
                # none, or one that no longer waited (its wait had ended, or another
                # run of this host's waited): one not told takes the snapshot
                code = _snapshot_for_client(r)
    except ByteBackError as e:
        log.error("%s", e)
        code = e.exit_code
    snaps = r.store.snapshots(r.host)
    wait = 0 if not snaps else r.config.min_interval - (now_local() - snaps[-1].when).total_seconds()
    sys.stderr.write("byteback: " + COMPLETE_LINE.format(code=code, wait=max(0, math.ceil(wait))) + "\n")
    sys.stderr.flush()
    return rc


def _dismiss_root_run(proc: Optional[subprocess.Popen]) -> None:
    """A waiting root run (snapshot --when-told) ended without the word: the end of its
    input, which it ends at without doing anything; asked to stop should it not."""
    if proc is not None:
        proc.stdin.close()
        proc.stdin = None
        try:
            wait_for_client_run(proc, session_watch(CLIENT_RUN_GRACE, sys.stderr.fileno(),
                                                    "the waiting snapshot", "see the server's log"))
        except ByteBackError as e:
            log.warning("%s", e)


def _serve_rsync(r: Receive, request: Request, writes: bool) -> NoReturn:
    """Become rsync's server half, in this host's session."""
    # Asked first and read after: its start overlaps the user namespace's (issue 14).
    asked = Runner().start([RSYNC_PROGRAM, "--version"], parsed=True, stdin=subprocess.DEVNULL,
                           stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True,
                           errors="replace")
    lock = _enter_session(r)
    version = _server_rsync_version(asked)
    if request.any_snapshot:
        request = resolve_any_snapshot(request, [s.name for s in r.store.snapshots(r.host)],
                                       lambda snap, path: os.path.lexists(f"{r.host_dir}/{snap}{path}"))
    if request.verb == "restore":
        request = resolve_newest(request, [s.name for s in r.store.snapshots(r.host)])
    argv = server_rsync_argv(request, host_dir=str(r.host_dir), current=str(r.current),
                             backend_options=r.store.rsync_options(r.host),
                             timeout=r.config.rsync_timeout, version=version,
                             fake_super=r.namespace is None)
    if request.verb == "restore":
        _check_paths_stay_inside(r, request.paths)
    if writes:
        resumed = r.store.dirty_since(r.host) is not None
        r.store.mark_dirty(r.host, now_local())
        r.store.unshare_current(r.host, resumed, again=request.again, named=request.named)
    _exec_rsync(r, argv, lock)


def _prune_needed(r: Receive) -> bool:
    """prune_would_act, and True where the backup user cannot tell."""
    try:
        return prune_would_act(r.store, r.config, now_local())
    except (ByteBackError, OSError) as e:
        log.debug("host %s: prune before the push, as its plan could not be read here: %s", r.host, e)
        return True


RECEIVE_VERBS: Dict[str, Callable[[Receive, Request], int]] = {
    "ping": _receive_ping, "complete": _receive_complete, "list": _receive_list,
    "push": _receive_rsync, "restore": _receive_rsync,
}


def _server_rsync_version(asked: subprocess.Popen) -> tuple:
    """This server's rsync version, from the `rsync --version` started as `asked`; refused
    (a ByteBackError) below MIN_RSYNC."""
    out, err = asked.communicate()
    if asked.returncode != 0:
        raise CommandFailed([RSYNC_PROGRAM, "--version"], asked.returncode, err)
    version = rsync_version(out)
    if version < MIN_RSYNC:
        raise ByteBackError(f"this server's rsync {'.'.join(map(str, version))} is older than 3.4.0 "
                            "and has known holes (CVE-2024-12084); upgrade rsync on the server")
    return version


def _check_paths_stay_inside(r: Receive, paths: Sequence[str]) -> None:
    """A restore's paths, resolved on the disc: a symlink in a snapshot must not lead out."""
    real_host_dir = os.path.realpath(r.host_dir)
    for path in paths:
        if not _is_within(os.path.realpath(os.path.join(r.host_dir, path)), real_host_dir):
            raise Refused(f"{path!r} leads outside host {r.host}'s backups")


def _exec_rsync(r: Receive, argv: List[str], lock: Lock) -> NoReturn:
    """Become rsync, in the host directory, still holding the session lock.

    exec, so rsync's own exit code reaches the client unchanged."""
    log.debug("exec %s", shlex.join(argv))
    os.chdir(r.host_dir)
    lock.keep_across_exec()     # held until rsync exits
    os.execve(RSYNC_PROGRAM, argv, {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LC_ALL": "C"})


def _snapshot_for_client(r: Receive, prepare: bool = False) -> int:
    """`complete`: snapshot as root through sudo, or as this user where sudo is not set up.

    prepare: the start of a push instead (`snapshot --prepare`, which setup-server's
    sudoers line `snapshot --host *` allows): a prune, with nothing on stdout."""
    return _finish_root_run(r, _start_root_run(r, prepare=prepare), prepare=prepare)


def _start_root_run(r: Receive, *, prepare: bool = False, when_told: bool = False) -> Optional[subprocess.Popen]:
    """`snapshot --host` for this host through sudo, started; None where sudo does not allow it.

    when_told: it waits for GO_WORD on its stdin (a pipe of ours) before it does anything."""
    argv = [program_path(), *config_dir_args(r.args.config_dir), "snapshot", "--host", r.host]
    argv += (["--prepare"] if prepare else []) + (["--when-told"] if when_told else [])
    runner = Runner()
    # A push's rsync is already running (when_told): the question must not read its
    # channel nor outlast the session's own grace (sudoers from a slow directory);
    # past that it is a ByteBackError, not a 'no': sudo may well be set up.
    allowed = shutil.which("sudo") and runner.run(
        ["sudo", "-n", "-l", *argv], destructive=False, check=False,
        stdin=subprocess.DEVNULL, timeout=CLIENT_RUN_GRACE).returncode == 0
    if not allowed:
        return None
    # stdout is rsync's protocol channel at the start of a push
    return runner.start(["sudo", "-n", *argv], stdin=subprocess.PIPE if when_told else subprocess.DEVNULL,
                        stderr=subprocess.PIPE, stdout=subprocess.DEVNULL if prepare else subprocess.PIPE,
                        universal_newlines=True, errors="replace")


def _finish_root_run(r: Receive, proc: Optional[subprocess.Popen], prepare: bool = False) -> int:
    """Wait for the root run _start_root_run started (told to go, if it waits to be), passing
    its words on; without one (no sudo), do its work as this user."""
    if proc is not None:
        if proc.stdin is not None:
            with contextlib.suppress(OSError):
                proc.stdin.write(GO_WORD + "\n")
                proc.stdin.close()
            proc.stdin = None           # communicate() must not flush it again
        return wait_for_client_run(proc, session_watch(
            r.config.rsync_timeout + CLIENT_RUN_GRACE, sys.stdout.fileno(),
            _client_run_name(prepare), "the server's disc may be stalled; see its log"))
    _refuse_under_sudo(r.args)
    if prepare:
        with _client_run_limit(r.config, prepare):
            return prepare_backup(r.store, r.host, r.config)
    log.warning("sudo is not set up for byteback on this server: snapshotting as %s; "
                "history is protected only by the forced command (run setup-server as root)",
                os.environ.get("USER", "this user"))
    with _client_run_limit(r.config, prepare):
        snap = snapshot_and_prune(r.store, r.host, r.config)
    print(f"snapshot {snap.host}/{snap.name} taken")
    return EXIT_OK


# --- 8e. Server set-up: setup-host, and the keys in authorized_keys ----------

# Key types, and how many length-prefixed strings their wire format holds.
KEY_PARTS = {"ssh-ed25519": 2, "ssh-rsa": 3, "ecdsa-sha2-nistp256": 3, "ecdsa-sha2-nistp384": 3,
             "ecdsa-sha2-nistp521": 3, "sk-ssh-ed25519@openssh.com": 3,
             "sk-ecdsa-sha2-nistp256@openssh.com": 4}
KNOWN_KEY_TYPES = tuple(KEY_PARTS)


def parse_public_key(text: str) -> str:
    """A client's public key, checked and re-written as 'type base64' (its comment dropped).

    Anything else in an authorized_keys line is an option (command=, from=,
    environment=...), so only a bare, well-formed key of a known type passes.
    """
    import base64
    import binascii
    lines = [l for l in text.splitlines() if l.strip()]
    if len(lines) != 1:
        raise ByteBackError("the public key must be exactly one line")
    # The comment may have spaces (the original's keys say "byteback client key").
    fields = lines[0].split()
    if len(fields) < 2 or fields[0] not in KNOWN_KEY_TYPES:
        raise ByteBackError(f"not a public key of a known type ({', '.join(KNOWN_KEY_TYPES)}), "
                            "or it carries options")
    key_type, body = fields[0], fields[1]
    if not re.fullmatch(r"[A-Za-z0-9+/]+={0,2}", body):
        raise ByteBackError("the public key's body is not base64")
    try:
        blob = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError):
        raise ByteBackError("the public key's body is not base64") from None
    # The wire format: length-prefixed strings, as many as the type has, and
    # nothing after them.  A key that is not whole would take the host's name
    # with a key nobody can use.
    parts, at = [], 0
    while at < len(blob):
        size = int.from_bytes(blob[at:at + 4], "big")
        if at + 4 + size > len(blob):
            raise ByteBackError("the public key is truncated")
        parts.append(blob[at + 4:at + 4 + size])
        at += 4 + size
    if not parts or parts[0] != key_type.encode() or len(parts) != KEY_PARTS[key_type]:
        raise ByteBackError("the public key's body does not match its type")
    if key_type == "ssh-ed25519" and len(parts[1]) != 32:
        raise ByteBackError("the public key is not a whole ed25519 key")
    if base64.b64encode(blob).decode() != body:
        raise ByteBackError("the public key's body is not in its canonical base64 form")
    return f"{key_type} {body}"


def _authorized_host(line: str) -> Optional[str]:
    """The host an authorized_keys line of ours lets in, or None."""
    m = re.search(rf'command="[^"]* receive --host ([{HOST_NAME_CHARS}]+)"', line)
    return m.group(1) if m and is_host_name(m.group(1)) else None


# The original byteback's authorized_keys lines, adopted by setup-server.
# It wrote  command="byteback-receive",from="IP",environment="BYTEBACK_HOST=h" key
# and relied on PermitUserEnvironment: the host came from an environment the
# line itself sets.  setup-server turns each into our restricted line for the
# same host, key and address, and keeps the old one beside it, commented out.
ORIGINAL_KEY_MARK = "# byteback: the original's line, replaced by the next one: "
ORIGINAL_KEY_UNUSABLE = "# byteback: the original's line, disabled (run setup-client on that host): "


def split_key_options(line: str) -> tuple:
    """(options, rest) of an authorized_keys line: options as written, quotes kept."""
    options, word, quoted, i = [], "", False, 0
    text = line.strip()
    while i < len(text):
        c = text[i]
        if c == "\\" and quoted and i + 1 < len(text):
            word += text[i:i + 2]
            i += 2
            continue
        if c == '"':
            quoted = not quoted
        elif not quoted and c == ",":
            options.append(word)
            word = ""
            i += 1
            continue
        elif not quoted and c in " \t":
            break
        word += c
        i += 1
    if word:
        options.append(word)
    return options, text[i:].strip()


def original_key_line(line: str) -> Optional[tuple]:
    """(host, address, key) of an original byteback line; None if the line is not one.

    Raises ByteBackError when it is one but cannot be converted (the caller then
    disables it: the original's receive passes client options to rsync).
    """
    text = line.strip()
    if not text or text.startswith("#") or text.split()[0] in KNOWN_KEY_TYPES:
        return None
    options, rest = split_key_options(text)
    values = {}
    for option in options:
        name, _, value = option.partition("=")
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        values.setdefault(name.lower(), []).append(value)
    commands = values.get("command", [])
    if not any(os.path.basename(c.split(" ")[0]) == "byteback-receive" for c in commands):
        return None
    if len(commands) != 1:
        raise ByteBackError("it has more than one command=")
    hosts = [v.partition("=")[2] for v in values.get("environment", []) if v.startswith("BYTEBACK_HOST=")]
    if len(hosts) != 1:
        raise ByteBackError("it sets no single BYTEBACK_HOST")
    addresses = values.get("from", [])
    if len(addresses) != 1:
        raise ByteBackError("it has no single from= address")
    return check_host_name(hosts[0]), check_client_address(addresses[0]), parse_public_key(rest)


def adopted_key_lines(lines: Sequence[str], program: str, config_args: Sequence[str]) -> tuple:
    """(new lines, what was done): each original line replaced by ours, the old one commented out."""
    out, said = [], []
    for line in lines:
        try:
            found = original_key_line(line)
        except ByteBackError as e:
            out.append(ORIGINAL_KEY_UNUSABLE + line)
            said.append(f"disabled   an original authorized_keys line ({e}): run setup-client on that client")
            continue
        if found is None:
            out.append(line)
            continue
        host, address, key = found
        out += [ORIGINAL_KEY_MARK + line, authorized_keys_line(program, config_args, host, address, key)]
        said.append(f"converted  the original key of host {host} (from {address}) into a restricted line")
    return out, said


def check_client_address(text: str) -> str:
    """A client's IP address for from="...", in its canonical form.

    Only digits, hex letters, dots and colons: ipaddress alone (Python >= 3.9)
    also takes an IPv6 scope id ('%...'), which may hold a quote or a newline
    and so write a second, unrestricted line into authorized_keys.
    """
    import ipaddress
    if not re.fullmatch(r"[0-9A-Fa-f.:]{2,45}", text or ""):
        raise ByteBackError(f"{text!r} is not an IP address")
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ByteBackError(f"{text!r} is not an IP address") from None


def authorized_keys_line(program: str, config_args: Sequence[str], host: str, address: str, key: str) -> str:
    """The one line that lets a client in: restricted, from its address, forced to receive."""
    address = check_client_address(address)            # checked again: it goes inside quotes
    command = " ".join([program, *config_args, "receive", "--host", check_host_name(host)])
    return f'restrict,from="{address}",command="{command}" {key}'


def _require_root(command: str) -> None:
    if os.geteuid() != 0:
        raise ByteBackError(f"{command} must run as root (try: sudo byteback.pyz {command} ...)")


def cmd_setup_host(args: argparse.Namespace) -> int:
    """setup-host: the root half of setup-client; adds one client's restricted key and its host.

    Its last line, 'login: NAME', is the account the client logs in as: the
    shared backup user, or (receiver = userns) the host's own."""
    _require_root("setup-host")
    host = check_host_name(args.host)
    address = check_client_address(args.client_address)
    try:
        key = parse_public_key(sys.stdin.read(16384))
    except UnicodeDecodeError:
        raise ByteBackError("the public key is not text") from None
    config = load_server_config(args.config_dir)
    store = _server_store(None, config, Runner())
    try:
        run_st = os.lstat(store.run_dir)
    except FileNotFoundError:
        raise ByteBackError(f"{store.run_dir} is missing: run setup-server on this server first") from None
    program = program_path()
    if not SAFE_PATH_RE.match(program):
        raise ByteBackError(f"byteback is installed at {program!r}; install it at a plain path")
    shared = (run_st.st_uid, run_st.st_gid)
    keys_file = store.root / ".ssh" / "authorized_keys"
    own_keys = store.host_dir(host) / ".ssh" / "authorized_keys"
    key_body = key.split()[1]
    for path in [keys_file] + [store.host_dir(h) / ".ssh" / "authorized_keys" for h in store.hosts()]:
        for line in read_key_lines(path):
            if line.lstrip().startswith("#"):
                continue     # a disabled line (adoption keeps the original's so) lets no one in
            other = _authorized_host(line)
            if key_body in line.split():
                if other != host:
                    raise ByteBackError(f"this key is already used by {other or 'another login'}; "
                                        "generate a new key for this client")
                print(f"host {host} is already set up with this key; nothing changed")
                login = _set_up_host(store, host, shared, None if path == own_keys else "", args=args)
                print(f"login: {login}")
                return EXIT_OK
            if other == host:
                raise ByteBackError(f"host {host} is already set up with another key; an administrator "
                                    f"must remove its line from {path} first")
    # A new host gets the configured receiver; one whose current the shared
    # user already writes (fake-super) stays so: its owners are in xattrs.
    current = store.current(host)
    own = config.receiver == "userns" and not (_is_real_dir(current) and os.lstat(current).st_uid == shared[0])
    if own:
        problem = userns_problem()
        if problem:
            raise ByteBackError(f"server.conf says receiver = userns, but {problem}; fix that, or set "
                                "receiver = fakesuper there")
    line = authorized_keys_line(program, config_dir_args(args.config_dir), host, address, key)
    login = _set_up_host(store, host, shared, line if own else "", args=args)
    if not own:
        write_file_atomically(keys_file, "\n".join(read_key_lines(keys_file) + [line]) + "\n", mode=0o644)
    log.info("setup-host host=%s client=%s key added (login %s)", host, address, login)
    print(f"host {host} set up: its key may log in as {login} from {address} and only run byteback receive")
    print(f"login: {login}")
    return EXIT_OK


def _set_up_host(store: Store, host: str, shared: tuple, key_line: Optional[str], *,
                 args: argparse.Namespace) -> str:
    """Make the host's directories; its login.  key_line: "" for the shared user, else the
    host gets its own account, sudo lines and key file (key_line, or None: keep its own)."""
    shared_user = pwd.getpwuid(shared[0]).pw_name
    if key_line == "":
        store.prepare_host(host, owner=shared)
        return shared_user
    done: List[str] = []
    runner = Runner()
    account = ensure_host_account(store, shared_user, host, runner, done)
    store.prepare_host(host, owner=(account.uid_base, account.gid_base), group=account.gid)
    host_dir = store.host_dir(host)
    # Root's, as the store's: were the key file the account's, anything that
    # writes as it could add an unrestricted key.
    _ensure_dir(host_dir / ".ssh", 0, 0, 0o755, done)
    if key_line is not None:
        _install_file(host_dir / ".ssh" / "authorized_keys", (key_line + "\n").encode(), 0o644, done)
    # Its session lock and in-progress marker: a directory of the namespace's root.
    _ensure_dir(store.state_dir / "sessions", 0, 0, 0o755, done)
    _ensure_dir(store.state_dir / "sessions" / host, account.uid_base, account.gid_base, 0o700, done)
    _install_file(host_sudoers_path(account.name),
                  host_sudoers_text(account.name, host, program_path(), config_dir_args(args.config_dir)).encode(),
                  0o440, done, lambda path: runner.run(["visudo", "-cf", str(path)], destructive=False))
    for said in done:
        log.info("setup-host host=%s: %s", host, said)
    return account.name


def _install_file(path: Path, data: bytes, mode: int, done: List[str], check: Optional[Callable] = None) -> None:
    """Put data at path (root-owned, mode) atomically, unless it is there already."""
    try:
        if path.read_bytes() == data and stat.S_IMODE(os.lstat(path).st_mode) == mode:
            done.append(f"unchanged  {path}")
            return
    except FileNotFoundError:
        pass
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    with open(tmp, "wb") as f:
        f.write(data)
    os.chown(tmp, 0, 0)
    os.chmod(tmp, mode)
    if check:
        check(tmp)
    os.replace(tmp, path)
    done.append(f"wrote      {path}")


def _ensure_dir(path: Path, uid: int, gid: int, mode: int, done: List[str]) -> None:
    if os.path.islink(path):
        raise ByteBackError(f"{path} is a symlink; move it away and run setup-server again")
    if not path.is_dir():
        path.mkdir(mode=mode, parents=True)
        done.append(f"created    {path}")
    st = os.lstat(path)
    if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (uid, gid, mode):
        os.chown(path, uid, gid)
        os.chmod(path, mode)
        done.append(f"fixed      {path} (owner {uid}:{gid}, mode {mode:o})")


def read_key_lines(path: Path) -> List[str]:
    """authorized_keys as sshd reads it: lines end at '\n' only.

    Not splitlines(): it also ends lines at '\r', '\f', '\v', '\x1c'..., so a
    comment sshd ignores as one line would be written back as two, the second
    an unrestricted key.
    """
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        return []
    except UnicodeDecodeError:
        raise ByteBackError(f"{path} is not UTF-8 text; fix or remove the line that is not, "
                            "and run setup-server again") from None
    lines = text.split("\n")
    return lines[:-1] if lines and lines[-1] == "" else lines


# --- 8f. Scheduled jobs (cron or systemd) for backup and prune ---------------

# Scheduled jobs: the client's daily backup (install-cron) and the server's
# hourly prune (setup-server), as a cron.d file or a systemd service and timer.
# The time is drawn at random once (so many machines spread out) and kept on
# re-runs: a re-run changes nothing.

class Job(NamedTuple):
    """A command root runs on a schedule."""
    name: str             # /etc/cron.d/<name>, <name>.service and <name>.timer
    what: str             # "backup", "prune": for messages and descriptions
    argv: List[str]
    hourly: bool          # hourly at a fixed minute, else daily at a fixed time


JOB_MARK = "Written by byteback"
CRON_TIME_RE = re.compile(r"^(\d+) (\d+|\*) \* \* \* root ", re.M)


def job_argv(program: str, config_dir: str, *words: str) -> List[str]:
    """The command line a job runs: the program, its config dir if not the default, the words."""
    return [program, *config_dir_args(config_dir), *words]


def cron_text(job: Job, minute: int, hour: int) -> str:
    """The whole /etc/cron.d file for a job (pure)."""
    when = f"{minute} * * * *" if job.hourly else f"{minute} {hour} * * *"
    return (f"# byteback: the {'hourly' if job.hourly else 'daily'} {job.what}; its time was drawn at "
            f"random so that many machines\n# do not run at once.  {JOB_MARK} "
            f"({'setup-server' if job.what == 'prune' else 'install-cron'}); re-runs keep the time.\n"
            f"SHELL=/bin/sh\nPATH={SYSTEM_PATH}\n"
            f"{when} root {shlex.join(job.argv)}\n")


def systemd_units(job: Job, hour: Optional[int] = None) -> Dict[str, str]:
    """The job's oneshot service and its timer, by file name (pure).

    FixedRandomDelay keeps the random delay the same on every run, as the
    cron minute is; Persistent catches up a run missed while the machine was off.
    """
    if job.hourly:
        calendar, spread = "hourly", "1h"
    elif hour is None:
        calendar, spread = "daily", "24h"
    else:
        calendar, spread = f"*-*-* {hour:02d}:00:00", "1h"
    service = (f"# {JOB_MARK}.\n[Unit]\nDescription=byteback {job.what}\n"
               "After=network-online.target\nWants=network-online.target\n\n"
               f"[Service]\nType=oneshot\nExecStart={shlex.join(job.argv)}\n"
               "Nice=10\nIOSchedulingClass=idle\n")
    timer = (f"# {JOB_MARK}.\n[Unit]\nDescription={'hourly' if job.hourly else 'daily'} byteback "
             f"{job.what}\n\n[Timer]\nOnCalendar={calendar}\nRandomizedDelaySec={spread}\n"
             "FixedRandomDelay=true\nPersistent=true\n\n[Install]\nWantedBy=timers.target\n")
    return {f"{job.name}.service": service, f"{job.name}.timer": timer}


def _write_if_changed(path: Path, text: str, done: List[str]) -> None:
    try:
        if path.read_text() == text:
            done.append(f"unchanged  {path}")
            return
    except FileNotFoundError:
        pass
    write_file_atomically(path, text, mode=0o644)
    done.append(f"wrote      {path}")


def _ours(path: Path) -> bool:
    try:
        return JOB_MARK in path.read_text(errors="replace")
    except OSError:
        return False


def install_job(job: Job, *, cron_file: Path, unit_dir: Path, systemd: bool = False,
                hour: Optional[int] = None) -> List[str]:
    """Install the job as a cron.d file, or (systemd) as units in unit_dir; say what was done.

    The other kind, if byteback wrote it before, is left alone but named: two
    schedules would run the job twice.
    """
    import random
    done: List[str] = []
    timer = unit_dir / f"{job.name}.timer"
    if systemd:
        for name, text in systemd_units(job, hour).items():
            _write_if_changed(unit_dir / name, text, done)
        if any(line.startswith("wrote") for line in done):
            if unit_dir == Path(DEFAULT_UNIT_DIR) and os.path.isdir("/run/systemd/system"):
                Runner().run(["systemctl", "daemon-reload"])
                Runner().run(["systemctl", "enable", "--now", timer.name])
                done.append(f"enabled    {timer.name}")
            else:
                done.append(f"to start it: systemctl daemon-reload && systemctl enable --now {timer.name}")
        if _ours(cron_file):
            done.append(f"note: {cron_file} runs the {job.what} from cron too; remove it")
        return done
    try:
        old = cron_file.read_text()
    except FileNotFoundError:
        old = ""
    m = CRON_TIME_RE.search(old)
    # Keep a time drawn before: re-running must not move every machine's job.
    minute = int(m.group(1)) if m else random.randrange(60)
    old_hour = m.group(2) if m and m.group(2) != "*" else None
    if hour is None:
        hour = int(old_hour) if old_hour is not None else random.randrange(24)
    _write_if_changed(cron_file, cron_text(job, minute, hour), done)
    done[-1] += f" ({'hourly at minute %d' % minute if job.hourly else 'daily at %02d:%02d' % (hour, minute)})"
    if _ours(timer):
        done.append(f"note: {timer} runs the {job.what} from systemd too; disable and remove it")
    return done


def _nothing_changed(done: Sequence[str]) -> bool:
    return all(line.startswith(("unchanged", "to start it", "note:")) for line in done)


# --- 8g. setup-server, and taking over an original byteback store ------------

def _own_plain_file(path: Path, mode: int) -> None:
    """Make path root's, with mode, through its own descriptor: never through a link.

    In an original store the backup user owned its home, so a symlink (or a hard
    link) placed there would turn a chown and chmod onto any file of root's.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as e:
        raise ByteBackError(f"{path} is not a plain file ({e.strerror}); move it away and run "
                            "setup-server again") from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_nlink != 1:
            raise ByteBackError(f"{path} is not a plain file of its own (a special file or a hard "
                                "link); move it away and run setup-server again")
        os.fchown(fd, 0, 0)
        os.fchmod(fd, mode)
    finally:
        os.close(fd)


def _check_root_owned(top: Path, skip: Sequence[str] = ()) -> None:
    """Refuse when anything below top (but the names in skip) is not root's.

    Prune trusts the history and state there; a file of the backup user's
    (planted while it owned the whole home, in an original store) would stay
    writable by it after the directories became root's.
    """
    for dirpath, dirnames, filenames in os.walk(top):
        if dirpath == str(top):
            dirnames[:] = [d for d in dirnames if d not in skip]
        for name in dirnames + filenames:
            path = os.path.join(dirpath, name)
            with contextlib.suppress(FileNotFoundError):
                if os.lstat(path).st_uid != 0:
                    raise ByteBackError(f"{path} is not root's (uid {os.lstat(path).st_uid}); byteback's "
                                        "history and state must be: chown it to root if it is byteback's "
                                        "own, else move it away, and run setup-server again")


def cmd_setup_server(args: argparse.Namespace) -> int:
    """setup-server: the seed README's server steps, done idempotently."""
    import pwd
    _require_root("setup-server")
    store = Path(os.path.abspath(args.store))
    install = args.install_path or default_server_program()
    if not SAFE_PATH_RE.match(str(store)) or not SAFE_PATH_RE.match(install):
        raise UsageError("--store and --install-path must be absolute paths of plain characters")
    if not re.fullmatch(r"[a-z_][a-z0-9_-]{0,30}", args.user):
        raise UsageError(f"{args.user!r} is not a plain user name")
    config_args = config_dir_args(args.config_dir)
    if args.dry_run:
        return _preview_setup_server(store, args.user, install, config_args)
    done: List[str] = []
    if not store.is_dir():
        store.mkdir(parents=True, mode=0o755)
        done.append(f"created    {store}")
    fstype = filesystem_type(os.path.realpath(store), _read_mounts())
    runner = Runner()
    try:
        account = pwd.getpwnam(args.user)
    except KeyError:
        runner.run(["useradd", "--system", "--user-group", "--home-dir", str(store),
                    "--no-create-home", "--shell", "/bin/sh", args.user])
        # '*' rather than useradd's locked '!': sshd without PAM refuses locked accounts.
        runner.run(["usermod", "--password", "*", args.user])
        account = pwd.getpwnam(args.user)
        done.append(f"created    user {args.user} (home {store})")
    if os.path.realpath(account.pw_dir) != os.path.realpath(store):
        raise ByteBackError(f"user {args.user} exists with home {account.pw_dir}, not {store}; "
                            "give the matching --store, or another --user")
    # Root owns everything the user must not change: the store root (else it
    # could rename hosts away), .ssh and authorized_keys (else it could add an
    # unrestricted key), and the history.  It owns only run/ (and current).
    _ensure_dir(store, 0, 0, 0o755, done)
    _ensure_dir(store / ".ssh", 0, 0, 0o755, done)
    environment = store / ".ssh" / "environment"
    if os.path.lexists(environment):
        # Where sshd permits user environments (the original needed it), every
        # login, forced command or not, gets these variables: LD_PRELOAD=...
        # would run a client's code before the guard.  byteback needs none.
        raise ByteBackError(f"{environment} sets variables for every login as {args.user} (sshd reads it "
                            "where PermitUserEnvironment is on); remove it and run setup-server again")
    keys = store / ".ssh" / "authorized_keys"
    if not os.path.lexists(keys):
        _install_file(keys, b"", 0o644, done)
    _own_plain_file(keys, 0o644)
    _ensure_dir(store / STATE_DIR_NAME, 0, 0, 0o755, done)
    _ensure_dir(store / STATE_DIR_NAME / "history", 0, 0, 0o755, done)
    _check_root_owned(store / STATE_DIR_NAME, skip=("run", "sessions"))
    _ensure_dir(store / STATE_DIR_NAME / "run", account.pw_uid, account.pw_gid, 0o755, done)
    _install_file(Path(install), Path(program_path()).read_bytes(), 0o755, done)
    done += _adopt_original(open_store(store, runner), (account.pw_uid, account.pw_gid), keys,
                            install, config_args, dry_run=False)
    config_dir = Path(args.config_dir)
    _ensure_dir(config_dir, 0, 0, 0o755, done)
    conf = config_dir / "server.conf"
    problem = userns_problem(account.pw_uid) if args.receiver in ("auto", "userns") else None
    if conf.exists():
        configured = load_server_config(str(config_dir))
        if configured.store and os.path.realpath(configured.store) != os.path.realpath(store):
            raise ByteBackError(f"{conf} names the store {configured.store}, not {store}; fix one of them")
        if args.receiver != "auto" and args.receiver != configured.receiver:
            raise ByteBackError(f"{conf} says receiver = {configured.receiver}, not {args.receiver}; "
                                "edit it (it decides for hosts set up from now on)")
        receiver = configured.receiver
        done.append(f"unchanged  {conf}")
    else:
        if args.receiver == "userns" and problem:
            raise ByteBackError(f"--receiver userns, but {problem}; fix that, or use --receiver fakesuper")
        receiver = "userns" if args.receiver == "auto" and not problem else \
            ("fakesuper" if args.receiver == "auto" else args.receiver)
        _install_file(conf, _server_conf_example(str(store), receiver).encode(), 0o644, done)
    sudoers_name = "byteback" if args.user == "byteback" else f"byteback-{args.user}"

    def visudo_check(path: Path) -> None:
        runner.run(["visudo", "-cf", str(path)], destructive=False)

    _install_file(Path("/etc/sudoers.d") / sudoers_name,
                  _sudoers_text(args.user, install, config_args).encode(), 0o440, done, visudo_check)
    for host in open_store(store, runner).hosts():      # an older byteback's lines, brought up to date
        name = host_account_name(args.user, host)
        if host_sudoers_path(name).exists():
            _install_file(host_sudoers_path(name), host_sudoers_text(name, host, install, config_args).encode(),
                          0o440, done, visudo_check)
    prune_job = Job(sudoers_name.replace("byteback", "byteback-prune", 1), "prune",
                    job_argv(install, args.config_dir, "prune", "--if-idle"), hourly=True)
    done += install_job(prune_job, cron_file=Path(args.cron_file or f"/etc/cron.d/{prune_job.name}"),
                        unit_dir=Path(args.unit_dir), systemd=args.systemd)
    for line in done:
        print(line)
    if _nothing_changed(done):
        print("nothing changed: this server was already set up")
    print(_receiver_said(receiver, args.user, problem))
    if fstype != "btrfs":
        print(f"WARNING: {store} is on {fstype}, not btrfs: snapshots are hard-linked trees, which a "
              f"client that escapes its forced command could alter. Put the store on btrfs for "
              "read-only snapshots.")
    atime = atime_warning(str(store), os.statvfs(store).f_flag)
    if atime:
        print(atime)
    print(f"\nStill to do by hand:\n"
          f"  - let {args.user}{' and the host accounts ' + args.user + '-*' if receiver == 'userns' else ''} "
          "log in over ssh (AllowUsers/AllowGroups in sshd_config, if you use them);\n"
          f"    keep PermitUserEnvironment no (the default)\n"
          f"  - to add clients with setup-client, put an administrator's public key (or set a password)\n"
          f"    for {args.user}: {keys} is root's to edit")
    return EXIT_OK


# The original's own state in its store root, and where its prune job lived.
ORIGINAL_STATE_FILES = (".disk_free_history", ".byteback.pruning")
ORIGINAL_PRUNE_RE = re.compile(r"(?:^|[\s/])byteback-prune(?:\s|$)")
CRON_PLACES = ("/etc/crontab", "/etc/cron.d", "/etc/cron.hourly", "/etc/cron.daily",
               "/etc/cron.weekly", "/var/spool/cron/crontabs")


def _system_files(places: Sequence[str], suffix: str = "") -> Iterator[tuple]:
    """(name, lines) of each readable file in places: files, or directories of them."""
    for place in places:
        files = ([os.path.join(place, n) for n in sorted(os.listdir(place)) if n.endswith(suffix)]
                 if os.path.isdir(place) else [place])
        for name in files:
            try:
                with open(name, encoding="utf-8", errors="replace") as f:
                    yield name, f.read(1 << 20).splitlines()
            except OSError:
                continue


def find_prune_jobs(places: Sequence[str] = CRON_PLACES) -> List[str]:
    """'file:line' of every cron entry that runs the original's byteback-prune."""
    return [f"{name}:{n}" for name, lines in _system_files(places)
            if not any(JOB_MARK in line for line in lines)       # our own job: setup-server's
            for n, line in enumerate(lines, 1)
            if ORIGINAL_PRUNE_RE.search(line) and not line.lstrip().startswith("#")]


SSHD_CONFIGS = ("/etc/ssh/sshd_config", "/etc/ssh/sshd_config.d")


def user_environment_settings(places: Sequence[str] = SSHD_CONFIGS) -> List[str]:
    """'file:line' of each sshd setting that lets authorized_keys set environment variables."""
    return [f"{name}:{n}" for name, lines in _system_files(places, ".conf")
            for n, line in enumerate(lines, 1)
            if re.match(r"\s*PermitUserEnvironment\s+(?!no\b)\S", line, re.I)]


def is_original_store(store: Store, keys: Sequence[str]) -> bool:
    """True when the original byteback left something here for adoption to take over."""
    if any((store.root / n).exists() for n in ORIGINAL_STATE_FILES):
        return True
    if any(_is_original_line(l) for l in keys):
        return True
    return any(store.snapshots(h) and not store.history_path(h).exists() for h in store.hosts())


def _is_original_line(line: str) -> bool:
    try:
        return original_key_line(line) is not None
    except ByteBackError:
        return True


def adopt_store(store: Store, owner: tuple, *, dry_run: bool) -> List[str]:
    """Take over the original's hosts: history locked down, each with a baseline.  Lines said."""
    said = []
    did = "would:     " if dry_run else "adopted    "
    for name in sorted(os.listdir(store.root)):
        path = store.root / name
        if (not name.startswith(".") and _is_real_dir(path) and not is_host_name(name)
                and _is_real_dir(path / "current")):
            said.append(f"skipped    {path}: {name!r} is not a host name byteback accepts; rename it")
    for host in store.hosts():
        host_dir = store.host_dir(host)
        if not store.snapshots(host) and not _is_real_dir(store.current(host)):
            continue
        st = os.lstat(host_dir)
        if st.st_uid == 0 and stat.S_IMODE(st.st_mode) == HOST_DIR_MODE and _is_host_account_group(st.st_gid, host_dir):
            continue        # a host of its own account (section 8c): root set it up so
        if (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) != (0, owner[1], HOST_DIR_MODE):
            # Its owner could rename snapshots away (DESIGN 3).
            if not dry_run:
                os.chown(host_dir, 0, owner[1])
                os.chmod(host_dir, HOST_DIR_MODE)
            said.append(f"{did}{host_dir}: owner 0:{owner[1]}, mode {HOST_DIR_MODE:o}")
        # Listed again now that the user can no longer swap a snapshot for a link.
        snaps = store.snapshots(host)
        locked = [snap.name for snap in snaps if store.lock_down(snap, dry_run)]
        if locked:
            said.append(f"{did}{len(locked)} snapshots of host {host}: root-owned and read-only")
        if snaps and not store.history_path(host).exists():
            entry = store.baseline_entry(snaps[-1])
            if not dry_run:
                store.write_history(host, [entry])
            said.append(f"{did}history of host {host}: its newest snapshot {snaps[-1].name} is the "
                        "baseline the next backup is measured from")
    for name in ORIGINAL_STATE_FILES:
        path = store.root / name
        if os.path.lexists(path):
            if not dry_run and _is_real_dir(path):
                shutil.rmtree(path)         # fd-based: never follows a link planted inside
            elif not dry_run:
                os.unlink(path)
            said.append(f"{did}removed {path}: the original prune's state (byteback keeps its own "
                        f"in {store.state_dir})")
    return said


def _adopt_original(store: Store, owner: tuple, keys: Path, program: str, config_args: Sequence[str],
                    *, dry_run: bool) -> List[str]:
    """setup-server's adoption of an original byteback store; the lines it says."""
    lines = read_key_lines(keys)
    if not is_original_store(store, lines):
        return []
    print(f"{store.root} holds the original byteback's backups: "
          f"{'this would adopt them' if dry_run else 'adopting them'}, keeping every snapshot")
    said = adopt_store(store, owner, dry_run=dry_run)
    new_lines, converted = adopted_key_lines(lines, program, config_args)
    if converted and not dry_run:
        write_file_atomically(keys, "\n".join(new_lines) + "\n", mode=0o644)
    said += [("would:     " if dry_run else "") + line for line in converted]
    for n, line in enumerate(new_lines, 1):
        if line.strip() and not line.lstrip().startswith("#") and _authorized_host(line) is None:
            # The original let its backup user write this file: any key here may be one it planted.
            print(f"WARNING: {keys}:{n} lets a key log in without byteback's forced command; keep it "
                  "only if it is an administrator's own")
    for where in user_environment_settings():
        # The original needed it for environment="BYTEBACK_HOST=..."; ours do not.
        print(f"WARNING: {where} permits user environments (the original needed it): set "
              "'PermitUserEnvironment no' and reload sshd")
    for job in find_prune_jobs():
        # Not ours to edit; but two pruners on one store would each delete by
        # their own rules, and the original's reads a state byteback removes.
        print(f"WARNING: {job} runs the original's byteback-prune: remove that job; byteback "
              "prunes after every snapshot and from its own hourly job, which setup-server installs")
    return said


def _preview_setup_server(store: Path, user: str, install: str, config_args: Sequence[str]) -> int:
    """setup-server --dry-run: what adopting this store would do; nothing is changed."""
    import pwd
    if not store.is_dir():
        print(f"would:     create {store}; there is nothing to adopt")
        return EXIT_OK
    try:
        account = pwd.getpwnam(user)
        owner = (account.pw_uid, account.pw_gid)
    except KeyError:
        print(f"would:     create user {user}")
        owner = (0, 0)
    said = _adopt_original(open_store(store, Runner(dry_run=True)), owner,
                           store / ".ssh" / "authorized_keys", install, config_args, dry_run=True)
    for line in said:
        print(line)
    print("dry run: nothing changed" + ("" if said else "; there is nothing of the original byteback to adopt"))
    return EXIT_OK


def atime_warning(store: str, mount_flags: int) -> Optional[str]:
    """What setup-server says of a store mounted without noatime or nodiratime (statvfs f_flag)."""
    if mount_flags & (os.ST_NOATIME | os.ST_NODIRATIME):
        return None
    # Measured on the receive benchmark's tree (30,000 files in 300 directories,
    # relatime): the first no-change backup after a full one cost 8.5 MiB, all
    # of it directories' access times, the next ones 0.1 MiB.  relatime writes
    # an access time again once it is a day old: a nightly backup paid it again,
    # until each snapshot gave current's directories FS_NOATIME_FL
    # (keep_directories_timeless); what is left is the files rsync reads.
    return (f"NOTE: {store} is mounted without noatime. After each snapshot byteback marks the "
            "directories of a host's current no-access-time (chattr +A), so rsync's reading of "
            "them at every backup writes nothing; the files rsync reads still get an access time, "
            "and btrfs copies that bit of metadata away from the snapshots. Mounting the store "
            "with noatime in /etc/fstab spares it.")


def _receiver_said(receiver: str, user: str, problem: Optional[str]) -> str:
    """setup-server's word on how new hosts' owners are kept (pure)."""
    if receiver == "userns":
        said = (f"receiver   userns: each new host gets an account of its own ({user}-<host>) whose rsync "
                f"keeps owners for real as root of a user namespace over the host's own {HOST_ID_COUNT} ids "
                "(containers' subuids too); no "
                "host's account can read or write another host's backups")
        # server.conf chose userns before; this machine may no longer allow it
        return said + (f"\nWARNING: server.conf says receiver = userns, but {problem}: the hosts set up so "
                       "cannot back up, and setup-host refuses new ones, until that is fixed (or set "
                       "receiver = fakesuper for new hosts)" if problem else "")
    return ("receiver   fakesuper" + (f" ({problem})" if problem else "") + f": the shared user {user} "
            "keeps every host's owners in xattrs (--fake-super), and a shell as it could read and rewrite "
            "any host's current; where the kernel and the uidmap package allow, set receiver = userns "
            "in server.conf for the hosts set up from then on")


def _server_conf_example(store: str, receiver: str = "fakesuper") -> str:
    lines = ["# byteback server settings; each commented line shows the default.", "[server]",
             f"store = {store}", f"receiver = {receiver}"]
    for name, opt in SERVER_OPTIONS.items():
        if name not in ("store", "receiver"):
            lines.append(f"# {opt.help}\n#{name} = {opt.default}")
    return "\n".join(lines) + "\n"


# === 9. Client: what a backup sends (excludes, rsync's command line, hooks, retries) ===

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
JUNK_DIRS = ("/tmp", "/var/tmp", "/var/cache/apt/archives", "/var/backups/localhost", "/lost+found",
             "/var/lib/php5")     # the original's: PHP 5's session files
JUNK_FILES = ("/swap.file", "/swapfile", "/swap.img", "/swap.filkeye")


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
            patterns.append(exclude_pattern(path, contents_only=path not in exact))
    return patterns


def rsync_escape(path: str) -> str:
    """Escape rsync's wildcard characters so a pattern matches only this path."""
    return re.sub(r"([*?\[\\])", r"\\\1", path)


def exclude_pattern(path: str, contents_only: bool) -> str:
    """An rsync exclude for exactly this path (or, contents_only, what is in it).

    rsync reads backslashes as escapes only in patterns with a wildcard, so a
    plain path is left as it is and one with a wildcard is escaped whole.
    """
    if contents_only:
        return rsync_escape(path) + "/*"
    return rsync_escape(path) if re.search(r"[*?\[]", path) else path


def exclude_lines(text: str) -> List[str]:
    """The patterns of an excludes file, read as rsync --exclude-from read it for the original:
    each line verbatim but for its newline (spaces are part of a name), except empty
    lines and lines that start with '#' or ';'."""
    return [line for line in text.split("\n") if line and line[0] not in "#;"]


def split_rsync_flags(text: str, source: str = "rsync_flags") -> List[str]:
    """rsync_flags' arguments.  The original passed each line as one argument, so
    '--exclude=/srv/My Files' stays whole.  A line that holds several options (its
    own comment says they may share a line) is split shell-style, quotes honoured,
    when every word it splits into is an option: '-z --acls' is two."""
    flags = []
    for number, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        try:
            words = shlex.split(line)
        except ValueError as e:
            raise ByteBackError(f"{source} line {number}: {e}; fix its quoting") from None
        flags += words if all(w.startswith("-") for w in words) else [line]
    return flags


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


def client_target(args: argparse.Namespace) -> tuple:
    """(destination, host) for backup and restore: options over the config files."""
    text = args.destination or read_setting(args.config_dir, "destination")
    if not text:
        raise UsageError(f"no destination: give --destination (a local path, or user@host:) "
                         f"or write one into {args.config_dir}/destination (setup-client does)")
    port = getattr(args, "port", None) or read_setting(args.config_dir, "port", None, _port)
    return parse_destination(text, port), check_host_name(args.host or default_host_name())


def resolve_backup_plan(args: argparse.Namespace) -> BackupPlan:
    """Command-line options over the config files over the defaults."""
    config_dir = args.config_dir
    destination, host = client_target(args)
    sources = [os.path.abspath(os.path.expanduser(s)).rstrip("/") or "/" for s in (args.source or ["/"])]
    for source in sources:
        if not os.path.lexists(source):
            raise ByteBackError(f"source {source} does not exist; check --source")
        if not os.access(source, os.R_OK):
            raise ByteBackError(f"source {source} cannot be read by this user; run as root or pick "
                                "another --source")
    excludes = exclude_lines(read_setting_text(config_dir, "excludes")) + list(args.exclude or [])
    filter_file = Path(config_dir) / "rsync_filter"
    extra_flags = split_rsync_flags(read_setting_text(config_dir, "rsync_flags"), f"{config_dir}/rsync_flags")
    io_timeout = args.io_timeout or read_setting(config_dir, "io_timeout", 300, _positive_int)
    return BackupPlan(destination, host, sources, excludes,
                      str(filter_file) if filter_file.is_file() else None, extra_flags,
                      int(io_timeout), args.retry_number, args.retry_delay, config_dir)


def build_rsync_argv(plan: BackupPlan, target: str, *, backend_options: Sequence[str] = (),
                     transport: Sequence[str] = (),
                     auto_excludes: Sequence[str] = (), fake_super: bool = False,
                     progress: bool = False, dry_run: bool = False) -> List[str]:
    """The client's rsync command line (pure).

    NOTE: the server's receive allow-list must accept every option sent here.
    """
    argv = ["rsync", "--archive", "--hard-links", "--xattrs", "--numeric-ids",
            "--delete-excluded", "--delete-during", "--relative", "--partial",
            # Compare mtimes to the nanosecond: by default a file rewritten at
            # the same size within the second it was backed up is never sent.
            "--modify-window=-1", f"--timeout={plan.io_timeout}", "--stats"]
    argv += list(backend_options) + list(transport)
    if fake_super:
        # Keep owners and modes in xattrs without root.  On a local copy plain
        # --fake-super would also make the *sender* believe a source file's own
        # user.rsync.%stat xattr; -M gives it to the receiving side alone.
        argv.append("-M--fake-super")
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


HOOK_NAME_RE = re.compile(r"[A-Za-z0-9_-]+\Z")


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
        # Debian run-parts' rule, which ran the original's hooks: only names of
        # letters, digits, '_' and '-' (so '10-hook.sh' and 'x.dpkg-old' are
        # skipped), executable regular files, in C-locale name order.
        if not HOOK_NAME_RE.match(name) or not path.is_file() or not os.access(path, os.X_OK):
            if not name.startswith("."):
                log.info("skipping %s: run-parts would not run it", path)
            continue
        log.info("running %s hook %s", phase, path)
        try:
            rc = Runner().run([str(path)], check=False, capture=False,
                              env={**os.environ, **(env or {})}).returncode
        except OSError as e:
            raise ByteBackError(f"{phase} hook {path} could not run: {e.strerror}") from None
        if rc != 0:
            raise ByteBackError(f"{phase} hook {path} failed with exit code {rc}"
                                + ("; the backup was not started" if phase == "pre-backup" else ""))


# rsync's own line for each file a user-namespace receiver could not keep
# (NotKept, section 6c): a device node it may not make, an owner or group it
# may not give (the id is outside the namespace's map).  rsync escapes
# unprintable bytes of the name itself (\#ooo), so one file is one line.
NOT_KEPT_RE = re.compile(r'rsync: \[(?:generator|receiver)\] (?:(mknod)|chown|chgrp) "(.*)" failed: '
                         r'(?(1)Operation not permitted \(1\)|Invalid argument \(22\))')
# Lines of rsync's that say something else went wrong, which a backup must not pass over.
RSYNC_ERROR_RE = re.compile(r"rsync: |ERROR: |IO error encountered")


class NotKeptLines:
    """Reads rsync's output line by line for what the receiver could not keep (NOT_KEPT_RE),
    and for any other error line, however long the output runs."""

    def __init__(self, host: str):
        self.host = host
        self.clear()

    def clear(self) -> None:
        self.devices = self.owners = 0
        self.examples: List[str] = []
        self.other_error: Optional[str] = None
        self._partial = b""

    def feed(self, chunk: bytes) -> None:
        lines = (self._partial + chunk).split(b"\n")
        self._partial = lines.pop()[-65536:]
        for line in lines:
            self.line(line.decode("utf-8", "replace").rstrip("\r"))

    def line(self, text: str) -> None:
        m = NOT_KEPT_RE.match(text)
        if m is None:
            if self.other_error is None and RSYNC_ERROR_RE.match(text):
                self.other_error = text
            return
        if m.group(1):
            self.devices += 1
        else:
            self.owners += 1
        if len(self.examples) < NOT_KEPT_EXAMPLES:
            # The receiver names the server's path: the client's own begins after <host>/current.
            name = m.group(2)
            inside = name.find(f"/{self.host}/current/")
            name = name[inside + len(self.host) + 9:] if inside >= 0 else name
            self.examples.append(printable(name)[:NOT_KEPT_NAME_MAX])

    def result(self) -> NotKept:
        return NotKept(min(self.devices, NOT_KEPT_COUNT_MAX), min(self.owners, NOT_KEPT_COUNT_MAX),
                       tuple(self.examples))


def run_rsync(argv: Sequence[str], *, show: bool, lines: Optional[NotKeptLines] = None) -> tuple:
    """Run rsync, passing its output through when show; return (exit code, output tail).

    lines, when given, reads every line of the output, not only the tail."""
    proc = Runner().start(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    tail = b""
    while True:
        chunk = os.read(proc.stdout.fileno(), 65536)
        if not chunk:
            break
        if show:
            sys.stdout.buffer.write(chunk)
            sys.stdout.buffer.flush()
        if lines is not None:
            lines.feed(chunk)
        tail = (tail + chunk)[-65536:]
    proc.stdout.close()
    if lines is not None:
        lines.feed(b"\n")
    return proc.wait(), tail.decode("utf-8", "replace")


def parse_rsync_stats(output: str) -> Optional[int]:
    """'Total bytes sent: 1,234' from rsync --stats output, or None."""
    m = re.search(r"^Total bytes sent: ([\d,.]+)", output, re.M)
    return int(re.sub(r"[,.]", "", m.group(1))) if m else None


def rsync_with_retries(argv: Sequence[str], *, retries: int, delay: float, show: bool,
                       sleep: Callable[[float], None], before_try: Optional[Callable] = None,
                       not_kept: Optional[NotKeptLines] = None) -> tuple:
    """Run rsync, again after `delay` on network-class failures; return (exit code, output).

    before_try runs before each try (SshSession.ensure: a cut connection is made again).
    not_kept, when given, holds what the last try's receiver could not keep: a
    transfer whose only errors are those is done (exit 23), and the caller says so.
    """
    not_kept = not_kept or NotKeptLines("")
    for attempt in range(1, retries + 1):
        if before_try:
            before_try()
        not_kept.clear()
        rc, output = run_rsync(argv, show=show, lines=not_kept)
        if rc in RSYNC_OK_CODES:
            if rc == 24:
                log.info("some files vanished while they were copied (rsync exit 24): normal on a live system")
            return rc, output
        meaning = RSYNC_EXIT_MEANINGS.get(rc, "unknown error")
        last_lines = " | ".join(l for l in output.strip().splitlines()[-3:] if l.strip())
        # rsync says 11 (file I/O) for a full disc too; trying again in ten
        # minutes would not help, since running out of space never prunes.
        full = re.search(r"^.*(?:No space left on device|Disk quota exceeded).*$", output, re.M)
        if full:
            raise ByteBackError(f"the destination is full ({full.group(0).strip()}); nothing was "
                                "snapshotted. Free space there (a server prunes by itself after each "
                                "snapshot: see 'byteback.pyz prune --list') or exclude large files, "
                                "then back up again")
        if rc == 23 and not_kept.result().total and not_kept.other_error is None:
            # Device nodes or owners a user-namespace receiver cannot keep (section
            # 8c): common state of real servers (containers' trees), which failing
            # the backup every night would not change.  The rest is all there.
            return rc, output
        if "byteback: refused:" in output:
            # The server's guard said no: asking again in ten minutes changes nothing.
            raise ByteBackError(f"the server refused the transfer: {last_lines}")
        if rc in RSYNC_RETRY_CODES and attempt < retries:
            log.warning("rsync exit %d (%s); trying again in %s (try %d of %d)", rc, meaning,
                        format_duration(delay), attempt + 1, retries)
            sleep(delay)
            continue
        if not_kept.other_error:
            last_lines = f"{not_kept.other_error} | {last_lines}"
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


# === 10. Databases: consistent copies of running MariaDB/MySQL and PostgreSQL ===

# A database's files copied while it runs do not restore (measured: InnoDB
# refuses to start, PostgreSQL starts with rows silently missing).  So
# `backup` finds running servers in /proc and makes a consistent copy of
# each, which the rsync sends AT THE DATADIR'S OWN PATH: the copy is
# bind-mounted over the datadir in a private mount namespace that only this
# backup (and its rsync) sees, so the server, the receive guard and the rsync
# command line are unchanged, and one rsync sends everything.  Methods, best
# first: a read-only btrfs snapshot (MariaDB/MySQL under its backup lock,
# PostgreSQL needing none: the snapshot is crash-consistent), then the
# server's own hot-backup tool (mariabackup, pg_basebackup), then (MariaDB
# only) a dump beside the datadir.  When every method fails the files are
# still backed up as they are and the backup is marked WARNING.
# Only the servers' own command-line clients are used (stdlib only); a lock
# that must stay held is one client process kept open on a pipe (SqlSession).

DATABASES_FILE = "databases"             # <config-dir>/databases: optional settings
DATABASES_RESULT = "databases.json"      # <state-dir>/: the last phase's result (travels in the backup)
DB_SNAPSHOT_PREFIX = ".byteback-db-snapshot-"   # beside the datadir's subvolume, while a backup runs
DUMP_SUFFIX = ".byteback-dump.sql"       # <datadir>.byteback-dump.sql, when a dump is the only copy
MYSQL_SERVERS = {"mariadbd": "mariadb", "mysqld": "mysql"}
POSTGRES_SERVERS = ("postgres", "postmaster")
BTRFS_SUBVOLUME_INO = 256                # the root directory of every btrfs subvolume
# Files a copy of a PostgreSQL datadir must not bring back: a stale
# postmaster.pid naming a live process stops a restored server from starting.
POSTGRES_LEAVE_OUT = ("postmaster.pid", "postmaster.opts")
SQL_TIMEOUT = 60.0                       # any one statement outside the lock

METHODS = {"mariadb": ("snapshot", "mariabackup", "dump"),
           "mysql": ("snapshot", "mariabackup", "dump"),
           "postgresql": ("snapshot", "basebackup")}


def _method_list(text: str) -> tuple:
    words = tuple(w for w in re.split(r"[\s,]+", text.strip().lower()) if w)
    known = {m for ms in METHODS.values() for m in ms} | {"auto", "off"}
    bad = [w for w in words if w not in known]
    if bad or not words:
        raise ValueError(f"{text!r}: give auto, off, or methods in order of preference from "
                         f"{', '.join(sorted(known - {'auto', 'off'}))}")
    return words


def _yes_no(text: str) -> bool:
    if text.lower() in ("yes", "true", "on", "1"):
        return True
    if text.lower() in ("no", "false", "off", "0"):
        return False
    raise ValueError(f"{text!r} is not yes or no")


# NOTE: README.md's "Databases" section documents these keys; keep them in step.
DATABASE_OPTIONS: Dict[str, Option] = {
    "enabled": Option("yes", _yes_no, "no: back database files up as they are, like any file"),
    "mariadb_method": Option("auto", _method_list, "auto, off, or snapshot/mariabackup/dump in order"),
    "postgresql_method": Option("auto", _method_list, "auto, off, or snapshot/basebackup in order"),
    "mariadb_defaults_file": Option("", _absolute_path,
                                    "a my.cnf with the credentials (default: root over the socket)"),
    "lock_wait_timeout": Option("1", _positive_int,
                                "seconds the backup lock may wait behind a long write (writers wait too)"),
    "lock_tries": Option("3", _positive_int, "tries at the backup lock before giving up"),
    "copy_dir": Option("/var/lib/byteback/database-copies", _absolute_path,
                       "where mariabackup and pg_basebackup copies are made (needs the space)"),
}


class DatabaseConfig(NamedTuple):
    """The databases file's settings, defaults filled in."""
    enabled: bool = True
    mariadb_method: tuple = ("auto",)
    postgresql_method: tuple = ("auto",)
    mariadb_defaults_file: str = ""
    lock_wait_timeout: int = 1
    lock_tries: int = 3
    copy_dir: str = "/var/lib/byteback/database-copies"


def parse_database_config(text: str, source: str = DATABASES_FILE) -> DatabaseConfig:
    """'key = value' lines ('#' comments) of DATABASE_OPTIONS; an unknown key is an error."""
    values = {}
    for number, line in _setting_lines(text):
        key, sep, raw = line.partition("=")
        key = key.strip().lower()
        if not sep:
            raise ByteBackError(f"{source} line {number}: not a 'key = value' line")
        values[key] = convert_option(DATABASE_OPTIONS, key, raw, f"{source} line {number}")
    return DatabaseConfig(**values)


def load_database_config(config_dir: str) -> DatabaseConfig:
    """Read <config_dir>/databases, or the defaults when there is none."""
    path = Path(config_dir) / DATABASES_FILE
    return parse_database_config(read_config_file(path), str(path))


class Database(NamedTuple):
    """A running database server, as found in /proc."""
    kind: str                 # "mariadb", "mysql" or "postgresql"
    pid: int
    datadir: str              # as the process names it (a server's answer may refine it)
    socket: str               # MariaDB/MySQL: the socket file; PostgreSQL: the socket directory
    port: Optional[int]       # PostgreSQL: names the socket file in the socket directory
    owner: str                # the user the server runs as: PostgreSQL's peer authentication
    program: str = ""         # the server's executable: its own version's tools are beside it


class DatabaseResult(NamedTuple):
    """What the database phase did for one server (JSON for status and the snapshot)."""
    kind: str
    datadir: str
    method: str               # snapshot, mariabackup, basebackup, dump, or "none" (copied as it is)
    seconds: float
    warning: str = ""
    lock_seconds: float = 0.0  # how long writers were held (the snapshot under the backup lock)


# --- 10b. Databases, pure parts: /proc contents, versions, choices -----------

def parse_proc_cmdline(raw: bytes) -> List[str]:
    """/proc/PID/cmdline (NUL-separated) -> argv."""
    words = raw.split(b"\0")
    if words[-1] == b"":
        words.pop()      # the NUL that ends the last word (and the empty cmdline of a kernel thread)
    return [w.decode("utf-8", "surrogateescape") for w in words]


def _option_value(argv: Sequence[str], long_names: Sequence[str], short: str = "") -> Optional[str]:
    """The last value of --name=V / --name V / -sV / -s V in argv (MariaDB reads '_' as '-')."""
    value = None
    words = list(argv[1:])
    for i, word in enumerate(words):
        name, eq, rest = word.partition("=")
        name = name.replace("_", "-")
        nxt = words[i + 1] if i + 1 < len(words) else None
        if name in long_names:
            value = rest if eq else nxt
        elif short and word.startswith(short) and not word.startswith("--"):
            value = word[len(short):] or nxt
    return value


def mysqld_options(argv: Sequence[str]) -> Dict[str, Optional[str]]:
    """The datadir and socket a mariadbd/mysqld command line names (None: from its config)."""
    return {"datadir": _option_value(argv, ("--datadir",), "-h"),
            "socket": _option_value(argv, ("--socket",))}


def postgres_datadir(argv: Sequence[str], environ: Dict[str, str]) -> Optional[str]:
    """The -D directory of a postgres command line, else its PGDATA."""
    return _option_value(argv, ("--datadir",), "-D") or environ.get("PGDATA") or None


def parse_environ(raw: bytes) -> Dict[str, str]:
    """/proc/PID/environ -> dict."""
    pairs = (w.decode("utf-8", "surrogateescape").partition("=") for w in raw.split(b"\0") if b"=" in w)
    return {k: v for k, _, v in pairs}


def parse_postmaster_pid(text: str) -> tuple:
    """postmaster.pid -> (pid, datadir, port, first socket directory); ValueError if garbled.

    Its lines (PostgreSQL's pidfile.h): pid, datadir, start time, port, socket
    directory, listen address, shared memory key, status.
    """
    lines = text.splitlines()
    if len(lines) < 5:
        raise ValueError("postmaster.pid has fewer than 5 lines")
    return int(lines[0]), lines[1], int(lines[3]), lines[4].split(",")[0].strip()


def parse_unix_sockets(text: str, inodes: Iterable[int]) -> List[str]:
    """Paths of the listening unix sockets among inodes, from /proc/net/unix text."""
    wanted, paths = set(inodes), []
    for line in text.splitlines()[1:]:
        fields = line.split()
        # Num RefCount Protocol Flags Type St Inode Path; flags 00010000 = listening
        if len(fields) >= 8 and fields[7].startswith("/") and int(fields[6]) in wanted \
                and int(fields[3], 16) & 0x10000:
            paths.append(fields[7])
    return paths


def parse_mysql_version(text: str) -> tuple:
    """'10.11.19-MariaDB-0+deb12u1' -> (True, (10, 11, 19)); MySQL '8.0.36' -> (False, (8, 0, 36))."""
    m = re.match(r"(\d+)\.(\d+)\.(\d+)", text.strip())
    if not m:
        raise ValueError(f"{text!r} is not a server version")
    return "mariadb" in text.lower(), tuple(int(g) for g in m.groups())


def backup_lock_statements(version: str, timeout: int) -> tuple:
    """(lock statements, unlock statements) that stop commits for a snapshot.

    MariaDB >= 10.4 has BACKUP STAGE: BLOCK_COMMIT holds only commits (and
    non-transactional writes), measured 23 ms of stalled writers around a
    snapshot.  Older MariaDB and MySQL take FLUSH TABLES WITH READ LOCK.  Both
    wait at most `timeout` seconds behind a long write instead of the server's
    default of a day, during which every writer queues behind them.
    """
    is_mariadb, number = parse_mysql_version(version)
    setup = f"SET SESSION lock_wait_timeout = {int(timeout)}"
    if is_mariadb and number >= (10, 4, 0):
        return (setup, "BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"), ("BACKUP STAGE END",)
    return (setup, "FLUSH TABLES WITH READ LOCK"), ("UNLOCK TABLES",)


def choose_methods(kind: str, configured: Sequence[str], *, on_one_subvolume: bool,
                   have: Callable[[str], bool]) -> List[str]:
    """The methods to try for one server, best first (pure: `have` says which tools exist).

    'auto' is every method this kind has, in METHODS' order, skipping a
    snapshot where the datadir is not in one btrfs subvolume and a tool that
    is not installed; a configured list is taken as it is (an impossible
    method then fails with its reason, so the WARNING says why).
    """
    if "off" in configured:
        return []
    if "auto" not in configured:
        return [m for m in configured if m in METHODS[kind]]
    needs = {"mariabackup": "mariabackup", "basebackup": "pg_basebackup",
             "dump": "mariadb-dump" if kind == "mariadb" else "mysqldump"}
    return [m for m in METHODS[kind]
            if (m != "snapshot" or on_one_subvolume) and (m not in needs or have(needs[m]))]


def paths_outside(datadir: str, paths: Iterable[str]) -> List[str]:
    """The paths (relative ones are taken from datadir) that are not inside datadir."""
    base = os.path.normpath(datadir)
    return [p for p in paths
            if not _is_within(os.path.normpath(os.path.join(base, p)), base)]


def snapshot_place(datadir: str, subvolume: str, mount_points: Iterable[str]) -> Optional[str]:
    """Where the snapshot of `subvolume` (which holds datadir) goes, or None if nowhere fits.

    Beside the subvolume when its parent is on the same mount (a snapshot must
    stay on its filesystem), else inside it -- never inside the datadir, where
    MariaDB would take the directory for a database.
    """
    name = DB_SNAPSHOT_PREFIX + path_tag(datadir)
    if subvolume != "/" and subvolume not in set(mount_points):
        return os.path.join(os.path.dirname(subvolume), name)
    if os.path.normpath(datadir) == os.path.normpath(subvolume):
        return None
    return os.path.join(subvolume, name)


def path_tag(path: str) -> str:
    """A short stable name for a path: the datadir's own name and 8 hex digits of its hash."""
    import hashlib
    digest = hashlib.sha256(os.path.normpath(path).encode("utf-8", "surrogateescape")).hexdigest()[:8]
    base = re.sub(r"[^A-Za-z0-9._-]", "_", os.path.basename(os.path.normpath(path))) or "root"
    return f"{base}-{digest}"


def databases_in_sources(found: Sequence[Database], sources: Sequence[str]) -> List[Database]:
    """Only the servers whose datadir this backup copies at all."""
    return [d for d in found if any(_is_within(d.datadir, s) for s in sources)]


def database_warnings(results: Iterable[dict]) -> List[str]:
    """The WARNING lines of a phase's results, for status (printable characters only)."""
    return [re.sub(r"[^\x20-\x7e]", "?", f"{r.get('kind')} {r.get('datadir')}: {r.get('warning')}")[:500]
            for r in results if isinstance(r, dict) and r.get("warning")]


# Where a client running as root keeps DATABASES_RESULT, as a backup of / holds it.
SNAPSHOT_DATABASES_RESULT = "var/lib/byteback/" + DATABASES_RESULT


def snapshot_database_warnings(snapshot: str) -> List[str]:
    """The database warnings a snapshot's client recorded (server side: information, never trusted).

    Read only through real directories, from a regular file of at most 64 KiB.
    """
    path = os.path.join(snapshot, SNAPSHOT_DATABASES_RESULT)
    if not _no_links_between(snapshot, SNAPSHOT_DATABASES_RESULT):
        return []
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK)
    except OSError:
        return []
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode) or st.st_size > 65536:
            return []
        data = json.loads(os.read(fd, 65536).decode("utf-8", "replace"))
    except (OSError, ValueError):
        return []
    finally:
        os.close(fd)
    results = data.get("databases") if isinstance(data, dict) else None
    return database_warnings(results) if isinstance(results, list) else []


# --- 10c. Databases: finding servers (reads /proc) ---------------------------

def _read_proc(pid: int, name: str) -> bytes:
    with open(f"/proc/{pid}/{name}", "rb") as f:
        return f.read()


def _socket_inodes(pid: int) -> List[int]:
    inodes = []
    with contextlib.suppress(OSError):
        for fd in os.listdir(f"/proc/{pid}/fd"):
            with contextlib.suppress(OSError):
                m = re.fullmatch(r"socket:\[(\d+)\]", os.readlink(f"/proc/{pid}/fd/{fd}"))
                if m:
                    inodes.append(int(m.group(1)))
    return inodes


def _uid_of(user: str) -> int:
    try:
        return pwd.getpwnam(user).pw_uid
    except KeyError:
        return int(user) if user.isdigit() else -1


def _owner_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


# The accounts database servers run as on Debian (and most systems).  A server
# run by any other account is not one byteback logs in to as root.
DATABASE_ACCOUNTS = ("mysql", "postgres")


def find_databases(any_account: bool = False) -> List[Database]:
    """Running MariaDB/MySQL servers and PostgreSQL postmasters, from /proc.

    Only servers run by root or by DATABASE_ACCOUNTS count: any user, a system
    account such as www-data too, can start a process named mariadbd that names
    a socket of its own, and root would log in there with the defaults file's
    password, then copy and bind whatever that "server" says is its datadir.
    any_account: every server-named process, for checks that only stay clear of them.
    """
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        pid = int(entry)
        try:
            comm = _read_proc(pid, "comm").decode("utf-8", "replace").strip()
            if comm not in MYSQL_SERVERS and comm not in POSTGRES_SERVERS:
                continue
            argv = parse_proc_cmdline(_read_proc(pid, "cmdline"))
            uid = os.stat(f"/proc/{pid}").st_uid
            if uid != 0 and _owner_name(uid) not in DATABASE_ACCOUNTS and not any_account:
                log.info("process %d (%s) runs as %s, not as root or %s: not a server byteback "
                         "copies; its files are copied as they are", pid, comm, _owner_name(uid),
                         " or ".join(DATABASE_ACCOUNTS))
                continue
            if comm in MYSQL_SERVERS:
                options = mysqld_options(argv)
                # mariadbd works in its datadir; its socket is among its open files.
                datadir = options["datadir"] or os.readlink(f"/proc/{pid}/cwd")
                socket_path = options["socket"]
                if not socket_path:
                    with open("/proc/net/unix") as f:
                        paths = parse_unix_sockets(f.read(), _socket_inodes(pid))
                    socket_path = paths[0] if paths else ""
                found.append(Database(MYSQL_SERVERS[comm], pid, os.path.normpath(datadir),
                                      socket_path, None, _owner_name(uid)))
                continue
            # PostgreSQL's children share the postmaster's name: take only the postmaster.
            ppid_comm = _read_proc(int(_read_proc(pid, "stat").rsplit(b")", 1)[1].split()[1]), "comm")
            if ppid_comm.decode("utf-8", "replace").strip() in POSTGRES_SERVERS:
                continue
            where = postgres_datadir(argv, parse_environ(_read_proc(pid, "environ")))
            if not where:
                continue
            where = os.path.join(os.readlink(f"/proc/{pid}/cwd"), where)
            with open(os.path.join(where, "postmaster.pid")) as f:
                owner_pid, datadir, port, socket_dir = parse_postmaster_pid(f.read())
            if owner_pid != pid:
                continue
            found.append(Database("postgresql", pid, os.path.normpath(datadir), socket_dir, port,
                                  _owner_name(uid), os.readlink(f"/proc/{pid}/exe")))
        except (OSError, ValueError, IndexError):
            continue     # gone meanwhile, or not what it seemed: its files are copied as they are
    return sorted(found, key=lambda d: (d.kind, d.datadir))


# --- 10d. Databases: talking to a server through its own client --------------

class SqlSession:
    """One command-line client kept open on a pipe: statements in, their output back.

    After each statement it asks for a marker line, so it knows where that
    statement's output ends without closing the session (which would drop a
    lock held in it).  stderr joins stdout, so errors arrive in order.
    """

    def __init__(self, argv: Sequence[str], marker_sql: str, *, user: Optional[str] = None):
        self.marker = f"byteback-marker-{os.getpid()}-{time.monotonic_ns()}"
        self.lost = False
        self._marker_sql = marker_sql.format(marker=self.marker)
        argv = list(argv)
        if user and user != _owner_name(os.geteuid()):
            argv = ["runuser", "-u", user, "--", *argv]
        self.proc = Runner().start(argv, parsed=True, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT, cwd="/")

    @classmethod
    def mariadb(cls, db: Database, config: DatabaseConfig) -> "SqlSession":
        client = shutil.which("mariadb") or shutil.which("mysql") or "mariadb"
        defaults = [f"--defaults-file={config.mariadb_defaults_file}"] if config.mariadb_defaults_file else []
        # --force: an error must not end the session (and drop the lock) unseen.
        # --skip-reconnect: a session that lost its connection has lost its lock
        # too; reconnecting quietly would let the snapshot run unlocked.
        return cls([client, *defaults, f"--socket={db.socket}", "--user=root", "--batch",
                    "--skip-column-names", "--unbuffered", "--force", "--skip-reconnect"],
                   "SELECT '{marker}';")

    @classmethod
    def postgres(cls, db: Database) -> "SqlSession":
        return cls(["psql", "-X", "-q", "-A", "-t", "-h", db.socket, "-p", str(db.port), "-d", "postgres",
                    "-v", "ON_ERROR_STOP=0"], "SELECT '{marker}';", user=db.owner)

    def query(self, sql: str, timeout: float = SQL_TIMEOUT) -> List[str]:
        """Run one statement; return its output lines.  Raises ByteBackError on an error or a timeout."""
        log.debug("sql: %s", sql)
        if self.lost:
            raise ByteBackError(f"the connection to the database was lost before '{sql}'")
        try:
            self.proc.stdin.write(f"{sql};\n{self._marker_sql}\n".encode())
            self.proc.stdin.flush()
        except OSError:
            raise ByteBackError(f"the database client went away before '{sql}'") from None
        out, deadline = b"", time.monotonic() + timeout
        end = f"{self.marker}\n".encode()
        while not out.endswith(end) and end not in out:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.proc.stdout], [], [], left)[0]:
                raise ByteBackError(f"'{sql}' did not finish within {timeout:.0f}s")
            chunk = os.read(self.proc.stdout.fileno(), 65536)
            out += chunk
            # MariaDB's client errors 2002/2006/2013: the server is gone (and any lock with it).
            gone = re.search(rb"^ERROR 20(?:02|06|13)\b.*$|^psql:.*(?:terminat|connection to server).*$",
                             out, re.M)
            if not chunk or gone:
                self.lost = True
                said = (gone.group(0) if gone else out.strip()[-200:]).decode("utf-8", "replace")
                raise ByteBackError(f"the database went away during '{sql}': {said}")
        lines = out[:out.index(end)].decode("utf-8", "replace").splitlines()
        errors = [l for l in lines if re.match(r"(ERROR\b|psql:.*ERROR:)", l)]
        if errors:
            raise ByteBackError(f"'{sql}' failed: {errors[0]}")
        return [l for l in lines if l.strip() and not l.startswith("-----") and l.strip() != sql]

    def close(self) -> None:
        """End the session (a lock still held in it goes with it)."""
        with contextlib.suppress(OSError):
            self.proc.stdin.close()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()

    def __enter__(self) -> "SqlSession":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


# --- 10e. Databases: the methods ---------------------------------------------

def btrfs_subvolume_of(path: str, mounts: Sequence[tuple]) -> Optional[str]:
    """The root of the btrfs subvolume holding path, or None when path is not on btrfs.

    Every btrfs subvolume has a device number of its own, so the subvolume is
    the topmost ancestor with path's device number.
    """
    path = os.path.realpath(path)
    if filesystem_type(path, mounts) != "btrfs":
        return None
    dev = os.stat(path).st_dev
    while path != "/" and os.stat(os.path.dirname(path)).st_dev == dev:
        path = os.path.dirname(path)
    return path if os.stat(path).st_ino == BTRFS_SUBVOLUME_INO else None


def btrfs_snapshot_readonly(subvolume: str, place: str) -> None:
    """A read-only snapshot of subvolume at place, by the ioctl itself (create_snapshot).

    Not through `btrfs subvolume snapshot`: starting a program while the
    database's writers wait would add its start-up time to their wait.
    """
    log.debug("btrfs snapshot -r %s %s", subvolume, place)
    try:
        create_snapshot(Path(subvolume), Path(os.path.dirname(place)), os.path.basename(place), read_only=True)
    except OSError as e:
        raise ByteBackError(f"cannot snapshot {subvolume} to {place}: {e.strerror}") from None


def _dirs_within(datadir: str, depth: int = 2) -> Iterator[str]:
    """Directories below datadir, `depth` levels deep at most, not following links."""
    level = [datadir]
    for _ in range(depth):
        nxt = []
        for d in level:
            with contextlib.suppress(OSError), os.scandir(d) as it:
                nxt += [e.path for e in it if e.is_dir(follow_symlinks=False)]
        yield from nxt
        level = nxt


def one_subvolume(db: Database, extra_paths: Sequence[str], mounts: Sequence[tuple]) -> Optional[str]:
    """The subvolume holding all of the server's files, or None if they are not in one.

    Extra paths (InnoDB's log and data directories; PostgreSQL's pg_wal and
    tablespaces) must lie inside the datadir, and no subvolume may be nested
    in it: a snapshot leaves a nested subvolume out.
    """
    if paths_outside(db.datadir, [os.path.realpath(os.path.join(db.datadir, p)) for p in extra_paths]):
        return None
    subvolume = btrfs_subvolume_of(db.datadir, mounts)
    if subvolume is None:
        return None
    dev = os.stat(db.datadir).st_dev
    if any(os.stat(d).st_dev != dev for d in _dirs_within(db.datadir)):
        return None
    return subvolume


def _server_tool(db: Database, name: str) -> str:
    """A client program of the server's own version (Debian keeps one per version), else PATH's."""
    beside = os.path.join(os.path.dirname(db.program), name)
    return beside if db.program and os.access(beside, os.X_OK) else name


def _postgres_extra_paths(datadir: str) -> List[str]:
    tablespaces = os.path.join(datadir, "pg_tblspc")
    with contextlib.suppress(OSError):
        return ["pg_wal"] + [os.path.join("pg_tblspc", n) for n in os.listdir(tablespaces)]
    return ["pg_wal"]


def _problem_text(e: Exception) -> str:
    """Why a method failed, and for a refused login what to do about it."""
    text = f"{e.filename}: {e.strerror}" if isinstance(e, OSError) and e.filename else str(e)
    if "Access denied" in text or "authentication failed" in text:
        text += (f"; name a my.cnf with the credentials in {DATABASES_FILE}: "
                 "mariadb_defaults_file = /etc/mysql/debian.cnf")
    return text


class DatabasePhase:
    """The database part of one backup: copies made, where they are bound, what to exclude."""

    def __init__(self, config: DatabaseConfig, state_dir: Path, runner: Runner):
        self.config, self.state_dir, self.runner = config, state_dir, runner
        self.results: List[DatabaseResult] = []
        self.binds: List[tuple] = []          # (copy, datadir, identity): the copy is seen at the datadir
        self.identity: Dict[str, tuple] = {}  # datadir -> (st_dev, st_ino) when its owner was checked
        self.excludes: List[str] = []         # rsync patterns for the main rsync
        self.made: List[str] = []             # snapshots and copies to remove afterwards

    # Records every snapshot and copy before it is made, so a run that is
    # killed leaves a list for the next run to clean up.
    def _remember(self, path: str) -> None:
        self.made.append(path)
        write_json_atomically(self.state_dir / "database-copies.json", self.made)

    def clean_stale(self) -> None:
        """Remove the snapshots and copies a killed run left behind."""
        stale = read_json(self.state_dir / "database-copies.json", [])
        for path in stale if isinstance(stale, list) else []:
            name = os.path.basename(str(path))
            if not (name.startswith(DB_SNAPSHOT_PREFIX) or _is_within(str(path), self.config.copy_dir)
                    or name.endswith(DUMP_SUFFIX)) or not os.path.lexists(path):
                continue
            log.warning("removing %s, left by a backup that did not finish", path)
            self._remove(str(path))
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_dir / "database-copies.json")

    def _remove(self, path: str) -> None:
        try:
            st = os.lstat(path)
            if stat.S_ISDIR(st.st_mode) and st.st_ino == BTRFS_SUBVOLUME_INO \
                    and os.path.basename(path).startswith(DB_SNAPSHOT_PREFIX):
                self.runner.run(["btrfs", "subvolume", "delete", path])
            elif stat.S_ISDIR(st.st_mode):
                shutil.rmtree(path)
            else:
                os.unlink(path)
        except FileNotFoundError:
            pass
        except (OSError, ByteBackError) as e:
            log.warning("could not remove %s: %s; remove it by hand", path, e)

    def copy(self, db: Database) -> DatabaseResult:
        """Make the best consistent copy of one server; on failure, say why (a WARNING)."""
        started = time.monotonic()
        configured = self.config.postgresql_method if db.kind == "postgresql" else self.config.mariadb_method
        if "off" in configured:
            return DatabaseResult(db.kind, db.datadir, "none", 0.0)
        problems, datadir, extra = [], db.datadir, []
        session = None
        try:
            if db.kind != "postgresql":
                session = SqlSession.mariadb(db, self.config)
                row = session.query("SELECT @@version, @@datadir, @@innodb_log_group_home_dir, "
                                    "@@innodb_data_home_dir, @@innodb_undo_directory")[0].split("\t")
                datadir = os.path.normpath(row[1])
                db = db._replace(datadir=datadir)
                extra = [p for p in row[2:] if p and p != "NULL"]
            else:
                extra = _postgres_extra_paths(datadir)
            # What a server says of itself is taken only for a directory its own
            # user owns: a compromised server could otherwise have root snapshot,
            # replace or leave out any directory of the backup.
            # Reached without a symlink, and remembered: the copy is bound later
            # onto this very directory, never onto what its name leads to by then.
            fd = open_dir_no_symlinks(db.datadir)
            try:
                st = os.fstat(fd)
            finally:
                os.close(fd)
            if st.st_uid != _uid_of(db.owner):
                raise ByteBackError(f"{db.datadir} is not owned by {db.owner}, the user the server "
                                    "runs as; not touched")
            self.identity[db.datadir] = (st.st_dev, st.st_ino)
            subvolume = one_subvolume(db, extra, _read_mounts())
            methods = choose_methods(db.kind, configured, on_one_subvolume=subvolume is not None,
                                     have=lambda p: shutil.which(p) is not None)
            if not methods:
                problems.append("no method fits (configured: " + ", ".join(configured) + ")")
            for method in methods:
                try:
                    lock_seconds, warning = getattr(self, f"_by_{method}")(db, session, subvolume,
                                                                           row[0] if session else "")
                except (ByteBackError, OSError) as e:
                    problems.append(f"{method}: {_problem_text(e)}")
                    log.warning("%s %s: %s did not work: %s", db.kind, db.datadir, method, _problem_text(e))
                    continue
                if problems:
                    log.info("%s %s: copied by %s after: %s", db.kind, db.datadir, method, "; ".join(problems))
                return DatabaseResult(db.kind, db.datadir, method, round(time.monotonic() - started, 3),
                                      warning, round(lock_seconds, 3))
        except (ByteBackError, OSError) as e:
            problems.append(_problem_text(e))
        finally:
            if session:
                session.close()
        warning = ("no consistent copy, its files were copied as they are (may not restore): "
                   + "; ".join(problems))
        log.warning("%s %s: %s", db.kind, db.datadir, warning)
        return DatabaseResult(db.kind, db.datadir, "none", round(time.monotonic() - started, 3), warning)

    def _by_snapshot(self, db: Database, session: Optional[SqlSession], subvolume: Optional[str],
                     version: str) -> tuple:
        if subvolume is None:
            raise ByteBackError("the datadir is not one btrfs subvolume")
        place = snapshot_place(db.datadir, subvolume, [p for p, _ in _read_mounts()])
        if place is None:
            raise ByteBackError(f"no place for a snapshot of {subvolume} outside the datadir")
        self._remove(place)          # a stale one by the same name
        self._remember(place)
        lock_seconds = 0.0
        if session is None:
            # PostgreSQL: one atomic snapshot of data and WAL is a crash-consistent copy.
            btrfs_snapshot_readonly(subvolume, place)
        else:
            lock, unlock = backup_lock_statements(version, self.config.lock_wait_timeout)
            # The snapshot writes out the subvolume's dirty data first; do that
            # before the lock, so little is left to write while writers wait.
            sync_filesystem(subvolume)
            for attempt in range(1, self.config.lock_tries + 1):
                try:
                    for sql in lock:
                        held = time.monotonic()      # the last statement is the one that holds writers
                        session.query(sql, timeout=self.config.lock_wait_timeout + SQL_TIMEOUT)
                    break
                except ByteBackError as e:
                    if session.lost:
                        raise
                    for sql in unlock:
                        session.query(sql)
                    if attempt == self.config.lock_tries:
                        raise ByteBackError(f"the backup lock waited {self.config.lock_wait_timeout}s "
                                            f"{attempt} times behind a long-running write; {e}") from None
                    log.info("backup lock: %s; trying again (try %d of %d)", e, attempt + 1,
                             self.config.lock_tries)
                    time.sleep(1)
            try:
                btrfs_snapshot_readonly(subvolume, place)
            finally:
                for sql in unlock:
                    session.query(sql)
                lock_seconds = time.monotonic() - held
        self.binds.append((os.path.join(place, os.path.relpath(db.datadir, subvolume)), db.datadir,
                           self.identity[db.datadir]))
        return lock_seconds, ""

    def _copy_dir(self, db: Database, owner: str) -> str:
        # Traversable, not listable: the copy is made as the server's owner.
        os.makedirs(self.config.copy_dir, mode=0o711, exist_ok=True)
        os.chmod(self.config.copy_dir, 0o711)
        path = os.path.join(self.config.copy_dir, f"{db.kind}-{path_tag(db.datadir)}")
        self._remove(path)
        self._remember(path)
        os.mkdir(path, 0o700)
        pw = pwd.getpwnam(owner)
        os.chown(path, pw.pw_uid, pw.pw_gid)
        return path

    def _by_mariabackup(self, db: Database, session: Optional[SqlSession], subvolume: Optional[str],
                        version: str) -> tuple:
        # As the datadir's owner, never as root: mariabackup reads whatever the
        # datadir's files lead to (a symlinked table may point at /etc/shadow),
        # and what it copies is the owner's to read and, restored, to keep.  It
        # logs in as the account of that name (Debian's MariaDB makes one with
        # unix_socket authentication), unless the defaults file names another.
        target = self._copy_dir(db, db.owner)
        defaults = [f"--defaults-file={self.config.mariadb_defaults_file}"] if self.config.mariadb_defaults_file else []
        login = [] if defaults else [f"--user={db.owner}"]
        as_owner = [] if db.owner == _owner_name(os.geteuid()) else ["runuser", "-u", db.owner, "--"]
        # The server's own my.cnf is read (mariabackup needs its InnoDB settings);
        # the datadir and socket given here are the running server's.
        self.runner.run([*as_owner, "mariabackup", *defaults, "--backup", f"--socket={db.socket}", *login,
                         f"--datadir={db.datadir}", f"--target-dir={target}",
                         f"--ftwrl-wait-timeout={self.config.lock_wait_timeout * self.config.lock_tries}"])
        self.runner.run([*as_owner, "mariabackup", *defaults, "--prepare", f"--target-dir={target}"])
        # A restore is then a plain copy back: the copy has the datadir's owner and mode.
        os.chmod(target, stat.S_IMODE(os.stat(db.datadir).st_mode))
        self.binds.append((target, db.datadir, self.identity[db.datadir]))
        return 0.0, ""

    def _by_basebackup(self, db: Database, session: Optional[SqlSession], subvolume: Optional[str],
                       version: str) -> tuple:
        tablespaces = _postgres_extra_paths(db.datadir)[1:]
        if tablespaces:
            raise ByteBackError("pg_basebackup would write its tablespaces over the live ones "
                                f"({', '.join(tablespaces)}); put the cluster on one btrfs subvolume")
        target = self._copy_dir(db, db.owner)
        argv = [_server_tool(db, "pg_basebackup"), "-h", db.socket, "-p", str(db.port), "-D", target, "-X", "stream",
                "-c", "fast", "--no-password"]
        if db.owner != _owner_name(os.geteuid()):
            argv = ["runuser", "-u", db.owner, "--", *argv]
        self.runner.run(argv)
        os.chmod(target, 0o700)
        self.binds.append((target, db.datadir, self.identity[db.datadir]))
        return 0.0, ""

    def _by_dump(self, db: Database, session: Optional[SqlSession], subvolume: Optional[str],
                 version: str) -> tuple:
        if session is None:
            raise ByteBackError("a dump is made for MariaDB/MySQL only")
        others = session.query(
            "SELECT CONCAT(table_schema, '.', table_name, ' (', engine, ')') FROM information_schema.tables "
            "WHERE engine IS NOT NULL AND engine NOT IN ('InnoDB') AND table_type = 'BASE TABLE' "
            "AND table_schema NOT IN ('mysql', 'information_schema', 'performance_schema', 'sys')")
        path = db.datadir.rstrip("/") + DUMP_SUFFIX
        self._remember(path)
        client = shutil.which("mariadb-dump") or "mysqldump"
        defaults = [f"--defaults-file={self.config.mariadb_defaults_file}"] if self.config.mariadb_defaults_file else []
        # A new file, never one found there: a hard link planted at this name
        # would otherwise have root truncate whatever it points to.
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        with os.fdopen(fd, "w") as out:
            argv = [client, *defaults, f"--socket={db.socket}", "--user=root", "--single-transaction",
                    "--all-databases", "--routines", "--events", "--triggers"]
            log.debug("dump into %s", path)
            self.runner.run(argv, stdout=out)
        # The live files stay out of the backup; the dump is the database's copy.
        self.excludes.append(exclude_pattern(db.datadir, contents_only=True))
        if others:
            return 0.0, (f"dumped to {path}, but these tables are not InnoDB and may be "
                         f"out of step with the rest: {', '.join(others)}")
        return 0.0, ""

    def remove_copies(self) -> None:
        for path in reversed(self.made):
            self._remove(path)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.state_dir / "database-copies.json")


# --- 10f. Databases: restore --database, and the private view the copies are seen in ---

def move_datadir_aside(datadir: str, snapshot: str) -> Optional[str]:
    """Before `restore --database`: refuse while a server runs on datadir, else move it aside.

    The old datadir is kept (renamed, never deleted) until the restored one works.
    """
    # By the directory, not the name: a server started on a symlink to it runs on it too.
    running = [d for d in find_databases(any_account=True)
               if os.path.realpath(d.datadir) == os.path.realpath(datadir)]
    if running:
        raise ByteBackError(f"a {running[0].kind} server (pid {running[0].pid}) runs on {datadir}; "
                            "stop it first (systemctl stop ...), then restore again")
    if not os.path.lexists(datadir):
        return None
    aside = f"{datadir}.before-{snapshot}"
    if os.path.lexists(aside):
        raise ByteBackError(f"{aside} exists already: move it away, then restore again")
    os.rename(datadir, aside)
    print(f"moved {datadir} to {aside}")
    return aside


@contextlib.contextmanager
def private_view(binds: Sequence[tuple]) -> Iterator[None]:
    """Inside: this process (and what it starts) sees each copy at its datadir's path.

    A mount namespace of our own, made private first so nothing propagates
    back: the server and every other process keep seeing the live datadir.
    Each copy is bound onto the directory checked before (identity): a
    datadir its owner swapped for a symlink meanwhile (to /etc, say) is left
    as it is, so the backup never holds the owner's files in another's place.
    """
    if not binds:
        yield
        return
    home = os.open("/proc/self/ns/mnt", os.O_RDONLY | os.O_CLOEXEC)
    cwd = os.getcwd()
    try:
        _libc_call("unshare", CLONE_NEWNS)
        try:
            _libc_call("mount", b"none", b"/", None, MS_REC | MS_PRIVATE, None)
            for copy, datadir, identity in binds:
                try:
                    fd = open_dir_no_symlinks(datadir)
                except OSError as e:
                    log.warning("%s changed since it was copied (%s): its copy is left out", datadir, e.strerror)
                    continue
                try:
                    st = os.fstat(fd)
                    if (st.st_dev, st.st_ino) != identity:
                        log.warning("%s is another directory than the one copied: its copy is left out", datadir)
                        continue
                    # Onto the descriptor's own directory: mount follows /proc's link to it, not a name.
                    _libc_call("mount", os.fsencode(copy), f"/proc/self/fd/{fd}".encode(), None, MS_BIND, None)
                finally:
                    os.close(fd)
                log.info("the backup sees %s at %s", copy, datadir)
            yield
        finally:
            _libc_call("setns", home, CLONE_NEWNS)
            os.chdir(cwd)
    finally:
        os.close(home)


@contextlib.contextmanager
def database_phase(plan: BackupPlan, entry: dict, *, dry_run: bool) -> Iterator[List[str]]:
    """Around the transfer: consistent copies of the running databases, seen at their datadirs.

    Yields the rsync excludes the copies need.  Records the results in
    entry["databases"] and in <state-dir>/databases.json, which the backup
    then carries (status reads it; so can the server, as information only).
    """
    config = load_database_config(plan.config_dir)
    # Never back up a snapshot or a copy of ours, even one whose note is lost.
    always = [DB_SNAPSHOT_PREFIX + "*", exclude_pattern(config.copy_dir, contents_only=False)]
    if not config.enabled or dry_run or os.geteuid() != 0:
        if dry_run and config.enabled and os.geteuid() == 0:
            for db in databases_in_sources(find_databases(), plan.sources):
                log.info("dry-run: would make a consistent copy of %s %s", db.kind, db.datadir)
        yield always
        return
    state_dir = client_state_dir()
    phase = DatabasePhase(config, state_dir, Runner())
    phase.excludes += always
    phase.clean_stale()
    try:
        for db in databases_in_sources(find_databases(), plan.sources):
            result = phase.copy(db)
            phase.results.append(result)
            if db.kind == "postgresql":
                phase.excludes += [exclude_pattern(os.path.join(result.datadir, n), contents_only=False)
                                   for n in POSTGRES_LEAVE_OUT]
        entry["databases"] = [r._asdict() for r in phase.results]
        if phase.results:
            write_json_atomically(state_dir / DATABASES_RESULT,
                                  {"time": now_local().isoformat(), "databases": entry["databases"]})
        with private_view(phase.binds):
            yield phase.excludes
    finally:
        phase.remove_copies()


# === 11. Client commands: backing up, locally or over ssh ====================

def backup_local(plan: BackupPlan, args: argparse.Namespace,
                 not_kept: Optional[NotKeptLines] = None) -> Optional[int]:
    """Back up into a store on this machine: rsync, then the server's own snapshot and prune."""
    runner = Runner()
    # A dry run changes nothing: no store, host or marker is created for it.
    store = open_store(plan.destination.path, runner, create=not args.dry_run)
    config = load_server_config(plan.config_dir)
    refusal = interval_refusal(store.newest_snapshot(plan.host), now_local(), config.min_interval)
    if refusal and not args.dry_run:    # say so before copying anything, not after
        raise ByteBackError(refusal)
    if args.dry_run:
        current = store.current(plan.host)
    else:
        current = store.prepare_host(plan.host)
        resumed = store.dirty_since(plan.host) is not None
        store.mark_dirty(plan.host, now_local())
        store.unshare_current(plan.host, resumed, again=True)     # AnotherPass below
    auto = automatic_excludes(plan.sources, _read_mounts(), [str(store.root)] + _client_config_files(plan))
    backend = store.rsync_options(plan.host) if current.is_dir() else []
    argv = build_rsync_argv(plan, f"{current}/", backend_options=backend,
                            auto_excludes=auto, fake_super=not store.as_root,
                            progress=args.progress, dry_run=args.dry_run)
    show = args.verbose > 0 or args.progress or args.dry_run
    rc, output = rsync_with_retries(argv, retries=plan.retries, delay=plan.retry_delay, show=show,
                                    sleep=args.context.sleep, not_kept=not_kept)
    if args.dry_run:
        return parse_rsync_stats(output)
    try:
        snap = snapshot_and_prune(store, plan.host, config)
    except AnotherPass as e:
        log.info("%s: copying once more", e)
        store.unshare_current(plan.host, resumed=True)
        rc, output = rsync_with_retries(argv, retries=plan.retries, delay=plan.retry_delay, show=show,
                                        sleep=args.context.sleep, not_kept=not_kept)
        snap = snapshot_and_prune(store, plan.host, config)
    log.info("backup of %s complete: snapshot %s", plan.host, store.snapshot_path(snap))
    return parse_rsync_stats(output)


def ssh_argv(config_dir: str, port: Optional[int], *, control: Optional[str] = None,
             master: bool = False, administrator: bool = False) -> List[str]:
    """ssh as byteback runs it, without the login and the command.

    Backups and restores: our key, the pinned host key, no prompts,
    keepalives, and the shared connection at `control` (SshSession) or none.
    administrator: setup-client's one login with the administrator's own
    credentials (agent, key or password), pinning the host key on first sight.
    """
    known_hosts = ["-o", f"UserKnownHostsFile={Path(config_dir) / 'known_hosts'}"]
    if administrator:
        argv = ["ssh", *known_hosts, "-o", "StrictHostKeyChecking=accept-new"]
    else:
        argv = ["ssh", "-i", str(Path(config_dir) / "key"), "-o", "IdentitiesOnly=yes",
                "-o", "BatchMode=yes", *known_hosts,
                "-o", "StrictHostKeyChecking=yes", "-o", "ServerAliveInterval=30",
                "-o", "ServerAliveCountMax=4", "-o", "ConnectTimeout=60",
                # Never a master or socket from the user's ssh_config: only ours.
                "-o", f"ControlMaster={'yes' if master else 'no'}",
                "-o", f"ControlPath={control or 'none'}"]
        if master:
            argv += ["-o", "ControlPersist=no"]
    if port:
        argv += ["-p", str(port)]
    return argv


def rsync_over_ssh(ssh: Sequence[str], again: bool = False, named: bool = False) -> List[str]:
    """The rsync options of a transfer to or from a byteback server over this ssh.

    again: a push that tells the server its client copies once more on 'again:'.
    named: the pass after an 'again:' that sends only the names it listed."""
    words = (f" {AGAIN_WORD}" if again else "") + (f" {NAMED_WORD}" if named else "")
    return ["--rsh", shlex.join(ssh), "--rsync-path", "rsync --fake-super" + words]


def names_under_sources(names: Sequence[bytes], sources: Sequence[str]) -> bool:
    """Whether every name an 'again:' listed (a path below current, which --relative
    makes the client's own path) lies below one of the backup's sources (pure).  A
    server could list any path: the named pass must send nothing the backup would not."""
    return all(any(_is_within(os.fsdecode(b"/" + n), s) for s in sources) for n in names)


def names_to_send(names: Sequence[bytes]) -> Optional[List[bytes]]:
    """Of the names an 'again:' listed (below /), those the named pass sends: each a
    regular file reached through real directories only; one gone since is left out
    (rsync would fail on it; the pass still unshares it).  None, for a whole pass, as
    soon as one is anything else.  rsync's sender follows a symlink on a --files-from
    entry's way, which a whole pass never does, and the names come from current,
    which the shared backup user can write (fakesuper): a name planted below a
    client's symlink would send what it points at, outside the sources."""
    sent = []
    for name in names:
        path = b"/" + name
        parent = os.path.dirname(path)
        try:
            if os.path.realpath(parent) != parent:
                return None
            st = os.lstat(path)
        except FileNotFoundError:
            continue
        except OSError:
            return None
        if not stat.S_ISREG(st.st_mode):
            return None
        sent.append(name)
    return sent


def named_pass_argv(argv: Sequence[str], files_from: str) -> List[str]:
    """A push's rsync command line made to send only the names in files_from (NUL-separated,
    each below /) instead of its sources (pure).  rsync's filters still apply to them."""
    split = list(argv).index("--")
    return [*argv[:split], f"--files-from={files_from}", "--from0", "--", "/", argv[-1]]


PR_SET_PDEATHSIG = 1   # prctl: the signal a child gets when its parent dies


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn after which the kernel sends the child SIGTERM when this process dies."""
    import ctypes
    import signal
    libc = ctypes.CDLL(None, use_errno=True)   # loaded before the fork, not in the child
    return lambda: libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


# Where the original's clients found the server's key: ssh's own defaults.
INHERITED_KNOWN_HOSTS = ("~/.ssh/known_hosts", "/etc/ssh/ssh_known_hosts")


def pin_known_host(config_dir: str, destination: Destination,
                   sources: Sequence[str] = INHERITED_KNOWN_HOSTS) -> Optional[str]:
    """Pin the server's key into <config_dir>/known_hosts from root's, once; the source used.

    byteback trusts only its own known_hosts.  A client of the original
    byteback has none: its ssh trusted root's, so the key found there is the
    one that client has always trusted, and it is copied once, with a word.
    """
    pinned = Path(config_dir) / "known_hosts"
    if os.path.lexists(pinned):
        return None
    name = destination.host if destination.port in (None, 22) else f"[{destination.host}]:{destination.port}"
    for source in sources:
        path = os.path.expanduser(source)
        if not os.path.isfile(path):
            continue
        found = Runner().run(["ssh-keygen", "-F", name, "-f", path], destructive=False, check=False,
                             stderr=subprocess.DEVNULL)
        lines = [l for l in found.stdout.splitlines() if l.strip() and not l.startswith("#")]
        if found.returncode == 0 and lines:
            write_file_atomically(pinned, "\n".join(lines) + "\n", mode=0o644)
            log.warning("pinned the host key of %s from %s into %s (once: byteback trusts only "
                        "that file from now on)", name, path, pinned)
            return path
    return None


class SshSession:
    """One authenticated ssh connection that a backup's rsync and complete share.

    An OpenSSH master (ControlMaster) in a private 0700 directory of this run,
    never persisting: it is this process's child, dies with it, and is closed
    by close().  The other ssh commands are sessions multiplexed over it (the
    server runs its forced command for each as before).  One whose master is
    gone connects by itself, and ensure() starts a new master after a cut.
    """

    def __init__(self, config_dir: str, destination: Destination):
        self.config_dir, self.destination = config_dir, destination
        self.dir: Optional[str] = None
        self.master: Optional[subprocess.Popen] = None

    @property
    def socket(self) -> Optional[str]:
        return os.path.join(self.dir, "master") if self.dir else None

    def argv(self) -> List[str]:
        """ssh for one command over the shared connection (or its own, without one)."""
        return ssh_argv(self.config_dir, self.destination.port, control=self.socket)

    def ensure(self) -> Optional[str]:
        """Have a live master; None when there is one, else ssh's reason why not.

        Only an unreachable server (ssh's exit 255) is reported: an ssh that
        cannot be a master leaves each command to connect by itself.
        """
        if self.master is not None and self.master.poll() is None and os.path.exists(self.socket):
            return None
        self._stop()
        import tempfile
        if self.dir is None:
            # 0700, ours alone; short, as a socket's path must be (108 bytes with ssh's suffix).
            base = tempfile.gettempdir()
            self.dir = tempfile.mkdtemp(prefix="byteback-ssh-", dir=base if len(base) < 64 else "/tmp")
        # A master killed outright leaves its socket behind, and ssh will not
        # replace it (it runs on without multiplexing instead).
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.socket)
        argv = ssh_argv(self.config_dir, self.destination.port, control=self.socket, master=True)
        argv += ["-N", _login(self.destination)]
        errors = tempfile.TemporaryFile(dir=self.dir)
        try:
            self.master = Runner().start(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=errors, preexec_fn=_die_with_parent())
        except ByteBackError:
            errors.close()
            raise
        # ssh listens on the socket only once it has logged in.
        deadline = time.monotonic() + 180
        with errors:
            while not os.path.exists(self.socket):
                rc = self.master.poll()
                if rc is not None or time.monotonic() > deadline:
                    self._stop()
                    errors.seek(0)
                    said = errors.read().decode("utf-8", "replace").strip().splitlines()
                    log.debug("no shared ssh connection (exit %s): %s", rc, " | ".join(said[-3:]))
                    return (said or ["no answer"])[-1] if rc == 255 else None
                time.sleep(0.005)
        return None

    def _stop(self) -> None:
        if self.master is not None:
            if self.master.poll() is None:
                self.master.terminate()
                try:
                    self.master.wait(10)
                except subprocess.TimeoutExpired:
                    self.master.kill()
                    self.master.wait()
            self.master = None

    def close(self) -> None:
        self._stop()
        if self.dir is not None:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = None

    def __enter__(self) -> "SshSession":
        if not self.destination.is_local:
            pin_known_host(self.config_dir, self.destination)
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _login(destination: Destination) -> str:
    host = f"[{destination.host}]" if ":" in destination.host else destination.host
    return f"{destination.user}@{host}" if destination.user else host


def call_server(plan: BackupPlan, verb: str, session: Optional[SshSession] = None) -> subprocess.CompletedProcess:
    """Run one of the forced command's verbs (complete) on the server."""
    ssh = session.argv() if session else ssh_argv(plan.config_dir, plan.destination.port)
    return Runner().run(ssh + [_login(plan.destination), verb], check=False, stdin=subprocess.DEVNULL,
                        errors="replace")


def _server_said(proc: subprocess.CompletedProcess) -> str:
    """The server's last words on stderr, without its 'byteback: ' prefix."""
    lines = [re.sub(r"^byteback: ", "", l) for l in proc.stderr.strip().splitlines()[-2:]]
    return " ".join(lines) or f"exit {proc.returncode}"


def ping_server(plan: BackupPlan, session: SshSession, *, sleep: Callable[[float], None],
                dry_run: bool = False, ping: bool = True) -> bool:
    """Log in (the session's shared connection), and with ping ask whether the server will
    take a snapshot, before any data moves.  Retries while the server cannot be reached.
    Returns whether the server knows AGAIN_WORD: as its pong says (PONG_CAN), or without
    ping, True.

    Without ping only the login: where the server's last push said the minimum
    interval would have passed by now (ping_wanted), which spares a session and
    a start of the server's program each backup (issue 14).  That server
    completes pushes, which is newer than AGAIN_WORD."""
    for attempt in range(1, plan.retries + 1):
        problem = session.ensure()
        proc = subprocess.CompletedProcess([], 255, "", problem) if problem is not None else \
            call_server(plan, "ping", session) if ping else None
        if proc is None:
            return True
        if proc.returncode == 0:
            lines = proc.stdout.strip().splitlines()
            log.info("server: %s", lines[0] if lines else "")
            wait = next((l[len(WAIT_PREFIX):] for l in lines if l.startswith(WAIT_PREFIX)), None)
            if wait and not dry_run:
                raise ByteBackError(f"{wait}; nothing was sent")
            return PONG_CAN in lines
        problem = (proc.stderr.strip().splitlines() or ["no answer"])[-1]
        if proc.returncode == 255 and attempt < plan.retries:
            log.warning("cannot reach %s (%s); trying again in %s (try %d of %d)",
                        _login(plan.destination), problem, format_duration(plan.retry_delay),
                        attempt + 1, plan.retries)
            sleep(plan.retry_delay)
            continue
        if proc.returncode == 255:
            raise ByteBackError(f"cannot reach the server {_login(plan.destination)}: {problem}")
        raise ByteBackError(f"the server {_login(plan.destination)} did not answer ping: {problem}")


# <state-dir>/: when the server (by its destination) said its next snapshot may be taken.
SERVER_HINT_FILE = "server-hint.json"


def ping_wanted(state_dir: Path, where: str, now: float) -> bool:
    """Whether to ping before the push: unless the last complete by this server said the
    minimum interval would have passed by now.  A missing or garbled hint, another
    server's, or an older server's (which gives none): ping, as always."""
    try:
        hint = read_json(state_dir / SERVER_HINT_FILE, {})
    except ByteBackError:
        return True
    if not isinstance(hint, dict) or hint.get("destination") != where:
        return True
    when = hint.get("next_snapshot")
    return not isinstance(when, (int, float)) or now < when


def completed_by_push(output: str) -> Optional[tuple]:
    """(CompletedProcess as complete's own, seconds to the next snapshot) from the output
    of a push whose session took the snapshot itself (COMPLETE_LINE), else None: an
    older server, which is asked `complete` after it."""
    found = list(COMPLETE_LINE_RE.finditer(output))
    if not found:
        return None
    said = output[:found[-1].start()]
    taken = "\n".join(re.findall(r"^snapshot \S+ taken$", said, re.M))
    proc = subprocess.CompletedProcess([], int(found[-1].group(1)), taken, said)
    return proc, int(found[-1].group(2))


def backup_remote(plan: BackupPlan, args: argparse.Namespace,
                  not_kept: Optional[NotKeptLines] = None) -> Optional[int]:
    """Back up to a server over ssh: log in (and ping), rsync (retried), then the snapshot.

    not_kept: what the server's receiver could not keep, once it is done."""
    if not (Path(plan.config_dir) / "key").is_file():
        raise ByteBackError(f"{plan.config_dir}/key is missing: run setup-client first")
    with SshSession(plan.config_dir, plan.destination) as session:
        return _backup_over(session, plan, args, not_kept or NotKeptLines(plan.host))


def _complete(plan: BackupPlan, session: SshSession, gaps: NotKept) -> subprocess.CompletedProcess:
    """complete, telling the server what its receiver could not keep (a server from before
    that was told so refuses the words: it is asked again without them)."""
    words = not_kept_words(gaps)
    proc = call_server(plan, shlex.join(["complete", *words]), session)
    if words and proc.returncode != 0 and "byteback: refused: " in proc.stderr:
        proc = call_server(plan, "complete", session)
    return proc


def _backup_over(session: SshSession, plan: BackupPlan, args: argparse.Namespace,
                 not_kept: NotKeptLines) -> Optional[int]:
    state_dir, where = client_state_dir(), f"{_login(plan.destination)}:{plan.destination.port or 22}"
    ping = args.dry_run or ping_wanted(state_dir, where, time.time())
    if not ping:
        # Used once: only a push that completes writes it anew, so after any failure
        # (or a server put back to an older version) the next backup pings again.
        with contextlib.suppress(FileNotFoundError):
            (state_dir / SERVER_HINT_FILE).unlink()
    again = ping_server(plan, session, dry_run=args.dry_run, sleep=args.context.sleep, ping=ping)
    auto = automatic_excludes(plan.sources, _read_mounts(), _client_config_files(plan))
    argv = build_rsync_argv(plan, f"{_login(plan.destination)}:{PUSH_THEN_COMPLETE}",
                            transport=rsync_over_ssh(session.argv(), again=again),
                            auto_excludes=auto, progress=args.progress, dry_run=args.dry_run)
    show = args.verbose > 0 or args.progress or args.dry_run
    private: List[str] = []          # the named pass's list, in a directory of this run's own
    try:
        return _push_and_complete(session, plan, args, not_kept, argv, show, again, auto, private)
    finally:
        for path in private:
            shutil.rmtree(path, ignore_errors=True)


def _push_and_complete(session: SshSession, plan: BackupPlan, args: argparse.Namespace,
                       not_kept: NotKeptLines, argv: List[str], show: bool, again: bool,
                       auto: Sequence[str], private: List[str]) -> Optional[int]:
    """The push, its snapshot, and the one more pass an 'again:' asks for (only the
    names it lists, where it lists them)."""
    state_dir, where = client_state_dir(), f"{_login(plan.destination)}:{plan.destination.port or 22}"
    stats = None
    for attempt in (1, 2):
        rc, output = rsync_with_retries(argv, retries=plan.retries, delay=plan.retry_delay, show=show,
                                        sleep=args.context.sleep, before_try=session.ensure,
                                        not_kept=not_kept)
        stats = output if stats is None else stats     # the whole tree's, not a named pass's
        if args.dry_run:
            break
        completed = completed_by_push(output)
        if completed is None:
            # An older server, or rsync could not keep everything (exit 23): complete is
            # asked for, with what was not kept.
            session.ensure()
            proc = _complete(plan, session, not_kept.result())
        else:
            proc, wait = completed
            # Not durable: a hint lost or garbled in a crash is a ping the next run asks
            # (ping_wanted); its two fsyncs were ~6 ms of the client's end (issue 14).
            write_json_atomically(state_dir / SERVER_HINT_FILE,
                                  {"destination": where, "next_snapshot": time.time() + wait}, durable=False)
        said = [l for l in proc.stderr.splitlines() if l.startswith("byteback: again: ")]
        if proc.returncode != 0 and said and attempt == 1:
            # The server found this run's writes mixed up in hard-linked files
            # (BtrfsStore.take_snapshot): the next push, resumed, puts them right.
            # Where it listed their names, only those are sent again.
            log.info("server: %s: copying once more", said[-1][len("byteback: "):].partition(AGAIN_NAMES_MARK)[0])
            names = again_names(said[-1])
            names = names_to_send(names) if names and names_under_sources(names, plan.sources) else None
            if names is not None:
                import tempfile
                private.append(tempfile.mkdtemp(prefix="byteback-"))
                files_from = os.path.join(private[-1], "again-names")
                with open(files_from, "wb") as f:
                    f.write(b"".join(n + b"\0" for n in names))
                named = build_rsync_argv(plan, argv[-1], transport=rsync_over_ssh(session.argv(), again, named=True),
                                         auto_excludes=auto, progress=args.progress)
                argv = named_pass_argv(named, files_from)
                log.info("copying only the %d names the server listed", len(names))
            continue
        if proc.returncode != 0:
            raise ByteBackError(f"the files were copied, but the server took no snapshot: {_server_said(proc)}")
        log.info("server: %s", proc.stdout.strip())
        if not_kept.result().total:
            log.warning("WARNING: %s", not_kept_text(not_kept.result()))
        break
    return parse_rsync_stats(stats)


def _client_config_files(plan: BackupPlan) -> List[str]:
    """Config files never backed up: the private key is this machine's secret."""
    return [str(Path(plan.config_dir) / "key")]


# --- 11b. setup-client, install-cron, backup ---------------------------------

def cmd_setup_client(args: argparse.Namespace) -> int:
    """setup-client: make this machine's key and have the server accept it, restricted."""
    config_dir = Path(args.config_dir)
    destination = parse_destination(args.destination, args.port)
    if destination.is_local:
        raise UsageError("setup-client needs a server: give --destination user@host:")
    host = check_host_name(args.hostname or default_host_name())
    config_dir.mkdir(parents=True, exist_ok=True)
    key = config_dir / "key"
    runner = Runner()
    if not key.exists():
        runner.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", f"byteback@{host}", "-f", str(key)])
        print(f"created    {key}")
    os.chmod(key, 0o600)
    try:
        public = Path(f"{key}.pub").read_text()
    except OSError:
        public = runner.run(["ssh-keygen", "-y", "-f", str(key)], destructive=False).stdout
    server_args = ["sudo", "-n", args.server_program or default_server_program(), *config_dir_args(args.server_config_dir or DEFAULT_CONFIG_DIR)]
    # The client's address as the server sees it goes into from="...": the
    # server's shell reads it from this very connection.
    remote = shlex.join(server_args + ["setup-host", "--host", host]) + \
        ' --client-address "${SSH_CONNECTION%% *}"'
    argv = ssh_argv(str(config_dir), destination.port, administrator=True) + [_login(destination), remote]
    log.info("run: %s", shlex.join(argv))
    # Only stdout is captured (for its 'login:' line): ssh asks the administrator
    # for a password or a passphrase on the terminal, and the server's reasons
    # for a refusal come on stderr.
    proc = Runner().run(argv, input=public, check=False, capture=False, stdout=subprocess.PIPE)
    said = proc.stdout or ""
    sys.stdout.write("".join(l for l in said.splitlines(True) if not l.startswith("login: ")))
    if proc.returncode != 0:
        raise ByteBackError(f"the server did not set up host {host} (exit {proc.returncode}); "
                            "its reason is above. Check that you can log in as "
                            f"{_login(destination)} and that setup-server ran there")
    destination = destination._replace(user=setup_login(said, destination.user))
    dest_text = f"{_login(destination)}:{destination.path}"
    _write_setting(config_dir / "destination", dest_text)
    if destination.port:
        _write_setting(config_dir / "port", str(destination.port))
    print(f"This machine backs up as {host} to {dest_text}. Take the first backup now and watch it:\n"
          f"  byteback.pyz backup --verbose\n"
          f"then schedule it daily: byteback.pyz install-cron (or install-cron --systemd).")
    return EXIT_OK


def setup_login(said: str, user: Optional[str]) -> Optional[str]:
    """The account setup-host says this host logs in as ('login: NAME'), else user (pure).

    An older server says nothing: its shared backup user it is."""
    found = re.findall(r"^login: ([a-z_][a-z0-9_-]{0,31})$", said, re.M)
    return found[-1] if found else user


def _write_setting(path: Path, value: str) -> None:
    try:
        if path.read_text().strip() == value:
            return
    except FileNotFoundError:
        pass
    write_file_atomically(path, value + "\n")
    print(f"wrote      {path}")


def cmd_install_cron(args: argparse.Namespace) -> int:
    """install-cron: back this client up daily, at a random time so clients spread out."""
    program = program_path()
    if not program.endswith(".pyz") and program != "/usr/bin/byteback":
        log.warning("%s is not the zipapp; cron will run it as it is", program)
    job = Job("byteback", "backup", job_argv(program, args.config_dir, "backup"), hourly=False)
    done = install_job(job, cron_file=Path(args.cron_file), unit_dir=Path(args.unit_dir),
                       systemd=args.systemd, hour=args.hour)
    for line in done:
        print(line)
    if _nothing_changed(done):
        print("nothing changed: the backup was already scheduled")
    return EXIT_OK


def cmd_backup(args: argparse.Namespace) -> int:
    """backup: copy this machine's files to the destination, then have a snapshot taken."""
    plan = resolve_backup_plan(args)
    ensure_programs(["rsync"] if plan.destination.is_local else ["rsync", "ssh"],
                    install=args.install_missing, euid=args.context.euid)
    state_dir = client_state_dir()
    with Lock(state_dir / "backup.lock", "backup"):
        started = now_local()
        where = (plan.destination.path if plan.destination.is_local
                 else f"{_login(plan.destination)}:{plan.destination.path}")
        entry = {"start": started.isoformat(), "host": plan.host, "destination": where, "result": "failed"}
        try:
            run_hooks(plan.config_dir, "pre-backup")
            run = backup_local if plan.destination.is_local else backup_remote
            not_kept = NotKeptLines(plan.host)
            with database_phase(plan, entry, dry_run=args.dry_run) as db_excludes:
                entry["bytes_sent"] = run(plan._replace(excludes=plan.excludes + db_excludes), args, not_kept)
            if not_kept.result().total:
                entry["not_kept"] = not_kept.result()._asdict()
            entry["result"] = "ok"
        except BaseException as e:
            entry["error"] = str(e) or type(e).__name__
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
                if entry["result"] != "ok":
                    log.error("%s", e)     # the backup's own error is raised; say this one too
        if hook_error:
            raise hook_error
    return EXIT_OK


# --- 11c. restore ------------------------------------------------------------

def absolute_patterns(patterns: Sequence[str], cwd: str) -> List[str]:
    """Patterns as absolute client paths: relative ones are taken from cwd."""
    result = []
    for pattern in patterns:
        full = pattern if pattern.startswith("/") else os.path.join(cwd, pattern)
        full = os.path.normpath(full)
        result.append("/" + full.lstrip("/"))
    return result


def topmost_paths(paths: Iterable[str]) -> List[str]:
    """Drop paths inside another one: restoring a directory brings what is in it."""
    result: List[str] = []
    for path in sorted(set(paths)):
        if not any(_is_within(path, top) for top in result):
            result.append(path)
    return result


def restore_sources(paths: Sequence[str], cwd: str) -> List[tuple]:
    """(anchor, relative path) pairs: below cwd a path comes back relative to it, else whole."""
    pairs = []
    for path in paths:
        if cwd != "/" and _is_within(path, cwd) and path != cwd:
            pairs.append((cwd, os.path.relpath(path, cwd)))
        else:
            pairs.append(("/", path.lstrip("/")))
    return pairs


def _remote_list(session: SshSession, words: Sequence[str]) -> List[Entry]:
    session.ensure()
    argv = session.argv() + [_login(session.destination), shlex.join(["list", *words])]
    proc = Runner().run(argv, destructive=False, check=False, stdin=subprocess.DEVNULL, errors="replace")
    if proc.returncode != 0:
        raise ByteBackError(f"the server could not list: {_server_said(proc)}")
    try:
        return [Entry(**json.loads(line)) for line in proc.stdout.splitlines() if line.strip()]
    except (ValueError, TypeError) as e:
        raise ByteBackError(f"the server's listing is garbled ({e}); is it running the same byteback?") from None


# NOTE: under the receive guard's 65,536-character limit on a command, with room to spare.
RESTORE_BATCH_CHARS = 50000


def _batches(paths: Sequence[str], limit: int) -> Iterator[List[str]]:
    """Runs of paths whose quoted length stays under limit (one path per run at least)."""
    batch: List[str] = []
    size = 0
    for path in paths:
        length = len(shlex.quote(path)) + 1
        if batch and size + length > limit:
            yield batch
            batch, size = [], 0
        batch.append(path)
        size += length
    if batch:
        yield batch


# What a restore of files anywhere but onto their own host leaves out: a
# hostile client's setuid-root program, 0666 device node or file capability
# (an xattr) must not come back live on an administrator's machine.
# --no-perms keeps the modes less the umask and clears the set-id bits.
FOREIGN_RESTORE_OPTIONS = ("--no-owner", "--no-group", "--no-perms", "--no-devices", "--no-specials")


def restore_keeps_everything(host: str, this_host: str, as_root: bool, same_owner: bool) -> bool:
    """Whether a restore keeps owners, set-id bits, devices and xattrs: as root onto the host itself,
    or when asked (--same-owner)."""
    return same_owner or (as_root and host == this_host)


def cmd_restore(args: argparse.Namespace) -> int:
    """restore: list the versions of files in the snapshots, or copy them back (--restore)."""
    destination, host = client_target(args)
    _check_restore_usage(args)
    # A database's datadir comes back at its own path, whatever the current directory.
    cwd = "/" if args.database else os.getcwd()
    store = open_store(destination.path) if destination.is_local else None
    with SshSession(args.config_dir, destination) as session:   # connects only for a server
        plain = plain_restore(args, cwd) if store is None else None
        if plain is not None:
            try:
                return restore_entries(args, session, host, [plain], cwd, missing=_nothing_matches(args, host))
            except _NoNewestThere:
                pass        # a server from before 'newest': list first, as it did
        entries = matching_entries(args, store or session, host, cwd)
        if not args.restore:
            print(format_entries(entries))
            return EXIT_OK
        return restore_entries(args, store or session, host, entries, cwd)


def _check_restore_usage(args: argparse.Namespace) -> None:
    if args.restore and args.all:
        raise UsageError("--all lists every version; to restore one, pick it with --snapshot NAME")
    if args.database and (len(args.pattern) != 1 or not args.pattern[0].startswith("/") or not args.restore
                          or args.to):
        raise UsageError("--database takes one absolute datadir, with --restore and without --to: "
                         "it puts the datadir back in its place")


def matching_entries(args: argparse.Namespace, source: "Store | SshSession", host: str,
                     cwd: str) -> List[Entry]:
    """What the patterns match in the store (a local one, or a server's through its session):
    in the newest snapshot, --snapshot's, or every one (--all)."""
    patterns = absolute_patterns(args.pattern, cwd)
    if isinstance(source, Store):
        entries = list_store(source, host, patterns, snapshot=args.snapshot, every=args.all)
    else:
        words = (["--all"] if args.all else []) + ([f"--snapshot={args.snapshot}"] if args.snapshot else [])
        entries = _remote_list(source, words + patterns)
    if not entries:
        raise ByteBackError(_nothing_matches(args, host))
    return entries


def _nothing_matches(args: argparse.Namespace, host: str) -> str:
    where = args.snapshot or ("any snapshot" if args.all else "the newest snapshot")
    return f"nothing matches {' '.join(args.pattern)} in {where} of host {host}; try --all, or a pattern with * or **"


def plain_restore(args: argparse.Namespace, cwd: str) -> Optional[Entry]:
    """The one entry a restore of one path without wildcards asks for, without a listing first.

    rsync finds the path, or says it is missing, itself; a listing would cost
    another session and another start of the server's program, about as long
    as copying one file.  The server reads 'newest' as its newest snapshot."""
    patterns = absolute_patterns(args.pattern, cwd)
    if not args.restore or args.all or args.database or len(patterns) != 1 or _GLOB_CHARS_RE.search(patterns[0]):
        return None
    return Entry(args.snapshot or NEWEST_SNAPSHOT, patterns[0], "?", 0, 0, 0, 0, 0)


class _NoNewestThere(ByteBackError):
    """The server's guard refused a 'newest/' path: it is older than plain_restore."""


def restore_entries(args: argparse.Namespace, source: "Store | SshSession", host: str,
                    entries: Sequence[Entry], cwd: str, missing: Optional[str] = None) -> int:
    """Copy what the listing found back, by rsync, refusing to overwrite without --overwrite.

    missing: the message when rsync finds no such path (plain_restore's entry, not listed)."""
    snapshot = entries[0].snapshot
    target = Path(os.path.abspath(args.to or cwd))     # 'a:b' must not read as a remote host
    pairs = restore_sources(topmost_paths(e.path for e in entries), cwd)
    if args.database:
        move_datadir_aside(os.path.normpath(args.pattern[0]), snapshot)
    clashes = [str(target / rel) for _, rel in pairs if os.path.lexists(target / rel)]
    if clashes and not args.overwrite:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        verb = "exists" if len(clashes) == 1 else "exist"
        raise ByteBackError(f"{', '.join(clashes[:3])}{more} already {verb}; nothing was restored. "
                            "Use --overwrite to replace them, or --to DIR to restore elsewhere")
    if isinstance(source, Store):
        root = source.host_dir(host) / snapshot
        sources = [f"{root}{anchor.rstrip('/')}/./{rel}" for anchor, rel in pairs]
        # A store made without root keeps owners, modes and symlinks in xattrs:
        # the sending side reads them (a store made by root has none, and then
        # the real ones count); this side writes plainly, as root when it is.
        transport = ["--fake-super", "-M--super" if source.as_root else "-M--no-super"]
    else:
        sources = [f"{_login(source.destination)}:{snapshot}{anchor.rstrip('/')}/./{rel}"
                   for anchor, rel in pairs]
        transport = rsync_over_ssh(source.argv())
    this_host = default_host_name()        # a name lookup (getfqdn): once
    keep = restore_keeps_everything(host, this_host, args.context.euid == 0, args.same_owner)
    bases = host_id_bases(source, host) if isinstance(source, Store) else None
    if bases:
        # A userns host's owners are on disc, shifted by its range; a
        # user.rsync.%stat xattr in it is one its client uploaded, never ours.
        transport = transport[1:]
        if keep:
            raise ByteBackError(
                f"host {host} is received in a uid range of its own (receiver userns): its files here are "
                f"owned by ids shifted by {bases[0]} (uids) and {bases[1]} (gids), which a restore on this "
                "server cannot shift back; restore them on the client itself (byteback.pyz restore there "
                "gives owners back), or here without --same-owner (owners and set-id bits not kept)")
    if not keep:
        log.warning("restoring host %s's files on %s: owners, set-id bits, device and special files "
                    "and extended attributes are not restored (a hostile client's setuid-root program "
                    "or device node stays harmless); use --same-owner to keep them", host, this_host)
    target.mkdir(parents=True, exist_ok=True)
    # ACLs backed up (--acls in rsync_flags, as the original's restore read it) come back too.
    flags = split_rsync_flags(read_setting_text(args.config_dir, "rsync_flags"),
                              f"{args.config_dir}/rsync_flags")
    acls = ["--acls"] if {"--acls", "-A"} & set(flags) else []
    # NOTE: the receive guard's SEND_LETTERS must allow every letter this sends.
    options = ["--xattrs", *acls] if keep else FOREIGN_RESTORE_OPTIONS
    _copy_back(sources, [*options, *transport], target, snapshot, show=args.verbose > 0, missing=missing)
    source_name = "the newest snapshot" if snapshot == NEWEST_SNAPSHOT else snapshot
    print(f"restored {len(pairs)} path{'s' if len(pairs) != 1 else ''} from {source_name} into {target}")
    if args.database:
        print(f"start the database server now: it recovers {args.pattern[0]} from its logs, as after "
              "a power cut")
    return EXIT_OK


def _copy_back(sources: Sequence[str], options: Sequence[str], target: Path, snapshot: str, *,
               show: bool, missing: Optional[str] = None) -> None:
    """rsync the sources into target, in batches that fit a command line."""
    done = 0
    for batch in _batches(sources, RESTORE_BATCH_CHARS):
        # --no-implied-dirs: directories that already exist where a file comes
        # back keep their own owner and mode; --relative would reset them.
        argv = ["rsync", "--archive", "--hard-links", "--numeric-ids", "--relative", "--no-implied-dirs",
                "--timeout=300", *options, "--", *batch, f"{target}/"]
        rc, output = run_rsync(argv, show=show)
        if missing is not None and rc == 23 and re.search(r"link_stat .* failed: No such file or directory",
                                                          output):
            raise ByteBackError(missing)
        if missing is not None and "byteback: refused:" in output and re.search(f"['\"]{NEWEST_SNAPSHOT}/", output):
            raise _NoNewestThere(output.strip().splitlines()[-1])
        # Not even 24 (vanished files) is success here: snapshots never
        # change, so a file vanishes only when a prune took the snapshot.
        if rc != 0:
            hint = (f"; snapshot {snapshot} was pruned meanwhile: pick another with --snapshot"
                    if rc == 24 else "")
            raise ByteBackError(f"rsync failed with exit code {rc} "
                                f"({RSYNC_EXIT_MEANINGS.get(rc, 'unknown error')}) after {done} of "
                                f"{len(sources)} paths were restored{hint}: "
                                + " | ".join(output.strip().splitlines()[-3:]))
        done += len(batch)


# === 12. status ==============================================================

def nagios_state(age: Optional[float], warning: float, critical: float, running: bool,
                 stuck: bool = False) -> int:
    """OK, WARNING or CRITICAL for the age of the last good backup.

    A running backup is never late; a stuck one is at least a WARNING.
    """
    if running and not stuck:
        return NAGIOS_OK
    if age is None or age >= critical:
        return NAGIOS_CRITICAL
    if stuck or age >= warning:
        return NAGIOS_WARNING
    return NAGIOS_OK


NAGIOS_NAMES = {NAGIOS_OK: "OK", NAGIOS_WARNING: "WARNING", NAGIOS_CRITICAL: "CRITICAL",
                NAGIOS_UNKNOWN: "UNKNOWN"}


def _parse_time(text) -> Optional[dt.datetime]:
    try:
        when = dt.datetime.fromisoformat(str(text))
    except ValueError:
        return None
    return when if when.tzinfo else when.replace(tzinfo=dt.timezone.utc)


def client_status(state: dict, now: dt.datetime, running: bool) -> dict:
    """The client's status as plain values: last success, last attempt, running now."""
    success, attempt = (state.get(key) if isinstance(state.get(key), dict) else {}
                        for key in ("last_success", "last_attempt"))
    ended = _parse_time(success.get("end")) if success else None
    started = _parse_time(success.get("start")) if success else None
    return {
        "running": running,
        "last_success": success.get("end"),
        "age_seconds": (now - ended).total_seconds() if ended else None,
        "duration_seconds": (ended - started).total_seconds() if ended and started else None,
        "bytes_sent": success.get("bytes_sent"),
        "last_attempt": attempt.get("end") or attempt.get("start"),
        "last_result": attempt.get("result"),
        "last_error": attempt.get("error"),
        # The last attempt's database copies that failed or are not consistent.
        "database_warnings": database_warnings(attempt.get("databases") or []
                                               if isinstance(attempt.get("databases"), list) else []),
        # What the last good backup's server could not keep (NotKept), while it is the last.
        "not_kept": _not_kept_of(success.get("not_kept") if success else None),
    }


def _not_kept_of(data: object) -> Optional[str]:
    """The WARNING text of a recorded NotKept, or None (pure: a bad record is no record)."""
    try:
        gaps = checked_not_kept(data.get("devices"), data.get("owners"), data.get("examples", []))
    except (AttributeError, ValueError):
        return None
    return not_kept_text(gaps) if gaps.total else None


def server_status(store: Store, config: ServerConfig, now: dt.datetime) -> dict:
    """Per host: newest and oldest snapshot, count, sizes; for the store: free space and target."""
    hosts = {}
    histories = {}
    # The store read once, for the hosts' lines and the plan alike (a monitoring system
    # asks every few minutes; on a server of 1,000 hosts each read takes ~0.75 s).
    state = read_prune_state(store, now, config.rsync_timeout)
    for host, facts in state.hosts.items():
        snaps, backups = facts.snapshots, facts.history
        histories[host] = backups
        sizes = counted_sizes(backups)[-config.history:]
        dirty = store.dirty_since(host)
        session, _, quiet = session_state(store.session_lock_path(host), now.timestamp(), config.rsync_timeout)
        hosts[host] = {
            "snapshots": len(snaps),
            "newest": snaps[-1].name if snaps else None,
            "age_seconds": (now - snaps[-1].when).total_seconds() if snaps else None,
            "oldest": snaps[0].name if snaps else None,
            "last_size": int(backups[-1].get("size", 0)) if backups else None,
            "last_added": int(backups[-1].get("added", 0)) if backups else None,
            "mean_added": int(mean(sizes)) if sizes else None,
            "incomplete_since": dirty.isoformat() if dirty else None,
            "running": session in ("running", "stuck"),
            "stuck": session == "stuck",
            "session_idle_seconds": quiet,
            "suspicious": bool(backups and backups[-1].get("suspicious") and not backups[-1].get("accepted")),
            # Information only: the client wrote it.
            "database_warnings": snapshot_database_warnings(str(store.snapshot_path(snaps[-1])))
            if snaps else [],
        }
        gaps = read_not_kept(store, host, snaps[-1] if snaps else None, now)
        hosts[host]["not_kept"] = not_kept_text(gaps) if gaps else None
    # What prune would contain, accept or roll back now, and why (the plan is pure: nothing changes).
    plan = plan_prune(state, now=now, config=config)
    for host, excess in plan.contained.items():
        hosts[host]["contained_bytes"] = excess
    unmarked = []
    for host in hosts:          # after the plan: its read of the store committed what was written
        found = hosts[host]["unmarked_upload_bytes"] = store.unmarked_upload_bytes(host)
        if found:
            unmarked.append(f"host {host}: {format_size(found)} written into current since its newest snapshot "
                            "with no backup running and no in-progress marker: a shell as the backup user wrote "
                            "it (check who can log in as it); prune counts it as an unfinished upload")
    recent = now - dt.timedelta(days=SHARE_WINDOW_DAYS)
    accepted = [f"host {h}: {format_size(a)} of backup {b.get('snapshot')} past the suspicion line "
                f"accepted at {when}" for h, bs in sorted(histories.items()) for b in bs
                for when, a in (b.get("acceptances") or ()) if (_entry_time(when) or recent) > recent]
    return {"store": str(store.root), "backend": store.kind, "free_bytes": store.free_bytes(),
            "total_bytes": store.total_bytes(),
            "target_bytes": plan.target, "goal_bytes": plan.goal, "hosts": hosts,
            "warnings": plan.notes + [a.reason for a in plan.accepted] + accepted
            + planted_warnings(histories, since=recent) + unmarked}


def planted_warnings(histories: Dict[str, List[dict]], since: dt.datetime) -> List[str]:
    """A line for each backup since then whose snapshot found subvolumes planted in current (pure)."""
    return [f"host {h}: backup {b.get('snapshot')}: {_history_int(b, 'planted')} subvolumes in current "
            f"({format_size(_history_int(b, 'planted_bytes'))}) were removed: rsync never makes one, so a "
            "shell as the backup user made them (check who can log in as it)"
            for h, bs in sorted(histories.items()) for b in bs
            if _history_int(b, "planted") and (_entry_time(b.get("time")) or since) > since]


# Prometheus: the text exposition format, for node_exporter's textfile collector.
# (name, help, value from a client report)
CLIENT_METRICS = (
    ("byteback_last_success_timestamp_seconds", "When the last successful backup ended (Unix time).",
     lambda r: _unix_time(r["last_success"])),
    ("byteback_last_success_duration_seconds", "How long the last successful backup took.",
     lambda r: r["duration_seconds"]),
    ("byteback_last_success_sent_bytes", "Bytes rsync sent in the last successful backup.",
     lambda r: r["bytes_sent"]),
    ("byteback_last_attempt_timestamp_seconds", "When the last backup attempt ended (Unix time).",
     lambda r: _unix_time(r["last_attempt"])),
    ("byteback_last_attempt_failed", "1 if the last backup attempt failed.",
     lambda r: None if r["last_result"] is None else int(r["last_result"] != "ok")),
    ("byteback_backup_running", "1 while a backup runs.", lambda r: int(bool(r["running"]))),
    ("byteback_last_success_not_kept", "1 if the server could not keep some files of the last "
     "successful backup as they are.",
     lambda r: None if r["last_success"] is None else int(bool(r.get("not_kept")))),
)
# (name, help, value from one host of a server report)
HOST_METRICS = (
    ("byteback_host_snapshots", "Snapshots kept for the host.", lambda h, now: h["snapshots"]),
    ("byteback_host_newest_snapshot_timestamp_seconds", "When the host's newest snapshot was taken (Unix time).",
     lambda h, now: _snapshot_time(h["newest"])),
    ("byteback_host_oldest_snapshot_age_seconds", "Age of the host's oldest snapshot.",
     lambda h, now: _snapshot_age(h["oldest"], now)),
    ("byteback_host_last_backup_added_bytes", "What the host's last backup added to the disc.",
     lambda h, now: h["last_added"]),
    ("byteback_host_mean_backup_added_bytes", "Mean of what the host's recent backups added.",
     lambda h, now: h["mean_added"]),
    ("byteback_host_backup_running", "1 while the host's backup session runs.", lambda h, now: int(bool(h["running"]))),
    ("byteback_host_incomplete", "1 while the host's current holds an unfinished upload.",
     lambda h, now: int(bool(h["incomplete_since"]))),
    ("byteback_host_suspicious", "1 if the host's last backup is suspiciously large and not accepted.",
     lambda h, now: int(bool(h["suspicious"]))),
    ("byteback_host_not_kept", "1 while the host's newest snapshot lacks files its receiver could not "
     "keep as they are.", lambda h, now: int(bool(h.get("not_kept")))),
    ("byteback_host_contained_bytes", "Bytes of the host's backups past the suspicion line that prune "
     "counts at the host's normal size (containment).", lambda h, now: h.get("contained_bytes")),
)
STORE_METRICS = (
    ("byteback_store_free_bytes", "Free space on the store's filesystem.", "free_bytes"),
    ("byteback_store_size_bytes", "Size of the store's filesystem.", "total_bytes"),
    ("byteback_store_prune_target_bytes", "Free space prune keeps: headroom x recent backup sizes.",
     "target_bytes"),
    ("byteback_store_prune_goal_bytes", "Free space prune deletes towards when it must delete.", "goal_bytes"),
)
STATE_HELP = "byteback status as a Nagios code: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."


def _unix_time(text) -> Optional[float]:
    when = _parse_time(text) if text else None
    return when.timestamp() if when else None


def _snapshot_time(name: Optional[str]) -> Optional[float]:
    when = parse_snapshot_name(name) if name else None
    return when.timestamp() if when else None


def _snapshot_age(name: Optional[str], now: dt.datetime) -> Optional[float]:
    when = _snapshot_time(name)
    return None if when is None else max(0.0, now.timestamp() - when)


def _label_value(text: str) -> str:
    return str(text).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _metric_value(value) -> str:
    return repr(float(value)) if isinstance(value, float) else str(int(value))


def prometheus_text(report: dict, now: dt.datetime) -> str:
    """The report (client_status or server_status, with its state) as Prometheus text (pure).

    A value that is not known (no backup yet) is left out rather than made up.
    Boolean host fields without a metric of their own (containment, acceptance)
    are exported as byteback_host_<field>, so a new state is visible at once.
    """
    out: List[str] = []

    def family(name: str, help_text: str, samples: Iterable[tuple]) -> None:
        samples = [(labels, v) for labels, v in samples if v is not None]
        if not samples:
            return
        out.append(f"# HELP {name} {help_text}")
        out.append(f"# TYPE {name} gauge")
        for labels, value in samples:
            text = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels)
            out.append(f"{name}{{{text}}} {_metric_value(value)}" if text else f"{name} {_metric_value(value)}")

    code = {v: k for k, v in NAGIOS_NAMES.items()}[report["state"]]
    if "hosts" not in report:
        for name, help_text, get in CLIENT_METRICS:
            family(name, help_text, [((), get(report))])
        family("byteback_status", STATE_HELP, [((), code)])
        return "\n".join(out) + "\n"
    store = (("store", report["store"]),)
    for name, help_text, key in STORE_METRICS:
        family(name, help_text, [(store, report.get(key))])
    hosts = sorted(report["hosts"].items())
    for name, help_text, get in HOST_METRICS:
        family(name, help_text, [(store + (("host", h),), get(i, now)) for h, i in hosts])
    known = {"running", "suspicious"}
    extra = sorted({k for _, i in hosts for k, v in i.items() if isinstance(v, bool)} - known)
    for key in extra:
        family(f"byteback_host_{re.sub(r'[^a-z0-9_]', '_', key.lower())}", f"1 if the host is {key}.",
               [(store + (("host", h),), int(bool(i.get(key)))) for h, i in hosts])
    family("byteback_suspicious_backups", "Hosts whose last backup is suspicious and not accepted.",
           [(store, sum(bool(i["suspicious"]) for _, i in hosts))])
    family("byteback_contained_hosts", "Hosts whose suspicious backups prune contains now.",
           [(store, sum(bool(i.get("contained_bytes")) for _, i in hosts))])
    family("byteback_warnings", "Containments and acceptances status warns about.",
           [(store, None if "warnings" not in report else len(report["warnings"]))])
    family("byteback_status", STATE_HELP, [(store, code)])
    return "\n".join(out) + "\n"


def _age_text(seconds: Optional[float]) -> str:
    return "never" if seconds is None else format_duration(seconds) + " ago"


class Verdict(NamedTuple):
    """What status found: the report (--json's fields), its Nagios code, one line, perf data."""
    report: dict
    code: int
    summary: str
    perf: str


def cmd_status(args: argparse.Namespace) -> int:
    """status: is backing up happening?  Human table, --json, or a Nagios plugin line."""
    now = now_local()
    verdict = (server_verdict if args.store else client_verdict)(args, now)
    verdict.report["state"] = NAGIOS_NAMES[verdict.code]
    if args.textfile:
        # node_exporter reads *.prom; the temporary name does not end so, and a rename is atomic.
        path = Path(args.textfile) / ("byteback-server.prom" if args.store else "byteback.prom")
        write_file_atomically(path, prometheus_text(verdict.report, now), mode=0o644)
        return EXIT_OK
    print_verdict(args, verdict, now)
    return verdict.code


def server_verdict(args: argparse.Namespace, now: dt.datetime) -> Verdict:
    """status --store: every host's age against the thresholds, and the prune's warnings."""
    config = load_server_config(args.config_dir)
    report = server_status(open_store(args.store), config, now)
    states = {h: nagios_state(i["age_seconds"], args.warning, args.critical, i["running"], i["stuck"])
              for h, i in report["hosts"].items()}
    code = max(states.values(), default=NAGIOS_OK)
    late = [h for h, c in states.items() if c != NAGIOS_OK]
    summary = (f"{len(report['hosts'])} hosts, {len(late)} late ({', '.join(late)})" if late
               else f"{len(report['hosts'])} hosts backed up")
    stuck = [h for h, i in report["hosts"].items() if i["stuck"]]
    if stuck:
        summary += f", {len(stuck)} stuck ({', '.join(stuck)})"
    summary += f", {format_size(report['free_bytes'])} free"
    if report["warnings"]:
        # Containment and acceptance are automatic, but a person should know.
        code = max(code, NAGIOS_WARNING)
        summary += f"; {len(report['warnings'])} prune warnings: {report['warnings'][0]}"
    gaps = sorted(h for h, i in report["hosts"].items() if i.get("not_kept"))
    if gaps:
        # The snapshot was taken without some files: a WARNING, never CRITICAL for this alone.
        code = max(code, NAGIOS_WARNING)
        summary += f"; {len(gaps)} with files not kept as they are ({', '.join(gaps)})"
    perf = f"free={report['free_bytes']}B target={report['target_bytes']}B late={len(late)}"
    return Verdict(report, code, summary, perf)


def client_verdict(args: argparse.Namespace, now: dt.datetime) -> Verdict:
    """status on a client: the last backup's age against the thresholds, from its state file."""
    state_dir = client_state_dir()
    try:
        state = read_json(state_dir / "last-backup.json", {})
    except ByteBackError as e:
        raise ByteBackError(str(e), NAGIOS_UNKNOWN) from None
    if not isinstance(state, dict) or any(
            not isinstance(state.get(key), (dict, type(None))) for key in ("last_success", "last_attempt")):
        raise ByteBackError(f"{state_dir}/last-backup.json is not a byteback state file; move it "
                            "aside and the next backup writes a new one", NAGIOS_UNKNOWN)
    report = client_status(state, now, flock_held(state_dir / "backup.lock"))
    code = nagios_state(report["age_seconds"], args.warning, args.critical, report["running"])
    summary = f"last backup {_age_text(report['age_seconds'])}"
    if report["running"]:
        summary += ", one running now"
    if report["last_result"] == "failed":
        summary += f"; last attempt failed: {report['last_error']}"
    if report["database_warnings"]:
        code = max(code, NAGIOS_WARNING)
        summary += "; databases: " + "; ".join(report["database_warnings"])
    if report["not_kept"]:
        code = max(code, NAGIOS_WARNING)
        summary += "; " + report["not_kept"]
    age = report["age_seconds"]
    perf = f"age={'U' if age is None else f'{int(age)}s'};{int(args.warning)};{int(args.critical)}"
    return Verdict(report, code, summary, perf)


def print_verdict(args: argparse.Namespace, verdict: Verdict, now: dt.datetime) -> None:
    """The verdict as --prometheus, --json, --nagios asked, else the table for a person."""
    if args.prometheus:
        print(prometheus_text(verdict.report, now), end="")
    elif args.json:
        print(json.dumps(verdict.report, indent=1, sort_keys=True))
    elif args.nagios:
        print(f"BYTEBACK {verdict.report['state']} - {printable(verdict.summary)}|{verdict.perf}")
    elif "hosts" in verdict.report:
        print(_format_server_status(verdict.report, printable(verdict.summary)))
    else:
        print(_format_client_status(verdict.report, printable(verdict.summary)))


def _format_client_status(report: dict, summary: str) -> str:
    lines = [f"state:          {report['state']} ({summary})",
             f"last success:   {report['last_success'] or 'never'}",
             f"duration:       {format_duration(report['duration_seconds'] or 0)}",
             f"bytes sent:     {report['bytes_sent'] if report['bytes_sent'] is not None else '-'}",
             f"last attempt:   {report['last_attempt'] or 'never'} ({report['last_result'] or '-'})",
             f"running now:    {'yes' if report['running'] else 'no'}"]
    if report["last_error"]:
        lines.append(f"last error:     {printable(report['last_error'])}")
    lines += [f"database:       WARNING {printable(w)}" for w in report["database_warnings"]]
    if report["not_kept"]:
        lines.append(f"not kept:       WARNING {printable(report['not_kept'])}")
    return "\n".join(lines)


def _format_server_status(report: dict, summary: str) -> str:
    rows = [("host", "newest", "age", "count", "oldest", "last", "mean", "note")]
    for host, i in sorted(report["hosts"].items()):
        note = (f"STUCK: no data for {format_duration(i['session_idle_seconds'])}" if i["stuck"]
                else "running" if i["running"]
                else f"incomplete since {i['incomplete_since']}" if i["incomplete_since"] else "")
        note += f" SUSPICIOUS: {format_size(i['contained_bytes'])} contained" if i.get("contained_bytes") else ""
        # The client wrote these: escaped, as every name is.
        note += f" database WARNING (client says): {printable('; '.join(i['database_warnings']))}" \
            if i.get("database_warnings") else ""
        note += f" WARNING (client says): {printable(i['not_kept'])}" if i.get("not_kept") else ""
        rows.append((host, i["newest"] or "-", _age_text(i["age_seconds"]), str(i["snapshots"]),
                     i["oldest"] or "-", format_size(i["last_added"] or 0), format_size(i["mean_added"] or 0), note))
    table = format_table(rows)
    warnings = "".join(f"\nWARNING: {w}" for w in report.get("warnings", ()))
    return (f"store {report['store']} ({report['backend']}): {format_size(report['free_bytes'])} free of "
            f"{format_size(report['total_bytes'])}, prune target {format_size(report['target_bytes'])}; "
            f"{report['state']}: {summary}\n{table}{warnings}")


# === 13. CLI dispatch ========================================================

QUIET_COMMANDS = ("backup", "prune", "snapshot", "receive")   # silent unless something is wrong


def _arg(convert: Callable) -> Callable:
    """An argparse type that shows the converter's own message for a bad value."""
    def converted(text: str):
        try:
            return convert(text)
        except ValueError as e:
            raise argparse.ArgumentTypeError(str(e)) from None
    converted.__name__ = convert.__name__.lstrip("_")
    return converted


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("-v", "--verbose", action="count", default=0,
                        help="say what is done (-vv: also every command run)")


def _add_systemd(parser: argparse.ArgumentParser, name: str) -> None:
    parser.add_argument("--systemd", action="store_true",
                        help=f"a systemd service and timer ({name}.service, {name}.timer) instead of cron")
    parser.add_argument("--unit-dir", default=DEFAULT_UNIT_DIR, metavar="DIR",
                        help=f"where --systemd writes them (default: {DEFAULT_UNIT_DIR})")


# The program's place on a server: default_server_program's rule, for --help.
_PROGRAM_DEFAULT = f"default: {DEFAULT_INSTALL_PATH}, or {PACKAGED_PATH} itself when run from the Debian package"


def _add_flags(parser: argparse.ArgumentParser, flags: Dict[str, str]) -> None:
    """Options that take no value (store_true), each with its help."""
    for flag, text in flags.items():
        parser.add_argument(flag, action="store_true", help=text)


def _add_administrators_options(parser: argparse.ArgumentParser, *, force: str) -> None:
    """--store and --force of snapshot and prune: refused through sudo (_refuse_under_sudo)."""
    parser.add_argument("--store", metavar="ROOT", help="the store root (default: from server.conf)")
    parser.add_argument("--force", action="store_true", help=f"{force} (administrators only)")


def _options_backup(p: argparse.ArgumentParser) -> None:
    """back this machine up now (run it from cron)

    Copy files with rsync to the destination, then have a read-only snapshot taken and old
    snapshots pruned.
    """
    p.add_argument("--destination", metavar="DEST",
                   help="a local store path, or user@host: (default: <config-dir>/destination)")
    p.add_argument("--source", action="append", metavar="DIR",
                   help="what to back up; repeat for several (default: /)")
    p.add_argument("--exclude", action="append", metavar="PATTERN",
                   help="an rsync exclude pattern; repeat for several (adds to <config-dir>/excludes)")
    p.add_argument("--host", metavar="NAME", help="this machine's name in the store (default: its FQDN)")
    p.add_argument("--port", type=_arg(_port), help="the server's ssh port (default: <config-dir>/port, else 22)")
    p.add_argument("--io-timeout", type=_arg(_positive_int), metavar="SECONDS",
                   help="rsync's I/O timeout (default: <config-dir>/io_timeout or 300)")
    p.add_argument("--retry-number", type=_arg(_positive_int), default=5, metavar="N",
                   help="tries before giving up on network failures (default: 5)")
    p.add_argument("--retry-delay", type=_arg(parse_duration), default=600.0, metavar="DURATION",
                   help="pause between tries, e.g. 600 or 10m (default: 10m)")
    _add_flags(p, {
        "--progress": "show rsync's overall progress",
        "--dry-run": "show what would be copied; change nothing",
        "--install-missing": "(root) install rsync and ssh with apt-get if they are missing "
                             "(at a terminal byteback asks; from cron it never installs unasked)"})


def _options_install_cron(p: argparse.ArgumentParser) -> None:
    """(client, root) back up daily at a random minute

    Write a cron.d file that runs this program's backup once a day at a time picked at random
    (and kept on re-runs), so clients spread out.
    """
    p.add_argument("--cron-file", default="/etc/cron.d/byteback", metavar="PATH",
                   help="where to write it (default: /etc/cron.d/byteback)")
    p.add_argument("--hour", type=int, choices=range(24), metavar="H", help="run in this hour (0-23) instead of a random one")
    _add_systemd(p, "byteback")


def _options_snapshot(p: argparse.ArgumentParser) -> None:
    """(server) snapshot a host's current backup, then prune

    Make <store>/<host>/current a read-only snapshot named by the time, refused inside the
    minimum interval; then prune.
    """
    p.add_argument("--host", required=True, help="the host whose backup to snapshot")
    _add_administrators_options(p, force="take it even inside the minimum interval")
    p.add_argument("--prepare", action="store_true",
                   help="take no snapshot: prune before the host's next backup (the forced command "
                        "runs this at the start of every push)")
    p.add_argument("--when-told", action="store_true",
                   help=f"first wait for the line '{GO_WORD}' on standard input, else do nothing (the "
                        "forced command starts it with a push, so it is ready once rsync has ended); "
                        "it waits at most server.conf's rsync_timeout, one such run per host")


def _options_prune(p: argparse.ArgumentParser) -> None:
    """(server) delete old snapshots until free space meets the target

    Delete snapshots one at a time, least important first, until the store's free space reaches
    headroom x the mean size of recent backups.
    """
    _add_administrators_options(p, force="accept a suspiciously large backup and prune for it")
    p.add_argument("--order", choices=("importance", "age"), help="order of deletion (default: server.conf, else importance)")
    _add_flags(p, {
        "--list": "print the order of deletion with reasons; delete nothing",
        "--dry-run": "say what would be deleted; delete nothing",
        "--if-idle": "do nothing, successfully, while a snapshot or prune holds the store "
                     "(the scheduled prune: it would only repeat that one's work)"})


def _options_restore(p: argparse.ArgumentParser) -> None:
    """list the versions of files in the snapshots, and get them back

    List files matching shell-style patterns (* ? [...] and ** for any depth; relative ones are
    taken from the current directory) in the newest snapshot, and with --restore copy them back.
    """
    p.add_argument("pattern", nargs="+", help="what to look for, e.g. /etc/ssh/** or notes.txt")
    p.add_argument("--all", action="store_true", help="list every distinct version in every snapshot")
    p.add_argument("--snapshot", metavar="NAME", help="look in this snapshot ('current': the unfinished one)")
    what = p.add_mutually_exclusive_group()
    what.add_argument("--list", action="store_true", help="list the matches (the default)")
    what.add_argument("--restore", action="store_true", help="copy the matches back")
    p.add_argument("--to", metavar="DIR", help="restore into DIR (default: the current directory)")
    _add_flags(p, {
        "--overwrite": "replace files that exist where they are restored",
        "--database": "the pattern is a database's datadir: refuse while its server runs, move the "
                      "live one aside, and put the snapshot's copy back in its place",
        "--same-owner": "keep owners, set-id bits, devices and extended attributes even when restoring "
                        "another host's files, or not as root (kept anyway as root on the host itself)"})
    p.add_argument("--destination", metavar="DEST", help="the store (default: <config-dir>/destination)")
    p.add_argument("--host", metavar="NAME", help="whose backups (default: this machine's FQDN)")
    p.add_argument("--port", type=_arg(_port), help="the server's ssh port (default: <config-dir>/port, else 22)")


def _options_status(p: argparse.ArgumentParser) -> None:
    """when did backups last succeed? (a Nagios plugin too)

    On a client, the last backup; with --store, every host of a server store. Exit codes follow
    Nagios: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN.
    """
    p.add_argument("--store", metavar="ROOT", help="report on this server store instead of this client")
    _add_flags(p, {
        "--json": "print JSON for scripts",
        "--nagios": "print one plugin line: BYTEBACK OK - ...|perfdata",
        "--prometheus": "print Prometheus metrics (text format)"})
    p.add_argument("--textfile", metavar="DIR",
                   help="write the metrics atomically to DIR/byteback.prom (DIR/byteback-server.prom "
                   "with --store) for node_exporter's textfile collector; exit 0 once written")
    p.add_argument("--warning", type=_arg(parse_duration), default=26 * 3600.0, metavar="AGE",
                   help="WARNING when the last good backup is this old (default: 26h)")
    p.add_argument("--critical", type=_arg(parse_duration), default=50 * 3600.0, metavar="AGE",
                   help="CRITICAL when the last good backup is this old (default: 50h)")


def _options_simulate(p: argparse.ArgumentParser) -> None:
    """model pruning over years of synthetic backups (see simulate --help)

    The retention simulator: runs this program's own pruning over years of synthetic backups and
    compares policies.
    """
    p.add_argument("words", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)


def _options_receive(p: argparse.ArgumentParser) -> None:
    """(server) the forced command in authorized_keys; not run by hand

    Check SSH_ORIGINAL_COMMAND against byteback's allow-list and run only ping, complete, or
    rsync into (or, to restore, out of) this host's backups.
    """
    p.add_argument("--host", required=True, help="the client's host name, fixed in authorized_keys")


def _options_setup_server(p: argparse.ArgumentParser) -> None:
    """(server, root) create the backup user, store and sudo rules

    Idempotently: create the user with its home on the store, set the store's ownership, install
    this program, and allow snapshots through sudo.
    """
    p.add_argument("--store", required=True, metavar="ROOT", help="the store root, ideally a btrfs filesystem")
    p.add_argument("--user", default="byteback", help="the backup user (default: byteback)")
    p.add_argument("--install-path", metavar="PATH", help=f"where to install this program ({_PROGRAM_DEFAULT})")
    p.add_argument("--cron-file", metavar="PATH",
                   help="the hourly prune's cron file (default: /etc/cron.d/byteback-prune)")
    _add_systemd(p, "byteback-prune")
    p.add_argument("--dry-run", action="store_true",
                   help="say what adopting an original byteback store would do; change nothing")
    p.add_argument("--receiver", choices=("auto",) + RECEIVERS, default="auto",
                   help="how new hosts' owners are kept (server.conf receiver): auto (default) "
                   "picks userns where this kernel and the uidmap package allow it, else fakesuper")


def _options_setup_host(p: argparse.ArgumentParser) -> None:
    """(server, root via sudo) the server half of setup-client

    Add one client: its host directory, and its public key (read from standard input) as a
    restricted authorized_keys line.
    """
    p.add_argument("--host", required=True, help="the client's host name")
    p.add_argument("--client-address", required=True, metavar="IP", help="the client's address, for from=")


def _options_setup_client(p: argparse.ArgumentParser) -> None:
    """(client, root) set this machine up to back up to a server

    Create <config-dir>/key, log in to the server once with your own credentials to register it,
    pin the server's host key, write the destination.
    """
    p.add_argument("--destination", required=True, metavar="USER@HOST:", help="the server, e.g. byteback@backuphost:")
    p.add_argument("--port", type=_arg(_port), help="the server's ssh port (default: 22)")
    p.add_argument("--hostname", metavar="NAME", help="this machine's name on the server (default: its FQDN)")
    p.add_argument("--server-program", metavar="PATH", help=f"byteback's path on the server ({_PROGRAM_DEFAULT})")
    p.add_argument("--server-config-dir", metavar="DIR",
                   help="the server's --config-dir, if setup-server was given one")


class CommandSpec(NamedTuple):
    """One command of the command line (see commands())."""
    name: str
    run: Callable
    options: Callable          # adds the command's own options to its subparser
    verbose: bool = True       # takes -v/--verbose
    add_help: bool = True

    @property
    def help(self) -> str:
        """The options function's docstring's first line (empty under python -OO)."""
        return (self.options.__doc__ or "").strip().partition("\n")[0]

    @property
    def description(self) -> str:
        """The rest of that docstring, as one paragraph."""
        return " ".join((self.options.__doc__ or "").strip().partition("\n")[2].split())


def commands() -> List[CommandSpec]:
    """Every command: its name, the function that runs it, and the one that adds its options,
    whose docstring is what `byteback --help` says of it (its first line; the rest describes it).

    Built when the parser is, so each name is looked up then."""
    return [
        CommandSpec("backup", cmd_backup, _options_backup),
        CommandSpec("install-cron", cmd_install_cron, _options_install_cron),
        CommandSpec("snapshot", cmd_snapshot, _options_snapshot),
        CommandSpec("prune", cmd_prune, _options_prune),
        CommandSpec("restore", cmd_restore, _options_restore),
        CommandSpec("status", cmd_status, _options_status),
        # main() hands simulate's words over before argparse sees them; its run
        # serves a parse that reaches it anyway (its words then start with no option).
        CommandSpec("simulate", lambda args: cmd_simulate(args.words), _options_simulate, verbose=False, add_help=False),
        CommandSpec("receive", cmd_receive, _options_receive),
        CommandSpec("setup-server", cmd_setup_server, _options_setup_server),
        CommandSpec("setup-host", cmd_setup_host, _options_setup_host),
        CommandSpec("setup-client", cmd_setup_client, _options_setup_client),
    ]


def build_parser(only: Optional[str] = None) -> argparse.ArgumentParser:
    """The command line: one subparser per command that works.

    only: that command's subparser alone, for a command line that names it (main):
    it parses that line as the whole parser does, and the other subparsers cost
    each start ~2 ms, three starts a backup (issue 14).  A name that is no command
    gets the whole parser, whose error lists the commands."""
    parser = argparse.ArgumentParser(
        prog="byteback", description="Maintenance-free client/server backups: rsync over "
        "OpenSSH into read-only snapshots that are pruned automatically.",
        epilog="Exit codes: 0 ok, 1 failure, 2 usage (status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN).")
    parser.add_argument("--version", action="version", version=f"byteback {VERSION}")
    parser.add_argument("--config-dir", metavar="DIR",
                        help="configuration directory (default: $BYTEBACK_CONFIG_DIR or /etc/byteback)")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    every = commands()
    for command in [c for c in every if c.name == only] or every:
        p = sub.add_parser(command.name, help=command.help, description=command.description,
                           add_help=command.add_help)
        if command.verbose:
            _add_common(p)
        command.options(p)
        p.set_defaults(func=command.run)
    return parser


# The options that stand before the command; NOTE: build_parser adds exactly these.
GLOBAL_OPTIONS_WITH_VALUE = ("--config-dir",)
GLOBAL_FLAGS = ("--version", "-h", "--help")


def _command_index(argv: Sequence[str]) -> Optional[int]:
    """Where the command stands in argv, after the global options; None when something else does.

    Anything but a global option before the command (say `byteback -v simulate`)
    is left to argparse, which refuses it as it refuses it before any command.
    """
    i = 0
    while i < len(argv):
        word = argv[i]
        if word in GLOBAL_OPTIONS_WITH_VALUE:
            i += 2
        elif word in GLOBAL_FLAGS or word.startswith(tuple(o + "=" for o in GLOBAL_OPTIONS_WITH_VALUE)):
            i += 1
        elif word.startswith("-"):
            return None
        else:
            return i
    return None


def cmd_simulate(words: Sequence[str]) -> int:
    """simulate: hand the words to the simulator package shipped beside this module."""
    try:
        from simulate import cli
    except ImportError:
        print("byteback: the simulator (simulate/) is not in this copy; use byteback.pyz "
              "or a checkout of the repository", file=sys.stderr)
        return EXIT_FAILURE
    return cli.main(list(words))


def main(argv: Optional[Sequence[str]] = None, context: Optional[Context] = None) -> int:
    """Parse, dispatch, and map failures to exit codes; the only place they are printed.

    context: the process's own unless given; every command finds it in args.context."""
    context = context or process_context()
    if running_under_sudo(context.euid):
        scrub_environment(os.environ)
    argv = list(sys.argv[1:] if argv is None else argv)
    command_at = _command_index(argv)
    # The whole parser wherever its help or its list of commands may be shown.
    named = argv[command_at] if command_at is not None and not set(argv[:command_at]) & set(GLOBAL_FLAGS) else None
    parser = build_parser(named)
    if command_at is not None and argv[command_at] == "simulate":
        # Its own parser sees its words untouched (argparse's REMAINDER would
        # drop a leading --help).  Loaded only here: cron's backup never needs it.
        return cmd_simulate(argv[command_at + 1:])
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:          # argparse: --help (0) or a usage error (2)
        code = int(e.code or 0)
        # A monitoring system reads 2 as CRITICAL: status's bad arguments are UNKNOWN.
        is_status = command_at is not None and argv[command_at] == "status"
        return NAGIOS_UNKNOWN if code == EXIT_USAGE and is_status else code
    if not getattr(args, "config_dir", None):
        args.config_dir = os.environ.get("BYTEBACK_CONFIG_DIR") or DEFAULT_CONFIG_DIR
    args.context = context
    setup_logging(getattr(args, "verbose", 0), quiet=args.command in QUIET_COMMANDS)
    unknown = NAGIOS_UNKNOWN if args.command == "status" else None
    try:
        return int(args.func(args) or EXIT_OK)
    except ByteBackError as e:
        log.error("%s", e, extra={"stderr_only": e.logged})
        return unknown or e.exit_code
    except KeyboardInterrupt:
        log.error("interrupted")
        return unknown or 130
    except OSError as e:
        # The system said no (permissions, a full disc, a path that vanished):
        # an expected failure, so one line that names the file; -vv shows where.
        where = f" ({e.filename})" if e.filename else ""
        log.error("%s%s; check the permissions and free space there", e.strerror or e, where)
        log.debug("details", exc_info=True)
        return unknown or EXIT_FAILURE
    except Exception:
        import traceback
        traceback.print_exc()
        log.critical("internal error in %s; please report it with the traceback above", args.command)
        return unknown or EXIT_FAILURE


if __name__ == "__main__":
    sys.modules.setdefault("byteback", sys.modules[__name__])
    end_process(main())
