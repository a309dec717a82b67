"""Section 6: the fast deletion order against a reference written for reading, not speed.

host_deletion_order keeps a heap of gaps and a linked list of neighbours so
that each step costs O(log n).  The reference below is the rule itself, as
the README states it, recomputed from scratch at every step: if the two ever
disagree on a randomised store (the snapshot, its key, or the reason), the
fast one is wrong.
"""
from __future__ import annotations

import datetime as dt
from typing import Dict, List, Sequence

from hypothesis import given, settings
from hypothesis import strategies as st

import byteback
from unit_helpers import at

NOW = at(2026, 3, 31, 12, 0)


def reference_claims(ages: Sequence[float], targets: Sequence[float]) -> Dict[int, int]:
    """Each target, smallest first, takes the nearest snapshot not yet taken; a tie to the younger."""
    claims: Dict[int, int] = {}
    for k, target in enumerate(sorted(targets)):
        free = [i for i in range(len(ages)) if i not in claims]
        if free:
            claims[min(free, key=lambda i: (abs(target - ages[i]), i))] = k
    return claims


def reference_interval(ages: Sequence[float]) -> float:
    """The median spacing of the 8 youngest (ages youngest first; the upper of two middles)."""
    spacing = sorted(ages[j + 1] - ages[j] for j in range(min(len(ages), 8) - 1))
    return spacing[len(spacing) // 2] if spacing else 0.0


def reference_step(oldest_first: List[byteback.Snapshot], now: dt.datetime, targets, interval) -> tuple:
    """(key, snapshot, reason text) of the next deletion of one host, from scratch."""
    young = oldest_first[::-1]
    ages = [(now - s.when).total_seconds() / byteback.DAY for s in young]
    ordered = sorted(targets)
    claims = reference_claims(ages, ordered)
    last = len(young) - 1
    interior = range(1, last)
    # 1. holding no target: the smallest gap it leaves, seen from the backup one interval older
    #    than its younger neighbour, relative to that backup's age
    moment = [ages[i - 1] + interval if i > 0 else 0.0 for i in range(len(ages))]
    free = [((ages[i + 1] - moment[i]) / max(moment[i], 1e-9), ages[i], i) for i in interior if i not in claims]
    if free:
        score, age, i = min(free)
        return ((0, score, age), young[i],
                byteback._gap_reason(ages[i - 1], ages[i + 1], interval, score))
    # 2. holding a target: the least important (largest) target first, then the older
    held = [(-claims[i], -ages[i], i) for i in interior]
    if held:
        minus_k, minus_age, i = min(held)
        return ((1, minus_k, minus_age), young[i],
                byteback._target_reason(ordered[-minus_k], -minus_k, len(ordered)))
    # 3. the oldest, when only it and the newest are left
    return (2, 0.0, -ages[last]), young[last], byteback._oldest_reason()


def store_interval(snaps, now) -> float:
    """The interval of a host's snapshots as the store gives them, before any deletion."""
    return reference_interval(sorted((now - s.when).total_seconds() / byteback.DAY for s in snaps))


def reference_host_order(snaps, now, targets, order="importance", interval=None) -> list:
    left = sorted(snaps, key=lambda s: s.when)
    interval = store_interval(snaps, now) if interval is None else interval
    steps = []
    while len(left) > 1:
        if order == "age":
            age = (now - left[0].when).total_seconds() / byteback.DAY
            step = ((0, -age), left[0], byteback._age_reason(left[0].host, age))
        else:
            step = reference_step(left, now, targets, interval)
        steps.append(step)
        left.remove(step[1])
    return steps


def reference_deletion_order(snaps, now, targets, order="importance") -> list:
    """Across hosts: the most snapshots left first; ties by key, then the older snapshot, then the host."""
    by_host: Dict[str, list] = {}
    for s in snaps:
        by_host.setdefault(s.host, []).append(s)
    interval = {host: store_interval(left, now) for host, left in by_host.items()}
    result = []
    while any(len(v) > 1 for v in by_host.values()):
        most = max(len(v) for v in by_host.values())
        options = []
        for host, left in by_host.items():
            if len(left) == most:
                key, snap, reason = reference_host_order(left, now, targets, order, interval[host])[0]
                options.append((key, snap.when, host, snap, reason))
        key, _, host, snap, reason = min(options)
        by_host[host].remove(snap)
        if len(by_host) > 1:
            reason += f"; host {host} has the most snapshots ({most})"
        result.append((snap, reason))
    return result


def store(hours: List[int]) -> List[byteback.Snapshot]:
    """Snapshots of one host at the given hours before NOW (negative: a clock ahead); repeats allowed.

    Names are made unique by position, so two snapshots may share an instant
    as two names in different time zones can.
    """
    return [byteback.Snapshot("web1", f"s{j}", NOW - dt.timedelta(hours=h)) for j, h in enumerate(hours)]


# Stores that exercise every part: dense stretches (hours apart), sparse
# ones (months), repeats, a clock ahead, and target lists from none to many.
HOURS = st.one_of(st.integers(0, 48), st.integers(0, 24 * 400), st.integers(-30, 24 * 3000))
TARGETS = st.one_of(st.just(byteback.DEFAULT_TARGET_DAYS), st.just(byteback.ORIGINAL_TARGET_DAYS),
                    st.lists(st.floats(0, 400, allow_nan=False), max_size=12))


def assert_same_order(hours, targets):
    snaps = store(hours)
    fast = [(s.key, s.snapshot, s.reason.text())
            for s in byteback.host_deletion_order(snaps, now=NOW, targets=targets)]
    assert fast == reference_host_order(snaps, NOW, targets)


@settings(deadline=None, database=None)      # examples: the profile's (tests/conftest.py)
@given(st.lists(HOURS, min_size=0, max_size=40), TARGETS)
def test_host_order_is_the_reference_order(hours, targets):
    assert_same_order(hours, targets)


# The reference is O(n^3) a store: a few big ones, whatever the profile.
@settings(max_examples=30, deadline=None, database=None)
@given(st.lists(st.integers(0, 24 * 200), min_size=150, max_size=300), TARGETS)
def test_host_order_is_the_reference_order_on_larger_stores(hours, targets):
    assert_same_order(hours, targets)


@settings(deadline=None, database=None)
@given(st.lists(st.lists(HOURS, min_size=1, max_size=12), min_size=1, max_size=4), TARGETS,
       st.sampled_from(["importance", "age"]))
def test_deletion_order_across_hosts_is_the_reference_order(hours_by_host, targets, order):
    snaps = [byteback.Snapshot(f"h{i}", f"s{j}", NOW - dt.timedelta(hours=h))
             for i, hours in enumerate(hours_by_host) for j, h in enumerate(hours)]
    fast = [(d.snapshot, d.reason) for d in byteback.deletion_order(snaps, now=NOW, order=order, targets=targets)]
    assert fast == reference_deletion_order(snaps, NOW, targets, order)


def test_the_reference_agrees_with_the_hand_worked_table():
    # test_6_retention's 30 daily snapshots with the original targets: the
    # reference, too, takes 26, 24, 22, 20, 18, 16, 13, 11, 9, 25 first.
    snaps = store([24 * d for d in range(30)])
    ages = [round((NOW - s.when).total_seconds() / byteback.DAY)
            for _, s, _ in reference_host_order(snaps, NOW, byteback.ORIGINAL_TARGET_DAYS)]
    assert ages[:10] == [26, 24, 22, 20, 18, 16, 13, 11, 9, 25]


@settings(deadline=None, database=None)
@given(st.lists(st.lists(HOURS, min_size=1, max_size=12), min_size=1, max_size=5), TARGETS,
       st.sampled_from(["importance", "age"]))
def test_the_plan_without_history_deletes_in_the_reference_order(hours_by_host, targets, order):
    # With no history every snapshot counts as one unit, so fairness by bytes
    # is fairness by count: the plan, which works a host's steps out only when
    # that host comes to the top (or ties with it), must give the reference's order.
    # In the importance order the plan never deletes a host's oldest snapshot (its
    # first), which the reference takes last of that host's, when two are left.
    by_host = {f"h{i}": sorted((byteback.Snapshot(f"h{i}", f"s{j}", NOW - dt.timedelta(hours=h))
                                for j, h in enumerate(hours)), key=lambda s: s.when)
               for i, hours in enumerate(hours_by_host)}
    state = byteback.PruneState({h: byteback.HostFacts(tuple(v), ()) for h, v in by_host.items()}, 0, 1)
    config = byteback.ServerConfig(order=order, targets=tuple(targets))
    plan = [s.decision.snapshot for s in byteback.plan_prune(state, now=NOW, config=config).steps if s.decision]
    snaps = [s for v in by_host.values() for s in v]
    kept = {v[0] for v in by_host.values()} if order == "importance" else set()
    assert plan == [snap for snap, _ in reference_deletion_order(snaps, NOW, targets, order) if snap not in kept]


def test_remembered_serves_only_the_very_same_tuple():
    calls = []
    counted = byteback._remembered(lambda backups, **options: calls.append(options) or len(backups))
    history = ({"added": 1}, {"added": 2})
    assert counted(history, history_len=10) == 2 and counted(history, history_len=10) == 2
    assert len(calls) == 1                                  # the same tuple: remembered
    assert counted(tuple(dict(b) for b in history), history_len=10) == 2 and len(calls) == 2
    assert counted(history, history_len=5) == 2 and len(calls) == 3      # other options
    assert counted(list(history), history_len=10) == 2 and len(calls) == 4  # lists never
    assert counted(list(history), history_len=10) == 2 and len(calls) == 5


def reference_fair_steps(hosts, held, w, extra, room, means, free_for_claims, order, targets) -> list:
    """plan_prune's deletions between hosts, read off the rule by scanning every host at each step.

    Each host's own order is the reference's; the next deletion comes from the
    host with the smallest (-claim / weight, nothing-left before a step, the
    step's key, its snapshot's time, host).  A host whose next step is none (or,
    in the importance order, its oldest) leaves when it comes first: then the
    plan ends if no host left has a step, else it says stop if that host is over
    its fair share.  Steps: (snapshot, reason, over its share, bytes it frees),
    or (None, False, 0) for a stop."""
    keep_oldest = order == "importance"
    deletable, claims, todo, left = {}, {}, {}, {}
    for h, f in hosts.items():
        unit = max(1, int(means[h]))
        deletable[h] = {s.name: held[h].get(s.name, unit) for s in f.snapshots[1 if keep_oldest else 0:-1]}
        claims[h] = extra[h] + sum(deletable[h].values()) + room[h]
        todo[h] = reference_host_order(f.snapshots, NOW, targets, order)
        left[h] = len(f.snapshots) - (keep_oldest and len(f.snapshots) > 1)
    fair = (free_for_claims + sum(claims[h] - room[h] for h in hosts)) / (sum(w.values()) or 1.0)
    playing, out = set(hosts), []
    while playing:
        options = []
        for h in playing:
            step = todo[h][0] if todo[h] else None
            if step is None or (keep_oldest and step[1] == hosts[h].snapshots[0]):
                options.append((-claims[h] / w[h], 1, (), None, h, None))
            else:
                options.append((-claims[h] / w[h], 2, step[0], step[1].when, h, step))
        ratio, kind, _, _, h, step = min(options)
        if kind == 1:
            playing.remove(h)
            if all(left[g] < 2 for g in playing):
                break
            if -ratio > fair:
                out.append((None, False, 0))
            continue
        _, snap, reason = todo[h].pop(0)
        if len(hosts) > 1:
            reason += (f"; host {h} is the most over its share of the disc ({-ratio / fair:.0%} of it)"
                       if fair > 0 else f"; host {h} claims the most of the disc")
        freed = deletable[h].get(snap.name, 0)
        claims[h] -= freed
        left[h] -= 1
        out.append((snap, reason, -ratio > fair, freed))
    return out


# Small numbers, so that hosts tie on their share and steps tie on their keys.
BYTES = st.sampled_from([0, 1, 2, 5, 100])


@settings(deadline=None, database=None)
@given(st.lists(st.tuples(st.lists(HOURS, min_size=1, max_size=10), st.lists(st.one_of(st.none(), BYTES), max_size=10),
                          BYTES, BYTES, BYTES, st.sampled_from([0.5, 1.0, 1.0, 2.0])), min_size=1, max_size=5),
       st.integers(0, 20), TARGETS, st.sampled_from(["importance", "age"]))
def test_the_order_between_hosts_is_the_reference_order(hosts_drawn, free, targets, order):
    # _fair_steps on any claims, weights and recorded sizes (a None: the snapshot has no
    # history entry): the deletions, their reasons, whether each is over its share and what
    # it frees, and where the plan says stop, as the reference scans them out.
    facts, w, extra, room, means = {}, {}, {}, {}, {}
    for i, (hours, sizes, mean_bytes, extra_bytes, room_bytes, weight) in enumerate(hosts_drawn):
        h = f"h{i}"
        snaps = tuple(sorted((byteback.Snapshot(h, f"s{j}", NOW - dt.timedelta(hours=x)) for j, x in enumerate(hours)),
                             key=lambda s: s.when))
        history = tuple({"snapshot": s.name, "added": b, "size": 1000} for s, b in zip(snaps, sizes) if b is not None)
        facts[h] = byteback.HostFacts(snaps, history)
        w[h], extra[h], room[h], means[h] = weight, extra_bytes, room_bytes, mean_bytes
    state = byteback.PruneState(facts, free, 10 ** 6)
    views = byteback._host_views(facts, byteback.ServerConfig())
    fast = [(s.decision.snapshot, s.decision.reason, s.over_share, s.estimate) if s.decision else (None, False, 0)
            for s in byteback._fair_steps(state, views, lambda: w, extra, room, means, free, now=NOW,
                                          order=order, targets=targets)]
    held = {h: byteback.snapshot_bytes(f.history) for h, f in facts.items()}
    assert fast == reference_fair_steps(facts, held, w, extra, room, means, free, order, targets)
    # all(), what prune --list takes: every host's order at once, merged or sorted, the same steps
    everything = byteback._fair_steps(state, views, lambda: w, extra, room, means, free, now=NOW,
                                      order=order, targets=targets).all()
    assert [(s.decision.snapshot, s.decision.reason, s.over_share, s.estimate) if s.decision else (None, False, 0)
            for s in everything] == fast


def reference_table(listing, now) -> str:
    """prune --list's table, a line at a time: number (or '-' for a kept one), host, snapshot,
    age, place; every column but the last padded to its widest cell and two spaces."""
    rows = [("#", "host", "snapshot", "age", "place")] + [
        (str(n) if d.delete else "-", d.snapshot.host, d.snapshot.name,
         byteback._describe_age(byteback.age_days(d.snapshot, now)), d.reason) for n, d in enumerate(listing, 1)]
    widths = [max(len(row[c]) for row in rows) for c in range(4)]
    return "\n".join(("".join(cell + " " * (w + 2 - len(cell)) for cell, w in zip(row, widths)) + row[4]).rstrip()
                     for row in rows)


@settings(deadline=None, database=None)
@given(st.lists(st.tuples(st.lists(HOURS, min_size=0, max_size=10), st.lists(st.one_of(st.none(), BYTES), max_size=10)),
                min_size=1, max_size=5),
       st.integers(0, 20), TARGETS, st.sampled_from(["importance", "age"]))
def test_the_listing_is_the_plans_order_and_its_table_is_written_line_by_line(hosts_drawn, free, targets, order):
    # list_plan (what prune --list prints) on any store: every deletion of the plan in its
    # order with its reason, then what is kept, and a table as a line-by-line writer makes it.
    facts = {}
    for i, (hours, sizes) in enumerate(hosts_drawn):
        h = f"h{i}"
        snaps = tuple(sorted((byteback.Snapshot(h, f"s{j}", NOW - dt.timedelta(hours=x)) for j, x in enumerate(hours)),
                             key=lambda s: s.when))
        history = tuple({"snapshot": s.name, "added": b, "size": 1000} for s, b in zip(snaps, sizes) if b is not None)
        facts[h] = byteback.HostFacts(snaps, history)
    state = byteback.PruneState(facts, free, 10 ** 6)
    config = byteback.ServerConfig(order=order, targets=tuple(targets))
    plan, table = byteback.list_plan(state, config, now=NOW)
    listing = byteback.plan_listing(byteback.plan_prune(state, now=NOW, config=config), state)
    steps = [s.decision for s in byteback.plan_prune(state, now=NOW, config=config).steps if s.decision]
    assert listing[:len(steps)] == steps and not any(d.delete for d in listing[len(steps):])
    assert sorted(d.snapshot for d in listing) == sorted(s for f in facts.values() for s in f.snapshots)
    assert table == reference_table(listing, NOW)


def test_a_host_without_history_has_the_view_the_walks_give():
    # _host_views and _scan_history skip the walks for a host with no history entries (a
    # store of 1,000 such hosts spent most of its plan there): the same values as the walks.
    config = byteback.ServerConfig()
    snaps = tuple(store([30, 20, 10]))[::-1]
    for history in ((), []):
        view = byteback._host_views({"web1": byteback.HostFacts(snaps, history)}, config)["web1"]
        assert (view.counted, view.normal, view.share) == (
            byteback.counted_sizes(history, last=config.history), byteback.normal_backup(
                history, history=config.history, growth=config.normal_growth, floor=config.suspicion_floor / 4),
            byteback.normal_backup(history, history=config.history, growth=config.share_growth,
                                   floor=config.suspicion_floor / 4, key="share"))
        entries = view.entries
        assert (entries.by_name, entries.unaccepted, entries.held, entries.unique) == ({}, [], {}, True)
        assert byteback.snapshot_bytes(history) == {}
