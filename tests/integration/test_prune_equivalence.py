"""prune on a real btrfs store and simulate's model of the same state make the same decisions.

Three hosts' histories are made by the real snapshot_host on a btrfs loop
file: every day each host rewrites a file of its own size, so every snapshot
holds real extents and the history records what btrfs measured.  Then the
real prune_store deletes on that store (each deletion waits for btrfs's
cleaner), and simulate's Simulation.prune runs on the very same state (the
snapshots and histories read_prune_state read, the same free space), each of
its deletions freeing what the store's deletion of that snapshot freed.  A
simulate that chose another snapshot would find no such measurement.
"""
from __future__ import annotations

import datetime as dt
import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))
from markers import needs_btrfs, needs_root  # noqa: E402
from sshd_env import btrfs_mount  # noqa: E402

import byteback  # noqa: E402
from simulate import engine, model, policies  # noqa: E402

pytestmark = pytest.mark.integration
MIB = 1 << 20
NOW = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.timezone.utc)
HOSTS = (("web1", 1, 12), ("db1", 3, 9), ("mail1", 2, 15))   # host, MiB rewritten a day, days


def _fill(store: byteback.Store, host: str, mib: int, day: int) -> None:
    current = store.prepare_host(host)
    if day == 0:
        (current / "static").write_bytes(os.urandom(MIB))
    (current / "daily").write_bytes(os.urandom(mib * MIB))    # the old extents stay in older snapshots


@needs_root
@needs_btrfs
def test_prune_on_btrfs_and_simulate_on_the_same_state_delete_the_same_snapshots():
    config = byteback.ServerConfig()
    with btrfs_mount("400M") as root:
        store = byteback.open_store(root)
        assert store.kind == "btrfs"
        for host, mib, days in HOSTS:
            for day in range(days):
                _fill(store, host, mib, day)
                when = NOW - dt.timedelta(days=days - day, hours=HOSTS.index((host, mib, days)))
                byteback.snapshot_host(store, host, config, now=when)
        os.sync()
        state = byteback.read_prune_state(store)
        # A goal 40 MiB over what is free: several deletions, from more than one host.
        means = sum(byteback.mean(byteback.counted_sizes(f.history)) for f in state.hosts.values())
        config = config._replace(headroom=(state.free + 40 * MIB) / means)

        freed = {}
        real_delete = store.delete

        def delete(snap):
            before = store.free_bytes()
            real_delete(snap)
            freed[snap] = store.free_bytes() - before
        store.delete = delete
        result = byteback.prune_store(store, config, now=NOW)
        real = [d.snapshot for d in result.deleted]
        assert not result.plan.short(result.free) and set(freed) == set(real)
        assert [s for s in state.hosts["db1"].snapshots if s not in real] == store.snapshots("db1")

    # simulate's prune on the state read before, its disc freeing what btrfs freed.
    params = model.Params(hosts=3, cron_prune=False, accept_after=None, headroom=config.headroom)
    sim = engine.Simulation(params, model.Workload([], [], 0), policies.policy_named("week"), disk=state.total)
    sim.hosts = []
    for name, facts in state.hosts.items():
        host = engine.HostState(name)
        host.kept_snaps, host.history = list(facts.snapshots), tuple(facts.history)
        sim.hosts.append(host)
    sim.used = state.total - state.free
    simulated = []

    def sim_delete(snap, minute):
        simulated.append(snap)
        assert snap in freed, f"simulate deleted {snap.host}/{snap.name}, which prune kept"
        for host in sim.hosts:
            if snap in host.kept_snaps:
                host.kept_snaps.remove(snap)
                host.snapshots_changed()
        sim.used -= freed[snap]
        return freed[snap]
    sim.delete = sim_delete
    sim.prune(NOW, 0)
    assert simulated == real
    assert len(real) >= 4 and len({s.host for s in real}) >= 2
    # Real extents went with each snapshot, measured at its own deletion (not at the
    # next one's, which would make prune delete one more than it needs): the daily
    # file of its host, rewritten by the next snapshot, is what it alone held.
    daily = {host: mib * MIB for host, mib, _ in HOSTS}
    assert all(abs(freed[s] - daily[s.host]) < MIB / 4 for s in real), {s.name: freed[s] for s in real}
