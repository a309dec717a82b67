"""The terminal chart as a hand-written SVG picture: axes, labels, a legend, one series per policy.

Plain text with fixed precision and no timestamp, so the same run gives the
same file (it can be committed, e.g. docs/retention.svg).
"""
from __future__ import annotations

import math
from typing import List, Sequence
from xml.sax.saxutils import escape, quoteattr

from . import metrics
from .engine import RunResult
from .model import Params, Workload
from .report import AXIS_TICKS, _axis_span, _days, _gap, describe_run, is_default

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf", "#8c564b",
           "#e377c2", "#7f7f7f", "#bcbd22")
WIDTH = 1000
LEFT, RIGHT = 200, 250          # room for names on the left, figures on the right
MIN_ROWS = 3                    # a policy's band is at least this many rows high (its figures)
ROW, GAP = 13, 14               # one host row; space between policies
TOP = 92
MAX_HOSTS = 4


def _x(age: float, lo: float, hi: float) -> float:
    plot = WIDTH - LEFT - RIGHT
    if age <= lo:
        return float(LEFT)
    return LEFT + plot * math.log(age / lo) / math.log(hi / lo)


def _wrap(text: str, width: int) -> List[str]:
    """Split text at commas or spaces into lines of at most about `width` characters."""
    lines, line = [], ""
    for word in text.replace(",", ", ").split():
        joined = f"{line} {word}" if line else word
        if len(joined) > width and line:
            lines.append(line)
            line = word
        else:
            line = joined
    return lines + ([line] if line else [])


def render(results: Sequence[RunResult], params: Params, workload: Workload) -> str:
    """The SVG document as text."""
    lo, hi = _axis_span(results, params)
    rows = [min(MAX_HOSTS, len(r.kept)) for r in results]
    height = TOP + sum(max(n, MIN_ROWS) * ROW + GAP for n in rows) + 70
    bottom = height - 60
    out: List[str] = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="DejaVu Sans, Verdana, sans-serif" font-size="12">',
        "<title>byteback simulate: kept snapshots by age, per retention policy</title>",
        f'<rect x="0" y="0" width="{WIDTH}" height="{height}" fill="#ffffff"/>',
        f'<text x="{LEFT}" y="22" font-size="15" font-weight="bold">Snapshots kept at the end, by age '
        f'(logarithmic axis)</text>',
        f'<text x="{LEFT}" y="40" fill="#444">{escape(describe_run(params, workload, results[0].disk if results else 0))}</text>',
    ]
    # Legend: one swatch per policy, with its targets.
    x = LEFT
    for i, r in enumerate(results):
        colour = PALETTE[i % len(PALETTE)]
        label = r.policy.name + (" (byteback's default)" if is_default(r.policy) else "")
        out.append(f'<rect x="{x}" y="52" width="12" height="12" fill="{colour}"/>')
        out.append(f'<text x="{x + 16}" y="62">{escape(label)}</text>')
        x += 28 + 7 * len(label)
    out.append(f'<text x="{WIDTH - RIGHT + 10}" y="{TOP - 10}" fill="#444">kept, oldest kept, worst gap / age</text>')
    # Grid and axis.
    out.append('<g class="axis" stroke="#cccccc" stroke-width="1">')
    ticks = [(d, n) for d, n in AXIS_TICKS if lo < d <= hi]
    for days, _ in ticks:
        gx = _x(days, lo, hi)
        out.append(f'<line x1="{gx:.1f}" y1="{TOP - 4}" x2="{gx:.1f}" y2="{bottom}"/>')
    out.append(f'<line x1="{LEFT}" y1="{bottom}" x2="{WIDTH - RIGHT}" y2="{bottom}" stroke="#333333"/>')
    out.append("</g>")
    out.append('<g class="axis-labels" text-anchor="middle" fill="#333">')
    out.append(f'<text x="{LEFT}" y="{bottom + 16}">now</text>')
    for days, name in ticks:
        out.append(f'<text x="{_x(days, lo, hi):.1f}" y="{bottom + 16}">{name}</text>')
    out.append(f'<text x="{LEFT + (WIDTH - LEFT - RIGHT) / 2:.1f}" y="{bottom + 36}">age of the kept '
               f'snapshot (each mark is one snapshot; one row per host)</text>')
    out.append("</g>")
    # One series per policy.
    y = TOP
    for i, (r, n) in enumerate(zip(results, rows)):
        colour = PALETTE[i % len(PALETTE)]
        f = r.final
        worst = max((g for g in f.gaps[1:] if g is not None), default=None)
        out.append(f'<g class="series" data-policy={quoteattr(r.policy.name)} fill="{colour}">')
        name = r.policy.name + (" *" if is_default(r.policy) else "")
        out.append(f'<text x="8" y="{y + 10}" font-weight="bold" fill="#000">{escape(name)}</text>')
        for line_no, line in enumerate(_wrap(r.policy.describe(), 26)[:2]):
            out.append(f'<text x="8" y="{y + 23 + 11 * line_no}" font-size="10" fill="#555">'
                       f'{escape(line)}</text>')
        for h, host in enumerate(sorted(r.kept)[:n]):
            ry = y + h * ROW
            out.append(f'<text x="{LEFT - 6}" y="{ry + 10}" text-anchor="end" font-size="10" '
                       f'fill="#555">{escape(host)}</text>')
            out.append(f'<line x1="{LEFT}" y1="{ry + 6}" x2="{WIDTH - RIGHT}" y2="{ry + 6}" '
                       f'stroke="#eeeeee"/>')
            for age in r.kept[host]:
                out.append(f'<rect x="{_x(age, lo, hi) - 1:.1f}" y="{ry + 1}" width="2.5" height="10"/>')
        out.append(f'<text x="{WIDTH - RIGHT + 10}" y="{y + 10}" fill="#000">{f.kept} kept, oldest '
                   f'{_days(f.oldest_days)}, worst {_gap(worst)}</text>')
        bands = [f"{name} {_gap(g)}" for (name, _, _), g in zip(metrics.BANDS, f.gaps)][1:]
        for line_no, pair in enumerate((bands[:2], bands[2:])):
            out.append(f'<text x="{WIDTH - RIGHT + 10}" y="{y + 23 + 11 * line_no}" font-size="10" '
                       f'fill="#555">{escape(", ".join(pair))}</text>')
        out.append("</g>")
        y += max(n, MIN_ROWS) * ROW + GAP
    out.append("</svg>")
    return "\n".join(out) + "\n"
