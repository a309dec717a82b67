"""The virtual clock and the copy-on-write disc; prune runs byteback's own code after every snapshot.

Bookkeeping of the hot data (see the package docstring for the model).  A
host's snapshots are numbered k = 0, 1, ... in the order they are taken;
backup k writes h_k hot bytes, and between snapshots k-1 and k a fraction
r_k of the hot data is rewritten, so of the h_j bytes written by backup j,

    live_j(s) = h_j * exp(L_s - L_j),   L_k = sum of ln(1 - r_i) for i <= k,

are still unchanged at snapshot s.  A byte is on the disc while the first
kept snapshot at or after its backup still holds it.  Deleting snapshot s,
whose kept neighbours are p (older; -1 if none) and n (younger; the newest
is never deleted, so n exists), frees

    sum over j in (p, s] of live_j(s) - live_j(n) = (1 - exp(L_n - L_s)) * S(p, s, s),
    S(a, b, s) = sum over j in (a, b] of h_j * exp(L_s - L_j),

which prefix sums give in constant time.  The prefix sums restart whenever
L has fallen by more than EPOCH_SPAN since the last restart, so exp() stays
within a float's range however long the run.  Lumps (huge backups, junk)
have an explicit life: snapshots [birth, death) hold them.  Cold data is
never rewritten, so `current` holds it and it is never freed.
"""
from __future__ import annotations

import bisect
import datetime as dt
import gc
import math
import operator
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import byteback

from . import metrics
from .model import (DAY_MINUTES, MINUTE, Backup, Params, Workload, data_factor, disk_bytes,
                    minute_to_datetime, moment)
from .policies import Policy

EPOCH_SPAN = 300.0          # nats: exp(300) is far below a float's limit
MAX_REWRITE = 1.0 - 1e-9    # a backup rewrites at most (nearly) all hot data
NEGLIGIBLE = math.log(1e-3)  # bytes: how little a skipped remainder may hold


class Ledger:
    """The hot bytes each snapshot of one host wrote, and how much of them survives."""

    def __init__(self) -> None:
        self.log_keep: List[float] = []     # L_k
        self.base: List[int] = []           # first index of k's prefix-sum epoch
        self.prefix: List[float] = []       # sum of h_j * exp(L_base - L_j), base <= j <= k
        self.written: List[float] = []      # h_k
        self.total = 0.0                    # sum of h_k

    def append(self, written: float, keep: float) -> None:
        """Snapshot k = len(self): it wrote `written` hot bytes; `keep` of the older ones survived."""
        log_keep = (self.log_keep[-1] if self.log_keep else 0.0) + math.log(max(keep, 1e-300))
        k = len(self.log_keep)
        self.log_keep.append(log_keep)
        self.written.append(written)
        self.total += written
        if k == 0 or self.log_keep[self.base[-1]] - log_keep > EPOCH_SPAN:
            self.base.append(k)
            self.prefix.append(written)
        else:
            base = self.base[-1]
            self.base.append(base)
            self.prefix.append(self.prefix[-1] + written * math.exp(self.log_keep[base] - log_keep))

    def live(self, a: int, b: int, s: int) -> float:
        """S(a, b, s): bytes written by snapshots a+1 .. b still unchanged at snapshot s (a < b <= s)."""
        total = 0.0
        hi = b
        while hi > a:
            # Everything at or before hi has shrunk by at least exp(L_s - L_hi):
            # once that makes all bytes ever written negligible, stop.
            if self.log_keep[s] - self.log_keep[hi] < NEGLIGIBLE - math.log(self.total + 1.0):
                break
            base = self.base[hi]
            lo = max(a, base - 1)
            below = self.prefix[lo] if lo >= base else 0.0
            total += math.exp(self.log_keep[s] - self.log_keep[base]) * (self.prefix[hi] - below)
            hi = lo
        return total

    def survives(self, older: int, younger: int) -> float:
        """The fraction of hot data at snapshot `older` still unchanged at `younger`."""
        return math.exp(self.log_keep[younger] - self.log_keep[older])


class Lump(NamedTuple):
    birth: int      # the snapshot that first holds it
    death: int      # the first snapshot that no longer holds it
    size: float


class HostState:
    """One host on the simulated server: snapshots, history, pending changes."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.snaps: List[byteback.Snapshot] = []       # every snapshot taken, by k
        self.taken: List[int] = []                     # their minutes
        self.kept: List[int] = []                      # k of the kept ones, ascending
        self.kept_snaps: List[byteback.Snapshot] = []  # the same, as Snapshot values
        self._history: Tuple[dict, ...] = ()            # history (below)
        self.moments: List[int] = []                   # minutes of every backup that should have made a snapshot
        self.failed = 0                                # ... and did not (on its own, or for lack of space)
        self.ledger = Ledger()
        self.lumps: List[Lump] = []                    # by birth
        self.longest = 0                               # the longest life of a lump so far
        self.pool = 0.0                                # hot bytes in current now
        self.pool_snap = 0.0                           # ... at the newest snapshot
        self.keep = 1.0                                # of those, the part not rewritten since
        self.cold = 0.0                                # cold bytes at the newest snapshot
        self.growth = 0.0                              # pending: cold bytes added
        self.pending_lumps: List[Tuple[float, int]] = []
        self._partial = 0.0                            # partial (below)
        self.first_lost: Optional[Tuple[int, int]] = None   # (minute, other snapshots left)
        self.cause = "normal"                          # what made its newest backup big, for the counts
        self._facts: Optional[byteback.HostFacts] = None
        self._snaps_same = False                       # kept_snaps unchanged since _facts was made
        self._same = False                             # ... and history and partial too

    @property
    def history(self) -> Tuple[dict, ...]:
        """As snapshot_host records it (byteback.history_entry): a new tuple at every change,
        so byteback remembers what it worked out from it by identity."""
        return self._history

    @history.setter
    def history(self, value: Tuple[dict, ...]) -> None:
        self._history, self._same = value, False

    @property
    def partial(self) -> float:
        """Bytes in current from failed attempts."""
        return self._partial

    @partial.setter
    def partial(self, value: float) -> None:
        self._partial, self._same = value, False

    def counted(self, last: int) -> List[int]:
        """The last `last` sizes that count for the mean (byteback.counted_sizes)."""
        return byteback.counted_sizes(self.history, last=last)

    def facts(self) -> byteback.HostFacts:
        """This host as plan_prune sees it.

        The same tuples as last time while nothing changed (a cheap comparison:
        the same objects), so that byteback remembers what it worked out from
        them: most plans differ from the one before in one host only.  Nothing is
        looked at while nothing was set (a plan asks every host twice a prune).
        """
        if self._same:
            return self._facts
        if type(self.history) is not tuple:            # set from outside as a list (a test)
            self.history = tuple(self.history)
        pending = int(self.partial) if self.partial > 0 else None
        last = self._facts
        self._same = True
        if last is not None and self._snaps_same and self.history is last.history and pending == last.pending:
            return last
        snaps = last.snapshots if last is not None and self._snaps_same else tuple(self.kept_snaps)
        self._snaps_same = True
        self._facts = byteback.HostFacts(snaps, self.history, pending, False)
        return self._facts

    def snapshots_changed(self) -> None:
        """kept_snaps changed: the next facts() makes a new tuple of them."""
        self._snaps_same = self._same = False

    def newest(self) -> Optional[byteback.Snapshot]:
        return self.kept_snaps[-1] if self.kept_snaps else None


class Stats:
    """Counts over a run."""

    def __init__(self) -> None:
        self.backups = 0            # attempts
        self.snapshots = 0
        self.failed = 0             # failed on their own (network, client)
        self.failed_space = 0       # did not fit on the disc
        self.failed_by_host: Dict[str, int] = {}   # both kinds, per host
        self.first_failed_space_day: Optional[float] = None
        self.interval_refused = 0
        self.suspicious: Dict[str, int] = {"normal": 0, "huge": 0, "junk": 0, "hostile-huge": 0}
        self.cron_prunes = 0        # prune runs from cron
        self.prunes = 0             # prune runs whose plan found the disc short of its goal
        self.contained: Dict[str, int] = {}    # cause -> plans that contained a host's excess
        self.rollbacks = 0          # unfinished uploads rolled back
        self.share_stops = 0        # prunes stopped: the rest was over the share of hosts with one snapshot
        self.short = 0              # ... and deleted all they could, still short
        self.interventions = 0      # times an administrator ran prune --force
        self.accepted = 0           # excess accepted (from growth budgets, or by prune --force)
        self.deleted = 0            # snapshots deleted

    def as_dict(self) -> dict:
        return {k: (dict(sorted(v.items())) if isinstance(v, dict) else v)
                for k, v in sorted(vars(self).items())}


class RunResult(NamedTuple):
    policy: Policy
    disk: int
    final: metrics.Measure
    over_time: List[metrics.Measure]
    kept: Dict[str, List[float]]          # host -> ages (days) of kept snapshots at the end, youngest first
    stats: Stats
    attack: Optional[dict]                # pre-attack history surviving, when --hostile
    first_lost: Dict[str, Optional[Tuple[float, int]]]   # host -> (day, others kept then) or None


class Simulation:
    """One policy over one workload."""

    def __init__(self, params: Params, workload: Workload, policy: Policy,
                 disk: Optional[int] = None) -> None:
        self.params, self.workload, self.policy = params, workload, policy
        self.disk = disk_bytes(params, workload.hosts, 0) if disk is None else disk
        self.steady = disk is None and params.disk.kind == "steady"   # the disc grows with the data
        self.hosts = [HostState(h.name) for h in workload.hosts]
        self.index: Dict[byteback.Snapshot, Tuple[HostState, int]] = {}
        self.used = 0.0
        self.cold = 0.0
        self.stats = Stats()
        self.admin_due: Optional[int] = None  # when an administrator runs prune --force
        # byteback's own server.conf defaults, with what the run's options say.
        defaults = byteback.ServerConfig()
        self.config = defaults._replace(
            headroom=params.headroom, history=params.history, min_interval=params.min_interval * MINUTE,
            suspicion=defaults.suspicion if params.suspicion is None else params.suspicion,
            order=policy.order)
        # A policy with fixed targets plans with one config all along; a schedule's change by the clock.
        self.fixed_config = None if policy.schedule is not None else self.config._replace(
            targets=tuple(policy.targets))
        self.by_name = {h.name: h for h in self.hosts}
        self._moments = workload.moments or {}    # minute -> (datetime, snapshot name), made once
        self._scheduled: Optional[byteback.ServerConfig] = None   # a schedule's config, last made
        self._settled: Optional[tuple] = None    # (used, disc, facts) after a prune that left nothing to do

    # -- the disc --
    @property
    def free(self) -> float:
        return self.disk - self.used

    def delete(self, snap: byteback.Snapshot, now_minute: int) -> float:
        """Delete one snapshot; return the bytes freed."""
        host, k = self.index.pop(snap)
        pos = bisect.bisect_left(host.kept, k)
        if pos + 1 >= len(host.kept):
            raise AssertionError(f"deletion_order offered the newest snapshot of {host.name}")
        p = host.kept[pos - 1] if pos > 0 else -1
        n = host.kept[pos + 1]
        freed = (1.0 - host.ledger.survives(k, n)) * host.ledger.live(p, k, k)
        start = bisect.bisect_right(host.lumps, (p, float("inf"), 0.0))
        for lump in host.lumps[start:bisect.bisect_right(host.lumps, (k, float("inf"), 0.0))]:
            if k < lump.death <= n:     # s held it, and nothing younger does
                freed += lump.size
        del host.kept[pos]
        del host.kept_snaps[pos]
        host.snapshots_changed()
        if k == 0:
            host.first_lost = (now_minute, len(host.kept) - 1)
        self.used -= freed
        self.stats.deleted += 1
        return freed

    def recount(self) -> float:
        """The disc in use, summed from scratch (a check on the incremental figure)."""
        total = self.cold + sum(h.partial for h in self.hosts)
        for host in self.hosts:
            led = host.ledger
            for j in range(len(led.written)):
                pos = bisect.bisect_left(host.kept, j)
                s = host.kept[pos] if pos < len(host.kept) else len(led.written) - 1
                total += led.written[j] * led.survives(j, s)
            for lump in host.lumps:
                pos = bisect.bisect_left(host.kept, lump.birth)
                if pos < len(host.kept) and host.kept[pos] < lump.death or lump.death >= len(host.snaps):
                    total += lump.size
        return total

    # -- the server's side: byteback's own bookkeeping and plan --
    def _record(self, host: HostState, snap: byteback.Snapshot, size: int, added: int, kind: str) -> None:
        """What snapshot_host records (byteback.history_entry), trimmed as write_history trims it."""
        entry = byteback.history_entry(host.history, {"size": size, "added": added}, name=snap.name,
                                       now=snap.when, first=len(host.snaps) == 1, config=self.config)
        host.history = (host.history + (entry,))[-byteback.HISTORY_KEEP:]
        if entry["suspicious"]:
            self.stats.suspicious[kind] = self.stats.suspicious.get(kind, 0) + 1
            host.cause = kind

    def state(self, facts: Optional[List[byteback.HostFacts]] = None) -> byteback.PruneState:
        """The model as plan_prune sees a store: snapshots, histories, unfinished uploads, the disc.

        facts: each host's facts(), when the caller has them already."""
        if facts is None:
            facts = [h.facts() for h in self.hosts]
        return byteback.PruneState({h.name: f for h, f in zip(self.hosts, facts)}, int(self.free), int(self.disk))

    def prune(self, now: dt.datetime, minute: int, force: bool = False) -> None:
        """What prune_store does, against the model: byteback.plan_prune, then byteback.execute_plan.

        force is an administrator's `prune --force`.
        """
        settled = self._settled
        facts = [h.facts() for h in self.hosts]       # the same objects until something changes
        if (settled is not None and not force and settled[0] == self.used and settled[1] == self.disk
                and all(map(operator.is_, facts, settled[2]))):
            # Nothing has changed since byteback's last plan but the clock and the snapshots that
            # plan deleted, and that plan was timeless and left the disc at its goal: its goal
            # stands, and nothing is accepted, contained or rolled back: nothing to do.
            return
        self._settled = None
        config = self.fixed_config
        if config is None:
            oldest = min((h.kept_snaps[0].when for h in self.hosts if h.kept_snaps), default=None)
            targets = tuple(self.policy.targets_at(now, oldest))
            config = self._scheduled
            if config is None or config.targets != targets:     # the same config while they stay
                config = self._scheduled = self.config._replace(targets=targets)
        plan = byteback.plan_prune(self.state(facts), now=now, config=config, force=force)
        by_name = self.by_name
        for name in plan.contained:
            host = by_name[name]
            cause = "unfinished upload" if host.partial > 0 and not host.history[-1].get("suspicious") \
                else host.cause
            self.stats.contained[cause] = self.stats.contained.get(cause, 0) + 1
        if plan.accepted:
            self.stats.accepted += len(plan.accepted)
            for name in {a.host for a in plan.accepted if a.snapshot}:
                host = by_name[name]
                host.history = tuple(byteback.record_acceptances(host.history, plan.accepted, now))
        for name in plan.rollbacks:
            host = by_name[name]           # Store.roll_back: current back to the newest snapshot
            self.used -= host.partial
            host.partial = 0.0
            self.stats.rollbacks += 1
        if plan.contained and not force and self.admin_due is None and self.params.accept_after is not None:
            self.admin_due = minute + self.params.accept_after      # status says WARNING; someone looks
        if plan.short(self.free):
            self.stats.prunes += 1
            _, _, why = byteback.execute_plan(plan, int(self.free),
                                              delete=lambda step: self.delete(step.decision.snapshot, minute),
                                              measure=lambda: int(self.free))
            if why == "share":
                self.stats.share_stops += 1
            elif why == "exhausted":
                self.stats.short += 1
        if plan.timeless and not plan.short(self.free):
            self._settled = (self.used, self.disk, [h.facts() for h in self.hosts])

    def administrator(self, minute: int) -> None:
        """The administrator answers a WARNING: `prune --force`."""
        self.admin_due = None
        self.stats.interventions += 1
        self.prune(minute_to_datetime(minute), minute, force=True)

    # -- the client's side --
    def _largest_unsuspicious(self, host: HostState) -> int:
        """The biggest backup is_suspicious lets through: what a patient attacker uploads."""
        counted = host.counted(self.config.history)
        floor = byteback.suspicion_floor_bytes(host.history, fraction=self.config.suspicion_floor,
                                               history=self.config.history)

        def suspicious(added: int) -> bool:
            return byteback.is_suspicious(added, counted, factor=self.config.suspicion,
                                          history=self.config.history, floor=floor)
        lo, hi = 0, max(1, int(self.disk))
        if not suspicious(hi):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if suspicious(mid):
                hi = mid
            else:
                lo = mid
        return lo

    def _failed(self, host: HostState, minute: int) -> None:
        """A backup that made no snapshot: a gap in the history, counted per host."""
        host.moments.append(minute)
        host.failed += 1
        self.stats.failed_by_host[host.name] = host.failed

    def backup(self, b: Backup) -> None:
        now, name = self._moments.get(b.minute) or moment(b.minute)
        if b.kind == "prune":
            self.stats.cron_prunes += 1
            self.prune(now, b.minute)
            return
        self.stats.backups += 1
        host = self.hosts[b.host]
        first = not host.snaps
        if first and not host.pool:
            host.pool = b.pool
        # The rewrite replaces a fraction r of the hot data, chosen at random;
        # r is measured against the usual hot size, so a big rewrite replaces
        # it all and the excess is new hot data that later backups wear down.
        r = min(MAX_REWRITE, b.rewrite / b.pool) if b.pool > 0 else 0.0
        host.keep *= 1.0 - r
        host.pool = host.pool * (1.0 - r) + b.rewrite
        host.growth += b.growth
        if b.lump > 0:
            host.pending_lumps.append((b.lump, b.lump_life))
        if b.fail:
            self.stats.failed += 1
            self._failed(host, b.minute)
            return
        if byteback.interval_refusal(host.newest(), now, self.params.min_interval * MINUTE):
            self.stats.interval_refused += 1
            return
        # The forced command prunes at the start of every push (snapshot --prepare).
        self.prune(now, b.minute)
        if first:
            spec = self.workload.hosts[b.host]
            hot, cold = host.pool, spec.full * data_factor(self.params, b.minute) - host.pool
        else:
            hot = host.pool - host.keep * host.pool_snap
            cold = host.growth
        lumps = list(host.pending_lumps)
        lump_bytes = sum(size for size, _ in lumps)
        needed = max(0.0, hot) + cold + lump_bytes
        if b.kind == "junk":
            # As big as is_suspicious lets through and the disc holds.
            size = min(self._largest_unsuspicious(host), self.free - 1) - needed
            lumps.append((max(0.0, size), b.lump_life))
        elif b.kind == "fill":
            lumps.append((2.0 * self.disk, 1))        # never finishes: it only fills the disc
        elif b.kind == "hostile-huge":
            # All the free space but room for the host's own next backup,
            # which then lifts the refusal that this one triggers.
            room = 2 * byteback.mean(host.counted(self.params.history))
            lumps.append((max(0.0, self.free - needed - room), b.lump_life))
        needed = max(0.0, hot) + cold + sum(size for size, _ in lumps)
        if needed - host.partial > self.free:
            # rsync writes until the disc is full and fails; what it wrote stays
            # in current for the next attempt to resume.  The client retries
            # (10 minutes later): that push starts with a prune too, which now
            # sees the unfinished upload.
            written = max(0.0, self.free)
            host.partial += written
            self.used += written
            self.prune(now, b.minute)
        if needed - host.partial > self.free:
            written = max(0.0, self.free)
            host.partial += written
            self.used += written
            self.stats.failed_space += 1
            if self.stats.first_failed_space_day is None:
                self.stats.first_failed_space_day = round(b.minute / DAY_MINUTES, 2)
            self._failed(host, b.minute)
            return
        k = len(host.snaps)
        host.ledger.append(max(0.0, hot), 1.0 if first else host.keep)
        for size, life in lumps:
            if size > 0:
                bisect.insort(host.lumps, Lump(k, k + life, size))
                host.longest = max(host.longest, life)
        host.pool_snap = host.pool
        host.keep, host.growth, host.pending_lumps = 1.0, 0.0, []
        host.cold += cold
        self.cold += cold
        # What earlier attempts left in current is part of this backup; any
        # excess (junk deleted before the backup completed) is freed.
        self.used += needed - host.partial
        host.partial = 0.0
        snap = byteback.Snapshot(host.name, name, now)
        host.snaps.append(snap)
        host.taken.append(b.minute)
        host.moments.append(b.minute)
        host.kept.append(k)
        host.kept_snaps.append(snap)
        host.snapshots_changed()
        self.index[snap] = (host, k)
        self.stats.snapshots += 1
        kind = b.kind if b.kind != "normal" else ("huge" if lumps else "normal")
        # Only a lump born within the longest life of one can still be held (death > k).
        alive = host.lumps[bisect.bisect_left(host.lumps, (k - host.longest + 1,)):]
        size = host.cold + host.pool + sum(l.size for l in alive if l.death > k)
        self._record(host, snap, int(size), int(needed), kind)
        self.prune(now, b.minute)

    # -- measuring --
    def measure(self, minute: int) -> metrics.Measure:
        # Every backup that should have made a snapshot is a moment to look back to:
        # a failed one is a gap in the history like a deleted one.
        per_host = [metrics.measure_host(h.moments, [h.taken[k] for k in h.kept], minute,
                                         first=h.taken[0] if h.taken else None)
                    for h in self.hosts]
        return metrics.combine(per_host, minute / DAY_MINUTES, self.used / self.disk if self.disk else 0.0)

    def _kept_set(self) -> Dict[str, set]:
        return {h.name: set(h.kept) for h in self.hosts}

    def run(self) -> RunResult:
        params, workload = self.params, self.workload
        end = workload.end_minute
        every = max(1, end // max(1, params.samples))
        sample_at = list(range(every, end, every))
        attack = None
        if params.hostile != "none":
            start = int(round(params.attack_day * DAY_MINUTES))
            attack_points = [start, min(end, start + int(round(params.attack_days * DAY_MINUTES)))]
        else:
            attack_points = []
        before: Optional[Dict[str, set]] = None
        over_time: List[metrics.Measure] = []
        for b in workload.backups:
            if self.steady:
                self.disk = disk_bytes(params, workload.hosts, b.minute)
            if self.admin_due is not None and self.admin_due <= b.minute:
                self.administrator(self.admin_due)
            while sample_at and sample_at[0] <= b.minute:
                over_time.append(self.measure(sample_at.pop(0)))
            while attack_points and attack_points[0] <= b.minute:
                attack_points.pop(0)
                if before is None:
                    before = self._kept_set()
                else:
                    attack = self._survivors(before)
            self.backup(b)
        if attack_points and before is not None:
            attack = self._survivors(before)
        final = self.measure(end)
        kept = {h.name: [(end - h.taken[k]) / DAY_MINUTES for k in reversed(h.kept)] for h in self.hosts}
        first_lost = {h.name: (None if h.first_lost is None else
                               (h.first_lost[0] / DAY_MINUTES, h.first_lost[1])) for h in self.hosts}
        return RunResult(self.policy, self.disk, final, over_time, kept, self.stats, attack, first_lost)

    def _survivors(self, before: Dict[str, set]) -> dict:
        """How much of the history that existed when the attack began is still kept."""
        now = self._kept_set()
        hostile = self.hosts[0].name
        def count(names) -> Tuple[int, int]:
            return (sum(len(before[n] & now[n]) for n in names), sum(len(before[n]) for n in names))
        others = [h.name for h in self.hosts[1:]]
        mine, mine_total = count([hostile])
        theirs, theirs_total = count(others)
        return {"hostile_host": hostile, "own_kept": mine, "own_before": mine_total,
                "others_kept": theirs, "others_before": theirs_total}


def run_policy(params: Params, workload: Workload, policy: Policy) -> RunResult:
    """Simulate one policy (a module-level function, so a process pool can call it).

    The cyclic garbage collector waits meanwhile: the run makes no cycles that matter (the
    same peak RSS without it, 85 MiB for `week` over 10 years of 10 hosts), and its walks of
    the workload and the histories were 3 to 5 % of the time."""
    paused = byteback.pause_collector()
    try:
        return Simulation(params, workload, policy).run()
    finally:
        if paused:
            gc.enable()
