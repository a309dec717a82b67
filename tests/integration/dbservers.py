"""Real MariaDB and PostgreSQL servers for the database tests, started without systemd.

Each server gets its own datadir (mariadb-install-db / initdb) and a run
directory for its unix socket; no TCP (--skip-networking, listen_addresses='').
A Writer runs transactions through byteback's own SqlSession (one client kept
open on a pipe) while a backup runs, timing each one, so a test can check both
the invariant of what was restored and how long writers were held up:

    accounts(id, balance)   transfers keep the sum at ACCOUNTS * START_BALANCE
    ledger(n)               one row per committed transfer, n = 1, 2, 3... (no gaps)
"""
from __future__ import annotations

import atexit
import contextlib
import os
import pwd
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator, List, Optional

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
import byteback  # noqa: E402  (the program's own client session)
from sshd_env import wait_for  # noqa: E402

ACCOUNTS, START_BALANCE = 20, 1000
# Debian keeps each PostgreSQL version's programs apart; take the newest installed.
PG_BIN = max(Path("/usr/lib/postgresql").glob("*/bin"), key=lambda p: int(p.parent.name)
             if p.parent.name.isdigit() else 0, default=Path("/usr/lib/postgresql/15/bin"))
# Commits are written to the OS at once but not waited for on the disc: on a
# loop file of a shared machine a flush alone can take over 100 ms, which would
# hide the stall the backup causes (the lock) under the disc's.  Snapshots
# still see every write (btrfs flushes a subvolume's dirty data before it
# snapshots it), so what was committed is in the copy.
NO_FLUSH_WAIT = {"mariadb": ["--innodb-flush-log-at-trx-commit=2"],
                 "postgresql": ["-c", "fsync=off"]}


def skip_reason() -> Optional[str]:
    """Why this machine cannot run the database tests, or None."""
    if os.geteuid() != 0:
        return "needs root: starts database servers as their own users and bind-mounts copies"
    for program in ("mariadbd", "mariadb-install-db", "mariadb", "mariabackup", "mariadb-check"):
        if shutil.which(program) is None and not os.path.exists(f"/usr/sbin/{program}"):
            return f"{program} not found: apt-get install mariadb-server mariadb-backup"
    if not (PG_BIN / "postgres").exists():
        return f"{PG_BIN}/postgres not found: apt-get install postgresql"
    for user in ("mysql", "postgres"):
        try:
            pwd.getpwnam(user)
        except KeyError:
            return f"no {user} user: the Debian packages create it"
    return None


def open_tempdir(prefix: str) -> Path:
    """A temp dir every user can traverse (servers run as mysql/postgres)."""
    path = Path(tempfile.mkdtemp(prefix=prefix))
    os.chmod(path, 0o755)
    return path


def _chown_tree(path: Path, user: str) -> None:
    subprocess.run(["chown", "-R", f"{user}:{user}", str(path)], check=True)


_TEMPLATES: dict = {}      # kind -> a freshly installed datadir, copied for each server


def _from_template(server: "Server", install) -> None:
    """Fill server.datadir with a copy of a datadir installed once per test run."""
    if server.kind not in _TEMPLATES:
        base = open_tempdir(f"bbtest-db-template-{server.kind}-")
        atexit.register(shutil.rmtree, base, True)
        template = base / "data"
        template.mkdir()
        shutil.chown(template, server.user, server.user)
        os.chmod(template, 0o700)
        install(template)
        _TEMPLATES[server.kind] = template
    subprocess.run(["cp", "-a", f"{_TEMPLATES[server.kind]}/.", str(server.datadir)], check=True)


class Server:
    """Common parts: a datadir, a run dir, a process; stop() is idempotent."""
    user = ""
    kind = ""

    def __init__(self, datadir: Path, rundir: Path):
        self.datadir, self.rundir = Path(datadir), Path(rundir)
        self.proc: Optional[subprocess.Popen] = None

    def _prepare_dirs(self) -> None:
        for d in (self.datadir, self.rundir):
            d.mkdir(parents=True, exist_ok=True)
            shutil.chown(d, self.user, self.user)

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def kill(self) -> None:
        """Gone at once (the database 'going away')."""
        if self.proc:
            self.proc.kill()
            self.proc.wait()
            self.proc = None

    def log(self) -> str:
        path = self.rundir / "server.log"
        return path.read_text(errors="replace")[-3000:] if path.exists() else ""

    def session(self) -> byteback.SqlSession:
        raise NotImplementedError

    def sql(self, statement: str) -> List[str]:
        with self.session() as s:
            return s.query(statement)

    def check_invariant(self, at_least: int = 0) -> int:
        """The transfers' invariants hold; returns how many transfers the copy holds."""
        total = int(self.sql("SELECT SUM(balance) FROM bank.accounts" if self.kind == "mariadb"
                             else "SELECT SUM(balance) FROM accounts")[0])
        count, top = (int(x) for x in self.sql(
            "SELECT COUNT(*), COALESCE(MAX(n), 0) FROM " + ("bank.ledger" if self.kind == "mariadb"
                                                             else "ledger"))[0].replace("|", "\t").split("\t"))
        assert total == ACCOUNTS * START_BALANCE, f"the sum of balances is {total}, not {ACCOUNTS * START_BALANCE}"
        assert count == top, f"the ledger has {count} rows but goes up to {top}: a gap"
        assert count >= at_least, f"the copy holds {count} transfers, fewer than the {at_least} before the backup"
        return count


class MariaDB(Server):
    user, kind = "mysql", "mariadb"

    @property
    def socket(self) -> Path:
        return self.rundir / "mysqld.sock"

    def start(self, *, install: bool = True) -> "MariaDB":
        self._prepare_dirs()
        if install and not (self.datadir / "mysql").exists():
            _from_template(self, lambda d: subprocess.run(
                ["mariadb-install-db", "--no-defaults", f"--user={self.user}", f"--datadir={d}",
                 "--auth-root-authentication-method=socket", "--skip-test-db"],
                check=True, capture_output=True, timeout=120))
        # Datadir and socket in a my.cnf, not on the command line, as Debian's
        # server runs: byteback must find them in /proc (cwd, open sockets).
        config = self.rundir / "my.cnf"
        config.write_text(f"[mysqld]\ndatadir = {self.datadir}\nsocket = {self.socket}\n"
                          f"pid-file = {self.rundir / 'mysqld.pid'}\nlog-error = {self.rundir / 'server.log'}\n"
                          "skip-networking\ninnodb-buffer-pool-size = 32M\ninnodb-log-file-size = 16M\n")
        self.proc = subprocess.Popen(
            ["mariadbd", f"--defaults-file={config}", f"--user={self.user}", *NO_FLUSH_WAIT["mariadb"]],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        wait_for(self._answers, 60, f"mariadbd on {self.datadir} (log: {self.rundir / 'server.log'})")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"mariadbd exited {self.proc.returncode}:\n{self.log()}")
        return subprocess.run(["mariadb", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                               "-e", "SELECT 1"], capture_output=True).returncode == 0

    def database(self) -> byteback.Database:
        return byteback.Database("mariadb", self.proc.pid, str(self.datadir), str(self.socket), None, self.user)

    def session(self) -> byteback.SqlSession:
        return byteback.SqlSession.mariadb(self.database(), byteback.DatabaseConfig())

    def create_bank(self, *, engine: str = "InnoDB") -> None:
        with self.session() as s:
            s.query("CREATE DATABASE bank")
            s.query(f"CREATE TABLE bank.accounts (id INT PRIMARY KEY, balance INT NOT NULL) ENGINE={engine}")
            s.query(f"CREATE TABLE bank.ledger (n INT PRIMARY KEY) ENGINE={engine}")
            s.query("INSERT INTO bank.accounts VALUES " + ",".join(
                f"({i}, {START_BALANCE})" for i in range(ACCOUNTS)))

    def transfer_sql(self, n: int, a: int, b: int) -> str:
        return (f"START TRANSACTION; UPDATE bank.accounts SET balance = balance - 7 WHERE id = {a}; "
                f"UPDATE bank.accounts SET balance = balance + 7 WHERE id = {b}; "
                f"INSERT INTO bank.ledger VALUES ({n}); COMMIT")

    def check_tables(self) -> None:
        proc = subprocess.run(["mariadb-check", "--no-defaults", f"--socket={self.socket}", "-u", "root",
                               "--all-databases"], capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, f"mariadb-check failed:\n{proc.stdout}\n{proc.stderr}"
        bad = [l for l in proc.stdout.splitlines() if l.strip() and not l.rstrip().endswith("OK")
               and not l.startswith(("note", "status", "Note", "Status"))]
        assert not bad, "mariadb-check found problems:\n" + "\n".join(bad)


class Postgres(Server):
    user, kind = "postgres", "postgresql"

    def start(self, *, install: bool = True) -> "Postgres":
        self._prepare_dirs()
        os.chmod(self.datadir, 0o700)
        if install and not (self.datadir / "PG_VERSION").exists():
            _from_template(self, lambda d: subprocess.run(
                ["runuser", "-u", self.user, "--", str(PG_BIN / "initdb"), "-D", str(d),
                 "-A", "peer", "-U", self.user, "--no-sync"], check=True, capture_output=True, timeout=120))
        log = open(self.rundir / "server.log", "ab")
        self.proc = subprocess.Popen(
            ["runuser", "-u", self.user, "--", str(PG_BIN / "postgres"), "-D", str(self.datadir),
             "-c", "listen_addresses=", "-c", f"unix_socket_directories={self.rundir}",
             "-c", "shared_buffers=16MB", *NO_FLUSH_WAIT["postgresql"]],
            stdout=log, stderr=log)
        log.close()
        wait_for(self._answers, 60, f"postgres on {self.datadir}")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise AssertionError(f"postgres exited {self.proc.returncode}:\n{self.log()}")
        return subprocess.run(["runuser", "-u", self.user, "--", str(PG_BIN / "psql"), "-X", "-h", str(self.rundir),
                               "-d", "postgres", "-c", "SELECT 1"], capture_output=True).returncode == 0

    def database(self) -> byteback.Database:
        return byteback.Database("postgresql", 0, str(self.datadir), str(self.rundir), 5432, self.user,
                                 str(PG_BIN / "postgres"))

    def session(self) -> byteback.SqlSession:
        return byteback.SqlSession.postgres(self.database())

    def create_bank(self) -> None:
        with self.session() as s:
            s.query("CREATE TABLE accounts (id INT PRIMARY KEY, balance INT NOT NULL)")
            s.query("CREATE TABLE ledger (n INT PRIMARY KEY)")
            s.query("INSERT INTO accounts SELECT i, %d FROM generate_series(0, %d) i" % (START_BALANCE, ACCOUNTS - 1))

    def transfer_sql(self, n: int, a: int, b: int) -> str:
        return (f"BEGIN; UPDATE accounts SET balance = balance - 7 WHERE id = {a}; "
                f"UPDATE accounts SET balance = balance + 7 WHERE id = {b}; "
                f"INSERT INTO ledger VALUES ({n}); COMMIT")

    def check_tables(self) -> None:
        proc = subprocess.run(["runuser", "-u", self.user, "--", str(PG_BIN / "pg_amcheck"), "-h", str(self.rundir),
                               "--all", "--install-missing", "--heapallindexed"],
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0 and not proc.stdout.strip(), \
            f"pg_amcheck found problems (exit {proc.returncode}):\n{proc.stdout}\n{proc.stderr}"


class Writer:
    """Transfers in a thread, each timed; stop() returns the longest one in seconds."""

    def __init__(self, server: Server):
        self.server, self.done = server, 0
        self.longest, self.error = 0.0, None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> "Writer":
        self._thread.start()
        wait_for(lambda: self.done >= 20 or self.error, 30, "the writer's first transfers")
        return self

    def _run(self) -> None:
        try:
            with self.server.session() as s:
                n = 0
                while not self._stop.is_set():
                    n += 1
                    sql = self.server.transfer_sql(n, n % ACCOUNTS, (n * 7 + 3) % ACCOUNTS)
                    started = time.monotonic()
                    s.query(sql)
                    self.longest = max(self.longest, time.monotonic() - started)
                    self.done = n
        except Exception as e:       # noqa: BLE001  (reported by stop())
            self.error = e

    def reset_longest(self) -> None:
        self.longest = 0.0

    def stop(self, *, allow_error: bool = False) -> float:
        self._stop.set()
        self._thread.join(timeout=60)
        if self.error and not allow_error:
            raise AssertionError(f"the writer failed: {self.error}")
        return self.longest


def restore_and_check(server: Server, copy: Path, *, at_least: int = 0, tables: bool = True) -> int:
    """Copy a datadir out of a snapshot (README's restore steps), start a server on it, check it.

    Returns the number of transfers the copy holds.
    """
    base = open_tempdir("bbtest-db-restore-")
    try:
        datadir = base / "data"
        subprocess.run(["cp", "-a", str(copy), str(datadir)], check=True)
        _chown_tree(datadir, server.user)
        restored = type(server)(datadir, base / "run").start(install=False)
        try:
            count = restored.check_invariant(at_least=at_least)
            if tables:
                restored.check_tables()
            return count
        finally:
            restored.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


@contextlib.contextmanager
def slow_write(server: "MariaDB", seconds: int = 20) -> Iterator[None]:
    """A long write to a non-transactional table: it keeps BACKUP STAGE BLOCK_COMMIT waiting."""
    server.sql("CREATE TABLE IF NOT EXISTS bank.slow (x INT) ENGINE=MyISAM")
    proc = subprocess.Popen(["mariadb", "--no-defaults", f"--socket={server.socket}", "-u", "root", "-e",
                             f"INSERT INTO bank.slow SELECT SLEEP({seconds})"], stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        yield
    finally:
        proc.kill()
        proc.wait()
