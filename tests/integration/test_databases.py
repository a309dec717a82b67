"""Databases that restore (issue 12): `backup` copies running servers consistently.

Real MariaDB and PostgreSQL servers (dbservers.py) run on a btrfs subvolume
(a loop file) or on a plain directory while a writer moves money between
accounts.  `byteback backup` (the real program, to a local store) must pick
the method for the layout, send a consistent copy at the datadir's own path,
and leave the live server alone.  Every copy is restored by starting a server
on it: the sum of balances holds, the ledger has no gaps, and
mariadb-check / pg_amcheck find nothing.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import time
from pathlib import Path
from typing import Iterator

import pytest

from dbservers import MariaDB, Postgres, Writer, open_tempdir, restore_and_check, skip_reason, slow_write
from remote_env import remote_byteback
from sshd_env import _sigterm_as_interrupt, _skip_or_check, btrfs_mount
from test_local_backup import Env, _btrfs_skip_reason, _require_rsync, in_snapshot

pytestmark = pytest.mark.integration

LOCK_TIMEOUT = 1.0       # the default lock_wait_timeout


@pytest.fixture
def machine(tmp_path) -> Iterator[dict]:
    """A btrfs for datadirs, a plain directory for others, and a local store with its config."""
    reason = skip_reason() or _btrfs_skip_reason()
    if reason:
        pytest.skip(reason)
    _require_rsync()
    plain = open_tempdir("bbtest-db-plain-")
    store = open_tempdir("bbtest-db-store-")
    try:
        with btrfs_mount("600M") as mnt:
            env = Env("hardlink", store, Path(os.path.realpath(tmp_path)))
            yield {"btrfs": mnt, "plain": plain, "env": env, "servers": []}
    finally:
        shutil.rmtree(plain, ignore_errors=True)
        shutil.rmtree(store, ignore_errors=True)


@contextlib.contextmanager
def running(server):
    try:
        yield server.start()
    finally:
        server.stop()


def make_subvolume(path: Path) -> Path:
    subprocess.run(["btrfs", "subvolume", "create", str(path)], check=True, capture_output=True)
    return path


def backup(env: Env, source: Path, *, check: bool = True) -> tuple:
    proc = env.backup("dbhost", source, check=check)
    state = json.loads((env.state / "last-backup.json").read_text())["last_attempt"]
    return proc, {r["datadir"]: r for r in state.get("databases", [])}


def latest_copy(env: Env, datadir: Path) -> Path:
    return in_snapshot(env.snap("dbhost", env.snapshots("dbhost")[-1]), datadir)


def leftovers(*dirs: Path) -> list:
    return [p for d in dirs for p in d.rglob(".byteback-db-snapshot-*")] if dirs else []


# === the btrfs snapshot: MariaDB under its backup lock, PostgreSQL without one ===

@pytest.mark.parametrize("server_class", [MariaDB, Postgres], ids=["mariadb", "postgresql"])
def test_snapshot_on_btrfs_restores_and_barely_stalls_writers(machine, server_class):
    env, mnt = machine["env"], machine["btrfs"]
    datadir = make_subvolume(mnt / "data")
    server = server_class(datadir, mnt / "run")
    with running(server):
        server.create_bank()
        writer = Writer(server).start()
        before = writer.done
        proc, results = backup(env, mnt)
        longest = writer.stop()
        result = results[str(datadir)]
        assert result["method"] == "snapshot" and result["warning"] == "", results
        assert not leftovers(mnt), "the snapshot was not removed after the backup"
        copy = latest_copy(env, datadir)
        # The 100 ms target is measured by tests/bench/test_database_bench.py on a
        # quiet machine; here, on one shared with other tests, only a gross
        # stall (the lock held for its whole timeout) fails.
        print(f"{server.kind}: longest transfer during the backup {longest * 1000:.0f} ms, "
              f"backup lock held {result['lock_seconds'] * 1000:.0f} ms")
        assert result["lock_seconds"] < LOCK_TIMEOUT and longest < LOCK_TIMEOUT + 1
        live_count = server.check_invariant()
    assert restore_and_check(server, copy, at_least=before) <= live_count


def test_datadir_inside_a_bigger_subvolume_is_snapshotted_too(machine):
    """A datadir that is a plain directory of a subvolume (say / on btrfs): that subvolume is snapshotted."""
    env, mnt = machine["env"], machine["btrfs"]
    datadir = mnt / "var" / "lib" / "postgresql"
    server = Postgres(datadir, mnt / "run")
    with running(server):
        server.create_bank()
        writer = Writer(server).start()
        _, results = backup(env, mnt / "var")
        writer.stop()
        assert results[str(datadir)]["method"] == "snapshot", results
        assert not leftovers(mnt)
    restore_and_check(server, latest_copy(env, datadir), tables=False)


# === without btrfs: the servers' own hot-backup tools =========================

@pytest.mark.parametrize("server_class,method", [(MariaDB, "mariabackup"), (Postgres, "basebackup")],
                         ids=["mariabackup", "pg_basebackup"])
def test_hot_backup_tool_on_a_plain_directory(machine, server_class, method):
    env, plain = machine["env"], machine["plain"]
    datadir = plain / "data"
    server = server_class(datadir, plain / "run")
    with running(server):
        server.create_bank()
        writer = Writer(server).start()
        before = writer.done
        _, results = backup(env, plain)
        writer.stop()
        assert results[str(datadir)]["method"] == method, results
        assert results[str(datadir)]["warning"] == ""
        copies = Path("/var/lib/byteback/database-copies")
        assert not copies.exists() or not any(copies.iterdir()), "the copy was not removed"
    restore_and_check(server, latest_copy(env, datadir), at_least=before)


def test_mariabackup_never_copies_what_the_database_user_cannot_read(machine, tmp_path):
    """The datadir is its owner's to fill: a table file symlinked to a root-only file must
    not bring that file into the backup (mariabackup runs as the owner, never as root)."""
    env, plain = machine["env"], machine["plain"]
    (env.cfg / "databases").write_text("mariadb_method = mariabackup, dump\n")
    secret = tmp_path / "root-only"
    secret.write_text("root's secret\n")
    os.chmod(secret, 0o600)
    datadir = plain / "data"
    server = MariaDB(datadir, plain / "run")
    with running(server):
        server.create_bank()
        server.sql("CREATE TABLE bank.planted (x INT) ENGINE=MyISAM")
        server.sql("FLUSH TABLES")
        planted = datadir / "bank" / "planted.MYD"
        planted.unlink()
        planted.symlink_to(secret)          # what the database's user may do to its own files
        os.lchown(planted, *(lambda st: (st.st_uid, st.st_gid))(os.stat(datadir)))
        backup(env, plain, check=False)     # mariabackup cannot read it; what follows may fail too
    snapshot = env.snap("dbhost", env.snapshots("dbhost")[-1])
    leaked = [p for p in snapshot.rglob("*") if p.is_file() and not p.is_symlink()
              and b"root's secret" in p.read_bytes()]
    assert not leaked, leaked


def test_dump_names_the_tables_it_cannot_keep_in_step(machine):
    env, plain = machine["env"], machine["plain"]
    (env.cfg / "databases").write_text("mariadb_method = dump\n")
    datadir = plain / "data"
    server = MariaDB(datadir, plain / "run")
    with running(server):
        server.create_bank()
        server.sql("CREATE TABLE bank.notes (x INT) ENGINE=MyISAM")
        writer = Writer(server).start()
        before = writer.done
        proc, results = backup(env, plain)
        writer.stop()
        result = results[str(datadir)]
        assert result["method"] == "dump" and "bank.notes (MyISAM)" in result["warning"], result
        snap = env.snap("dbhost", env.snapshots("dbhost")[-1])
        dump = in_snapshot(snap, Path(str(datadir) + ".byteback-dump.sql"))
        assert dump.is_file() and not os.listdir(in_snapshot(snap, datadir)), \
            "the dump is beside the datadir and the live files stay out"
        status = env.run("status")
        assert status.returncode == 1 and "bank.notes (MyISAM)" in status.stdout, status.stdout
    base = open_tempdir("bbtest-db-restore-")
    try:
        fresh = MariaDB(base / "data", base / "run").start()
        try:
            with open(dump) as f:
                subprocess.run(["mariadb", "--no-defaults", f"--socket={fresh.socket}", "-u", "root"],
                               stdin=f, check=True, capture_output=True, timeout=120)
            fresh.check_invariant(at_least=before)
        finally:
            fresh.stop()
    finally:
        shutil.rmtree(base, ignore_errors=True)


# === faults ===================================================================

def test_a_long_write_holding_the_lock_gives_a_warning_not_a_stall(machine):
    env, mnt = machine["env"], machine["btrfs"]
    (env.cfg / "databases").write_text("mariadb_method = snapshot\nlock_wait_timeout = 1\nlock_tries = 2\n")
    datadir = make_subvolume(mnt / "data")
    server = MariaDB(datadir, mnt / "run")
    with running(server):
        server.create_bank()
        with slow_write(server):
            writer = Writer(server).start()
            writer.reset_longest()
            started = time.monotonic()
            proc, results = backup(env, mnt)
            took = time.monotonic() - started
            longest = writer.stop()
        result = results[str(datadir)]
        assert result["method"] == "none" and "long-running write" in result["warning"], result
        assert "long-running write" in proc.stderr
        assert longest <= 1.0 + 0.5, f"a writer was stalled {longest:.2f}s, longer than the lock timeout"
        assert took < 15, f"the backup took {took:.1f}s"
        status = env.run("status", "--nagios")
        assert status.returncode == 1 and "WARNING" in status.stdout, status.stdout
        assert env.snapshots("dbhost"), "the files were still backed up"


def test_database_going_away_mid_backup_still_backs_the_files_up(machine):
    env, mnt = machine["env"], machine["btrfs"]
    (env.cfg / "databases").write_text("mariadb_method = snapshot\nlock_wait_timeout = 5\nlock_tries = 1\n")
    datadir = make_subvolume(mnt / "data")
    server = MariaDB(datadir, mnt / "run")
    with running(server):
        server.create_bank()
        with slow_write(server):
            env._next_second("dbhost")
            run = subprocess.Popen(env.argv(*env.backup_argv("dbhost", mnt)), env=env.env(),
                                   stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            time.sleep(2)          # the backup waits for its lock behind the slow write
            server.kill()          # and the server dies under it
            out, err = run.communicate(timeout=120)
        assert run.returncode == 0, err
        state = json.loads((env.state / "last-backup.json").read_text())["last_attempt"]
        result = {r["datadir"]: r for r in state["databases"]}[str(datadir)]
        assert result["method"] == "none" and result["warning"], result
        assert env.snapshots("dbhost") and in_snapshot(env.snap("dbhost", env.snapshots("dbhost")[-1]),
                                                       datadir / "ibdata1").exists(), \
            "the files were not backed up"


def test_a_stale_snapshot_from_a_killed_run_is_removed(machine):
    env, mnt = machine["env"], machine["btrfs"]
    datadir = make_subvolume(mnt / "data")
    server = Postgres(datadir, mnt / "run")
    with running(server):
        server.create_bank()
        # A run killed after its snapshot: the snapshot and the note of it remain.
        stale = mnt / ".byteback-db-snapshot-stale"
        subprocess.run(["btrfs", "subvolume", "snapshot", "-r", str(datadir), str(stale)],
                       check=True, capture_output=True)
        (env.state / "database-copies.json").write_text(json.dumps([str(stale)]))
        proc, results = backup(env, mnt)
        assert results[str(datadir)]["method"] == "snapshot"
        assert not stale.exists(), "the stale snapshot is still there"
        assert "left by a backup that did not finish" in proc.stderr
        assert not leftovers(mnt)
        snap = env.snap("dbhost", env.snapshots("dbhost")[-1])
        assert not in_snapshot(snap, stale).exists(), "a snapshot was backed up"


# === over ssh, restored with byteback's own restore ===========================

def test_remote_backup_through_sshd_restores_with_the_restore_command(machine):
    """The real forced command receives the copy like any file; `restore --database` puts it back."""
    _skip_or_check()
    mnt = machine["btrfs"]
    datadir = make_subvolume(mnt / "data")
    server = MariaDB(datadir, mnt / "run")
    with _sigterm_as_interrupt(), remote_byteback() as remote, running(server):
        server.create_bank()
        writer = Writer(server).start()
        before = writer.done
        remote.backup("--source", str(mnt)).check()
        writer.stop()
        state = json.loads((remote.client_state / "last-backup.json").read_text())["last_attempt"]
        result = {r["datadir"]: r for r in state["databases"]}[str(datadir)]
        assert result["method"] == "snapshot" and not result["warning"], result
        assert not leftovers(mnt)
        # README's restore, in one command: refused while the server runs ...
        refused = remote.run("restore", "--database", "--restore", str(datadir))
        assert refused.returncode == 1 and "stop it first" in refused.stderr, refused.stderr
        server.stop()
        # ... then the live datadir moves aside and the snapshot's copy takes its place.
        remote.run("restore", "--database", "--restore", str(datadir)).check()
        snapshot = remote.snapshots()[-1]
        assert (mnt / f"data.before-{snapshot}" / "ibdata1").exists(), "the old datadir was not kept"
        server.start(install=False)
        assert server.check_invariant(at_least=before) <= writer.done
        server.check_tables()
