"""Section 7b: the original (Ruby) byteback client's commands, mapped onto ours and checked as strictly.

The command lines are what bin/byteback-backup and bin/byteback-restore of the
original send (ssh joins their words with spaces; rsync adds its server part
after --rsync-path).  tests/integration/test_adopt_original.py replays them
through the real sshd.
"""
from __future__ import annotations

import pytest

import byteback
from byteback import Refused, Request

SNAP = "2026-01-02T03:04+0000"
OLDER = "2026-01-01T03:04+0000"
SEND = "--server --sender -logDtprRze.iLsfxCIvu --timeout=300 --numeric-ids --inplace ."


def check(command):
    return byteback.check_receive_command(command)


@pytest.mark.parametrize("command,expected", [
    ("byteback-receive --ping", Request("ping")),
    ("byteback-receive --ping ", Request("ping")),                # the empty word of a missing --verbose
    ("byteback-receive --ping --verbose", Request("ping")),
    ("byteback-receive --complete", Request("complete")),
    ("byteback-receive --complete --verbose", Request("complete")),
    (f"byteback-receive --snapshot {SNAP} --list /etc/motd",
     Request("list", options=(byteback.ORIGINAL_TABLE, f"--snapshot={SNAP}"), paths=("/etc/motd",))),
    ("byteback-receive --snapshot * --list /srv/My=20Files/*.txt",
     Request("list", options=(byteback.ORIGINAL_TABLE, "--all", byteback.ORIGINAL_NEWEST),
             paths=("/srv/My Files/*.txt",))),
    ("byteback-receive --snapshot * --list --all --verbose /a=3Db /c",
     Request("list", options=(byteback.ORIGINAL_TABLE, "--all"), paths=("/a=b", "/c"))),
])
def test_original_client_verbs_map_onto_ours(command, expected):
    assert check(command) == expected


def test_original_restore_from_a_named_snapshot_is_our_restore():
    request = check(f"byteback-restore --fake-super --snapshot {SNAP} {SEND} /etc/motd /srv/a=20b")
    assert request == Request("restore", "logDtprRz", "e.iLsfxCIvu", ("--numeric-ids",),
                              (f"{SNAP}/./etc/motd", f"{SNAP}/./srv/a b"))


@pytest.mark.parametrize("every,expected", [
    ("", (f"{SNAP}/./etc/motd", f"{OLDER}/./etc/gone")),         # each path's newest, as asked for
    (" --all", (f"{OLDER}/etc/motd", f"{SNAP}/etc/motd", f"{OLDER}/etc/gone")),   # ./S/path
])
def test_original_restore_from_any_snapshot_is_resolved_on_the_server(every, expected):
    request = check(f"byteback-restore --fake-super --snapshot *{every} {SEND} /etc/motd /etc/gone")
    assert request.any_snapshot == ("every" if every else "newest")
    holds = {(OLDER, "/etc/motd"), (SNAP, "/etc/motd"), (OLDER, "/etc/gone")}
    resolved = byteback.resolve_any_snapshot(request, [OLDER, SNAP], lambda s, p: (s, p) in holds)
    assert resolved.paths == expected and resolved.any_snapshot == ""


def test_a_path_no_snapshot_holds_is_an_error():
    request = check(f"byteback-restore --fake-super --snapshot * {SEND} /nowhere")
    with pytest.raises(byteback.ByteBackError, match="no snapshot holds '/nowhere'"):
        byteback.resolve_any_snapshot(request, [SNAP], lambda s, p: False)


@pytest.mark.parametrize("command,why", [
    ("byteback-receive", "only --ping"),
    ("byteback-receive --ping --complete", "only --ping"),
    ("byteback-receive --restore /etc", "only --ping"),
    ("byteback-receive --list /etc", "only --ping"),
    ("byteback-snapshot --root /srv", "not a command byteback runs"),
    ("byteback-receive --snapshot ../x --list /etc", "not a snapshot name"),
    ("byteback-receive --snapshot 2026* --list /etc", "not a snapshot name"),
    ("byteback-receive --snapshot * --list etc/motd", "must be absolute"),
    ("byteback-receive --snapshot * --list /etc/=2E=2E/x", "climbs"),            # '..' once decoded
    ("byteback-receive --snapshot * --list /etc/a=0Ab", "NUL or newline"),
    ("byteback-receive --snapshot * --list /a=00", "NUL or newline"),
    ("byteback-receive --snapshot * --list", "only --ping"),
    ("byteback-receive --snapshot * --list --bogus /a", "must be absolute"),
    (f"byteback-restore --snapshot {SNAP} --server -logDtpr . /x", "only an rsync sender"),
    (f"byteback-restore --fake-super {SEND} /x", "needs --snapshot"),
    (f"byteback-restore --fake-super --snapshot {SNAP} {SEND} /=2E=2E/=2E=2E/etc", "climbs"),
    (f"byteback-restore --fake-super --snapshot {SNAP} {SEND} etc/motd", "absolute"),
    (f"byteback-restore --fake-super --snapshot * {SEND} /a=0A", "NUL or newline"),
    (f"byteback-restore --fake-super --snapshot {SNAP} --server --sender -L . /x", "-L"),
    (f"byteback-restore --fake-super --snapshot {SNAP} --server --sender --rsh=sh . /x", "--rsh"),
    (f"byteback-restore --fake-super --snapshot {SNAP} --server --sender --files-from=/etc/shadow . /x",
     "--files-from"),
    (f"byteback-restore --fake-super --snapshot {SNAP} --server --sender -logDtpr", "'.'"),
    ("byteback-restore --fake-super --snapshot * --server --sender -r . /x\u00e9", "quoted-printable"),
])
def test_original_commands_outside_the_mapping_are_refused(command, why):
    with pytest.raises(Refused, match=why):
        check(command)
