"""Unit tests of the userns receiver's pure parts (section 8c, and what uses them).

* ``host_account_name``: a plain user name of at most 32 characters, one per host.
* ``parse_subids`` / ``subid_base`` / ``free_subid_base``: /etc/subuid and /etc/subgid.
* ``host_sudoers_text``: a host's account may ask for its own host's snapshot only.
* ``server_rsync_argv(fake_super=False)``: no --fake-super, no trusted./security. xattrs.
* ``setup_login``: the account setup-host names becomes the client's login.
* server.conf's ``receiver``.
"""
from __future__ import annotations

import os
import re
import signal

import pytest
from hypothesis import given
from hypothesis import strategies as st

import byteback

HOST_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9.-]{0,252}")


@pytest.mark.parametrize("user,host,expected", [
    ("byteback", "web1", "byteback-web1"),
    ("byteback", "db-2", "byteback-db-2"),
])
def test_a_short_lowercase_host_gets_a_readable_account(user, host, expected):
    assert byteback.host_account_name(user, host) == expected


@pytest.mark.parametrize("host", ["web1.example.com", "Web1", "a" * 40])
def test_other_hosts_get_a_hashed_account_of_their_own(host):
    name = byteback.host_account_name("byteback", host)
    assert re.fullmatch(r"byteback-h[0-9a-f]{16}", name)
    assert name != byteback.host_account_name("byteback", host + "x")


@given(st.from_regex(HOST_RE, fullmatch=True).filter(lambda h: ".." not in h),
       st.from_regex(re.compile(r"[a-z_][a-z0-9_-]{0,30}"), fullmatch=True))
def test_every_account_name_is_a_plain_user_name(host, user):
    name = byteback.host_account_name(user, host)
    assert len(name) <= 32 and re.fullmatch(r"[a-z_][a-z0-9_-]*", name)


SUBUID = """\
alice:100000:65536
# a comment
1001:165536:65536
broken line
bob:300000:1000
"""


def test_subid_lines_are_read_and_bad_ones_passed_over():
    assert byteback.parse_subids(SUBUID) == [("alice", 100000, 65536), ("1001", 165536, 65536),
                                             ("bob", 300000, 1000)]


def test_an_accounts_range_is_found_by_name_or_uid_and_must_be_whole():
    entries = byteback.parse_subids(SUBUID)
    assert byteback.subid_base(entries, "alice", 5) == 100000
    assert byteback.subid_base(entries, "carol", 1001) == 165536
    assert byteback.subid_base(entries, "bob", 7) is None          # 1000 ids: too few
    assert byteback.subid_base(entries, "dave", 8) is None


def test_a_new_range_overlaps_no_range_and_no_real_id():
    taken = [(100000, 65536), (165536, 65536), (300000, 1000)]
    assert byteback.free_subid_base(taken, [], size=65536) == 231072
    # a real user's uid inside the next block pushes the range past it
    # (the block after it holds bob's 300000: the one after that)
    assert byteback.free_subid_base(taken, [231072 + 5], size=65536) == 231072 + 2 * 65536
    assert byteback.free_subid_base([], []) == byteback.SUBID_START
    # a new host's whole range: the first block of 2^21 is taken, the next is free
    assert byteback.free_subid_base(taken, []) == byteback.SUBID_START + byteback.HOST_ID_COUNT


def test_a_thousand_hosts_fit_below_two_to_the_31():
    taken = []
    for _ in range(1000):
        taken.append((byteback.free_subid_base(taken, []), byteback.HOST_ID_COUNT))
    assert taken[-1][0] + byteback.HOST_ID_COUNT <= 2 ** 31


def test_no_range_reaches_two_to_the_31_or_past_login_defs_bounds():
    count = byteback.HOST_ID_COUNT
    last = 2 ** 31 - count                                   # the last block that ends below 2^31
    below = [(byteback.SUBID_START, last - byteback.SUBID_START)]
    assert byteback.free_subid_base(below, [], start=last) == last
    with pytest.raises(byteback.ByteBackError, match="no free range"):
        byteback.free_subid_base(below + [(last, count)], [], start=last)
    defs = "# shadow\nSUB_UID_MIN\t\t  200000\nSUB_UID_MAX  600100000\nSUB_GID_MIN 300000\n#SUB_GID_MAX 5\n"
    assert byteback.subid_bounds(defs) == (300000, 600100001)
    assert byteback.subid_bounds("SUB_UID_MAX 4000000000\n") == (byteback.SUBID_START, 2 ** 31)
    assert byteback.subid_bounds("") == (byteback.SUBID_START, 2 ** 31)
    start, end = byteback.subid_bounds("SUB_UID_MIN 100000\nSUB_UID_MAX 4000000\n")
    assert byteback.free_subid_base([], [], start, end=end) == 100000
    with pytest.raises(byteback.ByteBackError, match="SUB_UID_MAX"):
        byteback.free_subid_base([(100000, count)], [], start, end=end)     # the next block would end at 4294304
    with pytest.raises(byteback.ByteBackError, match="past 2"):
        byteback._refuse_shared_range("/etc/subuid", [("bb-web1", 2 ** 31 - 5, count)], "bb-web1", 5,
                                      ((0, 2 ** 31 - 5, count),))


def test_a_namespace_is_its_first_range_then_the_others_lowest_first_up_to_host_id_count():
    count = byteback.HOST_ID_COUNT
    new = [("bb-web1", 2197152, count)]
    assert byteback.host_id_map(new, "bb-web1", 5) == ((0, 2197152, count),)
    # set up with 65536 ids before, grown by setup-client: 0-65535 keep their meaning
    grown = [("bb-web1", 165536, 65536), ("x", 100000, 65536), ("bb-web1", 4294000, count - 65536)]
    assert byteback.host_id_map(grown, "bb-web1", 5) == ((0, 165536, 65536), (65536, 4294000, count - 65536))
    assert byteback.host_id_map(grown[:2], "bb-web1", 5) == ((0, 165536, 65536),)     # not grown: still works
    more = grown + [("5", 50000000, 10 ** 6), ("bb-web1", 9000000, 5)]
    assert byteback.host_id_map(more, "bb-web1", 5) == (
        (0, 165536, 65536), (65536, 4294000, count - 65536))                          # never past count
    small_first = [("bb-web1", 300000, 1000), ("bb-web1", 400000, 65536)]
    assert byteback.host_id_map(small_first, "bb-web1", 5) == ((0, 400000, 65536), (65536, 300000, 1000))
    assert byteback.host_id_map([("bb-web1", 300000, 1000)], "bb-web1", 5) == ()


@given(st.lists(st.tuples(st.integers(0, 2_000_000), st.integers(1, 200_000)), max_size=20),
       st.lists(st.integers(0, 2_000_000), max_size=20), st.sampled_from([65536, byteback.HOST_ID_COUNT - 65536,
                                                                        byteback.HOST_ID_COUNT]))
def test_a_new_range_never_overlaps_whatever_is_taken(taken, ids, size):
    base = byteback.free_subid_base(taken, ids, size=size)
    end = base + size
    assert base >= byteback.SUBID_START
    assert not any(first < end and base < first + count for first, count in taken)
    assert not any(base <= i < end for i in ids)


def test_a_host_accounts_sudo_lines_name_only_its_host():
    text = byteback.host_sudoers_text("byteback-web1", "web1", "/usr/local/bin/byteback.pyz", [])
    commands = [l.split("NOPASSWD: ", 1)[1] for l in text.splitlines() if "NOPASSWD" in l]
    assert commands == ["/usr/local/bin/byteback.pyz snapshot --host web1",
                        "/usr/local/bin/byteback.pyz snapshot --host web1 --prepare",
                        "/usr/local/bin/byteback.pyz snapshot --host web1 --when-told"]
    assert "*" not in text and all(l.startswith(("#", "Defaults:byteback-web1", "byteback-web1 "))
                                   for l in text.splitlines())
    assert "." not in byteback.host_sudoers_path("byteback-h.x").name
    # sudo keeps the caller's PATH where sudoers sets no secure_path; the zipapp's #! looks on PATH
    assert f'Defaults:byteback-web1 secure_path="{byteback.SYSTEM_PATH}"' in text.splitlines()


CAPS = "e.iLsfxCIvu"
PUSH = f"rsync --fake-super --server -lHogDtpXrR{CAPS} --timeout=300 --numeric-ids --inplace . current/"


def _argv(command: str, fake_super: bool):
    request = byteback.check_receive_command(command)
    return byteback.server_rsync_argv(request, host_dir="/srv/h", current="/srv/h/current",
                                      backend_options=["--inplace"], timeout=600, version=(3, 5, 0),
                                      fake_super=fake_super)


def test_the_userns_receiver_keeps_owners_without_fake_super():
    argv = _argv(PUSH, fake_super=False)
    assert "--fake-super" not in argv
    assert "--numeric-ids" in argv and "--munge-links" in argv and "--confine-root=/srv/h" in argv
    filters = [a for a in argv if a.startswith("--filter=")]
    assert filters == ["--filter=+x security.capability", "--filter=-x security.*", "--filter=-x trusted.*",
                       "--filter=-x user.rsync.%*"]
    assert argv[-3:] == ["--", ".", "/srv/h/current/"]
    assert "--fake-super" in _argv(PUSH, fake_super=True)


def test_a_restore_in_the_namespace_sends_without_fake_super_too():
    argv = _argv(f"rsync --server --sender -lHogDtpXrR{CAPS} --numeric-ids . current/etc", fake_super=False)
    assert "--sender" in argv and "--fake-super" not in argv and argv[-1] == "current/etc"


@pytest.mark.parametrize("said,user,expected", [
    ("host web1 set up\nlogin: byteback-web1\n", "byteback", "byteback-web1"),
    ("host web1 is already set up\nlogin: byteback\n", "byteback", "byteback"),
    ("an older server says nothing of it\n", "byteback", "byteback"),
    ("login: Root;rm\n", "byteback", "byteback"),                    # not a plain user name
    ("login: " + "a" * 40 + "\n", None, None),
])
def test_the_client_logs_in_as_the_account_setup_host_names(said, user, expected):
    assert byteback.setup_login(said, user) == expected


def test_server_conf_takes_receiver_fakesuper_or_userns_only():
    assert byteback.parse_server_config("[server]\n").receiver == "fakesuper"
    assert byteback.parse_server_config("[server]\nreceiver = userns\n").receiver == "userns"
    with pytest.raises(byteback.ByteBackError, match="line 2"):
        byteback.parse_server_config("[server]\nreceiver = root\n")


def test_setup_server_says_what_each_receiver_means():
    assert "own" in byteback._receiver_said("userns", "byteback", None)
    said = byteback._receiver_said("fakesuper", "byteback", "no uidmap")
    assert "no uidmap" in said and "receiver = userns" in said
    assert "receiver = userns" in byteback._server_conf_example("/srv", "userns")
    assert "WARNING" not in byteback._receiver_said("userns", "byteback", None)


def test_setup_server_warns_where_a_configured_userns_is_no_longer_possible():
    """server.conf said userns; the kernel now refuses unprivileged user namespaces."""
    said = byteback._receiver_said("userns", "byteback", "this kernel does not let an unprivileged user")
    assert "WARNING" in said and "this kernel does not let" in said and "cannot back up" in said


def test_setup_server_asks_for_noatime_on_the_store():
    """Reading a directory writes its access time (relatime: once a day): metadata a snapshot shares."""
    said = byteback.atime_warning("/srv/byteback", os.ST_RELATIME)
    assert "noatime" in said and "/srv/byteback" in said
    assert byteback.atime_warning("/srv/byteback", 0) == said
    assert byteback.atime_warning("/srv/byteback", os.ST_NOATIME | os.ST_RELATIME) is None
    assert byteback.atime_warning("/srv/byteback", os.ST_NODIRATIME) is None


def test_a_forked_childs_exit_is_read_on_every_python_the_program_runs_on():
    """os.waitstatus_to_exitcode is 3.9+: the namespace code read exits with it and
    crashed setup-server on 3.8 (this test runs on 3.8 in CI)."""
    outcomes = []
    for code in (0, 3):
        pid = os.fork()
        if pid == 0:            # pragma: no cover - the child
            os._exit(code)
        outcomes.append(byteback._child_succeeded(pid))
    pid = os.fork()
    if pid == 0:                # pragma: no cover - the child
        os.kill(os.getpid(), signal.SIGKILL)
    outcomes.append(byteback._child_succeeded(pid))
    assert outcomes == [True, False, False]
