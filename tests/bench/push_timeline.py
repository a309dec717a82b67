"""Where a no-change push's time goes, beside raw rsync's, phase by phase (issue 14).

Run it with:   python3 tests/bench/push_timeline.py

It needs root and `perf` (Debian's linux-perf): the phases come from the
kernel's own exec and exit events (sched:sched_process_exec and
sched_process_exit, recorded system-wide), so no tracer slows the processes
timed, and newuidmap keeps its setuid bit (under ptrace it has none, and the
userns receiver fails).  The server and tree are test_receive_bench's: the
real setup-server (BENCH_RECEIVER, default userns here) and setup-client
over an sshd on 127.0.0.1, a tree of BENCH_FILES files (default 30,000) and
BENCH_MIB MiB (default 1,400).  After the first backup, BENCH_REPEAT
(default 3) no-change runs of each, taking turns, raw `rsync -aHX` first.

The phases of byteback's push, each from one event to the next:

  client start   the client's exec to its ssh master's exec (Python, config)
  ssh login      to the client rsync's exec (the master logs in; raw pays this)
  session        to the forced command's exec (a session over the master)
  server start   to the receiving rsync's exec (Python, the guard, the namespace)
  rsync          the receiving rsync's run
  after rsync    its exit to the client's (the snapshot, the answer)

and of raw rsync: login (to the receiving rsync's exec, through sudo), rsync,
after rsync; raw rsync twice: `-aHX` as test_receive_bench's targets count it,
and with the deletion a backup needs (`--delete-during --delete-excluded`, as
byteback's push has), whose scan of every destination directory is part of
what the receiving rsync's own phase costs more.  It prints medians; a
diagnosis, with no target to fail.
"""
from __future__ import annotations

import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Dict, List, NamedTuple, Optional

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "integration"), str(HERE.parent.parent)]
os.environ.setdefault("BENCH_RECEIVER", "userns")
import test_receive_bench as bench  # noqa: E402

EVENT = re.compile(r"^\s*(?P<comm>.+?)\s+(?P<pid>\d+)\s+(?P<time>\d+\.\d+):\s+sched:(?P<event>\w+):\s+(?P<trace>.*)$")
PUSH_PHASES = ("client start", "ssh login", "session", "server start", "rsync", "after rsync")
RAW_PHASES = ("login", "rsync", "after rsync")


class Process(NamedTuple):
    pid: int
    program: str           # the file exec'd
    start: float
    end: Optional[float]   # its exit, None if not seen


def processes(perf_script: str) -> List[Process]:
    """Every exec in `perf script` output with its process's exit, in the order of their execs."""
    execs, exits = [], {}
    for line in perf_script.splitlines():
        m = EVENT.match(line)
        if not m:
            continue
        trace = dict(w.split("=", 1) for w in m["trace"].split() if "=" in w)
        if m["event"] == "sched_process_exec":
            execs.append((int(trace["pid"]), trace["filename"], float(m["time"])))
        elif m["event"] == "sched_process_exit" and trace.get("group_dead") == "true":
            exits[int(trace["pid"])] = float(m["time"])
    # A process that execs twice (byteback.pyz, then the python3 it names) is one, from its first.
    first: Dict[int, tuple] = {}
    for pid, program, when in execs:
        first.setdefault(pid, (program, when))
    return [Process(pid, program, when, exits.get(pid)) for pid, (program, when) in first.items()]


def _missing(what: str) -> SystemExit:
    return SystemExit(f"perf recorded no {what}: its events were lost (a busy machine); run it again")


def _after(procs: List[Process], start: float, test, what: str) -> Process:
    found = next((p for p in procs if p.start >= start and test(p)), None)
    if found is None:
        raise _missing(what)
    return found


def _receiver(procs: List[Process], start: float, client: Process) -> Process:
    """The receiving rsync: the longest-lived other rsync exec'd after `start` that ended
    before the client did (not `rsync --version`)."""
    if client.end is None:
        raise _missing("exit of the client")
    found = [p for p in procs if p.start >= start and p.program.endswith("/rsync") and p.end
             and p.end <= client.end and p.pid != client.pid]
    if not found:
        raise _missing("receiving rsync")
    return max(found, key=lambda p: p.end - p.start)


def push_phases(procs: List[Process], client_pyz: str) -> Dict[str, float]:
    """Seconds of each of PUSH_PHASES in one recorded push."""
    client = _after(procs, 0, lambda p: p.program == client_pyz, "client")
    ssh = _after(procs, client.start, lambda p: p.program.endswith("/ssh"), "ssh")
    rsync = _after(procs, ssh.start, lambda p: p.program.endswith("/rsync"), "client rsync")
    forced = _after(procs, rsync.start, lambda p: p.program.endswith("byteback.pyz") and p.pid != client.pid,
                    "forced command")
    receiver = _receiver(procs, forced.start, client)
    marks = [client.start, ssh.start, rsync.start, forced.start, receiver.start, receiver.end, client.end]
    return dict(zip(PUSH_PHASES, (b - a for a, b in zip(marks, marks[1:]))))


def raw_phases(procs: List[Process]) -> Dict[str, float]:
    """Seconds of each of RAW_PHASES in one recorded raw rsync."""
    client = _after(procs, 0, lambda p: p.program.endswith("/rsync"), "client rsync")
    ssh = _after(procs, client.start, lambda p: p.program.endswith("/ssh"), "ssh")
    receiver = _receiver(procs, ssh.start, client)
    marks = [client.start, receiver.start, receiver.end, client.end]
    return dict(zip(RAW_PHASES, (b - a for a, b in zip(marks, marks[1:]))))


def recorded(argv: List[str], env: dict, cwd: str, work: Path) -> List[Process]:
    """The processes of one run of argv (which must succeed), from a system-wide perf record."""
    data = work / "perf.data"
    os.sync()
    run = subprocess.run(["perf", "record", "-q", "-a", "-e", "sched:sched_process_exec",
                          "-e", "sched:sched_process_exit", "-o", str(data), "--", *argv],
                         env=env, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    assert run.returncode == 0, f"{argv[0]} exited {run.returncode}:\n{run.stderr[-3000:]}"
    script = subprocess.run(["perf", "script", "-i", str(data), "-F", "comm,pid,time,event,trace"],
                            capture_output=True, text=True, check=True)
    return processes(script.stdout)


def main() -> int:
    if os.geteuid() != 0:
        sys.exit("needs root: a btrfs loop file, a throw-away user, an sshd, perf record -a")
    if not shutil.which("perf") or subprocess.run(["perf", "record", "-q", "-e", "sched:sched_process_exec",
                                                   "-o", "/dev/null", "--", "true"],
                                                  capture_output=True).returncode != 0:
        sys.exit("needs perf with the sched tracepoints (apt-get install linux-perf; as root)")
    work = Path(tempfile.mkdtemp(prefix="bbbench-timeline-"))
    os.chmod(work, 0o755)
    try:
        tree = work / "tree"
        tree.mkdir()
        bench.build_tree(tree, bench.FILES, bench.MIB)
        with bench.remote_byteback(store_size=f"{max(2048, bench.MIB * 4 + 1024)}M",
                                   receiver=bench.RECEIVER) as remote:
            remote.set_server_conf(min_interval="0")
            sudoers = Path("/etc/sudoers.d") / f"bbbench-{remote.env.user.name}"
            sudoers.write_text(f"{remote.env.user.name} ALL=(root) NOPASSWD: /usr/bin/rsync\n")
            os.chmod(sudoers, 0o440)
            try:
                runs = bench.Bench(remote, tree, work)
                runs.backup()
                raw_argv = ["rsync", "-aHX", "--numeric-ids", "-e", runs.rsh, "--rsync-path", "sudo -n rsync",
                            f"{tree}/", f"{runs.login}:raw-ahx/"]
                deleting_argv = raw_argv[:2] + ["--delete-during", "--delete-excluded"] + raw_argv[2:]
                recorded(raw_argv, runs.raw_env, str(work), work)        # the raw copy's first, untimed
                push_argv = [str(remote.pyz), "--config-dir", str(remote.client_config), "backup",
                             "--host", remote.host, "--source", str(tree)]
                raw, deleting, push = [], [], []
                for _ in range(bench.REPEAT):
                    raw.append(raw_phases(recorded(raw_argv, runs.raw_env, str(work), work)))
                    deleting.append(raw_phases(recorded(deleting_argv, runs.raw_env, str(work), work)))
                    push.append(push_phases(recorded(push_argv, runs.client_env, str(work), work), str(remote.pyz)))
            finally:
                sudoers.unlink(missing_ok=True)
    finally:
        subprocess.run(["rm", "-rf", str(work)], check=False)
    print(f"no-change runs, median of {bench.REPEAT}: {bench.FILES:,} files, receiver {bench.RECEIVER}, "
          f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}")
    for name, phases, rows in (("rsync -aHX", RAW_PHASES, raw),
                               ("rsync -aHX --delete-during --delete-excluded", RAW_PHASES, deleting),
                               ("byteback", PUSH_PHASES, push)):
        total = statistics.median(sum(r.values()) for r in rows)
        print(f"  {name}: {total:.3f} s")
        for phase in phases:
            print(f"    {phase:<14}{statistics.median(r[phase] for r in rows):8.3f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
