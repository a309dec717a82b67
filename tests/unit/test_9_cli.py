"""Section 9: the command line, in-process through byteback.main(argv)."""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import re

import pytest

import byteback
from markers import needs_rsync
from unit_helpers import at

HELP_OPTIONS = {
    "backup": ["--destination", "--source", "--exclude", "--host", "--port", "--io-timeout",
               "--retry-number", "--retry-delay", "--progress", "--dry-run", "--verbose"],
    "snapshot": ["--host", "--store", "--force", "--verbose"],
    "prune": ["--store", "--order", "--list", "--dry-run", "--force", "--verbose"],
}


def _subparsers():
    parser = byteback.build_parser()
    action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return action.choices


def test_top_level_help_lists_the_commands(capsys):
    assert byteback.main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("backup", "snapshot", "prune", "--config-dir", "--version", "Exit codes"):
        assert command in out


@pytest.mark.parametrize("argv", [
    ["backup", "--host", "web1", "--source", "/srv", "-v"],
    ["--config-dir", "/tmp/c", "receive", "--host", "web1"],
    ["--config-dir=/tmp/c", "snapshot", "--host", "web1", "--when-told"],
    ["prune", "--list", "--order", "age"],
])
def test_the_named_command_alone_parses_as_the_whole_parser(argv):
    """main builds only the named command's subparser (build_parser(only=...))."""
    whole = vars(byteback.build_parser().parse_args(argv))
    alone = vars(byteback.build_parser(argv[byteback._command_index(argv)]).parse_args(argv))
    assert alone == whole


@pytest.mark.parametrize("argv", [["backup", "--help"], ["backup", "--no-such-option"], ["-h", "backup"],
                                  ["--help", "backup"], ["backup", "--retry-number", "x"],
                                  ["no-such-command"], ["no-such-command", "--help"]])
def test_help_and_usage_errors_read_as_with_the_whole_parser(argv, capsys):
    codes, said = [], []
    for parser in (byteback.build_parser(), None):
        if parser is None:
            codes.append(byteback.main(list(argv)))
        else:
            with pytest.raises(SystemExit) as e:
                parser.parse_args(argv)
            codes.append(e.value.code)
        said.append(capsys.readouterr())
    assert codes[0] == codes[1] and said[0] == said[1]


def test_version(capsys):
    assert byteback.main(["--version"]) == 0
    assert capsys.readouterr().out == f"byteback {byteback.VERSION}\n"


@pytest.mark.parametrize("command", sorted(HELP_OPTIONS))
def test_help_of_each_main_command_mentions_each_option(capsys, command):
    assert byteback.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: byteback {command}")
    for option in HELP_OPTIONS[command]:
        assert option in out, option


@pytest.mark.parametrize("command", sorted(set(_subparsers()) - {"simulate"}))   # its own test file
def test_every_command_has_help_for_every_option(capsys, command):
    assert byteback.main([command, "--help"]) == 0
    out = capsys.readouterr().out
    for action in _subparsers()[command]._actions:
        assert action.help and action.help != argparse.SUPPRESS, action.option_strings
        for option in action.option_strings:
            assert option in out


@pytest.mark.parametrize("argv,says", [
    ([], "the following arguments are required: COMMAND"),
    (["--bogus"], "the following arguments are required: COMMAND"),   # argparse reports this first
    (["--bogus", "prune"], "unrecognized arguments: --bogus"),
    (["frobnicate"], "invalid choice: 'frobnicate'"),
    (["prune", "--bogus"], "unrecognized arguments: --bogus"),
    (["backup", "--sources", "/"], "unrecognized arguments"),
    (["snapshot"], "the following arguments are required: --host"),
    (["prune", "--order", "random"], "invalid choice: 'random'"),
    (["backup", "--retry-number", "many"], "--retry-number"),
])
def test_usage_errors_exit_2(capsys, argv, says):
    assert byteback.main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert "error: " in err and says in err


@pytest.mark.parametrize("argv,says", [
    (["backup", "--retry-number", "0"], "must be a whole number of at least 1"),
    (["backup", "--retry-delay", "soon"], "is not a duration"),
])
def test_bad_option_values_say_what_to_type(capsys, argv, says):
    assert byteback.main(argv) == 2
    assert says in capsys.readouterr().err


# -- expected failures: one line, exit 1, no traceback --

def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.startswith("byteback: ") and err.count("\n") == 1, err
    return err[len("byteback: "):-1]


@pytest.mark.parametrize("command", ["prune", "snapshot"])
def test_a_store_that_is_not_a_directory(tmp_path, capsys, command):
    store = tmp_path / "store"
    store.write_text("not a directory")
    argv = ["--config-dir", str(tmp_path / "etc"), command, "--store", str(store)]
    if command == "snapshot":
        argv += ["--host", "web1"]
    assert byteback.main(argv) == 1
    assert _one_line_error(capsys) == f"store {store} is not a directory; create it or fix the destination"


def test_backup_to_a_store_that_is_not_a_directory_is_recorded_as_failed(tmp_path, capsys):
    store = tmp_path / "store"
    store.write_text("")
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "backup", "--source", str(tmp_path),
                          "--destination", str(store), "--host", "web1"]) == 1
    message = _one_line_error(capsys)
    assert message == f"store {store} is not a directory; create it or fix the destination"
    state = json.loads((tmp_path / "client-state" / "last-backup.json").read_text())
    assert state["last_attempt"]["result"] == "failed"
    assert state["last_attempt"]["error"] == message


def _store_with_history(tmp_path, history_text):
    store = tmp_path / "store"
    (store / "web1" / "2026-03-01T03:00+0000").mkdir(parents=True)
    (store / "web1" / "current").mkdir()
    history = store / ".byteback" / "history" / "web1.json"
    history.parent.mkdir(parents=True)
    history.write_text(history_text)
    return store, history


@pytest.mark.parametrize("extra", [[], ["--list"], ["--dry-run"]])
def test_prune_with_a_corrupt_history_file_names_it(tmp_path, capsys, extra):
    store, history = _store_with_history(tmp_path, '{"backups": [{"added": 1}')
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "prune", "--store", str(store), *extra]) == 1
    message = _one_line_error(capsys)
    assert message.startswith(f"{history} is corrupt")
    assert f"mv {history} {history}.bad" in message
    assert (store / "web1" / "2026-03-01T03:00+0000").is_dir()


def test_prune_with_a_history_that_is_not_a_history_names_it(tmp_path, capsys):
    store, history = _store_with_history(tmp_path, '["not", "a", "history"]')
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "prune", "--store", str(store)]) == 1
    assert _one_line_error(capsys).startswith(f"{history} is not a byteback history")


def test_prune_with_a_history_of_wrong_types_is_one_line(tmp_path, capsys):
    store, history = _store_with_history(tmp_path, '{"backups": [{"added": "lots"}]}')
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "prune", "--store", str(store)]) == 1
    assert str(history) in _one_line_error(capsys)


def test_a_bad_server_conf_is_one_line_naming_file_and_line(tmp_path, capsys):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "server.conf").write_text("[server]\nheadroom = 0\n")
    (tmp_path / "store").mkdir()
    assert byteback.main(["--config-dir", str(etc), "prune", "--store", str(tmp_path / "store")]) == 1
    assert _one_line_error(capsys).startswith(f"{etc}/server.conf line 2: bad value for headroom")


def test_prune_list_prints_every_snapshot_with_its_reason(tmp_path, capsys):
    store = tmp_path / "store"
    now = byteback.now_local()
    names = [byteback.format_snapshot_name(now - dt.timedelta(days=d)) for d in (3, 1, 0)]
    for name in names:
        (store / "web1" / name).mkdir(parents=True)
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "prune", "--store", str(store),
                          "--list", "--order", "age"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith(f"store {store} (hardlink): ") and lines[0].endswith("order of deletion (age):")
    rows = lines[2:]
    assert len(rows) == 3
    assert rows[0].startswith("1 ") and names[0] in rows[0] and "age: the oldest snapshot of host web1" in rows[0]
    assert rows[1].startswith("2 ") and names[1] in rows[1]
    assert rows[2].startswith("- ") and names[2] in rows[2] and "kept: the newest snapshot of host web1" in rows[2]
    assert all((store / "web1" / n).is_dir() for n in names)          # --list deletes nothing


def test_prune_dry_run_with_room_says_nothing_to_delete(tmp_path, capsys):
    (tmp_path / "store").mkdir()
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "prune", "--store", str(tmp_path / "store"),
                          "--dry-run"]) == 0
    assert capsys.readouterr().out.startswith("nothing to delete: ")


# -- a real local backup, the README's main job --

@needs_rsync
def test_local_backup_makes_a_snapshot_and_refuses_a_second_inside_the_interval(tmp_path, capsys):
    src = tmp_path / "Documents"
    (src / "sub").mkdir(parents=True)
    (src / "a.txt").write_text("hello")
    (src / "sub" / "b.txt").write_text("world")
    store = tmp_path / "byteback-store"
    argv = ["--config-dir", str(tmp_path / "etc"), "backup", "--source", str(src),
            "--destination", str(store), "--host", "laptop"]
    assert byteback.main(argv) == 0
    assert capsys.readouterr() == ("", "")                   # a good cron run prints nothing
    snaps = byteback.HardlinkStore(store).snapshots("laptop")
    assert len(snaps) == 1
    copied = store / "laptop" / snaps[0].name / str(src).lstrip("/")
    assert (copied / "a.txt").read_text() == "hello" and (copied / "sub" / "b.txt").read_text() == "world"
    assert byteback.HardlinkStore(store).dirty_since("laptop") is None
    state = json.loads((tmp_path / "client-state" / "last-backup.json").read_text())
    assert state["last_success"]["result"] == "ok"

    assert byteback.main(argv) == 1
    assert "minimum interval is 6h 0m" in _one_line_error(capsys)
    assert len(byteback.HardlinkStore(store).snapshots("laptop")) == 1


@needs_rsync
def test_backup_dry_run_changes_nothing(tmp_path, capsys):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    store = tmp_path / "store"
    store.mkdir()
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "backup", "--dry-run", "--source", str(src),
                          "--destination", str(store), "--host", "laptop"]) == 0
    assert os.listdir(store) == []


# -- install-cron --

def test_install_cron_writes_a_daily_line_and_keeps_its_time_on_reruns(tmp_path, capsys):
    cron = tmp_path / "byteback.cron"
    assert byteback.main(["install-cron", "--cron-file", str(cron)]) == 0
    first = cron.read_text()
    line = [l for l in first.splitlines() if not l.startswith("#") and "root" in l]
    assert len(line) == 1
    minute, hour, dom, month, dow, user, *command = line[0].split()
    assert 0 <= int(minute) < 60 and 0 <= int(hour) < 24
    assert (dom, month, dow, user) == ("*", "*", "*", "root")
    assert command[-1] == "backup"
    assert "wrote" in capsys.readouterr().out
    # Re-running changes nothing: every client keeps the minute it drew once.
    assert byteback.main(["install-cron", "--cron-file", str(cron)]) == 0
    assert cron.read_text() == first
    assert "nothing changed" in capsys.readouterr().out


def test_install_cron_names_a_non_default_config_dir(tmp_path):
    cron = tmp_path / "byteback.cron"
    assert byteback.main(["--config-dir", str(tmp_path / "etc"), "install-cron",
                          "--cron-file", str(cron), "--hour", "3"]) == 0
    line = [l for l in cron.read_text().splitlines() if "backup" in l and not l.startswith("#")][0]
    assert line.split()[1] == "3"
    assert f"--config-dir {tmp_path / 'etc'}" in line


def test_rsync_flags_with_a_broken_quote_is_one_line(tmp_path, capsys):
    cfg = tmp_path / "etc"
    cfg.mkdir()
    (cfg / "rsync_flags").write_text('--bwlimit="10\n')
    src = tmp_path / "src"
    src.mkdir()
    argv = ["--config-dir", str(cfg), "backup", "--source", str(src),
            "--destination", str(tmp_path / "store"), "--host", "h"]
    assert byteback.main(argv) == 1
    err = capsys.readouterr().err
    assert err == f"byteback: {cfg}/rsync_flags line 1: No closing quotation; fix its quoting\n"


def test_an_os_error_is_one_line_naming_the_file_not_a_traceback(monkeypatch, capsys):
    def refuse(args):
        raise PermissionError(13, "Permission denied", "/srv/store/.byteback/history")
    monkeypatch.setattr(byteback, "cmd_prune", refuse)
    assert byteback.main(["prune", "--store", "/srv/store"]) == 1
    err = capsys.readouterr().err
    assert err == ("byteback: Permission denied (/srv/store/.byteback/history); "
                   "check the permissions and free space there\n")
    # status keeps to the Nagios codes even then
    monkeypatch.setattr(byteback, "cmd_status", refuse)
    assert byteback.main(["status"]) == byteback.NAGIOS_UNKNOWN


def test_the_command_finder_knows_exactly_the_parsers_global_options():
    parser = byteback.build_parser()
    top = [a for a in parser._actions if a.option_strings and not isinstance(a, argparse._SubParsersAction)]
    with_value = {o for a in top if a.nargs != 0 for o in a.option_strings}
    flags = {o for a in top if a.nargs == 0 for o in a.option_strings}
    assert with_value == set(byteback.GLOBAL_OPTIONS_WITH_VALUE)
    assert flags == set(byteback.GLOBAL_FLAGS)


@pytest.mark.parametrize("argv, index", [
    (["simulate"], 0), (["--config-dir", "/x", "simulate"], 2), (["--config-dir=/x", "prune"], 1),
    (["-v", "simulate"], None), ([], None), (["--version"], None),
])
def test_the_command_is_found_after_the_global_options_only(argv, index):
    assert byteback._command_index(argv) == index


def test_restore_refuses_list_and_restore_together(capsys):
    assert byteback.main(["restore", "--list", "--restore", "/etc/x"]) == 2
    assert "not allowed with" in capsys.readouterr().err


def test_an_hourly_job_keeps_its_minute_and_a_daily_one_its_time(tmp_path, monkeypatch):
    job = byteback.Job("byteback-prune", "prune", ["/usr/bin/byteback", "prune"], hourly=True)
    cron = tmp_path / "cron"
    units = tmp_path / "units"
    first = byteback.install_job(job, cron_file=cron, unit_dir=units)
    text = cron.read_text()
    minute = int(re.search(r"^(\d+) \* \* \* \* root /usr/bin/byteback prune$", text, re.M).group(1))
    assert first == [f"wrote      {cron} (hourly at minute {minute})"]
    monkeypatch.setattr("random.randrange", lambda n: (minute + 1) % n)   # another draw would move it
    assert byteback.install_job(job, cron_file=cron, unit_dir=units) == [
        f"unchanged  {cron} (hourly at minute {minute})"]
    assert cron.read_text() == text
    daily = job._replace(hourly=False)
    byteback.install_job(daily, cron_file=cron, unit_dir=units, hour=5)    # the kept minute, at 05:
    assert f"\n{minute} 5 * * * root /usr/bin/byteback prune\n" in cron.read_text()


def test_switching_between_cron_and_systemd_names_the_other_schedule(tmp_path):
    job = byteback.Job("byteback", "backup", ["/usr/bin/byteback", "backup"], hourly=False)
    cron, units = tmp_path / "cron", tmp_path / "units"
    byteback.install_job(job, cron_file=cron, unit_dir=units)
    done = byteback.install_job(job, cron_file=cron, unit_dir=units, systemd=True)
    assert done == [f"wrote      {units}/byteback.service", f"wrote      {units}/byteback.timer",
                    "to start it: systemctl daemon-reload && systemctl enable --now byteback.timer",
                    f"note: {cron} runs the backup from cron too; remove it"]
    again = byteback.install_job(job, cron_file=cron, unit_dir=units)
    assert again[-1] == f"note: {units}/byteback.timer runs the backup from systemd too; disable and remove it"
    assert byteback._nothing_changed(again)
    (tmp_path / "other").write_text("0 3 * * * root /usr/bin/something-else\n")   # not ours: no note
    assert byteback.install_job(job, cron_file=tmp_path / "other", unit_dir=units, systemd=True)[-1].startswith(
        "unchanged")


def test_systemd_units_of_a_job():
    job = byteback.Job("byteback", "backup", ["/usr/bin/byteback", "--config-dir", "/etc/bb x", "backup"],
                       hourly=False)
    units = byteback.systemd_units(job, hour=None)
    assert sorted(units) == ["byteback.service", "byteback.timer"]
    assert "ExecStart=/usr/bin/byteback --config-dir '/etc/bb x' backup\n" in units["byteback.service"]
    assert "OnCalendar=daily\nRandomizedDelaySec=24h\n" in units["byteback.timer"]
    assert "OnCalendar=*-*-* 23:00:00\nRandomizedDelaySec=1h\n" in byteback.systemd_units(job, 23)["byteback.timer"]
