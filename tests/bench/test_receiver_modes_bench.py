"""Benchmark: what the receiving rsync's way of keeping owners costs (issue 14, item 1).

Run it with:   python3 -m pytest -m bench tests/bench/test_receiver_modes_bench.py -s
or directly:   python3 tests/bench/test_receiver_modes_bench.py

Needs root.  A tree of BENCH_FILES files (default 30,000, small, a few owners)
is copied, then copied again unchanged, by a local `rsync -aHX --numeric-ids
--delete-during` whose receiving side runs three ways (through --rsh, as a
remote one would):

  fake-super   as an unprivileged user with --fake-super (byteback today:
               owners and modes in the user.rsync.%stat xattr)
  userns       as root inside a user namespace whose uids and gids 0-65535
               map onto 100000-165535 (the per-host range design): real
               owners on disc, shifted; no privilege outside
  root         as root (the physical limit)

Printed: the no-change run's wall time and system time (median of
BENCH_REPEAT, default 3), and what the namespace can and cannot do
(owners shifted, mknod refused).  The target, userns no-change <= 1.3x root,
fails the test past it.
"""
from __future__ import annotations

import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

FILES = int(os.environ.get("BENCH_FILES", "30000"))
REPEAT = int(os.environ.get("BENCH_REPEAT", "3"))
BASE = 100000                  # the namespace's uid/gid 0 on disc
TARGET = 1.3                   # userns no-change / root no-change

# Runs argv as root of a new user namespace mapping 0-65535 onto BASE-: the
# child unshares, the parent (real root) writes its maps, the child becomes
# the namespace's root and execs.
NSRUN = """\
import ctypes, os, sys
base, argv = int(sys.argv[1]), sys.argv[2:]
libc = ctypes.CDLL(None, use_errno=True)
ready_r, ready_w = os.pipe()
go_r, go_w = os.pipe()
pid = os.fork()
if pid == 0:
    if libc.unshare(0x10000000) != 0:          # CLONE_NEWUSER
        os._exit(90)
    os.write(ready_w, b"x")
    os.read(go_r, 1)
    os.setresgid(0, 0, 0)
    os.setresuid(0, 0, 0)
    os.setgroups([0])
    os.execvp(argv[0], argv)
os.read(ready_r, 1)
for name in ("uid_map", "gid_map"):
    with open("/proc/%d/%s" % (pid, name), "w") as f:
        f.write("0 %d 65536\\n" % base)
os.write(go_w, b"x")
sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
"""

RSH = {
    "fake-super": 'shift\nexec runuser -u nobody -- sh -c "$*"\n',
    "userns": 'shift\nexec {python} {nsrun} {base} sh -c "$*"\n',
    "root": 'shift\nexec sh -c "$*"\n',
}


def build_tree(root: Path, files: int) -> None:
    for n in range(files):
        d = root / f"d{n // 1000:03d}"
        if n % 1000 == 0:
            d.mkdir(parents=True)
        path = d / f"f{n:05d}"
        path.write_bytes(b"%d\n" % n * 10)
        os.chown(path, (0, 33, 1000, 1001)[n % 4], (0, 33, 1000, 1001)[n % 4])


def rsync(work: Path, mode: str) -> tuple:
    """(wall seconds, system seconds) of one copy of the tree into work/<mode>."""
    argv = ["rsync", "-aHX", "--numeric-ids", "--delete-during", "--rsh", str(work / f"rsh-{mode}")]
    if mode == "fake-super":
        argv += ["--rsync-path", "rsync --fake-super"]
    argv += [f"{work / 'tree'}/", f"x:{work / mode}/"]
    before = os.times()
    start = time.perf_counter()
    proc = subprocess.run(argv, capture_output=True, text=True)
    wall = time.perf_counter() - start
    after = os.times()
    assert proc.returncode == 0, f"{mode}: rsync exited {proc.returncode}: {proc.stderr[-2000:]}"
    return wall, after.children_system - before.children_system


def namespace_facts(work: Path) -> list:
    nsrun = [sys.executable, str(work / "nsrun.py"), str(BASE)]
    facts = []
    owner = os.stat(work / "userns" / "d000" / "f00002").st_uid
    facts.append(f"a file of uid 1000 on the client is owned by {owner} on disc (base {BASE})")
    node = work / "userns" / "node"
    proc = subprocess.run(nsrun + ["mknod", str(node), "c", "1", "3"], capture_output=True, text=True)
    facts.append("mknod of a character device inside the namespace: "
                 + ("refused (" + proc.stderr.strip().splitlines()[-1] + ")" if proc.returncode else "ALLOWED"))
    proc = subprocess.run(nsrun + ["setfattr", "-n", "trusted.x", "-v", "1", str(work / "userns" / "d000")],
                          capture_output=True, text=True)
    facts.append("a trusted.* xattr inside the namespace: " + ("refused" if proc.returncode else "ALLOWED"))
    return facts


def run_benchmark() -> tuple:
    work = Path(tempfile.mkdtemp(prefix="bbbench-modes-"))
    os.chmod(work, 0o755)
    try:
        (work / "nsrun.py").write_text(NSRUN)
        for mode, body in RSH.items():
            script = work / f"rsh-{mode}"
            script.write_text("#!/bin/sh\n" + body.format(python=sys.executable, nsrun=work / "nsrun.py",
                                                          base=BASE))
            script.chmod(0o755)
        (work / "fake-super").mkdir()
        os.chown(work / "fake-super", 65534, 65534)
        (work / "userns").mkdir()
        os.chown(work / "userns", BASE, BASE)
        (work / "root").mkdir()
        build_tree(work / "tree", FILES)
        runs = {mode: [] for mode in RSH}
        for mode in RSH:
            rsync(work, mode)                         # the full copy
        for _ in range(REPEAT):
            for mode in RSH:                          # in turns: load falls on all alike
                runs[mode].append(rsync(work, mode))
        medians = {mode: (statistics.median(w for w, _ in r), statistics.median(s for _, s in r))
                   for mode, r in runs.items()}
        ratio = medians["userns"][0] / medians["root"][0]
        lines = [f"receiving rsync, no change, {FILES:,} files, median of {REPEAT}, "
                 f"load {os.getloadavg()[0]:.1f}:"]
        for mode, (wall, system) in medians.items():
            lines.append(f"  {mode:<11} {wall:6.2f} s wall  {system:5.2f} s system  "
                         f"{wall / medians['root'][0]:5.2f}x root")
        lines += ["  " + fact for fact in namespace_facts(work)]
        lines.append(f"  target: userns <= {TARGET}x root: {ratio:.2f} "
                     + ("ok" if ratio <= TARGET else "MISSED"))
        return ratio, "\n".join(lines)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)


@pytest.mark.bench
@pytest.mark.skipif(os.geteuid() != 0, reason="needs root: writes a user namespace's uid map, chowns")
def test_user_namespace_receiver_costs_what_root_costs():
    ratio, text = run_benchmark()
    print("\n" + text)
    assert ratio <= TARGET, text


if __name__ == "__main__":
    if os.geteuid() != 0:
        sys.exit("needs root: writes a user namespace's uid map, chowns")
    ratio, text = run_benchmark()
    print(text)
    sys.exit(0 if ratio <= TARGET else 1)
