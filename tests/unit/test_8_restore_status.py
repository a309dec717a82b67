"""Section 7c and 8: listing snapshots for restore, and status (issue 5, "Tests").

Pure tables for the glob matcher, version folding, pattern and path helpers
and the Nagios thresholds; tiny real trees in tmp_path for list_snapshot
(with the fake-super xattrs and munged symlinks a server store holds); the
clock frozen with freezegun for status, through byteback.main as a
monitoring system would run it.
"""
from __future__ import annotations

import datetime as dt
import fcntl
import fnmatch
import json
import shlex
import os
import re
import stat

import pytest
from freezegun import freeze_time
from hypothesis import given, settings, strategies as st

import byteback
from unit_helpers import UTC, at

H = 3600.0
WARNING, CRITICAL = 26 * H, 50 * H          # the documented defaults
FAKE_SUPER = byteback.FAKE_SUPER_XATTR


# === compile_glob =============================================================

def matches(pattern: str, path: str) -> bool:
    return bool(byteback.compile_glob(pattern).match(path))


@pytest.mark.parametrize("pattern,path,expected", [
    # '*': any run of characters within one name, never a '/'
    ("/etc/*.conf", "/etc/a.conf", True),
    ("/etc/*.conf", "/etc/.conf", True),                 # an empty run
    ("/etc/*.conf", "/etc/ssh/a.conf", False),
    ("/etc/*.conf", "/etc/a.conf.bak", False),           # anchored at the end
    ("/etc/*", "/etc", False),
    ("/etc/*", "/etc/", True),                           # '*' may be empty
    ("/home/*/notes.txt", "/home/ann/notes.txt", True),
    ("/home/*/notes.txt", "/home/ann/sub/notes.txt", False),
    ("*", "/etc", False),                                # relative globs never match an absolute path
    ("/a*b*c", "/aXbYc", True),
    ("/a*b*c", "/aXbY/c", False),
    ("/etc/*.conf", "/etc/a\nb.conf", True),             # a newline in a name is just a character
    ("/etc/*", "/etc/a\n", True),
    ("/etc/x", "/etc/x\n", False),                       # and no '$' that forgives a trailing one
    # '?': exactly one character, never a '/'
    ("/etc/host?", "/etc/hosts", True),
    ("/etc/host?", "/etc/host", False),
    ("/etc/host?", "/etc/hostss", False),
    ("/a?b", "/a/b", False),
    # [...] and [!...]
    ("/var/log/syslog.[0-9]", "/var/log/syslog.7", True),
    ("/var/log/syslog.[0-9]", "/var/log/syslog.x", False),
    ("/x/[abc]", "/x/b", True),
    ("/x/[abc]", "/x/d", False),
    ("/x/[!abc]", "/x/d", True),
    ("/x/[!abc]", "/x/a", False),
    ("/x/[!abc]", "/x/", False),                         # a class is one character, not none
    ("/x/[]a]", "/x/]", True),                           # ']' first is a member
    ("/x/[]a]", "/x/a", True),
    ("/x/[a-c]z", "/x/bz", True),
    ("/x/f[.]txt", "/x/f.txt", True),
    ("/x/f[.]txt", "/x/fxtxt", False),
    ("/x/a[b", "/x/a[b", True),                          # an unclosed '[' is literal
    ("/x/[\\]", "/x/\\", True),                          # a backslash in a class is literal
    # '**': any depth, including none
    ("/**", "/", True),
    ("/**", "/etc", True),
    ("/**", "/etc/ssh/sshd_config", True),
    ("/**/*.conf", "/a.conf", True),                     # at the start, zero directories
    ("/**/*.conf", "/etc/a.conf", True),
    ("/**/*.conf", "/etc/deep/er/a.conf", True),
    ("/**/*.conf", "/etc/a.confx", False),
    ("/etc/**/x", "/etc/x", True),                       # in the middle, zero directories
    ("/etc/**/x", "/etc/a/x", True),
    ("/etc/**/x", "/etc/a/b/c/x", True),
    ("/etc/**/x", "/etcx", False),
    ("/etc/**/x", "/etc2/x", False),
    ("/etc/**/x", "/etc/a/xy", False),
    ("/etc/**", "/etc", True),                           # at the end: the directory itself too
    ("/etc/**", "/etc/a", True),
    ("/etc/**", "/etc/a/b/c", True),
    ("/etc/**", "/etcetera", False),
    ("/etc/**", "/etcetera/x", False),
    ("/home/**/.ssh/*", "/home/ann/.ssh/id_rsa", True),
    ("/home/**/.ssh/*", "/home/.ssh/id_rsa", True),
    ("/a/**/b/**/c", "/a/b/c", True),
    ("/a/**/b/**/c", "/a/x/b/y/z/c", True),
    ("/a/**/b/**/c", "/a/x/y/c", False),
    # everything else is literal: dots, pluses, regex syntax
    ("/etc/a.b", "/etc/a.b", True),
    ("/etc/a.b", "/etc/aXb", False),
    ("/usr/include/c++/v1", "/usr/include/c++/v1", True),
    ("/usr/include/c++/v1", "/usr/include/cc/v1", False),
    ("/usr/include/c++/v1", "/usr/include/c+/v1", False),
    ("/x/(a|b)", "/x/(a|b)", True),
    ("/x/(a|b)", "/x/a", False),
    ("/x/$HOME^", "/x/$HOME^", True),
    ("/x/{a,b}", "/x/{a,b}", True),                      # no brace expansion
    ("/x/{a,b}", "/x/a", False),
    ("/x/a\\b", "/x/a\\b", True),
    ("/x/a b", "/x/a b", True),
])
def test_glob_table(pattern, path, expected):
    assert matches(pattern, path) is expected, (pattern, path, byteback.compile_glob(pattern).parts)


def test_a_glob_is_case_sensitive():
    assert not matches("/etc/Hosts", "/etc/hosts")
    assert not matches("/etc/[A-Z]osts", "/etc/hosts")


@pytest.mark.parametrize("pattern", ["/[z-a]", "/x/[b-a]y"])
def test_a_pattern_that_is_no_glob_is_a_byteback_error_not_a_traceback(pattern):
    with pytest.raises(byteback.ByteBackError) as e:
        byteback.compile_glob(pattern)
    assert pattern in str(e.value)


def test_a_negated_class_may_start_with_a_closing_bracket():
    assert matches("/x/[!]a]", "/x/b")
    assert not matches("/x/[!]a]", "/x/]")
    assert not matches("/x/[!]a]", "/x/a")


def _reference_match(pattern: str, path: str) -> bool:
    """The same glob by fnmatch (a backtracking regex), name by name, '**' by recursion."""
    def names(parts, got):
        if not parts:
            return not got
        if parts[0] == "**":
            return any(names(parts[1:], got[k:]) for k in range(len(got) + 1))
        return bool(got) and fnmatch.fnmatchcase(got[0], parts[0].replace("**", "*")) and names(parts[1:], got[1:])
    return names(pattern.split("/"), path.split("/"))


@settings(max_examples=400, deadline=None, database=None)
@given(st.lists(st.sampled_from(["a", "b", "*", "?", "[ab]", "[!a]", "/", "/**/", "**"]), max_size=8),
       st.lists(st.sampled_from(["a", "b", "/"]), max_size=10))
def test_property_the_glob_matches_as_fnmatch_does_name_by_name(pattern_parts, path_parts):
    pattern, path = "/" + "".join(pattern_parts), "/" + "".join(path_parts)
    assert matches(pattern, path) is _reference_match(pattern, path), (pattern, path)


@pytest.mark.parametrize("pattern", [
    "/d/*a*a*a*a/*a*a*a*a/zz",                          # the attack of issue 8, class 3
    "/d/" + "*a" * 40 + "b",                            # more stars than the guard allows
    "/**/**/" + "*a" * 10 + "/zz",
])
def test_matching_takes_time_in_proportion_to_the_names(pattern):
    import time
    path = f"/d/{'a' * 255}/{'a' * 255}/{'a' * 254}z"
    started = time.process_time()
    for _ in range(20):
        assert not matches(pattern, path)
    assert time.process_time() - started < 2, "20 matches of three 255-character names took over 2 s"


def test_a_listing_stops_at_its_time_limit_and_when_the_client_goes_away(tmp_path):
    now = [100.0]
    read, write = os.pipe()
    try:
        check = byteback.listing_watch(30, write, clock=lambda: now[0])
        check()                                      # in time, the client there: nothing
        now[0] += 31
        with pytest.raises(byteback.ByteBackError, match="longer than 30s"):
            check()
        check = byteback.listing_watch(30, write, clock=lambda: now[0])
        os.close(read)
        read = -1
        with pytest.raises(byteback.ByteBackError, match="went away"):
            check()
    finally:
        os.close(write)
        if read >= 0:
            os.close(read)
    (tmp_path / "snap" / "a" / "b").mkdir(parents=True)
    calls = []

    def stop():
        calls.append(1)
        raise byteback.ByteBackError("stopped")
    with pytest.raises(byteback.ByteBackError, match="stopped"):
        byteback.list_snapshot("snap", str(tmp_path / "snap"), ["/**"], check=stop)
    assert calls == [1]


# === glob_base =================================================================

@pytest.mark.parametrize("pattern,base,depth", [
    ("/etc/passwd", "/etc/passwd", 0),          # no wildcard: the path itself
    ("/", "/", 0),
    ("/etc/ssh/*.conf", "/etc/ssh", 1),
    ("/etc/*/x", "/etc", 2),
    ("/etc/?/x/y", "/etc", 3),
    ("/etc/[ab]", "/etc", 1),
    ("/etc/**", "/etc", None),                  # any depth
    ("/etc/**/x", "/etc", None),
    ("/etc/*/**", "/etc", None),
    ("/**/*.conf", "/", None),
    ("/**", "/", None),
    ("/*", "/", 1),
    ("/home/ann/notes*.txt", "/home/ann", 1),
])
def test_glob_base_table(pattern, base, depth):
    assert byteback.glob_base(pattern) == (base, depth)


# === fold_versions ===============================================================

S1, S2, S3, S4 = "2026-03-01T03:00+0000", "2026-03-02T03:00+0000", "2026-03-03T03:00+0000", \
    "2026-03-04T03:00+0000"
ORDER = [S1, S2, S3, S4, "current"]


def entry(snapshot: str, path: str = "/f", size: int = 10, mtime: int = 1000, kind: str = "f",
          mode: int = 0o100644, uid: int = 0, gid: int = 0, target: str = "") -> byteback.Entry:
    return byteback.Entry(snapshot, path, kind, mode, size, uid, gid, mtime, target)


def test_the_same_size_and_mtime_in_every_snapshot_is_one_version_the_oldest():
    entries = [entry(S1), entry(S2), entry(S3)]
    assert byteback.fold_versions(entries, ORDER) == [entry(S1)]


def test_a_change_of_size_or_mtime_is_a_new_version():
    entries = [entry(S1), entry(S2, size=11), entry(S3, size=11), entry(S4, size=11, mtime=2000)]
    assert byteback.fold_versions(entries, ORDER) == [entry(S1), entry(S2, size=11),
                                                       entry(S4, size=11, mtime=2000)]


def test_going_back_to_an_earlier_content_is_a_version_again():
    entries = [entry(S1), entry(S2, size=99), entry(S3)]
    assert [e.snapshot for e in byteback.fold_versions(entries, ORDER)] == [S1, S2, S3]


def test_a_change_of_kind_or_symlink_target_is_a_new_version():
    entries = [entry(S1, kind="l", size=0, target="a"), entry(S2, kind="l", size=0, target="b"),
               entry(S3, kind="f", size=0)]
    assert [e.snapshot for e in byteback.fold_versions(entries, ORDER)] == [S1, S2, S3]


def test_only_mode_or_owner_changed_folds_into_one_version():
    """The issue's rule: "same size and mtime counts as one version"."""
    entries = [entry(S1), entry(S2, mode=0o100600, uid=1000)]
    assert byteback.fold_versions(entries, ORDER) == [entry(S1)]


def test_versions_come_in_snapshot_order_whatever_order_they_were_found_in():
    entries = [entry(S3, size=3), entry(S1, size=1), entry("current", size=4), entry(S2, size=2)]
    assert [e.snapshot for e in byteback.fold_versions(entries, ORDER)] == [S1, S2, S3, "current"]


def test_paths_are_sorted_and_folded_separately():
    entries = [entry(S2, "/b"), entry(S1, "/b"), entry(S1, "/a"), entry(S2, "/a", size=5)]
    assert byteback.fold_versions(entries, ORDER) == [entry(S1, "/a"), entry(S2, "/a", size=5),
                                                       entry(S1, "/b")]


def test_a_file_deleted_and_back_again_keeps_its_versions():
    entries = [entry(S1), entry(S3)]       # not in S2
    assert [e.snapshot for e in byteback.fold_versions(entries, ORDER)] == [S1]


def test_fold_versions_of_nothing_is_nothing():
    assert byteback.fold_versions([], ORDER) == []


# === list_snapshot on a tiny real tree ============================================

SNAP = "2026-03-01T03:00+0000"


def _write(path, data: bytes = b"x", mtime: int = 1_600_000_000, mode: int = 0o644):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    os.chmod(path, mode)
    os.utime(path, (mtime, mtime))
    return path


@pytest.fixture
def snapshot_tree(tmp_path):
    """<tmp>/snap: a snapshot root holding a little /etc and /home, as a server store does."""
    root = tmp_path / "snap"
    _write(root / "etc/hosts", b"127.0.0.1 localhost\n", 1_600_000_100)
    _write(root / "etc/a.conf", b"a = 1\n", 1_600_000_200)
    _write(root / "etc/ssh/sshd_config", b"Port 22\n", 1_600_000_300, 0o600)
    _write(root / "etc/ssh/deep/b.conf", b"b\n")
    _write(root / "home/ann/notes.txt", b"my notes\n", 1_600_000_400)
    _write(root / "home/ann/c++/x.h", b"int x;\n")
    (root / "home/ann/empty").mkdir()
    os.symlink("notes.txt", root / "home/ann/link")
    return root


def listed(root, *patterns, snapshot=SNAP):
    return byteback.list_snapshot(snapshot, str(root), list(patterns))


def paths(entries):
    return [e.path for e in entries]


def test_list_snapshot_a_plain_path_finds_that_entry(snapshot_tree):
    [e] = listed(snapshot_tree, "/etc/hosts")
    assert e == byteback.Entry(SNAP, "/etc/hosts", "f", e.mode, 20, e.uid, e.gid, 1_600_000_100, "")
    assert stat.S_IMODE(e.mode) == 0o644


def test_list_snapshot_star_stays_in_one_directory(snapshot_tree):
    assert paths(listed(snapshot_tree, "/etc/*.conf")) == ["/etc/a.conf"]
    assert paths(listed(snapshot_tree, "/etc/*")) == ["/etc/a.conf", "/etc/hosts", "/etc/ssh"]


def test_list_snapshot_double_star_reaches_any_depth(snapshot_tree):
    assert paths(listed(snapshot_tree, "/**/*.conf")) == ["/etc/a.conf", "/etc/ssh/deep/b.conf"]
    assert paths(listed(snapshot_tree, "/etc/**")) == [
        "/etc", "/etc/a.conf", "/etc/hosts", "/etc/ssh", "/etc/ssh/deep", "/etc/ssh/deep/b.conf",
        "/etc/ssh/sshd_config"]
    everything = paths(listed(snapshot_tree, "/**"))
    assert everything[0] == "/" and "/home/ann/c++/x.h" in everything and len(everything) == 15


def test_list_snapshot_several_patterns_list_each_entry_once_sorted(snapshot_tree):
    got = paths(listed(snapshot_tree, "/home/ann/notes.txt", "/home/**/*.txt", "/etc/hosts"))
    assert got == ["/etc/hosts", "/home/ann/notes.txt"]


def test_list_snapshot_kinds_sizes_and_symlinks(snapshot_tree):
    by_path = {e.path: e for e in listed(snapshot_tree, "/home/ann/*")}
    assert by_path["/home/ann/empty"].kind == "d" and by_path["/home/ann/empty"].size == 0
    assert by_path["/home/ann/notes.txt"].kind == "f" and by_path["/home/ann/notes.txt"].size == 9
    link = by_path["/home/ann/link"]
    assert (link.kind, link.size, link.target) == ("l", 0, "notes.txt")


def test_list_snapshot_literal_plus_signs_and_no_match(snapshot_tree):
    assert paths(listed(snapshot_tree, "/home/ann/c++/*")) == ["/home/ann/c++/x.h"]
    assert listed(snapshot_tree, "/home/ann/c+/*") == []
    assert listed(snapshot_tree, "/nowhere/**") == []
    assert listed(snapshot_tree, "/etc/hosts/*") == []       # a file is not walked into


def test_list_snapshot_shows_owner_and_mode_from_the_fake_super_xattr(snapshot_tree):
    os.setxattr(snapshot_tree / "etc/hosts", FAKE_SUPER, b"100640 0,0 1000:1000")
    os.setxattr(snapshot_tree / "etc/ssh", FAKE_SUPER, b"40700 0,0 0:4")
    by_path = {e.path: e for e in listed(snapshot_tree, "/etc/*")}
    hosts = by_path["/etc/hosts"]
    assert (hosts.mode, hosts.uid, hosts.gid, hosts.kind) == (0o100640, 1000, 1000, "f")
    ssh = by_path["/etc/ssh"]
    assert (ssh.mode, ssh.uid, ssh.gid, ssh.kind) == (0o40700, 0, 4, "d")
    # Without the xattr: what the server's filesystem says.
    st = os.lstat(snapshot_tree / "etc/a.conf")
    assert (by_path["/etc/a.conf"].mode, by_path["/etc/a.conf"].uid) == (st.st_mode, st.st_uid)


def test_list_snapshot_a_garbled_fake_super_xattr_falls_back_to_the_real_attributes(snapshot_tree):
    os.setxattr(snapshot_tree / "etc/hosts", FAKE_SUPER, b"garbage")
    [e] = listed(snapshot_tree, "/etc/hosts")
    st = os.lstat(snapshot_tree / "etc/hosts")
    assert (e.mode, e.uid, e.gid) == (st.st_mode, st.st_uid, st.st_gid)


def test_list_snapshot_shows_a_munged_symlink_target_unmunged(snapshot_tree):
    os.symlink("/rsyncd-munged//etc/passwd", snapshot_tree / "home/ann/abs")   # as rsync munges
    os.symlink("/rsyncd-munged/../up", snapshot_tree / "home/ann/rel")
    by_path = {e.path: e for e in listed(snapshot_tree, "/home/ann/*")}
    assert by_path["/home/ann/abs"].target == "/etc/passwd"
    assert by_path["/home/ann/rel"].target == "../up"
    assert by_path["/home/ann/link"].target == "notes.txt"     # not munged: unchanged


def test_list_snapshot_shows_a_fake_super_symlink_as_a_symlink(snapshot_tree):
    """A server store (--fake-super) keeps a symlink as a small file holding its munged target."""
    stored = _write(snapshot_tree / "home/ann/mylink", b"/rsyncd-munged/notes.txt", mode=0o777)
    os.setxattr(stored, FAKE_SUPER, b"120777 0,0 1000:1000")
    [e] = listed(snapshot_tree, "/home/ann/mylink")
    assert (e.kind, e.size, e.target, e.uid) == ("l", 0, "notes.txt", 1000)
    assert "/home/ann/mylink -> notes.txt" in byteback.format_entries([e])


def test_list_snapshot_does_not_follow_a_symlink_stored_in_the_snapshot(snapshot_tree, tmp_path):
    """A local store keeps real symlinks: a pattern below one must not list live files."""
    outside = tmp_path / "outside"
    _write(outside / "secret", b"not in the snapshot\n")
    _write(outside / "sub/secret.conf", b"not in the snapshot\n")
    os.symlink(str(outside), snapshot_tree / "home/ann/out")
    assert listed(snapshot_tree, "/home/ann/out/secret") == []
    assert listed(snapshot_tree, "/home/ann/out/sub/*.conf") == []
    assert [(e.path, e.kind) for e in listed(snapshot_tree, "/home/ann/out/**")] == [("/home/ann/out", "l")]


def test_list_snapshot_does_not_walk_into_a_stored_symlink(snapshot_tree, tmp_path):
    """The part that already holds: a wildcard below a stored link does not follow it."""
    _write(tmp_path / "outside/secret", b"not in the snapshot\n")
    os.symlink(str(tmp_path / "outside"), snapshot_tree / "home/ann/out")
    assert listed(snapshot_tree, "/home/ann/out/*") == []
    assert [e.kind for e in listed(snapshot_tree, "/home/**") if e.path.startswith("/home/ann/out")] == ["l"]


def test_list_store_newest_all_and_named_snapshot(tiny):
    for day, content in ((1, b"v1"), (2, b"v1"), (3, b"version 3")):
        snap = tiny.add_snapshot("web1", at(2026, 3, day, 3, 0), content=content)
        os.utime(tiny.root / "web1" / snap.name / "file", (1_600_000_000 + day // 3, 1_600_000_000 + day // 3))
    names = tiny.names("web1")
    newest = byteback.list_store(tiny.store, "web1", ["/file"])
    assert [(e.snapshot, e.size) for e in newest] == [(names[2], 9)]
    every = byteback.list_store(tiny.store, "web1", ["/file"], every=True)
    assert [(e.snapshot, e.size) for e in every] == [(names[0], 2), (names[2], 9)]
    one = byteback.list_store(tiny.store, "web1", ["/file"], snapshot=names[1])
    assert [e.snapshot for e in one] == [names[1]]
    with pytest.raises(byteback.ByteBackError, match="no snapshot 2020"):
        byteback.list_store(tiny.store, "web1", ["/file"], snapshot="2020-01-01T00:00+0000")
    with pytest.raises(byteback.ByteBackError, match="no snapshots yet"):
        byteback.list_store(tiny.store, "db1", ["/file"])


def test_list_store_current_is_listed_and_marked_incomplete(tiny):
    tiny.add_snapshot("web1", at(2026, 3, 1, 3, 0))
    (tiny.store.current("web1") / "new").write_bytes(b"half")
    [e] = byteback.list_store(tiny.store, "web1", ["/new"], snapshot="current")
    assert e.snapshot == "current"
    assert "current (incomplete)" in byteback.format_entries([e])


# === format_entries ===============================================================

def test_format_entries_columns():
    rows = [byteback.Entry(S1, "/etc/hosts", "f", 0o100640, 1234, 1000, 1000, 1_600_000_000),
            byteback.Entry(S2, "/etc", "d", 0o40755, 0, 0, 0, 1_600_000_000),
            byteback.Entry("current", "/etc/link", "l", 0o120777, 0, 0, 4, 1_600_000_000, "/x y")]
    text = byteback.format_entries(rows)
    lines = text.splitlines()
    assert len(lines) == 4
    assert lines[0].split() == ["snapshot", "mode", "size", "owner", "modified", "path"]
    when = dt.datetime.fromtimestamp(1_600_000_000).strftime("%Y-%m-%d %H:%M")
    assert lines[1].split() == [S1, "-rw-r-----", "1234", "1000:1000", *when.split(), "/etc/hosts"]
    assert lines[2].split() == [S2, "drwxr-xr-x", "0", "0:0", *when.split(), "/etc"]
    assert lines[3].split() == ["current", "(incomplete)", "lrwxrwxrwx", "0", "0:4", *when.split(),
                                "/etc/link", "->", "/x", "y"]
    # Every column starts where its heading does.
    for heading in ("mode", "size", "owner", "modified", "path"):
        col = lines[0].index(heading)
        for line in lines[1:]:
            assert line[col - 2:col] == "  " and line[col] != " ", (heading, line)


def test_format_entries_set_id_and_odd_kinds():
    e = byteback.Entry(S1, "/usr/bin/x", "f", 0o104755, 1, 0, 0, 0)
    assert "-rwxr-xr-x" in byteback.format_entries([e])   # set-id bits are not shown (nor lost)
    fifo = byteback.Entry(S1, "/run/fifo", "o", 0o10644, 0, 0, 0, 0)
    assert "?rw-r--r--" in byteback.format_entries([fifo])


def test_format_entries_of_nothing_is_the_heading():
    assert byteback.format_entries([]).split() == ["snapshot", "mode", "size", "owner", "modified", "path"]


# === absolute_patterns, topmost_paths, restore_sources ==============================

@pytest.mark.parametrize("pattern,cwd,expected", [
    ("notes.txt", "/home/ann", "/home/ann/notes.txt"),
    ("./docs/../notes.txt", "/home/ann", "/home/ann/notes.txt"),
    ("../../etc/passwd", "/home/ann", "/etc/passwd"),
    ("../../etc/passwd", "/home/ann/docs", "/home/etc/passwd"),
    ("../../../../../../etc/passwd", "/home/ann", "/etc/passwd"),     # never above /
    ("/../../etc/passwd", "/home/ann", "/etc/passwd"),
    ("//etc//ssh/", "/home/ann", "/etc/ssh"),                         # POSIX's '//' too
    ("/etc/ssh/", "/", "/etc/ssh"),
    ("etc/*.conf", "/", "/etc/*.conf"),
    ("**/*.conf", "/srv", "/srv/**/*.conf"),
    ("*", "/srv", "/srv/*"),
    (".", "/srv", "/srv"),
    ("..", "/", "/"),
    ("/", "/home", "/"),
])
def test_absolute_patterns_table(pattern, cwd, expected):
    assert byteback.absolute_patterns([pattern], cwd) == [expected]


@pytest.mark.parametrize("paths_in,expected", [
    (["/a"], ["/a"]),
    (["/a/b", "/a", "/a/b/c", "/ab", "/c"], ["/a", "/ab", "/c"]),
    (["/a/b", "/a/b"], ["/a/b"]),
    (["/a/b", "/a/c"], ["/a/b", "/a/c"]),
    (["/a/b/c", "/a/bc", "/a/b"], ["/a/b", "/a/bc"]),
    (["/etc/x", "/"], ["/"]),
    ([], []),
])
def test_topmost_paths_table(paths_in, expected):
    assert byteback.topmost_paths(paths_in) == expected


@pytest.mark.parametrize("path,cwd,expected", [
    ("/home/ann/notes.txt", "/home/ann", ("/home/ann", "notes.txt")),
    ("/home/ann/docs/a b", "/home/ann", ("/home/ann", "docs/a b")),
    ("/etc/passwd", "/home/ann", ("/", "etc/passwd")),
    ("/home/ann", "/home/ann", ("/", "home/ann")),           # the cwd itself: full path
    ("/home/anna/x", "/home/ann", ("/", "home/anna/x")),     # a prefix is not a parent
    ("/home", "/home/ann", ("/", "home")),
    ("/etc/passwd", "/", ("/", "etc/passwd")),
])
def test_restore_sources_table(path, cwd, expected):
    assert byteback.restore_sources([path], cwd) == [expected]


# === status: nagios_state at its edges ================================================

@pytest.mark.parametrize("age,running,expected", [
    (0.0, False, byteback.NAGIOS_OK),
    (WARNING - 0.001, False, byteback.NAGIOS_OK),
    (WARNING, False, byteback.NAGIOS_WARNING),          # exactly at the threshold: late
    (CRITICAL - 0.001, False, byteback.NAGIOS_WARNING),
    (CRITICAL, False, byteback.NAGIOS_CRITICAL),
    (1e9, False, byteback.NAGIOS_CRITICAL),
    (None, False, byteback.NAGIOS_CRITICAL),            # never backed up
    (CRITICAL * 10, True, byteback.NAGIOS_OK),          # a running backup is not late
    (WARNING, True, byteback.NAGIOS_OK),
    (None, True, byteback.NAGIOS_OK),                   # the first backup, still running, is not late either
    (-60.0, False, byteback.NAGIOS_OK),                 # a clock a little behind
])
def test_nagios_state_edges(age, running, expected):
    assert byteback.nagios_state(age, WARNING, CRITICAL, running) == expected


@pytest.mark.parametrize("age,expected", [
    (0.0, byteback.NAGIOS_WARNING),                     # a stuck session is never OK ...
    (WARNING, byteback.NAGIOS_WARNING),
    (CRITICAL, byteback.NAGIOS_CRITICAL),               # ... and does not hide a critical age
    (None, byteback.NAGIOS_CRITICAL),
])
def test_a_stuck_session_is_at_least_a_warning(age, expected):
    """Issue 8 class 4: a session that sends nothing kept the host 'running', never late."""
    assert byteback.nagios_state(age, WARNING, CRITICAL, True, stuck=True) == expected


def test_a_session_lock_held_by_a_quiet_process_is_stuck(tmp_path):
    import subprocess
    import sys
    import time
    lock = tmp_path / "web1.lock"
    lock.write_text("")
    read, write = os.pipe()
    holder = subprocess.Popen([sys.executable, "-c", "import fcntl, os, sys, time\n"
                               f"fd = os.open({str(lock)!r}, os.O_RDWR)\n"
                               "fcntl.flock(fd, fcntl.LOCK_EX)\nprint('held', flush=True)\ntime.sleep(60)\n"],
                              stdin=read, stdout=subprocess.PIPE, text=True)
    os.close(read)
    try:
        assert holder.stdout.readline().strip() == "held"
        now = time.time()
        assert byteback.lock_holders(lock) == [holder.pid]
        state, holders, quiet = byteback.session_state(lock, now, timeout=600)
        assert state == "running" and holders == [holder.pid]
        state, _, quiet = byteback.session_state(lock, now + 700, timeout=600)
        assert state == "stuck" and quiet >= 600
        os.write(write, b"data")                        # the client speaks: not stuck any more
        state, _, quiet = byteback.session_state(lock, time.time() + 1, timeout=600)
        assert state == "running" and quiet < 5
    finally:
        holder.kill()
        holder.wait()
        holder.stdout.close()
        os.close(write)
    assert byteback.session_state(lock, time.time(), timeout=600) == ("idle", [], None)


@pytest.mark.parametrize("host,this,root,same,keep", [
    ("web1", "web1", True, False, True),      # as root onto the host itself: everything
    ("web1", "backup1", True, False, False),  # the administrator on the server: dropped
    ("web1", "web1", False, False, False),    # not root: dropped (it could not chown anyway)
    ("web1", "backup1", True, True, True),    # asked for
])
def test_what_a_restore_keeps(host, this, root, same, keep):
    assert byteback.restore_keeps_everything(host, this, root, same) is keep


def test_nagios_state_with_equal_thresholds_goes_straight_to_critical():
    assert byteback.nagios_state(10.0, 10.0, 10.0, False) == byteback.NAGIOS_CRITICAL
    assert byteback.nagios_state(9.9, 10.0, 10.0, False) == byteback.NAGIOS_OK


# === status: the client ==================================================================

END = at(2026, 3, 1, 3, 0, 30)
START = END - dt.timedelta(minutes=5)
GOOD = {"start": START.isoformat(), "end": END.isoformat(), "result": "ok", "bytes_sent": 123456,
        "host": "client1", "destination": "byteback@server:"}
FAILED = {"start": (END + dt.timedelta(days=1)).isoformat(),
          "end": (END + dt.timedelta(days=1, seconds=9)).isoformat(), "result": "failed",
          "error": "cannot connect to server: Connection refused", "host": "client1"}


def test_client_status_values():
    report = byteback.client_status({"last_attempt": FAILED, "last_success": GOOD},
                                    END + dt.timedelta(hours=30), running=False)
    assert report == {"running": False, "last_success": END.isoformat(), "age_seconds": 30 * H,
                      "duration_seconds": 300.0, "bytes_sent": 123456,
                      "last_attempt": FAILED["end"], "last_result": "failed",
                      "last_error": FAILED["error"], "database_warnings": [], "not_kept": None}


def test_client_status_warns_of_what_the_last_good_backup_could_not_keep(capsys, state_dir):
    gaps = {"devices": 1, "owners": 2, "examples": ["/dev/null"], "time": ""}
    write_state(state_dir, {"last_success": dict(GOOD, not_kept=gaps), "last_attempt": dict(GOOD, not_kept=gaps)})
    with freeze_time(END + dt.timedelta(hours=1)):
        assert byteback.main(["status", "--nagios"]) == 1           # a WARNING, never CRITICAL for this
    out = capsys.readouterr().out
    assert out.startswith("BYTEBACK WARNING - last backup 1h 0m ago; 3 files not kept as they are"), out
    with freeze_time(END + dt.timedelta(hours=1)):
        byteback.main(["status"])
    assert "not kept:       WARNING 3 files not kept" in capsys.readouterr().out
    for bad in ({"devices": -1, "owners": 0, "examples": []}, "x", {"devices": 1, "owners": 0, "examples": ["\x1b"]}):
        write_state(state_dir, {"last_success": dict(GOOD, not_kept=bad)})
        with freeze_time(END + dt.timedelta(hours=1)):
            assert byteback.main(["status", "--nagios"]) == 0      # a bad record is no record
        capsys.readouterr()


def test_client_status_never_backed_up():
    report = byteback.client_status({}, END, running=True)
    assert report["age_seconds"] is None and report["last_success"] is None
    assert report["running"] is True and report["last_attempt"] is None


def test_client_status_reads_the_clock_of_another_time_zone_right():
    plus_two = dt.timezone(dt.timedelta(hours=2))
    good = dict(GOOD, end=END.astimezone(plus_two).isoformat())
    report = byteback.client_status({"last_success": good}, END + dt.timedelta(seconds=90), False)
    assert report["age_seconds"] == 90.0


@pytest.fixture
def state_dir(tmp_path):
    """$BYTEBACK_STATE_DIR (the conftest points it into tmp_path)."""
    path = byteback.client_state_dir()
    path.mkdir(parents=True, exist_ok=True)
    assert str(path).startswith(str(tmp_path))
    return path


def write_state(state_dir, state) -> None:
    (state_dir / "last-backup.json").write_text(json.dumps(state))


NAGIOS_LINE = re.compile(r"BYTEBACK (OK|WARNING|CRITICAL|UNKNOWN) - [^|\n]+\|age=(\d+)s;(\d+);(\d+)\n\Z")


def nagios(capsys, *args: str, when: dt.datetime):
    with freeze_time(when):
        code = byteback.main(["status", "--nagios", *args])
    out = capsys.readouterr().out
    return code, out


@pytest.mark.parametrize("age,code,word", [
    (dt.timedelta(0), 0, "OK"),
    (dt.timedelta(hours=1), 0, "OK"),
    (dt.timedelta(hours=26) - dt.timedelta(seconds=1), 0, "OK"),
    (dt.timedelta(hours=26), 1, "WARNING"),
    (dt.timedelta(hours=49, minutes=59, seconds=59), 1, "WARNING"),
    (dt.timedelta(hours=50), 2, "CRITICAL"),
    (dt.timedelta(days=30), 2, "CRITICAL"),
])
def test_status_nagios_exit_code_and_line_by_age(capsys, state_dir, age, code, word):
    write_state(state_dir, {"last_attempt": GOOD, "last_success": GOOD})
    got, out = nagios(capsys, when=END + age)
    assert got == code, out
    m = NAGIOS_LINE.match(out)
    assert m, out
    assert m.group(1) == word
    assert (int(m.group(2)), int(m.group(3)), int(m.group(4))) == (int(age.total_seconds()), 93600, 180000)
    assert "last backup" in out


def test_status_nagios_thresholds_from_the_command_line(capsys, state_dir):
    write_state(state_dir, {"last_attempt": GOOD, "last_success": GOOD})
    code, out = nagios(capsys, "--warning", "10m", "--critical", "1h", when=END + dt.timedelta(minutes=10))
    assert code == 1 and out.startswith("BYTEBACK WARNING - ") and out.endswith("|age=600s;600;3600\n"), out
    code, out = nagios(capsys, "--warning", "10m", "--critical", "1h", when=END + dt.timedelta(hours=1))
    assert code == 2 and out.startswith("BYTEBACK CRITICAL - "), out
    code, out = nagios(capsys, "--warning", "2d", "--critical", "1w", when=END + dt.timedelta(days=3))
    assert code == 1 and out.endswith("|age=259200s;172800;604800\n"), out


def test_status_nagios_says_the_last_attempt_failed(capsys, state_dir):
    write_state(state_dir, {"last_attempt": FAILED, "last_success": GOOD})
    code, out = nagios(capsys, when=END + dt.timedelta(hours=27))
    assert code == 1
    assert "last attempt failed: cannot connect to server: Connection refused" in out
    assert len(out.splitlines()) == 1


def test_status_never_backed_up_is_critical(capsys, state_dir):
    code, out = nagios(capsys, when=END)
    assert code == 2 and out.startswith("BYTEBACK CRITICAL - last backup never"), out


def test_status_a_running_backup_is_not_late(capsys, state_dir):
    write_state(state_dir, {"last_attempt": GOOD, "last_success": GOOD})
    lock = state_dir / "backup.lock"
    with open(lock, "a") as f:
        fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        assert byteback.flock_held(lock)
        code, out = nagios(capsys, when=END + dt.timedelta(days=5))
        with freeze_time(END + dt.timedelta(days=5)):
            assert byteback.main(["status", "--json"]) == 0
        report = json.loads(capsys.readouterr().out)
    assert code == 0 and out.startswith("BYTEBACK OK - ") and "one running now" in out, out
    assert report["running"] is True and report["state"] == "OK"
    # Released: late again.
    assert not byteback.flock_held(lock)
    code, out = nagios(capsys, when=END + dt.timedelta(days=5))
    assert code == 2 and "running" not in out


def test_flock_held_without_a_lock_file_or_a_lock(state_dir):
    assert not byteback.flock_held(state_dir / "backup.lock")
    (state_dir / "backup.lock").touch()
    assert not byteback.flock_held(state_dir / "backup.lock")


def test_status_json_parses_and_has_the_values(capsys, state_dir):
    write_state(state_dir, {"last_attempt": FAILED, "last_success": GOOD})
    with freeze_time(END + dt.timedelta(hours=2)):
        assert byteback.main(["status", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["state"] == "OK"
    assert report["age_seconds"] == 2 * H
    assert report["duration_seconds"] == 300.0
    assert report["bytes_sent"] == 123456
    assert report["last_result"] == "failed" and report["last_error"] == FAILED["error"]
    assert report["running"] is False


def test_status_human_table(capsys, state_dir):
    write_state(state_dir, {"last_attempt": FAILED, "last_success": GOOD})
    with freeze_time(END + dt.timedelta(hours=2)):
        assert byteback.main(["status"]) == 0
    out = capsys.readouterr().out
    assert "OK" in out and END.isoformat() in out and "5m" in out and "123456" in out
    assert "failed" in out and "Connection refused" in out and "running now:    no" in out


@pytest.mark.parametrize("argv", [
    ["status", "--bogus"],
    ["status", "--warning", "xyz"],
    ["status", "--critical", "-5"],
    ["status", "--nagios", "extra-word"],
])
def test_status_bad_arguments_are_unknown_3(capsys, state_dir, argv):
    write_state(state_dir, {"last_attempt": GOOD, "last_success": GOOD})
    with freeze_time(END):
        assert byteback.main(argv) == 3
    assert "usage" in capsys.readouterr().err


@pytest.mark.parametrize("content", [b"{not json", b"", b"\xff\xfe{}", b"[1, 2]", b'"a string"', b"null"])
def test_status_a_corrupt_state_file_is_unknown_3_in_one_line(capsys, state_dir, content):
    (state_dir / "last-backup.json").write_bytes(content)
    with freeze_time(END):
        assert byteback.main(["status", "--nagios"]) == 3
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err, captured.err
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byteback: ") and "last-backup.json" in lines[0], lines


def test_status_an_unreadable_state_file_is_unknown_3(capsys, state_dir):
    (state_dir / "last-backup.json").mkdir()          # unreadable even for root
    with freeze_time(END):
        assert byteback.main(["status", "--nagios"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "cannot read" in err, err


def test_status_a_state_file_of_the_wrong_shape_is_unknown_3_in_one_line(capsys, state_dir):
    write_state(state_dir, {"last_success": "yesterday", "last_attempt": ["x"]})
    with freeze_time(END):
        assert byteback.main(["status", "--nagios"]) == 3
    err = capsys.readouterr().err
    assert "Traceback" not in err and "last-backup.json" in err, err


def test_status_a_state_with_odd_times_does_not_crash(capsys, state_dir):
    write_state(state_dir, {"last_success": {"end": "not a time", "result": "ok"}})
    with freeze_time(END):
        assert byteback.main(["status", "--nagios"]) == 2      # no usable success: never
    assert capsys.readouterr().out.startswith("BYTEBACK CRITICAL - ")


def test_status_a_naive_time_in_the_state_is_taken_as_utc(capsys, state_dir):
    write_state(state_dir, {"last_success": dict(GOOD, end="2026-03-01T03:00:30")})
    with freeze_time(END + dt.timedelta(seconds=42)):
        assert byteback.main(["status", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["age_seconds"] == 42.0


# === status: the server ===================================================================

T = at(2026, 3, 10, 12, 0)


@pytest.fixture
def two_hosts(tiny):
    """web1 backed up 2h ago (3 snapshots), db1 60h ago (1 snapshot), new1 set up with none."""
    tiny.add_snapshot("web1", T - dt.timedelta(days=9), added=1000, first=True)
    tiny.add_snapshot("web1", T - dt.timedelta(days=1), added=100)
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2), added=300)
    tiny.add_snapshot("db1", T - dt.timedelta(hours=60), added=5000)
    tiny.store.prepare_host("new1")
    return tiny


def test_server_status_values(two_hosts):
    report = byteback.server_status(two_hosts.store, byteback.ServerConfig(), T)
    assert sorted(report["hosts"]) == ["db1", "new1", "web1"]
    web1, db1, new1 = (report["hosts"][h] for h in ("web1", "db1", "new1"))
    names = two_hosts.names("web1")
    assert (web1["snapshots"], web1["newest"], web1["oldest"]) == (3, names[-1], names[0])
    assert web1["age_seconds"] == 2 * H
    assert web1["last_added"] == 300 and web1["mean_added"] == 200      # the first backup is not counted
    assert web1["running"] is False and web1["incomplete_since"] is None
    assert (db1["snapshots"], db1["age_seconds"]) == (1, 60 * H)
    assert (new1["snapshots"], new1["newest"], new1["age_seconds"]) == (0, None, None)
    assert report["backend"] == "hardlink" and report["store"] == str(two_hosts.root)
    assert report["free_bytes"] > 0 and report["total_bytes"] >= report["free_bytes"]
    # web1's normal went from 100 to a mean of 200 within hours: the target counts
    # it only as far as a normal may grow (normal_growth, 25% per 30 days)
    assert int(1.5 * (100 + 5000)) <= report["target_bytes"] < int(1.5 * (200 + 5000))


def test_server_status_a_dirty_current_is_incomplete(two_hosts):
    two_hosts.store.mark_dirty("web1", T - dt.timedelta(minutes=5))
    report = byteback.server_status(two_hosts.store, byteback.ServerConfig(), T)
    assert report["hosts"]["web1"]["incomplete_since"] == (T - dt.timedelta(minutes=5)).isoformat()


def server_main(capsys, tmp_path, root, *args):
    with freeze_time(T):
        code = byteback.main(["--config-dir", str(tmp_path / "no-config"), "status", "--store", str(root), *args])
    return code, capsys.readouterr()


def test_server_status_json(capsys, tmp_path, two_hosts):
    code, captured = server_main(capsys, tmp_path, two_hosts.root, "--json")
    assert code == 2, captured
    report = json.loads(captured.out)
    assert report["state"] == "CRITICAL"
    assert report["hosts"]["web1"]["snapshots"] == 3 and report["hosts"]["db1"]["age_seconds"] == 60 * H


def test_server_status_nagios_names_the_late_hosts(capsys, tmp_path, two_hosts):
    code, captured = server_main(capsys, tmp_path, two_hosts.root, "--nagios")
    assert code == 2
    line = captured.out
    assert re.fullmatch(r"BYTEBACK CRITICAL - 3 hosts, 2 late \(db1, new1\), [\d.]+[BKMGT] free"
                        r"\|free=\d+B target=\d+B late=2\n", line), line
    code, captured = server_main(capsys, tmp_path, two_hosts.root, "--nagios", "--critical", "3d")
    assert code == 2                                          # new1 has none at all


def test_server_status_all_hosts_fresh_is_ok(capsys, tmp_path, tiny):
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2))
    tiny.add_snapshot("web2", T - dt.timedelta(hours=25, minutes=59))
    code, captured = server_main(capsys, tmp_path, tiny.root, "--nagios")
    assert code == 0 and captured.out.startswith("BYTEBACK OK - 2 hosts backed up, "), captured.out
    code, captured = server_main(capsys, tmp_path, tiny.root, "--nagios", "--warning", "2h")
    assert code == 1 and "2 late (web1, web2)" in captured.out, captured.out


def test_server_status_human_table(capsys, tmp_path, two_hosts):
    code, captured = server_main(capsys, tmp_path, two_hosts.root)
    assert code == 2
    lines = captured.out.splitlines()
    assert lines[0].startswith(f"store {two_hosts.root} (hardlink): ") and "prune target" in lines[0]
    assert lines[1].split() == ["host", "newest", "age", "count", "oldest", "last", "mean", "note"]
    rows = {line.split()[0]: line for line in lines[2:]}
    assert sorted(rows) == ["db1", "new1", "web1"]
    assert two_hosts.names("web1")[-1] in rows["web1"] and "2h 0m ago" in rows["web1"]
    assert "never" in rows["new1"]


def test_server_status_an_empty_store(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    code, captured = server_main(capsys, tmp_path, tmp_path / "empty", "--nagios")
    assert code == 0 and captured.out.startswith("BYTEBACK OK - 0 hosts backed up"), captured.out


def test_server_status_a_missing_store_is_unknown(capsys, tmp_path):
    code, captured = server_main(capsys, tmp_path, tmp_path / "nowhere", "--nagios")
    assert code == 3 and "Traceback" not in captured.err and "nowhere" in captured.err


def test_status_uses_the_clock_it_is_given():
    """byteback.now_local reads the clock in one place: freezegun moves it."""
    with freeze_time(T):
        assert byteback.now_local() == T
        assert byteback.now_local().tzinfo is not None
    assert T.tzinfo is UTC


# === restore through main(), on a tiny local store ========================================

def test_restore_lists_a_name_that_is_not_utf8(capsys, tiny):
    """capsys's stdout is strict UTF-8, as under LANG=en_US.UTF-8 (C.UTF-8 would hide the bug)."""
    snap = tiny.add_snapshot("web1", at(2026, 3, 1, 3, 0))
    with open(os.path.join(os.fsencode(tiny.root / "web1" / snap.name), b"caf\xe9.txt"), "wb") as f:
        f.write(b"x")
    code = byteback.main(["restore", "--destination", str(tiny.root), "--host", "web1", "/caf*"])
    captured = capsys.readouterr()
    assert code == 0, captured.err
    assert "/caf\\xe9.txt" in captured.out, captured.out


def test_restore_no_match_is_exit_1_in_one_line(capsys, tiny):
    tiny.add_snapshot("web1", at(2026, 3, 1, 3, 0))
    code = byteback.main(["restore", "--destination", str(tiny.root), "--host", "web1", "/nothing*"])
    captured = capsys.readouterr()
    assert code == 1 and captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("byteback: nothing matches /nothing*"), lines
    assert "--all" in lines[0]


def test_restore_all_with_restore_is_a_usage_error(capsys, tiny):
    tiny.add_snapshot("web1", at(2026, 3, 1, 3, 0))
    code = byteback.main(["restore", "--destination", str(tiny.root), "--host", "web1", "--all",
                          "--restore", "/file"])
    assert code == 2 and "--snapshot" in capsys.readouterr().err


def test_restore_batches_stay_under_the_guards_command_limit():
    paths = ["snap/" + "d" * 300 + f"/{i}" for i in range(500)]
    batches = list(byteback._batches(paths, byteback.RESTORE_BATCH_CHARS))
    assert [p for b in batches for p in b] == paths                 # all, in order
    assert len(batches) > 1
    for b in batches:
        assert len(" ".join(shlex.quote(p) for p in b)) < byteback.RESTORE_BATCH_CHARS
    assert list(byteback._batches(["x" * 99], 10)) == [["x" * 99]]   # one long path still goes


# -- status --prometheus: the text exposition format --

def _host(**fields):
    base = {"snapshots": 3, "newest": "2026-11-28T03:15+0000", "age_seconds": 3600.0,
            "oldest": "2026-11-01T03:15+0000", "last_size": 10, "last_added": 2048, "mean_added": 1024,
            "incomplete_since": None, "running": False, "suspicious": False}
    base.update(fields)
    return base


def test_prometheus_server_report_by_hand():
    now = dt.datetime(2026, 11, 28, 4, 15, tzinfo=UTC)
    report = {"store": '/srv/a "b"', "backend": "btrfs", "free_bytes": 500, "total_bytes": 1000,
              "target_bytes": 300, "state": "WARNING",
              "hosts": {"web": _host(suspicious=True, contained=True),
                        "db": _host(snapshots=1, oldest=None, newest=None, last_added=None, mean_added=None)}}
    text = byteback.prometheus_text(report, now)
    lines = text.splitlines()
    store = 'store="/srv/a \\"b\\""'
    assert f"byteback_store_free_bytes{{{store}}} 500" in lines
    assert f"byteback_store_prune_target_bytes{{{store}}} 300" in lines
    assert f'byteback_host_snapshots{{{store},host="db"}} 1' in lines
    assert f'byteback_host_snapshots{{{store},host="web"}} 3' in lines
    assert f'byteback_host_oldest_snapshot_age_seconds{{{store},host="web"}} {27 * 86400 + 3600.0!r}' in lines
    assert f'byteback_host_newest_snapshot_timestamp_seconds{{{store},host="web"}} {now.timestamp() - 3600!r}' in lines
    # Unknown values are left out, not made up as 0.
    assert not [l for l in lines if 'host="db"' in l and "oldest" in l]
    assert f'byteback_host_suspicious{{{store},host="web"}} 1' in lines
    assert f"byteback_suspicious_backups{{{store}}} 1" in lines
    # A state the plan adds (containment) is exported by its field name, 0 where absent.
    assert f'byteback_host_contained{{{store},host="web"}} 1' in lines
    assert f'byteback_host_contained{{{store},host="db"}} 0' in lines
    assert f"byteback_status{{{store}}} 1" in lines
    assert f"byteback_contained_hosts{{{store}}} 0" in lines
    assert not [l for l in lines if "goal" in l or "warnings" in l or "contained_bytes" in l]   # not in this report
    # Every family: HELP, then TYPE gauge, then its samples; no name twice.
    names = [l.split()[2] for l in lines if l.startswith("# HELP")]
    assert len(names) == len(set(names))
    for name in names:
        at_help = lines.index(next(l for l in lines if l.startswith(f"# HELP {name} ")))
        assert lines[at_help + 1] == f"# TYPE {name} gauge"
        assert lines[at_help + 2].startswith(name + "{")
    assert text.endswith("\n")


def test_prometheus_client_report_before_any_backup():
    report = {"running": False, "last_success": None, "age_seconds": None, "duration_seconds": None,
              "bytes_sent": None, "last_attempt": None, "last_result": None, "last_error": None,
              "state": "CRITICAL"}
    assert byteback.prometheus_text(report, dt.datetime(2026, 1, 1, tzinfo=UTC)) == (
        "# HELP byteback_backup_running 1 while a backup runs.\n"
        "# TYPE byteback_backup_running gauge\nbyteback_backup_running 0\n"
        f"# HELP byteback_status {byteback.STATE_HELP}\n# TYPE byteback_status gauge\nbyteback_status 2\n")


def test_prometheus_exports_containment_where_the_report_has_it():
    now = dt.datetime(2026, 11, 28, 4, 15, tzinfo=UTC)
    report = {"store": "/srv", "backend": "btrfs", "free_bytes": 500, "total_bytes": 1000, "target_bytes": 300,
              "goal_bytes": 400, "state": "WARNING", "warnings": ["host web: contained", "host db: accepted"],
              "hosts": {"web": _host(contained_bytes=7000), "db": _host()}}
    lines = byteback.prometheus_text(report, now).splitlines()
    assert 'byteback_host_contained_bytes{store="/srv",host="web"} 7000' in lines
    assert not [l for l in lines if 'contained_bytes{store="/srv",host="db"}' in l]
    assert 'byteback_contained_hosts{store="/srv"} 1' in lines
    assert 'byteback_store_prune_goal_bytes{store="/srv"} 400' in lines
    assert 'byteback_warnings{store="/srv"} 2' in lines


# === names shown on a terminal or in a log (issue 8, class 5) =====================

@pytest.mark.parametrize("text,shown", [
    ("plain name.txt", "plain name.txt"),
    ("caf\u00e9", "caf\u00e9"),                            # printable Unicode stays
    ("a\nb", "a\\nb"),                                     # a forged row or log line
    ("\x1b[2J\x1b[Hred", "\\x1b[2J\\x1b[Hred"),            # clear screen, cursor home
    ("bell\x07", "bell\\x07"),
    ("c1\x9b31m", "c1\\x9b31m"),                           # the 8-bit CSI
    ("bidi\u202etxt.exe", "bidi\\u202etxt.exe"),           # right-to-left override
    ("tab\there", "tab\\there"),
    ("back\\slash", "back\\\\slash"),                       # so '\n' shown is never a backslash and n
    ("not-utf8-\udcff", "not-utf8-\\xff"),
    ("line\u2028sep", "line\\u2028sep"),
])
def test_printable_escapes_what_a_terminal_would_act_on(text, shown):
    assert byteback.printable(text) == shown
    assert byteback.printable(shown).isprintable()


def test_a_listing_shows_hostile_names_escaped_but_json_keeps_them_exact(capsys):
    name = "/x/\x1b[31mred\nsnapshot  -rw-r--r--  1  0:0  2020-01-01 00:00  /etc/forged"
    e = byteback.Entry("2026-01-01T00:00+0000", name, "l", 0o120777, 0, 0, 0, 0, target="\x1b]0;title\x07")
    text = byteback.format_entries([e])
    assert len(text.splitlines()) == 2 and "\x1b" not in text and "\x07" not in text, text
    assert "/x/\\x1b[31mred\\nsnapshot" in text and "-> \\x1b]0;title\\x07" in text
    assert json.loads(json.dumps(e._asdict()))["path"] == name


def test_log_lines_escape_names_but_keep_tracebacks(capsys):
    byteback.setup_logging(0)
    try:
        byteback.log.error("cannot read %s", "/x/\x1b[2Jevil\nbyteback: forged line")
    finally:
        byteback.log.handlers.clear()
    err = capsys.readouterr().err
    assert err == "byteback: cannot read /x/\\x1b[2Jevil\\nbyteback: forged line\n", err


def _record(store, host, **fields):
    snaps = store.snapshots(host)
    data = {"devices": 1, "owners": 0, "examples": ["/dev/sda"], "time": T.isoformat(),
            "snapshot": snaps[-1].name if snaps else "", **fields}
    path = store.not_kept_path(host)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data))
    return path


def test_server_status_warns_while_the_newest_snapshot_lacks_files(capsys, tmp_path, tiny):
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2))
    tiny.add_snapshot("web2", T - dt.timedelta(hours=2))
    _record(tiny.store, "web1", time=(T - dt.timedelta(hours=2)).isoformat())
    report = byteback.server_status(tiny.store, byteback.ServerConfig(), T)
    assert report["hosts"]["web1"]["not_kept"].startswith("1 file not kept as they are")
    assert report["hosts"]["web2"]["not_kept"] is None
    code, captured = server_main(capsys, tmp_path, tiny.root, "--nagios")
    assert code == 1 and "1 with files not kept as they are (web1)" in captured.out, captured.out
    code, captured = server_main(capsys, tmp_path, tiny.root)
    assert "WARNING (client says): 1 file not kept" in captured.out
    # a newer snapshot without a record: the gap is over
    tiny.add_snapshot("web1", T - dt.timedelta(hours=1))
    assert byteback.server_status(tiny.store, byteback.ServerConfig(), T)["hosts"]["web1"]["not_kept"] is None
    code, captured = server_main(capsys, tmp_path, tiny.root, "--nagios")
    assert code == 0, captured.out


def test_only_each_known_hosts_own_not_kept_record_is_left_out_of_the_unaccounted_bytes(tiny):
    """Files named like a record, planted where the backup user or a host's account can write,
    are junk that prune must not delete history for: counted, all but the exact records."""
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2))
    tiny.add_snapshot("web2", T - dt.timedelta(hours=2))
    own = tiny.store.state_dir / "sessions" / "web1"
    own.mkdir(parents=True)                                 # web1 has an account of its own
    tiny.store.run_dir.mkdir(parents=True)
    for record in (_record(tiny.store, "web1"), _record(tiny.store, "web2")):
        record.write_bytes(b" " * byteback.NOT_KEPT_RECORD_MAX)
    assert tiny.store.not_kept_path("web1").parent == own
    base = tiny.store.unaccounted_bytes()
    junk = os.urandom(8192)
    planted = [tiny.store.run_dir / f"h{i}.not-kept" for i in range(20)]       # the backup user's
    planted += [tiny.store.run_dir / "web1.not-kept",                          # web1's is elsewhere
                own / "web2.not-kept", own / "deep" / "web1.not-kept"]         # web1's account's
    (own / "deep").mkdir()
    for path in planted:
        path.write_bytes(junk)
    grew = tiny.store.unaccounted_bytes() - base
    assert grew >= len(planted) * 8192, (grew, len(planted))


@pytest.mark.parametrize("planted", ["symlink", "fifo", "huge", "deep", "count", "name", "type", "nesting",
                                     "future", "older"])
def test_root_reads_a_record_the_host_account_wrote_only_within_bounds(tmp_path, tiny, planted):
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2))
    path = tiny.store.not_kept_path("web1")
    path.parent.mkdir(parents=True, exist_ok=True)
    if planted == "symlink":
        _record(tiny.store, "web1").rename(tmp_path / "elsewhere")
        path.symlink_to(tmp_path / "elsewhere")
    elif planted == "fifo":
        os.mkfifo(path)
    elif planted == "huge":
        _record(tiny.store, "web1", examples=["/x"], pad="y" * 9000)
    elif planted == "deep":
        path.write_text("[" * 8000)
    else:
        field = {"count": {"owners": 10 ** 13}, "name": {"examples": ["\x1b[2J"]},
                 "type": {"devices": True}, "nesting": {"examples": [["/x"]]},
                 "future": {"time": (T + dt.timedelta(days=400)).isoformat()},
                 "older": {"time": (T - dt.timedelta(hours=3)).isoformat()}}[planted]
        _record(tiny.store, "web1", **field)
    newest = tiny.store.snapshots("web1")[-1]
    assert byteback.read_not_kept(tiny.store, "web1", newest, T) is None
    assert byteback.server_status(tiny.store, byteback.ServerConfig(), T)["hosts"]["web1"]["not_kept"] is None


@pytest.mark.parametrize("char", ["写", "😀", '"', "é"])
def test_the_longest_record_the_guard_accepts_reads_back_whole(tiny, char):
    """What complete's guard accepts (5 names of 300 characters) is what root reads back, not a
    record past NOT_KEPT_RECORD_MAX that reads as nothing (JSON escapes: 6-12 bytes a character)."""
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2))
    names = [f"/{i}" + char * (byteback.NOT_KEPT_NAME_MAX - 2) for i in range(byteback.NOT_KEPT_EXAMPLES)]
    request = byteback._check_complete(byteback.not_kept_words(byteback.NotKept(10 ** 12, 10 ** 12, tuple(names))))
    gaps = byteback.request_not_kept(request)
    with freeze_time(T):
        byteback.record_not_kept(tiny.store, "web1", gaps, None)
    assert tiny.store.not_kept_path("web1").stat().st_size <= byteback.NOT_KEPT_RECORD_MAX
    newest = tiny.store.snapshots("web1")[-1]
    assert byteback.read_not_kept(tiny.store, "web1", newest, T) == gaps._replace(time=T.isoformat(),
                                                                                snapshot=newest.name)


def test_complete_takes_counts_of_ascii_digits_only():
    """int() reads Arabic-Indic and other Unicode digits too: the guard must not."""
    for word in ("--not-kept=\u0661,0", "--not-kept=0,\uff13", "--not-kept=1,\u0967"):
        with pytest.raises(byteback.Refused):
            byteback._check_complete([word, "--example=/dev/sda"])
    assert byteback._check_complete(["--not-kept=1,0", "--example=/dev/sda"]).options == ("--not-kept=1,0",)


def test_a_record_past_the_bound_keeps_its_counts():
    gaps = byteback.NotKept(1, 2, ("/" + "x" * 9000,), T.isoformat())        # beyond the guard's bounds
    text = byteback.not_kept_record(gaps)
    assert len(text.encode()) <= byteback.NOT_KEPT_RECORD_MAX
    assert json.loads(text) == gaps._replace(examples=[])._asdict()


def test_a_record_is_kept_by_complete_after_its_snapshot(tmp_path, tiny, caplog):
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2))
    byteback.log.addHandler(caplog.handler)        # whatever an earlier test's setup_logging left
    try:
        with freeze_time(T):
            byteback.record_not_kept(tiny.store, "web1", byteback.NotKept(0, 3, ("/a", "/b")), None)
    finally:
        byteback.log.removeHandler(caplog.handler)
    logged = [r for r in caplog.records if r.getMessage().startswith("host web1: 3 files not kept")]
    assert logged and logged[0].levelname == "WARNING" and getattr(logged[0], "syslog_only", False)
    newest = tiny.store.snapshots("web1")[-1]
    assert byteback.read_not_kept(tiny.store, "web1", newest, T) == byteback.NotKept(0, 3, ("/a", "/b"), T.isoformat(),
                                                                                      newest.name)
    assert byteback.read_not_kept(tiny.store, "web1", newest, T - dt.timedelta(hours=1)) is None   # from the future


def test_a_record_speaks_for_the_snapshot_it_names_not_a_later_one_of_the_same_minute(tiny):
    """Snapshot names have a minute's resolution: a record written in the minute the next
    snapshot is taken, before it (a forged one, or a backup's record a moment older), is dated
    after that snapshot's name, and by time alone would have spoken for it."""
    tiny.add_snapshot("web1", T - dt.timedelta(hours=2))
    _record(tiny.store, "web1", time=(T - dt.timedelta(hours=1) + dt.timedelta(seconds=20)).isoformat())
    older = tiny.store.snapshots("web1")[-1]
    assert byteback.read_not_kept(tiny.store, "web1", older, T) is not None
    tiny.add_snapshot("web1", T - dt.timedelta(hours=1))
    newest = tiny.store.snapshots("web1")[-1]
    assert newest.when <= T - dt.timedelta(hours=1) + dt.timedelta(seconds=20)
    assert byteback.read_not_kept(tiny.store, "web1", newest, T) is None
    assert byteback.server_status(tiny.store, byteback.ServerConfig(), T)["hosts"]["web1"]["not_kept"] is None
