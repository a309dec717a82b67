"""Benchmark: restore's listing over 100 snapshots of a 100,000-file tree (issue 5).

Run it with:   python3 -m pytest -m bench tests/bench/test_restore_bench.py -s
or directly:   python3 tests/bench/test_restore_bench.py

The store is a real HardlinkStore layout, <store>/<host>/<snapshot>/..., made
cheaply: the first snapshot's files are written once (each with the
fake-super xattr a server store keeps), the other 99 are `cp -al` copies with
a few files changed in each, snapshot names from format_snapshot_name over
100 days.  Building it takes a few minutes and ~0.5 GB of directories;
BYTEBACK_BENCH_STORE=/some/dir keeps it there for the next run.

Measured (list_store, as `restore` and the server's `list` run it):
  (a) one file, --all, across 100 snapshots
  (b) /**/*.conf in the newest snapshot (a walk over 100k files)
  (c) /** --all over every snapshot: 10M entries.  Measured on 10 snapshots and
      extrapolated, unless BENCH_FULL=1 (or the 10-snapshot figure says the full
      run stays under a minute).
Only generous upper bounds are asserted: this catches regressions, it is not a
performance target.
"""
from __future__ import annotations

import datetime as dt
import gc
import os
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

if __name__ == "__main__":
    sys.path[:0] = [str(Path(__file__).resolve().parents[2])]
import byteback  # noqa: E402

HOST = "bench1"
SNAPSHOTS = 100
TOP, SUB, PER_DIR = 100, 10, 100            # 100 x 10 directories of 100 files: 100,000 files
CHANGED_PER_SNAPSHOT = 5
FIRST = dt.datetime(2026, 1, 1, 3, 17, tzinfo=dt.timezone.utc)
ONE_FILE = "/etc/hosts"                      # changes every 10th snapshot: 10 versions
FAKE_FILE = b"100644 0,0 1000:1000"
FAKE_DIR = b"40755 0,0 0:0"

LIMIT_A, LIMIT_B, LIMIT_C_PER_SNAPSHOT = 2.0, 10.0, 30.0


def _leaf(t: int, s: int) -> str:
    return f"srv/d{t:03d}/s{s:02d}"


def _name(n: int) -> str:
    return f"f{n:03d}.conf" if n % 100 == 7 else f"f{n:03d}.txt"     # one .conf per directory


def _write(path: str, data: bytes, mtime: int) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, data)
    finally:
        os.close(fd)
    os.setxattr(path, byteback.FAKE_SUPER_XATTR, FAKE_FILE)
    os.utime(path, (mtime, mtime))


def snapshot_names() -> list:
    return [byteback.format_snapshot_name(FIRST + dt.timedelta(days=k)) for k in range(SNAPSHOTS)]


def build_store(root: Path) -> None:
    """<root>/bench1/<100 snapshots>, each a hard-linked copy of the last with a few files changed."""
    host_dir = root / HOST
    names = snapshot_names()
    done = host_dir / ".complete"
    if done.exists():
        return
    if host_dir.exists():
        shutil.rmtree(host_dir)
    host_dir.mkdir(parents=True)
    rng = random.Random(5)
    base_mtime = 1_700_000_000
    first = str(host_dir / names[0])
    for d in ["", "etc", "srv"] + [f"srv/d{t:03d}" for t in range(TOP)]:
        os.makedirs(os.path.join(first, d), exist_ok=True)
    for t in range(TOP):
        for s in range(SUB):
            leaf = os.path.join(first, _leaf(t, s))
            os.mkdir(leaf)
            for n in range(PER_DIR):
                _write(os.path.join(leaf, _name(n)), b"%d/%d/%d\n" % (t, s, n), base_mtime + n)
    _write(os.path.join(first, "etc/hosts"), b"127.0.0.1 localhost\n", base_mtime)
    _write(os.path.join(first, "etc/a.conf"), b"a = 1\n", base_mtime)
    for dirpath, _dirs, _files in os.walk(first):
        os.setxattr(dirpath, byteback.FAKE_SUPER_XATTR, FAKE_DIR)
    for k in range(1, SNAPSHOTS):
        prev, this = str(host_dir / names[k - 1]), str(host_dir / names[k])
        subprocess.run(["cp", "-al", prev, this], check=True)
        when = base_mtime + 86400 * k
        for _ in range(CHANGED_PER_SNAPSHOT):
            t, s, n = rng.randrange(TOP), rng.randrange(SUB), rng.randrange(PER_DIR)
            path = os.path.join(this, _leaf(t, s), _name(n))
            os.unlink(path)                       # its own inode: history keeps the old one
            _write(path, b"changed in snapshot %d\n" % k, when)
        if k % 10 == 0:
            path = os.path.join(this, "etc/hosts")
            os.unlink(path)
            _write(path, b"127.0.0.1 localhost\n# %d\n" % k, when)
    done.touch()


class FirstSnapshots(byteback.HardlinkStore):
    """The same store, showing only its first `count` snapshots (for the extrapolated run)."""

    def __init__(self, root, count: int):
        super().__init__(root)
        self.count = count

    def snapshots(self, host=None):
        return super().snapshots(host)[:self.count]


def timed(func, *args, **kwargs) -> tuple:
    gc.collect()
    start = time.perf_counter()
    result = func(*args, **kwargs)
    return time.perf_counter() - start, result


def measure(root: Path, full: bool = False) -> dict:
    store = byteback.HardlinkStore(root)
    assert len(store.snapshots(HOST)) == SNAPSHOTS
    figures = {}
    figures["a"], entries = timed(byteback.list_store, store, HOST, [ONE_FILE], every=True)
    assert len(entries) == 10, [e.snapshot for e in entries]
    figures["b"], entries = timed(byteback.list_store, store, HOST, ["/**/*.conf"])
    assert len(entries) == TOP * SUB + 1
    figures["b_format"], _ = timed(byteback.format_entries, entries)
    figures["c10"], entries = timed(byteback.list_store, FirstSnapshots(root, 10), HOST, ["/**"], every=True)
    figures["c10_entries"] = len(entries)
    figures["c10_format"], _ = timed(byteback.format_entries, entries)
    del entries
    figures["c_extrapolated"] = figures["c10"] * SNAPSHOTS / 10
    if full or figures["c_extrapolated"] < 60:
        figures["c"], entries = timed(byteback.list_store, store, HOST, ["/**"], every=True)
        figures["c_entries"] = len(entries)
        del entries
    gc.collect()
    return figures


def report(figures: dict) -> str:
    lines = [f"restore listing, {SNAPSHOTS} snapshots of {TOP * SUB * PER_DIR + 2:,} files "
             f"(hardlink store, fake-super xattrs), Python {sys.version.split()[0]}, {os.cpu_count()} CPUs:",
             f"  (a) {ONE_FILE} --all over {SNAPSHOTS} snapshots:      {figures['a']:8.3f} s",
             f"  (b) /**/*.conf in the newest snapshot:          {figures['b']:8.3f} s"
             f"  (+ {figures['b_format']:.3f} s to format {TOP * SUB + 1} rows)",
             f"  (c) /** --all over 10 snapshots:                {figures['c10']:8.3f} s"
             f"  ({figures['c10_entries']:,} versions; + {figures['c10_format']:.2f} s to format)",
             f"      extrapolated to {SNAPSHOTS} snapshots (10M entries): {figures['c_extrapolated']:8.1f} s"]
    if "c" in figures:
        lines.append(f"      measured over {SNAPSHOTS} snapshots:            {figures['c']:8.1f} s"
                     f"  ({figures['c_entries']:,} versions)")
    else:
        lines.append("      (not run in full: over a minute; BENCH_FULL=1 runs it)")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def bench_store():
    keep = os.environ.get("BYTEBACK_BENCH_STORE")
    root = Path(keep) if keep else Path(tempfile.mkdtemp(prefix="bbbench-restore-"))
    try:
        took, _ = timed(build_store, root)
        print(f"\nstore built in {took:.0f} s at {root}")
        yield root
    finally:
        if not keep:
            subprocess.run(["rm", "-rf", str(root)], check=False)


@pytest.mark.bench
def test_listing_100_snapshots_of_100k_files(bench_store):
    figures = measure(bench_store, full=bool(os.environ.get("BENCH_FULL")))
    print(report(figures))
    assert figures["a"] < LIMIT_A, report(figures)
    assert figures["b"] < LIMIT_B, report(figures)
    assert figures["c10"] / 10 < LIMIT_C_PER_SNAPSHOT, report(figures)


if __name__ == "__main__":
    root = Path(os.environ.get("BYTEBACK_BENCH_STORE") or tempfile.mkdtemp(prefix="bbbench-restore-"))
    took, _ = timed(build_store, root)
    print(f"store built in {took:.0f} s at {root}")
    print(report(measure(root, full=bool(os.environ.get("BENCH_FULL")))))
    if not os.environ.get("BYTEBACK_BENCH_STORE"):
        subprocess.run(["rm", "-rf", str(root)], check=False)
