"""Section 1: the error types, their exit codes, and how main() prints them."""
from __future__ import annotations

import pytest

import byteback


def test_exit_codes_are_the_documented_numbers():
    assert (byteback.EXIT_OK, byteback.EXIT_FAILURE, byteback.EXIT_USAGE) == (0, 1, 2)
    assert (byteback.NAGIOS_OK, byteback.NAGIOS_WARNING, byteback.NAGIOS_CRITICAL,
            byteback.NAGIOS_UNKNOWN) == (0, 1, 2, 3)


def test_byteback_error_carries_its_message_and_exit_1():
    e = byteback.ByteBackError("store /srv/x is not a directory; create it")
    assert str(e) == "store /srv/x is not a directory; create it"
    assert e.exit_code == 1


def test_byteback_error_exit_code_can_be_given_per_instance():
    e = byteback.ByteBackError("unknown state", exit_code=3)
    assert e.exit_code == 3
    assert byteback.ByteBackError("other").exit_code == 1   # the class default is untouched


def test_usage_error_is_a_byteback_error_with_exit_2():
    e = byteback.UsageError("no destination given")
    assert isinstance(e, byteback.ByteBackError)
    assert e.exit_code == 2
    assert str(e) == "no destination given"


def test_command_failed_names_the_command_and_the_last_three_lines_of_stderr():
    e = byteback.CommandFailed(["rsync", "-a", "my file", "/dst"], 23,
                               "first\nsecond\nthird\nfourth\n")
    assert str(e) == "rsync failed with exit code 23: rsync -a 'my file' /dst (second third fourth)"
    assert e.argv == ["rsync", "-a", "my file", "/dst"]
    assert e.returncode == 23
    assert e.exit_code == 1
    assert isinstance(e, byteback.ByteBackError)


def test_command_failed_without_stderr_has_no_parenthesis():
    e = byteback.CommandFailed(("btrfs", "subvolume", "sync", "/srv"), 1)
    assert str(e) == "btrfs failed with exit code 1: btrfs subvolume sync /srv"
    assert e.stderr == ""


# -- main() is the one place failures become exit codes and printed lines --

def _command_raising(exc):
    def cmd(args):
        raise exc
    return cmd


@pytest.mark.parametrize("exc,code", [
    (byteback.ByteBackError("the disc is short; add space to the store"), 1),
    (byteback.UsageError("--force cannot be used through sudo"), 2),
    (byteback.ByteBackError("status unknown", exit_code=3), 3),
])
def test_main_prints_an_expected_failure_as_one_line_without_traceback(monkeypatch, capsys, exc, code):
    monkeypatch.setattr(byteback, "cmd_prune", _command_raising(exc))
    assert byteback.main(["prune", "--store", "/nonexistent"]) == code
    out, err = capsys.readouterr()
    assert err == f"byteback: {exc}\n"
    assert "Traceback" not in err
    assert out == ""


def test_main_maps_keyboard_interrupt_to_130(monkeypatch, capsys):
    monkeypatch.setattr(byteback, "cmd_prune", _command_raising(KeyboardInterrupt()))
    assert byteback.main(["prune"]) == 130
    assert capsys.readouterr().err == "byteback: interrupted\n"


def test_main_shows_the_traceback_of_an_internal_error_and_exits_1(monkeypatch, capsys):
    monkeypatch.setattr(byteback, "cmd_prune", _command_raising(ZeroDivisionError("oops")))
    assert byteback.main(["prune"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and "ZeroDivisionError: oops" in err
    assert "byteback: internal error in prune" in err


def test_main_returns_the_command_code_and_a_quiet_success_prints_nothing(monkeypatch, capsys):
    seen = {}

    def cmd(args):
        seen["store"], seen["config_dir"] = args.store, args.config_dir
        byteback.log.info("informational: hidden from cron")

    monkeypatch.setattr(byteback, "cmd_prune", cmd)
    assert byteback.main(["prune", "--store", "/srv/b"]) == 0
    assert seen == {"store": "/srv/b", "config_dir": "/etc/byteback"}
    assert capsys.readouterr() == ("", "")


def test_main_verbose_shows_info_lines(monkeypatch, capsys):
    monkeypatch.setattr(byteback, "cmd_prune", lambda args: byteback.log.info("deleted 2 snapshots"))
    assert byteback.main(["prune", "-v"]) == 0
    assert capsys.readouterr().err == "byteback: deleted 2 snapshots\n"


def test_main_takes_the_config_dir_from_the_environment(monkeypatch):
    seen = []
    monkeypatch.setattr(byteback, "cmd_prune", lambda args: seen.append(args.config_dir))
    monkeypatch.setenv("BYTEBACK_CONFIG_DIR", "/opt/bb")
    byteback.main(["prune"])
    byteback.main(["--config-dir", "/cli/wins", "prune"])
    assert seen == ["/opt/bb", "/cli/wins"]
