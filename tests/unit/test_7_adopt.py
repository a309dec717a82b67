"""Section 7d: what setup-server reads of an original byteback installation (pure parts)."""
from __future__ import annotations

import pytest

import byteback
from test_7_receive_guard import GOOD_KEY

PROGRAM = "/usr/local/bin/byteback.pyz"


def original(host="legacy", address="192.0.2.7", extra="", comment=" byteback client key"):
    return (f'command="byteback-receive",from="{address}",environment="BYTEBACK_HOST={host}"'
            f'{extra} {GOOD_KEY}{comment}')


@pytest.mark.parametrize("line,expected", [
    (original(), ("legacy", "192.0.2.7", GOOD_KEY)),
    (original("db_1"), ("db_1", "192.0.2.7", GOOD_KEY)),
    (original(extra=",no-pty,no-port-forwarding"), ("legacy", "192.0.2.7", GOOD_KEY)),
    (original(comment=""), ("legacy", "192.0.2.7", GOOD_KEY)),
    ('command="/usr/bin/byteback-receive",from="2001:db8::1",environment="BYTEBACK_HOST=h" ' + GOOD_KEY,
     ("h", "2001:db8::1", GOOD_KEY)),
    (GOOD_KEY + " admin", None),                                  # an administrator's plain key
    (f'restrict,from="192.0.2.7",command="{PROGRAM} receive --host web1" {GOOD_KEY}', None),   # ours
    ("# " + original(), None),                                    # commented out
    ("", None),
])
def test_original_key_lines_are_recognised(line, expected):
    assert byteback.original_key_line(line) == expected


@pytest.mark.parametrize("line,why", [
    (original(host="../etc"), "not a valid host name"),
    (original(host='x" ssh-ed25519 AAAA'), "public key"),             # a quote ends the value early
    (original(address="*"), "not an IP address"),
    (original(address='1.2.3.4",command="/bin/sh'), "more than one command="),          # a quote smuggled into from=
    ('command="byteback-receive",environment="BYTEBACK_HOST=h" ' + GOOD_KEY, "no single from="),
    ('command="byteback-receive",from="192.0.2.7" ' + GOOD_KEY, "no single BYTEBACK_HOST"),
    ('command="byteback-receive",from="192.0.2.7",environment="BYTEBACK_HOST=h" ssh-ed25519 AAAA', "truncated"),
])
def test_an_original_line_that_cannot_be_converted_says_why(line, why):
    with pytest.raises(byteback.ByteBackError, match=why):
        byteback.original_key_line(line)


def test_options_are_split_at_commas_outside_quotes():
    assert byteback.split_key_options('a,b="x, y",c="q \\" ,r" ssh-ed25519 K c d') == (
        ["a", 'b="x, y"', 'c="q \\" ,r"'], "ssh-ed25519 K c d")


def test_adoption_replaces_each_original_line_and_keeps_it_commented_beside():
    admin = GOOD_KEY + " admin"
    bad = original(host="..")
    lines, said = byteback.adopted_key_lines([admin, original("db_1"), bad], PROGRAM, [])
    assert lines == [admin, byteback.ORIGINAL_KEY_MARK + original("db_1"),
                     f'restrict,from="192.0.2.7",command="{PROGRAM} receive --host db_1" {GOOD_KEY}',
                     byteback.ORIGINAL_KEY_UNUSABLE + bad]
    assert said[0].startswith("converted  the original key of host db_1")
    assert said[1].startswith("disabled   an original authorized_keys line")
    again, said_again = byteback.adopted_key_lines(lines, PROGRAM, [])       # idempotent
    assert (again, said_again) == (lines, [])


def test_prune_jobs_of_the_original_are_found_in_cron_files(tmp_path):
    crond = tmp_path / "cron.d"
    crond.mkdir()
    (crond / "byteback").write_text("# byteback-prune in a comment\n"
                                    "15 */4 * * * byteback /usr/bin/byteback-prune --prune\n")
    (crond / "other").write_text("0 0 * * * root true\n")
    (crond / "byteback-prune").write_text(f"# {byteback.JOB_MARK}: byteback-prune\n"
                                          "7 * * * * root /usr/local/bin/byteback.pyz prune\n")
    crontab = tmp_path / "crontab"
    crontab.write_text("SHELL=/bin/sh\n0 1 * * * root byteback-prune --list\n")
    found = byteback.find_prune_jobs([str(crontab), str(crond), str(tmp_path / "missing")])
    assert found == [f"{crontab}:2", f"{crond / 'byteback'}:2"]


def test_sshd_settings_that_let_keys_set_the_environment_are_found(tmp_path):
    conf = tmp_path / "sshd_config"
    conf.write_text("Port 22\n#PermitUserEnvironment yes\nPermitUserEnvironment yes\n")
    drop_in = tmp_path / "sshd_config.d"
    drop_in.mkdir()
    (drop_in / "10-byteback.conf").write_text("  permituserenvironment BYTEBACK_HOST\n")
    (drop_in / "20-ok.conf").write_text("PermitUserEnvironment no\n")
    (drop_in / "notes.txt").write_text("PermitUserEnvironment yes\n")       # sshd reads *.conf only
    assert byteback.user_environment_settings([str(conf), str(drop_in)]) == [
        f"{conf}:3", f"{drop_in / '10-byteback.conf'}:1"]
