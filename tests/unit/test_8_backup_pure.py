"""Section 8: the client's pure helpers (excludes, rsync command line, stats) and its small edges."""
from __future__ import annotations

import json
import os
import shlex
import shutil
import stat
import subprocess

import pytest

import byteback
from byteback import ByteBackError
from markers import needs_rsync

MOUNTS = [
    ("/", "ext4"), ("/proc", "proc"), ("/sys", "sysfs"), ("/sys/fs/cgroup", "cgroup2"),
    ("/dev", "devtmpfs"), ("/run", "tmpfs"), ("/mnt/nfs", "nfs4"), ("/home", "ext4"),
    ("/media/x", "fuse.sshfs"), ("/boot/efi", "vfat"),
]


# -- automatic_excludes --

def test_automatic_excludes_for_a_backup_of_root():
    patterns = byteback.automatic_excludes(["/"], MOUNTS, ["/srv/store", "/etc/byteback/key"])
    expected = [
        # non-local mounts and junk directories: their contents (the empty directory stays)
        "/proc/*", "/sys/*", "/sys/fs/cgroup/*", "/dev/*", "/run/*", "/mnt/nfs/*", "/media/x/*",
        "/tmp/*", "/var/tmp/*", "/var/cache/apt/archives/*", "/var/backups/localhost/*",
        "/lost+found/*", "/var/lib/php5/*",        # the original's default: PHP 5's sessions
        # swap files, the store and the key: whole
        "/swap.file", "/swapfile", "/swap.img", "/swap.filkeye", "/srv/store", "/etc/byteback/key",
    ]
    assert sorted(patterns) == sorted(expected) and len(patterns) == len(expected)
    assert "/home/*" not in patterns and "/boot/efi/*" not in patterns     # local filesystems


def test_an_explicit_source_inside_tmp_is_not_dropped():
    assert byteback.automatic_excludes(["/tmp/x"], MOUNTS) == []
    assert "/tmp/*" not in byteback.automatic_excludes(["/", "/tmp/x"], MOUNTS)


def test_an_explicit_source_on_a_nonlocal_mount_is_not_dropped():
    assert byteback.automatic_excludes(["/mnt/nfs/projects"], MOUNTS) == []
    assert byteback.automatic_excludes(["/run/important"], MOUNTS) == []


def test_automatic_excludes_apply_only_inside_the_sources():
    mounts = MOUNTS + [("/home/u/nfs", "nfs")]
    patterns = byteback.automatic_excludes(["/home"], mounts, ["/home/u/byteback-store", "/etc/byteback/key"])
    assert patterns == ["/home/u/byteback-store", "/home/u/nfs/*"]


def test_the_store_and_key_are_excluded_whole():
    patterns = byteback.automatic_excludes(["/srv"], [], ["/srv/byteback", "/srv/keys/key"])
    assert patterns == ["/srv/byteback", "/srv/keys/key"]


def test_a_mount_point_with_wildcards_is_escaped():
    patterns = byteback.automatic_excludes(["/media"], [("/media/My [disk]*", "fuse.sshfs")])
    assert patterns == ["/media/My \\[disk]\\*/*"]


@pytest.mark.parametrize("path,escaped", [
    ("/plain/path", "/plain/path"),
    ("/a*b", "/a\\*b"),
    ("/a?b", "/a\\?b"),
    ("/a[b]", "/a\\[b]"),
    ("/a b+c{d}", "/a b+c{d}"),
])
def test_rsync_escape(path, escaped):
    assert byteback.rsync_escape(path) == escaped


def _run_rsync_with_excludes(tmp_path, extra):
    src = tmp_path / "src"
    plan = byteback.BackupPlan(byteback.Destination(None, None, None, str(tmp_path / "store")), "web1",
                               [str(src)], [], None, [], 30, 1, 0.0, str(tmp_path / "etc"))
    auto = byteback.automatic_excludes([str(src)], [(str(src / "mnt"), "tmpfs")], extra)
    argv = byteback.build_rsync_argv(plan, f"{tmp_path / 'dst'}/", auto_excludes=auto)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    return tmp_path / "dst" / str(src).lstrip("/")


@needs_rsync
def test_real_rsync_honours_the_automatic_excludes(tmp_path):
    src = tmp_path / "src"
    (src / "mnt").mkdir(parents=True)
    (src / "store[1]").mkdir()
    (src / "store[1]" / "snap").write_text("s")
    (src / "mnt" / "inside").write_text("m")
    (src / "keep").write_text("k")
    (src / "a*b").write_text("w")
    (src / "aXb").write_text("x")                  # matched by a*b if the '*' were not escaped
    got = _run_rsync_with_excludes(tmp_path, [str(src / "store[1]"), str(src / "a*b")])
    assert sorted(os.listdir(got)) == ["aXb", "keep", "mnt"]
    assert os.listdir(got / "mnt") == []           # the mount point stays, empty


@needs_rsync
def test_real_rsync_excludes_a_path_with_a_backslash(tmp_path):
    src = tmp_path / "src"
    (src / "mnt").mkdir(parents=True)
    (src / "key\\file").write_text("secret")
    got = _run_rsync_with_excludes(tmp_path, [str(src / "key\\file")])
    assert not (got / "key\\file").exists()


@needs_rsync
def test_fake_super_on_a_local_backup_reads_the_real_source_attributes(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("x")
    os.chmod(src / "f", 0o644)
    try:
        os.setxattr(str(src / "f"), "user.rsync.%stat", b"100600 0,0 1234:1234")
    except OSError as e:
        pytest.skip(f"no user xattrs on {tmp_path}: {e}")
    plan = byteback.BackupPlan(byteback.Destination(None, None, None, str(tmp_path / "store")), "web1",
                               [str(src)], [], None, [], 30, 1, 0.0, str(tmp_path / "etc"))
    argv = byteback.build_rsync_argv(plan, f"{tmp_path / 'dst'}/", fake_super=True)
    subprocess.run(argv, check=True, stdout=subprocess.DEVNULL)
    copied = tmp_path / "dst" / str(src).lstrip("/") / "f"
    recorded = os.getxattr(str(copied), "user.rsync.%stat") if "user.rsync.%stat" in os.listxattr(
        str(copied)) else b""
    assert stat.S_IMODE(os.stat(copied).st_mode) == 0o644 or recorded.startswith(b"100644 ")
    assert b"1234:1234" not in recorded


# -- build_rsync_argv --

PLAN = byteback.BackupPlan(
    destination=byteback.Destination(None, None, None, "/store"), host="web1",
    sources=["/home", "/etc"], excludes=["*.o", "/var/log/*.gz"],
    filter_file="/etc/byteback/rsync_filter", extra_flags=["--one-file-system", "--bwlimit=1000"],
    io_timeout=300, retries=5, retry_delay=600.0, config_dir="/etc/byteback")
DESIGN_FLAGS = ["--archive", "--hard-links", "--xattrs", "--numeric-ids", "--delete-excluded",
                "--delete-during", "--relative", "--partial", "--timeout=300"]


def test_build_rsync_argv_has_the_design_flags_and_ends_with_sources_then_target():
    argv = byteback.build_rsync_argv(PLAN, "/store/web1/current/", auto_excludes=["/proc/*"])
    assert argv[0] == "rsync"
    for flag in DESIGN_FLAGS:
        assert argv.count(flag) == 1, flag
    assert argv[-4:] == ["--", "/home", "/etc", "/store/web1/current/"]
    assert argv.count("--") == 1
    options = argv[:argv.index("--")]
    assert options.index("--exclude=/proc/*") < options.index("--exclude=*.o") < \
        options.index("--exclude=/var/log/*.gz")
    assert "--filter=merge /etc/byteback/rsync_filter" in options
    assert options[-2:] == ["--one-file-system", "--bwlimit=1000"]      # rsync_flags, last
    assert "--fake-super" not in argv and "--inplace" not in argv and "--dry-run" not in argv


def test_build_rsync_argv_backend_options_decide_inplace_or_link_dest():
    btrfs = byteback.build_rsync_argv(PLAN, "/t/", backend_options=["--inplace"])
    hardlink = byteback.build_rsync_argv(PLAN, "/t/", backend_options=["--link-dest=/store/web1/X"])
    assert "--inplace" in btrfs[:btrfs.index("--")]
    assert "--link-dest=/store/web1/X" in hardlink[:hardlink.index("--")]
    assert "--inplace" not in hardlink


def test_build_rsync_argv_fake_super_only_when_asked():
    def fake_super(argv):          # --fake-super, or -M--fake-super for the receiver only
        return [a for a in argv[:argv.index("--")] if a.endswith("--fake-super")]
    assert len(fake_super(byteback.build_rsync_argv(PLAN, "/t/", fake_super=True))) == 1
    assert fake_super(byteback.build_rsync_argv(PLAN, "/t/", fake_super=False)) == []


def test_build_rsync_argv_progress_and_dry_run():
    argv = byteback.build_rsync_argv(PLAN, "/t/", progress=True, dry_run=True)
    options = argv[:argv.index("--")]
    assert "--info=progress2" in options and "--dry-run" in options and "--itemize-changes" in options


def test_build_rsync_argv_without_filter_or_excludes():
    plan = PLAN._replace(excludes=[], filter_file=None, extra_flags=[], sources=["/"])
    argv = byteback.build_rsync_argv(plan, "/t/")
    assert not [a for a in argv if a.startswith(("--exclude", "--filter"))]
    assert argv[-3:] == ["--", "/", "/t/"]


def test_a_source_that_looks_like_an_option_comes_after_the_double_dash():
    argv = byteback.build_rsync_argv(PLAN._replace(sources=["-e sh"]), "/t/")
    assert argv[-3:] == ["--", "-e sh", "/t/"]


# -- parse_rsync_stats --

STATS = """
Number of files: 3 (reg: 2, dir: 1)
Total file size: 2,000,000 bytes
Total bytes sent: 1,234,567
Total bytes received: 89

sent 1,234,567 bytes  received 89 bytes  823,104.00 bytes/sec
"""


@pytest.mark.parametrize("output,sent", [
    (STATS, 1234567),
    ("Total bytes sent: 512\n", 512),
    ("Total bytes sent: 1.234.567\n", 1234567),     # a locale's thousands separator
    ("rsync error: some files could not be transferred\n", None),
    ("", None),
    ("  Total bytes sent: 5\n", None),              # only at the start of a line
])
def test_parse_rsync_stats(output, sent):
    assert byteback.parse_rsync_stats(output) == sent


# -- resolve_backup_plan: command line over the config files over the defaults --

def _args(config_dir, *argv):
    return byteback.build_parser().parse_args(["--config-dir", str(config_dir), "backup", *argv])


def test_resolve_backup_plan_reads_the_original_config_files(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "destination").write_text("# the store\n" + str(tmp_path / "store") + "\n")
    (etc / "io_timeout").write_text("120\n")
    (etc / "excludes").write_text("*.o\n# comment\n/var/cache/*\n")
    (etc / "rsync_flags").write_text("--one-file-system --bwlimit=1000\n'--exclude=a b'\n")
    (etc / "rsync_filter").write_text("- *.tmp\n")
    src = tmp_path / "src"
    src.mkdir()
    plan = byteback.resolve_backup_plan(_args(etc, "--source", str(src) + "/", "--exclude", "*.swp",
                                              "--host", "web1"))
    assert plan.destination == byteback.Destination(None, None, None, str(tmp_path / "store"))
    assert plan.host == "web1"
    assert plan.sources == [str(src)]                            # trailing slash dropped
    assert plan.excludes == ["*.o", "/var/cache/*", "*.swp"]      # file first, then the command line
    assert plan.extra_flags == ["--one-file-system", "--bwlimit=1000", "--exclude=a b"]
    assert plan.filter_file == str(etc / "rsync_filter")
    assert plan.io_timeout == 120
    assert (plan.retries, plan.retry_delay) == (5, 600.0)


def test_resolve_backup_plan_command_line_wins(tmp_path):
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "destination").write_text("/from/file\n")
    (etc / "io_timeout").write_text("120\n")
    plan = byteback.resolve_backup_plan(_args(etc, "--destination", str(tmp_path / "cli"), "--source",
                                              str(tmp_path), "--host", "web1", "--io-timeout", "60",
                                              "--retry-number", "2", "--retry-delay", "30s"))
    assert plan.destination.path == str(tmp_path / "cli")
    assert (plan.io_timeout, plan.retries, plan.retry_delay) == (60, 2, 30.0)
    assert plan.filter_file is None


def test_resolve_backup_plan_defaults(tmp_path):
    plan = byteback.resolve_backup_plan(_args(tmp_path / "none", "--destination", "/srv/s", "--host", "h"))
    assert plan.sources == ["/"] and plan.io_timeout == 300 and plan.excludes == []
    assert plan.extra_flags == [] and plan.filter_file is None


def test_resolve_backup_plan_without_a_destination_is_a_usage_error(tmp_path):
    with pytest.raises(byteback.UsageError) as exc:
        byteback.resolve_backup_plan(_args(tmp_path, "--source", str(tmp_path), "--host", "h"))
    assert exc.value.exit_code == 2
    assert f"{tmp_path}/destination" in str(exc.value)


def test_resolve_backup_plan_refuses_a_missing_source(tmp_path):
    with pytest.raises(ByteBackError, match=f"source {tmp_path}/gone does not exist; check --source"):
        byteback.resolve_backup_plan(_args(tmp_path, "--destination", "/s", "--host", "h",
                                           "--source", str(tmp_path / "gone")))


def test_resolve_backup_plan_refuses_a_bad_host_name(tmp_path):
    with pytest.raises(ByteBackError, match="is not a valid host name"):
        byteback.resolve_backup_plan(_args(tmp_path, "--destination", "/s", "--host", "../x",
                                           "--source", str(tmp_path)))


def test_resolve_backup_plan_reports_a_bad_io_timeout_file(tmp_path):
    (tmp_path / "io_timeout").write_text("0\n")
    with pytest.raises(ByteBackError, match="io_timeout line 1: bad value"):
        byteback.resolve_backup_plan(_args(tmp_path, "--destination", "/s", "--host", "h",
                                           "--source", str(tmp_path)))


# -- hooks --

def _hook(path, body, mode=0o755):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("#!/bin/sh\n" + body + "\n")
    os.chmod(path, mode)


def test_hooks_run_in_name_order_skipping_what_run_parts_skips(tmp_path):
    log = tmp_path / "log"
    hooks = tmp_path / "pre-backup.d"
    _hook(hooks / "20-second", f'echo second >> "{log}"')
    _hook(hooks / "10-first", f'echo "first $BYTEBACK_RESULT" >> "{log}"')
    _hook(hooks / "30-not-executable", f'echo no >> "{log}"', mode=0o644)
    _hook(hooks / ".hidden", f'echo hidden >> "{log}"')
    _hook(hooks / "40-backup~", f'echo editor >> "{log}"')
    _hook(hooks / "50-x.dpkg-old", f'echo dpkg >> "{log}"')
    (hooks / "60-dir").mkdir()
    _hook(hooks / "10-hook.sh", f'echo dotted >> "{log}"')      # run-parts skips any '.'
    _hook(hooks / "70_under", f'echo under >> "{log}"')
    _hook(hooks / "Zed", f'echo upper >> "{log}"')                # C order: upper case first
    byteback.run_hooks(str(tmp_path), "pre-backup", {"BYTEBACK_RESULT": "ok"})
    assert log.read_text() == "first ok\nsecond\nunder\nupper\n"


HOOK_NAMES = ["10-hook.sh", "10-hook", "20_x", "a.b", "UPPER", "lower", "-dash", "_u", "x~",
              "y.dpkg-old", ".hidden", "sp ace", "caf\u00e9", "1", "a+b", "a,b"]


@pytest.mark.skipif(shutil.which("run-parts") is None, reason="run-parts (debianutils) not installed")
def test_hooks_are_chosen_exactly_as_debians_run_parts_chooses(tmp_path):
    hooks = tmp_path / "post-backup.d"
    log = tmp_path / "log"
    for name in HOOK_NAMES:
        _hook(hooks / name, f'printf "%s\\n" "$(basename "$0")" >> "{log}"')
    wanted = subprocess.run(["run-parts", "--test", str(hooks)], stdout=subprocess.PIPE,
                            universal_newlines=True, env={"LC_ALL": "C", "PATH": os.environ["PATH"]},
                            check=True).stdout.split()
    byteback.run_hooks(str(tmp_path), "post-backup")
    assert log.read_text().split() == [os.path.basename(p) for p in wanted]
    assert "10-hook.sh" not in log.read_text()


def test_a_failing_pre_hook_stops_the_backup(tmp_path):
    log = tmp_path / "log"
    _hook(tmp_path / "pre-backup.d" / "10-fail", "exit 3")
    _hook(tmp_path / "pre-backup.d" / "20-after", f'echo ran >> "{log}"')
    with pytest.raises(ByteBackError) as exc:
        byteback.run_hooks(str(tmp_path), "pre-backup")
    assert str(exc.value) == (f"pre-backup hook {tmp_path}/pre-backup.d/10-fail failed with exit code 3; "
                              "the backup was not started")
    assert not log.exists()


def test_a_failing_post_hook_is_an_error_too(tmp_path):
    _hook(tmp_path / "post-backup.d" / "10-fail", "exit 1")
    with pytest.raises(ByteBackError, match=r"post-backup hook .*10-fail failed with exit code 1\Z"):
        byteback.run_hooks(str(tmp_path), "post-backup")


def test_no_hook_directory_is_fine(tmp_path):
    byteback.run_hooks(str(tmp_path), "pre-backup")


# -- retries --

def _fake_rsync(monkeypatch, results):
    calls, sleeps = [], []
    results = list(results)

    def run_rsync(argv, *, show, lines=None):
        calls.append(list(argv))
        rc, output = results.pop(0)
        if lines is not None:           # the real one reads every line it passes on
            lines.feed(output.encode() + b"\n")
        return rc, output

    monkeypatch.setattr(byteback, "run_rsync", run_rsync)
    return calls, sleeps


def test_rsync_is_retried_on_network_failures_after_the_delay(monkeypatch):
    calls, sleeps = _fake_rsync(monkeypatch, [(12, "broken pipe"), (255, "no route"), (0, "Total bytes sent: 5\n")])
    rc, output = byteback.rsync_with_retries(["rsync", "x"], retries=5, delay=600, show=False, sleep=sleeps.append)
    assert (rc, output) == (0, "Total bytes sent: 5\n")
    assert len(calls) == 3 and sleeps == [600, 600]


@pytest.mark.parametrize("rc", [0, 24])
def test_rsync_success_and_vanished_files_are_accepted(monkeypatch, rc):
    calls, sleeps = _fake_rsync(monkeypatch, [(rc, "")])
    assert byteback.rsync_with_retries(["rsync"], retries=5, delay=1, show=False, sleep=sleeps.append)[0] == rc
    assert sleeps == []


def test_rsync_other_failures_are_not_retried(monkeypatch):
    calls, sleeps = _fake_rsync(monkeypatch, [(23, "a\nb\nc\nd\n")])
    with pytest.raises(ByteBackError) as exc:
        byteback.rsync_with_retries(["rsync"], retries=5, delay=1, show=False, sleep=sleeps.append)
    assert str(exc.value) == ("rsync failed with exit code 23 (partial transfer due to error) "
                              "after 1 try: b | c | d")
    assert len(calls) == 1 and sleeps == []


def test_rsync_gives_up_after_the_last_try(monkeypatch):
    calls, sleeps = _fake_rsync(monkeypatch, [(30, "timeout")] * 3)
    with pytest.raises(ByteBackError, match=r"exit code 30 \(timeout in data send/receive\) after 3 tries"):
        byteback.rsync_with_retries(["rsync"], retries=3, delay=10, show=False, sleep=sleeps.append)
    assert len(calls) == 3 and sleeps == [10, 10]


def test_rsync_missing_says_how_to_install_it(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(ByteBackError, match=r"rsync is not installed; install it with: apt-get install rsync"):
        byteback.run_rsync(["rsync", "--version"], show=False)


# -- the client's state file --

def test_record_backup_result_keeps_the_last_success(tmp_path):
    ok = {"result": "ok", "start": "t1"}
    failed = {"result": "failed", "start": "t2", "error": "disc full"}
    byteback.record_backup_result(tmp_path, ok)
    byteback.record_backup_result(tmp_path, failed)
    state = json.loads((tmp_path / "last-backup.json").read_text())
    assert state == {"last_attempt": failed, "last_success": ok}


def test_record_backup_result_over_a_corrupt_file_starts_afresh(tmp_path):
    (tmp_path / "last-backup.json").write_text("{corrupt")
    byteback.record_backup_result(tmp_path, {"result": "failed"})
    state = json.loads((tmp_path / "last-backup.json").read_text())
    assert state == {"last_attempt": {"result": "failed"}, "last_success": None}


# --- what a user-namespace receiver could not keep (NotKept) ---------------------------

SERVER_LINES = (
    'rsync: [generator] mknod "/srv/store/client1/current/srv/lxc/rootfs/dev/null" failed: '
    'Operation not permitted (1)\n'
    'rsync: [generator] chown "/srv/store/client1/current/home/u/.local/share/containers/x" failed: '
    'Invalid argument (22)\n'
    'rsync: [receiver] chown "/srv/store/client1/current/srv/\\#033[31mred" failed: Invalid argument (22)\n'
    'rsync: [receiver] chgrp "/srv/store/client1/current/srv/g" failed: Invalid argument (22)\n')
SUMMARY = ("Total bytes sent: 77\nrsync error: some files/attrs were not transferred (see previous errors) "
           "(code 23) at main.c(1394) [sender=3.5.0]\n")


def test_a_transfer_whose_only_errors_are_what_the_namespace_cannot_keep_is_done(monkeypatch):
    calls, sleeps = _fake_rsync(monkeypatch, [(23, SERVER_LINES + SUMMARY)])
    lines = byteback.NotKeptLines("client1")
    rc, output = byteback.rsync_with_retries(["rsync"], retries=3, delay=1, show=False,
                                             sleep=sleeps.append, not_kept=lines)
    assert rc == 23 and "Total bytes sent: 77" in output and len(calls) == 1
    gaps = lines.result()
    assert (gaps.devices, gaps.owners, gaps.total) == (1, 3, 4)
    # the client's own paths, escaped as every name is: rsync's \#033 keeps its backslash doubled
    assert gaps.examples == ("/srv/lxc/rootfs/dev/null", "/home/u/.local/share/containers/x",
                             "/srv/\\\\#033[31mred", "/srv/g")


def test_any_other_error_beside_them_still_fails_the_backup_and_is_named(monkeypatch):
    other = 'rsync: [sender] send_files failed to open "/etc/secret": Permission denied (13)\n'
    calls, sleeps = _fake_rsync(monkeypatch, [(23, SERVER_LINES + other + SUMMARY)])
    with pytest.raises(ByteBackError, match=r"exit code 23 .*send_files failed to open \"/etc/secret\""):
        byteback.rsync_with_retries(["rsync"], retries=3, delay=1, show=False, sleep=sleeps.append,
                                    not_kept=byteback.NotKeptLines("client1"))


def test_the_lines_are_counted_across_chunks_and_past_any_tail(monkeypatch):
    lines = byteback.NotKeptLines("client1")
    text = (SERVER_LINES * 5000).encode()
    for i in range(0, len(text), 4093):            # split mid-line, as reads come
        lines.feed(text[i:i + 4093])
    lines.feed(b"\n")
    gaps = lines.result()
    assert (gaps.devices, gaps.owners) == (5000, 15000) and len(gaps.examples) == byteback.NOT_KEPT_EXAMPLES
    assert lines.other_error is None


def test_each_try_counts_afresh(monkeypatch):
    calls, sleeps = _fake_rsync(monkeypatch, [(12, SERVER_LINES + "broken pipe"), (23, SERVER_LINES + SUMMARY)])
    lines = byteback.NotKeptLines("client1")
    byteback.rsync_with_retries(["rsync"], retries=3, delay=1, show=False, sleep=sleeps.append, not_kept=lines)
    assert lines.result().total == 4 and len(calls) == 2


def test_complete_carries_what_was_not_kept_and_the_guard_reads_it_back():
    gaps = byteback.NotKept(2, 7, ("/dev/null", "/x y 'z'"))
    words = byteback.not_kept_words(gaps)
    request = byteback.check_receive_command(shlex.join(["complete", *words]))
    assert request.verb == "complete" and byteback.request_not_kept(request) == gaps
    assert byteback.not_kept_words(byteback.NotKept()) == []
    assert byteback.request_not_kept(byteback.check_receive_command("complete")) == byteback.NotKept()
    text = byteback.not_kept_text(gaps)
    assert text.startswith("9 files not kept as they are") and "2 device nodes left out" in text
    assert "7 files kept owned by root" in text and "/dev/null, /x y 'z', ..." in text


@pytest.mark.parametrize("words", [
    ["--not-kept=1"], ["--not-kept=-1,2"], ["--not-kept=1,2,3"], ["--not-kept=99999999999999,0"],
    ["--example=/x"], ["--not-kept=1,0", "--force"], ["--not-kept=1,0", "--example="],
    ["--not-kept=1,0", "--example=\x1b[31m"], ["--not-kept=1,0", "--example=" + "a" * 301],
    ["--not-kept=6,0"] + ["--example=/d"] * 6, ["--force"]])
def test_complete_refuses_anything_else(words):
    with pytest.raises(byteback.Refused, match="complete"):
        byteback.check_receive_command(shlex.join(["complete", *words]))


def test_a_server_from_before_that_refuses_the_words_is_asked_plain_complete(monkeypatch):
    asked = []

    def call_server(plan, verb, session=None):
        asked.append(verb)
        if verb == "complete":
            return subprocess.CompletedProcess([], 0, "snapshot client1/x taken\n", "")
        return subprocess.CompletedProcess([], 1, "", "byteback: refused: 'complete' with arguments is not a "
                                                      "command byteback runs\n")

    monkeypatch.setattr(byteback, "call_server", call_server)
    proc = byteback._complete(None, None, byteback.NotKept(1, 0, ("/dev/x y",)))
    assert proc.returncode == 0 and asked == ["complete --not-kept=1,0 '--example=/dev/x y'", "complete"]
    asked.clear()
    byteback._complete(None, None, byteback.NotKept())
    assert asked == ["complete"]                     # nothing to tell: the bare word, once


# -- a push that took its snapshot itself, and the hint that spares the next ping --

PUSH_OUTPUT = ("Number of files: 3\nTotal bytes sent: 1,234\n"
               "snapshot web1/2026-12-02T03:04+0000 taken\n"
               "byteback: complete: exit 0, next snapshot in 21600s\n")


def test_a_push_that_completed_says_so_as_complete_would():
    proc, wait = byteback.completed_by_push(PUSH_OUTPUT)
    assert (proc.returncode, proc.stdout, wait) == (0, "snapshot web1/2026-12-02T03:04+0000 taken", 21600)
    assert "byteback: complete:" not in proc.stderr and "Total bytes sent" in proc.stderr


def test_a_push_whose_snapshot_failed_passes_the_reason_on():
    output = "byteback: again: hard-linked files changed\nbyteback: complete: exit 1, next snapshot in 0s\n"
    proc, wait = byteback.completed_by_push(output)
    assert (proc.returncode, proc.stdout, wait) == (1, "", 0)
    assert proc.stderr.splitlines() == ["byteback: again: hard-linked files changed"]


@pytest.mark.parametrize("output", ["Total bytes sent: 5\n", "byteback: complete: exit 0\n",
                                    "x byteback: complete: exit 0, next snapshot in 5s\n"])
def test_an_older_servers_push_says_nothing_of_a_snapshot(output):
    assert byteback.completed_by_push(output) is None


@pytest.mark.parametrize("hint,now,wanted", [
    (None, 100.0, True),                                                   # no hint: ping
    ({"destination": "b@s:22", "next_snapshot": 50.0}, 100.0, False),      # the interval has passed
    ({"destination": "b@s:22", "next_snapshot": 150.0}, 100.0, True),      # not yet
    ({"destination": "b@t:22", "next_snapshot": 50.0}, 100.0, True),       # another server's
    ({"destination": "b@s:22", "next_snapshot": "soon"}, 100.0, True),     # garbled
    (["b@s:22"], 100.0, True),
])
def test_ping_is_asked_unless_the_servers_hint_says_the_interval_has_passed(tmp_path, hint, now, wanted):
    if hint is not None:
        (tmp_path / byteback.SERVER_HINT_FILE).write_text(json.dumps(hint))
    assert byteback.ping_wanted(tmp_path, "b@s:22", now) is wanted


def test_a_garbled_hint_file_means_ping(tmp_path):
    (tmp_path / byteback.SERVER_HINT_FILE).write_text("{not json")
    assert byteback.ping_wanted(tmp_path, "b@s:22", 100.0) is True


# -- The names an 'again:' lists, and the named pass (issue 14) ---------------

@pytest.mark.parametrize("names", [
    [b"tmp/a b/x", b"tmp/\xff\n%", b"etc/passwd"], [b"one"], [b"a/b/c/" + bytes(range(1, 47))],
])
def test_the_names_an_again_lists_come_back_byte_for_byte(names):
    line = "byteback: again: " + byteback.again_message(1, names)
    assert line.startswith("byteback: again: 1 hard-linked files in current were changed")
    assert "\n" not in line and byteback.again_names(line) == names


@pytest.mark.parametrize("words", [
    ["/etc/passwd"], ["a/../../etc"], ["a//b"], ["./a"], ["a/"], ["a%00b"], [""], ["caf\u00e9"],
    ["x"] * (byteback.AGAIN_NAMES_MAX + 1), [7],
])
def test_a_listing_that_is_not_plain_relative_names_is_refused_whole(words):
    """A server could list anything: one bad name and the pass copies everything instead."""
    assert byteback.check_names(words) is None


def test_an_again_without_names_is_a_whole_pass():
    assert byteback.again_names("byteback: again: " + byteback.again_message(3, None)) is None
    assert byteback.again_names("byteback: again: " + byteback.again_message(3, [])) is None


@pytest.mark.parametrize("names,sources,under", [
    ([b"srv/a", b"srv/b/c"], ["/srv"], True),
    ([b"srv/a", b"etc/shadow"], ["/srv"], False),            # a server naming what is not backed up
    ([b"srvx/a"], ["/srv"], False),
    ([b"etc/shadow"], ["/"], True),
    ([b"home/u/x", b"srv/y"], ["/srv/", "/home/u"], True),
])
def test_the_named_pass_sends_only_names_below_the_sources(names, sources, under):
    assert byteback.names_under_sources(names, sources) is under


def test_the_named_pass_sends_only_regular_files_reached_through_real_directories(tmp_path):
    """rsync's sender follows a symlink on a --files-from entry's way: a name the shared
    backup user planted below a client's symlink would send what it points at."""
    root = os.fsencode(os.path.realpath(tmp_path)).lstrip(b"/")
    (tmp_path / "src" / "a").mkdir(parents=True)
    (tmp_path / "src" / "a" / "g1").write_bytes(b"g")
    (tmp_path / "secret").mkdir()
    (tmp_path / "secret" / "key").write_bytes(b"k")
    os.symlink(tmp_path / "secret", tmp_path / "src" / "lnk")
    os.symlink(tmp_path / "src" / "a" / "g1", tmp_path / "src" / "a" / "to-g1")
    name = lambda rel: root + b"/" + rel
    assert byteback.names_to_send([name(b"src/a/g1"), name(b"src/a/gone")]) == [name(b"src/a/g1")]
    assert byteback.names_to_send([name(b"src/a/g1"), name(b"src/lnk/key")]) is None   # through a symlink
    assert byteback.names_to_send([name(b"src/a/to-g1")]) is None                      # a symlink itself
    assert byteback.names_to_send([name(b"src/a")]) is None                            # a directory
    assert byteback.names_to_send([name(b"src/a/../a/g1")]) is None                    # not its own path


def test_the_named_pass_argv_sends_the_list_instead_of_the_sources():
    argv = ["rsync", "--archive", "--hard-links", "--exclude=/x", "--", "/srv", "/home", "h:current/+complete"]
    assert byteback.named_pass_argv(argv, "/tmp/l") == [
        "rsync", "--archive", "--hard-links", "--exclude=/x", "--files-from=/tmp/l", "--from0",
        "--", "/", "h:current/+complete"]
    ssh = byteback.rsync_over_ssh(["ssh"], again=True, named=True)
    assert ssh[-1] == "rsync --fake-super --byteback-again --byteback-named"
