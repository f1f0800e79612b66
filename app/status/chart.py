"""One database's history as inline SVG, drawn on the server: no script, no font, scales to any width.

Size per backup as bars, duration as a line over them, failures as red marks from top to bottom where they
happened, drills as diamonds under the axis (green passed, red failed). Every mark carries a ``<title>`` that
starts with the backup's ID (the browser's tooltip, and what a screen reader reads); failures and drills also
``data-id``. Labels stay out of the drawing: the page writes them as text beside it, legible on a phone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

from markupsafe import escape

from app.durations import format_size

WIDTH, HEIGHT = 720, 180
LEFT, RIGHT, TOP, BOTTOM = 8, 8, 10, 26
PLOT_W, PLOT_H = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
AXIS_Y = TOP + PLOT_H


@dataclass(frozen=True)
class Point:
    """One run of the database: ok, failed or broken (an ok manifest without an intact artifact)."""

    at: datetime
    id: str
    state: str
    size_bytes: int
    duration_s: float | None
    error: str | None = None


@dataclass(frozen=True)
class DrillMark:
    at: datetime
    backup_id: str
    status: str
    rto_s: float | None
    error: str | None = None


def render(name: str, points: Sequence[Point], drills: Sequence[DrillMark], start: datetime, end: datetime) -> str:
    """The SVG of ``points`` and ``drills`` between ``start`` and ``end``."""
    span = max((end - start).total_seconds(), 1.0)

    def x(at: datetime) -> float:
        return LEFT + (at - start).total_seconds() / span * PLOT_W

    shown = [p for p in points if start <= p.at <= end]
    good = [p for p in shown if p.state == "ok"]
    bad = [p for p in shown if p.state != "ok"]
    marks = [d for d in drills if start <= d.at <= end]
    top_size = max((p.size_bytes for p in good), default=0) or 1
    timed = [p for p in good if p.duration_s is not None]
    top_duration = max((p.duration_s or 0.0 for p in timed), default=0.0) or 1.0
    bar = min(14.0, max(1.5, PLOT_W / max(len(good), span / 86400, 1) * 0.7))
    summary = f"{name}: {len(good)} backup(s), {len(bad)} failed, {len(marks)} drill(s) from {start:%Y-%m-%d} " \
              f"to {end:%Y-%m-%d}"
    out = [f'<svg class="chart" data-database="{escape(name)}" viewBox="0 0 {WIDTH} {HEIGHT}" '
           f'preserveAspectRatio="xMidYMid meet" role="img" aria-label="{escape(summary)}" '
           f'xmlns="http://www.w3.org/2000/svg">',
           f'<rect class="plot" x="{LEFT}" y="{TOP}" width="{PLOT_W}" height="{PLOT_H}"/>']
    for p in good:
        h = max(1.0, p.size_bytes / top_size * (PLOT_H - 4))
        title = f"{p.id}: {format_size(p.size_bytes)}, {_seconds(p.duration_s)}"
        out.append(f'<rect class="backup" x="{x(p.at) - bar / 2:.1f}" y="{AXIS_Y - h:.1f}" width="{bar:.1f}" '
                   f'height="{h:.1f}"><title>{escape(title)}</title></rect>')
    if timed:
        line = " ".join(f"{x(p.at):.1f},{AXIS_Y - (p.duration_s or 0) / top_duration * (PLOT_H - 4):.1f}"
                        for p in timed)
        out.append(f'<polyline class="duration" points="{line}"><title>duration, longest '
                   f'{escape(_seconds(top_duration))}</title></polyline>')
    for p in bad:
        px = x(p.at)
        what = "failed" if p.state == "failed" else "broken (no intact artifact)"
        title = f"{p.id} {what}" + (f": {p.error}" if p.error else "")
        out.append(f'<g class="failure {p.state}" data-id="{escape(p.id)}"><title>{escape(title)}</title>'
                   f'<line x1="{px:.1f}" y1="{TOP}" x2="{px:.1f}" y2="{AXIS_Y}"/>'
                   f'<path d="M{px - 4:.1f},{TOP + 1} l8,8 m0,-8 l-8,8"/></g>')
    for d in marks:
        dx, dy = x(d.at), AXIS_Y + 12
        state = "ok" if d.status == "ok" else "failed"
        title = f"drill of {d.backup_id}: " + (f"ok, RTO {_seconds(d.rto_s)}" if state == "ok"
                                               else "failed" + (f": {d.error}" if d.error else ""))
        out.append(f'<path class="drill {state}" data-id="{escape(d.backup_id)}" '
                   f'd="M{dx:.1f},{dy - 6} l6,6 l-6,6 l-6,-6 z"><title>{escape(title)}</title></path>')
    out.append(f'<line class="axis" x1="{LEFT}" y1="{AXIS_Y}" x2="{LEFT + PLOT_W}" y2="{AXIS_Y}"/></svg>')
    return "".join(out)


def scale(points: Sequence[Point], start: datetime, end: datetime) -> tuple[int, float]:
    """The largest size and the longest duration in the window: what the bars' and the line's tops mean."""
    good = [p for p in points if start <= p.at <= end and p.state == "ok"]
    return (max((p.size_bytes for p in good), default=0),
            max((p.duration_s or 0.0 for p in good), default=0.0))


def _seconds(value: float | None) -> str:
    if value is None:
        return "duration unknown"
    return f"{value:.1f} s" if value < 600 else f"{value / 60:.0f} min"
