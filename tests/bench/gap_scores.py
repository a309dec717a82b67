"""Compare candidate thinning scores over the README's scenarios on the honest (steady) disc.

    python3 tests/bench/gap_scores.py [--seeds 3] [--jobs N]

byteback.gap_score is the one place the rule lives; this script swaps it for
each candidate below in turn (in the worker processes only) and runs
`simulate --policy week` on every scenario and seed, measured every day
(--samples 1096), and prints per candidate and scenario what simulate's
over-time table prints: the share of the days after the first year with
every band from 7 days on within 0.35 of its age, the median day's worst
gap, the worst gap seen, the
most days of the last week missed, the fewest hosts that kept their first
snapshot.  "adopted" marks the candidate byteback.gap_score is now.
Ages are in days, youngest first: y and o are the kept neighbours' ages,
a the candidate's own, s the host's backup interval (byteback.backup_interval).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import byteback  # noqa: E402
from simulate import cli, report  # noqa: E402

TINY = 1e-9


def _positive(x: float) -> float:
    return x if x > TINY else TINY


CANDIDATES = {
    # today's rule until issue 11: the gap left behind over the snapshot's own age
    "(o-y)/a": lambda y, a, o, s: (o - y) / _positive(a),
    # the gap the youngest moment after y would see back to o, over that moment's age
    "(o-y-s)/(y+s)": lambda y, a, o, s: (o - y - s) / _positive(y + s),
    "(o-y)/(y+s)": lambda y, a, o, s: (o - y) / _positive(y + s),
    "(o-y-s)/a": lambda y, a, o, s: (o - y - s) / _positive(a),
    # that gap over the age of the backup one interval older still
    "(o-y-s)/(y+2s)": lambda y, a, o, s: (o - y - s) / _positive(y + 2 * s),
}

COMMON = ["--policy", "week", "--no-chart", "--samples", "1096"]
SCENARIOS = {
    "regular (30steady)": ["--noise", "0", "--huge", "0", "--fail", "0", "--disk", "30steady"],
    "small disc (15steady)": ["--noise", "0", "--huge", "0", "--fail", "0", "--disk", "15steady"],
    "--hot 4 (30steady)": ["--noise", "0", "--huge", "0", "--fail", "0", "--hot", "4", "--disk", "30steady"],
    "realistic (30steady)": ["--disk", "30steady"],
    "realistic (the defaults)": [],
}


def run(job: tuple) -> tuple:
    """(candidate, scenario, seed) -> simulate's over-time figures with that candidate as the rule."""
    candidate, scenario, seed = job
    byteback.gap_score = CANDIDATES[candidate]
    args = cli.build_parser().parse_args(SCENARIOS[scenario] + COMMON + ["--seed", str(seed)])
    params = cli.params_from(args)
    _, (result,) = cli.run_all(params, cli.chosen_policies(args), jobs=1)
    figures = report.over_time(result, params)
    late = [m for m in result.over_time if m.day >= report.warm_up(params)]
    daily = sorted(max([g for g in m.gaps[1:] if g is not None], default=0.0) for m in late)
    figures["median_worst"] = daily[len(daily) // 2] if daily else 0.0
    return job, figures


def adopted() -> str:
    """The candidate that decides like byteback.gap_score on a few hand-picked neighbours."""
    probes = [(0.0, 1.0, 2.0, 1.0), (1.0, 3.0, 7.0, 1.0), (5.0, 9.0, 20.0, 0.25), (2.0, 2.5, 3.0, 1.0)]
    for name, f in CANDIDATES.items():
        if all(abs(f(*p) - byteback.gap_score(*p)) < 1e-12 for p in probes):
            return name
    return "none"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--scenario", action="append", choices=list(SCENARIOS),
                   help="only these scenarios (repeatable; default all)")
    p.add_argument("--candidate", action="append", choices=list(CANDIDATES),
                   help="only these candidates (repeatable; default all)")
    args = p.parse_args()
    scenarios = {k: v for k, v in SCENARIOS.items() if not args.scenario or k in args.scenario}
    candidates = [c for c in CANDIDATES if not args.candidate or c in args.candidate]
    jobs = [(c, sc, seed) for c in candidates for sc in scenarios for seed in range(1, args.seeds + 1)]
    with multiprocessing.get_context("fork").Pool(args.jobs) as pool:
        done = dict(pool.map(run, jobs, chunksize=1))
    current = adopted()
    print(f"simulate {' '.join(COMMON)} --seed 1..{args.seeds}, each scenario's options below; "
          "share: days after the first year with every band from 7 days on within 0.35 (min-max over "
          "the seeds); median: the median day's worst gap; worst: the worst gap seen; week: most days "
          "of the last week missed; first: fewest hosts keeping their first snapshot")
    for scenario, options in scenarios.items():
        print(f"\n{scenario}: {' '.join(options)}")
        print(f"  {'score':<16} {'share':>9} {'median':>11} {'worst':>11} {'week':>4} {'first':>5}")
        for c in candidates:
            figures = [done[(c, scenario, seed)] for seed in range(1, args.seeds + 1)]
            share = [f["share_within"] for f in figures]
            worst = [f["worst_gap"] for f in figures]
            median = [f["median_worst"] for f in figures]
            print(f"  {c:<16} {min(share):>4.0%}-{max(share):<4.0%} {min(median):>5.2f}-{max(median):<5.2f} "
                  f"{min(worst):>5.2f}-{max(worst):<5.2f} "
                  f"{max(f['week_missed'] for f in figures):>4} {min(f['first_kept'] for f in figures):>5}"
                  + ("  adopted" if c == current else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
