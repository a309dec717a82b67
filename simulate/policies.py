"""The policies compared: named target lists (presets), the original code's schedule, and `age`.

A policy is an order (`importance` or `age`) and, for importance, target
ages in days: a fixed list, or a schedule that depends on the clock and on
the oldest snapshot (the original code's), turned into days at every prune
so that it still runs through byteback's `deletion_order`.
"""
from __future__ import annotations

import datetime as dt
from typing import Callable, Dict, List, NamedTuple, Optional, Sequence, Tuple

import byteback

# Compared on request only, as evidence: a long log-spaced list (every day of
# the last week, then steps of 1.25 out to three years) does worse, because
# the thinning has to work around too many fixed anchors.
SIMULATE_ONLY: Dict[str, Tuple[float, ...]] = {
    "log": (0, 1, 2, 3, 4, 5, 6, 7, 9, 11, 14, 17, 21, 26, 33, 41, 51, 64, 80, 100, 125,
            156, 195, 244, 305, 381, 477, 596, 745, 931, 1164),
}


def presets() -> Dict[str, Tuple[float, ...]]:
    """Named target lists: byteback's own presets, and those compared here only."""
    merged = dict(SIMULATE_ONLY)
    merged.update(byteback.TARGET_PRESETS)
    return {name: tuple(float(d) for d in days) for name, days in merged.items()}


_SCHEDULE_CACHE: Dict[tuple, Tuple[float, ...]] = {}
_LAST_SCHEDULE: list = [None, None]   # (now, its zone, oldest), its ages: the prunes around a backup ask alike


def original_code_targets(now: dt.datetime, oldest: Optional[dt.datetime]) -> Tuple[float, ...]:
    """The schedule the original code ended with, as ages in days at `now`.

    Midday today, midday on each of the previous 6 days, midday on the
    previous 4 Sundays, then every 28 days back to the oldest snapshot (one
    target at or before it).  A target still in the future counts as age 0.
    """
    if _LAST_SCHEDULE[0] == (now, now.tzinfo, oldest):
        return _LAST_SCHEDULE[1]
    key = (now.date(), now.utcoffset(), oldest)
    moments = _SCHEDULE_CACHE.get(key)
    if moments is None:
        noon = now.replace(hour=12, minute=0, second=0, microsecond=0)
        days = [noon - dt.timedelta(days=d) for d in range(7)]
        # weekday(): Monday 0 .. Sunday 6; the previous Sunday is before today.
        sunday = noon - dt.timedelta(days=(now.weekday() + 1) % 7 or 7)
        sundays = [sunday - dt.timedelta(days=7 * k) for k in range(4)]
        days += sundays
        if oldest is not None:
            moment = sundays[-1] - dt.timedelta(days=28)
            while moment > oldest - dt.timedelta(days=28):
                days.append(moment)
                moment -= dt.timedelta(days=28)
        # Kept as seconds before noon today, so ages at any time today are one subtraction.
        moments = tuple(sorted({(noon - m).total_seconds() for m in days}))
        if len(_SCHEDULE_CACHE) > 4096:
            _SCHEDULE_CACHE.clear()
        _SCHEDULE_CACHE[key] = moments
    since_noon = (now - now.replace(hour=12, minute=0, second=0, microsecond=0)).total_seconds()
    # moments are distinct whole days apart and ascending, and only midday today can be
    # in the future (since_noon is within half a day): already sorted, nothing to merge.
    # (since_noon + m) / day for each m, in the interpreter's own loops (the same floats)
    ages = tuple(map(byteback.DAY.__rtruediv__, map(since_noon.__add__, moments)))
    if ages and ages[0] <= 0.0:            # a target still in the future (max(0.0, age))
        ages = (0.0,) + ages[1:]
    _LAST_SCHEDULE[:] = [(now, now.tzinfo, oldest), ages]
    return ages


class Policy(NamedTuple):
    """One column of the comparison: a name, an order and its targets."""
    name: str
    order: str                                   # "importance" | "age"
    targets: Tuple[float, ...] = ()
    schedule: Optional[Callable[[dt.datetime, Optional[dt.datetime]], Tuple[float, ...]]] = None

    def targets_at(self, now: dt.datetime, oldest: Optional[dt.datetime]) -> Sequence[float]:
        return self.schedule(now, oldest) if self.schedule is not None else self.targets

    def describe(self) -> str:
        if self.order == "age":
            return "oldest first"
        if self.schedule is not None:
            return "midday x7, 4 Sundays, every 28 days"
        return ",".join(f"{d:g}" for d in self.targets)


def default_preset_name() -> Optional[str]:
    """The preset whose targets are byteback's DEFAULT_TARGET_DAYS, if any."""
    default = tuple(float(d) for d in byteback.DEFAULT_TARGET_DAYS)
    for name, days in presets().items():
        if days == default:
            return name
    return None


# What `simulate` compares with no --policy; "log" (and any preset) on request.
BUILTIN = ("original", "original-code", "age", "week")


def policy_named(name: str) -> Policy:
    """A built-in policy or preset by name; raises ValueError naming the choices."""
    if name == "age":
        return Policy("age", "age")
    if name == "original-code":
        return Policy("original-code", "importance", schedule=original_code_targets)
    if name == "default":
        return Policy("default", "importance", tuple(float(d) for d in byteback.DEFAULT_TARGET_DAYS))
    table = presets()
    if name in table:
        return Policy(name, "importance", table[name])
    raise ValueError(f"unknown policy {name!r}; choose from "
                     f"{', '.join(sorted(set(BUILTIN) | set(table) | {'default'}))}")


def policy_names() -> List[str]:
    """Every name policy_named accepts."""
    return sorted(set(BUILTIN) | set(presets()) | {"default"})


def builtin_policies() -> List[Policy]:
    """What `simulate` compares when no policy is named: every built-in one, byteback's default too."""
    policies = [policy_named(n) for n in BUILTIN]
    if default_preset_name() is None:
        policies.insert(0, policy_named("default"))
    return policies


def custom_policy(text: str, index: int) -> Policy:
    """--targets LIST: an importance policy with these days (raises ValueError)."""
    return Policy(f"targets{index}" if index else "targets", "importance", byteback.parse_targets(text))
