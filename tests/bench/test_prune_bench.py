"""Benchmark: the order of deletion for a big server, built in memory.

Targets (issue 11), in CPU seconds, the best of three runs:
  what `prune --list` runs (list_plan: plan_prune, plan_listing and
  plan_table, the text it prints), 100 hosts x 1,000 snapshots           <= 1 s
  the same, 1,000 hosts x 100 snapshots                                  <= 1 s
  the first deletion of a real prune (the plan and its first step)       <= 0.05 s
The stores have no history (fairness by bytes is then fairness by count),
and reading them (store.snapshots(), a directory walk) is not counted: only
the pure retention code is.  Every run is timed as a prune process runs it:
it gets a state of its own, new objects as a prune reads them from the
store, and plan_prune's memory of the facts it saw last (simulate's cache)
and of age texts is emptied before it, so the run neither is served from it nor frees the
run before's store there (a prune process knows no earlier store); what the
run returns (the plan, and its first step or the table) is freed after its
time is taken: a prune holds its plan until its last deletion, and prune
--list frees its plan only after the table is printed.

Run it with:   python3 -m pytest -m bench tests/bench/test_prune_bench.py -s
or directly:   python3 tests/bench/test_prune_bench.py
"""
from __future__ import annotations

import datetime as dt
import os
import random
import sys
import time

import pytest

PLAN_LIMIT = 1.0
FIRST_LIMIT = 0.05
SIZES = [(100, 1000), (1000, 100)]
NOW = dt.datetime(2026, 3, 31, 12, 0, tzinfo=dt.timezone.utc)


def build_state(hosts: int, per_host: int, seed: int = 1):
    """Daily snapshots at a random time of the night, as cron takes them, for every host."""
    import byteback
    rnd = random.Random(seed)
    facts = {}
    for h in range(hosts):
        whens = sorted(NOW - dt.timedelta(days=day, minutes=rnd.randrange(600)) for day in range(per_host))
        facts[f"host{h}"] = byteback.HostFacts(
            tuple(byteback.Snapshot(f"host{h}", byteback.format_snapshot_name(w), w) for w in whens), ())
    return byteback.PruneState(facts, 0, 10 ** 12)


def fresh_process() -> None:
    """plan_prune's memory of the last facts (simulate's cache) and the age texts emptied, as in a
    new prune process."""
    import byteback
    byteback._HOST_VIEWS.clear()
    byteback._LAST_PLAN[0] = None
    byteback._DAYS_TEXT.clear()
    byteback._HOURS_TEXT.clear()


def best_of(runs: int, hosts: int, per_host: int, call) -> float:
    """The least CPU time of `runs` calls of call(state), each on a state built anew and in a
    fresh_process (not timed); what a call returns is freed after its time is taken."""
    times = []
    for _ in range(runs):
        state = build_state(hosts, per_host)
        fresh_process()
        start = time.process_time()
        result = call(state)
        times.append(time.process_time() - start)
        del result
    return min(times)


def prune_list(state) -> tuple:
    """What cmd_prune --list computes (list_plan): (the plan, the text it prints)."""
    import byteback
    return byteback.list_plan(state, byteback.ServerConfig(), now=NOW)


def first_deletion(state) -> tuple:
    """A prune's plan and its first step, which execute_plan deletes while it holds the plan."""
    import byteback
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    return plan, next(plan.steps)


def measure(hosts: int, per_host: int) -> tuple:
    """(seconds for what prune --list prints, seconds for the first deletion of a prune)."""
    text = prune_list(build_state(hosts, per_host))[1]
    assert text.count("\n") == hosts * per_host            # a header and a line per snapshot
    return best_of(3, hosts, per_host, prune_list), best_of(3, hosts, per_host, first_deletion)


@pytest.mark.bench
@pytest.mark.parametrize("hosts,per_host", SIZES)
def test_prune_plans_a_big_server_in_under_a_second(hosts, per_host):
    plan, first = measure(hosts, per_host)
    print(f"\n{hosts} hosts x {per_host} snapshots: prune --list {plan:.2f}s (limit {PLAN_LIMIT:g}s), "
          f"first deletion {first:.3f}s (limit {FIRST_LIMIT:g}s), CPU seconds, best of 3")
    assert plan <= PLAN_LIMIT, f"prune --list's plan took {plan:.2f}s for {hosts} x {per_host} (limit {PLAN_LIMIT:g}s)"
    assert first <= FIRST_LIMIT, (f"the first deletion took {first:.3f}s for {hosts} x {per_host} "
                                  f"(limit {FIRST_LIMIT:g}s)")


if __name__ == "__main__":
    sys.path[:0] = [os.path.join(os.path.dirname(__file__), "..", "..")]
    for size in SIZES:
        plan, first = measure(*size)
        print(f"{size[0]} hosts x {size[1]} snapshots: prune --list {plan:.2f}s, first deletion {first:.3f}s")
