"""`byteback simulate`: parse the options, run every policy, print the comparison.

byteback's CLI calls main(argv) with the words after `simulate`; main returns
the exit code: 0, 1 (a file could not be written), or 2 (bad arguments, with
one line on stderr and no traceback).
"""
from __future__ import annotations

import argparse
import math
import multiprocessing
import os
import sys
from typing import List, Optional, Sequence

import byteback

from . import engine, model, policies, report, svg

PROG = "byteback simulate"
MAX_BACKUPS = 5_000_000        # a run larger than this is a typo, not a question


class _UsageError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad argument is one line and exit 2, never usage text or a traceback."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise _UsageError(message)


def _check(convert, what: str):
    """Wrap a converter so its ValueError becomes argparse's one-line message."""
    def parse(text: str):
        try:
            return convert(text)
        except (ValueError, OverflowError) as e:
            raise argparse.ArgumentTypeError(str(e) or f"{text!r} is not {what}") from None
    parse.__name__ = what
    return parse


def _number(text: str, *, low: float, high: float = math.inf, low_ok: bool = False) -> float:
    value = float(text)
    if math.isnan(value) or not (value >= low if low_ok else value > low) or value > high:
        bound = f"at least {low:g}" if low_ok else f"more than {low:g}"
        upper = "" if math.isinf(high) else f" and at most {high:g}"
        raise ValueError(f"{text!r} must be {bound}{upper}")
    return value


def _years(text: str) -> float:
    return _number(text, low=0.0, high=100.0)


def _count(text: str, high: int = 1000) -> int:
    value = int(text)
    if not 1 <= value <= high:
        raise ValueError(f"{text!r} must be a whole number from 1 to {high}")
    return value


def _fraction(text: str) -> float:
    """'2%' or '0.02' -> 0.02, within 0 .. 1."""
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if math.isnan(value) or not 0 <= value <= 1:
        raise ValueError(f"{text!r} must be a fraction from 0 to 1, or a percentage such as 2%")
    return value


def _growth(text: str) -> float:
    t = text.strip()
    value = float(t[:-1]) / 100 if t.endswith("%") else float(t)
    if math.isnan(value) or not -0.5 <= value <= 10:
        raise ValueError(f"{text!r} must be a yearly growth from -50% to 1000%, e.g. 10%")
    return value


def _minutes(text: str) -> int:
    minutes = int(round(byteback.parse_duration(text) / 60))
    if minutes < 1:
        raise ValueError(f"{text!r} is shorter than a minute")
    return minutes


def _accept_after(text: str) -> Optional[int]:
    return None if text.strip().lower() in ("never", "none") else max(0, int(round(
        byteback.parse_duration(text) / 60)))


def _size(text: str) -> int:
    value = byteback.parse_size(text)
    if value <= 0:
        raise ValueError(f"{text!r} must be more than 0 bytes")
    return value


def _change(text: str) -> model.ChangeSpec:
    t = text.strip()
    if t.endswith("%"):
        return model.ChangeSpec("fraction", _number(t[:-1], low=0.0, high=100.0) / 100)
    return model.ChangeSpec("bytes", float(_size(t)))


def _disk(text: str) -> model.DiskSpec:
    t = text.strip().lower()
    if t.endswith("steady") and t[:-6].strip().replace(".", "", 1).isdigit():
        return model.DiskSpec("steady", _number(t[:-6], low=0.0))
    for suffix in ("snapshots", "snaps", "snap"):
        if t.endswith(suffix) and t[:-len(suffix)].strip().replace(".", "", 1).isdigit():
            return model.DiskSpec("snapshots", _number(t[:-len(suffix)], low=0.0))
    if t.endswith("x"):
        return model.DiskSpec("full", _number(t[:-1], low=0.0))
    try:
        return model.DiskSpec("bytes", float(_size(t)))
    except ValueError:
        raise ValueError(f"{text!r} is not a disc size: give a size (2T), a multiple of the hosts' "
                         "full size (1.5x) or room for a number of snapshots per host (30snap, "
                         "or 30steady at every moment)") from None


def _policy_name(text: str) -> str:
    policies.policy_named(text)      # raises ValueError naming the choices
    return text


def build_parser() -> argparse.ArgumentParser:
    d = model.Params(**model.server_defaults())
    p = _Parser(
        prog=PROG, formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Model years of backups on a disc of fixed size and compare retention policies, "
                    "pruned by byteback's own code (deletion order, free-space target, refusal of "
                    "suspicious backups).  Prints a table and a chart; --svg draws the chart as a picture.",
        epilog="Sizes take K, M, G, T (powers of 1024); durations s, m, h, d, w.  Policies: "
               + ", ".join(policies.BUILTIN) + " by default; --policy and --targets choose others.  The model's "
               "assumptions are in the README (\"simulate\") and in simulate/__init__.py.")
    g = p.add_argument_group("the run")
    g.add_argument("--years", type=_check(_years, "a number of years"), default=d.years,
                   help="how long to simulate (default %(default)g)")
    g.add_argument("--interval", type=_check(_minutes, "a duration"), default="1d",
                   help="time between a host's backups, e.g. 1d or 6h (default 1d)")
    g.add_argument("--hosts", type=_check(_count, "a number of hosts"), default=d.hosts,
                   help="hosts sharing the disc (default %(default)d)")
    g.add_argument("--seed", type=_check(int, "a whole number"), default=d.seed,
                   help="random seed: the same seed gives the same output (default %(default)d)")
    g = p.add_argument_group("the hosts' data")
    g.add_argument("--full", type=_check(_size, "a size"), default="100G",
                   help="mean full size of a host; hosts differ around it (default 100G)")
    g.add_argument("--change", type=_check(_change, "a size or a percentage"), default="1%",
                   help="mean change per backup: a size, or a percentage of the host's data (default 1%%)")
    g.add_argument("--noise", type=_check(lambda t: _number(t, low=0.0, high=3.0, low_ok=True), "a number"),
                   default=d.noise, help="sigma of the log-normal noise on each change (default %(default)g)")
    g.add_argument("--growth", type=_check(_growth, "a percentage"), default="5%",
                   help="yearly growth of the data and of the changes (default 5%%)")
    g.add_argument("--hot", type=_check(lambda t: _number(t, low=0.0, high=1e6), "a number"), default=d.hot,
                   help="size of the data the changes rewrite, in mean changes: 1 means each backup "
                        "rewrites about what the one before wrote (default %(default)g)")
    g.add_argument("--huge", type=_check(_fraction, "a probability"), default="1%",
                   help="chance that a backup carries a huge lump of new data (default 1%%)")
    g.add_argument("--huge-factor", type=_check(lambda t: _number(t, low=0.0), "a number"),
                   default=d.huge_factor, help="a huge lump, in mean changes (default %(default)g)")
    g.add_argument("--huge-life", type=_check(lambda t: _count(t, 100000), "a number"), default=d.huge_life,
                   help="backups a huge lump stays before it is deleted (default %(default)d)")
    g.add_argument("--fail", type=_check(_fraction, "a probability"), default="2%",
                   help="chance that a backup fails by itself, leaving no snapshot (default 2%%)")
    g = p.add_argument_group("the server")
    g.add_argument("--disk", type=_check(_disk, "a disc size"), default="30snap",
                   help="disc size: bytes (2T), a multiple of the hosts' full size (1.5x), or "
                        "room for N snapshots per host at the end of the run, beside the data and "
                        "the free-space target (30snap, the default); 30steady: room for N at "
                        "every moment, the disc growing with the data")
    g.add_argument("--headroom", type=_check(lambda t: _number(t, low=0.0), "a number"), default=d.headroom,
                   help="free space kept = headroom x mean backup (server.conf; default %(default)g)")
    g.add_argument("--history", type=_check(lambda t: _count(t, 100), "a number"), default=d.history,
                   help="backups the mean is taken over (server.conf; default %(default)d)")
    g.add_argument("--min-interval", type=_check(_minutes, "a duration"),
                   default=f"{d.min_interval}m", help="minimum time between snapshots (server.conf; default 6h)")
    g.add_argument("--suspicion", type=_check(lambda t: _number(t, low=0.0), "a number"), default=None,
                   help="what if a backup were suspicious only above this many times the mean "
                        "(byteback uses the headroom)")
    g.add_argument("--accept-after", type=_check(_accept_after, "a duration or never"), default="1d",
                   help="an administrator runs 'prune --force' this long after prune refuses for a "
                        "suspicious backup, or 'never' (default 1d)")
    g.add_argument("--no-cron-prune", dest="cron_prune", action="store_false",
                   help="prune only after snapshots, not also once per interval from cron")
    g = p.add_argument_group("policies")
    g.add_argument("--policy", action="append", type=_check(_policy_name, "a policy"), metavar="NAME",
                   help="compare this policy (repeatable): " + ", ".join(policies.policy_names())
                        + " (default: byteback's default targets); with none given: "
                        + ", ".join(policies.BUILTIN))
    g.add_argument("--targets", action="append", type=_check(byteback.parse_targets, "a target list"),
                   metavar="LIST", help="also compare importance with these target ages in days, "
                                        "e.g. 0,1,2,7,30,365 (repeatable)")
    g.add_argument("--list-presets", action="store_true", help="print the named target lists and exit")
    g = p.add_argument_group("a hostile client (the first host)")
    g.add_argument("--hostile", choices=model.HOSTILE_KINDS, default="none",
                   help="flood: snapshots at the minimum interval with as much junk as passes as normal; "
                        "huge: one upload of nearly all free space; fill: uploads junk that never "
                        "completes (default none)")
    g.add_argument("--attack-at", type=_check(lambda t: _number(t, low=0.0, low_ok=True), "days"),
                   default=None, help="day the attack starts (default: two thirds through)")
    g.add_argument("--attack-days", type=_check(lambda t: _number(t, low=0.0), "days"), default=d.attack_days,
                   help="how long it lasts; survival is measured at its end (default %(default)g)")
    g = p.add_argument_group("output")
    g.add_argument("--json", action="store_true", help="print JSON instead of the table and chart")
    g.add_argument("--svg", metavar="FILE", help="also write the chart as an SVG picture")
    g.add_argument("--no-chart", dest="chart", action="store_false", help="print the table only")
    g.add_argument("--width", type=_check(lambda t: _count(t, 400), "a width"), default=72,
                   help="width of the terminal chart (default %(default)d)")
    g.add_argument("--samples", type=_check(lambda t: _count(t, 10000), "a number"), default=d.samples,
                   help="times the measures are taken over the run, for --json (default %(default)d)")
    g.add_argument("--jobs", type=_check(lambda t: _count(t, 64), "a number"), default=None,
                   help="policies simulated at once (default: one per CPU)")
    return p


def params_from(args: argparse.Namespace) -> model.Params:
    params = model.Params(
        years=args.years, interval=args.interval, hosts=args.hosts, full=args.full, change=args.change,
        noise=args.noise, growth=args.growth, hot=args.hot, huge=args.huge, huge_factor=args.huge_factor,
        huge_life=args.huge_life, fail=args.fail, disk=args.disk, headroom=args.headroom,
        history=args.history, min_interval=args.min_interval, seed=args.seed, hostile=args.hostile,
        attack_at=args.attack_at, attack_days=args.attack_days, samples=args.samples,
        accept_after=args.accept_after, cron_prune=args.cron_prune, suspicion=args.suspicion)
    if params.interval < params.min_interval:
        raise _UsageError(f"--interval {args.interval}m is shorter than the minimum interval between "
                          f"snapshots ({params.min_interval}m), so the server would refuse most backups; "
                          "lower --min-interval too")
    backups = params.steps * params.hosts
    if backups > MAX_BACKUPS:
        raise _UsageError(f"{backups} backups is too long a run (at most {MAX_BACKUPS}); use fewer "
                          "--years or --hosts, or a longer --interval")
    if params.hostile != "none" and not 0 <= params.attack_day < params.days:
        raise _UsageError(f"--attack-at {params.attack_day:g} is outside the run (0 to {params.days:g} days)")
    return params


def chosen_policies(args: argparse.Namespace) -> List[policies.Policy]:
    chosen = [policies.policy_named(n) for n in args.policy] if args.policy else (
        [] if args.targets else policies.builtin_policies())
    for i, text in enumerate(args.targets or []):
        chosen.append(policies.Policy(f"targets{i + 1}" if len(args.targets) > 1 else "targets",
                                      "importance", text))
    seen = set()
    unique = []
    for policy in chosen:
        if policy.name not in seen:
            seen.add(policy.name)
            unique.append(policy)
    return unique


_FORKED_JOBS: List[tuple] = []   # run_all's jobs, as a forked worker inherits them (never pickled)


def _run_forked(i: int) -> engine.RunResult:
    return _run_one(_FORKED_JOBS[i])


def _run_one(job: tuple) -> engine.RunResult:
    params, workload, policy, baseline = job
    result = engine.run_policy(params, workload, policy)
    if baseline is not None:
        # The same backups without the attack, measured over the same days.
        quiet = engine.run_policy(params, baseline, policy)
        attack = dict(result.attack or {})
        attack["without_attack"] = quiet.attack
        result = result._replace(attack=attack)
    return result


def run_all(params: model.Params, chosen: Sequence[policies.Policy],
            jobs: Optional[int] = None) -> tuple:
    """(workload, results): one workload, every policy over it, in parallel where possible."""
    workload = model.make_workload(params)
    baseline = None
    if params.hostile != "none":
        # The same run without the attack, measured at the same moments.
        baseline = model.make_workload(params._replace(hostile="none"))
    todo = [(params, workload, p, baseline) for p in chosen]
    jobs = min(jobs or os.cpu_count() or 1, len(todo))
    if jobs > 1 and "fork" in multiprocessing.get_all_start_methods():
        # The slowest first (the original code's schedule has the most
        # targets, age has none), so the last to finish is a short one.
        order = sorted(range(len(todo)), key=lambda i: _cost(todo[i][2]), reverse=True)
        # The workers are forked with the jobs in memory: only an index goes to each
        # (a 10-year workload pickled for every policy was ~0.05 s of the parent's time each).
        _FORKED_JOBS[:] = todo
        try:
            with multiprocessing.get_context("fork").Pool(jobs) as pool:
                done = pool.map(_run_forked, order, chunksize=1)
        except OSError:
            pass          # no semaphores (some containers): run one after another
        else:
            results: List[engine.RunResult] = [None] * len(todo)  # type: ignore[list-item]
            for i, result in zip(order, done):
                results[i] = result
            return workload, results
        finally:
            _FORKED_JOBS[:] = []
    return workload, [_run_one(job) for job in todo]


def _cost(policy: policies.Policy) -> tuple:
    """A rough rank of how long a policy takes to simulate."""
    return (policy.order == "importance", policy.schedule is not None, len(policy.targets))


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run `byteback simulate` with argv (the words after `simulate`); return the exit code."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.list_presets:
            default = policies.default_preset_name()
            for name, days in sorted(policies.presets().items()):
                mark = "  (byteback's default)" if name == default else ""
                print(f"{name:<10} {','.join(f'{d:g}' for d in days)}{mark}")
            return 0
        params = params_from(args)
        chosen = chosen_policies(args)
    except _UsageError as e:
        print(f"{PROG}: {e}", file=sys.stderr)
        return 2
    except SystemExit as e:          # --help, --version
        return int(e.code or 0)
    workload, results = run_all(params, chosen, args.jobs)
    if args.svg:
        try:
            with open(args.svg, "w", encoding="utf-8") as f:
                f.write(svg.render(results, params, workload))
        except OSError as e:
            print(f"{PROG}: cannot write {args.svg}: {e.strerror}", file=sys.stderr)
            return 1
    if args.json:
        sys.stdout.write(report.to_json(results, params, workload))
        return 0
    sys.stdout.write(report.table(results, params, workload))
    if args.chart:
        sys.stdout.write("\n" + report.chart(results, params, args.width))
    return 0
