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
import math
from typing import Dict, Iterator, List, NamedTuple, Optional, Tuple

import byteback

from . import metrics
from .model import (DAY_MINUTES, MINUTE, Backup, Params, Workload, data_factor, disk_bytes,
                    minute_to_datetime)
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
        self.history: List[dict] = []                  # as snapshot_host records it
        self.counted: List[int] = []                   # counted_sizes(history), cached
        self.ledger = Ledger()
        self.lumps: List[Lump] = []                    # by birth
        self.pool = 0.0                                # hot bytes in current now
        self.pool_snap = 0.0                           # ... at the newest snapshot
        self.keep = 1.0                                # of those, the part not rewritten since
        self.cold = 0.0                                # cold bytes at the newest snapshot
        self.growth = 0.0                              # pending: cold bytes added
        self.pending_lumps: List[Tuple[float, int]] = []
        self.partial = 0.0                             # bytes in current from failed attempts
        self.first_lost: Optional[Tuple[int, int]] = None   # (minute, other snapshots left)

    def newest(self) -> Optional[byteback.Snapshot]:
        return self.kept_snaps[-1] if self.kept_snaps else None


class Stats:
    """Counts over a run."""

    def __init__(self) -> None:
        self.backups = 0            # attempts
        self.snapshots = 0
        self.failed = 0             # failed on their own (network, client)
        self.failed_space = 0       # did not fit on the disc
        self.failed_space_held = 0  # ... while a suspicious newest backup held prune
        self.first_failed_space_day: Optional[float] = None
        self.interval_refused = 0
        self.suspicious: Dict[str, int] = {"normal": 0, "huge": 0, "junk": 0, "hostile-huge": 0}
        self.cron_prunes = 0        # prune runs from cron
        self.prunes = 0             # prune runs that found the disc short of its target
        self.refused = 0            # ... and refused, for a suspicious backup
        self.short = 0              # ... and deleted all they could, still short
        self.refused_by: Dict[str, int] = {}   # cause of the held backup -> refusals
        self.interventions = 0      # times an administrator ran prune --force
        self.accepted = 0           # suspicious backups accepted by them
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
        self.disk = disk_bytes(params, workload.hosts) if disk is None else disk
        self.hosts = [HostState(h.name) for h in workload.hosts]
        self.index: Dict[byteback.Snapshot, Tuple[HostState, int]] = {}
        self.used = 0.0
        self.cold = 0.0
        self.stats = Stats()
        self.cause: Dict[str, str] = {}       # host -> kind of its suspicious newest backup
        self.admin_due: Optional[int] = None  # when an administrator runs prune --force
        self._target_cache: Optional[int] = None
        # byteback's own suspicion factor (server.conf's default); --suspicion asks "what if".
        self.suspicion = (byteback.ServerConfig().suspicion if params.suspicion is None
                          else params.suspicion)

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

    # -- the server's side --
    def _record(self, host: HostState, size: int, added: int, kind: str) -> None:
        """What snapshot_host records: the sizes, and whether the backup is suspicious."""
        suspicious = byteback.is_suspicious(added, host.counted, factor=self.suspicion,
                                            history=self.params.history)
        self._target_cache = None
        entry = {"size": size, "added": added, "suspicious": suspicious}
        if len(host.snaps) == 1:
            entry["first"] = True     # as snapshot_host marks a host's full first copy
        host.history.append(entry)
        # counted_sizes keeps entries in order, so it can be kept up to date a
        # piece at a time; history is trimmed like write_history trims it,
        # in batches, so the trimming costs nothing per snapshot.
        host.counted.extend(byteback.counted_sizes([entry]))
        if len(host.history) >= 2 * byteback.HISTORY_KEEP:
            dropped = host.history[:-byteback.HISTORY_KEEP]
            del host.history[:-byteback.HISTORY_KEEP]
            del host.counted[:len(byteback.counted_sizes(dropped))]
        if suspicious:
            self.stats.suspicious[kind] = self.stats.suspicious.get(kind, 0) + 1
            self.cause[host.name] = kind

    def prune(self, now: dt.datetime, minute: int, force: bool = False) -> None:
        """prune_store: keep the target free, one deletion at a time, unless a backup is held.

        force is an administrator's `prune --force`: it accepts the held backups first.
        """
        target = self._target()
        if self.free >= target:
            return
        self.stats.prunes += 1
        # As prune_store: an unfinished current already far larger than its
        # host's history holds pruning too.
        pending = {h.name: byteback.is_suspicious(int(h.partial), h.counted, factor=self.suspicion,
                                                  history=self.params.history)
                   for h in self.hosts if h.partial > 0}
        names = set(byteback.held_hosts({h.name: h.history for h in self.hosts}, pending))
        held = [h for h in self.hosts if h.name in names]
        if held and not force:
            self.stats.refused += 1
            for h in held:
                cause = self.cause.get(h.name, "normal")
                self.stats.refused_by[cause] = self.stats.refused_by.get(cause, 0) + 1
            if self.admin_due is None and self.params.accept_after is not None:
                self.admin_due = minute + self.params.accept_after
            return
        for h in held:
            h.history[-1]["accepted"] = True
            h.counted = byteback.counted_sizes(h.history)
            self._target_cache = None
            self.stats.accepted += 1
        if held:
            target = self._target()
        oldest = min((h.kept_snaps[0].when for h in self.hosts if h.kept_snaps), default=None)
        targets = self.policy.targets_at(now, oldest)
        free = self.free
        for decision in self.deletions(now, targets):
            free += self.delete(decision.snapshot, minute)
            if free >= target:
                return
        self.stats.short += 1

    def deletions(self, now: dt.datetime, targets) -> Iterator[byteback.Decision]:
        """byteback's deletion_order over every kept snapshot; the caller deletes each before the next.

        deletion_order takes every deletion from a host with the most
        snapshots, and each step depends only on the snapshots left.  So
        while some host still has `most`, only hosts with `most` matter: it
        is given just those (far fewer snapshots to sort each time), and
        called again when they run out.  test_simulate checks the sequence
        against plan_prune over all snapshots.
        """
        while True:
            most = max((len(h.kept) for h in self.hosts), default=0)
            if most <= 1:
                return
            group = [h for h in self.hosts if len(h.kept) == most]
            snapshots = [s for h in group for s in h.kept_snaps]
            for decision in byteback.deletion_order(snapshots, now=now, order=self.policy.order,
                                                    targets=targets):
                yield decision
                if all(len(h.kept) < most for h in group):
                    break
                if decision.snapshot in self.index:
                    raise RuntimeError("deletions(): delete each snapshot before asking for the next")

    def _target(self) -> int:
        """free_space_target over every host's history (cached until a history changes)."""
        if self._target_cache is None:
            self._target_cache = byteback.free_space_target(
                {h.name: h.counted for h in self.hosts},
                headroom=self.params.headroom, history=self.params.history)
        return self._target_cache

    def administrator(self, minute: int) -> None:
        """The administrator answers a refusal: `prune --force`."""
        self.admin_due = None
        self.stats.interventions += 1
        self.prune(minute_to_datetime(minute), minute, force=True)

    # -- the client's side --
    def _largest_unsuspicious(self, host: HostState) -> int:
        """The biggest backup is_suspicious lets through: what a patient attacker uploads."""
        lo, hi = 0, max(1, int(self.disk))
        if not byteback.is_suspicious(hi, host.counted, factor=self.suspicion,
                                      history=self.params.history):
            return hi
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if byteback.is_suspicious(mid, host.counted, factor=self.suspicion,
                                      history=self.params.history):
                hi = mid
            else:
                lo = mid
        return lo

    def backup(self, b: Backup) -> None:
        if b.kind == "prune":
            self.stats.cron_prunes += 1
            self.prune(minute_to_datetime(b.minute), b.minute)
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
            return
        now = minute_to_datetime(b.minute)
        if byteback.interval_refusal(host.newest(), now, self.params.min_interval * MINUTE):
            self.stats.interval_refused += 1
            return
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
            room = 2 * byteback.mean(host.counted[-self.params.history:])
            lumps.append((max(0.0, self.free - needed - room), b.lump_life))
        needed = max(0.0, hot) + cold + sum(size for size, _ in lumps)
        if needed - host.partial > self.free:
            # rsync writes until the disc is full and fails; what it wrote stays
            # in current for the next attempt to resume.
            written = max(0.0, self.free)
            host.partial += written
            self.used += written
            self.stats.failed_space += 1
            if self.stats.first_failed_space_day is None:
                self.stats.first_failed_space_day = round(b.minute / DAY_MINUTES, 2)
            if any(h.history and h.history[-1].get("suspicious") and not h.history[-1].get("accepted")
                   for h in self.hosts):
                self.stats.failed_space_held += 1
            return
        k = len(host.snaps)
        host.ledger.append(max(0.0, hot), 1.0 if first else host.keep)
        for size, life in lumps:
            if size > 0:
                bisect.insort(host.lumps, Lump(k, k + life, size))
        host.pool_snap = host.pool
        host.keep, host.growth, host.pending_lumps = 1.0, 0.0, []
        host.cold += cold
        self.cold += cold
        # What earlier attempts left in current is part of this backup; any
        # excess (junk deleted before the backup completed) is freed.
        self.used += needed - host.partial
        host.partial = 0.0
        snap = byteback.Snapshot(host.name, byteback.format_snapshot_name(now), now)
        host.snaps.append(snap)
        host.taken.append(b.minute)
        host.kept.append(k)
        host.kept_snaps.append(snap)
        self.index[snap] = (host, k)
        self.stats.snapshots += 1
        kind = b.kind if b.kind != "normal" else ("huge" if lumps else "normal")
        size = host.cold + host.pool + sum(l.size for l in host.lumps if l.death > k)
        self._record(host, int(size), int(needed), kind)
        self.prune(now, b.minute)

    # -- measuring --
    def measure(self, minute: int) -> metrics.Measure:
        per_host = [metrics.measure_host(h.taken, [h.taken[k] for k in h.kept], minute)
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
    """Simulate one policy (a module-level function, so a process pool can call it)."""
    return Simulation(params, workload, policy).run()
