"""Section 7b, the receive guard, pure: what a client may send in SSH_ORIGINAL_COMMAND.

Three tables and a property:

* HOSTILE: commands a rogue root on a client could send through its
  restricted key (shell syntax, other programs, every dangerous rsync option
  of RECEIVE.md rule 3 in both spellings, refused letters, paths that climb
  or leave the host).  Each must raise ``byteback.Refused``, and where the
  table gives a word, the reason names it.
* LEGITIMATE: what the stock client really sends, captured from rsync 3.5.0
  through an ``-e`` program that logs its arguments (and captured again, live,
  from byteback's own backup and restore by ``test_live_client_commands_...``).
* ``server_rsync_argv``: the command the server builds is its own.
* A hypothesis property: whatever the input, the guard either refuses or
  returns a request made only of allowed parts, and never raises anything else.

No sshd, no store: tests/integration/test_hostile_client.py does it for real.
"""
from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import byteback
from markers import needs_rsync

SNAP = "2026-01-02T03:04+0000"
SNAP_SECONDS = "2026-01-02T03:04:05+0000"
CAPS = "e.iLsfxCIvu"                       # rsync 3.5.0's capability blob
PUSH = f"rsync --fake-super --server -lHogDtpXrR{CAPS}"
SEND = f"rsync --fake-super --server --sender -lHogDtpXrR{CAPS}"
TAIL = "--timeout=300 --delete-during --delete-excluded --stats --partial --numeric-ids . current/"

# RECEIVE.md rule 3: every option whose value is a server path, or that runs a
# program, follows symlinks, deletes, or widens what rsync does.  Each is sent
# as --opt=value and as --opt value (rsync's popt takes both).
DANGEROUS_WITH_VALUE = {
    "--rsh": "/bin/sh", "--rsync-path": "/bin/sh", "--log-file": "/tmp/owned",
    "--write-batch": "/tmp/batch", "--only-write-batch": "/tmp/batch",
    "--read-batch": "/tmp/batch", "--backup-dir": "../client2/current",
    "--partial-dir": "/tmp/partial", "--temp-dir": "/tmp", "--link-dest": "/etc",
    "--copy-dest": "/etc", "--compare-dest": "/etc", "--files-from": "/etc/passwd",
    "--config": "/etc/rsyncd.conf", "--suffix": "~", "--include-from": "/etc/shadow",
    "--exclude-from": "/etc/shadow", "--filter": "merge /etc/shadow",
    "--chmod": "u+s", "--chown": "0:0", "--usermap": "*:0", "--groupmap": "*:0",
    "--debug": "ALL", "--max-alloc": "0", "--compress-threads": "999999",
    "--iconv": "utf8,latin1", "--max-size": "99999999999999999999P", "--min-size": "1",
    "--confine-root": "/", "--remote-option": "--log-file=/tmp/x",
}
DANGEROUS_FLAGS = [
    "--daemon", "--remove-source-files", "--remove-sent-files", "--backup",
    "--copy-links", "--copy-dirlinks", "--keep-dirlinks", "--copy-unsafe-links",
    "--safe-links", "--no-munge-links", "--munge-links", "--secluded-args",
    "--protect-args", "--super", "--no-super", "--preallocate", "--write-devices",
    "--copy-devices", "--server", "--sender", "--old-args", "--delete-missing-args",
    "--ignore-missing-args", "--list-only",
]


def test_no_implied_dirs_only_on_restore():
    # restore sends it so existing directories keep their attributes; a push has no use for it.
    with pytest.raises(byteback.Refused):
        byteback.check_receive_command(f"rsync --server --no-implied-dirs -vlogDtpr{CAPS} . current/")
    request = byteback.check_receive_command(
        f"rsync --server --sender -vlogDtprR{CAPS} --no-implied-dirs . current/etc/hosts")
    assert "--no-implied-dirs" in request.options


def _hostile_table():
    rows = [
        # -- nothing, or not one line --
        ("", "no command"),
        ("   ", "no command"),
        ("ping\nrm -rf /", "control"),
        ("ping\rid", "control"),
        ("ping\0", "control"),
        ("x" * 70000, "too long"),
        ("'unclosed", "unparsable"),
        # -- shell syntax: shlex makes these plain words, and unknown words are refused --
        ("ping; rm -rf ~", None),
        ("ping && id", None),
        ("ping || id", None),
        ("ping | sh", None),
        ("ping & id", None),
        ("`id`", None),
        ("$(id)", None),
        ("ping $(touch /tmp/x)", None),
        ("complete `reboot`", None),
        ("ping > /tmp/owned", None),
        ("ping < /etc/shadow", None),
        ("ping >> ~/.ssh/authorized_keys", None),
        ("ping 2>&1", None),
        ("{ id; }", None),
        ("(id)", None),
        ("ping #", None),
        ("PATH=/tmp ping", None),
        ("*", None),
        ("~", None),
        # -- other programs --
        ("sh -c id", "is not a command"),
        ("/bin/sh", "is not a command"),
        ("bash -i", "is not a command"),
        ("/bin/rm -rf /", "is not a command"),
        ("rm -rf ..", "is not a command"),
        ("scp -t /tmp", "is not a command"),
        ("scp -f /etc/shadow", "is not a command"),
        ("internal-sftp", "is not a command"),
        ("sftp", "is not a command"),
        ("/usr/lib/openssh/sftp-server", "is not a command"),
        ("/usr/bin/rsync --server -vlogDtpre.iLsfxCIvu . current/", "is not a command"),
        ("./rsync --server . current/", "is not a command"),
        ("RSYNC --server . current/", "is not a command"),
        ("byteback receive --host client2", "is not a command"),
        ("sudo -n /usr/local/bin/byteback.pyz snapshot --host client2", "is not a command"),
        ("btrfs property set -ts 2026-01-02T03:04+0000 ro false", "is not a command"),
        ("ping ping", "is not a command"),
        ("complete --force", "is not a command"),
        ("complete client2", "is not a command"),
        ("Ping", "is not a command"),
        # -- rsync, but not its server --
        ("rsync", "without --server"),
        ("rsync -av /etc/ /tmp/x/", "without --server"),
        ("rsync --daemon", "without --server"),
        ("rsync --daemon --config=/tmp/r.conf --port=8873", "without --server"),
        ("rsync -e sh x:y z", "without --server"),
        ("rsync /etc/shadow current/", "without --server"),
        ("rsync --fake-super", "without --server"),
        ("rsync --sender --server -vlogDtpr . current/", "without --server"),
        (f"rsync -vlogDtpr{CAPS} --server . current/", "without --server"),
        ("rsync rsync --server . current/", "without --server"),
        # -- --server, --sender, the blob and the '.' in the wrong place --
        (f"rsync --server -vlogDtpr{CAPS} --server . current/", "--server"),
        (f"rsync --server -vlogDtpr{CAPS} --sender . {SNAP}/etc", "--sender"),
        (f"rsync --server -vlogDtpr{CAPS} -e.iLs . current/", "capability"),
        (f"rsync --server -vlogDtpr{CAPS}{CAPS[1:]} . current/", "capability"),
        ("rsync --server -vlogDtpre.iL$(id) . current/", "capability"),
        ("rsync --server -vlogDtpre . current/", "capability"),
        ("rsync --server -vlogDtpre3 . current/", "capability"),
        ("rsync --server -vlogDtpre.i/ . current/", "capability"),
        (f"rsync --server -vlogDtpr{CAPS} current/", "'.'"),
        (f"rsync --server -vlogDtpr{CAPS}", "'.'"),
        (f"rsync --server -vlogDtpr{CAPS} -- . current/", "--"),
        (f"rsync --server -vlogDtpr{CAPS} - . current/", "unexpected word"),
        (f"rsync --server -vlogDtpr{CAPS} current . current/", "unexpected word"),
        (f"rsync --server -vlogDtpr{CAPS} /etc . current/", "unexpected word"),
        # -- refused and unknown letters, alone and inside clusters --
        (f"rsync --server -vlogDtprs{CAPS} . current/", "-s"),
        (f"rsync --server -vLlogDtpr{CAPS} . current/", "-L"),
        (f"rsync --server -vlogDtkpr{CAPS} . current/", "-k"),
        (f"rsync --server -KvlogDtpr{CAPS} . current/", "-K"),
        (f"rsync --server -vlogDtprb{CAPS} . current/", "-b"),
        (f"rsync --server -vlogDtprT{CAPS} . current/", "-T"),
        (f"rsync --server -vlogDtprP{CAPS} . current/", "-P"),
        (f"rsync --server -s -vlogDtpr{CAPS} . current/", "-s"),
        (f"rsync --server -vlogDtpr{CAPS} -L . current/", "-L"),
        (f"rsync --server -vlogDtprM{CAPS} . current/", "-M"),
        (f"rsync --server -vlogDtprf{CAPS} . current/", "-f"),
        (f"rsync --server -vlogDtprB{CAPS} . current/", "-B"),
        (f"rsync --server -vlogDtprF{CAPS} . current/", "-F"),
        (f"rsync --server -vlogDtpr8{CAPS} . current/", "-8"),
        (f"rsync --server -vlogDtpr@{CAPS} . current/", "-@"),
        (f"rsync --server -vlogDtpr-{CAPS} . current/", "--"),
        (f"rsync --server -vlogDtprE{CAPS} . current/", "-E"),
        (f"rsync --server -vlogDtprJ{CAPS} . current/", "-J"),
        (f"rsync --server -vlogDtprO{CAPS} . current/", "-O"),
        (f"rsync --server -vlogDtprU{CAPS} . current/", "-U"),
        (f"rsync --server -vlogDtpr{CAPS} -y . current/", "-y"),
        # --modify-window=-1 travels as the one word -@-1, on push only
        (f"rsync --server --sender -vlogDtpr{CAPS} -@-1 . {SNAP}/etc", "-@"),
        (f"rsync --server -vlogDtpr{CAPS} -@1 . current/", "-@"),
        (f"rsync --server -vlogDtpr{CAPS} -@-1x . current/", "-@"),
        (f"rsync --server -vlogDtpr{CAPS} -@ -1 . current/", "-@"),
        (f"rsync --server -vlogDtpr@-1{CAPS} . current/", "-@"),
        (f"rsync --server -vlogDtpr{CAPS} --modify-window=2 . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --modify-window . current/", "needs a value"),
        # restore may not use what only a push needs
        (f"rsync --server --sender -vlogDtprS{CAPS} . {SNAP}/etc", "-S"),
        (f"rsync --server --sender -vlogDtprc{CAPS} . {SNAP}/etc", "-c"),
        (f"rsync --server --sender -vlogDtprx{CAPS} . {SNAP}/etc", "-x"),
        (f"rsync --server --sender -vlogDtpr{CAPS} --delete . {SNAP}/etc", "--delete"),
        (f"rsync --server --sender -vlogDtpr{CAPS} --delete-during . {SNAP}/etc", "--delete-during"),
        (f"rsync --server --sender -vlogDtpr{CAPS} --partial . {SNAP}/etc", "--partial"),
        # -- long options: values where none is taken, missing, or of the wrong type --
        (f"rsync --server -vlogDtpr{CAPS} --timeout . current/", "needs a value"),
        (f"rsync --server -vlogDtpr{CAPS} --timeout 30 . current/", "needs a value"),
        (f"rsync --server -vlogDtpr{CAPS} --timeout=-1 . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --timeout=1e9 . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --timeout=1234567890 . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --bwlimit= . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --bwlimit=1m . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --compress-level=10 . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --compress-level=-1 . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --log-format=%f . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --log-format=%i%f . current/", "bad value"),
        (f"rsync --server -vlogDtpr{CAPS} --out-format=%i . current/", "--out-format"),
        (f"rsync --server -vlogDtpr{CAPS} --inplace=yes . current/", "takes no value"),
        (f"rsync --server -vlogDtpr{CAPS} --numeric-ids=0 . current/", "takes no value"),
        (f"rsync --server -vlogDtpr{CAPS} --delete=/etc . current/", "takes no value"),
        (f"rsync --server -vlogDtpr{CAPS} --partial=/tmp . current/", "takes no value"),
        (f"rsync --server -vlogDtpr{CAPS} --TIMEOUT=30 . current/", "allow-list"),
        (f"rsync --server -vlogDtpr{CAPS} --log-fil=/tmp/x . current/", "allow-list"),
        (f"rsync --server -vlogDtpr{CAPS} --compress-choice=zstd . current/", "allow-list"),
        (f"rsync --server -vlogDtpr{CAPS} --zc=none . current/", "allow-list"),
        (f"rsync --server -vlogDtpr{CAPS} --info=ALL . current/", "allow-list"),
        (f"rsync --server -vlogDtpr{CAPS} --no-inc-recursive . current/", "allow-list"),
        # -- a push names exactly one destination (which the server replaces) --
        (f"rsync --server -vlogDtpr{CAPS} .", "exactly one destination"),
        (f"rsync --server -vlogDtpr{CAPS} . current/ ../client2/current/", "exactly one destination"),
        (f"rsync --server -vlogDtpr{CAPS} . current/ --log-file=/tmp/x", "exactly one destination"),
        # -- restore paths: relative, no '..', below a snapshot or current --
        (f"rsync --server --sender -vlogDtpr{CAPS} .", "at least one path"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . /etc/shadow", "absolute"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . /", "absolute"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . //etc", "absolute"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . ../client2/current", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . {SNAP}/../../client2/{SNAP}", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . {SNAP}/etc/../../..", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . current/..", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . current/./../../client2", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . current//..//..", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . {SNAP}/etc ../x", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . ..", ".."),
        (f"rsync --server --sender -vlogDtpr{CAPS} . current/.\\./..", ".."),   # shlex unescapes
        (f"rsync --server --sender -vlogDtpr{CAPS} . client2/current", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . .byteback/history", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . .ssh/authorized_keys", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . .incomplete-{SNAP}", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . .deleting-{SNAP}/etc", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . 2026-*/etc", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . *", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . 2026-13-45T99:99+0000/etc", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . Current/etc", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . current2", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . ~/current", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . .", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . ./", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . ''", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . --log-file=/tmp/x", "snapshot name"),
        (f"rsync --server --sender -vlogDtpr{CAPS} . -L", "snapshot name"),
        # NUL inside a word (after the shell-quoting layer) still refused
        (f"rsync --server --sender -vlogDtpr{CAPS} . 'current/a\0b'", "control"),
        # -- list: absolute patterns that do not climb, and its own two options only --
        ("list", "1 to 100 patterns"),
        ("list --all", "1 to 100 patterns"),
        ("list etc/passwd", "absolute"),
        ("list /../client2/**", ".."),
        ("list /etc/../../client2", ".."),
        ("list --snapshot=../client2 /etc", "snapshot name"),
        ("list --snapshot=/etc /etc", "snapshot name"),
        ("list --snapshot=.incomplete-x /etc", "snapshot name"),
        ("list --store=/ /etc", "not allowed"),
        ("list --host=client2 /etc", "not allowed"),
        ("list /etc --all", "not allowed"),
        ("list " + " ".join(f"/p{i}" for i in range(101)), "1 to 100 patterns"),
    ]
    # Every dangerous option with a value, joined and separate, on push and on restore.
    for option, value in sorted(DANGEROUS_WITH_VALUE.items()):
        joined, separate = f"{option}={shlex.quote(value)}", f"{option} {shlex.quote(value)}"
        rows.append((f"{PUSH} {joined} {TAIL}", option))
        rows.append((f"{PUSH} {separate} {TAIL}", option))
        rows.append((f"{SEND} {joined} . {SNAP}/etc", option))
    for option in DANGEROUS_FLAGS:
        rows.append((f"{PUSH} {option} {TAIL}", option))
        rows.append((f"{SEND} {option} . {SNAP}/etc", option))
    return rows


HOSTILE = _hostile_table()


def _row_id(row) -> str:
    text = row[0][:60] if len(row[0]) < 200 else f"{row[0][:10]}... ({len(row[0])} chars)"
    return repr(text)


@pytest.mark.parametrize("command,word", HOSTILE, ids=[_row_id(r) for r in HOSTILE])
def test_hostile_command_is_refused(command, word):
    with pytest.raises(byteback.Refused) as refused:
        byteback.check_receive_command(command)
    message = str(refused.value)
    assert "\n" not in message, "a refusal is one line"
    if word is not None:
        assert word in message, f"refusal of {command[:80]!r} should name {word!r}: {message!r}"


def test_the_hostile_table_is_large_and_has_no_duplicates():
    commands = [c for c, _ in HOSTILE]
    assert len(commands) >= 40
    assert len(set(commands)) == len(commands)


def test_every_option_refused_by_name_is_not_also_allowed():
    assert not set(byteback.REFUSED_LONG_OPTIONS) & set(byteback.LONG_OPTIONS)
    assert not set(byteback.REFUSED_LETTERS) & (byteback.PUSH_LETTERS | byteback.SEND_LETTERS)
    # RECEIVE.md rule 3, by name: all of these must be refused with a reason.
    for option in ("--log-file", "--write-batch", "--read-batch", "--backup-dir", "--partial-dir",
                   "--temp-dir", "--link-dest", "--copy-dest", "--compare-dest", "--files-from",
                   "--config", "--copy-unsafe-links", "--no-munge-links", "--secluded-args",
                   "--daemon", "--rsh", "--rsync-path", "--remove-source-files", "--super",
                   "--no-super", "--iconv", "--chmod", "--chown", "--usermap", "--groupmap",
                   "--debug", "--max-alloc", "--compress-threads", "--preallocate"):
        assert option in byteback.REFUSED_LONG_OPTIONS, option
    for letter in "sLkKbT":
        assert letter in byteback.REFUSED_LETTERS, letter


def test_every_refused_letter_and_long_option_is_refused_by_name():
    for letter, reason in byteback.REFUSED_LETTERS.items():
        for form in (f"-{letter}", f"-vlogDtpr{letter}{CAPS}", f"-{letter}vlogDtpr{CAPS}"):
            for prefix in ("rsync --server", "rsync --server --sender"):
                with pytest.raises(byteback.Refused, match=re.escape(f"-{letter}: {reason}")):
                    byteback.check_receive_command(f"{prefix} {form} . {SNAP}/etc")
    for option, reason in byteback.REFUSED_LONG_OPTIONS.items():
        for form in (option, f"{option}=x"):
            for prefix in ("rsync --server -vlogDtpr", "rsync --server --sender -vlogDtpr"):
                with pytest.raises(byteback.Refused, match=re.escape(f"{option}: {reason}")):
                    byteback.check_receive_command(f"{prefix} {form} . {SNAP}/etc")


# === What the stock client sends must pass ======================================

# Captured with rsync 3.5.0 and `-e <script that logs its arguments>`, for the
# flags byteback.build_rsync_argv and cmd_restore use (ssh joins the words
# with spaces; this is SSH_ORIGINAL_COMMAND).
CAPTURED_PUSH = ("rsync --fake-super --server -lHogDtpXrRe.iLsfxCIvu --timeout=300 --delete-during "
                 "--delete-excluded --stats --partial --numeric-ids . current/")
CAPTURED_RESTORE = ("rsync --fake-super --server --sender -lHogDtpXrRe.iLsfxCIvu --timeout=300 "
                    "--numeric-ids . 2026-01-02T03:04+0000/etc/./ssh/sshd_config "
                    "2026-01-02T03:04+0000/home/./a\\ b")
LEGITIMATE = [
    # backup
    (CAPTURED_PUSH, "push"),
    # backup --dry-run (adds --dry-run --itemize-changes)
    ("rsync --fake-super --server -nlHogDtpXrRe.iLsfxCIvu --log-format=%i --timeout=300 "
     "--delete-during --delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # rsync_flags: -z
    ("rsync --fake-super --server -lHogDtpXrRze.iLsfxCIvu --timeout=300 --delete-during "
     "--delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # rsync_flags: --bwlimit=100
    ("rsync --fake-super --server -lHogDtpXrRe.iLsfxCIvu --timeout=300 --bwlimit=100 "
     "--delete-during --delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # rsync_flags: -z --compress-level=3
    ("rsync --fake-super --server -lHogDtpXrRze.iLsfxCIvu --compress-level=3 --timeout=300 "
     "--delete-during --delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # rsync_flags: -c -x -S -W -u -I
    ("rsync --fake-super --server -ulWHogDtpXrcIRxSe.iLsfxCIvu --timeout=300 --delete-during "
     "--delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # rsync_flags: --delete --size-only --ignore-times
    ("rsync --fake-super --server -lHogDtpXrIRe.iLsfxCIvu --timeout=300 --delete-during "
     "--delete-excluded --size-only --stats --partial --numeric-ids . current/", "push"),
    # --modify-window=-1 (nanosecond mtimes), which rsync sends as -@-1
    ("rsync --fake-super --server -lHogDtpXrRe.iLsfxCIvu -@-1 --timeout=300 --delete-during "
     "--delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # -v, and --inplace (which replaces --partial), and -q
    ("rsync --fake-super --server -vlHogDtpXrRe.iLsfxCIvu --timeout=300 --delete-during "
     "--delete-excluded --stats --partial --numeric-ids . current/", "push"),
    ("rsync --fake-super --server -lHogDtpXrRe.iLsfxCIvu --timeout=300 --delete-during "
     "--delete-excluded --stats --numeric-ids --inplace . current/", "push"),
    ("rsync --fake-super --server -qlHogDtpXrRe.iLsfxCIvu --timeout=300 --delete-during "
     "--delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # a client that copies again when complete says 'again:' (the server's pong said it may say so)
    ("rsync --fake-super --byteback-again --server -lHogDtpXrRe.iLsfxCIvu --timeout=300 "
     "--delete-during --delete-excluded --stats --partial --numeric-ids . current/", "push"),
    # an older client: -vlogDtpr cluster, protocol digits in the blob, no --fake-super prefix
    ("rsync --server -vlogDtprze.iLsfxC --timeout=600 --delete . current/", "push"),
    ("rsync --server -vlogDtpre31.iLsfxC . /some/where/the/server/ignores", "push"),
    # restore: rsync ... host:SNAP/anchor/./rel dest/
    (CAPTURED_RESTORE, "restore"),
    ("rsync --fake-super --server --sender -lHogDtpXrRze.iLsfxCIvu --timeout=300 --numeric-ids . "
     "current/./x", "restore"),
    (f"rsync --server --sender -vlogDtpr{CAPS} . {SNAP_SECONDS}/srv/./data", "restore"),
    (f"rsync --server --sender -vlogDtpr{CAPS} . 2026-01-02T03:04Z/x", "restore"),
    (f"rsync --server --sender -vlogDtpr{CAPS} . ./current/x", "restore"),
    # the forced command's own verbs
    ("ping", "ping"),
    ("complete", "complete"),
    ("  ping  ", "ping"),
    ("list /etc/ssh/**", "list"),
    ("list --all /home/*/notes.txt", "list"),
    (f"list --snapshot={SNAP} /etc/hosts /etc/passwd", "list"),
    ("list --snapshot=current '/home/a b/*'", "list"),
]


@pytest.mark.parametrize("command,verb", LEGITIMATE, ids=[c[:70] for c, _ in LEGITIMATE])
def test_what_the_client_sends_is_accepted(command, verb):
    request = byteback.check_receive_command(command)
    assert request.verb == verb
    _assert_request_is_allowed(request)


def test_a_restore_keeps_its_paths_as_the_client_meant_them():
    request = byteback.check_receive_command(CAPTURED_RESTORE)
    assert request.paths == (f"{SNAP}/etc/./ssh/sshd_config", f"{SNAP}/home/./a b")


def test_a_restore_of_the_newest_snapshot_is_named_by_the_server():
    """restore sends 'newest/' when it did not list first; the server puts its newest snapshot's name."""
    request = byteback.check_receive_command(f"rsync --server --sender -vlogDtpr{CAPS} . newest/home/./a")
    older = "2026-11-30T01:00+0000"
    resolved = byteback.resolve_newest(request, [older, SNAP])
    assert resolved.paths == (f"{SNAP}/home/./a",)
    named = byteback.check_receive_command(f"rsync --server --sender -vlogDtpr{CAPS} . {older}/home/./a")
    assert byteback.resolve_newest(named, [older, SNAP]) == named
    with pytest.raises(byteback.ByteBackError, match="no snapshots yet"):
        byteback.resolve_newest(request, [])
    for climbing in ("newest/../other/x", "newest/./../../x", "newestx/a", "/newest/a"):
        with pytest.raises(byteback.Refused):
            byteback.check_receive_command(f"rsync --server --sender -vlogDtpr{CAPS} . {climbing}")


@pytest.mark.parametrize("prefix,again", [
    ("rsync --fake-super", False), ("rsync", False),                   # older clients, the original's
    ("rsync --fake-super --byteback-again", True), ("rsync --byteback-again --fake-super", True),
])
def test_a_push_says_whether_its_client_copies_again(prefix, again):
    """The walk before a push is spared only where the client said it handles 'again:'."""
    request = byteback.check_receive_command(f"{prefix} --server -vlogDtpr{CAPS} . current/")
    assert request.verb == "push" and request.again is again


@pytest.mark.parametrize("command", [
    f"rsync --fake-super --byteback-again --server --sender -vlogDtpr{CAPS} . {SNAP}/etc",
    f"rsync --server --byteback-again -vlogDtpr{CAPS} . current/",      # only before --server
    f"rsync --server -vlogDtpr{CAPS} --byteback-again . current/",
    "complete --byteback-again", "ping --byteback-again",
])
def test_the_again_word_goes_only_before_a_push(command):
    with pytest.raises(byteback.Refused):
        byteback.check_receive_command(command)


def test_the_named_pass_after_again_is_a_push_of_its_own_word():
    """rsync --files-from sends -d and --no-r to its server (the named pass, NAMED_WORD)."""
    request = byteback.check_receive_command(
        "rsync --fake-super --byteback-again --byteback-named --server -ldHogDtpXRe.LsfxCIvu --no-r "
        "--delete-during --delete-excluded -@-1 --numeric-ids --inplace . current/+complete")
    assert (request.verb, request.again, request.named, request.completes) == ("push", True, True, True)
    assert "--no-r" in request.options and "d" in request.letters
    assert not byteback.check_receive_command(f"rsync --fake-super --server -vlogDtpr{CAPS} . current/").named


@pytest.mark.parametrize("command", [
    f"rsync --byteback-named --server --sender -vlogDtpr{CAPS} . {SNAP}/etc",
    f"rsync --server --byteback-named -vlogDtpr{CAPS} . current/",
    f"rsync --server --sender -vlogDtpr{CAPS} --no-r . {SNAP}/etc",
    f"rsync --server --sender -vlogDtpdr{CAPS} . {SNAP}/etc",
    "complete --byteback-named",
])
def test_the_named_word_and_its_options_go_only_with_a_push(command):
    with pytest.raises(byteback.Refused):
        byteback.check_receive_command(command)


def test_a_push_keeps_the_options_that_matter_and_drops_the_rest():
    request = byteback.check_receive_command(
        f"rsync --fake-super --server -vvlHogDtpXrRz{CAPS} --timeout=300 --inplace --fake-super "
        "--bwlimit=100 --delete-during --numeric-ids . /anywhere/at/all")
    assert request.verb == "push"
    assert sorted(request.letters) == sorted("vlHogDtpXrRz")          # each letter once
    assert request.capabilities == CAPS
    # --timeout: the server's own; --inplace: the backend's; --fake-super: always added
    assert request.options == ("--bwlimit=100", "--delete-during", "--numeric-ids")
    assert request.paths == ()                                          # the client's path is dropped
    assert not request.completes


@pytest.mark.parametrize("destination,completes", [
    ("current/+complete", True), ("current/", False), ("current/+complete/", False),
    ("/anywhere/current/+complete", False),
])
def test_only_the_exact_destination_asks_the_push_to_take_the_snapshot(destination, completes):
    request = byteback.check_receive_command(f"{PUSH} {TAIL[:-len('current/')]}{destination}")
    assert (request.verb, request.completes, request.paths) == ("push", completes, ())


def _write_logging_rsh(path: Path, log: Path, pong: str = "pong") -> Path:
    """An `ssh` stand-in: answers ping (with `pong`) and complete, logs any other command,
    then fails.

    It cannot be a shared connection's master (-N): each command connects by itself.
    """
    path.write_text("#!/bin/sh\n"
                    'if [ "$1" = -N ]; then exit 1; fi\n'
                    "shift\n"                                    # the host
                    f'case "$*" in ping) printf {shlex.quote(pong + chr(10))}; exit 0;; '
                    "complete) exit 0;; esac\n"
                    f"printf '%s\\n' \"$*\" >> {shlex.quote(str(log))}\n"
                    "exit 1\n")
    path.chmod(0o755)
    return path


@needs_rsync
@pytest.mark.parametrize("pong,again", [("pong", False), ("pong byteback 0.1.0 host=client1\ncan: again", True)])
def test_a_push_says_again_only_to_a_server_whose_pong_knows_it(tmp_path, monkeypatch, pong, again):
    """An older server's guard refuses words it does not know: the client asks its pong first."""
    log = tmp_path / "commands"
    rsh = _write_logging_rsh(tmp_path / "rsh", log, pong)
    monkeypatch.setattr(byteback, "ssh_argv", lambda config_dir, port, **options: [str(rsh)])
    config = tmp_path / "config"
    config.mkdir()
    (config / "key").write_text("not a key\n")
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_text("x\n")
    byteback.main(["--config-dir", str(config), "backup", "--destination", "backuphost:",
                   "--host", "client1", "--source", str(source), "--retry-number", "1",
                   "--retry-delay", "0"])
    pushes = [byteback.check_receive_command(c) for c in log.read_text().splitlines()]
    assert [p.verb for p in pushes] == ["push"] and pushes[0].again is again


@needs_rsync
@pytest.mark.parametrize("flags,extra", [
    ("", []), ("", ["--dry-run"]), ("-z", []), ("--bwlimit=100", []),
    ("-z --compress-level=3", []), ("--size-only --delete", []), ("", ["--progress"]),
    ("", ["--verbose"]),
])
def test_live_client_commands_pass_the_guard(tmp_path, monkeypatch, flags, extra):
    """byteback's own backup and restore, through a logging `ssh`: the guard takes what they send."""
    log = tmp_path / "commands"
    rsh = _write_logging_rsh(tmp_path / "rsh", log)
    monkeypatch.setattr(byteback, "ssh_argv", lambda config_dir, port, **options: [str(rsh)])
    config = tmp_path / "config"
    config.mkdir()
    (config / "key").write_text("not a key\n")
    if flags:
        (config / "rsync_flags").write_text(flags + "\n")
    source = tmp_path / "source"
    source.mkdir()
    (source / "file").write_text("x\n")
    byteback.main(["--config-dir", str(config), "backup", "--destination", "backuphost:",
                   "--host", "client1", "--source", str(source), "--retry-number", "1",
                   "--retry-delay", "0", *extra])
    entries = [byteback.Entry(SNAP, str(source / "file"), "f", 0o644, 2, 0, 0, 0)]
    monkeypatch.setattr(byteback, "_remote_list", lambda session, words: entries)
    monkeypatch.chdir(tmp_path)
    byteback.main(["--config-dir", str(config), "restore", "--destination", "backuphost:",
                   "--host", "client1", "--restore", "--to", str(tmp_path / "back"), str(source / "file")])
    commands = log.read_text().splitlines() if log.exists() else []
    verbs = []
    for command in commands:
        request = byteback.check_receive_command(command)
        _assert_request_is_allowed(request)
        verbs.append(request.verb)
    assert "push" in verbs and "restore" in verbs, commands


# === The command the server builds ===============================================

HOST_DIR, CURRENT = "/srv/byteback/client1", "/srv/byteback/client1/current"


def _argv(command, version=(3, 5, 0), backend=("--inplace",), timeout=600):
    request = byteback.check_receive_command(command)
    return byteback.server_rsync_argv(request, host_dir=HOST_DIR, current=CURRENT,
                                      backend_options=list(backend), timeout=timeout,
                                      version=version)


def test_server_argv_for_a_push_is_built_from_scratch():
    argv = _argv(CAPTURED_PUSH)
    assert argv[0] == "/usr/bin/rsync" and os.path.isabs(argv[0])
    assert argv[1] == "--server" and "--sender" not in argv
    assert argv[argv.index("--"):] == ["--", ".", CURRENT + "/"]
    before = argv[:argv.index("--")]
    assert "--fake-super" in before and "--munge-links" in before
    assert [a for a in before if a.startswith("--timeout")] == ["--timeout=600"]
    assert f"--confine-root={HOST_DIR}" in before
    assert "--inplace" in before                              # the backend's choice
    assert before.count("--fake-super") == 1


@pytest.mark.parametrize("destination", [
    "current/", "../client2/current/", "/etc/", f"{SNAP}/", f"../client2/{SNAP}/",
    "/srv/byteback/client2/current", "~/.ssh/", "-", "--log-file=/tmp/x",
])
def test_the_push_destination_is_always_this_hosts_current(destination):
    argv = _argv(f"rsync --server -vlogDtpr{CAPS} . {shlex.quote(destination)}")
    assert argv[-3:] == ["--", ".", CURRENT + "/"]
    assert destination not in argv


def test_the_servers_timeout_replaces_the_clients():
    argv = _argv(f"rsync --server -vlogDtpr{CAPS} --timeout=1 . current/", timeout=42)
    assert [a for a in argv if a.startswith("--timeout")] == ["--timeout=42"]


@pytest.mark.parametrize("version,confined", [
    ((3, 4, 0), False), ((3, 4, 1), False), ((3, 4, 9), False), ((3, 5, 0), True),
    ((3, 5, 1), True), ((3, 10, 0), True), ((4, 0, 0), True),
])
def test_confine_root_only_where_rsync_has_it(version, confined):
    for command in (CAPTURED_PUSH, CAPTURED_RESTORE):
        argv = _argv(command, version=version)
        assert (f"--confine-root={HOST_DIR}" in argv) is confined
        assert not any(a.startswith("--confine-root") and a != f"--confine-root={HOST_DIR}" for a in argv)


def test_server_argv_for_a_restore_sends_only_the_checked_paths():
    argv = _argv(CAPTURED_RESTORE, backend=("--link-dest=/srv/byteback/client1/" + SNAP,))
    assert argv[:3] == ["/usr/bin/rsync", "--server", "--sender"]
    assert argv[argv.index("--"):] == ["--", ".", f"{SNAP}/etc/./ssh/sshd_config", f"{SNAP}/home/./a b"]
    before = argv[:argv.index("--")]
    assert "--fake-super" in before and "--munge-links" in before
    assert not any(a.startswith("--link-dest") for a in argv), "backend options are for a push"
    assert not any(a.startswith(("--delete", "--partial", "--inplace")) for a in argv)


def test_server_argv_has_one_cluster_with_the_blob_last():
    argv = _argv(f"rsync --server -vlogDt{CAPS} -pr . current/")
    clusters = [a for a in argv if a.startswith("-") and not a.startswith("--")]
    assert len(clusters) == 1
    assert clusters[0].endswith(CAPS) and sorted(clusters[0][1:-len(CAPS)]) == sorted("vlogDtpr")


@pytest.mark.parametrize("version,allowed", [((3, 4, 0), False), ((3, 4, 4), False), ((3, 5, 0), True)])
@pytest.mark.parametrize("command", [f"rsync --server -vlogDtprA{CAPS} . current/",
                                     f"rsync --server --sender -vlogDtprRA{CAPS} . {SNAP}/etc"])
def test_acls_need_the_rsync_that_applies_them_safely(command, version, allowed):
    """--acls (the original's man page example): CVE-2026-53799 is fixed in rsync 3.5.0."""
    if allowed:
        assert "A" in [a for a in _argv(command, version=version) if a.startswith("-v")][0]
    else:
        with pytest.raises(byteback.Refused, match="need rsync 3.5.0 on the server .CVE-2026-53799."):
            _argv(command, version=version)


@pytest.mark.parametrize("version", [(3, 4, 0), (3, 4, 2)])
def test_compression_on_push_is_refused_where_rsync_has_the_decoder_overflow(version):
    if version < byteback.MIN_RSYNC:
        return            # cmd_receive refuses to run with this rsync at all
    with pytest.raises(byteback.ByteBackError):
        _argv(f"rsync --server -vlogDtprz{CAPS} . current/", version=version)


# === The property: refused, or made only of allowed parts ==========================

def _assert_request_is_allowed(request):
    """What an accepted request may hold; anything else is a hole in the guard."""
    assert isinstance(request, byteback.Request)
    if request.verb in ("ping", "complete"):
        assert request == byteback.Request(request.verb)
        return
    if request.verb == "list":
        assert request.letters == request.capabilities == ""
        for option in request.options:
            assert option == "--all" or (
                option.startswith("--snapshot=") and (
                    option == "--snapshot=current"
                    or byteback.parse_snapshot_name(option[len("--snapshot="):]) is not None))
        assert 1 <= len(request.paths) <= 100
        for pattern in request.paths:
            assert pattern.startswith("/") and ".." not in pattern.split("/")
            assert "\0" not in pattern and "\n" not in pattern
        return
    assert request.verb in ("push", "restore"), request
    sender = request.verb == "restore"
    allowed = byteback.SEND_LETTERS if sender else byteback.PUSH_LETTERS
    assert set(request.letters) <= allowed, request.letters
    assert not set(request.letters) & set(byteback.REFUSED_LETTERS)
    assert len(set(request.letters)) == len(request.letters)
    assert request.capabilities == "" or re.fullmatch(r"e\d*\.[A-Za-z]*", request.capabilities)
    for option in request.options:
        name, has_value, value = option.partition("=")
        assert name in byteback.LONG_OPTIONS, option
        pattern, push_ok, send_ok, keep = byteback.LONG_OPTIONS[name]
        assert keep, f"{option} is replaced by the server, not kept"
        assert send_ok if sender else push_ok
        assert (pattern is None) == (not has_value)
        assert pattern is None or re.fullmatch(pattern, value)
    if not sender:
        assert request.paths == ()
        return
    assert request.paths
    for path in request.paths:
        parts = [p for p in path.split("/") if p not in ("", ".")]
        assert not path.startswith("/") and ".." not in parts and "\0" not in path
        assert parts[0] in ("current", byteback.NEWEST_SNAPSHOT) or byteback.parse_snapshot_name(parts[0])
    # and the server's own command made from it keeps the same shape
    argv = byteback.server_rsync_argv(request, host_dir=HOST_DIR, current=CURRENT,
                                      backend_options=["--inplace"], timeout=600, version=(3, 5, 0))
    end = argv.index("--")
    assert argv[end:] == ["--", ".", *request.paths]
    for word in argv[1:end]:
        assert (word in ("--server", "--sender", "--fake-super", "--munge-links", "--timeout=600",
                         f"--confine-root={HOST_DIR}", "--inplace")
                or word in request.options or word == "-" + request.letters + request.capabilities)


def _check(command):
    try:
        request = byteback.check_receive_command(command)
    except byteback.Refused as e:
        assert str(e) and "\n" not in str(e)
        return None
    _assert_request_is_allowed(request)
    return request


# Words an attacker (or a client) would combine: every option the tables know,
# with good and bad values, letters, blobs, paths good and bad, shell syntax.
_WORDS = (["rsync", "--server", "--sender", "--fake-super", "--byteback-again", ".", "--", "-", "ping",
           "complete",
           "list", "--all", "--snapshot=current", f"--snapshot={SNAP}", "--snapshot=../x",
           "current/", "current", f"{SNAP}/etc", f"{SNAP}/../client2", "../client2/current",
           "/etc/passwd", "/etc/**", "/../x", "*", ";", "|", "&&", "$(id)", "`id`", ">", "x\\ y",
           "-vlogDtpr", f"-vlogDtpr{CAPS}", CAPS[1:], "-e.iLs", "-e31.x", "-z", "-s", "-L", "-k",
           "-K", "-A", "-T", "-b", "-P", "-n", "-Hx", "-vvv", "-e", "-ee.x", "--log-format=%i"]
          + [f"{o}=1" for o in byteback.LONG_OPTIONS] + list(byteback.LONG_OPTIONS)
          + [f"{o}=/tmp/x" for o in byteback.REFUSED_LONG_OPTIONS] + list(byteback.REFUSED_LONG_OPTIONS))

_letter_cluster = st.builds(
    lambda letters, blob: "-" + letters + blob,
    st.text(alphabet="vlogDtpXrRHnzSxcWIuqsLkKbTAPMfBe8@-.0123456789", max_size=12),
    st.sampled_from(["", CAPS, "e.", "e31.iLsf", "e.i/", "e"]))
_word = st.one_of(st.sampled_from(_WORDS), _letter_cluster, st.text(max_size=12))


_PREFIXES = ([], ["rsync", "--server"], ["rsync", "--server", "--sender"],
             ["rsync", "--fake-super", "--server"])


@settings(deadline=None, database=None)
@given(st.sampled_from(_PREFIXES), st.lists(_word, max_size=10), st.booleans())
def test_property_word_lists_are_refused_or_wholly_allowed(prefix, words, quoted):
    _check((shlex.join if quoted else " ".join)(prefix + words))


@settings(deadline=None, database=None)
@given(st.text(max_size=200))
def test_property_random_text_is_refused_or_wholly_allowed(text):
    _check(text)
    _check("rsync --server " + text)
    _check("rsync --server --sender -vlogDtpr" + CAPS + " . " + text)


@settings(deadline=None, database=None)
@given(st.text(alphabet="./-_cuerntx2026:T+0Z" + "\\'\" *?[]", max_size=40))
def test_property_restore_paths_never_leave_the_host(path):
    request = _check(f"rsync --server --sender -vlogDtpr{CAPS} . {shlex.quote(path)}")
    if request is not None:
        (accepted,) = request.paths
        assert accepted == path
        # Resolved lexically below a host directory, it stays below it.
        resolved = os.path.normpath(os.path.join(HOST_DIR, accepted))
        assert resolved.startswith(HOST_DIR + "/")


@pytest.mark.parametrize("pattern", ["/[z-a]", "/etc/[b-a]*", "/x/[\\d-a]"])
def test_a_list_pattern_the_server_cannot_compile_is_refused_in_one_line(pattern):
    """A pattern the server's glob cannot compile is refused by the guard, not a traceback later."""
    with pytest.raises(byteback.Refused) as refused:
        byteback.check_receive_command(f"list {shlex.quote(pattern)}")
    assert str(refused.value) and "\n" not in str(refused.value)


@settings(deadline=None, database=None)
@given(st.text(alphabet="/*?[]!-az\\.", min_size=1, max_size=30))
def test_property_every_list_pattern_the_guard_accepts_can_be_matched(pattern):
    try:
        request = byteback.check_receive_command(f"list {shlex.quote('/' + pattern)}")
    except byteback.Refused:
        return
    for accepted in request.paths:
        byteback.compile_glob(accepted)


# === setup-host's key check (section 8e) ==========================================

def _ed25519_body(key_bytes: bytes = bytes(range(32))) -> str:
    import base64
    blob = b"".join(len(x).to_bytes(4, "big") + x for x in (b"ssh-ed25519", key_bytes))
    return base64.b64encode(blob).decode()


GOOD_KEY = "ssh-ed25519 " + _ed25519_body()


@pytest.mark.parametrize("text", [
    GOOD_KEY, GOOD_KEY + " root@client", GOOD_KEY + "\n", "\n" + GOOD_KEY + " c\n\n",
    GOOD_KEY + " byteback client key",        # the original's keys: a comment with spaces
])
def test_a_plain_public_key_is_accepted_and_rewritten_without_its_comment(text):
    assert byteback.parse_public_key(text) == GOOD_KEY


@pytest.mark.parametrize("text", [
    f'command="/bin/sh" {GOOD_KEY}', f'restrict {GOOD_KEY}', f'from="*" {GOOD_KEY}',
    f'environment="LD_PRELOAD=/tmp/x" {GOOD_KEY}', f"{GOOD_KEY}\n{GOOD_KEY}",
    f'{GOOD_KEY}\ncommand="x" {GOOD_KEY}', "ssh-dss " + _ed25519_body(),
    "ssh-rsa " + _ed25519_body(), "ssh-ed25519 AAAA!!!!",
    "ssh-ed25519", "", "   ", "-----BEGIN OPENSSH PRIVATE KEY-----",
    f"{GOOD_KEY}\x0bcommand=x", f"{GOOD_KEY}\u2028{GOOD_KEY}",
])
def test_a_key_with_options_or_garbage_is_refused(text):
    with pytest.raises(byteback.ByteBackError):
        byteback.parse_public_key(text)


@pytest.mark.parametrize("body", [
    _ed25519_body()[:-8],                                 # the key cut short
    _ed25519_body(bytes(range(31))),                      # 31-byte key
    _ed25519_body(bytes(range(32)) + b"trailing junk!"),  # bytes after the key
    _ed25519_body() + "=",                                # padding where none belongs
])
def test_a_key_whose_blob_is_not_a_whole_key_is_refused(body):
    with pytest.raises(byteback.ByteBackError):
        byteback.parse_public_key("ssh-ed25519 " + body)


@settings(deadline=None, database=None)
@given(st.text(max_size=120))
def test_property_a_parsed_key_is_two_plain_words(text):
    try:
        key = byteback.parse_public_key(text)
    except byteback.ByteBackError:
        return
    assert re.fullmatch(r"[a-z0-9@.-]+ [A-Za-z0-9+/]+={0,2}", key), key


# === list: a pattern must not pin a server CPU ======================================

@pytest.mark.parametrize("pattern", ["/" + "*a" * 12 + "b", "/x/" + "?" * 5, "/" + "/".join(["**"] * 3),
                                     "/" + "a" * 1030])
def test_a_list_pattern_past_the_complexity_limits_is_refused(pattern):
    with pytest.raises(byteback.Refused, match="too complex"):
        byteback.check_receive_command(f"list --snapshot=current {shlex.quote(pattern)}")


# -- the server's rsync version, asked before the session and read after it --

def _asked(text: str, code: int = 0) -> subprocess.Popen:
    """A started process that says `text` and exits `code`, as _serve_rsync starts rsync --version."""
    return subprocess.Popen([sys.executable, "-c", f"import sys; print({text!r}); sys.exit({code})"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)


@pytest.mark.parametrize("text,version", [
    ("rsync  version 3.4.1  protocol version 32", (3, 4, 1)),
    ("rsync  version v3.5.0  protocol version 32", (3, 5, 0)),
])
def test_server_rsync_version_reads_what_the_started_rsync_said(text, version):
    assert byteback._server_rsync_version(_asked(text)) == version


def test_server_rsync_version_refuses_an_rsync_with_known_holes():
    with pytest.raises(byteback.ByteBackError, match="older than 3.4.0"):
        byteback._server_rsync_version(_asked("rsync  version 3.2.7  protocol version 31"))


def test_server_rsync_version_of_an_rsync_that_failed_is_an_error():
    with pytest.raises(byteback.CommandFailed, match="exit code 3"):
        byteback._server_rsync_version(_asked("", 3))
