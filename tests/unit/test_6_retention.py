"""Section 6: the pure retention core, with the expected orders written out by hand.

Snapshots are given as ages in days at a fixed `now` (noon), so every age is
an exact number and the tables can be checked with pencil and paper.  How
each expected order was reasoned out is written beside it.
"""
from __future__ import annotations

import datetime as dt

import pytest
from freezegun import freeze_time
from hypothesis import given, settings
from hypothesis import strategies as st

import byteback
from unit_helpers import at, snap_at, snaps_aged

NOW = at(2026, 3, 31, 12, 0)
DEFAULT = byteback.ORIGINAL_TARGET_DAYS   # the hand-worked tables below use the original targets


def deleted_ages(ages, order="importance", targets=DEFAULT, now=NOW):
    """The ages (days) of the deletions, first to go first, for one host."""
    decisions = byteback.deletion_order(snaps_aged("web1", now, ages), now=now, order=order,
                                        targets=targets)
    return [round(byteback.age_days(d.snapshot, now), 4) for d in decisions]


# -- claim_targets: each target, smallest first, takes the nearest unclaimed snapshot --

@pytest.mark.parametrize("ages,targets,claims", [
    # one snapshot on every target: each takes its own
    ([0, 1, 2, 3, 7, 14, 21, 28, 56, 112], DEFAULT, {i: i for i in range(10)}),
    # 0->0, 1->1d, 2->2d, 3->3d; 7 then takes the only one left, the 6-hour-old
    ([0, 0.25, 1, 2, 3], DEFAULT, {0: 0, 2: 1, 3: 2, 4: 3, 1: 4}),
    # more targets than snapshots: the rest stay unheld
    ([0.1, 5], (0, 1, 2), {0: 0, 1: 1}),
    # a tie goes to the younger snapshot
    ([1, 2], (1.5,), {0: 0}),
    # targets are taken smallest first, whatever order they come in; k indexes the sorted list
    ([0, 10, 20], (12, 0), {0: 0, 1: 1}),
    # 7 takes 6 (a tie with 8: the younger); 7.5 then skips it and takes 8
    ([0, 6, 8], (7, 7.5), {1: 0, 2: 1}),
    # 30 daily snapshots: 0..3, 7, 14, 21, 28 on the mark; 56 takes the oldest (29),
    # and 112 the oldest still free (27)
    (list(range(30)), DEFAULT, {0: 0, 1: 1, 2: 2, 3: 3, 7: 4, 14: 5, 21: 6, 28: 7, 29: 8, 27: 9}),
    ([], DEFAULT, {}),
])
def test_claim_targets(ages, targets, claims):
    assert byteback.claim_targets(ages, targets) == claims


# -- deletion_order, one host --

def test_age_order_deletes_oldest_first_and_never_the_newest():
    assert deleted_ages(range(30), order="age") == [float(a) for a in range(29, 0, -1)]


def test_age_order_sorts_by_instant_not_by_name():
    # 01:00-0100 is 02:00Z and 01:30+0100 is 00:30Z: by name the first sorts
    # first, but the second is the older snapshot.
    older = byteback.Snapshot("web1", "2026-03-29T01:30+0100", byteback.parse_snapshot_name("2026-03-29T01:30+0100"))
    newer = byteback.Snapshot("web1", "2026-03-29T01:00-0100", byteback.parse_snapshot_name("2026-03-29T01:00-0100"))
    newest = snap_at("web1", at(2026, 3, 30, 3, 0))
    order = [d.snapshot.name for d in byteback.deletion_order([newest, newer, older], now=NOW, order="age")]
    assert order == ["2026-03-29T01:30+0100", "2026-03-29T01:00-0100"]


def test_importance_30_daily_snapshots_first_deletions():
    # Claims (see test_claim_targets): 0,1,2,3,7,14,21,28 on their marks, 29
    # holds 56, 27 holds 112.  The rest hold nothing and go first, by
    # gap_score: with kept neighbours y (younger) and o (older) and the
    # backup interval s (1 day: the youngest are a day apart), the backup
    # y + s days old would look back to o, so score = (o - y - s) / (y + s).
    # Between daily neighbours that is (2 - 1) / i = 1/i: 26 goes first (1/26).
    # Then, each time over what is left:
    #   24: 1/24 = .042  (25's neighbours are now 24, 27: (27-24-1)/25 = .08; 23: 1/23 = .043)
    #   22: 1/22 = .045  (25 now (27-23-1)/24 = .125, 23 now (25-22-1)/23 = .087)
    #   20: 1/20 = .050  (23 now (25-21-1)/22 = .136; 19: 1/19 = .053)
    #   18: 1/18 = .056  (19 now (21-18-1)/19 = .105; 17: 1/17 = .059)
    #   16: 1/16 = .063  (19 now (21-17-1)/18 = .167, 17 now (19-16-1)/17 = .118)
    #   13: 1/13 = .077  (17 now (19-15-1)/16 = .188, 15 now (17-14-1)/15 = .133; 12: 1/12 = .083)
    #   11: 1/11 = .091  (12 now (14-11-1)/12 = .167; 10: 1/10 = .1)
    #    9: 1/9  = .111  (10 now (12-9-1)/10 = .2, 12 now (14-10-1)/11 = .273; 8: 1/8 = .125)
    #   25: 3/24 = .125  (8 now (10-7-1)/8 = .25, 10 now (12-8-1)/9 = .333; 15: .133, 23: .136)
    # (The rule before divided the gap by the candidate's own age, 2/i:
    # 26, 24, 22, 20, 18, 16, 13, then 25 (4/25 = .16) before 11 (2/11 = .18).)
    assert deleted_ages(range(30))[:10] == [26, 24, 22, 20, 18, 16, 13, 11, 9, 25]


def test_backup_interval_is_the_median_spacing_of_the_youngest_eight():
    # Spacings of the 8 youngest: 1, 1, 2 (a failed night), 1, 1, 1, 0.25 (a backup by
    # hand): sorted .25, 1, 1, 1, 1, 1, 2, the middle is 1.  The older ones (30 days
    # apart) do not count: deletions have thinned them.
    assert byteback.backup_interval([0, 1, 2, 4, 5, 6, 7, 7.25, 37, 67]) == 1
    # Two spacings, 1 and 3: the upper middle, as for any even count.
    assert byteback.backup_interval([0, 1, 4]) == 3
    assert byteback.backup_interval([5]) == 0.0 and byteback.backup_interval([]) == 0.0
    # gap_score: neighbours 2 and 10 days old, a daily interval: the backup 3 days
    # old would be 7 days after the 10-day-old: 7/3.
    assert byteback.gap_score(2.0, 5.0, 10.0, 1.0) == 7 / 3


def test_importance_deletes_every_snapshot_without_a_target_before_any_with_one():
    order = deleted_ages(range(30))
    unheld = set(range(30)) - {0, 1, 2, 3, 7, 14, 21, 28, 29, 27}
    assert len(order) == 29
    assert set(order[:20]) == unheld
    # then those holding targets, least important target first: 27 holds 112 days
    assert order[20] == 27


def test_importance_120_daily_snapshots_first_deletions():
    # Now every target has a snapshot on its mark, and the oldest (119) holds
    # none: it is kept for last.  Unheld ones go by gap_score, (o - y - 1) / (y + 1)
    # (the interval is 1 day), which is 1/i between daily neighbours:
    #   118: 1/118 = .00847 (its neighbours 117 and 119)
    #   116: 1/116 = .00862 (117 now (119-116-1)/117 = .0171; 115: 1/115 = .00870)
    #   114: 1/114 = .00877 (115 now (117-114-1)/115 = .0174; 113: 1/113 = .00885)
    #   111: 1/111 = .00901 (113 now (115-112-1)/113 = .0177; 112 holds a target; 110: 1/110 = .00909)
    order = deleted_ages(range(120))
    assert order[:4] == [118, 116, 114, 111]
    held = {0, 1, 2, 3, 7, 14, 21, 28, 56, 112}
    assert set(order[:109]) == set(range(120)) - held - {119}
    assert order[109] == 112                         # the least important target held


def test_importance_120_daily_the_oldest_goes_last():
    assert deleted_ages(range(120))[109:] == [112, 56, 28, 21, 14, 7, 3, 2, 1, 119]


def test_importance_a_six_hour_old_snapshot_goes_before_the_daily_ones():
    # 0 on its mark, 1/2/3 days on theirs, and the 6-hour-old holds only the
    # 7-day mark, the least important held: it goes first.  Age order would
    # take the 3-day-old.
    assert deleted_ages([0, 0.25, 1, 2, 3])[0] == 0.25
    assert deleted_ages([0, 0.25, 1, 2, 3], order="age")[0] == 3


@pytest.mark.parametrize("ages,expected", [
    # 0.25 first (holds the 7-day mark); of 1, 2, 3 the oldest stays: 2 (2-day
    # mark) before 1 (1-day mark); the oldest, 3, last.  (Before the fix the
    # oldest went by its target's rank: [0.25, 3, 2, 1], age order after one step.)
    ([0, 0.25, 1, 2, 3], [0.25, 2, 1, 3]),
    # 2 (2-day mark) before 1 (1-day mark); 40, the oldest, last although it
    # is the one nearest to the 56-day mark
    ([0, 1, 2, 40], [2, 1, 40]),
])
def test_importance_keeps_the_oldest_for_last(ages, expected):
    assert deleted_ages(ages) == expected


def test_importance_30_daily_the_oldest_goes_last():
    # After the 20 unheld ones: the held targets from the least important
    # (27 holds 112) down to the 1-day mark, and the oldest (29) last.
    assert deleted_ages(range(30))[20:] == [27, 28, 21, 14, 7, 3, 2, 1, 29]


def test_importance_custom_targets():
    # targets 0 and 10: 0 on its mark, 10 takes 10; the others (5, 8, 12)
    # hold nothing.  The interval is the median spacing (5, 3, 2, 2 sorted:
    # 2, 2, 3, 5; the upper middle, 3 days).  Scores (o - y - 3) / (y + 3):
    # 5: (8-0-3)/3 = 1.67; 8: (10-5-3)/8 = .25; 12 is the oldest and goes
    # last.  So 8, then 5 ((10-0-3)/3 = 2.33), then 10 (holding a target), then 12.
    assert deleted_ages([0, 5, 8, 10, 12], targets=(0, 10)) == [8, 5, 10, 12]


def test_a_single_snapshot_is_never_deleted():
    assert deleted_ages([3]) == []
    assert deleted_ages([3], order="age") == []
    assert list(byteback.deletion_order([], now=NOW)) == []


def test_an_unknown_order_is_refused():
    with pytest.raises(ValueError, match="unknown prune order 'random'"):
        list(byteback.deletion_order(snaps_aged("web1", NOW, [0, 1]), now=NOW, order="random"))


# -- host_deletion_order: one host's steps, with the key deletion_order compares --

def test_host_deletion_order_is_one_hosts_deletion_order_with_keys():
    snaps = snaps_aged("web1", NOW, range(30))
    steps = list(byteback.host_deletion_order(snaps, now=NOW, targets=DEFAULT))
    decisions = list(byteback.deletion_order(snaps, now=NOW, targets=DEFAULT))
    assert [s.snapshot for s in steps] == [d.snapshot for d in decisions]
    assert [s.reason.text() for s in steps] == [d.reason for d in decisions]
    # 26 goes first with score (27-25-1)/(25+1) = 1/26 (see the 30-daily table
    # above); the unheld ones have class 0, those holding targets class 1, the oldest 2.
    assert steps[0].key == (0, 1 / 26, 26.0)
    assert [s.key[0] for s in steps] == [0] * 20 + [1] * 8 + [2]
    assert steps[20].key == (1, -9, -27.0)      # 27 holds the 10th target, 112 days


def test_host_deletion_order_reasons_are_values_until_read():
    step = next(byteback.host_deletion_order(snaps_aged("web1", NOW, [0, 1, 2, 4]), now=NOW, targets=(0, 2)))
    # 0 and 2 hold targets, 4 is the oldest; 1 holds none.  The interval is 1
    # day (spacings 1, 1, 2: the middle); without 1 the backup of 0 + 1 days
    # ago is 2 - 1 = 1 day after the snapshot before it (2), 1/1 = 1.00 of its age.
    assert step.reason.values == (0.0, 2.0, 1.0, 1.0)
    assert step.reason.text() == ("importance: nearest to no target age; without it the backup of "
                                  "1d 0h ago is 1d 0h after the snapshot before it (1.00 of its age)")
    # Snapshots closer than the interval: 2.25 (between 2 and 3; the interval is
    # 1: spacings 1, 1, .25, .75) leaves (3 - 2 - 1)/(2 + 1) = 0, no gap a backup would see.
    dense = next(byteback.host_deletion_order(snaps_aged("web1", NOW, [0, 1, 2, 2.25, 3]), now=NOW,
                                              targets=(0,)))
    assert round(byteback.age_days(dense.snapshot, NOW), 2) == 2.25 and dense.key[1] == 0.0
    assert dense.reason.text() == ("importance: nearest to no target age; without it no backup is "
                                   "further than the backup interval (1d 0h) from the snapshot before it")
    age = next(byteback.host_deletion_order(snaps_aged("web1", NOW, [0, 2]), now=NOW, order="age"))
    assert age.key == (0, -2.0) and age.reason.text() == "age: the oldest snapshot of host web1 (2d 0h old)"


def test_host_deletion_order_takes_snapshots_in_any_order():
    snaps = snaps_aged("web1", NOW, [0, 4, 1, 9, 2])
    assert ([s.snapshot for s in byteback.host_deletion_order(snaps[::-1], now=NOW)]
            == [s.snapshot for s in byteback.host_deletion_order(snaps, now=NOW)])
    with pytest.raises(ValueError, match="unknown prune order 'random'"):
        next(byteback.host_deletion_order(snaps, now=NOW, order="random"))


# -- fairness between hosts --

def _two_hosts():
    return snaps_aged("a", NOW, range(10)) + snaps_aged("b", NOW, [0, 5, 20])


def test_age_order_is_fair_between_hosts():
    # a has 10, b has 3: a loses its oldest until both have 3 (9..3).  Then a
    # tie: the host whose candidate is older goes (b's 20 days against a's 2),
    # then whoever has more, and so on, until each keeps only its newest.
    order = [(d.snapshot.host, round(byteback.age_days(d.snapshot, NOW)))
             for d in byteback.deletion_order(_two_hosts(), now=NOW, order="age")]
    assert order == [("a", 9), ("a", 8), ("a", 7), ("a", 6), ("a", 5), ("a", 4), ("a", 3),
                     ("b", 20), ("a", 2), ("b", 5), ("a", 1)]


@pytest.mark.parametrize("order", ["importance", "age"])
def test_no_host_is_stripped_while_another_keeps_many(order):
    counts = {"a": 10, "b": 3}
    hosts = []
    for d in byteback.deletion_order(_two_hosts(), now=NOW, order=order):
        assert counts[d.snapshot.host] == max(counts.values())     # always from a fullest host
        counts[d.snapshot.host] -= 1
        hosts.append(d.snapshot.host)
    assert hosts[:7] == ["a"] * 7
    assert sorted(hosts[7:9]) == ["a", "b"] and sorted(hosts[9:]) == ["a", "b"]
    assert counts == {"a": 1, "b": 1}


def test_several_hosts_reason_says_which_host_had_the_most():
    first = next(byteback.deletion_order(_two_hosts(), now=NOW, order="age"))
    assert first.reason == "age: the oldest snapshot of host a (9d 0h old); host a has the most snapshots (10)"


@settings(max_examples=60, deadline=None, database=None)
@given(st.lists(st.lists(st.integers(0, 400 * 24), min_size=1, max_size=15, unique=True),
                min_size=1, max_size=3),
       st.sampled_from(["importance", "age"]))
def test_deletion_order_invariants(hours_by_host, order):
    snaps = [snap_at(f"h{i}", NOW - dt.timedelta(hours=h))
             for i, hours in enumerate(hours_by_host) for h in hours]
    newest = {max((s for s in snaps if s.host == h), key=lambda s: s.when) for h in {s.host for s in snaps}}
    counts = {h: sum(1 for s in snaps if s.host == h) for h in {s.host for s in snaps}}
    seen = set()
    for d in byteback.deletion_order(snaps, now=NOW, order=order):
        assert d.delete and d.reason
        assert d.snapshot not in newest and d.snapshot not in seen
        assert counts[d.snapshot.host] == max(counts.values())
        counts[d.snapshot.host] -= 1
        seen.add(d.snapshot)
    assert seen == set(snaps) - newest


# -- plan_listing: every snapshot once, deletions in order, keeps last --

def listing(snaps, order="importance", targets=DEFAULT):
    """What prune --list prints for these snapshots, with no history (fairness by count)."""
    by_host = {}
    for snap in sorted(snaps, key=lambda s: s.when):
        by_host.setdefault(snap.host, []).append(snap)
    state = byteback.PruneState({h: byteback.HostFacts(tuple(v), ()) for h, v in by_host.items()}, 0, 1)
    config = byteback.ServerConfig(order=order, targets=tuple(targets))
    return byteback.plan_listing(byteback.plan_prune(state, now=NOW, config=config), state)


def test_plan_listing_lists_every_snapshot_once_with_keeps_last():
    # importance: every host keeps its newest and its oldest (its first)
    snaps = snaps_aged("web1", NOW, [0, 1, 2, 5, 9]) + snaps_aged("db1", NOW, [0.5, 3])
    plan = listing(snaps, order="importance")
    assert sorted(d.snapshot for d in plan) == sorted(snaps)
    assert [d.delete for d in plan] == [True] * 3 + [False] * 4
    oldest = {snaps[0], snaps[5]}                  # snaps_aged lists each host oldest first
    assert [d.snapshot for d in plan[:3]] == [d.snapshot for d in byteback.deletion_order(
        snaps, now=NOW, order="importance") if d.snapshot not in oldest]
    kept = plan[3:]
    assert [(d.snapshot.host, round(byteback.age_days(d.snapshot, NOW), 2)) for d in kept] == [
        ("db1", 3.0), ("db1", 0.5), ("web1", 9.0), ("web1", 0.0)]
    assert [d.reason for d in kept] == ["kept: the oldest snapshot of host db1",
                                        "kept: the newest snapshot of host db1",
                                        "kept: the oldest snapshot of host web1",
                                        "kept: the newest snapshot of host web1"]
    # age: the oldest first, only the newest kept
    plan = listing(snaps, order="age")
    assert [d.delete for d in plan] == [True] * 5 + [False] * 2
    assert [d.snapshot for d in plan[:5]] == [d.snapshot for d in byteback.deletion_order(
        snaps, now=NOW, order="age")]
    assert [d.reason for d in plan[5:]] == ["kept: the newest snapshot of host db1",
                                            "kept: the newest snapshot of host web1"]


def test_plan_listing_reasons_are_sentences_a_sysadmin_can_read():
    plan = listing(snaps_aged("web1", NOW, range(30)))
    for d in plan:
        assert isinstance(d.reason, str) and len(d.reason) > 20 and " " in d.reason
        assert "\n" not in d.reason
    by_age = {round(byteback.age_days(d.snapshot, NOW)): d.reason for d in plan}
    # (27 - 25 - 1) / (25 + 1) = 1/26 = .038
    assert by_age[26].startswith("importance: nearest to no target age; without it the backup of "
                                 "26d 0h ago is 1d 0h after the snapshot before it (0.04 of its age)")
    assert "holds the 112-day mark" in by_age[27]
    assert by_age[0] == "kept: the newest snapshot of host web1"


def test_plan_listing_of_nothing_is_empty():
    assert listing([]) == []


def test_plan_listing_with_no_fair_share_names_the_host_that_claims_the_most():
    # A full disc (no free bytes) and histories that recorded nothing added: every claim,
    # hence the fair share, is 0.  prune --list still lists the order, saying which host
    # claims the most of the disc (dividing by the fair share of 0 was a ZeroDivisionError).
    snaps = {h: tuple(snaps_aged(h, NOW, [0, 1, 2, 5])) for h in ("db1", "web1")}
    history = {h: tuple({"snapshot": s.name, "added": 0, "size": 10} for s in v) for h, v in snaps.items()}
    state = byteback.PruneState({h: byteback.HostFacts(v, history[h]) for h, v in snaps.items()}, 0, 100)
    plan, table = byteback.list_plan(state, byteback.ServerConfig(), now=NOW)
    deleted = [line for line in table.splitlines()[1:] if not line.startswith("-")]
    assert len(deleted) == 4
    assert all(line.endswith(("; host db1 claims the most of the disc", "; host web1 claims the most of the disc"))
               for line in deleted)


@pytest.mark.parametrize("collecting", [True, False])
def test_the_plans_steps_leave_the_collector_as_it_was_at_every_step(collecting):
    # _fair_steps pauses the cyclic collector while it resolves the hosts that tie, never
    # across a yield: whoever takes a step (and stops there) finds it as it was.
    import gc
    # Hosts of different sizes tie again after deletions, so the pause comes at later
    # steps too, not only before the first.
    ages = {"db1": [0, 1, 2, 5, 9, 20], "web1": [0, 1, 3], "mail": [0, 1, 2, 4, 8, 16, 30, 60]}
    snaps = {h: tuple(snaps_aged(h, NOW, a)) for h, a in ages.items()}
    state = byteback.PruneState({h: byteback.HostFacts(v, ()) for h, v in snaps.items()}, 0, 1)
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        steps = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig()).steps
        first = next(steps)
        assert first.decision is not None and gc.isenabled() == collecting
        taken = [first] + [s for s in steps if gc.isenabled() == collecting]
        assert len(taken) == 4 + 1 + 6               # all of each host's but its newest and oldest
        assert gc.isenabled() == collecting
        steps = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig()).steps
        next(steps)
        steps.close()                                # a prune that stops after its first deletion
        assert gc.isenabled() == collecting
    finally:
        (gc.enable if was else gc.disable)()


@pytest.mark.parametrize("collecting", [True, False])
def test_list_plan_is_the_table_of_the_listing_and_leaves_the_collector_as_it_was(collecting):
    import gc
    snaps = snaps_aged("web1", NOW, [0, 1, 2, 5, 9]) + snaps_aged("db1", NOW, [0.5, 3, 40])
    by_host = {h: tuple(s for s in snaps if s.host == h) for h in ("web1", "db1")}
    state = byteback.PruneState({h: byteback.HostFacts(v, ()) for h, v in by_host.items()}, 0, 1)
    config = byteback.ServerConfig()
    was = gc.isenabled()
    (gc.enable if collecting else gc.disable)()
    try:
        plan, table = byteback.list_plan(state, config, now=NOW)
        assert gc.isenabled() == collecting
    finally:
        (gc.enable if was else gc.disable)()
    expected = byteback.plan_listing(byteback.plan_prune(state, now=NOW, config=config), state)
    assert table == byteback.plan_table(expected, NOW)
    lines = table.splitlines()
    assert lines[0].split() == ["#", "host", "snapshot", "age", "place"] and len(lines) == 1 + len(snaps)
    assert lines[1].startswith("1  ") and lines[-1].startswith("-  web1 ") and lines[-1].endswith(
        "kept: the newest snapshot of host web1")
    assert plan.target == byteback.plan_prune(state, now=NOW, config=config).target


# -- free_space_target --

@pytest.mark.parametrize("sizes,headroom,history,target", [
    ({"web1": [100, 200, 300]}, 1.5, 10, 300),                 # 1.5 x mean 200
    ({"web1": [100, 300], "db1": [1000]}, 1.5, 10, 1800),       # 1.5 x (200 + 1000)
    ({"web1": [10 ** 9, 10, 20]}, 1.5, 2, 22),                  # only the last 2: 1.5 x 15 = 22.5
    ({"web1": [100] * 5 + [400] * 10}, 1.5, 10, 600),           # the window drops the old 100s
    ({"web1": [100, 200]}, 2.0, 10, 300),
    ({"web1": []}, 1.5, 10, 0),                                 # no history yet
    ({"web1": [], "db1": [50]}, 1.5, 10, 75),
    ({}, 1.5, 10, 0),
])
def test_free_space_target(sizes, headroom, history, target):
    assert byteback.free_space_target(sizes, headroom=headroom, history=history) == target


# -- is_suspicious --

@pytest.mark.parametrize("added,prior,suspicious", [
    (10 ** 12, [], False),                  # a first backup is large by nature
    (10 ** 12, [100], False),
    (10 ** 12, [100, 100], False),          # fewer than 3 prior: never
    (300, [100, 100, 100], False),          # exactly at 3 x the median: allowed
    (301, [100, 100, 100], True),           # just above
    (10 ** 12, [100, 100, 100], True),
    (0, [100, 100, 100], False),
    (301, [10 ** 9, 100, 100, 100], True),  # with history=3 only the last 3 count
    (301, [100, 10 ** 9, 100], True),       # one earlier huge backup does not move the median
    (751, [100, 200, 300, 400], True),      # an even count: the median is (200 + 300) / 2
    (750, [100, 200, 300, 400], False),
])
def test_is_suspicious(added, prior, suspicious):
    assert byteback.is_suspicious(added, prior, factor=3, history=3 if len(prior) != 4 else 4) is suspicious


def test_a_one_percent_backup_after_ten_quiet_days_is_not_suspicious():
    # Seen: after no-change backups the median is 0 and every ordinary backup was suspicious.
    backups = [{"added": 0, "size": 10 ** 9}] * 10
    floor = byteback.suspicion_floor_bytes(backups, fraction=0.02, history=10)
    assert floor == 0.02 * 10 ** 9
    assert not byteback.is_suspicious(10 ** 7, [0] * 10, factor=3, history=10, floor=floor)
    assert byteback.is_suspicious(10 ** 7, [0] * 10, factor=3, history=10)        # without a floor
    assert byteback.is_suspicious(2 * 10 ** 7 + 1, [0] * 10, factor=3, history=10, floor=floor)


def test_the_suspicion_floor_takes_the_smallest_recent_size():
    # One backup of a huge sparse file costs the client nothing: it must not lift the floor.
    backups = [{"added": 1, "size": 1000}, {"added": 1, "size": 10 ** 15}, {"added": 1}]
    assert byteback.suspicion_floor_bytes(backups, fraction=0.5, history=10) == 500
    assert byteback.suspicion_floor_bytes(backups[1:], fraction=0.5, history=10) == 0.5 * 10 ** 15
    assert byteback.suspicion_floor_bytes([], fraction=0.5, history=10) == 0.0


def test_is_suspicious_uses_the_whole_window():
    # history=10: all four count, and the median of 100, 100, 100, 10**9 is 100
    assert byteback.is_suspicious(301, [10 ** 9, 100, 100, 100], factor=3, history=10)
    assert not byteback.is_suspicious(301, [10 ** 9, 10 ** 9, 10 ** 9, 100], factor=3, history=10)


def test_counted_sizes_skips_suspicious_backups_until_accepted():
    backups = [{"added": 100}, {"added": 5000, "suspicious": True},
               {"added": 7000, "suspicious": True, "accepted": True},
               {"added": 300, "suspicious": False}, {"size": 9}]
    assert byteback.counted_sizes(backups) == [100, 7000, 300, 0]


# -- interval_refusal --

NEWEST = snap_at("web1", at(2026, 3, 1, 3, 0))


@pytest.mark.parametrize("now,refused", [
    (at(2026, 3, 1, 3, 0), True),
    (at(2026, 3, 1, 8, 59, 59), True),       # 5h 59m 59s
    (at(2026, 3, 1, 9, 0, 0), False),        # exactly 6h: allowed
    (at(2026, 3, 1, 9, 0, 1), False),
    (at(2026, 3, 8, 3, 0), False),
])
def test_interval_refusal_at_the_edge(now, refused):
    result = byteback.interval_refusal(NEWEST, now, 6 * 3600)
    assert (result is not None) is refused


def test_interval_refusal_says_how_long_to_wait():
    message = byteback.interval_refusal(NEWEST, at(2026, 3, 1, 8, 59, 59), 6 * 3600)
    assert message == ("host web1: the newest snapshot 2026-03-01T03:00+0000 is 5h 59m old and the "
                       "minimum interval is 6h 0m; the next snapshot can be taken in 1s")
    message = byteback.interval_refusal(NEWEST, at(2026, 3, 1, 5, 0), 6 * 3600)
    assert message.endswith("the next snapshot can be taken in 4h 0m")


def test_interval_refusal_without_a_snapshot_allows():
    assert byteback.interval_refusal(None, NOW, 6 * 3600) is None


def test_interval_refusal_compares_instants_across_time_zones():
    # 2026-03-01T04:00+0100 is 03:00Z: 6h later is 09:00Z whatever the zone
    newest = byteback.Snapshot("web1", "2026-03-01T04:00+0100",
                               byteback.parse_snapshot_name("2026-03-01T04:00+0100"))
    edge = dt.datetime(2026, 3, 1, 10, 0, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert byteback.interval_refusal(newest, edge - dt.timedelta(seconds=1), 6 * 3600) is not None
    assert byteback.interval_refusal(newest, edge, 6 * 3600) is None


def test_now_local_reads_the_clock_at_the_cli_boundary():
    # The pure core takes `now`; now_local() is where the real clock is read.
    with freeze_time("2026-03-01 08:59:59", tz_offset=0):
        now = byteback.now_local()
        assert now == at(2026, 3, 1, 8, 59, 59)
        assert byteback.interval_refusal(NEWEST, now, 6 * 3600) is not None
    with freeze_time("2026-03-01 09:00:00", tz_offset=0):
        assert byteback.interval_refusal(NEWEST, byteback.now_local(), 6 * 3600) is None


def test_describe_age():
    assert byteback._describe_age(0.01) == "under an hour"
    assert byteback._describe_age(1.5) == "1d 12h"


def _described_afresh(days: float) -> str:
    """_describe_age's rule written out: 'under an hour', else format_duration of its whole seconds."""
    return "under an hour" if days < 1 / 24 else byteback.format_duration(int(max(0, days * byteback.DAY)))


@settings(deadline=None, database=None)
@given(st.lists(st.one_of(st.floats(-3, 3, allow_nan=False), st.floats(0, 4000, allow_nan=False),
                          st.integers(-48, 24 * 4000).map(lambda h: h / 24)), max_size=40),
       st.booleans())
def test_ages_are_described_as_one_by_one_with_the_known_hours_looked_up(ages, forget):
    # Whether each hour's text is known already or not (a fresh process, or the cache
    # emptied): the same text as _describe_age's rule gives, whole hours and edges included.
    if forget:
        byteback._DAYS_TEXT.clear()
        byteback._HOURS_TEXT.clear()
    assert byteback._describe_ages(ages) == [_described_afresh(a) for a in ages]
    assert [byteback._describe_age(a) for a in ages] == [_described_afresh(a) for a in ages]
    assert byteback._describe_ages(ages) == [_described_afresh(a) for a in ages]


@settings(deadline=None, database=None)
@given(st.floats(0, 400, allow_nan=False), st.floats(-2, 400, allow_nan=False), st.floats(0, 3, allow_nan=False),
       st.floats(-1, 5, allow_nan=False), st.booleans())
def test_a_gap_reason_describes_its_moments_as_describe_age_does(younger, older, interval, score, forget):
    # _gap_reason looks the usual text up itself (prune --list writes one for nearly every
    # snapshot): the sentence is the one _describe_age's rule gives, known hours or not.
    if forget:
        byteback._DAYS_TEXT.clear()
        byteback._HOURS_TEXT.clear()
    moment = younger + interval
    expected = (f"importance: nearest to no target age; without it no backup is further than the backup "
                f"interval ({_described_afresh(interval)}) from the snapshot before it" if older - moment <= 0 else
                f"importance: nearest to no target age; without it the backup of {_described_afresh(moment)} ago is "
                f"{_described_afresh(older - moment)} after the snapshot before it ({score:.2f} of its age)")
    assert byteback._gap_reason(younger, older, interval, score) == expected
    assert byteback._gap_reason(younger, older, interval, score) == expected


# -- plan_prune: containment per host, fairness by bytes, acceptance by budget --

G = 10 ** 9


def _daily(host, days, added, size=100 * G, now=NOW, last=None):
    """HostFacts of `days` daily snapshots, each adding `added`; `last` goes into the newest entry."""
    snaps = snaps_aged(host, now, range(days - 1, -1, -1))
    history = [{"snapshot": s.name, "time": s.when.isoformat(), "size": size, "added": added,
                "suspicious": False} for s in snaps]
    history[0]["first"] = True
    history[-1].update(last or {})
    return snaps, history


def _state(free, total=10 ** 13, **hosts):
    return byteback.PruneState({h: byteback.HostFacts(tuple(s), tuple(b), *rest)
                                for h, (s, b, *rest) in hosts.items()}, free, total)


def _deleted(state, config=byteback.ServerConfig(), now=NOW):
    """Run the plan against a model disc: each deletion frees what the plan expects it to."""
    plan = byteback.plan_prune(state, now=now, config=config)
    free, deleted, why = byteback.execute_plan(plan, state.free, delete=lambda step: freed.append(step.estimate),
                                               measure=lambda: state.free + sum(freed))
    return plan, [d.snapshot.host for d in deleted], why


freed = []


@pytest.fixture(autouse=True)
def _clear_freed():
    freed.clear()


def test_a_held_host_beside_two_normal_ones_costs_only_itself():
    # web1's newest added 500G against its normal 1G: suspicious, contained.
    # db1 and mail1 are short of room by 2G: they are pruned, web1 is not.
    web1 = _daily("web1", 10, G, last={"suspicious": True, "added": 500 * G})
    state = _state(int(4.5 * G) - 2 * G, web1=web1, db1=_daily("db1", 12, G), mail1=_daily("mail1", 12, G))
    plan, hosts, why = _deleted(state, config=byteback.ServerConfig(accept_budget=0.0))
    # target: 1.5 x (1G + 1G + 1G); web1's 499G excess is not in the goal
    assert plan.target == int(4.5 * G) and plan.contained == {"web1": 499 * G}
    assert plan.goal < 0 and hosts == []               # contained: nothing is deleted for it
    # the others' own shortage is still pruned for, from them
    state = _state(int(2.5 * G), web1=web1, db1=_daily("db1", 12, G), mail1=_daily("mail1", 12, G))
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig(accept_budget=0.0))
    assert plan.goal == int(4.5 * G) - 499 * G


def test_the_normal_hosts_beside_a_held_one_are_pruned():
    web1 = _daily("web1", 10, G, last={"suspicious": True, "added": 500 * G})
    state = _state(int(2.5 * G), web1=web1, db1=_daily("db1", 12, G), mail1=_daily("mail1", 12, 3 * G))
    config = byteback.ServerConfig(accept_budget=0.0, headroom=200.0)    # a goal the others must meet
    plan, hosts, why = _deleted(state, config=config)
    assert {"db1", "mail1"} <= set(hosts)      # web1 pays for its own room only
    assert plan.contained == {"web1": 499 * G}


def test_a_flooding_host_over_its_share_loses_its_own_snapshots_first():
    # flood1 takes a snapshot every 6 hours, each with 5G just under the line;
    # its normal (weight) stays 1G: it holds 5x its share per snapshot.
    flood_snaps = snaps_aged("flood1", NOW, [d / 4 for d in range(40, -1, -1)])
    history = [{"snapshot": s.name, "time": s.when.isoformat(), "size": 100 * G, "added": G,
                "suspicious": False} for s in flood_snaps]
    history[0]["first"] = True
    for b in history[-12:]:
        b["added"] = 5 * G
    state = _state(0, flood1=(flood_snaps, history), db1=_daily("db1", 30, G), web1=_daily("web1", 30, G))
    plan, hosts, why = _deleted(state)
    assert hosts and set(hosts[:10]) == {"flood1"}
    # every host keeps its first snapshot, the flooding one too, whatever is deleted
    listing = byteback.plan_listing(byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig()), state)
    kept = {d.snapshot: d.reason for d in listing if not d.delete}
    for h in ("flood1", "db1", "web1"):
        first = state.hosts[h].snapshots[0]
        assert kept[first] == f"kept: the oldest snapshot of host {h}"
    assert len(kept) == 6 and len(listing) == 41 + 30 + 30


def test_a_host_down_to_its_first_and_newest_gives_nothing_in_the_importance_order():
    # flood1 has only its first and its newest left, and is far over its share
    # (its newest added 40G against a normal of 1G): the importance order keeps
    # the first, so prune stops there and the others are not pruned for it.
    snaps, history = _daily("flood1", 11, G, last={"added": 40 * G})
    flood1 = ([snaps[0], snaps[-1]], history)
    state = _state(0, flood1=flood1, db1=_daily("db1", 5, G), web1=_daily("web1", 5, G))
    plan, hosts, why = _deleted(state)
    assert hosts == [] and why == "share"
    # The age order deletes the oldest first, as it says.
    plan, hosts, why = _deleted(state, config=byteback.ServerConfig(order="age"))
    assert hosts[:1] == ["flood1"]


def test_a_month_of_flooding_grows_the_share_by_share_growth_and_the_target_by_normal_growth():
    # 31 daily backups of 1G, then 30 days of flood: a backup every 6 hours
    # adding 5G, none of them flagged.  By hand: the share normal may grow by
    # share_growth (10%) per 30 days, 1G x 1.1 ** (30 / 30) = 1.1G; the normal
    # of the target by normal_growth (25%), 1.25G.
    start = NOW - dt.timedelta(days=60)
    history = [{"snapshot": f"d{i}", "time": (start + dt.timedelta(days=i)).isoformat(), "size": 100 * G,
                "added": G, "suspicious": False} for i in range(31)]
    history[0]["first"] = True
    flood_start = start + dt.timedelta(days=30)
    history += [{"snapshot": f"f{k}", "time": (flood_start + dt.timedelta(hours=6 * k)).isoformat(),
                 "size": 100 * G, "added": 5 * G, "suspicious": False} for k in range(1, 121)]
    config = byteback.ServerConfig()
    assert (config.share_growth, config.normal_growth) == (0.1, 0.25)

    def normal(key, growth):
        return byteback.normal_backup(tuple(history), history=config.history, growth=growth,
                                      floor=config.suspicion_floor / 4, key=key)
    assert normal("share", config.share_growth) == pytest.approx(1.1 * G, rel=1e-9)
    assert normal("normal", config.normal_growth) == pytest.approx(1.25 * G, rel=1e-9)
    # history_entry records both, so the plan reads them from the newest entry
    entry = byteback.history_entry(history, {"size": 100 * G, "added": 5 * G}, name="f121",
                                   now=flood_start + dt.timedelta(days=30, hours=6), first=False, config=config)
    assert entry["share"] == int(1.1 * G * 1.1 ** (0.25 / 30)) and entry["normal"] > entry["share"]


def test_the_growth_budget_follows_the_normal_the_target_counts_not_the_share():
    # web1 grew: its normal (for the target and the budget) is 2G, its share
    # normal only 1G; db1 and mail1 are at 1G.  The budget is 15% of web1's
    # part of a 300G disc by normals, 300G x 2/4 = 150G, per 30 days: 22.5G
    # for the first month and 22.5G x 11 days / 30 since its first backup
    # (by the shares it would be 15% of 100G).
    web1 = _daily("web1", 12, G, last={"suspicious": True, "added": 60 * G, "normal": 2 * G, "share": G})
    others = dict(db1=_daily("db1", 12, G, last={"normal": G, "share": G}),
                  mail1=_daily("mail1", 12, G, last={"normal": G, "share": G}))
    state = _state(10 ** 12, total=300 * G, web1=web1, **others)
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    (a,) = plan.accepted
    assert a.host == "web1" and a.bytes == int(22.5 * G + 22.5 * G * 11 / 30)


def test_nothing_is_deleted_for_a_host_that_only_has_its_newest():
    # new1's older snapshots are gone; its newest added 3G, just at the line
    # (not suspicious) against a normal of 1G: with the others' room paid for,
    # what is short is new1's doing, and the others are not pruned for it.
    snaps, history = _daily("new1", 11, G, last={"added": 3 * G})
    new1 = (snaps[-1:], history)
    state = _state(3 * G, new1=new1, db1=_daily("db1", 3, G), web1=_daily("web1", 3, G))
    plan, hosts, why = _deleted(state)
    assert plan.short(state.free) and hosts == [] and why == "share"


def test_acceptance_after_the_budget_rule():
    # 30G past the line; the budget is 15% of web1's share of a 300G disc
    # (a third: 100G) per 30 days, 15G a month, saved up to 100G.
    web1 = _daily("web1", 12, G, last={"suspicious": True, "added": 31 * G})
    others = dict(db1=_daily("db1", 12, G), mail1=_daily("mail1", 12, G))
    state = _state(10 ** 12, total=300 * G, web1=web1, **others)
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    (a,) = plan.accepted
    # a first month's 15G, and 15G x 11 days / 30 earned since web1's first backup
    assert a.host == "web1" and not a.complete and a.bytes == int(15 * G + 15 * G * 11 / 30)
    assert plan.contained == {"web1": 30 * G - a.bytes}
    history = byteback.record_acceptances(web1[1], plan.accepted, NOW)
    later = NOW + dt.timedelta(days=60)       # 30G more earned: the 9.5G left fits
    state = _state(10 ** 12, total=300 * G, web1=(web1[0], history), **others)
    plan = byteback.plan_prune(state, now=later, config=byteback.ServerConfig())
    (b,) = plan.accepted
    assert b.complete and b.bytes == 30 * G - a.bytes and plan.contained == {}
    assert byteback.record_acceptances(history, plan.accepted, later)[-1]["accepted"] is True


def test_an_unfinished_upload_past_the_line_is_rolled_back_unless_a_session_writes_it():
    web1 = _daily("web1", 12, G)
    state = _state(10 ** 12, total=300 * G, web1=(*web1, 500 * G, False))
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    assert plan.rollbacks == ["web1"] and "rolled back" in plan.notes[0]
    state = _state(10 ** 12, total=300 * G, web1=(*web1, 500 * G, True))
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    assert plan.rollbacks == [] and plan.contained == {"web1": 499 * G}
    state = _state(10 ** 12, total=300 * G, web1=(*web1, 2 * G, False))       # an ordinary upload
    assert byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig()).rollbacks == []


def test_space_outside_every_hosts_backups_is_not_pruned_for():
    state = byteback.PruneState({"db1": byteback.HostFacts(*_daily("db1", 10, G))}, 0, 10 ** 12, 50 * G)
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    assert plan.goal == int(1.5 * G) - 50 * G and "not pruned for" in plan.notes[0]


def test_an_accepted_unfinished_upload_its_host_cannot_pay_for_is_rolled_back_when_others_need_room():
    # web1's budget, a third of a 3000G disc, is 205G (150G a month: a first month and
    # 11 days), far more than its 49G past the line.  But its history beside the first
    # and the newest is 10 x 1G: with all of it given back web1 is still over its share
    # of the disc, so deletions would stop at web1 with the disc full, and an upload that
    # never completes (a fill) would keep the room the other hosts need: rolled back.
    web1 = _daily("web1", 12, G)
    others = dict(db1=_daily("db1", 12, G), mail1=_daily("mail1", 12, G))
    state = _state(0, total=3000 * G, web1=(*web1, 50 * G, False), **others)
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    assert plan.accepted == [] and plan.rollbacks == ["web1"]
    assert "more than its own history can give back" in plan.notes[-1]
    # with room enough on the disc nothing is short: it stays accepted, to complete
    state = _state(100 * G, total=3000 * G, web1=(*web1, 50 * G, False), **others)
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    assert plan.rollbacks == [] and [a.bytes for a in plan.accepted] == [49 * G]
    # while a session writes it, it is never rolled back under the writer
    state = _state(0, total=3000 * G, web1=(*web1, 50 * G, True), **others)
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    assert plan.rollbacks == []
    # 8G (7G past its normal), within web1's share: accepted, and paid by web1's history
    state = _state(0, total=3000 * G, web1=(*web1, 8 * G, False), **others)
    plan, hosts, why = _deleted(state)
    (a,) = plan.accepted
    assert a.host == "web1" and a.snapshot == "" and a.bytes == 7 * G and plan.rollbacks == []
    assert hosts and set(hosts) == {"web1"} and why != "share"
