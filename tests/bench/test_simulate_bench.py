"""Benchmark: 10 years of daily backups of 10 hosts, every built-in policy, in under 10 seconds.

Run it with:   python3 -m pytest -m bench tests/bench -s
or directly:   python3 tests/bench/test_simulate_bench.py   (prints the time of each policy)
It is a benchmark, not a unit test: pytest.ini leaves `bench` out unless asked.
"""
from __future__ import annotations

import os
import resource
import sys
import time

import pytest

LIMIT_SECONDS = 10.0
ARGV = ["--years", "10", "--hosts", "10"]


def _cpu() -> float:
    """CPU seconds of this process and its finished children (simulate's worker processes)."""
    own, children = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime + children.ru_utime + children.ru_stime


def measure() -> tuple:
    """(wall seconds for all policies as `simulate` runs them, CPU seconds, [(policy, seconds alone)])."""
    from simulate import cli, engine
    params = cli.params_from(cli.build_parser().parse_args(ARGV))
    chosen = cli.chosen_policies(cli.build_parser().parse_args(ARGV))
    start, cpu = time.perf_counter(), _cpu()
    workload, _ = cli.run_all(params, chosen)
    wall, cpu = time.perf_counter() - start, _cpu() - cpu
    alone = []
    if os.environ.get("BENCH_EACH"):
        for policy in chosen:
            t = time.perf_counter()
            engine.run_policy(params, workload, policy)
            alone.append((policy.name, time.perf_counter() - t))
    return wall, cpu, alone


@pytest.mark.bench
def test_ten_years_of_ten_hosts_in_under_ten_seconds():
    wall, cpu, _ = measure()
    print(f"\nsimulate {' '.join(ARGV)}: {wall:.1f}s wall, {cpu:.1f}s CPU, on {os.cpu_count()} CPUs "
          f"(load average {os.getloadavg()[0]:.1f})")
    assert wall < LIMIT_SECONDS, (
        f"simulate {' '.join(ARGV)} took {wall:.1f}s (limit {LIMIT_SECONDS:g}s); see where the "
        "time goes with: python3 tests/bench/test_simulate_bench.py (each policy alone), then "
        "python3 -m cProfile -s tottime -m simulate --years 1 --hosts 10 --jobs 1")


if __name__ == "__main__":
    sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "..")]
    os.environ.setdefault("BENCH_EACH", "1")
    total, cpu, each = measure()
    for name, seconds in each:
        print(f"{name:<16} {seconds:6.2f}s alone")
    print(f"all policies, {os.cpu_count()} CPUs: {total:.2f}s wall, {cpu:.1f}s CPU (limit {LIMIT_SECONDS:g}s wall)")
