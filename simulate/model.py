"""Parameters, hosts and the synthetic workload: every random draw comes from one seeded RNG.

The workload is made once and replayed for every policy, so policies are
compared on the very same backups; only what depends on the disc (a backup
that does not fit, the size of a hostile client's junk) is decided later,
by the engine.
"""
from __future__ import annotations

import datetime as dt
import math
import random
from typing import Dict, List, NamedTuple, Optional, Tuple

import byteback

MINUTE = 60.0
DAY_MINUTES = 1440
YEAR_DAYS = 365.25
# The virtual clock starts on a Monday at 01:00 UTC; snapshot names carry whole minutes.
START = dt.datetime(2023, 1, 2, 1, 0, tzinfo=dt.timezone.utc)

HOSTILE_KINDS = ("none", "flood", "huge", "fill")
MOMENTS_KEPT = 500_000               # backups whose moments a workload keeps made (see make_workload)


class DiskSpec(NamedTuple):
    """The disc's size: bytes, a multiple of the hosts' full size, or room for N changes per host
    (at the end of the run, or at every moment: a disc that grows with the data)."""
    kind: str        # "bytes" | "full" | "snapshots" | "steady"
    value: float

    def describe(self) -> str:
        if self.kind == "bytes":
            return byteback.format_size(self.value)
        if self.kind == "full":
            return f"{self.value:g}x the hosts' full size"
        if self.kind == "steady":
            return f"room for {self.value:g} snapshots per host at every moment"
        return f"room for {self.value:g} snapshots per host"


class ChangeSpec(NamedTuple):
    """The mean change of one backup: a fraction of the host's data, or bytes (for a host of --full)."""
    kind: str        # "fraction" | "bytes"
    value: float


class Params(NamedTuple):
    """Everything a simulation run depends on (the CLI's options, parsed)."""
    years: float = 3.0
    interval: int = DAY_MINUTES          # minutes between a host's backups
    hosts: int = 3
    full: int = 100 * 1024 ** 3          # mean full size of a host, bytes
    change: ChangeSpec = ChangeSpec("fraction", 0.01)
    noise: float = 0.3                   # sigma of the log-normal noise on each change
    growth: float = 0.05                 # yearly growth of data and changes
    hot: float = 1.0                     # the data changes rewrite, in mean changes
    huge: float = 0.01                   # probability that a backup carries a huge lump
    huge_factor: float = 10.0            # a huge lump, in mean changes
    huge_life: int = 3                   # snapshots a huge lump stays in before it is deleted
    fail: float = 0.02                   # probability that a backup fails (no snapshot)
    disk: DiskSpec = DiskSpec("snapshots", 30.0)
    headroom: float = 1.5
    history: int = 10
    min_interval: int = 360              # minutes, the server's minimum snapshot interval
    accept_after: Optional[int] = DAY_MINUTES   # minutes until an administrator runs prune --force
    cron_prune: bool = True              # prune also runs from cron, once per interval
    suspicion: Optional[float] = None    # what-if: is_suspicious's factor (None: the headroom)
    seed: int = 1
    hostile: str = "none"
    attack_at: Optional[float] = None    # days from the start; None: two thirds through
    attack_days: float = 30.0
    samples: int = 60                    # how many times the measures are taken over the run

    @property
    def days(self) -> float:
        return self.years * YEAR_DAYS

    @property
    def steps(self) -> int:
        return max(1, int(round(self.days * DAY_MINUTES / self.interval)))

    @property
    def attack_day(self) -> float:
        return self.days * 2 / 3 if self.attack_at is None else self.attack_at


def server_defaults() -> dict:
    """headroom, history and min_interval as byteback's server.conf sets them by default."""
    options = byteback.SERVER_OPTIONS
    return {"headroom": options["headroom"].convert(options["headroom"].default),
            "history": options["history"].convert(options["history"].default),
            "min_interval": int(round(options["min_interval"].convert(options["min_interval"].default)
                                      / MINUTE))}


class Host(NamedTuple):
    """One client: its name, its full size and mean change at the start, its backup offset."""
    name: str
    full: float
    change: float
    offset: int          # minutes after the start of each interval


class Backup(NamedTuple):
    """One backup attempt of one host, as the client makes it."""
    minute: int          # when, in minutes from START
    host: int            # index into Workload.hosts
    kind: str            # "normal" | "junk" | "fill" | "hostile-huge" | "prune" (cron; host -1)
    fail: bool           # fails on its own (network, client): no snapshot
    rewrite: float       # hot bytes rewritten
    pool: float          # the size of the hot data now
    growth: float        # cold bytes added since the host's previous attempt
    lump: float          # bytes of a huge lump written now (deleted again later)
    lump_life: int       # snapshots the lump stays in


class Workload(NamedTuple):
    hosts: List[Host]
    backups: List[Backup]       # in time order
    end_minute: int             # the moment the final measures are taken
    # minute -> (that moment, a snapshot's name then) for every backup: worked out once for
    # every policy (a forked worker inherits them); the engine works out any other itself
    moments: Optional[Dict[int, Tuple[dt.datetime, str]]] = None


def data_factor(params: Params, minute: float) -> float:
    """How much a host's data (and its mean change) has grown since the start."""
    return (1.0 + params.growth) ** (minute / DAY_MINUTES / YEAR_DAYS)


def make_hosts(params: Params, rng: random.Random) -> List[Host]:
    """Hosts of different sizes (log-normal spread), scaled so their mean full size is --full."""
    spread = [math.exp(rng.gauss(0.0, 0.5)) for _ in range(params.hosts)] if params.hosts > 1 else [1.0]
    scale = params.hosts / sum(spread)
    width = len(str(params.hosts))
    step = max(0, min(10, params.interval // (2 * params.hosts)))
    hosts = []
    for i, s in enumerate(spread):
        full = params.full * s * scale
        change = (full * params.change.value if params.change.kind == "fraction"
                  else params.change.value * full / params.full)
        hosts.append(Host(f"host{i + 1:0{max(2, width)}d}", full, change, i * step))
    return hosts


def _noise(rng: random.Random, sigma: float) -> float:
    """Log-normal with mean 1."""
    return math.exp(rng.gauss(0.0, sigma) - sigma * sigma / 2) if sigma > 0 else 1.0


def make_workload(params: Params) -> Workload:
    """Every backup attempt of every host over the run, drawn from random.Random(seed)."""
    rng = random.Random(params.seed)
    hosts = make_hosts(params, rng)
    attack_start = int(round(params.attack_day * DAY_MINUTES))
    attack_end = attack_start + int(round(params.attack_days * DAY_MINUTES))
    backups: List[Backup] = []
    previous: List[Tuple[float, float]] = [(h.full, params.hot * h.change) for h in hosts]
    for step in range(params.steps):
        for i, host in enumerate(hosts):
            minute = step * params.interval + host.offset
            # Draw the same numbers whatever the probabilities, so one option
            # does not reshuffle the others' randomness.
            fail_draw, noise, huge_draw = rng.random(), _noise(rng, params.noise), rng.random()
            grown = data_factor(params, minute)
            change = host.change * grown
            data, pool = host.full * grown, params.hot * change
            growth = max(0.0, (data - previous[i][0]) - (pool - previous[i][1]))
            previous[i] = (data, pool)
            hostile = i == 0 and params.hostile != "none"
            if hostile and params.hostile in ("flood", "fill") and attack_start <= minute < attack_end:
                if params.hostile == "fill":     # uploads junk that never completes
                    backups.append(Backup(minute, i, "fill", False, 0.0, pool, 0.0, 0.0, 1))
                continue        # (the flood is added below, at the rate limit)
            kind, lump, life = "normal", 0.0, 0
            if hostile and params.hostile == "huge" and attack_start <= minute < attack_start + params.interval:
                kind, life = "hostile-huge", 1
            elif step > 0 and huge_draw < params.huge:
                lump, life = params.huge_factor * change, params.huge_life
            backups.append(Backup(minute, i, kind, step > 0 and kind == "normal" and fail_draw < params.fail,
                                  change * noise if step > 0 else 0.0, pool, growth if step > 0 else 0.0,
                                  lump, life))
    if params.cron_prune:
        for step in range(params.steps):
            backups.append(Backup(step * params.interval + params.interval // 2, -1, "prune",
                                  False, 0.0, 0.0, 0.0, 0.0, 0))
    if params.hostile == "flood" and hosts:
        minute = attack_start + hosts[0].offset
        while minute < min(attack_end, params.steps * params.interval):
            grown = data_factor(params, minute)
            backups.append(Backup(minute, 0, "junk", False, 0.0, params.hot * hosts[0].change * grown,
                                  0.0, 0.0, 1))
            minute += params.min_interval
    backups.sort(key=lambda b: (b.minute, b.host))
    end = (params.steps - 1) * params.interval + (hosts[-1].offset if hosts else 0) + 1
    # Each backup's moment and snapshot name, made once for every policy: ~260 bytes a
    # backup, so only up to MOMENTS_KEPT of them (the engine makes any other as it goes).
    moments = {b.minute: moment(b.minute) for b in backups} if len(backups) <= MOMENTS_KEPT else None
    return Workload(hosts, backups, end, moments)


def disk_bytes(params: Params, hosts: List[Host], minute: Optional[int] = None) -> int:
    """The disc's size in bytes (at `minute`, for a steady disc; else the whole run).

    "N snapshots" sizes it for the end of the run: every host's data as it
    will have grown, the free-space target (headroom x the mean change), and
    N mean changes per host.  With growing data such a disc holds more than N
    early on.  "N steady" is the same sum at each moment: the disc grows with
    the data, so hosts keep about N snapshots all along (honest spacing figures).
    """
    if params.disk.kind == "bytes":
        return int(params.disk.value)
    if params.disk.kind == "full":
        return int(params.disk.value * sum(h.full for h in hosts))
    at = minute if params.disk.kind == "steady" and minute is not None else params.steps * params.interval
    grown = data_factor(params, at)
    return int(sum(h.full * grown + (params.disk.value + params.headroom) * h.change * grown
                   for h in hosts))


def minute_to_datetime(minute: int) -> dt.datetime:
    return START + dt.timedelta(minutes=minute)


def moment(minute: int) -> Tuple[dt.datetime, str]:
    """(minute_to_datetime, the name of a snapshot taken then)."""
    when = minute_to_datetime(minute)
    return when, byteback.format_snapshot_name(when)
