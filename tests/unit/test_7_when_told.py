"""snapshot --when-told's wait for the word: bounded in time and in what it reads.

Real pipes; the clock is the real one with short deadlines.  The lock that lets
one waiting run per host is a real flock in a temporary directory.
"""
from __future__ import annotations

import argparse
import os
import threading
import time

import pytest

import byteback


@pytest.fixture
def pipe():
    r, w = os.pipe()
    yield r, w
    for fd in (r, w):
        try:
            os.close(fd)
        except OSError:
            pass


def test_the_word_and_a_newline_is_a_go(pipe):
    r, w = pipe
    os.write(w, b"go\n")
    assert byteback.wait_for_word(r, 5) is True


def test_the_word_in_pieces_is_a_go(pipe):
    r, w = pipe
    threading.Timer(0.1, os.write, (w, b"\n")).start()
    os.write(w, b"go")
    assert byteback.wait_for_word(r, 5) is True


def test_a_pipe_that_never_speaks_ends_at_the_deadline(pipe):
    r, _ = pipe
    start = time.monotonic()
    assert byteback.wait_for_word(r, 0.3) is False
    assert 0.3 <= time.monotonic() - start < 3


def test_a_flood_without_a_newline_reads_no_more_than_the_word(pipe):
    r, w = pipe
    os.set_blocking(w, False)
    flood = b"g" * 60000
    written = os.write(w, flood)
    assert byteback.wait_for_word(r, 5) is False
    # what it did not read is still in the pipe: it read len("go\n") bytes at most
    left = len(os.read(r, 1 << 20))
    assert left >= written - 3


@pytest.mark.parametrize("words", [b"stop\n", b"go now\n", b"GO\n", b"\n", b"gox"])
def test_anything_else_is_a_no(pipe, words):
    r, w = pipe
    os.write(w, words)
    assert byteback.wait_for_word(r, 5) is False


def test_the_end_of_input_is_a_no_at_once(pipe):
    r, w = pipe
    os.write(w, b"g")
    os.close(w)
    start = time.monotonic()
    assert byteback.wait_for_word(r, 30) is False
    assert time.monotonic() - start < 3


def test_while_it_waits_it_has_the_store_written_out_every_interval(pipe):
    """idle (write_out_store: the push's data on disc while rsync runs) each `every` seconds
    without input, and the word still ends the wait at once."""
    r, w = pipe
    calls = []
    threading.Timer(0.55, os.write, (w, b"go\n")).start()
    start = time.monotonic()
    assert byteback.wait_for_word(r, 5, idle=lambda: calls.append(time.monotonic() - start), every=0.1) is True
    assert time.monotonic() - start < 2
    # at least one (a loaded machine wakes late), never more often than every interval
    assert 1 <= len(calls) <= 6 and all(b - a >= 0.09 for a, b in zip(calls, calls[1:]))


def test_a_word_before_the_first_interval_writes_nothing_out(pipe):
    r, w = pipe
    calls = []
    os.write(w, b"go\n")
    assert byteback.wait_for_word(r, 5, idle=lambda: calls.append(1), every=0.2) is True
    assert calls == []


def test_the_deadline_holds_while_it_writes_out(pipe):
    r, _ = pipe
    calls = []
    start = time.monotonic()
    assert byteback.wait_for_word(r, 0.35, idle=lambda: calls.append(1), every=0.1) is False
    assert 0.35 <= time.monotonic() - start < 3 and 1 <= len(calls) <= 3


def test_a_word_that_came_while_it_wrote_out_is_a_go_past_the_deadline(pipe):
    """A sync can block past the deadline: the word the client sent meanwhile still counts."""
    r, w = pipe

    def slow_write_out():
        time.sleep(0.3)
        os.write(w, b"go\n")
    assert byteback.wait_for_word(r, 0.25, idle=slow_write_out, every=0.1) is True


def test_it_does_not_write_out_when_less_than_an_interval_is_left(pipe):
    r, _ = pipe
    calls = []
    assert byteback.wait_for_word(r, 0.15, idle=lambda: calls.append(1), every=0.1) is False
    assert calls == []


def test_write_out_store_is_harmless_where_there_is_no_btrfs(tmp_path):
    byteback.write_out_store(str(tmp_path))()                # ENOTTY on tmpfs/ext4: nothing
    byteback.write_out_store(str(tmp_path / "missing"))()    # no store there: nothing


@pytest.fixture
def server(tmp_path, monkeypatch, pipe):
    """A config dir whose store has host h1, the lock directory in tmp_path, stdin a pipe."""
    (tmp_path / "store" / "h1").mkdir(parents=True)
    (tmp_path / "conf").mkdir()
    (tmp_path / "conf" / "server.conf").write_text(f"[server]\nstore = {tmp_path / 'store'}\nrsync_timeout = 1\n")
    monkeypatch.setattr(byteback, "WHEN_TOLD_LOCK_DIR", tmp_path / "locks")
    r, w = pipe
    monkeypatch.setattr("sys.stdin", os.fdopen(os.dup(r), "r"))
    return argparse.Namespace(config_dir=str(tmp_path / "conf"), store=None), w


def test_told_to_go_waits_at_most_rsync_timeout_and_goes_on_the_word(server, tmp_path):
    args, w = server
    start = time.monotonic()
    assert byteback._told_to_go(args, "h1") is False
    assert 1 <= time.monotonic() - start < 4
    os.write(w, b"go\n")
    assert byteback._told_to_go(args, "h1") is True
    assert os.stat(tmp_path / "locks").st_mode & 0o777 == 0o700


def test_a_second_waiting_run_of_a_host_or_one_of_no_host_is_refused_at_once(server, tmp_path):
    args, w = server
    os.write(w, b"go\n")                  # would be a go, were it asked
    with byteback.Lock(byteback._when_told_lock_dir() / "h1.lock", "waiting snapshot of host h1"):
        assert byteback._told_to_go(args, "h1") is False
    assert byteback._told_to_go(args, "h2") is False
    assert byteback._told_to_go(args, "h1") is True


def test_a_lock_directory_others_may_write_is_refused(tmp_path, monkeypatch):
    path = tmp_path / "locks"
    path.mkdir()
    os.chmod(path, 0o777)
    monkeypatch.setattr(byteback, "WHEN_TOLD_LOCK_DIR", path)
    with pytest.raises(byteback.ByteBackError, match="only it may write"):
        byteback._when_told_lock_dir()


def test_asking_sudo_reads_nothing_of_the_push_and_gives_up_at_the_grace(tmp_path, monkeypatch):
    """The forced command asks `sudo -n -l` while the push's rsync already reads the ssh
    channel: a sudo that reads its input or stalls (sudoers from a slow directory) must
    neither take rsync's bytes nor hold the session.  A stand-in sudo on PATH records what
    its input held, stalls, then says no; the answer is an error (not a 'no': sudo may be
    set up), within the grace; a push catches it and snapshots once rsync has ended."""
    seen = tmp_path / "stdin"
    fake = tmp_path / "sudo"
    fake.write_text(f"#!/bin/sh\ntimeout 2 cat > {seen}\nsleep 3\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", f"{tmp_path}:{os.environ['PATH']}")
    monkeypatch.setattr(byteback, "CLIENT_RUN_GRACE", 1)
    r, w = os.pipe()
    os.write(w, b"rsync's bytes")
    saved = os.dup(0)
    os.dup2(r, 0)
    try:
        receive = argparse.Namespace(args=argparse.Namespace(config_dir=byteback.DEFAULT_CONFIG_DIR), host="alpha")
        start = time.monotonic()
        with pytest.raises(byteback.ByteBackError, match="did not finish"):
            byteback._start_root_run(receive, when_told=True)
        assert time.monotonic() - start < 2.5
    finally:
        os.dup2(saved, 0)
        for fd in (saved, r, w):
            os.close(fd)
    assert seen.read_bytes() == b""
