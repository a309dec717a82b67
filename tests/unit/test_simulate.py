"""simulate: the disc bookkeeping on hand-computed cases, and that it prunes exactly as byteback does."""
from __future__ import annotations

import datetime as dt
import random

import pytest

import byteback
from simulate import engine, metrics, model, policies

DAY = model.DAY_MINUTES
UTC = dt.timezone.utc


K = 1000.0     # the unit of these cases (byteback's target is a whole number of bytes)


def tiny_run(policy_name: str, disk: float, backups, *, headroom: float = 0.01):
    """One host of 100K (90K cold, 10K hot), the given (day, K rewritten), a disc of `disk` K."""
    params = model.Params(hosts=1, full=int(100 * K), headroom=headroom, history=10, min_interval=360,
                          accept_after=None, cron_prune=False, samples=1, growth=0.0)
    host = model.Host("h1", 100 * K, 10 * K, 0)
    events = [model.Backup(day * DAY, 0, "normal", False, rewrite * K, 10 * K, 0.0, 0.0, 0)
              for day, rewrite in backups]
    workload = model.Workload([host], events, events[-1].minute + 1)
    sim = engine.Simulation(params, workload, policies.policy_named(policy_name), disk=disk * K)
    freed = []
    real_delete = sim.delete

    def delete(snap, minute):
        amount = real_delete(snap, minute)
        freed.append((snap, amount / K))
        return amount

    sim.delete = delete
    for b in events:
        sim.backup(b)
    return sim, freed


# Three daily snapshots.  The first writes 100K (90K cold, 10K hot); the
# next two each rewrite half of the hot data, writing 5K: 110K in all.  A
# disc of 110K holds only two of them beside the (small) free-space target.
THREE = [(0, 0.0), (1, 5.0), (2, 5.0)]


def test_three_snapshots_importance_deletes_the_middle_one_and_frees_what_only_it_held():
    sim, freed = tiny_run("original", 110.0, THREE)
    (snap, amount), = freed
    # Ages 0, 1, 2 days: the newest stays, the oldest goes last, so the 1-day one goes.
    assert snap.when == model.minute_to_datetime(1 * DAY)
    # It wrote 5 bytes; the next snapshot rewrote half of them: 2.5 were only in it.
    assert amount == pytest.approx(2.5)
    assert sim.used == pytest.approx(107.5 * K)
    assert sim.used == pytest.approx(sim.recount())


def test_three_snapshots_age_deletes_the_oldest_and_frees_its_rewritten_hot_data():
    sim, freed = tiny_run("age", 110.0, THREE)
    (snap, amount), = freed
    assert snap.when == model.minute_to_datetime(0)
    # Its 10 hot bytes: half were rewritten by the next snapshot, which keeps
    # the other half; the 90 cold bytes are still in current.
    assert amount == pytest.approx(5.0)
    assert sim.used == pytest.approx(105.0 * K)


def test_a_disc_that_fits_everything_deletes_nothing():
    sim, freed = tiny_run("original", 200.0, THREE)
    assert freed == []
    assert sim.used == pytest.approx(110.0 * K)
    assert [len(h.kept) for h in sim.hosts] == [3]


def test_a_disc_that_fits_two_keeps_only_the_newest_pair_under_age():
    sim, freed = tiny_run("age", 105.0, THREE)
    # After the second backup the disc is full: the first snapshot goes (5K of
    # its hot data was rewritten since).  After the third, the second goes:
    # 2.5K of its own 5K, and 2.5K it still held of the first backup's.
    assert [(s.when, round(a, 6)) for s, a in freed] == [
        (model.minute_to_datetime(0), 5.0), (model.minute_to_datetime(DAY), 5.0)]
    assert sim.used == pytest.approx(100.0 * K)     # current = the newest: 90K cold + 10K hot
    assert sim.stats.short == 0


def test_the_newest_and_the_first_snapshot_stay_however_short_the_disc():
    # A target of 50 mean backups cannot be met: under importance all but the
    # newest and the first (the oldest) go, and prune says it is short.
    sim, freed = tiny_run("original", 200.0, THREE, headroom=50.0)
    assert [s.when for s, _ in freed] == [model.minute_to_datetime(DAY)]
    assert [k for k in sim.hosts[0].kept] == [0, 2]
    assert sim.stats.short >= 1
    # Under age the oldest goes first: all but the newest.
    sim, freed = tiny_run("age", 200.0, THREE[:2], headroom=50.0)
    assert [s.when for s, _ in freed] == [model.minute_to_datetime(0)]
    assert len(sim.hosts[0].kept) == 1 and sim.stats.short >= 1


def test_a_backup_that_does_not_fit_fails_and_leaves_its_part_in_current():
    sim, _ = tiny_run("age", 103.0, [(0, 0.0), (1, 5.0)], headroom=0.0)
    assert sim.stats.failed_space == 1
    assert len(sim.hosts[0].snaps) == 1
    assert sim.hosts[0].partial == pytest.approx(3.0 * K)   # rsync wrote what fitted
    assert sim.used == pytest.approx(103.0 * K)


@pytest.mark.parametrize("policy", ["original", "age", "original-code", "week"])
def test_incremental_disc_use_matches_a_recount_from_scratch(policy):
    params = model.Params(hosts=2, years=0.4, seed=3, huge=0.05, fail=0.05, disk=model.DiskSpec("snapshots", 8))
    workload = model.make_workload(params)
    sim = engine.Simulation(params, workload, policies.policy_named(policy))
    for b in workload.backups:
        sim.backup(b)
        assert sim.used == pytest.approx(sim.recount(), rel=1e-9, abs=1.0)


def test_ledger_survives_a_long_run_of_complete_rewrites():
    ledger = engine.Ledger()
    for _ in range(200):               # each step rewrites (nearly) everything
        ledger.append(1.0, 1e-9)
    assert ledger.live(-1, 199, 199) == pytest.approx(1.0)
    assert ledger.live(-1, 0, 0) == pytest.approx(1.0)
    assert ledger.live(-1, 0, 199) == 0.0


def _mid_run(policy_name: str, hosts: int, stop_day: float):
    params = model.Params(hosts=hosts, years=1, seed=7)
    workload = model.make_workload(params)
    sim = engine.Simulation(params, workload, policies.policy_named(policy_name))
    for b in workload.backups:
        if b.minute > stop_day * DAY:
            break
        sim.backup(b)
    return sim, model.minute_to_datetime(int(stop_day * DAY))


def _deleted_by_simulator_and_plan(sim, snapshots, now, targets):
    """Let the simulator prune a disc far too small; assert it deleted in plan_prune's order."""
    sim.disk = -1                      # always short: it deletes all the plan lets it
    config = sim.config._replace(targets=tuple(targets))
    expected = [step.decision.snapshot for step in byteback.plan_prune(sim.state(), now=now, config=config).steps]
    actual = []
    real_delete = sim.delete

    def delete(snap, minute):
        actual.append(snap)
        return real_delete(snap, minute)
    sim.delete = delete
    sim.policy = sim.policy._replace(targets=tuple(targets), schedule=None)
    sim.prune(now, 0)
    assert actual and actual == expected[:len(actual)]
    return actual


@pytest.mark.parametrize("policy,hosts", [("original", 3), ("week", 4), ("age", 3),
                                          ("original-code", 2), ("original", 1)])
def test_the_simulator_deletes_in_the_order_plan_prune_lists(policy, hosts):
    sim, now = _mid_run(policy, hosts, 200.3)
    snapshots = [s for h in sim.hosts for s in h.kept_snaps]
    oldest = min(s.when for s in snapshots)
    targets = sim.policy.targets_at(now, oldest)
    deleted = _deleted_by_simulator_and_plan(sim, snapshots, now, targets)
    assert len(deleted) > 20


def test_the_same_seed_gives_the_same_run_and_another_seed_another():
    def run(seed):
        params = model.Params(hosts=2, years=0.5, seed=seed)
        result = engine.run_policy(params, model.make_workload(params), policies.policy_named("original"))
        return result.kept, result.stats.as_dict(), result.final
    assert run(4) == run(4)
    assert run(4) != run(5)


def test_a_workload_past_the_moments_it_keeps_runs_the_same(monkeypatch):
    """The moments a workload makes once are ~260 bytes a backup: past MOMENTS_KEPT the
    engine makes each as it goes, to the same run."""
    params = model.Params(hosts=2, years=0.3, seed=3)
    kept = model.make_workload(params)
    monkeypatch.setattr(model, "MOMENTS_KEPT", len(kept.backups) - 1)
    made = model.make_workload(params)
    assert kept.moments and made.moments is None
    a, b = (engine.run_policy(params, w, policies.policy_named("week")) for w in (kept, made))
    assert (a.kept, a.stats.as_dict(), a.final) == (b.kept, b.stats.as_dict(), b.final)


def test_workload_draws_do_not_depend_on_the_probabilities():
    a = model.make_workload(model.Params(hosts=2, years=0.2, seed=9, fail=0.0))
    b = model.make_workload(model.Params(hosts=2, years=0.2, seed=9, fail=0.5))
    assert [x.rewrite for x in a.backups] == [x.rewrite for x in b.backups]
    assert sum(x.fail for x in b.backups) > sum(x.fail for x in a.backups) == 0


def test_a_flooding_client_is_limited_to_the_minimum_interval():
    params = model.Params(hosts=2, years=0.3, seed=2, hostile="flood", attack_at=40, attack_days=5)
    workload = model.make_workload(params)
    junk = [b for b in workload.backups if b.kind == "junk"]
    assert len(junk) == 5 * DAY // params.min_interval
    result = engine.run_policy(params, workload, policies.policy_named("original"))
    assert result.stats.interval_refused == 0
    assert result.attack["others_before"] > 0


# -- metrics -------------------------------------------------------------------

def test_worst_relative_gap_by_band_on_a_hand_counted_case():
    taken = [d * DAY for d in range(11)]          # a snapshot every day, days 0 .. 10
    kept = [0, 5 * DAY, 10 * DAY]                  # ages 10, 5 and 0 days at day 10
    gaps = metrics.worst_relative_gaps(taken, kept, 10 * DAY)
    # Age 1 (day 9): the nearest kept at or before it is day 5: 4 days back, 4.0 of its age.
    assert gaps[0] == pytest.approx(4.0)
    # Age 8 (day 2), the youngest in (7, 30]: back to day 0 is 2 days, 2/8 of its age.
    assert gaps[1] == pytest.approx(2 / 8)
    assert gaps[2:] == [None, None, None]


def test_last_week_counts_days_with_a_kept_snapshot():
    taken = [d * DAY for d in range(20)]
    kept = [0] + [d * DAY for d in (13, 15, 17, 18, 19)]
    assert metrics.last_week(taken, kept, 19 * DAY + 60) == (5, 7)


# -- policies ------------------------------------------------------------------

def test_presets_include_the_original_targets_by_name():
    table = policies.presets()
    assert table["original"] == tuple(float(d) for d in byteback.ORIGINAL_TARGET_DAYS)
    for days in table.values():
        assert list(days) == sorted(days) and days[0] == 0


def test_the_original_code_schedule():
    now = dt.datetime(2023, 3, 15, 18, 0, tzinfo=UTC)          # a Wednesday evening
    oldest = now - dt.timedelta(days=100)
    ages = policies.original_code_targets(now, oldest)
    # Midday today and on the 6 days before: 0.25 .. 6.25 days ago; the
    # previous 4 Sundays (12 March, which is also "3 days ago", and the 3
    # before); then every 28 days back, to one at or before the oldest.
    assert ages == tuple(sorted({0.25 + d for d in range(7)}
                                | {10.25, 17.25, 24.25, 52.25, 80.25, 108.25}))


def test_the_original_code_schedule_counts_a_future_midday_as_now():
    morning = dt.datetime(2023, 3, 19, 6, 0, tzinfo=dt.timezone(dt.timedelta(hours=2)))  # a Sunday
    ages = policies.original_code_targets(morning, None)
    assert ages[0] == 0.0
    assert 6.75 in ages                 # last Sunday's midday, not today's


def test_policies_by_name_and_an_unknown_one():
    assert policies.policy_named("age").order == "age"
    assert policies.policy_named("original-code").schedule is not None
    with pytest.raises(ValueError, match="unknown policy 'nope'"):
        policies.policy_named("nope")


def test_random_snapshot_sets_prune_in_plan_prune_order():
    rng = random.Random(11)
    now = dt.datetime(2024, 6, 1, 12, tzinfo=UTC)
    for _ in range(25):
        params = model.Params(hosts=rng.randint(1, 4), years=0.1)
        workload = model.Workload([model.Host(f"h{i}", 1.0, 1.0, 0) for i in range(params.hosts)], [], 0)
        sim = engine.Simulation(params, workload, policies.policy_named(rng.choice(["original", "week", "age"])),
                                disk=1)
        for h in sim.hosts:
            for k, age in enumerate(sorted(rng.sample(range(1, 900), rng.randint(1, 30)), reverse=True) + [0]):
                when = now - dt.timedelta(days=age, minutes=rng.randint(0, 600))
                snap = byteback.Snapshot(h.name, byteback.format_snapshot_name(when), when)
                h.snaps.append(snap)
                h.kept.append(k)
                h.kept_snaps.append(snap)
                sim.index[snap] = (h, k)
                h.ledger.append(0.0, 1.0)
        if all(len(h.kept) < 2 for h in sim.hosts):
            continue
        snapshots = [s for h in sim.hosts for s in h.kept_snaps]
        targets = sim.policy.targets
        _deleted_by_simulator_and_plan(sim, snapshots, now, targets)


def _kept_over_time(disk: "model.DiskSpec") -> tuple:
    """(disc at the start, at the end, [fewest kept by a host at each sample after 90 days])."""
    params = model.Params(hosts=2, years=2, seed=5, noise=0.0, huge=0.0, fail=0.0, growth=0.5, disk=disk)
    result = engine.run_policy(params, model.make_workload(params), policies.policy_named("week"))
    start = model.disk_bytes(params, model.make_workload(params).hosts, 0)
    return start, result.disk, [m.kept_min for m in result.over_time if m.day > 90]


def test_a_steady_disc_holds_about_n_snapshots_all_along_while_nsnap_holds_more_early():
    # With data growing 50% a year, a disc sized for N snapshots at the end
    # holds far more early on; a steady one grows with the data and holds N
    # (give or take the free-space target's rounding) at every moment.
    start, end, steady = _kept_over_time(model.DiskSpec("steady", 10))
    assert end > 2 * start * 0.9
    assert max(steady) - min(steady) <= 2 and 9 <= min(steady)
    _, fixed_end, fixed = _kept_over_time(model.DiskSpec("snapshots", 10))
    assert fixed_end == pytest.approx(end, rel=0.01)     # the same disc at the end
    assert max(fixed) >= min(steady) + 10                  # but many more snapshots early on


def test_the_report_shows_kept_per_host_by_year_steady_on_a_steady_disc_and_falling_on_nsnap():
    from simulate import report
    by_disc = {}
    for disk in (model.DiskSpec("steady", 10), model.DiskSpec("snapshots", 10)):
        params = model.Params(hosts=2, years=2, seed=5, noise=0.0, huge=0.0, fail=0.0, growth=0.5,
                              disk=disk, samples=40)
        workload = model.make_workload(params)
        result = engine.run_policy(params, workload, policies.policy_named("week"))
        by_disc[disk.kind] = report.kept_by_year(result), report.table([result], params, workload)
    years, text = by_disc["steady"]
    assert [y for y, _, _, _ in years] == [1, 2]
    assert 0 < years[0][1] < 60            # counted once the disc has filled, early in year 1
    assert all(9 <= lo <= hi <= 12 for _, _, lo, hi in years)
    assert f"week           year 1 {years[0][2]}-{years[0][3]} (from day {years[0][1]:.0f})" in text
    years, _ = by_disc["snapshots"]
    assert years[0][2] > years[1][3]       # more in year 1 than ever in year 2: the disc is not steady


def test_the_disk_option_reads_steady():
    from simulate import cli
    assert cli._disk("30steady") == model.DiskSpec("steady", 30.0)
    assert cli._disk("30snap") == model.DiskSpec("snapshots", 30.0)
    assert model.DiskSpec("steady", 30).describe() == "room for 30 snapshots per host at every moment"
