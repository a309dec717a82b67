"""Section 6b: the plan's bookkeeping worked out incrementally against the same worked out afresh.

simulate hands plan_prune a host's history with one entry appended (and the
oldest trimmed) after every backup, and byteback works out what it reads of
it (HistoryEntries) from the last one instead of reading the whole history
again.  The references below read every entry every time, as the rule is
written: on random histories, changed the ways a store's history changes
(appended, trimmed, an entry replaced by record_acceptances, odd values),
the two must agree exactly, and so must whole plans made from remembered and
from fresh facts.
"""
from __future__ import annotations

import copy
import datetime as dt
from typing import Dict, List

from hypothesis import given, settings
from hypothesis import strategies as st

import byteback
from unit_helpers import at

NOW = at(2026, 3, 31, 12, 0)


def reference_snapshot_bytes(backups) -> Dict[str, int]:
    """Each named entry frees what it added, but no more than left by the next backup; the oldest
    entry of a name counts."""
    held: Dict[str, int] = {}
    for i in range(len(backups) - 1, -1, -1):
        b = backups[i]
        if not isinstance(b.get("snapshot"), str):
            continue
        added, size = byteback._history_int(b, "added"), byteback._history_int(b, "size")
        if i + 1 < len(backups):
            after_added = byteback._history_int(backups[i + 1], "added")
            after_size = byteback._history_int(backups[i + 1], "size")
            left = after_added + (size - after_size if size > after_size else 0)
            held[b["snapshot"]] = min(added, left)
        else:
            held[b["snapshot"]] = added
    return held


def reference_entries(backups) -> tuple:
    by_name: Dict[object, List[dict]] = {}
    for b in backups:
        by_name.setdefault(b.get("snapshot"), []).append(b)
    return by_name, [b for b in backups if b.get("suspicious") and not b.get("accepted")]


NUMBER = st.one_of(st.integers(0, 10 ** 6), st.integers(0, 10 ** 6), st.integers(-5, 5),
                   st.just("12"), st.just(None), st.just(2.5), st.just(True))
NAME = st.one_of(st.sampled_from([f"s{i}" for i in range(12)]), st.just(None), st.just(7))
ENTRY = st.fixed_dictionaries({"snapshot": NAME, "added": NUMBER, "size": NUMBER},
                              optional={"suspicious": st.booleans(), "accepted": st.booleans()})
# what happens to a history between two plans: entries appended, the oldest trimmed
# (write_history keeps the last HISTORY_KEEP), an entry replaced by a changed copy, or kept as it is


def changes_of(entry):
    return st.one_of(st.tuples(st.just("append"), st.lists(entry, min_size=1, max_size=3)),
                     st.tuples(st.just("trim"), st.integers(0, 6)),
                     st.tuples(st.just("replace"), st.integers(0, 40)),
                     st.tuples(st.just("same"), st.just(0)))


CHANGE = changes_of(ENTRY)
# as snapshot_host writes them: numbers, and sometimes a suspicious one (contained, accepted)
WRITTEN = st.fixed_dictionaries({"snapshot": NAME, "added": st.integers(0, 10 ** 5), "size": st.integers(0, 10 ** 6)},
                                optional={"suspicious": st.booleans()})


def changed(history: tuple, change) -> tuple:
    kind, arg = change
    if kind == "append":
        return history + tuple(dict(e) for e in arg)
    if kind == "trim":
        return history[arg:]
    if kind == "replace" and history:
        i = arg % len(history)
        return history[:i] + ({**history[i], "accepted": True},) + history[i + 1:]
    return history


@settings(deadline=None, database=None)
@given(st.lists(ENTRY, max_size=8), st.lists(CHANGE, max_size=25))
def test_history_entries_worked_out_from_the_last_ones_are_those_worked_out_afresh(start, changes):
    history = tuple(dict(e) for e in start)
    entries = byteback._history_entries(history)
    for change in changes:
        history = changed(history, change)
        entries = byteback._history_entries(history, entries)
        by_name, unaccepted = reference_entries(history)
        assert entries.history == history
        assert entries.held == reference_snapshot_bytes(history)
        assert entries.by_name == by_name
        assert [id(b) for b in entries.unaccepted] == [id(b) for b in unaccepted]
        assert {k: [id(b) for b in v] for k, v in entries.by_name.items()} == \
            {k: [id(b) for b in v] for k, v in by_name.items()}


class CountedEntry(dict):
    """A history entry that counts how often it is read."""
    reads = 0

    def get(self, *args):
        CountedEntry.reads += 1
        return super().get(*args)


def test_the_usual_step_reads_only_the_new_entry():
    # 100 entries, one appended and the oldest trimmed: the old ones are not read again
    history = tuple(CountedEntry(snapshot=f"s{i}", added=i, size=1000 + i) for i in range(100))
    entries = byteback._history_entries(history)
    CountedEntry.reads = 0
    history = history[1:] + (CountedEntry(snapshot="s100", added=5, size=1200),)
    entries = byteback._history_entries(history, entries)
    assert CountedEntry.reads <= 8
    assert entries.held == reference_snapshot_bytes(history)
    assert entries.held["s99"] == 5 and entries.held["s100"] == 5   # s99 frees no more than s100 rewrote


def test_entries_read_again_after_the_next_took_their_tables_are_their_own():
    # the next history's entries change the last one's tables in place; an older plan's
    # lazy steps that read the last one again get its own history's numbers, not the next's
    history = tuple({"snapshot": f"s{i}", "added": 10 + i, "size": 1000 + i} for i in range(5))
    last = byteback._history_entries(history)
    following = history[1:] + ({"snapshot": "s5", "added": 3, "size": 1200},)
    entries = byteback._history_entries(following, last)
    assert entries.held == reference_snapshot_bytes(following)
    assert last.held == reference_snapshot_bytes(history) and "s0" in last.held and "s5" not in last.held
    assert last.by_name == reference_entries(history)[0]
    assert entries.held == reference_snapshot_bytes(following)    # and the next's stay its own


# a backup as snapshot_host records it, or an entry from elsewhere (an old history, a
# hand-edited file) with no normals recorded and odd numbers
RECORD = st.one_of(st.tuples(st.just("backup"), st.integers(0, 10 ** 6), st.integers(0, 10 ** 7)),
                   st.tuples(st.just("odd"), st.one_of(st.integers(-5, 10 ** 6), st.just("12"), st.just(2.5)),
                             st.one_of(st.integers(-5, 10 ** 7), st.just(True))))


@settings(deadline=None, database=None)
@given(st.lists(RECORD, max_size=40), st.sampled_from([1, 3, 10]))
def test_history_entry_resumes_its_normals_as_the_whole_walk_does(records, history_length):
    # history_entry resumes from the newest entry's normals with the counted sizes it has;
    # the reference walks the history with the new entry appended, as normal_backup does
    config = byteback.ServerConfig()._replace(history=history_length)
    keys = (("normal", config.normal_growth), ("share", config.share_growth))
    history: tuple = ()
    for i, (kind, added, size) in enumerate(records):
        when = NOW + dt.timedelta(hours=7 * i)
        if kind == "odd":
            history = (history + ({"snapshot": f"s{i}", "time": when.isoformat(), "added": added, "size": size},))[-30:]
            continue
        entry = byteback.history_entry(history, {"size": size, "added": added}, name=f"s{i}", now=when,
                                       first=not history, config=config)
        bare = {k: v for k, v in entry.items() if k not in ("normal", "share")}
        expected = byteback._normal_backups(list(history) + [bare], history=config.history,
                                            floor=config.suspicion_floor / 4, keys=keys)
        if "normal" in entry:
            assert (entry["normal"], entry["share"]) == tuple(map(int, expected))
        else:                                    # only where nothing counts yet: a full copy alone
            assert not byteback.counted_sizes(list(history) + [bare])
        history = (history + (entry,))[-30:]


def _state(histories: Dict[str, tuple], sizes: Dict[str, int]) -> byteback.PruneState:
    hosts = {}
    for h, history in histories.items():
        names = sorted({b["snapshot"] for b in history if isinstance(b.get("snapshot"), str)})
        snaps = tuple(byteback.Snapshot(h, n, NOW - dt.timedelta(days=len(names) - i))
                      for i, n in enumerate(names))
        hosts[h] = byteback.HostFacts(snaps, history)
    return byteback.PruneState(hosts, 0, sum(sizes.values()) or 1)


def _plan(state: byteback.PruneState) -> tuple:
    plan = byteback.plan_prune(state, now=NOW, config=byteback.ServerConfig())
    return (plan.target, plan.goal, plan.accepted, plan.contained, plan.rollbacks, plan.notes,
            [(s.decision, s.over_share, s.estimate) for s in plan.steps])


@settings(max_examples=60, deadline=None, database=None)   # whole plans: fewer, whatever the profile
@given(st.lists(st.tuples(st.sampled_from(["a", "b", "c"]), changes_of(WRITTEN)), max_size=8))
def test_plans_from_remembered_facts_are_plans_from_fresh_facts(changes):
    histories = {h: tuple({"snapshot": f"{h}{i}", "added": 100 * (i + 1), "size": 10 ** 4 + i,
                           "time": (NOW - dt.timedelta(days=9 - i)).isoformat()} for i in range(6))
                 for h in "abc"}
    for host, change in changes:
        histories[host] = changed(histories[host], change)
        for h, history in histories.items():      # any entry that changed names a snapshot
            histories[h] = tuple(b if isinstance(b.get("snapshot"), str) else {**b, "snapshot": f"{h}x{i}"}
                                 for i, b in enumerate(history))
        state = _state(histories, {h: 10 ** 4 for h in histories})
        remembered = _plan(state)
        assert _plan(state) == remembered                        # the views kept from the call before
        assert _plan(copy.deepcopy(state)) == remembered         # new objects: everything afresh
