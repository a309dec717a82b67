"""Benchmark: reading a big server's store as a prune does (issue 11).

test_prune_bench times the plan alone, on stores built in memory; a prune, and
the backup user's look at every push (prune_would_act), first read the store:
every host's snapshots, in-progress marker and history.  Targets, in CPU
seconds, the best of three runs, for a btrfs store of 1,000 hosts x 100 daily
snapshots (a history entry for each):
  read_prune_state, what every prune reads                               <= 1 s
  prune_would_act, what every push asks, with no plan of root's to go by  <= 1.5 s
  the same after a prune noted its plan (settled), as on a running server <= 0.5 s
Before this benchmark (0190b83) the two took 2.57 s and 3.84 s: a path object and a
stat for every snapshot, and every name parsed again at each of the two or three
listings of a host.

Each run empties what a new process would not have (the names already parsed);
the page cache stays warm, as on a server whose store was read by the run before.
Each host's newest snapshot is a real one of its current (what a prune looks
at to tell an unfinished upload); the others are plain directories, which a
listing reads just as it reads subvolumes.

It needs root (a btrfs loop file).
Run it with:   python3 -m pytest -m bench tests/bench/test_store_read_bench.py -s
or directly:   python3 tests/bench/test_store_read_bench.py
"""
from __future__ import annotations

import datetime as dt
import os
import random
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "integration"), str(HERE.parent.parent)]
import byteback  # noqa: E402
from sshd_env import _skip_or_check, btrfs_mount  # noqa: E402

HOSTS, PER_HOST = 1000, 100
TARGETS = {"read_prune_state": 1.0, "prune_would_act": 1.5, "prune_would_act, settled": 0.5}


def build_store(root: Path, hosts: int, per_host: int, now: dt.datetime):
    """A store of `hosts` hosts, each with per_host daily snapshots at a random second of the
    night (few names alike, as the backups of a real server end) and a history entry for each."""
    store = byteback.open_store(root, create=True)
    rnd = random.Random(11)
    for h in range(hosts):
        host = f"host{h:04d}"
        current = store.prepare_host(host)
        history = []
        for day in range(per_host, 0, -1):
            when = now - dt.timedelta(days=day, seconds=rnd.randrange(36000))
            name = byteback.format_snapshot_name(when)
            if day == 1:
                byteback.create_snapshot(current, store.host_dir(host), name, read_only=True)
            else:
                os.mkdir(store.host_dir(host) / name)
            history.append({"snapshot": name, "size": 10 ** 8, "added": 10 ** 5, "completed": when.isoformat()})
        store.write_history(host, history)
    return store


def best_of(runs: int, call) -> float:
    """The least CPU time of `runs` calls, each with the names parsed before forgotten."""
    times = []
    for _ in range(runs):
        byteback.parse_snapshot_name.cache_clear()
        start = time.process_time()
        call()
        times.append(time.process_time() - start)
    return min(times)


def measure() -> dict:
    now = byteback.now_local()
    config = byteback.ServerConfig()
    with btrfs_mount("2G") as root:
        start = time.perf_counter()
        store = build_store(root, HOSTS, PER_HOST, now)
        print(f"\nstore of {HOSTS:,} hosts x {PER_HOST} snapshots built in {time.perf_counter() - start:.0f} s")
        state = byteback.read_prune_state(store, now)
        assert sum(len(f.snapshots) for f in state.hosts.values()) == HOSTS * PER_HOST
        assert all(len(f.history) == PER_HOST and f.pending is None for f in state.hosts.values())
        figures = {"read_prune_state": best_of(3, lambda: byteback.read_prune_state(store, now)),
                   "prune_would_act": best_of(3, lambda: byteback.prune_would_act(store, config, now))}
        assert byteback.prune_store(store, config, now=now).deleted == []     # room enough: settled
        assert byteback.prune_would_act(store, config, now) is False
        figures["prune_would_act, settled"] = best_of(3, lambda: byteback.prune_would_act(store, config, now))
        return figures


def report(figures: dict) -> str:
    lines = [f"reading a store of {HOSTS:,} hosts x {PER_HOST} snapshots, CPU seconds, best of 3:"]
    for name, limit in TARGETS.items():
        verdict = "ok" if figures[name] <= limit else "MISSED"
        lines.append(f"  {name:<26} {figures[name]:6.2f}s  <= {limit:g}s  {verdict}")
    return "\n".join(lines)


@pytest.mark.bench
def test_reading_a_big_server_s_store():
    _skip_or_check()
    figures = measure()
    text = report(figures)
    print(text)
    assert all(figures[name] <= limit for name, limit in TARGETS.items()), text


if __name__ == "__main__":
    print(report(measure()))
