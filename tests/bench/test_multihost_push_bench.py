"""Benchmark: a no-change push to a userns store of many hosts against one of a single host.

Run it with:   python3 -m pytest -m bench tests/bench/test_multihost_push_bench.py -s
or directly:   python3 tests/bench/test_multihost_push_bench.py

It needs root (a btrfs loop file, throw-away users, an sshd on 127.0.0.1).
A host of the real `setup-server --receiver userns` and `setup-client` backs up
a tree of BENCH_FILES small files (default 3,000); its no-change push is timed
while it is the store's only host, then again once BENCH_HOSTS hosts (default
50, each with its own account, a small tree and one snapshot) share the store.
A host's account cannot read the others' directories, so a push asks root's
last plan (.byteback/last-plan.json) whether the disc needs a prune first;
the same push is also timed with that file taken away before each run, as
every push of such a store ran before the plan was written (a root prune:
sudo, a second start of the program as root, every host's state read).

Target: the push to the store of many hosts takes at most 1.15 times the push
to the store of one (median of BENCH_REPEAT, default 5, runs each).
"""
from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent / "integration"), str(HERE.parent.parent)]
import byteback  # noqa: E402
from remote_env import remote_byteback  # noqa: E402
from sshd_env import _sigterm_as_interrupt, _skip_or_check  # noqa: E402

FILES = int(os.environ.get("BENCH_FILES", "3000"))
HOSTS = int(os.environ.get("BENCH_HOSTS", "50"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "5"))
LIMIT = 1.15


def _tree(root: Path, files: int) -> Path:
    for n in range(files):
        d = root / f"d{n // 100:03d}"
        if n % 100 == 0:
            d.mkdir(parents=True)
        (d / f"f{n:05d}").write_bytes(b"%d\n" % n * 50)
    return root


def _push(remote, config: Path, host: str, src: Path) -> float:
    remote._next_second(host)          # a snapshot a second at most: not timed
    os.sync()
    start = time.perf_counter()
    remote.run("backup", "--host", host, "--source", str(src), "--retry-number", "1", config_dir=config).check()
    return time.perf_counter() - start


def measure(files: int = FILES, hosts: int = HOSTS, repeat: int = REPEAT) -> dict:
    """{what: median seconds} of host client1's no-change push."""
    problem = byteback.userns_problem()
    if problem:
        pytest.skip(f"this machine cannot run userns receivers: {problem}")
    found = {}
    with _sigterm_as_interrupt(), remote_byteback(store_size="2G", receiver="userns") as remote:
        remote.set_server_conf(min_interval="0", receiver="userns")
        src = _tree(remote.env.workdir / "src", files)
        push = lambda: _push(remote, remote.client_config, remote.host, src)   # noqa: E731
        push()                                            # the full copy
        found["one host"] = statistics.median(push() for _ in range(repeat))
        for n in range(2, hosts + 1):
            config, name = remote.env.workdir / f"config-h{n}", f"h{n:03d}"
            config.mkdir(mode=0o700)
            remote.setup_client(config, name)
            _push(remote, config, name, _tree(remote.env.workdir / f"src-{name}", 10))
        found[f"{hosts} hosts"] = statistics.median(push() for _ in range(repeat))
        plan = remote.store / ".byteback" / "last-plan.json"
        without = []
        for _ in range(repeat):
            plan.unlink(missing_ok=True)
            without.append(push())
        found[f"{hosts} hosts, no last plan"] = statistics.median(without)
    return found


def report(found: dict, files: int = FILES, hosts: int = HOSTS) -> tuple:
    """The lines printed, and the target missed (or None)."""
    one, many = found["one host"], found[f"{hosts} hosts"]
    lines = [f"no-change push of one host's {files:,} files to a userns store (median of {REPEAT})"]
    lines += [f"  {what:28} {seconds:6.3f} s  {seconds / one:5.2f}x" for what, seconds in found.items()]
    missed = None if many <= LIMIT * one else f"{hosts} hosts: {many / one:.2f}x of one host (target <= {LIMIT})"
    return lines + ["  target: " + (missed and "MISSED: " + missed or f"{hosts} hosts <= {LIMIT}x one host: met")], missed


@pytest.mark.bench
def test_a_push_to_a_store_of_many_hosts_costs_what_one_to_a_single_host_does():
    _skip_or_check()
    lines, missed = report(measure())
    print("\n" + "\n".join(lines))
    assert missed is None, missed


if __name__ == "__main__":
    lines, missed = report(measure())
    print("\n".join(lines))
    sys.exit(1 if missed else 0)
