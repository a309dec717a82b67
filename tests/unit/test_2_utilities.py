"""Section 2: durations and sizes, atomic JSON, the lock, the Runner, logging."""
from __future__ import annotations

import fcntl
import json
import os
import subprocess
import stat
import sys

import pytest

import byteback
from byteback import ByteBackError


# -- parse_duration / format_duration --

@pytest.mark.parametrize("text,seconds", [
    ("90", 90.0),
    ("90s", 90.0),
    ("10m", 600.0),
    ("6h", 21600.0),
    ("6H", 21600.0),
    ("1.5h", 5400.0),
    ("2d", 172800.0),
    ("1w", 604800.0),
    (" 6 h ", 21600.0),
    ("0", 0.0),
])
def test_parse_duration(text, seconds):
    assert byteback.parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "h", "six hours", "-1h", "6x", "6hh", "1e3", "6h30m", "1,5h"])
def test_parse_duration_refuses_what_is_not_a_duration(text):
    with pytest.raises(ValueError, match="is not a duration"):
        byteback.parse_duration(text)


@pytest.mark.parametrize("seconds,text", [
    (0, "0s"),
    (-5, "0s"),
    (45, "45s"),
    (59.9, "59s"),
    (60, "1m"),
    (3599, "59m"),
    (3600, "1h 0m"),
    (5 * 3600 + 3 * 60 + 59, "5h 3m"),
    (86399, "23h 59m"),
    (86400, "1d 0h"),
    (3 * 86400 + 4 * 3600 + 1799, "3d 4h"),
])
def test_format_duration(seconds, text):
    assert byteback.format_duration(seconds) == text


# -- parse_size / format_size --

@pytest.mark.parametrize("text,size", [
    ("0", 0),
    ("500", 500),
    ("500b", 500),
    ("500B", 500),
    ("10k", 10240),
    ("10K", 10240),
    ("10KiB", 10240),
    ("10kb", 10240),
    ("1M", 1048576),
    ("2.5G", int(2.5 * 1024 ** 3)),
    ("2T", 2 * 1024 ** 4),
    ("1P", 1024 ** 5),
    (" 3 G ", 3 * 1024 ** 3),
])
def test_parse_size(text, size):
    assert byteback.parse_size(text) == size


@pytest.mark.parametrize("text", ["", "G", "ten", "-1G", "1X", "1GG", "1 2"])
def test_parse_size_refuses_what_is_not_a_size(text):
    with pytest.raises(ValueError, match="is not a size"):
        byteback.parse_size(text)


@pytest.mark.parametrize("size,text", [
    (0, "0B"),
    (512, "512B"),
    (1023, "1023B"),
    (1024, "1.0K"),
    (1536, "1.5K"),
    (1024 ** 2, "1.0M"),
    (int(3.1 * 1024 ** 3), "3.1G"),
    (2 * 1024 ** 4, "2.0T"),
    (1024 ** 5, "1024.0T"),      # T is the largest unit
])
def test_format_size(size, text):
    assert byteback.format_size(size) == text


# -- write_json_atomically / read_json --

def test_json_round_trip_leaves_only_the_file(tmp_path):
    path = tmp_path / "state" / "history" / "web1.json"       # parents are created
    data = {"host": "web1", "backups": [{"size": 5, "added": 1}]}
    byteback.write_json_atomically(path, data)
    assert byteback.read_json(path, None) == data
    assert os.listdir(path.parent) == ["web1.json"]            # no temporary file left
    text = path.read_text()
    assert text.endswith("\n") and json.loads(text) == data
    assert text.index('"backups"') < text.index('"host"')       # keys sorted: stable diffs
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o644


def test_write_json_replaces_the_old_content(tmp_path):
    path = tmp_path / "x.json"
    byteback.write_json_atomically(path, {"n": 1})
    byteback.write_json_atomically(path, {"n": 2})
    assert byteback.read_json(path, None) == {"n": 2}


def test_a_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    path = tmp_path / "x.json"
    byteback.write_json_atomically(path, {"n": 1})
    with pytest.raises(TypeError):
        byteback.write_json_atomically(path, {"n": object()})   # not serialisable
    assert byteback.read_json(path, None) == {"n": 1}
    assert os.listdir(tmp_path) == ["x.json"]


def test_read_json_of_a_missing_file_gives_the_default(tmp_path):
    assert byteback.read_json(tmp_path / "nope.json", {"backups": []}) == {"backups": []}


@pytest.mark.parametrize("content", [b"{not json", b"", b'{"a": 1', b"\xff\xfe\x00garbage"])
def test_read_json_of_a_corrupt_file_is_one_line_that_says_what_to_do(tmp_path, content):
    path = tmp_path / "web1.json"
    path.write_bytes(content)
    with pytest.raises(ByteBackError) as exc:
        byteback.read_json(path, {})
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(f"{path} is corrupt")
    assert f"mv {path} {path}.bad" in message
    assert exc.value.exit_code == 1


def test_read_json_of_a_directory_says_it_cannot_read(tmp_path):
    with pytest.raises(ByteBackError, match=r"cannot read .*: Is a directory"):
        byteback.read_json(tmp_path, {})


# -- Lock --

def test_lock_refuses_a_second_holder_and_is_free_again_after(tmp_path):
    path = tmp_path / "run" / "store.lock"                      # parent created on demand
    with byteback.Lock(path, "snapshot or prune on this store"):
        with pytest.raises(ByteBackError) as exc:
            with byteback.Lock(path, "snapshot or prune on this store"):
                pytest.fail("a second holder got the lock")
        assert str(exc.value) == (f"another snapshot or prune on this store is running (lock {path}); "
                                  "try again when it has finished")
    with byteback.Lock(path, "prune"):                          # released on exit
        pass


def test_lock_is_released_when_the_body_raises(tmp_path):
    path = tmp_path / "backup.lock"
    with pytest.raises(RuntimeError):
        with byteback.Lock(path, "backup"):
            raise RuntimeError("boom")
    with byteback.Lock(path, "backup"):
        pass


def test_a_symlinked_lock_file_is_replaced_never_followed(tmp_path, capsys):
    target = tmp_path / "elsewhere"
    (tmp_path / "backup.lock").symlink_to(target)
    with byteback.Lock(tmp_path / "backup.lock", "backup"):
        pass
    assert not target.exists()                                  # nothing created through it
    st = os.lstat(tmp_path / "backup.lock")
    assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600


@pytest.mark.parametrize("plant", ["open-0644", "directory", "fifo", "hard-link"])
def test_what_is_planted_at_a_lock_path_is_replaced_and_cannot_hold_the_lock(tmp_path, plant, caplog,
                                                                              monkeypatch):
    """Issue 8 classes 6 and 11: a 0644 lock file anyone could flock forever; a planted directory."""
    monkeypatch.setattr(byteback.log, "propagate", True)
    path = tmp_path / "store.lock"
    holder = None
    if plant == "open-0644":
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        os.chmod(path, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)          # held "forever" by someone else
        holder = fd
    elif plant == "directory":
        (path / "inside").mkdir(parents=True)
        (path / "inside" / "file").write_text("x")
    elif plant == "fifo":
        os.mkfifo(path)
    else:
        (tmp_path / "other").write_text("")
        os.chmod(tmp_path / "other", 0o600)
        os.link(tmp_path / "other", path)
    try:
        with byteback.Lock(path, "prune"):
            st = os.lstat(path)
            assert stat.S_ISREG(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o600 and st.st_nlink == 1
            with pytest.raises(ByteBackError, match="another prune is running"):
                with byteback.Lock(path, "prune"):
                    pass
    finally:
        if holder is not None:
            os.close(holder)
    assert any(f"removing {path}" in r.getMessage() for r in caplog.records), caplog.records


def test_a_new_lock_file_is_0600(tmp_path):
    with byteback.Lock(tmp_path / "x.lock", "backup"):
        assert stat.S_IMODE(os.lstat(tmp_path / "x.lock").st_mode) == 0o600


# -- Runner --

def test_runner_refuses_a_string_argv_and_runs_nothing(tmp_path):
    made = tmp_path / "made"
    with pytest.raises((AssertionError, TypeError)):
        byteback.Runner().run(f"touch {made}")
    assert not made.exists()


def test_runner_returns_output_and_sets_lc_all_c(tmp_path):
    env = {"PATH": os.environ["PATH"], "LC_ALL": "de_DE.UTF-8"}
    proc = byteback.Runner().run(["sh", "-c", 'printf "%s|%s" "$LC_ALL" "$1"', "sh", "a b"], env=env)
    assert proc.returncode == 0
    assert proc.stdout == "C|a b"                               # one argument, not split by a shell


def test_runner_raises_command_failed_with_the_stderr_tail():
    with pytest.raises(byteback.CommandFailed) as exc:
        byteback.Runner().run(["sh", "-c", "echo one >&2; echo two >&2; exit 3"])
    assert exc.value.returncode == 3
    assert str(exc.value) == "sh failed with exit code 3: sh -c 'echo one >&2; echo two >&2; exit 3' (one two)"


def test_runner_check_false_returns_the_failure():
    proc = byteback.Runner().run(["sh", "-c", "exit 4"], check=False)
    assert proc.returncode == 4


@pytest.mark.parametrize("program,package", [
    ("btrfs", "btrfs-progs"),
    ("rsync", "rsync"),
    ("ssh-keygen", "openssh-client"),
    ("/opt/nowhere/visudo", "sudo"),
    ("frobnicate", "frobnicate"),
])
def test_runner_says_how_to_install_a_missing_program(monkeypatch, tmp_path, program, package):
    monkeypatch.setenv("PATH", str(tmp_path))                   # nothing is installed here
    with pytest.raises(ByteBackError) as exc:
        byteback.Runner().run([program, "--version"])
    name = os.path.basename(program)
    assert str(exc.value) == f"{name} is not installed; install it with: apt-get install {package}"


# -- ensure_programs: install what a backup needs, only when asked --

def _bin_dir(tmp_path, *scripts):
    """A PATH directory holding these shell scripts: (name, body)."""
    path = tmp_path / "bin"
    path.mkdir(exist_ok=True)
    for name, body in scripts:
        (path / name).write_text("#!/bin/sh\n" + body)
        (path / name).chmod(0o755)
    return path


class _NoTerminal:
    def isatty(self):
        return False


@pytest.fixture
def no_rsync(monkeypatch, tmp_path):
    """PATH without rsync; apt-get a stand-in that records its arguments and "installs" rsync."""
    calls = tmp_path / "apt-calls"
    bin_dir = _bin_dir(tmp_path, ("apt-get", f'echo "$@" >> {calls}\n'
                                  f'[ "$1" = install ] && printf "#!/bin/sh\\n" > {tmp_path}/bin/rsync '
                                  f'&& /bin/chmod 755 {tmp_path}/bin/rsync\nexit 0\n'))
    monkeypatch.setenv("PATH", str(bin_dir))
    monkeypatch.setattr(byteback.sys, "stdin", _NoTerminal())
    return calls


def test_ensure_programs_as_root_without_a_terminal_installs_nothing(no_rsync):
    with pytest.raises(ByteBackError) as exc:
        byteback.ensure_programs(["rsync"], install=False, euid=0)
    assert str(exc.value) == ("rsync is not installed; install it with: apt-get install rsync "
                              "(or run this again with --install-missing)")
    assert not no_rsync.exists()


def test_ensure_programs_installs_with_apt_get_when_told(no_rsync, capsys):
    byteback.setup_logging(0)
    byteback.ensure_programs(["rsync"], install=True, euid=0)
    assert no_rsync.read_text() == "install -y rsync\n"
    assert capsys.readouterr().err == "byteback: installed rsync (apt-get install -y rsync)\n"


def test_ensure_programs_asks_at_a_terminal(no_rsync, monkeypatch):
    monkeypatch.setattr(byteback.sys, "stdin", type("Tty", (), {"isatty": lambda self: True})())
    monkeypatch.setattr(byteback.sys, "stderr", type("Tty", (), {"isatty": lambda self: True,
                                                              "write": lambda self, t: None})())
    answers = iter(["n", "yes"])
    monkeypatch.setattr("builtins.input", lambda prompt: next(answers))
    with pytest.raises(ByteBackError, match="not installed"):
        byteback.ensure_programs(["rsync"], install=False, euid=0)    # "n": nothing installed
    assert not no_rsync.exists()
    byteback.ensure_programs(["rsync"], install=False, euid=0)        # "yes"
    assert no_rsync.read_text() == "install -y rsync\n"


def test_ensure_programs_tells_an_ordinary_user_what_to_ask_for(no_rsync, monkeypatch):
    with pytest.raises(ByteBackError) as exc:
        byteback.ensure_programs(["rsync", "ssh"], install=True, euid=1000)
    assert str(exc.value) == ("rsync, ssh are not installed; install them with: "
                              "sudo apt-get install openssh-client rsync")
    assert not no_rsync.exists()


def test_ensure_programs_updates_the_package_lists_once_when_install_fails(tmp_path, monkeypatch):
    calls = tmp_path / "apt-calls"
    # Like a machine that never ran apt-get update: install fails until update has run.
    bin_dir = _bin_dir(tmp_path, ("apt-get", f'echo "$@" >> {calls}\n'
                                  f'[ "$1" = update ] && /bin/touch {tmp_path}/updated && exit 0\n'
                                  f'[ -e {tmp_path}/updated ] || exit 100\n'
                                  f'printf "#!/bin/sh\\n" > {tmp_path}/bin/rsync && /bin/chmod 755 {tmp_path}/bin/rsync\n'))
    monkeypatch.setenv("PATH", str(bin_dir))
    byteback.ensure_programs(["rsync"], install=True, euid=0)
    assert calls.read_text() == "install -y rsync\nupdate\ninstall -y rsync\n"


def test_runner_timeout_is_a_byteback_error():
    with pytest.raises(ByteBackError, match=r"sleep 5 did not finish within 0s"):
        byteback.Runner().run(["sleep", "5"], timeout=0.2)


def test_dry_run_skips_destructive_commands_only(tmp_path):
    runner = byteback.Runner(dry_run=True)
    skipped = runner.run(["touch", str(tmp_path / "destroyed")], destructive=True)
    assert skipped.returncode == 0 and skipped.stdout == ""
    assert not (tmp_path / "destroyed").exists()
    runner.run(["touch", str(tmp_path / "unsaid")])             # destructive unless told otherwise
    assert not (tmp_path / "unsaid").exists()
    runner.run(["touch", str(tmp_path / "looked")], destructive=False)   # e.g. btrfs subvolume show
    assert (tmp_path / "looked").exists()
    byteback.Runner().run(["touch", str(tmp_path / "real")])
    assert (tmp_path / "real").exists()


def test_started_processes_stream_and_a_missing_program_is_one_line(tmp_path):
    proc = byteback.Runner().start(["sh", "-c", "echo one; echo two >&2"], stdout=subprocess.PIPE,
                                   stderr=subprocess.STDOUT)
    assert proc.communicate()[0].split() == [b"one", b"two"] and proc.returncode == 0
    with pytest.raises(byteback.ByteBackError, match="no-such-program-x is not installed"):
        byteback.Runner().start(["no-such-program-x"])


def test_the_c_locale_only_where_output_is_read(tmp_path):
    env = {"PATH": os.environ["PATH"], "LC_ALL": "de_DE.UTF-8"}
    out = tmp_path / "out"
    byteback.Runner().run(["sh", "-c", f'printf "%s" "$LC_ALL" > {out}'], capture=False, env=env)
    assert out.read_text() == "de_DE.UTF-8"      # a hook keeps the locale it was given


def test_dry_run_still_fails_on_a_failing_read_only_command():
    with pytest.raises(byteback.CommandFailed):
        byteback.Runner(dry_run=True).run(["false"], destructive=False)


# -- logging --

@pytest.mark.parametrize("verbosity,quiet,shown", [
    (0, True, ["warning"]),                    # cron: a good run prints nothing
    (0, False, ["info", "warning"]),           # interactive commands say what they did
    (1, True, ["info", "warning"]),
    (2, True, ["debug", "info", "warning"]),
])
def test_setup_logging_levels(capsys, verbosity, quiet, shown):
    byteback.setup_logging(verbosity, quiet=quiet)
    byteback.log.debug("debug")
    byteback.log.info("info")
    byteback.log.warning("warning")
    assert capsys.readouterr().err == "".join(f"byteback: {m}\n" for m in shown)


def test_now_local_is_aware():
    now = byteback.now_local()
    assert now.tzinfo is not None and now.utcoffset() is not None


def test_format_table_aligns_all_columns_but_the_last_and_trims_lines():
    text = byteback.format_table([("a", "bb", "x"), ("ccc", "d", ""), ("e", "f", "long last cell")])
    assert text.splitlines() == ["a    bb  x", "ccc  d", "e    f   long last cell"]
    assert byteback.format_table([]) == ""
    # the same table given by its columns
    assert byteback.format_columns([("a", "ccc", "e"), ("bb", "d", "f"), ("x", "", "long last cell")]) == text
    assert byteback.format_columns([]) == "" and byteback.format_columns([(), ()]) == ""
    assert byteback.format_table([("only", ), ("a column ",)]) == "only\na column"


@pytest.mark.parametrize("config_dir, words", [
    ("/etc/byteback", []), ("/srv/bb-conf", ["--config-dir", "/srv/bb-conf"])])
def test_config_dir_args_pass_on_only_a_non_default_directory(config_dir, words):
    assert byteback.config_dir_args(config_dir) == words


@pytest.mark.parametrize("config_dir", ["relative/dir", "/etc/my conf", '/etc/"x', "/etc/x\nroot"])
def test_config_dir_args_refuse_a_path_that_would_need_quoting(config_dir):
    with pytest.raises(byteback.UsageError):
        byteback.config_dir_args(config_dir)


def test_write_file_atomically_never_writes_through_a_link_planted_at_its_temporary_name(tmp_path):
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    os.link(victim, tmp_path / f".byteback.prom.tmp{os.getpid()}")
    byteback.write_file_atomically(tmp_path / "byteback.prom", "metrics\n")
    assert victim.read_text() == "root's file\n"
    assert (tmp_path / "byteback.prom").read_text() == "metrics\n"


def test_write_file_atomically_never_chmods_through_a_symlink_swapped_in_for_its_temporary_file(
        tmp_path, monkeypatch):
    """Whoever may write the directory can rename the temporary file and put a symlink
    in its place while it is written (here: at its fsync)."""
    victim = tmp_path / "victim"
    victim.write_text("root's file\n")
    os.chmod(victim, 0o600)
    tmp = tmp_path / f".byteback.prom.tmp{os.getpid()}"
    real_fsync = os.fsync

    def swap_then_fsync(fd):
        if os.path.lexists(tmp) and not os.path.islink(tmp):
            os.rename(tmp, tmp_path / "moved")
            tmp.symlink_to(victim)
        real_fsync(fd)

    monkeypatch.setattr(byteback.os, "fsync", swap_then_fsync)
    byteback.write_file_atomically(tmp_path / "byteback.prom", "metrics\n")
    assert os.stat(victim).st_mode & 0o777 == 0o600
    assert victim.read_text() == "root's file\n"


@pytest.mark.parametrize("durable,fsyncs", [(True, 2), (False, 0)])
def test_write_file_atomically_fsyncs_file_and_directory_unless_told_not_to(tmp_path, monkeypatch,
                                                                             durable, fsyncs):
    calls = []
    real_fsync = os.fsync
    monkeypatch.setattr(byteback.os, "fsync", lambda fd: (calls.append(fd), real_fsync(fd)))
    (tmp_path / "hint.json").write_text("old\n")
    byteback.write_json_atomically(tmp_path / "hint.json", {"a": 1}, durable=durable)
    assert json.loads((tmp_path / "hint.json").read_text()) == {"a": 1}
    assert len(calls) == fsyncs and os.listdir(tmp_path) == ["hint.json"]


# -- time_limit: a client's snapshot or prune ends (issue 8, class 3) --

def test_a_time_limit_stops_the_run_with_a_one_line_error():
    import time
    started = time.monotonic()
    with pytest.raises(byteback.RunStopped, match=r"the snapshot did not finish within 1s .*rsync_timeout"):
        with byteback.time_limit(1, "the snapshot"):
            time.sleep(5)
    assert time.monotonic() - started < 3


def test_a_stop_waits_for_the_end_of_an_uninterrupted_block():
    import signal
    import time
    done = []
    with pytest.raises(byteback.RunStopped, match="its client went away"):
        with byteback.time_limit(30, "the prune before the backup"):
            with byteback.uninterrupted():
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.1)
                done.append("the snapshot and its entry")
            done.append("never")
    assert done == ["the snapshot and its entry"]


def test_a_time_limit_leaves_no_alarm_and_no_handler_behind():
    import signal
    before = signal.getsignal(signal.SIGTERM)
    with byteback.time_limit(30, "the snapshot"):
        pass
    assert signal.alarm(0) == 0 and signal.getsignal(signal.SIGTERM) is before


def test_a_session_stops_waiting_for_its_root_run_at_the_limit():
    import time
    read, write = os.pipe()
    try:
        run = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True)
        started = time.monotonic()
        with pytest.raises(ByteBackError, match="the snapshot took longer than 1s and was stopped"):
            byteback.wait_for_client_run(run, byteback.session_watch(1, write, "the snapshot", "see the log"))
        assert time.monotonic() - started < 4 and run.wait(5) is not None     # asked to stop, and ended
    finally:
        os.close(read)
        os.close(write)


def test_a_session_stops_its_root_run_when_the_client_goes_away():
    read, write = os.pipe()
    os.close(read)                     # the client hung up: its end of our stdout is gone
    try:
        run = subprocess.Popen(["sleep", "30"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               universal_newlines=True)
        with pytest.raises(ByteBackError, match="the client went away; the prune was stopped"):
            byteback.wait_for_client_run(run, byteback.session_watch(60, write, "the prune", "see the log"))
        assert run.returncode == -15   # ended by the SIGTERM sudo would relay
    finally:
        os.close(write)


def test_a_session_passes_its_root_runs_output_on(capsys):
    read, write = os.pipe()
    try:
        run = subprocess.Popen(["sh", "-c", "echo taken; echo 'byteback: a warning' >&2; exit 3"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, universal_newlines=True)
        assert byteback.wait_for_client_run(run, byteback.session_watch(60, write, "x", "y")) == 3
    finally:
        os.close(read)
        os.close(write)
    out, err = capsys.readouterr()
    assert out == "taken\n" and err == "byteback: a warning\n"


def test_end_process_says_what_is_buffered_and_exits_with_the_code_at_once():
    """end_process skips the interpreter's teardown (issue 14), never what was still to be said."""
    import atexit
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:                                  # pragma: no cover - the child
        try:
            os.dup2(out_w, 1)
            os.dup2(out_w, 2)
            sys.stdout = open(1, "w", buffering=1 << 16, closefd=False)   # held in its buffer
            sys.stderr = open(2, "w", buffering=1 << 16, closefd=False)
            atexit.register(lambda: os.write(1, b"teardown ran"))
            print("snapshot h/1 taken")
            sys.stderr.write("byteback: complete 0\n")
            byteback.end_process(7)
        finally:
            os._exit(99)
    os.close(out_w)
    said = b""
    while True:
        chunk = os.read(out_r, 4096)
        if not chunk:
            break
        said += chunk
    os.close(out_r)
    _, status = os.waitpid(pid, 0)
    assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 7
    assert sorted(said.splitlines()) == [b"byteback: complete 0", b"snapshot h/1 taken"]   # no teardown
