"""What a person reads: the comparison table, a terminal chart of kept snapshots, and JSON.

Every figure has fixed precision and every dict is sorted, so the same
seed gives byte-identical output.
"""
from __future__ import annotations

import json
import math
from typing import List, Optional, Sequence

import byteback

from . import metrics
from .engine import RunResult
from .model import YEAR_DAYS, Params, Workload

CHART_HOSTS = 3          # rows per policy in the terminal chart
AXIS_TICKS = ((1, "1d"), (7, "1w"), (30, "1m"), (91, "3m"), (365, "1y"), (730, "2y"),
              (1095, "3y"), (1826, "5y"), (3652, "10y"))


def _gap(value: Optional[float]) -> str:
    if value is None:
        return "-"
    return "lost" if math.isinf(value) else f"{value:.2f}"


def _json_gap(value: Optional[float]):
    if value is None:
        return None
    return "lost" if math.isinf(value) else round(value, 4)


def _days(value: float) -> str:
    return f"{value:.0f}d" if value >= 1 else f"{value * 24:.0f}h"


def describe_run(params: Params, workload: Workload, disk: int) -> str:
    interval = byteback.format_duration(params.interval * 60).replace(" 0h", "").replace(" 0m", "")
    what = "daily" if params.interval == 1440 else f"every {interval}"
    hostile = "" if params.hostile == "none" else (
        f"; hostile client {workload.hosts[0].name}: {params.hostile} from day {params.attack_day:.0f}")
    return (f"{params.hosts} host{'s' if params.hosts != 1 else ''}, {params.years:g} years of {what} "
            f"backups, disc {byteback.format_size(disk)} ({params.disk.describe()}), "
            f"seed {params.seed}{hostile}")


def table(results: Sequence[RunResult], params: Params, workload: Workload) -> str:
    """The side-by-side comparison, one row per policy, and what the guards did."""
    bands = [name for name, _, _ in metrics.BANDS]
    head1 = (f"{'policy':<14} {'kept':>5} {'per host':>8} {'oldest':>7} {'first':>5} {'week':>5}  "
             f"{'worst gap / age, by age':<34} {'disc':>6} {'no':>6} {'failed':>8} {'contained':>9} {'admin':>5}")
    head2 = (f"{'':<14} {'':>5} {'':>8} {'kept':>7} {'kept':>5} {'kept':>5}  "
             + " ".join(f"{b:>6}" for b in bands) + f" {'used':>6} {'space':>6} {'per host':>8} {'prunes':>9} {'runs':>5}")
    lines = [f"byteback simulate: {describe_run(params, workload, results[0].disk if results else 0)}",
             "", head1, head2]
    for r in results:
        f = r.final
        lines.append(
            f"{r.policy.name:<14} {f.kept:>5} {f'{f.kept_min}-{f.kept_max}':>8} "
            f"{_days(f.oldest_days):>7} {f'{f.first_kept}/{len(workload.hosts)}':>5} "
            f"{f'{f.week[0]}/{f.week[1]}':>5}  " + " ".join(f"{_gap(g):>6}" for g in f.gaps)
            + f" {f.used * 100:>5.1f}% {r.stats.failed_space:>6} {_per_host(r, workload):>8} "
            f"{sum(r.stats.contained.values()):>9} {r.stats.interventions:>5}")
    lines.append("")
    lines.append(f"over time (measured {len(results[0].over_time) if results else 0} times; "
                 f"after day {warm_up(params):.0f}):")
    lines.append(f"{'':<14} {'gaps <= 0.35':>12} {'worst gap':>9} {'week missed':>11} {'kept/host':>9} "
                 f"{'first kept':>10}")
    for r in results:
        o = over_time(r, params)
        first = f"{o['first_kept']}/{len(workload.hosts)}"
        lines.append(f"{r.policy.name:<14} {o['share_within']:>12.0%} {_gap(o['worst_gap']):>9} "
                     f"{o['week_missed']:>11} {str(o['kept_min']) + '-' + str(o['kept_max']):>9} {first:>10}")
    lines.append("")
    lines.append("kept per host, by year of the run (fewest-most at the samples, from the first at which "
                 "the count stopped growing):")
    for r in results:
        years = kept_by_year(r)
        lines.append(f"{r.policy.name:<14} " + "  ".join(
            f"year {y} {lo}-{hi}" + (f" (from day {start:.0f})" if n == 0 else "")
            for n, (y, start, lo, hi) in enumerate(years)))
    lines.append("")
    lines.append("targets (days): " + "; ".join(
        f"{r.policy.name} {r.policy.describe()}" + (" (byteback's default)" if is_default(r.policy) else "")
        for r in results))
    lines.append("oldest kept: the host whose oldest is youngest; first kept: hosts still holding their "
                 "first snapshot; week: days of the last 7 with a snapshot kept / taken (worst host).")
    lost = [(r.policy.name, min(v for v in r.first_lost.values() if v))
            for r in results if any(r.first_lost.values())]
    if lost:
        lines.append("first snapshot lost (day, other snapshots its host still kept): " + "; ".join(
            f"{name} day {day:.0f} ({others})" for name, (day, others) in lost))
    lines.append("worst gap / age: for every moment a snapshot was taken, the distance back to the "
                 "nearest kept one, divided by its age (worst host; '-': none taken that long ago; "
                 "lost: none kept).")
    lines.append("over time: how often every band from 7 days on was within 0.35, the worst gap seen, "
                 "the most days of the last week missed, the fewest and most kept by a host, the fewest hosts "
                 "holding their first snapshot.")
    if results:
        s = results[0].stats
        noise = s.suspicious.get("normal", 0)
        lines.append(
            f"guards: {noise} of {s.snapshots} ordinary backups ({100.0 * noise / max(1, s.snapshots):.1f}%) "
            f"were suspicious by noise alone, {s.suspicious.get('huge', 0)} huge ones; an administrator "
            + ("never answers" if params.accept_after is None else
               f"answers after {byteback.format_duration(params.accept_after * 60)}")
            + f" (--accept-after).  ({results[0].policy.name}; no space: backups that did not fit.)")
        causes = ", ".join(f"{n} {c}" for c, n in sorted(s.contained.items())) or "none"
        lines.append(f"containment: prunes that contained a host's excess, by cause: {causes}; "
                     f"{s.accepted} acceptances from growth budgets or prune --force, {s.rollbacks} unfinished "
                     f"uploads rolled back, {s.share_stops} prunes stopped at the hosts' fair shares.")
    for r in results:
        if r.attack:
            a = r.attack
            quiet = a.get("without_attack") or {}
            lines.append(
                f"attack ({params.hostile}, {r.policy.name}): after {params.attack_days:g} days, "
                f"{a['others_kept']}/{a['others_before']} of the other hosts' snapshots survive "
                f"({quiet.get('others_kept', '?')}/{quiet.get('others_before', '?')} without the attack), "
                f"and {a['own_kept']}/{a['own_before']} of {a['hostile_host']}'s own "
                f"({quiet.get('own_kept', '?')}/{quiet.get('own_before', '?')})")
    return "\n".join(lines) + "\n"


def _per_host(result: RunResult, workload: Workload) -> str:
    """Failed backups (on their own or for lack of space), fewest-most over the hosts."""
    counts = [result.stats.failed_by_host.get(h.name, 0) for h in workload.hosts] or [0]
    return f"{min(counts)}-{max(counts)}"


def warm_up(params: Params) -> float:
    """Days before the over-time figures count: the first year, or a third of a shorter run."""
    return min(365.0, params.days / 3)


def over_time(result: RunResult, params: Params) -> dict:
    """The run after the warm-up: how often every band from 7 days on was within 0.35 of its
    age, the worst gap seen, the most days of the last week missed, the fewest and the most
    snapshots a host had, and the fewest hosts that still held their first snapshot."""
    late = [m for m in result.over_time if m.day >= warm_up(params)] or list(result.over_time)
    worst = [max([g for g in m.gaps[1:] if g is not None], default=0.0) for m in late]
    return {"samples": len(late),
            "share_within": sum(1 for w in worst if w <= 0.35) / len(worst) if worst else 0.0,
            "worst_gap": max(worst, default=None),
            "week_missed": max((m.week[1] - m.week[0] for m in late), default=0),
            "kept_min": min((m.kept_min for m in late), default=0),
            "kept_max": max((m.kept_max for m in late), default=0),
            "first_kept": min((m.first_kept for m in late), default=0)}


def kept_by_year(result: RunResult) -> List[tuple]:
    """(year, first day counted, fewest, most) snapshots kept by a host at the samples in each
    year of the run, from the first sample at which the count of all kept stopped growing
    (before it the disc is still filling): whether a disc holds a steady number all along."""
    samples = list(result.over_time)
    start = next((i for i in range(1, len(samples)) if samples[i].kept <= samples[i - 1].kept), 0)
    by_year: dict = {}
    for m in samples[start:]:
        year = int(m.day // YEAR_DAYS) + 1
        first, lo, hi = by_year.get(year, (m.day, m.kept_min, m.kept_max))
        by_year[year] = (first, min(lo, m.kept_min), max(hi, m.kept_max))
    return [(y, first, lo, hi) for y, (first, lo, hi) in sorted(by_year.items())]


def is_default(policy) -> bool:
    """True for the policy prune uses when server.conf says nothing."""
    return (policy.order == "importance" and policy.schedule is None
            and tuple(policy.targets) == tuple(float(d) for d in byteback.DEFAULT_TARGET_DAYS))


def _axis_span(results: Sequence[RunResult], params: Params) -> tuple:
    hi = max([params.days] + [a for r in results for ages in r.kept.values() for a in ages])
    lo = min(1.0, params.interval / 1440.0) / 2
    return lo, max(hi, lo * 10)


def log_position(age: float, lo: float, hi: float, width: int) -> int:
    """Column (0 .. width-1) of an age on a log axis; ages below lo sit at 0."""
    if age <= lo:
        return 0
    x = math.log(age / lo) / math.log(hi / lo)
    return max(0, min(width - 1, int(round(x * (width - 1)))))


def chart(results: Sequence[RunResult], params: Params, width: int = 72) -> str:
    """For each policy, each host's kept snapshots on a logarithmic age axis, newest at the left."""
    lo, hi = _axis_span(results, params)
    label = 14
    lines = ["kept snapshots at the end, by age (logarithmic; newest at the left)", ""]
    for r in results:
        hosts = sorted(r.kept)[:CHART_HOSTS]
        for n, host in enumerate(hosts):
            row = ["-"] * width
            for age in r.kept[host]:
                col = log_position(age, lo, hi, width)
                row[col] = "#" if row[col] in "|#" else "|"
            name = r.policy.name if n == 0 else ""
            lines.append(f"{name:<{label}}{host:>7} {''.join(row)}")
        if len(r.kept) > CHART_HOSTS:
            lines.append(f"{'':<{label}}{'':>7} (and {len(r.kept) - CHART_HOSTS} more hosts)")
    axis = [" "] * width
    names = [" "] * (width + 4)
    for days, name in ((0.0, "now"),) + AXIS_TICKS:
        if days and not lo < days <= hi:
            continue
        col = log_position(days, lo, hi, width)
        axis[col] = "+"
        start = max(0, min(col - len(name) // 2, width + 4 - len(name)))
        if all(c == " " for c in names[max(0, start - 1):start + len(name) + 1]):
            names[start:start + len(name)] = list(name)
    pad = " " * (label + 8)
    lines.append(pad + "".join(axis))
    lines.append(pad + "".join(names).rstrip())
    return "\n".join(lines) + "\n"


def _measure_dict(m: metrics.Measure) -> dict:
    return {"day": round(m.day, 3), "kept": m.kept, "kept_min": m.kept_min, "kept_max": m.kept_max,
            "oldest_days": round(m.oldest_days, 3), "oldest_max_days": round(m.oldest_max_days, 3),
            "first_kept": m.first_kept, "week_kept": m.week[0], "week_taken": m.week[1],
            "worst_gap": {name: _json_gap(g) for (name, _, _), g in zip(metrics.BANDS, m.gaps)},
            "disc_used": round(m.used, 4)}


def to_json(results: Sequence[RunResult], params: Params, workload: Workload) -> str:
    """Everything for scripts: parameters, and per policy the final and sampled measures."""
    p = params._asdict()
    p["disk"] = {"kind": params.disk.kind, "value": params.disk.value}
    p["change"] = {"kind": params.change.kind, "value": params.change.value}
    doc = {
        "parameters": p,
        "disk_bytes": results[0].disk if results else 0,
        "hosts": [{"name": h.name, "full_bytes": int(h.full), "change_bytes": int(h.change)}
                  for h in workload.hosts],
        "bands_days": [[name, lo, None if math.isinf(hi) else hi] for name, lo, hi in metrics.BANDS],
        "policies": [{
            "name": r.policy.name, "order": r.policy.order,
            "targets": "original-code schedule" if r.policy.schedule else list(r.policy.targets),
            "final": _measure_dict(r.final),
            "over_time_summary": {k: (_json_gap(v) if k == "worst_gap" else
                                      round(v, 4) if isinstance(v, float) else v)
                                  for k, v in sorted(over_time(r, params).items())},
            "kept_per_host_by_year": [{"year": y, "from_day": round(first, 3), "fewest": lo, "most": hi}
                                      for y, first, lo, hi in kept_by_year(r)],
            "first_snapshot_lost": {h: (None if v is None else {"day": round(v[0], 3), "others_kept": v[1]})
                                    for h, v in sorted(r.first_lost.items())},
            "stats": r.stats.as_dict(),
            "attack": r.attack,
            "kept_ages_days": {h: [round(a, 4) for a in ages] for h, ages in sorted(r.kept.items())},
            "over_time": [_measure_dict(m) for m in r.over_time],
        } for r in results],
    }
    return json.dumps(doc, indent=1, sort_keys=True) + "\n"


def policy_names(results: Sequence[RunResult]) -> List[str]:
    return [r.policy.name for r in results]
