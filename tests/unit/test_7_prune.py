"""Section 7: snapshot_host and prune_store on a tiny real hardlink store in tmp_path.

The disc is modelled by replacing the store's free_bytes: each snapshot left
uses a fixed amount, so deleting one really frees space, and the test can
check which snapshots were deleted (real directories are removed).
"""
from __future__ import annotations

import datetime as dt
import errno
import json
import os
import stat
import time
from pathlib import Path

import pytest
from freezegun import freeze_time

import byteback
from byteback import ByteBackError
from unit_helpers import at

CONFIG = byteback.ServerConfig()
T0 = at(2026, 3, 1, 3, 0)
H = dt.timedelta(hours=1)
S = dt.timedelta(seconds=1)


def write_current(tiny, host, files):
    current = tiny.store.prepare_host(host)
    for name, data in files.items():
        (current / name).write_bytes(data)
    return current


# -- snapshot_host --

def test_snapshot_turns_current_into_a_read_only_snapshot_and_records_it(tiny):
    write_current(tiny, "web1", {"a": b"x" * 300, "b": b"y" * 200})
    snap = byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    assert snap == byteback.Snapshot("web1", "2026-03-01T03:00+0000", T0)
    path = tiny.root / "web1" / snap.name
    assert sorted(os.listdir(path)) == ["a", "b"]
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o555
    assert os.listdir(tiny.root / "web1" / "current") == []            # a fresh, empty current
    history = tiny.store.read_history("web1")
    assert history == [{"snapshot": snap.name, "time": T0.isoformat(), "suspicious": False,
                        "size": 500, "added": 500, "first": True}]     # a full copy: no normal yet


def test_first_snapshot_of_an_inherited_host_is_measured_from_its_newest_snapshot(tiny):
    """Snapshots but no history (the original byteback's store): a baseline, not a full copy."""
    for day in (3, 2, 1):
        old = tiny.root / "legacy" / byteback.format_snapshot_name(T0 - day * 24 * H)
        old.mkdir(parents=True)
        (old / "f").write_bytes(b"old")
    write_current(tiny, "legacy", {"a": b"x" * 300})
    newest = tiny.store.snapshots("legacy")[-1]
    snap = byteback.snapshot_host(tiny.store, "legacy", CONFIG, now=T0)
    baseline, entry = tiny.store.read_history("legacy")
    assert baseline == {"snapshot": newest.name, "time": newest.when.isoformat(), "baseline": True,
                        "first": True, "suspicious": False, "added": 0, "size": 0}
    assert entry["snapshot"] == snap.name and "first" not in entry      # a change, counted
    assert byteback.counted_sizes([baseline, entry]) == [entry["added"]]


def test_snapshot_clears_the_dirty_marker(tiny):
    write_current(tiny, "web1", {"a": b"x"})
    tiny.store.mark_dirty("web1", T0 - H)
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    assert tiny.store.dirty_since("web1") is None


@pytest.mark.parametrize("later,taken", [
    (5 * H + 59 * 60 * S + 59 * S, False),      # 5h 59m 59s: refused
    (6 * H, True),                              # 6h: taken
])
def test_snapshot_inside_the_interval_is_refused_at_the_edge(tiny, later, taken):
    write_current(tiny, "web1", {"a": b"1"})
    first = byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    write_current(tiny, "web1", {"b": b"2"})
    if taken:
        snap = byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0 + later)
        assert tiny.names("web1") == [first.name, "2026-03-01T09:00+0000"] == [first.name, snap.name]
        assert len(tiny.store.read_history("web1")) == 2
    else:
        with pytest.raises(ByteBackError, match="minimum interval is 6h 0m") as exc:
            byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0 + later)
        assert exc.value.exit_code == 1
        assert tiny.names("web1") == [first.name]
        assert os.listdir(tiny.root / "web1" / "current") == ["b"]      # the backup is kept
        assert len(tiny.store.read_history("web1")) == 1


def test_snapshot_interval_comes_from_the_config(tiny):
    write_current(tiny, "web1", {"a": b"1"})
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    config = CONFIG._replace(min_interval=3600.0)
    with pytest.raises(ByteBackError, match="minimum interval is 1h 0m"):
        byteback.snapshot_host(tiny.store, "web1", config, now=T0 + 59 * 60 * S)
    byteback.snapshot_host(tiny.store, "web1", config, now=T0 + H)
    assert len(tiny.names("web1")) == 2


def test_force_takes_a_snapshot_inside_the_interval_with_seconds_in_the_same_minute(tiny):
    write_current(tiny, "web1", {"a": b"1"})
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    snap = byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0 + 30 * S, force=True)
    assert snap.name == "2026-03-01T03:00:30+0000"
    assert tiny.names("web1") == ["2026-03-01T03:00+0000", "2026-03-01T03:00:30+0000"]


def test_a_name_pruned_away_in_this_minute_is_not_taken_again(tiny):
    # Seen: prune deleted the snapshot holding this minute's name, and the next
    # snapshot in the same minute took that name again, then was refused as
    # older than the newest.  The newest ever recorded counts.
    tiny.add_snapshot("web1", T0 - 7 * H)
    write_current(tiny, "web1", {"a": b"1"})
    taken = byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    tiny.store.delete(taken)
    snap = byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0 + 20 * S, force=True)
    assert snap.name == "2026-03-01T03:00:20+0000"
    assert [b["snapshot"] for b in tiny.store.read_history("web1")][-2:] == [
        "2026-03-01T03:00+0000", "2026-03-01T03:00:20+0000"]
    assert tiny.names("web1")[-1] == snap.name


@pytest.mark.parametrize("now,latest,taken,name", [
    (T0, None, set(), "2026-03-01T03:00+0000"),
    (T0 + 5 * S, T0, set(), "2026-03-01T03:00:05+0000"),          # the minute's name is not after T0
    (T0 + 5 * S, T0 - H, {"2026-03-01T03:00+0000"}, "2026-03-01T03:00:05+0000"),
    (T0 + 5 * S, T0 + 5 * S, set(), None),                         # not even with seconds
    (T0 + 60 * S, T0 + 5 * S, set(), "2026-03-01T03:01+0000"),
])
def test_new_snapshot_name_never_goes_backwards(now, latest, taken, name):
    assert byteback.new_snapshot_name(now, latest, taken) == name


def test_a_clock_behind_the_newest_snapshot_is_refused(tiny):
    write_current(tiny, "web1", {"a": b"1"})
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    with pytest.raises(ByteBackError, match="check the system time"):
        byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0 - H, force=True)
    assert len(tiny.names("web1")) == 1


def test_snapshot_without_a_current_says_to_run_a_backup(tiny):
    (tiny.root / "web1").mkdir()
    with pytest.raises(ByteBackError, match="has no backup in .* to snapshot; run a backup first"):
        byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)


def test_snapshot_refuses_a_symlinked_current(tiny, tmp_path):
    (tiny.root / "web1").mkdir()
    (tmp_path / "elsewhere").mkdir()
    (tiny.root / "web1" / "current").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(ByteBackError, match="run a backup first"):
        byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    assert (tmp_path / "elsewhere").is_dir() and tiny.names("web1") == []


def test_snapshot_with_a_corrupt_history_takes_nothing(tiny):
    write_current(tiny, "web1", {"a": b"1"})
    path = tiny.store.history_path("web1")
    path.parent.mkdir(parents=True)
    path.write_text("{garbage")
    with pytest.raises(ByteBackError, match="is corrupt"):
        byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    assert tiny.names("web1") == [] and os.listdir(tiny.root / "web1" / "current") == ["a"]


@pytest.mark.parametrize("new_bytes,suspicious", [(300, False), (301, True)])
def test_snapshot_marks_a_backup_larger_than_its_history_allows(tiny, new_bytes, suspicious):
    for day in range(3):
        tiny.add_snapshot("web1", T0 - dt.timedelta(days=3 - day), added=100)
    write_current(tiny, "web1", {"big": b"z" * new_bytes})
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    last = tiny.store.read_history("web1")[-1]
    assert last["added"] == new_bytes and last["suspicious"] is suspicious


def test_files_linked_from_the_last_snapshot_are_not_new_data(tiny):
    first = tiny.add_snapshot("web1", T0 - 7 * H, added=4, content=b"same")
    current = write_current(tiny, "web1", {"new": b"n" * 10})
    os.link(tiny.root / "web1" / first.name / "file", current / "file")     # what --link-dest does
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    last = tiny.store.read_history("web1")[-1]
    assert (last["size"], last["added"]) == (14, 10)


# -- prune_store --

def _week(tiny, host="web1", added=100):
    """Snapshots of host at 0, 0.25, 1, 2 and 3 days before NOW, each adding `added` bytes."""
    for age in (3, 2, 1, 0.25, 0):
        tiny.add_snapshot(host, NOW - dt.timedelta(days=age), added=added)


NOW = at(2026, 3, 31, 12, 0)


def test_prune_with_enough_free_space_deletes_nothing(tiny):
    _week(tiny)
    tiny.disc(total=10000, per_snapshot=100)                 # 9500 free, target 150
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW)
    assert result[:3] == (9500, 150, [])
    assert len(tiny.names("web1")) == 5


@pytest.mark.parametrize("order,gone", [
    ("importance", "2026-03-31T06:00+0000"),     # the 6-hour-old: it holds only the 7-day mark
    ("age", "2026-03-28T12:00+0000"),            # the oldest
])
def test_prune_deletes_one_at_a_time_until_the_target(tiny, order, gone):
    _week(tiny)                                          # target = 1.5 x 100 = 150
    tiny.disc(total=1000, per_snapshot=170, fixed=10)    # 5 left: 140 free; 4 left: 310
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW, order=order)
    assert [d.snapshot.name for d in result.deleted] == [gone]
    assert gone not in tiny.names("web1") and len(tiny.names("web1")) == 4
    assert (result.free, result.target) == (310, 150)
    assert sorted(os.listdir(tiny.root / "web1")) == sorted(tiny.names("web1") + ["current"])


def test_a_prune_that_cannot_note_its_plan_still_prunes_and_leaves_no_old_note(tiny, monkeypatch):
    # What a push asks where it cannot read every host (last_plan_settled): a full disc that
    # refuses the note must not stop the prune that makes room, nor leave the last one standing.
    _week(tiny)
    tiny.disc(total=1000, per_snapshot=170, fixed=10)
    tiny.store.as_root = True
    path = tiny.store.last_plan_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"settled": true, "goal": 0, "hosts": ["web1"]}')
    real = byteback.write_json_atomically

    def full(target, data, **kwargs):
        if Path(target) == path:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(target, data, **kwargs)
    monkeypatch.setattr(byteback, "write_json_atomically", full)
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW)
    assert len(result.deleted) == 1
    assert not path.exists()
    monkeypatch.undo()
    byteback.prune_store(tiny.store, CONFIG, now=NOW)           # written when it can be
    assert json.loads(path.read_text())["hosts"] == ["web1"]


def test_prune_takes_its_order_from_the_config(tiny):
    _week(tiny)
    tiny.disc(total=1000, per_snapshot=170, fixed=10)
    result = byteback.prune_store(tiny.store, CONFIG._replace(order="age"), now=NOW)
    assert [d.snapshot.name for d in result.deleted] == ["2026-03-28T12:00+0000"]


def test_prune_never_deletes_the_newest_nor_the_oldest_and_says_when_the_disc_stays_short(tiny):
    _week(tiny)
    tiny.add_snapshot("db1", NOW - dt.timedelta(days=1), added=100)
    tiny.add_snapshot("db1", NOW, added=100)
    tiny.disc(total=1000, per_snapshot=100, fixed=800)       # never reaches 300
    with pytest.raises(ByteBackError, match="still short after deleting all but each host's newest"):
        byteback.prune_store(tiny.store, CONFIG, now=NOW)
    assert tiny.names("web1") == ["2026-03-28T12:00+0000", "2026-03-31T12:00+0000"]
    assert tiny.names("db1") == ["2026-03-30T12:00+0000", "2026-03-31T12:00+0000"]


def test_prune_contains_a_suspicious_backup_and_records_what_its_budget_accepts(tiny):
    _week(tiny)
    tiny.add_snapshot("web1", NOW + H, added=5000, suspicious=True)
    tiny.disc(total=1000, per_snapshot=170, fixed=10)       # -30 free, target 150
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW + H)
    # excess 5000 - 100 = 4900; the budget is 15% of web1's share (the whole
    # 1000 bytes) per 30 days: a first 150 at the start, and 150 x 73 h / 720 h
    # earned since the first backup 3 days 1 hour ago, 165 in all.
    assert result.plan.contained == {"web1": 4735}
    assert result.deleted == [] and len(tiny.names("web1")) == 6     # history intact
    last = tiny.store.read_history("web1")[-1]
    assert [a for _, a in last["acceptances"]] == [165] and "accepted" not in last
    assert any("contained, 4.6K not pruned for" in n for n in result.plan.notes)


def test_prune_force_accepts_the_suspicious_backup_and_prunes_for_it(tiny):
    _week(tiny)
    tiny.add_snapshot("web1", NOW + H, added=400, suspicious=True)
    tiny.disc(total=1000, per_snapshot=100, fixed=300)       # 6 left: 100 free
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW + H, force=True)
    # accepted, the mean of the 6 backups is (5 x 100 + 400) / 6 = 150: target 225
    assert result.target == 225
    assert tiny.store.read_history("web1")[-1]["accepted"] is True
    assert len(result.deleted) == 2 and result.free == 300
    assert len(tiny.names("web1")) == 4


def test_a_suspicious_backup_does_not_block_when_there_is_room(tiny):
    _week(tiny)
    tiny.add_snapshot("web1", NOW + H, added=5000, suspicious=True)
    tiny.disc(total=10000, per_snapshot=100)
    assert byteback.prune_store(tiny.store, CONFIG, now=NOW + H).deleted == []


def test_prune_dry_run_deletes_nothing_and_says_what_it_would(tiny, capsys):
    _week(tiny)
    tiny.disc(total=1000, per_snapshot=170, fixed=10)        # 140 free, target 150
    (tiny.root / "web1" / ".incomplete-2026-03-31T13:00+0000").mkdir()
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW, order="age", dry_run=True)
    assert [d.snapshot.name for d in result.deleted] == ["2026-03-28T12:00+0000"]
    assert result.free == 240                                # estimated: 140 + its 100 added
    assert len(tiny.names("web1")) == 5
    assert (tiny.root / "web1" / ".incomplete-2026-03-31T13:00+0000").is_dir()   # left alone
    out = capsys.readouterr().out
    assert out.startswith("would delete web1/2026-03-28T12:00+0000: age: the oldest snapshot of host web1")


def test_prune_cleans_leftovers_first(tiny):
    _week(tiny)
    tiny.disc(total=10000, per_snapshot=100)
    (tiny.root / "web1" / ".deleting-2026-01-01T00:00+0000").mkdir()
    byteback.prune_store(tiny.store, CONFIG, now=NOW)
    assert not (tiny.root / "web1" / ".deleting-2026-01-01T00:00+0000").exists()


def test_prune_is_fair_between_hosts_on_one_disc(tiny):
    for age in range(10):
        tiny.add_snapshot("a", NOW - dt.timedelta(days=age), added=100)
    for age in (0, 5, 20):
        tiny.add_snapshot("b", NOW - dt.timedelta(days=age), added=100)
    # target 1.5 x (100 + 100) = 300; free = 1300 - 100 x left: 0 now, 300 after 3
    tiny.disc(total=1300, per_snapshot=100)
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW, order="age")
    assert [d.snapshot.host for d in result.deleted] == ["a", "a", "a"]
    assert len(tiny.names("a")) == 7 and len(tiny.names("b")) == 3


def test_prune_with_a_corrupt_history_names_the_file_and_deletes_nothing(tiny):
    _week(tiny)
    tiny.disc(total=1000, per_snapshot=170, fixed=10)
    path = tiny.store.history_path("web1")
    path.write_text('{"backups": [')
    with pytest.raises(ByteBackError) as exc:
        byteback.prune_store(tiny.store, CONFIG, now=NOW)
    assert str(exc.value).startswith(f"{path} is corrupt")
    assert len(tiny.names("web1")) == 5


@pytest.mark.parametrize("added", ["lots", None, [1]])
def test_prune_with_a_history_entry_of_the_wrong_type_names_the_file(tiny, added):
    _week(tiny)
    tiny.disc(total=1000, per_snapshot=170, fixed=10)
    path = tiny.store.history_path("web1")
    data = json.loads(path.read_text())
    data["backups"][-1]["added"] = added
    path.write_text(json.dumps(data))
    with pytest.raises(ByteBackError) as exc:
        byteback.prune_store(tiny.store, CONFIG, now=NOW)
    assert str(path) in str(exc.value)


# -- the CLI boundary reads the clock --

def test_cli_snapshot_refuses_inside_the_interval_by_the_real_clock(tiny, tmp_path, capsys):
    write_current(tiny, "web1", {"a": b"1"})
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=T0)
    write_current(tiny, "web1", {"b": b"2"})
    argv = ["--config-dir", str(tmp_path / "etc"), "snapshot", "--store", str(tiny.root), "--host", "web1"]
    with freeze_time(T0 + 6 * H - S):
        assert byteback.main(argv) == 1
    err = capsys.readouterr().err
    assert err.startswith("byteback: host web1: the newest snapshot 2026-03-01T03:00+0000 is 5h 59m old")
    assert err.count("\n") == 1
    with freeze_time(T0 + 6 * H):
        assert byteback.main(argv) == 0
    assert [s.when for s in tiny.store.snapshots("web1")] == [T0, T0 + 6 * H]
    assert capsys.readouterr().out.startswith("snapshot web1/")


def test_cli_snapshot_force_and_store_are_refused_through_sudo(tiny, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SUDO_USER", "byteback")
    write_current(tiny, "web1", {"a": b"1"})
    argv = ["--config-dir", str(tmp_path / "etc"), "snapshot", "--store", str(tiny.root),
            "--host", "web1", "--force"]
    sudo_made_us_root = byteback.Context(euid=0, sleep=time.sleep)
    assert byteback.main(argv, sudo_made_us_root) == 2
    assert "--store, --force cannot be used through sudo" in capsys.readouterr().err
    assert tiny.names("web1") == []
    # SUDO_USER alone is not sudo: an ordinary user who set it is no root-side caller.
    assert byteback.main(argv, byteback.Context(euid=1000, sleep=time.sleep)) == 0
    assert len(tiny.names("web1")) == 1


def test_a_snapshot_missing_from_its_history_counts_at_its_hosts_normal_size(tiny):
    # The history write failed (a full disc) after the snapshot was renamed
    # into place: that backup was never measured, so it counts as a normal one.
    _week(tiny)
    tiny.add_snapshot("web1", NOW + H, added=5000)
    path = tiny.store.history_path("web1")
    data = json.loads(path.read_text())
    data["backups"].pop()
    path.write_text(json.dumps(data))
    tiny.disc(total=1000, per_snapshot=170, fixed=10)       # -30 free, target 150: one to go
    result = byteback.prune_store(tiny.store, CONFIG, now=NOW + H)
    assert any("has no history entry" in n for n in result.plan.notes)
    assert len(result.deleted) == 2 and result.free == 310


def test_prune_and_simulate_make_the_same_decisions_on_the_same_state(tiny):
    """prune_store on a real store and simulate's prune on the same state delete the same snapshots."""
    from simulate import engine, model, policies
    for host, added, days, hour in (("web1", 100, 12, 1), ("db1", 300, 9, 2), ("mail1", 50, 15, 3)):
        for d in range(days, -1, -1):
            tiny.add_snapshot(host, NOW - dt.timedelta(days=d, hours=hour), added=added)
    tiny.disc(total=20000, per_snapshot=500)
    state = byteback.read_prune_state(tiny.store)
    # simulate, given the very same snapshots, histories and free space, each deletion
    # freeing what the store's does (500 bytes)
    params = model.Params(hosts=3, cron_prune=False, accept_after=None, headroom=10.0)
    sim = engine.Simulation(params, model.Workload([], [], 0), policies.policy_named("week"), disk=20000)
    sim.hosts = []
    for name, facts in state.hosts.items():
        host = engine.HostState(name)
        host.kept_snaps, host.history = list(facts.snapshots), list(facts.history)
        sim.hosts.append(host)
    sim.used = 20000 - state.free
    simulated = []

    def delete(snap, minute):
        simulated.append(snap)
        for host in sim.hosts:
            if snap in host.kept_snaps:
                host.kept_snaps.remove(snap)
        sim.used -= 500
        return 500
    sim.delete = delete
    sim.prune(NOW, 0)
    result = byteback.prune_store(tiny.store, CONFIG._replace(headroom=10.0), now=NOW)
    assert [d.snapshot for d in result.deleted] == simulated
    assert len(simulated) > 5 and len({s.host for s in simulated}) >= 2


# -- whether a push's own prune would do anything (prune_would_act) --

def test_a_push_skips_its_prune_only_where_the_plan_would_do_nothing(tiny):
    """The plan decides: room enough and nothing unfinished is the one case without a prune."""
    _week(tiny)
    tiny.disc(total=10000, per_snapshot=100)                  # plenty of room
    assert byteback.prune_would_act(tiny.store, CONFIG, NOW) is False
    tiny.disc(total=1000, per_snapshot=170, fixed=10)         # short: prune_store would delete
    assert byteback.prune_would_act(tiny.store, CONFIG, NOW) is True
    assert len(tiny.names("web1")) == 5                       # it only looked


def test_a_push_takes_root_s_settled_plan_for_the_store(tiny):
    """Root's last plan, settled for these very hosts with its goal still free, answers without
    a read of every history; any other plan, or one not root's, is the plan's to decide."""
    _week(tiny)
    tiny.disc(total=1000, per_snapshot=170, fixed=10)         # short: prune_store would delete
    path = tiny.store.last_plan_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"settled": true, "goal": 100, "hosts": ["web1"]}')     # 140 free
    assert byteback.prune_would_act(tiny.store, CONFIG, NOW) is False
    for note in ('{"settled": true, "goal": 150, "hosts": ["web1"]}',          # its goal is not free
                 '{"settled": false, "goal": 100, "hosts": ["web1"]}',
                 '{"settled": true, "goal": 100, "hosts": ["web1", "db1"]}'):   # made for other hosts
        path.write_text(note)
        assert byteback.prune_would_act(tiny.store, CONFIG, NOW) is True, note
    path.write_text('{"settled": true, "goal": 100, "hosts": ["web1"]}')
    os.chown(path, 1000, 1000)                                 # the backup user's: not believed
    assert byteback.prune_would_act(tiny.store, CONFIG, NOW) is True


def test_a_snapshot_forgets_root_s_last_plan(tiny):
    """A snapshot changes its host's history: the plan before it no longer answers for the store."""
    _week(tiny)
    tiny.store.as_root = True
    path = tiny.store.last_plan_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text('{"settled": true, "goal": 0, "hosts": ["web1"]}')
    (tiny.store.current("web1") / "file").write_bytes(b"new")
    byteback.snapshot_host(tiny.store, "web1", CONFIG, now=NOW + dt.timedelta(hours=7))
    assert not path.exists()


def test_a_push_prunes_first_where_any_upload_is_unfinished(tiny):
    _week(tiny)
    tiny.disc(total=10000, per_snapshot=100)
    tiny.store.prepare_host("db1")
    tiny.store.mark_dirty("db1", NOW)                         # measuring it is root's
    assert byteback.prune_would_act(tiny.store, CONFIG, NOW) is True


def test_a_push_prunes_first_where_a_budget_would_accept_a_contained_backup(tiny):
    _week(tiny)
    tiny.add_snapshot("web1", NOW + H, added=5000, suspicious=True)
    tiny.disc(total=10000, per_snapshot=100)                  # room: only the acceptance is to do
    assert byteback.prune_would_act(tiny.store, CONFIG, NOW + H) is True
