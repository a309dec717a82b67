"""Section 4: host names, snapshot names (ours and the original byteback's), destinations."""
from __future__ import annotations

import datetime as dt
import os

import pytest

import byteback
from byteback import ByteBackError

UTC = dt.timezone.utc


# -- host names: directory names on the server and words in authorized_keys --

@pytest.mark.parametrize("name", [
    "web1",
    "a",
    "0",
    "web1.example.com",
    "db-2.internal",
    "db_1",                               # real host names have underscores
    "web_1.example_corp.com",
    "a_",
    "UPPER.case",
    "host.",                              # a trailing dot (FQDN root) is harmless
    "a" * 253,
    ".".join(["abc"] * 63) + "a",         # 253 characters with dots
])
def test_check_host_name_accepts(name):
    assert byteback.check_host_name(name) == name


@pytest.mark.parametrize("name", [
    "",
    ".",
    "..",
    "web..1",                 # '..' anywhere
    "../etc",
    "web/1",
    "/web1",
    "-x",                     # would read as an option
    "-oProxyCommand=x",
    ".hidden",                # would hide among .byteback and .incomplete-*
    "web 1",
    " web1",
    "web1\n",                 # a second line in authorized_keys
    "web\n1",
    "web1\t",
    'web"1',
    "web'1",
    "web1;id",
    "web$1",
    "_db1",                   # starts with a letter or digit only
    "web*1",                  # a glob in a sudoers line or a path
    "web?1",
    "web[1]",
    "web=1",                  # would end an environment="" option
    "web,1",                  # would start a second authorized_keys option
    "wéb1",
    "web1\0",
    "a" * 254,
])
def test_check_host_name_rejects(name):
    with pytest.raises(ByteBackError) as exc:
        byteback.check_host_name(name)
    assert "is not a valid host name" in str(exc.value)
    assert "at most 253 characters" in str(exc.value)        # says what would be valid


@pytest.mark.parametrize("name", ["db_1", "web1", "a" * 253])
def test_one_host_name_rule_everywhere(tmp_path, name):
    """The store's listing, the setup's parser of authorized_keys and the check agree."""
    (tmp_path / name).mkdir()
    for odd in ("_x", "a" * 254, "web..1", "web 1"):
        (tmp_path / odd).mkdir()
    assert byteback.HardlinkStore(tmp_path).hosts() == [name]
    line = byteback.authorized_keys_line("/usr/local/bin/byteback.pyz", [], name, "192.0.2.1",
                                         "ssh-ed25519 AAAA")
    assert byteback._authorized_host(line) == name
    assert byteback._authorized_host(line.replace(name, "a" * 254)) is None


@pytest.mark.parametrize("value", [None, 5, b"web1"])
def test_check_host_name_rejects_what_is_not_a_string(value):
    with pytest.raises(ByteBackError):
        byteback.check_host_name(value)


# -- snapshot names --

@pytest.mark.parametrize("when,name", [
    (dt.datetime(2014, 3, 24, 12, 0, tzinfo=UTC), "2014-03-24T12:00+0000"),
    (dt.datetime(2026, 11, 28, 3, 15, 59, tzinfo=UTC), "2026-11-28T03:15+0000"),     # seconds dropped
    (dt.datetime(2026, 7, 1, 3, 15, tzinfo=dt.timezone(dt.timedelta(hours=1))), "2026-07-01T03:15+0100"),
    (dt.datetime(2026, 1, 1, 0, 0, tzinfo=dt.timezone(dt.timedelta(hours=-5, minutes=-30))),
     "2026-01-01T00:00-0530"),
])
def test_format_snapshot_name_uses_the_original_format(when, name):
    assert byteback.format_snapshot_name(when) == name


def test_format_snapshot_name_with_seconds():
    when = dt.datetime(2026, 11, 28, 3, 15, 7, tzinfo=UTC)
    assert byteback.format_snapshot_name(when, seconds=True) == "2026-11-28T03:15:07+0000"


@pytest.mark.parametrize("when", [
    dt.datetime(2014, 3, 24, 12, 0, tzinfo=UTC),
    dt.datetime(2026, 3, 29, 1, 30, tzinfo=dt.timezone(dt.timedelta(hours=2))),
    dt.datetime(1999, 12, 31, 23, 59, tzinfo=dt.timezone(dt.timedelta(hours=-8))),
])
def test_snapshot_names_round_trip(when):
    name = byteback.format_snapshot_name(when)
    parsed = byteback.parse_snapshot_name(name)
    assert parsed == when
    assert parsed.utcoffset() == when.utcoffset()             # the offset survives, not just the instant
    seconds = when.replace(second=42)
    assert byteback.parse_snapshot_name(byteback.format_snapshot_name(seconds, seconds=True)) == seconds


@pytest.mark.parametrize("name,when", [
    # the original byteback's names (%Y-%m-%dT%H:%M%z)
    ("2014-03-24T12:00+0000", dt.datetime(2014, 3, 24, 12, 0, tzinfo=UTC)),
    ("2014-03-24T13:00+0100", dt.datetime(2014, 3, 24, 12, 0, tzinfo=UTC)),
    ("2014-10-26T01:30-0700", dt.datetime(2014, 10, 26, 8, 30, tzinfo=UTC)),
    # with seconds, with 'Z', with a colon in the offset
    ("2014-03-24T12:00:30+0000", dt.datetime(2014, 3, 24, 12, 0, 30, tzinfo=UTC)),
    ("2014-03-24T12:00Z", dt.datetime(2014, 3, 24, 12, 0, tzinfo=UTC)),
    ("2014-03-24T12:00:30Z", dt.datetime(2014, 3, 24, 12, 0, 30, tzinfo=UTC)),
    ("2014-03-24T13:00+01:00", dt.datetime(2014, 3, 24, 12, 0, tzinfo=UTC)),
])
def test_parse_snapshot_name_reads_the_original_names(name, when):
    parsed = byteback.parse_snapshot_name(name)
    assert parsed == when
    assert parsed.tzinfo is not None


@pytest.mark.parametrize("name", [
    "current",
    "",
    "2014-03-24",
    "2014-03-24T12:00",                   # no offset: an unknown moment
    "2014-03-24 12:00+0000",
    "2014-03-24T12+0000",
    "2014-13-24T12:00+0000",              # month 13
    "2014-02-30T12:00+0000",
    "2014-03-24T24:00+0000",
    "2014-03-24T12:60+0000",
    "2014-03-24T12:00+0000\n",
    "2014-03-24T12:00+0000x",
    " 2014-03-24T12:00+0000",
    ".incomplete-2014-03-24T12:00+0000",
    ".deleting-2014-03-24T12:00+0000",
    "2014-03-24T12:00+00",
    "2014-03-24T12:00:30.5+0000",
    "14-03-24T12:00+0000",
])
def test_parse_snapshot_name_rejects_what_is_not_a_snapshot(name):
    assert byteback.parse_snapshot_name(name) is None


def _strptime_reading(name):
    """What parse_snapshot_name read before it read the fields itself: strptime."""
    if not byteback.SNAPSHOT_NAME_RE.match(name):
        return None
    text = name[:-1] + "+0000" if name.endswith("Z") else name
    for fmt in (byteback.SNAPSHOT_FORMAT, byteback.SNAPSHOT_FORMAT_SECONDS):
        try:
            return dt.datetime.strptime(text, fmt)
        except ValueError:
            continue
    return None


@pytest.mark.parametrize("zone", ["Z", "+0000", "-0000", "+00:00", "+0130", "-05:00", "+2359", "-2359",
                                  "+2400", "-2400", "+9999", "+0060", "+1299", "+12:99", "+12:60"])
def test_parse_snapshot_name_reads_what_strptime_read(zone):
    """Field by field, the same moment and offset as strptime, and None wherever it refused
    (no such day, hour 24, minute or second 60, an offset of a day, offset minutes past 59)."""
    for date in ("0000-01-01", "0001-01-01", "2026-02-28", "2026-02-29", "2024-02-29", "2026-04-31",
                 "2026-13-01", "2026-00-10", "9999-12-31"):
        for clock in ("00:00", "23:59", "24:00", "12:60", "09:05:07", "12:00:59", "12:00:60", "12:00:61"):
            name = f"{date}T{clock}{zone}"
            parsed, expected = byteback.parse_snapshot_name(name), _strptime_reading(name)
            assert parsed == expected, name
            if expected is not None:
                assert parsed.utcoffset() == expected.utcoffset(), name


# -- destinations --

@pytest.mark.parametrize("text,user,host,path", [
    ("byteback@host:", "byteback", "host", ""),
    ("byteback@backup.example.com:", "byteback", "backup.example.com", ""),
    ("host:", None, "host", ""),
    ("host:store/web", None, "host", "store/web"),
    ("b@10.0.0.5:/srv", "b", "10.0.0.5", "/srv"),
    ("  byteback@host:  ", "byteback", "host", ""),
    ("a:b/c", None, "a", "b/c"),          # rsync's rule: the colon before any slash
])
def test_parse_destination_remote(text, user, host, path):
    d = byteback.parse_destination(text)
    assert d == byteback.Destination(user, host, None, path)
    assert not d.is_local


def test_parse_destination_keeps_the_port():
    assert byteback.parse_destination("byteback@host:", 2222).port == 2222


@pytest.mark.parametrize("text,expected", [
    ("/local/path", "/local/path"),
    ("/local/path/", "/local/path"),
    ("/mnt/usb:disk", "/mnt/usb:disk"),   # a slash before the colon: a path
    ("./a:b", None),                      # relative: made absolute below
    ("relative/path", None),
    ("store", None),
])
def test_parse_destination_local(monkeypatch, tmp_path, text, expected):
    monkeypatch.chdir(tmp_path)
    d = byteback.parse_destination(text)
    assert d.is_local and d.host is None and d.user is None
    assert d.path == (expected or os.path.join(str(tmp_path), os.path.normpath(text)))


def test_parse_destination_local_expands_the_home(monkeypatch):
    monkeypatch.setenv("HOME", "/home/alice")
    assert byteback.parse_destination("~/byteback-store").path == "/home/alice/byteback-store"


@pytest.mark.parametrize("text", [
    "",
    "   ",
    "user@-oProxyCommand=x:",             # ssh would read the host as an option
    "-oProxyCommand=x:",
    "-x:",
    "@:",
    ":",
    "user@:",
    "us er@host:",
    "-l@host:",
    "user@ho st:",
    "user@host;id:",
    "user@$(id):",
])
def test_parse_destination_rejects(text):
    with pytest.raises(ByteBackError):
        byteback.parse_destination(text)


@pytest.mark.parametrize("text,user,host,path", [
    ("[::1]:", None, "::1", ""),
    ("byteback@[2001:db8::1]:", "byteback", "2001:db8::1", ""),
    ("b@[::ffff:10.0.0.5]:store", "b", "::ffff:10.0.0.5", "store"),
])
def test_parse_destination_bracketed_ipv6(text, user, host, path):
    assert byteback.parse_destination(text) == byteback.Destination(user, host, None, path)


@pytest.mark.parametrize("text", ["[::1]", "[::1]x:", "-o@[::1]:", "[host]:", "user@[::1:"])
def test_parse_destination_rejects_broken_ipv6(text):
    with pytest.raises(ByteBackError):
        byteback.parse_destination(text)


@pytest.mark.parametrize("offset", [dt.timedelta(hours=5, minutes=30, seconds=30),
                                    -dt.timedelta(hours=5, minutes=30, seconds=30), dt.timedelta(seconds=1)])
def test_a_zone_of_seconds_still_gives_a_name_in_the_documented_format(offset):
    """Issue 8 class 7: TZ=XXX-05:30:30 through sudo made '+053030' names no pattern reads."""
    when = dt.datetime(2026, 11, 28, 3, 15, 42, tzinfo=dt.timezone(offset))
    for seconds in (False, True):
        name = byteback.format_snapshot_name(when, seconds=seconds)
        parsed = byteback.parse_snapshot_name(name)
        assert parsed is not None and name.endswith("+0000"), name
        assert abs((parsed - when).total_seconds()) < 60


def test_scrubbing_the_environment_keeps_only_sudo_s_own_and_safe_values():
    import os
    import time
    environ = {"TZ": "XXX-05:30:30", "LANG": "de_DE.UTF-8", "LC_TIME": "x", "PATH": "/tmp:/usr/bin",
               "PYTHONPATH": "/tmp", "BYTEBACK_CONFIG_DIR": "/tmp", "SUDO_USER": "byteback", "SUDO_UID": "999"}
    saved = os.environ.get("TZ")
    try:
        byteback.scrub_environment(environ)
    finally:
        time.tzset()
    assert environ == {"SUDO_USER": "byteback", "SUDO_UID": "999", "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
                       "LC_ALL": "C"}
    assert os.environ.get("TZ") == saved
