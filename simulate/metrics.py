"""Measures of a kept set: worst relative gap per age band, oldest kept, the last week.

Times are whole minutes on the virtual clock.  A *look-back moment* is the
moment of any snapshot ever taken; for each one within the kept history,
the gap is the distance to the nearest kept snapshot taken at or before it,
and the relative gap is that distance divided by the moment's age.  Moments
older than the oldest kept snapshot are not measured (the oldest kept age
reports them), unless nothing at all is kept of a band that had snapshots:
that band's gap is infinite ("lost").
"""
from __future__ import annotations

import bisect
from typing import List, NamedTuple, Optional, Sequence, Tuple

DAY_MINUTES = 1440
BANDS: Tuple[Tuple[str, float, float], ...] = (
    ("0-7d", 0.0, 7.0), ("7-30d", 7.0, 30.0), ("30-90d", 30.0, 90.0),
    ("90-365d", 90.0, 365.0), (">1y", 365.0, float("inf")),
)


def worst_relative_gaps(taken: Sequence[int], kept: Sequence[int], now: int) -> List[Optional[float]]:
    """Per band (age in (lo, hi] days), the worst gap / age over the look-back moments.

    None when no snapshot was ever taken in the band; infinity when some
    were but none of them or older is kept.  taken and kept are ascending
    minutes; kept is a subset of taken.  Within the gap between two kept
    snapshots the relative gap is worst at the youngest moment, so only that
    one is looked at per band.
    """
    worst: List[Optional[float]] = [None] * len(BANDS)
    for i in range(len(kept)):
        older = kept[i]
        # After the newest kept snapshot, moments up to now count too (backups that failed).
        newer = kept[i + 1] if i + 1 < len(kept) else now
        for b, (_, lo, hi) in enumerate(BANDS):
            upper = min(newer, now - lo * DAY_MINUTES)              # exclusive
            lower = older if hi == float("inf") else max(older, now - hi * DAY_MINUTES)
            j = bisect.bisect_left(taken, upper) - 1
            if j < 0 or taken[j] < lower or now - taken[j] <= 0:
                continue
            relative = (taken[j] - older) / (now - taken[j])
            if worst[b] is None or relative > worst[b]:
                worst[b] = relative
    for b, (_, lo, hi) in enumerate(BANDS):
        if worst[b] is None:
            j = bisect.bisect_left(taken, now - lo * DAY_MINUTES) - 1
            if j >= 0 and now - taken[j] > lo * DAY_MINUTES and (
                    hi == float("inf") or taken[j] >= now - hi * DAY_MINUTES):
                worst[b] = float("inf")      # snapshots were taken this old; none is kept
    return worst


def last_week(taken: Sequence[int], kept: Sequence[int], now: int) -> Tuple[int, int]:
    """(days of the last 7 with a kept snapshot, days of the last 7 with a snapshot taken)."""
    def days(minutes: Sequence[int]) -> set:
        start = bisect.bisect_right(minutes, now - 7 * DAY_MINUTES)
        return {(now - m) // DAY_MINUTES for m in minutes[start:] if m <= now}
    return len(days(kept)), len(days(taken))


class HostMeasure(NamedTuple):
    kept: int
    oldest_days: float
    first_kept: bool
    week: Tuple[int, int]
    gaps: List[Optional[float]]


def measure_host(taken: Sequence[int], kept: Sequence[int], now: int,
                 first: Optional[int] = None) -> HostMeasure:
    """taken: every moment a snapshot should exist for (failed backups too); first: the first
    snapshot's minute (default: the first of taken)."""
    first = taken[0] if first is None and taken else first
    return HostMeasure(len(kept), (now - kept[0]) / DAY_MINUTES if kept else 0.0,
                       bool(kept) and first is not None and kept[0] == first,
                       last_week(taken, kept, now), worst_relative_gaps(taken, kept, now))


class Measure(NamedTuple):
    """All hosts at one moment: the worst host for each figure."""
    day: float
    kept: int                      # all hosts
    kept_min: int                  # the host with the fewest
    kept_max: int
    oldest_days: float             # the host whose oldest kept is youngest
    oldest_max_days: float
    first_kept: int                # hosts still holding their first snapshot
    week: Tuple[int, int]          # worst host's (kept days, taken days) of the last week
    gaps: List[Optional[float]]    # worst host per band
    used: float                    # fraction of the disc in use


def combine(hosts: Sequence[HostMeasure], day: float, used: float) -> Measure:
    gaps: List[Optional[float]] = []
    for b in range(len(BANDS)):
        values = [h.gaps[b] for h in hosts if h.gaps[b] is not None]
        gaps.append(max(values) if values else None)
    week = min((h.week for h in hosts), key=lambda w: (w[0] - w[1], w[0]), default=(0, 0))
    return Measure(day, sum(h.kept for h in hosts), min((h.kept for h in hosts), default=0),
                   max((h.kept for h in hosts), default=0),
                   min((h.oldest_days for h in hosts), default=0.0),
                   max((h.oldest_days for h in hosts), default=0.0),
                   sum(1 for h in hosts if h.first_kept), week, gaps, used)
