"""Benchmark: sizing a snapshot from what its run wrote, without a walk of the tree (issue 14).

Run it with:   python3 -m pytest -m bench tests/bench/test_measure_bench.py -s
or directly:   python3 tests/bench/test_measure_bench.py

It needs root (a btrfs loop file).  A host's current of BENCH_FILES files
(default 30,000, in directories of 100) is snapshotted as byteback does it;
then, before each snapshot, 1 % of its files, and then QUIET_FILES of them,
are rewritten in place (4 KiB each, as rsync --inplace writes a changed block;
none of the tree's hard-linked files, whose rewrite asks for another pass); in
the next rounds 0.5 % are unlinked and as many made beside them instead; in
the last, every directory is read before 1 % are rewritten, on the store
remounted strictatime: each reading writes every directory's access time, as
rsync's does once a day on a store mounted relatime (without noatime), and
as a nightly backup's snapshot is measured there (the directories' FS_NOATIME_FL,
which every snapshot now sets, cleared first: a store's from before it); and current is sized both
ways, each after the same sync:

  quiet   BtrfsStore._measure_quiet: the leaves written since, each written
          directory's names and each inode written or unnamed, in both trees
  walk    measure_subvolume(full=True): every item of current's tree

Both must give the same size, linked names and shared inodes.  Targets: at 1 %
rewritten the quiet way takes at most 0.75 of the walk's time; at 0.5 %
unlinked and made, and at QUIET_FILES rewritten (the bound past which
take_snapshot walks instead), no more than 1.1 of it: that bound is where the
quiet way stops paying; with every directory read, at most 0.9 of it (the
directories changed in their access time alone are left out, each read in the
snapshot once).  The quiet way costs most in reading the leaves the run
wrote, and changes spread at random over the tree, as here, write the most
leaves: names made and unlinked write their directories' leaves too.  The walk
grows with the tree, the quiet way with the run.  BENCH_CHANGED="150 300 600" measures those counts instead (no targets).
Median of BENCH_REPEAT (default 5).
"""
from __future__ import annotations

import contextlib
import datetime as dt
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from unittest import mock

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "integration"), str(HERE.parent.parent)]
import byteback  # noqa: E402
from sshd_env import btrfs_mount  # noqa: E402

FILES = int(os.environ.get("BENCH_FILES", "30000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))
PER_DIR = 100
FILE_BYTES = 16 * 1024


def _build(current: Path, files: int) -> list:
    rng = random.Random(14)
    paths = []
    for n in range(files):
        d = current / f"d{n // (PER_DIR * PER_DIR):02d}" / f"s{(n // PER_DIR) % PER_DIR:02d}"
        if n % PER_DIR == 0:
            d.mkdir(parents=True)
        path = d / f"f{n:05d}"
        path.write_bytes(rng.randbytes(FILE_BYTES) if hasattr(rng, "randbytes") else os.urandom(FILE_BYTES))
        if n % 500 == 2:
            os.link(path, path.with_name(path.name + ".link"))
        else:
            paths.append(path)      # rewritten below: a shared inode rewritten asks for another pass
    return paths


def _rewrite(paths: list, rng: random.Random) -> None:
    for path in paths:
        with open(path, "r+b") as f:        # in place: the inode and its names stay
            f.seek(rng.randrange(0, FILE_BYTES - 4096))
            f.write(os.urandom(4096))


def _make_and_unlink(paths: list, chosen: list) -> None:
    """A file made beside each chosen one, and each chosen one unlinked (paths follows)."""
    for path in chosen:
        made = path.with_name(path.name + "n")
        made.write_bytes(os.urandom(FILE_BYTES))
        path.unlink()
        paths[paths.index(path)] = made


def _clear_no_atime(directory: str) -> None:
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    try:
        byteback.set_file_flags(fd, byteback.file_flags(fd) & ~byteback.FS_NOATIME_FL)
    finally:
        os.close(fd)


def _view(usage) -> tuple:
    return usage.size, usage.linked, [(s.inode, s.made, s.nlink, s.stat, s.items, s.written) for s in usage.shared]


def measure(files: int = FILES, repeat: int = REPEAT) -> dict:
    """{(how, files changed): (quiet seconds, walk seconds)}, each a median; asserts both agree."""
    found = {}
    with btrfs_mount("4G") as root, contextlib.ExitStack() as restore:
        store, config = byteback.open_store(root, create=True), byteback.ServerConfig()
        current = store.prepare_host("h")
        paths = _build(current, files)
        when = dt.datetime(2026, 12, 1, tzinfo=dt.timezone.utc)
        byteback.snapshot_host(store, "h", config, now=when, force=True)
        # That snapshot gave every directory of current FS_NOATIME_FL, which writes each one's
        # inode: the next is measured by the walk, once (as the first backup after a full one).
        when += dt.timedelta(hours=7)
        byteback.snapshot_host(store, "h", config, now=when, force=True)
        rng = random.Random(5)
        counts = [int(c) for c in os.environ.get("BENCH_CHANGED", "").split()] or (
            max(1, files // 100), byteback.QUIET_FILES)
        kinds = [("rewritten", c) for c in counts] + [("made", max(1, files // 100)), ("read", max(1, files // 100))]
        for kind, changed in kinds:
            quiet_times, walk_times = [], []
            if kind == "read":
                subprocess.run(["mount", "-o", "remount,strictatime", str(root)], check=True)
                # The directories of a store from before FS_NOATIME_FL, which every snapshot
                # since sets: cleared, in the newest snapshot too, and not set again.
                restore.enter_context(mock.patch.object(byteback, "keep_directories_timeless", lambda path, since: 0))
                for directory, _dirs, _files in os.walk(current):
                    _clear_no_atime(directory)
                when += dt.timedelta(hours=7)
                byteback.snapshot_host(store, "h", config, now=when, force=True)
            for _ in range(repeat):
                chosen = rng.sample(paths, changed // 2 if kind == "made" else changed)
                if kind == "read":
                    for _dir, _dirs, _files in os.walk(current):    # every directory read: its atime
                        pass
                if kind in ("rewritten", "read"):
                    _rewrite(chosen, rng)
                else:
                    _make_and_unlink(paths, chosen)
                previous = byteback.last_measured(store.read_history("h"))
                since = byteback.written_since(previous)
                os.sync()
                byteback.measure_subvolume(current, since, full=False)     # the same sync for both
                start = time.perf_counter()
                quiet = store._measure_quiet("h", current, previous)
                quiet_times.append(time.perf_counter() - start)
                start = time.perf_counter()
                walked = byteback.measure_subvolume(current, since, full=True)
                walk_times.append(time.perf_counter() - start)
                assert quiet is not None, f"{changed} files {kind} were walked"
                assert _view(quiet[0]) == _view(walked[0]) and quiet[1] == walked[1]
                when += dt.timedelta(hours=7)
                byteback.snapshot_host(store, "h", config, now=when, force=True)
            found[kind, changed] = statistics.median(quiet_times), statistics.median(walk_times)
    return found


def report(found: dict, files: int = FILES) -> list:
    """The lines printed, and the targets missed."""
    lines = [f"sizing current of {files:,} files after a run changed some (median of {REPEAT})",
             "  files changed                 quiet       walk   quiet/walk"]
    for (kind, changed), (quiet, walk) in found.items():
        what = (f"{changed:,} rewritten" if kind == "rewritten" else f"every directory read, {changed:,} rewritten"
                if kind == "read" else f"{changed // 2:,} made, {changed // 2:,} unlinked")
        lines.append(f"  {what:26} {quiet * 1000:7.1f} ms {walk * 1000:7.1f} ms   {quiet / walk:6.2f}")
    one, bound = found.get(("rewritten", max(1, files // 100))), found.get(("rewritten", byteback.QUIET_FILES))
    made = found.get(("made", max(1, files // 100)))
    read = found.get(("read", max(1, files // 100)))
    missed = []
    if one and one[0] > one[1] * 0.75:
        missed.append(f"1 %: the quiet way {one[0] / one[1]:.2f} of the walk (target <= 0.75)")
    if made and made[0] > made[1] * 1.1:
        missed.append(f"1 % made and unlinked: the quiet way {made[0] / made[1]:.2f} of the walk (target <= 1.1)")
    if read and read[0] > read[1] * 0.9:
        missed.append(f"every directory read: the quiet way {read[0] / read[1]:.2f} of the walk (target <= 0.9)")
    if bound and bound[0] > bound[1] * 1.1:
        missed.append(f"{byteback.QUIET_FILES:,} files: the quiet way {bound[0] / bound[1]:.2f} of the walk "
                      "(target <= 1.1: lower QUIET_FILES)")
    return lines + ["  targets: " + ("all met" if not missed else "MISSED: " + "; ".join(missed))], missed


@pytest.mark.bench
def test_sizing_files_rewritten_in_place_beats_the_walk():
    if os.geteuid() != 0:
        pytest.skip("needs root: a btrfs loop file, and the kernel's tree search")
    found = measure()
    lines, missed = report(found)
    print("\n" + "\n".join(lines))
    assert not missed, missed


if __name__ == "__main__":
    lines, missed = report(measure())
    print("\n".join(lines))
    sys.exit(1 if missed else 0)
