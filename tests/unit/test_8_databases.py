"""Section 8c: the database phase's pure parts (/proc parsing, versions, method choice, config)."""
from __future__ import annotations

import pytest

import byteback
from byteback import ByteBackError

# -- /proc contents --


def test_parse_proc_cmdline_splits_on_nul_and_keeps_odd_bytes():
    raw = b"/usr/sbin/mariadbd\0--datadir=/srv/my sql\0--socket\0/run/x.sock\0\xff\0"
    assert byteback.parse_proc_cmdline(raw) == [
        "/usr/sbin/mariadbd", "--datadir=/srv/my sql", "--socket", "/run/x.sock", "\udcff"]
    assert byteback.parse_proc_cmdline(b"") == []


@pytest.mark.parametrize("argv,datadir,socket", [
    (["mariadbd"], None, None),
    (["mariadbd", "--datadir=/d", "--socket=/s"], "/d", "/s"),
    (["mariadbd", "--datadir", "/d", "--socket", "/s"], "/d", "/s"),
    (["mysqld", "--data_dir=/x", "-h/d"], "/d", None),     # '_' is '-'; -h is the datadir's short form
    (["mysqld", "-h", "/d", "--user=mysql"], "/d", None),
    (["mariadbd", "--datadir=/a", "--datadir=/b"], "/b", None),   # the last one wins, as in the server
    (["mariadbd", "--basedir=/usr", "--pid-file=/run/p"], None, None),
])
def test_mysqld_options(argv, datadir, socket):
    assert byteback.mysqld_options(argv) == {"datadir": datadir, "socket": socket}


@pytest.mark.parametrize("argv,environ,expected", [
    (["/usr/lib/postgresql/15/bin/postgres", "-D", "/var/lib/postgresql/15/main",
      "-c", "config_file=/etc/postgresql/15/main/postgresql.conf"], {}, "/var/lib/postgresql/15/main"),
    (["postgres", "-D/srv/pg"], {}, "/srv/pg"),
    (["postgres"], {"PGDATA": "/srv/env"}, "/srv/env"),
    (["postgres", "-c", "port=5433"], {}, None),
])
def test_postgres_datadir(argv, environ, expected):
    assert byteback.postgres_datadir(argv, environ) == expected


def test_parse_environ():
    assert byteback.parse_environ(b"A=1\0PGDATA=/x=y\0junk\0") == {"A": "1", "PGDATA": "/x=y"}


def test_parse_postmaster_pid():
    text = "4242\n/var/lib/postgresql/15/main\n1764600000\n5433\n/var/run/postgresql,/tmp\n*\n  1 2\nready   \n"
    assert byteback.parse_postmaster_pid(text) == (4242, "/var/lib/postgresql/15/main", 5433,
                                                   "/var/run/postgresql")
    with pytest.raises(ValueError):
        byteback.parse_postmaster_pid("4242\n/x\n")
    with pytest.raises(ValueError):
        byteback.parse_postmaster_pid("pid\n/x\n1\nport\n/s\n")


def test_parse_unix_sockets_takes_listening_sockets_of_the_process_only():
    text = ("Num       RefCount Protocol Flags    Type St Inode Path\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 1001 /run/mysqld/mysqld.sock\n"
            "0000000000000000: 00000003 00000000 00000000 0001 03 1002 /run/mysqld/mysqld.sock\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 1003 /run/other.sock\n"
            "0000000000000000: 00000002 00000000 00010000 0001 01 1004 @abstract\n")
    assert byteback.parse_unix_sockets(text, [1001, 1002, 1004]) == ["/run/mysqld/mysqld.sock"]
    assert byteback.parse_unix_sockets(text, []) == []


# -- versions and the lock --

@pytest.mark.parametrize("version,expected", [
    ("10.11.19-MariaDB-0+deb12u1", (True, (10, 11, 19))),
    ("5.5.5-10.3.39-MariaDB", (True, (5, 5, 5))),
    ("8.0.36", (False, (8, 0, 36))),
])
def test_parse_mysql_version(version, expected):
    assert byteback.parse_mysql_version(version) == expected


def test_parse_mysql_version_refuses_garbage():
    with pytest.raises(ValueError):
        byteback.parse_mysql_version("unknown")


@pytest.mark.parametrize("version,lock,unlock", [
    ("10.11.19-MariaDB", ("SET SESSION lock_wait_timeout = 2", "BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"),
     ("BACKUP STAGE END",)),
    ("10.4.0-MariaDB", ("SET SESSION lock_wait_timeout = 2", "BACKUP STAGE START", "BACKUP STAGE BLOCK_COMMIT"),
     ("BACKUP STAGE END",)),
    ("10.3.39-MariaDB", ("SET SESSION lock_wait_timeout = 2", "FLUSH TABLES WITH READ LOCK"), ("UNLOCK TABLES",)),
    ("8.0.36", ("SET SESSION lock_wait_timeout = 2", "FLUSH TABLES WITH READ LOCK"), ("UNLOCK TABLES",)),
])
def test_backup_lock_statements(version, lock, unlock):
    assert byteback.backup_lock_statements(version, 2) == (lock, unlock)


# -- choosing the method --

def _have(*programs):
    return lambda p: p in programs


@pytest.mark.parametrize("kind,configured,subvolume,have,expected", [
    ("mariadb", ("auto",), True, _have("mariabackup", "mariadb-dump"), ["snapshot", "mariabackup", "dump"]),
    ("mariadb", ("auto",), False, _have("mariabackup", "mariadb-dump"), ["mariabackup", "dump"]),
    ("mariadb", ("auto",), False, _have("mariadb-dump"), ["dump"]),
    ("mysql", ("auto",), False, _have("mysqldump"), ["dump"]),
    ("mariadb", ("auto",), False, _have(), []),
    ("postgresql", ("auto",), True, _have("pg_basebackup"), ["snapshot", "basebackup"]),
    ("postgresql", ("auto",), False, _have("pg_basebackup"), ["basebackup"]),
    ("postgresql", ("dump", "basebackup"), True, _have(), ["basebackup"]),   # no dump for PostgreSQL
    ("mariadb", ("dump",), True, _have(), ["dump"]),      # configured: tried, and its failure said
    ("mariadb", ("off",), True, _have("mariabackup"), []),
])
def test_choose_methods(kind, configured, subvolume, have, expected):
    assert byteback.choose_methods(kind, configured, on_one_subvolume=subvolume, have=have) == expected


def test_paths_outside_takes_relative_paths_from_the_datadir():
    assert byteback.paths_outside("/var/lib/mysql", ["./", "/var/lib/mysql/logs", "../mysql-logs",
                                                     "/srv/ibdata"]) == ["../mysql-logs", "/srv/ibdata"]


@pytest.mark.parametrize("datadir,subvolume,mounts,where", [
    ("/var/lib/mysql", "/var/lib/mysql", ["/"], "/var/lib/" + byteback.DB_SNAPSHOT_PREFIX),
    ("/var/lib/mysql", "/", ["/"], "/" + byteback.DB_SNAPSHOT_PREFIX),
    ("/srv/db/pg", "/srv/db", ["/", "/srv/db"], "/srv/db/" + byteback.DB_SNAPSHOT_PREFIX),
    ("/srv/db", "/srv/db", ["/", "/srv/db"], None),     # only inside the datadir: nowhere
])
def test_snapshot_place_is_never_inside_the_datadir(datadir, subvolume, mounts, where):
    place = byteback.snapshot_place(datadir, subvolume, mounts)
    if where is None:
        assert place is None
    else:
        assert place.startswith(where) and not byteback._is_within(place, datadir)
        assert place == byteback.snapshot_place(datadir, subvolume, mounts)     # stable: found again


def test_path_tag_is_stable_and_safe():
    assert byteback.path_tag("/var/lib/my sql") == byteback.path_tag("/var/lib/my sql/")
    assert byteback.path_tag("/var/lib/my sql").startswith("my_sql-")
    assert byteback.path_tag("/a/data") != byteback.path_tag("/b/data")


def test_databases_in_sources():
    dbs = [byteback.Database("mariadb", 1, "/var/lib/mysql", "/s", None, "mysql"),
           byteback.Database("postgresql", 2, "/srv/pg", "/run", 5432, "postgres")]
    assert byteback.databases_in_sources(dbs, ["/"]) == dbs
    assert byteback.databases_in_sources(dbs, ["/var"]) == dbs[:1]
    assert byteback.databases_in_sources(dbs, ["/var/lib/mysql-old"]) == []


def test_database_warnings_for_status():
    results = [{"kind": "mariadb", "datadir": "/d", "warning": ""},
               {"kind": "postgresql", "datadir": "/p", "warning": "lock timed out"}, "garbage"]
    assert byteback.database_warnings(results) == ["postgresql /p: lock timed out"]


# -- the databases file --

def test_parse_database_config_defaults_and_values():
    assert byteback.parse_database_config("") == byteback.DatabaseConfig()
    config = byteback.parse_database_config(
        "# comment\nenabled = no\nmariadb_method = dump, mariabackup\npostgresql_method=off\n"
        "mariadb_defaults_file = /etc/mysql/debian.cnf\nlock_wait_timeout = 5\n")
    assert config.enabled is False
    assert config.mariadb_method == ("dump", "mariabackup")
    assert config.postgresql_method == ("off",)
    assert config.mariadb_defaults_file == "/etc/mysql/debian.cnf"
    assert config.lock_wait_timeout == 5


@pytest.mark.parametrize("text,message", [
    ("colour = blue\n", "line 1: unknown key 'colour'"),
    ("\nenabled\n", "line 2: not a 'key = value' line"),
    ("mariadb_method = fastest\n", "line 1: bad value for mariadb_method"),
    ("lock_wait_timeout = 0\n", "line 1: bad value for lock_wait_timeout"),
    ("mariadb_defaults_file = debian.cnf\n", "must be an absolute path"),
    ("enabled = maybe\n", "is not yes or no"),
])
def test_parse_database_config_errors_name_the_line(text, message):
    with pytest.raises(ByteBackError, match=message):
        byteback.parse_database_config(text, "databases")


def test_client_status_warns_of_a_database_without_a_consistent_copy():
    attempt = {"start": "2026-03-01T03:00:00+00:00", "end": "2026-03-01T03:01:00+00:00", "result": "ok",
               "databases": [{"kind": "mariadb", "datadir": "/var/lib/mysql", "method": "none",
                              "warning": "the backup lock timed out"}]}
    report = byteback.client_status({"last_attempt": attempt, "last_success": attempt},
                                    byteback.dt.datetime(2026, 3, 1, 4, tzinfo=byteback.dt.timezone.utc), False)
    assert report["database_warnings"] == ["mariadb /var/lib/mysql: the backup lock timed out"]


# -- the server's look at a snapshot's result file --

def _write_result(snapshot, text):
    path = snapshot / byteback.SNAPSHOT_DATABASES_RESULT
    path.parent.mkdir(parents=True)
    path.write_text(text)
    return path


def test_snapshot_database_warnings_reads_the_clients_result(tmp_path):
    _write_result(tmp_path, '{"databases": [{"kind": "mariadb", "datadir": "/var/lib/mysql", '
                            '"warning": "lock timed out\\u001b[2J"}, {"kind": "postgresql", "warning": ""}]}')
    assert byteback.snapshot_database_warnings(str(tmp_path)) == ["mariadb /var/lib/mysql: lock timed out?[2J"]


@pytest.mark.parametrize("text", ["not json", "[1, 2]", '{"databases": "x"}', "x" * 70000])
def test_snapshot_database_warnings_ignores_what_is_not_a_result(tmp_path, text):
    _write_result(tmp_path, text)
    assert byteback.snapshot_database_warnings(str(tmp_path)) == []


def test_snapshot_database_warnings_follows_no_symlink(tmp_path):
    elsewhere = tmp_path / "elsewhere"
    _write_result(elsewhere, '{"databases": [{"kind": "k", "datadir": "/d", "warning": "w"}]}')
    snap = tmp_path / "snap"
    (snap / "var" / "lib").mkdir(parents=True)
    (snap / "var" / "lib" / "byteback").symlink_to(elsewhere / "var" / "lib" / "byteback")
    assert byteback.snapshot_database_warnings(str(snap)) == []
    assert byteback.snapshot_database_warnings(str(tmp_path / "missing")) == []


# -- restore --database --

@pytest.mark.parametrize("words", [
    ["var/lib/mysql", "--restore"],                      # not absolute
    ["/var/lib/mysql"],                                  # a listing: nothing to put back
    ["/var/lib/mysql", "/var/lib/postgresql", "--restore"],
    ["/var/lib/mysql", "--restore", "--to", "/tmp/x"],   # its place is its own path
])
def test_restore_database_usage(tmp_path, capsys, words):
    code = byteback.main(["--config-dir", str(tmp_path), "restore", "--destination", str(tmp_path / "store"),
                          "--host", "h1", "--database", *words])
    assert code == byteback.EXIT_USAGE
    assert "--database takes one absolute datadir" in capsys.readouterr().err


def test_move_datadir_aside_keeps_the_old_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(byteback, "find_databases", lambda any_account=False: [])
    datadir = tmp_path / "mysql"
    datadir.mkdir()
    (datadir / "ibdata1").write_text("x")
    aside = byteback.move_datadir_aside(str(datadir), "2026-03-01T03:15+0000")
    assert aside == f"{datadir}.before-2026-03-01T03:15+0000" and not datadir.exists()
    assert (tmp_path / "mysql.before-2026-03-01T03:15+0000" / "ibdata1").read_text() == "x"
    datadir.mkdir()
    with pytest.raises(ByteBackError, match="exists already"):
        byteback.move_datadir_aside(str(datadir), "2026-03-01T03:15+0000")


def test_move_datadir_aside_refuses_while_the_server_runs(tmp_path, monkeypatch):
    running = byteback.Database("mariadb", 42, str(tmp_path), "/s", None, "mysql")
    monkeypatch.setattr(byteback, "find_databases", lambda any_account=False: [running])
    with pytest.raises(ByteBackError, match=r"pid 42\) runs on .*stop it first"):
        byteback.move_datadir_aside(str(tmp_path), "2026-03-01T03:15+0000")
    assert tmp_path.exists()


def test_problem_text_says_how_to_give_credentials():
    denied = ByteBackError("'SELECT @@version' failed: ERROR 1045 (28000): Access denied for user 'root'@'localhost'")
    assert "mariadb_defaults_file = /etc/mysql/debian.cnf" in byteback._problem_text(denied)
    assert byteback._problem_text(ByteBackError("lock timed out")) == "lock timed out"
    assert byteback._problem_text(FileNotFoundError(2, "No such file or directory", "/var/lib/mysql")) == \
        "/var/lib/mysql: No such file or directory"
